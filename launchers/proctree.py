"""The processes a launcher started, found and signalled by PID (Linux ``/proc``).

``largebatch run`` and the torchrun fan-out stop a job by signalling the processes below the
one they started, never by name: a scan of ``/proc`` finds them.
"""
import os
from typing import List, Tuple

__all__ = ["descendants", "alive", "send"]


def descendants(root: int) -> List[Tuple[int, str]]:
    """[(pid, command name)] of every process below ``root``."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append((int(entry), name))
    out, todo = [], [root]
    while todo:
        for pid, name in children.get(todo.pop(), []):
            out.append((pid, name))
            todo.append(pid)
    return out


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][:1] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def send(pid: int, sig: int) -> None:
    """``os.kill``, for a process that may have gone already."""
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
