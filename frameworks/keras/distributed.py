"""Gradient averaging over Horovod ranks for Keras 3 optimizers.

``DistributedOptimizer(optimizer)`` returns a copy of ``optimizer`` whose class is a subclass
of the original (same name, so a saved model loads back into the plain optimizer) with
``apply`` / ``apply_gradients`` overridden: the gradients are averaged with one
``horovod.tensorflow.grouped_allreduce(op=Average)`` before Keras clips them, unscales them
and calls ``update_step``. It runs inside the train function Keras compiles for ``model.fit``
(``jit_compile=False``: Horovod's collectives have no XLA kernel on CPU), and every
trust ratio is computed from the averaged gradient.

With ``accumulation_steps=k`` the local gradients of k consecutive batches are summed in
optimizer variables; on every k-th batch their mean is averaged across ranks (one allreduce
per update) and applied. ``optimizer.iterations`` counts updates, not batches.
"""
import keras
import tensorflow as tf

from largebatch.horovod_support import import_horovod
from largebatch.validation import check_positive_int

from ._checks import check_optimizer

__all__ = ["DistributedOptimizer", "is_distributed"]


def _hvd():
    return import_horovod("tensorflow")       # one-line error naming the missing piece and the fix


def _compression(compression):
    hvd = _hvd()
    if compression is None or compression == "none":
        return hvd.Compression.none
    if compression == "fp16":
        return hvd.Compression.fp16
    if compression in (hvd.Compression.none, hvd.Compression.fp16):
        return compression
    raise ValueError(f"compression: expected None, 'none' or 'fp16', got {compression!r}")


def _in_xla_context():
    try:
        from tensorflow.python.ops import control_flow_util
        return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())
    except Exception:                                    # pragma: no cover - private TF API moved
        return False


class _DistributedMixin:
    """Overrides of the wrapped optimizer's class; attributes have defaults so that Keras'
    ``from_config`` on the subclass also works (it then averages without compression)."""

    _lb_distributed = True
    _lb_compression = None
    _lb_accumulation_steps = 1

    def _lb_average(self, grads):
        hvd = _hvd()
        if not hvd.is_initialized():
            raise RuntimeError("largebatch.keras.DistributedOptimizer: Horovod is not initialized; call "
                               "horovod.tensorflow.init() before training")
        if hvd.size() == 1:
            return list(grads)
        if _in_xla_context():
            raise RuntimeError("largebatch.keras.DistributedOptimizer cannot average gradients inside an "
                               "XLA-compiled train step (Horovod's allreduce has no XLA kernel here): "
                               "compile the model with jit_compile=False")
        index = [i for i, g in enumerate(grads) if g is not None]
        dense = [tf.convert_to_tensor(grads[i]) for i in index]          # IndexedSlices -> dense
        reduced = hvd.grouped_allreduce(dense, op=hvd.Average,
                                        compression=_compression(self._lb_compression)) if dense else []
        out = list(grads)
        for i, g in zip(index, reduced):
            out[i] = g
        return out

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        if self._lb_accumulation_steps > 1:
            self._lb_accumulators = self.add_optimizer_variables(variables, "lb_gradient_accumulator")
            self._lb_micro_step = self.add_variable(shape=(), dtype="int64", name="lb_micro_step")
            # each rank's own partial sums: legitimately different across ranks
            self._lb_rank_local_paths = tuple(a.path for a in self._lb_accumulators if a is not None)

    def apply_gradients(self, grads_and_vars):
        grads, trainable_variables = zip(*grads_and_vars)
        self.apply(grads, trainable_variables)
        return self._iterations

    def apply(self, grads, trainable_variables=None):
        grads = list(grads)
        if not grads:
            return
        if self._lb_accumulation_steps == 1:
            return super().apply(self._lb_average(grads), trainable_variables)
        return self._lb_accumulate(grads, trainable_variables)

    def _lb_accumulate(self, grads, trainable_variables):
        k = self._lb_accumulation_steps
        if trainable_variables is None:
            trainable_variables = self._trainable_variables
        else:
            trainable_variables = list(trainable_variables)
            if not self.built:
                with keras.backend.name_scope(self.name, caller=self):
                    self.build(trainable_variables)
        accumulators = [self._lb_accumulators[self._get_variable_index(v)] for v in trainable_variables]
        grads = [None if g is None else tf.convert_to_tensor(g) for g in grads]
        micro = self._lb_micro_step

        def update():
            total = [None if g is None else (tf.cast(g, a.dtype) + a.value) / k
                     for g, a in zip(grads, accumulators)]
            super(_DistributedMixin, self).apply(self._lb_average(total), trainable_variables)
            for g, a in zip(grads, accumulators):
                if g is not None:
                    a.assign(tf.zeros_like(a.value))

        def accumulate():
            for g, a in zip(grads, accumulators):
                if g is not None:
                    a.assign_add(tf.cast(g, a.dtype))

        is_update = tf.equal((micro.value + 1) % k, 0)
        keras.ops.cond(is_update, update, accumulate)
        micro.assign_add(1)


def is_distributed(optimizer):
    """True if ``optimizer`` came from :func:`DistributedOptimizer` (or is a LossScaleOptimizer around one)."""
    while optimizer is not None:
        if getattr(type(optimizer), "_lb_distributed", False):
            return True
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return False


def DistributedOptimizer(optimizer, compression=None, accumulation_steps=1):
    """Return a copy of the Keras 3 ``optimizer`` that averages gradients over Horovod ranks.

    ``compression``: None or 'fp16' (gradients are sent as float16, averaged, cast back).
    ``accumulation_steps``: batches whose gradients are summed locally before one averaged update
    (global batch = per-rank batch × ranks × accumulation_steps).

    Works with any Keras 3 optimizer (LARS, LAMB, SGD, Adam ...); then
    ``model.compile(optimizer=..., jit_compile=False)``. An optimizer that is not built yet is
    copied (from its config); a built one (e.g. ``keras.models.load_model(...).optimizer`` when
    resuming) is converted in place, keeping its state. Horovod must be
    initialised (``hvd.init()``) before training. Refuses a
    ``horovod.tensorflow.keras.DistributedOptimizer``, which does not average under Keras 3.
    """
    check_optimizer(optimizer)
    if is_distributed(optimizer):
        raise ValueError("optimizer: already a largebatch.keras.DistributedOptimizer")
    _compression(compression)
    accumulation_steps = check_positive_int("accumulation_steps", accumulation_steps)
    built = getattr(optimizer, "built", False)
    if built and accumulation_steps > 1:
        raise ValueError("accumulation_steps: an optimizer that is already built (e.g. loaded with a model) "
                         "can only be wrapped with accumulation_steps=1")
    if accumulation_steps > 1 and getattr(optimizer, "gradient_accumulation_steps", None):
        raise ValueError("accumulation_steps: the optimizer already has gradient_accumulation_steps="
                         f"{optimizer.gradient_accumulation_steps}; use one or the other")
    base = type(optimizer)
    cls = type(base.__name__, (_DistributedMixin, base),
               {"__module__": base.__module__, "__qualname__": base.__qualname__,
                "__doc__": base.__doc__})
    if built:
        # e.g. resuming from keras.models.load_model: keep the state, convert this object in place
        optimizer.__class__ = cls
        wrapped = optimizer
    else:
        wrapped = cls.from_config(optimizer.get_config())
    wrapped._lb_compression = compression
    wrapped._lb_accumulation_steps = accumulation_steps
    return wrapped
