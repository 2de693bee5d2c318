"""``python -m largebatch.runner EXP.yaml [key.sub=value ...]``: what every rank runs."""
import importlib
import os
import sys

from largebatch.config import ConfigError, load
from largebatch.launchers import threads as thread_rules

from . import driver
from .comm import started_by_torchrun
from .loop import world_size_note

__all__ = ["main", "world_size_from_env", "world_rank_from_env"]


def world_size_from_env(env=None):
    """The world size the launcher announced (Horovod gloo, Open MPI, PMI, Slurm step), or None."""
    env = os.environ if env is None else env
    if started_by_torchrun(env) and env.get("WORLD_SIZE", "").isdigit():
        return int(env["WORLD_SIZE"])
    for var in ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE"):
        value = env.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    if env.get("SLURM_STEP_ID") is not None:
        value = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS", "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def world_rank_from_env(env=None):
    env = os.environ if env is None else env
    if started_by_torchrun(env) and env.get("RANK", "").isdigit():
        return int(env["RANK"])
    for var in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK"):
        value = env.get(var, "")
        if value.isdigit():
            return int(value)
    if env.get("SLURM_STEP_ID") is not None and env.get("SLURM_PROCID", "").isdigit():
        return int(env["SLURM_PROCID"])
    return 0


class Loader:
    """Loads the experiment for a given world size (the runners call it again with the world
    size Horovod reports, should the launcher's environment have said otherwise)."""

    def __init__(self, path, overrides):
        self.path, self.overrides = path, list(overrides)

    def __call__(self, size):
        """``size=None``: the world size the YAML and the command line set (elastic runs)."""
        return load(self.path, self.overrides + ([] if size is None else [f"launcher.np={size}"]))


def _experiment(loader, size, rank):
    """The experiment this rank runs. ``size`` None (Horovod Elastic): the launch's own. Else the
    YAML's own (read once) when its world size is ``size``, as under ``largebatch run``, or when
    it is an elastic job that torchrun started (the launch world size fixes the batch); otherwise
    it is read again for ``size`` and rank 0 says what that changed (a plain ``python -m
    largebatch.runner``, a launcher started by hand). Raises ConfigError."""
    if size is None:
        return loader(None)
    try:
        declared = loader(None)
    except ConfigError:               # the YAML alone does not resolve (its np cannot be read)
        return loader(size)
    if declared.derived["np"] == size or (declared.cfg["launcher"]["elastic"] and started_by_torchrun()):
        return declared
    exp = loader(size)
    if rank == 0:
        print(world_size_note(declared.derived, exp.derived), file=sys.stderr, flush=True)
    return exp


def _usage():
    print("usage: python -m largebatch.runner EXP.yaml [key.sub=value ...]\n"
          "  the per-rank training entry point; start it with `largebatch run EXP.yaml`, or under\n"
          "  horovodrun / mpirun / srun yourself", file=sys.stderr)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _usage()
        return 0 if argv else 2
    path, overrides = argv[0], argv[1:]
    rank = world_rank_from_env()
    loader = Loader(path, overrides)
    # Horovod Elastic: the launch world size (YAML / command line) fixes the batch, not the current one
    size = None if os.environ.get("HOROVOD_ELASTIC") == "1" else (world_size_from_env() or 1)
    try:
        exp = _experiment(loader, size, rank)
    except ConfigError as err:
        if rank == 0:
            for line in err.problems:
                print(line, file=sys.stderr)
        return 2

    # threads before torch / TensorFlow are imported: OpenMP and MKL read the environment once
    la = exp.cfg["launcher"]
    threads = thread_rules.rank_threads(
        threads=la["threads_per_rank"], interop=la["interop_threads"], cores_per_host=la["cores_per_host"],
        binding=la["binding"])
    t, i, _ = threads
    thread_env = thread_rules.thread_env(t, i, la["binding"])
    os.environ.update(thread_env)
    if os.environ.get("LARGEBATCH_TF_LOGS") != "1":     # TensorFlow's C++ log lines, unless asked for
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    module = importlib.import_module(f".{exp.cfg['framework']}_train", __package__)
    try:
        code = driver.run(module.FRAMEWORK(), exp, loader, threads)
        if started_by_torchrun() or exp.derived["engine"] == "torch.distributed":
            # torch.distributed: the run's files are closed; leave without the interpreter's teardown,
            # in which its native threads can abort the process ('terminate called without an active
            # exception', seen about once in four runs under torchrun)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    except ConfigError as err:          # found at run time (data folder contents, world size)
        if rank == 0:
            for line in err.problems:
                print(line, file=sys.stderr)
        return 2
    except Exception as err:            # noqa: BLE001  a crash on this rank: say which rank, exit 1
        from .faults import peer_lost, report_crash
        if la["elastic"] and started_by_torchrun() and peer_lost(err):
            # torchrun's agent restarts the ranks: one line, not a crash report
            print(f"largebatch: rank {rank}: lost a peer ({str(err).splitlines()[0][:160]}); torchrun's agent "
                  f"restarts the ranks from the freshest commit", file=sys.stderr, flush=True)
        else:
            import traceback
            traceback.print_exc()
            report_crash(rank, err)
        if (world_size_from_env() or 1) > 1:
            # a normal exit would run MPI_Finalize / Horovod shutdown, which can wait for a dead or
            # stuck peer; exiting at once lets mpirun / horovodrun see the failure and end the job
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        return 1

