"""CPU time and memory of the proxy processes, read from /proc.

The proxies' cost is what the benchmark is about, so it is measured from the kernel's own
accounting (utime + stime of every thread of the process) rather than from anything the proxy
reports about itself. A path may have several proxy processes (nginx master + worker, two
sidecars); the figures are summed over them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by all threads of `pid`."""
    with open(f"/proc/{pid}/stat") as f:
        raw = f.read()
    # comm (field 2) may contain spaces and parentheses: split after its closing ')'.
    fields = raw[raw.rindex(")") + 2:].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / _CLK_TCK


def total_cpu_seconds(pids: Iterable[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


@dataclass(frozen=True)
class Memory:
    rss_kib: int   # resident now
    hwm_kib: int   # peak resident since start


def memory(pid: int) -> Memory:
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return Memory(values.get("VmRSS", 0), values.get("VmHWM", 0))


def total_memory(pids: Iterable[int]) -> Memory:
    mems = [memory(pid) for pid in pids]
    return Memory(sum(m.rss_kib for m in mems), sum(m.hwm_kib for m in mems))


def children(pid: int) -> list[int]:
    """Direct children of `pid` (nginx's workers are children of its master)."""
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                raw = f.read()
        except OSError:
            continue  # exited while we looked
        ppid = int(raw[raw.rindex(")") + 2:].split()[1])
        if ppid == pid:
            found.append(int(entry))
    return found


def with_descendants(pids: Iterable[int]) -> list[int]:
    out: list[int] = []
    todo = list(pids)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children(pid))
    return out
