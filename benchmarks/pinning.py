"""``bench compare --pin``: the frontend host on one CPU set, the rest of the cluster on another.

A deployment runs frontends on their own (expensive, GPU) hosts and shards, Redis and ZooKeeper
elsewhere; on one machine, CPU affinity approximates that split (docs/benchmarks.md). Every
thread of a process is pinned (affinity is per thread on Linux; threads started later inherit
it from the thread that starts them). The load generator is left unpinned.

    frontend, rest = parse_pin("auto")          # halves of this process's CPUs
    pin_processes({1234: "frontend"}, frontend)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import psutil


def parse_cpus(raw: str) -> frozenset[int]:
    """A Linux CPU list (``"0-3,6"``) as a set of CPU numbers."""
    cpus: set[int] = set()
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"not a CPU list: {raw!r} (e.g. 0-3,6)") from None
        if a > b or a < 0:
            raise ValueError(f"not a CPU range: {part!r} in {raw!r}")
        cpus.update(range(a, b + 1))
    if not cpus:
        raise ValueError(f"an empty CPU list: {raw!r}")
    return frozenset(cpus)


def parse_pin(raw: str, available: Iterable[int] | None = None) -> tuple[frozenset[int], frozenset[int]]:
    """``"FRONTEND:REST"`` CPU lists (e.g. ``"0:1"``, ``"0-3:4-7"``), or ``"auto"``: the first
    half of ``available`` (default: this process's CPUs) for the frontend, the rest for the others."""
    cpus = sorted(os.sched_getaffinity(0) if available is None else available)
    if raw == "auto":
        if len(cpus) < 2:
            raise ValueError(f"--pin needs at least 2 CPUs, this process may use {cpus}")
        half = len(cpus) // 2
        return frozenset(cpus[:half]), frozenset(cpus[half:])
    front, sep, rest = raw.partition(":")
    if not sep:
        raise ValueError(f"--pin takes FRONTEND_CPUS:OTHER_CPUS or auto, got {raw!r}")
    a, b = parse_cpus(front), parse_cpus(rest)
    if a & b:
        raise ValueError(f"--pin {raw!r}: the two CPU sets overlap on {sorted(a & b)}")
    if missing := (a | b) - set(cpus):
        raise ValueError(f"--pin {raw!r}: CPUs {sorted(missing)} are not available (this process may use {cpus})")
    return a, b


def _pin_tasks(pid: int, cpus: frozenset[int]) -> None:
    done: set[int] = set()
    while True:  # again while threads appear meanwhile
        try:
            tids = {int(t) for t in os.listdir(f"/proc/{pid}/task")} - done
        except FileNotFoundError:
            return
        if not tids:
            return
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cpus)
            except ProcessLookupError:
                pass
        done |= tids


def pin_processes(pids: Mapping[int, str], cpus: frozenset[int]) -> list[str]:
    """Pin every thread of each process and of its children to ``cpus``; the names pinned."""
    pinned = []
    for pid, name in pids.items():
        try:
            family = [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
        except psutil.NoSuchProcess:
            continue
        for p in family:
            _pin_tasks(p, cpus)
        pinned.append(name)
    return pinned


def cpu_list(cpus: Iterable[int]) -> str:
    """``{0, 1, 2, 5}`` -> ``"0-2,5"``."""
    runs: list[list[int]] = []
    for c in sorted(cpus):
        if runs and runs[-1][1] == c - 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
