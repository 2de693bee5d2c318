"""Elastic jobs under torchrun: the committed state every host keeps on disk.

torchrun's elastic agent restarts every rank of the job when a rank fails, a host leaves or a
host joins: new processes, so nothing kept in memory survives a reset (Horovod Elastic resets
inside the running processes instead). A commit here is a checkpoint file per agent, written by
the agent's first rank (``LOCAL_RANK`` 0) every ``train.commit_every`` updates, at the end of each
epoch, and when the agent stops its ranks (they agree on a step first, as for any SIGTERM). A
restarted job resumes from the freshest commit that any rank holds; rank 0 receives it from
that rank when its own host has none (a host that joined, or a host that sees another disk).

The files are ``<run dir>/elastic/<rendezvous id>-<host>-<agent pid>.pt``: one per agent and
job, so a later job in the same run directory never takes an old job's state.
"""
import os
import socket
from typing import Callable, List, Optional, Tuple

from largebatch import checkpoint as core
from largebatch import rundir

__all__ = ["writes_commits", "own_commit", "freshest_commit", "discard_commit"]


def writes_commits(env=None) -> bool:
    """True on the rank that writes its agent's commits (each agent's first rank)."""
    env = os.environ if env is None else env
    return env.get("LOCAL_RANK", "0") == "0"


def own_commit(run_dir: str, env=None) -> str:
    """This agent's commit file (the rank's parent process is its torchrun agent)."""
    return os.path.join(run_dir, rundir.COMMITS, f"{_job(env)}-{socket.gethostname()}-{os.getppid()}.pt")


def _job(env=None) -> str:
    env = os.environ if env is None else env
    return env.get("TORCHELASTIC_RUN_ID", "job")


def _step_of(path: str) -> int:
    try:
        return int(core.read_manifest(path)["step"])
    except (OSError, core.CheckpointError, KeyError, TypeError, ValueError):
        return -1                      # none, or half a file from a host that was lost


def freshest_commit(run_dir: str, allgather: Callable[[object], List[object]],
                    broadcast: Callable[[object, int], object], rank: int) -> Tuple[Optional[str], int]:
    """(path, step) of the freshest commit any rank holds, the file made present on rank 0 (the
    path is rank 0's; other ranks get None), or (None, -1) when no rank holds one (a job's first
    start). ``allgather(obj)``: every rank's ``obj``; ``broadcast(obj, root)``: ``root``'s ``obj``.
    Collective."""
    mine = own_commit(run_dir)
    steps = allgather(_step_of(mine))
    best = max(steps)
    if best < 0:
        return None, -1
    if steps[0] != best:               # rank 0's host lacks it: the holder sends the file's bytes
        holder = steps.index(best)
        data = None
        if rank == holder:
            with open(mine, "rb") as fh:
                data = fh.read()
        data = broadcast(data, holder)
        if rank == 0:
            os.makedirs(os.path.dirname(mine), exist_ok=True)
            partial = f"{mine}.partial"
            with open(partial, "wb") as fh:
                fh.write(data)
            os.replace(partial, mine)
    return (mine if rank == 0 else None), best


def discard_commit(run_dir: str, every_agent: bool = False) -> None:
    """The job finished: this agent's commit goes (``every_agent``: this job's commits of every
    agent, those of hosts that left included), and the folder once empty."""
    mine = own_commit(run_dir)
    folder = os.path.dirname(mine)
    job = _job() + "-"
    names = [n for n in _listing(folder) if n.startswith(job)] if every_agent else [os.path.basename(mine)]
    for name in names:
        try:
            os.remove(os.path.join(folder, name))
        except OSError:                # another agent removed its own first
            pass
    try:
        os.rmdir(folder)
    except OSError:                    # not there, or another job's file is still in it
        pass


def _listing(folder: str) -> List[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []
