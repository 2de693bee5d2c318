"""The runner's collectives, one small interface over a distributed engine.

The driver, the training loop and the run-directory code talk to the other ranks only through a
:class:`Comm`: rank and world size, a broadcast and an allgather of Python objects, and sums,
means and maxima of a few floats. :class:`HorovodComm` implements it over Horovod (its torch and
TensorFlow modules share one API; only the tensor type differs), so a second engine is one more
class here and a framework part that makes it, not a change to the driver.
"""
import os
import re
import socket
from typing import Any, Callable, Dict, List, Optional, Sequence

from largebatch.launchers.command import COLLECTIVE_TIMEOUT_ENV     # (the launcher sets it for the ranks)

__all__ = ["Comm", "HorovodComm", "TorchDistributedComm", "started_by_torchrun", "torch_distributed_env", "first_host",
           "COLLECTIVE_TIMEOUT_ENV"]



def started_by_torchrun(env=None) -> bool:
    """True in a process torchrun started (it sets TORCHELASTIC_RUN_ID and the env:// variables)."""
    env = os.environ if env is None else env
    return "TORCHELASTIC_RUN_ID" in env and "MASTER_ADDR" in env


def first_host(nodelist: str) -> str:
    """The first host of a Slurm host list: ``node[03-05,9],gpu1`` -> ``node03``."""
    name, depth = "", 0
    for ch in nodelist.strip():
        if ch == "," and depth == 0:
            break
        depth += ch == "["
        depth -= ch == "]"
        name += ch
    # each bracket stands for its first value, zero padding kept
    return re.sub(r"\[([^\],-]+)[^\]]*\]", r"\1", name)


def torch_distributed_env(port: Optional[int], env=None) -> Dict[str, str]:
    """The ``env://`` variables ``init_process_group`` reads, for a rank torchrun did not start.

    In a Slurm step (``srun``): rank ``SLURM_PROCID`` of ``SLURM_STEP_NUM_TASKS``, and rank 0's host,
    the first of the step's nodes (srun places tasks in blocks), serves the store on ``port``.
    Anywhere else (``python -m largebatch.runner`` by hand): a world of one on this host. Empty
    under torchrun, which has set them."""
    env = os.environ if env is None else env
    if started_by_torchrun(env):
        return {}
    if env.get("SLURM_STEP_ID") is not None and env.get("SLURM_PROCID", "").isdigit():
        size = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "localhost"
        return {"MASTER_ADDR": first_host(nodes), "MASTER_PORT": str(port), "RANK": env["SLURM_PROCID"],
                "WORLD_SIZE": size, "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
    with socket.socket() as s:           # a free port for a world of one
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}


class Comm:
    """What the runner asks of the engine (every method is collective unless it says not)."""

    def rank(self) -> int:
        """This process's rank (not collective)."""
        raise NotImplementedError

    def size(self) -> int:
        """The world size (not collective)."""
        raise NotImplementedError

    restarts_processes = False           # an elastic reset is new processes (torchrun), not a reset in place

    def broadcast_object(self, obj: Any, name: str, root: int = 0) -> Any:
        """Rank ``root``'s ``obj`` on every rank."""
        raise NotImplementedError

    def allgather_object(self, obj: Any) -> List[Any]:
        """Every rank's ``obj``, in rank order."""
        raise NotImplementedError

    def sum(self, values: Sequence[float], name: str) -> List[float]:
        """Elementwise sums over ranks, in float64."""
        raise NotImplementedError

    def mean(self, value: float, name: str) -> float:
        raise NotImplementedError

    def maximum(self, value: float, name: str) -> float:
        raise NotImplementedError

    def elastic_run(self, train: Callable, state: Any) -> None:
        """``train(state)`` under the engine's elastic driver (restarts after a lost rank), or
        plainly where the engine restarts the processes instead (``restarts_processes``)."""
        raise NotImplementedError


class HorovodComm(Comm):
    """:class:`Comm` over an initialised Horovod module (``horovod.torch`` or
    ``horovod.tensorflow``). ``to_tensor(list of floats)`` makes the float64 tensor its
    allreduce takes; ``to_list(tensor)`` reads one back."""

    def __init__(self, hvd, to_tensor: Callable, to_list: Callable):
        self.hvd, self._to_tensor, self._to_list = hvd, to_tensor, to_list

    def rank(self) -> int:
        return self.hvd.rank()

    def size(self) -> int:
        return self.hvd.size()

    def broadcast_object(self, obj, name, root=0):
        return self.hvd.broadcast_object(obj, root_rank=root, name=name) if self.size() > 1 else obj

    def allgather_object(self, obj):
        return self.hvd.allgather_object(obj)

    def _allreduce(self, values, op, name):
        return self._to_list(self.hvd.allreduce(self._to_tensor(list(values)), op=op, name=name))

    def sum(self, values, name):
        return self._allreduce(values, self.hvd.Sum, name)

    def mean(self, value, name):
        return float(self._allreduce([value], self.hvd.Average, name)[0])

    def maximum(self, value, name):
        return float(self._allreduce([value], self.hvd.Max, name)[0])

    def elastic_run(self, train, state):
        self.hvd.elastic.run(train)(state)


class TorchDistributedComm(HorovodComm):
    """:class:`Comm` over torch.distributed (``largebatch.torch.TorchDistributed``, Horovod's
    call names). An elastic reset is torchrun's agent starting the ranks anew, each resuming from
    the freshest commit (:mod:`.commits`): training itself runs plainly."""

    restarts_processes = True

    def elastic_run(self, train, state):
        train(state)
