"""One rank's run, in one order, for every framework.

:func:`run` owns the order of a run: the engine and threads, elastic detection (Horovod Elastic, or torchrun's agents), the experiment
for the real world size with this rank's data, schedule and run directory, the model, the
optimizer with its distributed wrapper, resume, the first broadcast, the loop's hooks, plain or
elastic training, and the end. What differs between frameworks is a :class:`Framework`, one
small class per framework (``torch_train.TorchPart``, ``keras_train.KerasPart``); the shared
work around each step is :class:`~.loop.TrainingLoop`; the collectives are a :class:`~.comm.Comm`.
"""
import os
import types
from typing import Any, Dict, Optional, Tuple

from .comm import Comm, started_by_torchrun
from .commits import freshest_commit
from .loop import Hooks, TrainingLoop, accumulation_for, prepare
from .params import announce_exclusion

__all__ = ["Framework", "run"]


class Framework:
    """What one framework does in a run, called by :func:`run` in this order. State that later
    calls need (model, optimizer, data) stays on the instance."""

    track = False                       # trust ratios logged (set by build_optimizer)

    def start_engine(self, exp, threads: Tuple[int, int, str]) -> Comm:
        """Set the CPU threads, start the experiment's distributed engine (``exp.derived['engine']``);
        return its collectives."""
        raise NotImplementedError

    def seed(self, seed: int) -> None:
        raise NotImplementedError

    def build_model(self, exp) -> Any:
        """The configured model (not yet trained, identical on every rank after the broadcast)."""
        raise NotImplementedError

    def build_optimizer(self, exp, model, schedule, accumulation: int, elastic: bool) -> None:
        """The configured optimizer at ``schedule(0)`` in its distributed wrapper (averaging over
        ranks every ``accumulation`` micro-batches). Sets ``self.track``: trust ratios logged."""
        raise NotImplementedError

    def load_resume(self, exp, run_dir: str, commit: Optional[Tuple[Optional[str], int]] = None) -> Optional[Dict]:
        """``train.resume``'s checkpoint (or, in a restarted torchrun elastic job, ``commit``: rank
        0's path to the freshest commit, and its step) into model and optimizer on rank 0, before
        anything is written (see ``common.read_resume``); every rank gets the same answer."""
        raise NotImplementedError

    def broadcast_initial(self) -> None:
        """Rank 0's parameters and optimizer state to every rank (not in an elastic job, whose
        state object does it)."""
        raise NotImplementedError

    def hooks(self, val_set) -> Hooks:
        """What the loop calls: evaluation, the checkpoint writer, weights, rank check, trust ratios."""
        raise NotImplementedError

    def attach(self, loop: TrainingLoop, train_set, schedule, resumed: Optional[Dict]) -> Dict:
        """The loop and data to train with; returns the counters a run starts from."""
        raise NotImplementedError

    def train(self, state) -> None:
        """Updates from ``state.step`` to the end (again after an elastic reset)."""
        raise NotImplementedError

    def elastic_state(self, start: Dict) -> Any:
        """The engine's elastic state over model, optimizer and ``start``, its reset callbacks set
        (torchrun: the counters and a ``commit()`` that writes the loop's commit file)."""
        raise NotImplementedError

    def close(self) -> None:
        """After the run's end is written: let go of the engine (nothing by default)."""

    def outcome(self, state) -> Tuple[int, Dict]:
        """(updates skipped for NaN/Inf, extra summary.json fields) once training ended at ``state``."""
        raise NotImplementedError


def is_elastic(exp, env=None) -> bool:
    """Elastic only when horovodrun started an elastic job, or torchrun's agents did (a plain
    launch of the YAML trains as usual)."""
    env = os.environ if env is None else env
    return bool(exp.cfg["launcher"]["elastic"]) and (env.get("HOROVOD_ELASTIC") == "1" or started_by_torchrun(env))


def _freshest_commit(comm: Comm, run_dir: str) -> Optional[Tuple[Optional[str], int]]:
    """torchrun's elastic job restarted: the freshest commit any rank holds (None on the first start)."""
    path, step = freshest_commit(run_dir, comm.allgather_object,
                                 lambda obj, root: comm.broadcast_object(obj, "largebatch.commit", root), comm.rank())
    return (path, step) if step >= 0 else None


def run(part: Framework, exp, loader, threads) -> int:
    """One rank's run with ``part``; returns the exit code (0 completed, 128+signal stopped, 1 otherwise)."""
    comm = part.start_engine(exp, threads)
    elastic = is_elastic(exp)
    # torchrun: a reset is new processes that resume from the freshest commit (files, .commits);
    # Horovod Elastic resets in place from the state object's commit in memory
    restarts = elastic and comm.restarts_processes
    part.seed(exp.cfg["train"]["seed"])
    exp, train_set, val_set, schedule, run_dir = prepare(exp, loader, comm, elastic=elastic)
    accumulation = accumulation_for(exp.derived, comm.size(), elastic)
    model = part.build_model(exp)
    announce_exclusion(exp, model, comm.rank())
    part.build_optimizer(exp, model, schedule, accumulation, elastic)
    commit = _freshest_commit(comm, run_dir) if restarts else None
    resumed = part.load_resume(exp, run_dir, commit)        # before anything is written
    if not elastic or restarts:
        part.broadcast_initial()
    loop = TrainingLoop(exp, part.hooks(val_set), comm, run_dir=run_dir, accumulation=accumulation,
                        threads=threads, resumed=resumed, schedule=schedule, track_trust_ratios=part.track,
                        check_ranks=comm.size() > 1 or elastic, elastic=elastic, file_commits=restarts)
    start = part.attach(loop, train_set, schedule, resumed)
    try:
        if elastic:
            state = part.elastic_state(start)
            comm.elastic_run(part.train, state)
        else:
            state = types.SimpleNamespace(**start)          # the counters an elastic state would carry
            part.train(state)
    finally:
        loop.progress.close()
    loop.step = state.step
    skipped, fields = part.outcome(state)
    code = loop.finish(skipped, **fields)
    part.close()
    return code
