"""horovodrun, without its three-second build check on every launch.

Before each launch horovodrun asks whether Horovod was built with MPI and with Gloo, and answers
by importing ``horovod.tensorflow`` (else ``horovod.torch``) in a forked child: TensorFlow's
start-up and its oneDNN banner, 3-4 s on this machine, in every job, PyTorch jobs included, for
an answer that only changes when Horovod is reinstalled. This runs horovodrun's own code
(:func:`horovod.runner.launch.run_commandline`, the same arguments) with those two answers
taken from a cache, written the first time by horovodrun's own check and keyed by the installed
Horovod's extension libraries (their paths, sizes and modification times).

    python -m largebatch.launchers.hvdrun -np 2 -H localhost:2 --mpi python train.py

The cache is ``$LARGEBATCH_CACHE/horovod-built.json`` (default ``~/.cache/largebatch``); when it
cannot be read or written, horovodrun checks as usual.
"""
import glob
import json
import os
import sys
from typing import Dict, List, Optional

__all__ = ["main", "cache_path", "build_key", "launcher", "is_launcher", "MODULE"]

MODULE = "largebatch.launchers.hvdrun"


def launcher(python: Optional[str] = None) -> List[str]:
    """The argv prefix that stands for ``horovodrun``."""
    return [python or sys.executable, "-m", MODULE]


def is_launcher(argv) -> bool:
    """True for an argv that starts horovodrun, by its script or through this module."""
    argv = [str(a) for a in argv]
    return bool(argv) and (os.path.basename(argv[0]) == "horovodrun" or argv[1:3] == ["-m", MODULE])


def cache_path(environ=None) -> str:
    environ = os.environ if environ is None else environ
    base = environ.get("LARGEBATCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "largebatch")
    return os.path.join(base, "horovod-built.json")


def build_key(horovod_dir: str) -> List[List]:
    """What identifies an installed Horovod's build: each framework extension library's path,
    size and modification time."""
    key = []
    for path in sorted(glob.glob(os.path.join(horovod_dir, "*", "mpi_lib*.so"))):
        st = os.stat(path)
        key.append([path, st.st_size, int(st.st_mtime)])
    return key


def _cached_answers(util, horovod_dir: str, path: str) -> Dict[str, Optional[bool]]:
    key = build_key(horovod_dir)
    try:
        with open(path) as fh:
            saved = json.load(fh)
        if saved.get("key") == key:
            return saved["built"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    built = {"mpi": util.mpi_built(), "gloo": util.gloo_built()}        # horovodrun's own check, once
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = f"{path}.{os.getpid()}"
        with open(partial, "w") as fh:
            json.dump({"key": key, "built": built}, fh)
        os.replace(partial, path)
    except OSError:
        pass
    return built


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    import horovod
    import horovod.runner.launch as launch
    from horovod.common import util
    built = _cached_answers(util, os.path.dirname(horovod.__file__), cache_path())
    launch.mpi_built = lambda verbose=False: built["mpi"]
    launch.gloo_built = lambda verbose=False: built["gloo"]
    sys.argv = ["horovodrun", *args]
    launch.run_commandline()
    return 0


if __name__ == "__main__":
    sys.exit(main())
