"""The CLI stays light: the command modules that generate and inspect checkpoints import
neither torch nor grpc (``shardrec --help`` and ``checkpoint verify`` start fast)."""

import subprocess
import sys


def test_pure_modules_do_not_import_torch():
    code = (
        "import sys, services.core.synth, services.core.checkpoint.reader, services.core.checkpoint.delta, services.admin.cmd_model, "
        "services.admin.cmd_checkpoint; bad = {'torch', 'grpc'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
