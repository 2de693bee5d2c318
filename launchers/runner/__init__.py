"""Per-rank training entry point: ``python -m largebatch.runner EXP.yaml [key.sub=value ...]``.

``largebatch run`` starts this on every rank through horovodrun, mpirun or srun; it can also be
started by hand (``horovodrun -np 4 python -m largebatch.runner exp.yaml``). Each rank:

1. finds its world size and ranks-per-host from the launcher's environment and loads the
   experiment with ``launcher.np`` set to the real world size (same validation as the CLI);
2. sets its CPU threads (:func:`largebatch.launchers.threads.rank_threads`) *before*
   importing torch or TensorFlow, so OpenMP/MKL pick them up;
3. runs the framework's loop (``torch_train`` or ``keras_train``, imported lazily), which
   builds the model, the rank's data shard, the optimizer with its Horovod wrapper and the
   core's schedule, and writes the run directory (see :mod:`largebatch.runner.common`).

Exit code 2 with one line per problem for a bad experiment, as the CLI.
"""
from .entry import main  # noqa: F401

__all__ = ["main"]
