"""CPU and memory of a process tree, read from /proc (Linux only, no extra packages).

RSS counts shared pages once per process, so two processes that share libraries look bigger
than they are; PSS (from smaps_rollup) splits shared pages between their users and adds up
honestly. Both are reported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: fields start after the last ')'
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def tree_pids(root: int) -> list[int]:
    """``root`` and all its living descendants."""
    tree, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        if Path(f"/proc/{pid}").exists():
            out.append(pid)
        todo.extend(tree.get(pid, []))
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (its reaped children are not included)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


@dataclass
class Sample:
    pids: int
    rss_kib: int
    pss_kib: int
    cpu_s: float


def sample(pids: list[int]) -> Sample:
    rss = pss = 0
    cpu = 0.0
    for pid in pids:
        r, p = memory_kib(pid)
        rss, pss, cpu = rss + r, pss + p, cpu + cpu_seconds(pid)
    return Sample(len(pids), rss, pss, cpu)
