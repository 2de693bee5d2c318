"""``largebatch doctor``: what the stack is, and whether it can run multi-rank training.

Prints Python / NumPy / torch / TensorFlow / Keras / Horovod / MPI versions, which Horovod
frameworks and controllers are built, and known traps (Horovod's Keras integration under
Keras 3). Exit code 0 when the stack works, 1 when something is broken, with one line per
problem saying how to fix it.
"""
import importlib
import platform
import shutil
import subprocess
import sys

from .horovod_support import FIX, HorovodUnavailable, import_horovod

KERAS3_TRAP = ("WARNING: Keras {keras} is active and horovod.tensorflow.keras is importable: under Keras 3 "
               "its DistributedOptimizer raises nothing and does NOT average gradients (ranks silently "
               "diverge); use largebatch.keras.DistributedOptimizer instead.")


def _version(module):
    try:
        return importlib.import_module(module).__version__
    except Exception:  # noqa: BLE001 - any failure means "not usable"
        return None


def _mpi_version():
    mpirun = shutil.which("mpirun")
    if not mpirun:
        return None
    try:
        out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out else None


def collect():
    """Return (rows, problems, warnings): rows are (label, value) pairs."""
    rows, problems, warnings = [], [], []
    rows.append(("python", f"{platform.python_version()} ({sys.executable})"))
    for label, module in (("numpy", "numpy"), ("torch", "torch"), ("tensorflow", "tensorflow"),
                          ("keras", "keras"), ("horovod", "horovod")):
        version = _version(module)
        rows.append((label, version or "MISSING"))
        if version is None:
            problems.append(f"{module} is not importable; {FIX}")
    mpi = _mpi_version()
    rows.append(("mpi", mpi or "MISSING (mpirun not on PATH)"))
    if mpi is None:
        problems.append(f"mpirun not found; {FIX}")
    if _version("horovod"):
        built = []
        for framework in ("torch", "tensorflow"):
            try:
                hvd = import_horovod(framework)
            except HorovodUnavailable as err:
                problems.append(str(err))
                continue
            controllers = [name for name, fn in (("MPI", "mpi_built"), ("Gloo", "gloo_built"),
                                                 ("NCCL", "nccl_built")) if getattr(hvd, fn)()]
            built.append(f"{framework} [{', '.join(controllers) or 'no controller'}]")
            if not controllers:
                problems.append(f"horovod.{framework} has neither MPI nor Gloo; {FIX}")
        rows.append(("horovod built", "; ".join(built) or "nothing"))
        keras = _version("keras")
        if keras and int(keras.split(".")[0]) >= 3:
            try:
                importlib.import_module("horovod.tensorflow.keras")
                warnings.append(KERAS3_TRAP.format(keras=keras))
            except Exception:  # noqa: BLE001 - Horovod's Keras module failing to import is no trap
                pass
    return rows, problems, warnings


def main(argv=None):
    rows, problems, warnings = collect()
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    for line in warnings:
        print(line)
    for line in problems:
        print(f"PROBLEM: {line}")
    print("stack OK" if not problems else f"stack BROKEN ({len(problems)} problem(s))")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
