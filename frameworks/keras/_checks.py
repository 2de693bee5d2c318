"""Refusing the silent failures of Horovod + Keras 3 (see docs/keras.md).

Under Keras 3 (TF >= 2.16's default) ``horovod.tensorflow.keras.DistributedOptimizer`` wraps
the optimizer without error, but Keras 3's train step calls ``optimizer.apply`` and Horovod
only hooks ``get_gradients``/``_compute_gradients``: every rank trains on its own gradients
and nothing says so. Everything here turns that into an error that names the fix.
"""
import os

__all__ = ["HorovodKerasError", "check_optimizer", "check_keras", "is_horovod_keras_optimizer",
           "HOROVOD_KERAS_MESSAGE", "LEGACY_KERAS_MESSAGE"]

HOROVOD_KERAS_MESSAGE = (
    "horovod.tensorflow.keras.DistributedOptimizer does not average gradients under Keras 3: "
    "Keras 3's train step calls optimizer.apply(), Horovod only hooks get_gradients(), so each "
    "rank silently trains on its own gradients; use largebatch.keras.DistributedOptimizer(optimizer) "
    "instead (and largebatch.keras.callbacks instead of horovod.tensorflow.keras.callbacks)")

LEGACY_KERAS_MESSAGE = (
    "largebatch.keras supports Keras 3 only, but TF_USE_LEGACY_KERAS={value!r} selects tf-keras "
    "(Keras 2): unset TF_USE_LEGACY_KERAS to use largebatch.keras, or stay on tf-keras with "
    "horovod.tensorflow.keras, whose DistributedOptimizer does average under Keras 2")


class HorovodKerasError(RuntimeError):
    """A Horovod Keras object was used under Keras 3, where it silently does not work."""


def legacy_keras_requested():
    """The value of TF_USE_LEGACY_KERAS if it selects tf-keras (as TensorFlow reads it), else None."""
    value = os.environ.get("TF_USE_LEGACY_KERAS")
    return value if value in ("1", "true", "True") else None


def check_keras():
    """Raise ImportError unless Keras 3 with the TensorFlow backend is what ``import keras`` gives."""
    value = legacy_keras_requested()
    if value is not None:
        raise ImportError(LEGACY_KERAS_MESSAGE.format(value=value))
    import keras
    major = int(str(keras.__version__).split(".")[0])
    if major < 3:
        raise ImportError(f"largebatch.keras needs Keras 3 (keras>=3.0), found keras {keras.__version__}")
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ImportError(f"largebatch.keras needs the TensorFlow backend (Horovod averages with "
                          f"horovod.tensorflow ops), but KERAS_BACKEND is {backend!r}: set KERAS_BACKEND=tensorflow")


def _defined_in_horovod(klass):
    for value in vars(klass).values():
        func = getattr(value, "fget", value)          # properties too
        module = getattr(func, "__module__", None) or ""
        if module == "horovod" or module.startswith("horovod."):
            return True
    return False


def is_horovod_keras_optimizer(optimizer_or_class):
    """True if the object (or class) was made by horovod.tensorflow.keras.DistributedOptimizer
    (Horovod builds a subclass of the wrapped optimizer whose methods come from ``horovod._keras``)."""
    klass = optimizer_or_class if isinstance(optimizer_or_class, type) else type(optimizer_or_class)
    return any(_defined_in_horovod(k) for k in klass.__mro__)


def _inner_optimizers(optimizer):
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        yield optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)       # keras LossScaleOptimizer


def check_optimizer(optimizer):
    """Return ``optimizer`` if it can be used by largebatch.keras, else raise.

    Raises :class:`HorovodKerasError` for a ``horovod.tensorflow.keras.DistributedOptimizer``
    (also inside a ``LossScaleOptimizer``), ImportError when TF_USE_LEGACY_KERAS selects
    tf-keras, and ValueError for something that is not a Keras 3 optimizer.
    """
    value = legacy_keras_requested()
    if value is not None:
        raise ImportError(LEGACY_KERAS_MESSAGE.format(value=value))
    for opt in _inner_optimizers(optimizer):
        if is_horovod_keras_optimizer(opt):
            raise HorovodKerasError(HOROVOD_KERAS_MESSAGE)
    import keras
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise ValueError(f"optimizer: expected a Keras 3 keras.optimizers.Optimizer, got {type(optimizer).__name__}")
    return optimizer


def check_callbacks(callbacks):
    """Raise :class:`HorovodKerasError` if any callback comes from horovod.tensorflow.keras /
    horovod.keras: those call Keras-2 backend functions that Keras 3 no longer has."""
    for cb in callbacks or ():
        module = type(cb).__module__ or ""
        if module == "horovod" or module.startswith("horovod."):
            raise HorovodKerasError(
                f"{type(cb).__name__} from {module} does not work under Keras 3 (it uses Keras 2 backend "
                "functions); use the matching callback from largebatch.keras.callbacks")
    return callbacks
