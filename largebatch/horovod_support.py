"""Loading Horovod for one framework, with a clear error when it is missing or not built for it.

Horovod is imported lazily (importing ``horovod.tensorflow`` loads TensorFlow), and only by
the adapters, the runner and ``largebatch doctor``.
"""
import importlib

__all__ = ["HorovodUnavailable", "import_horovod", "FRAMEWORK_MODULES"]

FRAMEWORK_MODULES = {"torch": "horovod.torch", "tensorflow": "horovod.tensorflow"}
FIX = "run `make setup` (launchers/setup.sh builds Horovod with PyTorch, TensorFlow, MPI and Gloo)"


class HorovodUnavailable(ImportError):
    """Horovod is not installed, or was built without support for the framework asked for."""


def import_horovod(framework):
    """Return ``horovod.torch`` or ``horovod.tensorflow``, or raise HorovodUnavailable naming the
    missing piece and the fix in one line."""
    module = FRAMEWORK_MODULES[framework]
    try:
        importlib.import_module("horovod")
    except ImportError:
        raise HorovodUnavailable(f"Horovod is not installed in this Python; {FIX}") from None
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise HorovodUnavailable(f"{module} is not usable: Horovod was built without {framework} support or "
                                 f"against another {framework} version ({err}); {FIX}") from None
