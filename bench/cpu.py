"""CPU time used by a server and everything it starts, for the benchmarks.

Throughput on a shared machine measures the scheduler as much as the server; CPU seconds per
unit of work does not (much): a server that needs half the CPU per packet would be twice as
fast on a core of its own. Each server is put in a cpuacct cgroup of its own (cgroup v1, as
here, or v2), which counts every process it forks, including tftpd-hpa's per-transfer children
(their SIGCHLD is ignored, so their time never reaches the parent's rusage). Without a
writable cgroup hierarchy it falls back to summing the live process tree from /proc, which
misses children that came and went between two readings (C{exact} says which).
"""

from __future__ import annotations

import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")
_V1 = Path("/sys/fs/cgroup/cpuacct")
_V2 = Path("/sys/fs/cgroup")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, utime+stime+cutime+cstime in seconds), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    ppid = int(fields[1])
    ticks = sum(int(v) for v in fields[11:15])
    return ppid, ticks / _TICK


def tree_cpu(root: int) -> float:
    """CPU seconds of C{root} and every live descendant (with their reaped children)."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                stats[int(entry)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
        todo.extend(children.get(pid, ()))
    return total


class CPUMeter:
    """CPU seconds used by C{pid} and all it forks from now on (C{seconds()}); C{close()}
    removes the cgroup once its processes are gone."""

    def __init__(self, pid: int, name: str) -> None:
        self.pid = pid
        self.group: Path | None = None
        self.v2 = False
        for base, v2 in ((_V1, False), (_V2, True)):
            if v2 and not (base / "cgroup.controllers").exists():
                continue
            if not v2 and not (base / "cpuacct.usage").exists():
                continue
            group = base / f"sidero-bench-{os.getpid()}-{name}"
            try:
                group.mkdir(exist_ok=True)
                (group / "cgroup.procs").write_text(f"{pid}\n")
            except OSError:
                continue
            self.group, self.v2 = group, v2
            break
        self.exact = self.group is not None

    def seconds(self) -> float:
        if self.group is None:
            return tree_cpu(self.pid)
        if self.v2:
            for line in (self.group / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value) / 1e6
            return 0.0
        return int((self.group / "cpuacct.usage").read_text()) / 1e9

    def close(self) -> None:
        if self.group is None:
            return
        parent = self.group.parent
        try:
            for pid in (self.group / "cgroup.procs").read_text().split():
                (parent / "cgroup.procs").write_text(f"{pid}\n")  # leftovers: back to the root
            self.group.rmdir()
        except OSError:
            pass
        self.group = None
