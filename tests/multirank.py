"""Run a script under ``horovodrun -np N`` and collect what each rank reports.

Test side::

    results = run_ranks("ranks/torch_allreduce.py", np=2)        # -> [rank0 dict, rank1 dict]
    assert np.array_equal(results[0]["w"], results[1]["w"])

Rank side (the script, run by horovodrun with tests/ on PYTHONPATH)::

    from multirank import report
    report(hvd.rank(), w=weights, loss=loss)    # arrays saved losslessly (.npz)

Real processes, real Horovod: nothing is mocked. A failed rank fails the test with the
command line and the tail of the ranks' output.
"""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

TESTS_DIR = Path(__file__).resolve().parent
RESULT_ENV = "LARGEBATCH_RESULT_DIR"


def horovodrun_path():
    exe = Path(sys.executable).with_name("horovodrun")
    return str(exe) if exe.exists() else shutil.which("horovodrun")


def run_ranks(script, *args, np=2, controller="mpi", timeout=300, env=None):
    """Run ``tests/<script>`` on ``np`` ranks with the given controller ('mpi' | 'gloo');
    return each rank's reported dict, ordered by rank."""
    horovodrun = horovodrun_path()
    if horovodrun is None:
        raise RuntimeError("horovodrun not found: run `make setup` (Horovod is built by launchers/setup.sh)")
    results = Path(tempfile.mkdtemp(prefix="lb-ranks-"))
    # horovodrun's own code, its 3-4 s build check answered from a cache (largebatch.launchers.hvdrun)
    from largebatch.launchers import hvdrun
    cmd = [*hvdrun.launcher(), "-np", str(np), "-H", f"localhost:{np}", f"--{controller}",
           sys.executable, str(TESTS_DIR / script), *map(str, args)]
    run_env = dict(os.environ)
    run_env.update({
        RESULT_ENV: str(results),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), run_env.get("PYTHONPATH")])),
        # one thread per rank: 2 ranks on 2 cores, and deterministic reductions
        "OMP_NUM_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1",
        "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
    })
    run_env.update(env or {})
    try:
        proc = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- output tail ---\n"
                                 f"{(proc.stdout + proc.stderr)[-6000:]}")
        out = []
        for rank in range(np):
            path = results / f"rank{rank}.npz"
            if not path.exists():
                raise AssertionError(f"rank {rank} reported nothing\n{(proc.stdout + proc.stderr)[-4000:]}")
            with np_load(path) as data:
                out.append({k: data[k] for k in data.files})
        return out
    finally:
        shutil.rmtree(results, ignore_errors=True)


def np_load(path):
    return np.load(path, allow_pickle=False)


def report(rank, **values):
    """Save this rank's results (numbers and arrays) for :func:`run_ranks`."""
    directory = os.environ.get(RESULT_ENV)
    if not directory:
        raise RuntimeError(f"{RESULT_ENV} is not set: run this script through tests/multirank.run_ranks")
    arrays = {k: np.asarray(v) for k, v in values.items()}
    tmp = Path(directory) / f".rank{rank}.npz"
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    tmp.rename(Path(directory) / f"rank{rank}.npz")


def environ_copy():
    """Python's copy of the environment, for child processes: the process's own may carry the MPI
    singleton variables of an in-process hvd.init() from an earlier test module, which would
    confuse a child mpirun."""
    return dict(os.environ)


def wait_or_kill(proc, limit):
    """``proc``'s exit code within ``limit`` seconds, else kill it and return None."""
    try:
        return proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
        return None


def error_of(fn):
    """'ExceptionType: message' of what ``fn()`` raises, or 'no error' (rank scripts report it)."""
    try:
        fn()
    except Exception as err:                       # noqa: BLE001 - the message is what we test
        return f"{type(err).__name__}: {err}"
    return "no error"
