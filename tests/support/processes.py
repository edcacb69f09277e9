"""Service processes for tests: ``shardrec`` subcommands (or any Python code) as real processes.

Processes are started with ``subprocess.Popen`` (fork + exec, never a bare fork of the test
process, which may have imported grpc), in their own session so a whole process group can be
killed, with stdout and stderr going to a per-process log file and ``PYTHONUNBUFFERED=1``.

Every method is called from the pytest main thread.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

from services.localcluster.processes import shardrec_argv

REPO_ROOT = Path(__file__).resolve().parents[2]
KILL_TIMEOUT_S = 10.0


class ServiceProcess:
    """One child process and its log file.

    ``argv`` is run as given, in ``cwd`` (default the repository root) with ``env`` over a copy
    of ``os.environ`` (plus ``PYTHONUNBUFFERED=1``). The process leads its own process group:
    ``kill()`` and ``close()`` reach its children too.
    """

    def __init__(
        self, argv: Sequence[str], log_path: Path, *, name: str, env: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        full_env = dict(os.environ)
        full_env["PYTHONUNBUFFERED"] = "1"
        if env:
            full_env.update(env)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.argv,
                cwd=REPO_ROOT if cwd is None else cwd,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit status (negative: killed by that signal), or None while running."""
        return self._proc.poll()

    @property
    def running(self) -> bool:
        return self._proc.poll() is None

    def terminate(self) -> None:
        """SIGTERM to the process itself: the graceful stop a service must handle."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL to the whole process group: a crash, nothing runs afterwards."""
        if self.running:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._proc.wait(KILL_TIMEOUT_S)

    def pause(self) -> None:
        """SIGSTOP the process group (a hung process: its ZooKeeper session expires)."""
        self._signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT the process group."""
        self._signal_group(signal.SIGCONT)

    def wait(self, timeout_s: float) -> int:
        """Wait for the process to exit and return its exit status.

        Raises AssertionError naming the process and showing its log tail on timeout.
        """
        try:
            return self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"process {self.name} (pid {self.pid}) still running after {timeout_s:.1f}s; log tail:\n"
                f"{self.log_text()[-4000:]}"
            ) from None

    def log_text(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        """Kill the process group if anything of it still runs (teardown). Idempotent."""
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)  # the group may outlive its leader
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self._proc.wait(KILL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass

    def _signal(self, sig: int) -> None:
        if self.running:
            os.kill(self._proc.pid, sig)

    def _signal_group(self, sig: int) -> None:
        if self.running:
            os.killpg(self._proc.pid, sig)

    def __repr__(self) -> str:
        return f"ServiceProcess({self.name!r}, pid={self.pid}, returncode={self.returncode})"


class ProcessFactory:
    """What the ``spawn`` fixture gives a test: ``spawn(*cli_args)`` starts
    ``shardrec *cli_args`` (the installed console script); ``spawn.python(*args)`` starts ``python *args``;
    both in the repository root unless ``cwd`` says otherwise.

    Logs go to ``<log_dir>/<name>.log``; every process is killed at teardown (``close()``).
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.processes: list[ServiceProcess] = []

    def __call__(
        self, *cli_args: str, name: str | None = None, env: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> ServiceProcess:
        _python, *args = shardrec_argv(sys.executable, *cli_args)
        return self.python(*args, name=name or (cli_args[0] if cli_args else "cli"), env=env, cwd=cwd)

    def python(
        self, *args: str, name: str = "python", env: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> ServiceProcess:
        unique = name
        taken = {p.name for p in self.processes}
        n = 1
        while unique in taken:
            n += 1
            unique = f"{name}-{n}"
        proc = ServiceProcess([sys.executable, *args], self.log_dir / f"{unique}.log", name=unique, env=env, cwd=cwd)
        self.processes.append(proc)
        return proc

    def logs(self, max_chars_each: int = 8000) -> str:
        """The log tail of every process, for a failure report."""
        parts = []
        for p in self.processes:
            parts.append(f"----- {p.name} (pid {p.pid}, returncode {p.returncode}) {p.log_path}\n{p.log_text()[-max_chars_each:]}")
        return "\n".join(parts)

    def close(self) -> None:
        for p in self.processes:
            p.close()
