"""Refusing the silent failures of Horovod + Keras 3 (see docs/keras.md).

Under Keras 3 (TF >= 2.16's default) ``horovod.tensorflow.keras.DistributedOptimizer`` wraps
the optimizer without error, but Keras 3's train step calls ``optimizer.apply`` and Horovod
only hooks ``get_gradients``/``_compute_gradients``: every rank trains on its own gradients
and nothing says so. Everything here turns that into an error that names the fix.
"""
import functools
import os
import sys

__all__ = ["HorovodKerasError", "check_optimizer", "check_keras", "check_callbacks", "is_horovod_keras_optimizer",
           "is_largebatch_optimizer", "guard_horovod_callbacks", "horovod_callback_message",
           "HOROVOD_CALLBACK_REPLACEMENTS", "HOROVOD_KERAS_MESSAGE", "LEGACY_KERAS_MESSAGE"]

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
    """``optimizer`` and the ones it wraps (a Keras LossScaleOptimizer's ``inner_optimizer``), outermost first."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        yield optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)       # keras LossScaleOptimizer


def innermost(optimizer):
    """The optimizer at the bottom of a chain of wrappers (the one that owns the update rule)."""
    last = optimizer
    for last in _inner_optimizers(optimizer):
        pass
    return last


def find_inner(optimizer, flag):
    """The first optimizer in the chain whose class sets ``flag`` (e.g. ``_lb_clars``), or None."""
    return next((o for o in _inner_optimizers(optimizer) if getattr(type(o), flag, False)), None)


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


# Horovod 0.28.1's Keras callbacks (horovod.tensorflow.keras.callbacks, horovod.keras.callbacks)
# and what replaces each under Keras 3.
HOROVOD_CALLBACK_REPLACEMENTS = {
    "BroadcastGlobalVariablesCallback": "largebatch.keras.callbacks.BroadcastGlobalVariables(root_rank)",
    "MetricAverageCallback": "largebatch.keras.callbacks.MetricAverage() (first in the list)",
    "LearningRateScheduleCallback": "largebatch.keras.callbacks.LearningRateSchedule(schedule) with a "
                                    "largebatch.schedules.build_schedule(...) schedule",
    "LearningRateWarmupCallback": "largebatch.keras.callbacks.LearningRateSchedule(largebatch.schedules."
                                  "build_schedule(..., warmup='gradual', warmup_epochs=N))",
    "BestModelCheckpoint": "keras.callbacks.ModelCheckpoint(path, save_best_only=True), added on rank 0 only",
}
_HOROVOD_CALLBACK_MODULES = ("horovod.tensorflow.keras.callbacks", "horovod.keras.callbacks")
# fit calls on_train_begin before any batch; a class guarded only after fit started (its module
# imported late) is still stopped at the end of the first batch, before Horovod's broadcast runs
_GUARDED_METHODS = ("on_train_begin", "on_train_batch_end")


def _is_horovod_module(module):
    return module == "horovod" or module.startswith("horovod.")


def _horovod_callback_class(callback):
    """The Horovod class ``callback`` is (or derives from), or None."""
    for klass in type(callback).__mro__:
        if _is_horovod_module(klass.__module__ or ""):
            return klass
    return None


def horovod_callback_message(callback):
    """One line: the Horovod Keras callback does not work under Keras 3, and what to use instead."""
    klass = _horovod_callback_class(callback) or type(callback)
    replacement = HOROVOD_CALLBACK_REPLACEMENTS.get(klass.__name__, "the matching callback from "
                                                                    "largebatch.keras.callbacks")
    return (f"{klass.__name__} from {klass.__module__} does not work under Keras 3 (it uses Keras 2 APIs, "
            f"e.g. Variable.ref() and keras.backend sessions, that Keras 3 no longer has); use {replacement} "
            "instead (see docs/keras.md, \"Migrating a Horovod Keras script\")")


def check_callbacks(callbacks):
    """Raise :class:`HorovodKerasError` if any callback comes from horovod.tensorflow.keras /
    horovod.keras: those call Keras-2 backend functions that Keras 3 no longer has. The message
    names the callback and its replacement. ``model.fit`` with a largebatch optimizer runs this
    check by itself (:func:`guard_horovod_callbacks`)."""
    for cb in callbacks or ():
        if _horovod_callback_class(cb) is not None:
            raise HorovodKerasError(horovod_callback_message(cb))
    return callbacks


def is_largebatch_optimizer(optimizer):
    """True for largebatch.keras's LARS/LAMB and for anything wrapped by its DistributedOptimizer
    (also inside a LossScaleOptimizer)."""
    for opt in _inner_optimizers(optimizer):
        klass = type(opt)
        if getattr(klass, "_lb_distributed", False) or getattr(klass, "_lb_layerwise", False):
            return True
    return False


def _guarded(method):
    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        model = getattr(self, "model", None)
        optimizer = getattr(model, "optimizer", None)
        if optimizer is not None and is_largebatch_optimizer(optimizer):
            raise HorovodKerasError(horovod_callback_message(self))
        return method(self, *args, **kwargs)
    guarded._lb_guarded = True
    return guarded


_GUARDED_MODULES = set()


def guard_horovod_callbacks():
    """Make Horovod's Keras callbacks raise :class:`HorovodKerasError` (naming the callback and
    its replacement) when ``model.fit`` starts with a largebatch optimizer, instead of crashing
    after the first batch (``AttributeError: 'Variable' object has no attribute 'ref'``) or
    silently doing nothing.

    Horovod's callback classes are patched in place, only in modules already imported (nothing
    is imported here): ``import largebatch.keras``, creating a largebatch optimizer or
    ``DistributedOptimizer`` and building one call this. Callbacks with a model whose optimizer
    is not largebatch's behave exactly as before.
    """
    for name in _HOROVOD_CALLBACK_MODULES:
        if name in _GUARDED_MODULES:
            continue
        module = sys.modules.get(name)
        if module is None:
            continue
        for klass in list(vars(module).values()):
            if not (isinstance(klass, type) and klass.__module__ == name and hasattr(klass, "on_train_begin")):
                continue
            for method in _GUARDED_METHODS:
                current = getattr(klass, method, None)
                if current is not None and not getattr(current, "_lb_guarded", False):
                    setattr(klass, method, _guarded(current))
        _GUARDED_MODULES.add(name)
