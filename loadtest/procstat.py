"""CPU time of processes from /proc, so the benchmark can report the CPU of every process beside each figure
(and CPU-µs per call) without depending on the load generator."""

from __future__ import annotations

import os
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads); 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14 and 15 of stat)


def children(pid: int) -> list[int]:
    """Direct children of a process (Postgres' backends of its postmaster)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if ppid == pid:
                found.append(int(entry.name))
    return found


class CpuMeter:
    """CPU used by named groups of processes between start() and stop()."""

    def __init__(self, groups: dict[str, list[int]], *, with_children: tuple[str, ...] = ()) -> None:
        self.groups = groups
        self.with_children = with_children
        self._start: dict[str, dict[int, float]] = {}

    def _pids(self, name: str) -> list[int]:
        pids = list(self.groups[name])
        if name in self.with_children:
            pids += [child for pid in self.groups[name] for child in children(pid)]
        return pids

    def start(self) -> None:
        self._start = {name: {pid: cpu_seconds(pid) for pid in self._pids(name)} for name in self.groups}

    def stop(self) -> dict[str, float]:
        """CPU seconds per group since start() (processes born meanwhile count from zero)."""
        used = {}
        for name in self.groups:
            before = self._start.get(name, {})
            used[name] = round(sum(cpu_seconds(pid) - before.get(pid, 0.0) for pid in self._pids(name)), 3)
        return used
