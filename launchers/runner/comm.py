"""The runner's collectives, one small interface over a distributed engine.

The driver, the training loop and the run-directory code talk to the other ranks only through a
:class:`Comm`: rank and world size, a broadcast and an allgather of Python objects, and sums,
means and maxima of a few floats. :class:`HorovodComm` implements it over Horovod (its torch and
TensorFlow modules share one API; only the tensor type differs), so a second engine is one more
class here and a framework part that makes it, not a change to the driver.
"""
import os
from typing import Any, Callable, List, Sequence

__all__ = ["Comm", "HorovodComm", "started_by_torchrun", "COLLECTIVE_TIMEOUT_ENV"]

# seconds a torch.distributed collective waits for a silent peer (set by the launcher for jobs
# across hosts, from launcher.host_timeout; Horovod's Gloo reads HOROVOD_GLOO_TIMEOUT_SECONDS)
COLLECTIVE_TIMEOUT_ENV = "LARGEBATCH_COLLECTIVE_TIMEOUT_S"


def started_by_torchrun(env=None) -> bool:
    """True in a process torchrun started (it sets TORCHELASTIC_RUN_ID and the env:// variables)."""
    env = os.environ if env is None else env
    return "TORCHELASTIC_RUN_ID" in env and "MASTER_ADDR" in env


class Comm:
    """What the runner asks of the engine (every method is collective unless it says not)."""

    def rank(self) -> int:
        """This process's rank (not collective)."""
        raise NotImplementedError

    def size(self) -> int:
        """The world size (not collective)."""
        raise NotImplementedError

    def broadcast_object(self, obj: Any, name: str) -> Any:
        """Rank 0's ``obj`` on every rank."""
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
        """``train(state)`` under the engine's elastic driver (restarts after a lost rank)."""
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

    def broadcast_object(self, obj, name):
        return self.hvd.broadcast_object(obj, root_rank=0, name=name) if self.size() > 1 else obj

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
