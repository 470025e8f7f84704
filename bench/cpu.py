"""CPU time used by a process and its descendants (Linux /proc), for the benchmarks.

Throughput on a shared machine measures the scheduler as much as the server; CPU seconds per
unit of work does not (much): a server that needs half the CPU per packet would be twice as
fast on a core of its own. Reaped children count through their parent's cutime/cstime
(tftpd-hpa forks one per transfer), live ones are summed directly (sidero's TFTP workers).
"""

from __future__ import annotations

import os

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, utime+stime+cutime+cstime in seconds), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    # fields[0] is state; ppid is field 4 of stat, utime..cstime fields 14..17.
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
