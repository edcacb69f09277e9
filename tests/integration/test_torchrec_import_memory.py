"""Bounded memory of ``import_torchrec``: a table many times the chunk size is imported from a
safetensors and a torch.save file by a fresh process whose peak RSS grows by a few chunks, not
by the table. Peak RSS is the kernel's high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` once torch and the import code are loaded); it counts the resident
pages of memory maps too, so a reader that kept the file mapped would show the whole table."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from services.core.checkpoint.reader import CheckpointReader

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "torchrec"
BIG = "sparse_arch.embedding_bag_collection.embedding_bags.t_users.weight"
TABLE_MIB = 96
CHUNK_MIB = 1

# RSS before and peak RSS during the import, in a fresh process (Linux /proc), in KiB.
_MEASURE = """
import json, sys
import torch, safetensors.numpy
from services.core.checkpoint.torchrec_import import import_torchrec
def status(key):
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(key + ":")))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
before = status("VmRSS")
import_torchrec(sys.argv[1], sys.argv[2], sys.argv[3], chunk_bytes=int(sys.argv[4]))
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""


def big_state_dict(folder: pathlib.Path, table_bytes: int) -> dict[str, pathlib.Path]:
    """The fixture's state dict with table t_users grown to ``table_bytes`` (dim 8), written
    as safetensors and with torch.save."""
    import torch

    state = torch.load(FIXTURE / "dlrm.pt", weights_only=True)  # TorchRec's key order
    state[BIG] = torch.from_numpy(np.random.default_rng(0).standard_normal((table_bytes // 32, 8), dtype=np.float32))
    paths = {"safetensors": folder / "big.safetensors", "pt": folder / "big.pt"}
    save_file({k: v.numpy() for k, v in state.items()}, str(paths["safetensors"]))
    torch.save(state, paths["pt"])
    return paths


@pytest.mark.parametrize("suffix", ["safetensors", "pt"])
def test_peak_rss_grows_by_chunks_not_by_the_table(tmp_path_factory, suffix):
    folder = tmp_path_factory.getbasetemp() / "big_state_dict"
    if not folder.exists():
        folder.mkdir()
        big_state_dict(folder, TABLE_MIB << 20)
    out = tmp_path_factory.mktemp(f"import-{suffix}")
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(folder / f"big.{suffix}"), str(FIXTURE / "map.toml"), str(out), str(CHUNK_MIB << 20)],
        capture_output=True,
        text=True,
        check=True,
        cwd=pathlib.Path(__file__).resolve().parents[2],
    )
    rss = json.loads(done.stdout.strip().splitlines()[-1])
    growth_mib = (rss["peak"] - rss["before"]) / 2**10
    print(f"{suffix}: {TABLE_MIB} MiB table in {CHUNK_MIB} MiB chunks: peak RSS +{growth_mib:.1f} MiB")
    assert growth_mib < TABLE_MIB / 4, f"peak RSS grew by {growth_mib:.1f} MiB importing a {TABLE_MIB} MiB table"
    reader = CheckpointReader(out)
    t = reader.manifest(1).model.table("t_users")
    assert (t.rows, t.dim) == ((TABLE_MIB << 20) // 32, 8)
    reader.verify(1, full=True)
