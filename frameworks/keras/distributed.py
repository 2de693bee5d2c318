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

With ``nonfinite_guard=True`` every update computes, in the train function and after the
allreduce (so every rank gets the same answer), one flag: are all averaged gradients finite, and
were the previous update's per-layer rates (trust ratios) finite? If not, the update is skipped
(weights, momentum and moments untouched; ``iterations`` still advances, so the schedule does),
``lb_skipped_steps`` is incremented and ``lb_nonfinite_codes`` says which variables were at fault
(1 NaN gradient, 2 Inf gradient, 4 non-finite trust ratio). The host reads one scalar per update:
:class:`largebatch.keras.callbacks.NonFiniteGuard` reports every skip (naming the first offending
variable and the step) and stops training or goes on (``on_nonfinite``).

Mixed precision with float16 (``keras.mixed_precision.set_global_policy("mixed_float16")``):
wrap the loss-scale optimizer, ``DistributedOptimizer(keras.optimizers.LossScaleOptimizer(opt))``.
The scaled gradients are averaged first, then unscaled and checked for inf/NaN, so every rank
makes the same skip-or-apply decision; the inner optimizer (LARS, LAMB, ...) gets unscaled float32
gradients and float32 weights, so its trust ratios are those of full precision. A skipped update
still advances ``iterations`` (the lr schedule keeps its steps, as a torch GradScaler skip does in
the runner) and is counted (:func:`loss_scale_skips`). The other order, a LossScaleOptimizer
around this one (also what ``compile`` does by itself under mixed_float16 when the optimizer is not
one), checks each rank's own gradients before the allreduce: ranks could disagree and hang, so it
is refused when the train step is traced.
"""
import sys

import keras
import tensorflow as tf

from largebatch.horovod_support import import_horovod
from largebatch.validation import check_positive_int

from ._checks import check_optimizer, find_inner, guard_horovod_callbacks

__all__ = ["DistributedOptimizer", "is_distributed", "loss_scale_skips"]


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
    _lb_guard = False
    _lb_noise = False
    _lb_elastic = False              # keep the accumulators whatever k (set_accumulation_steps)

    # ---- what callbacks, checkpoints and the runner read (the wrapper's public interface) ----
    @property
    def guards_nonfinite(self) -> bool:
        """True when built with ``nonfinite_guard=True``: NaN/Inf updates are skipped and counted."""
        return bool(self._lb_guard)

    def skipped_updates(self):
        """Updates skipped for a NaN/Inf (an int64 variable; None without the guard or before build)."""
        return getattr(self, "_lb_skipped", None)

    def nonfinite_codes(self):
        """Per variable, the last update's finding: 1 NaN gradient, 2 Inf gradient, 4 non-finite
        trust ratio, 0 fine (an int32 variable in the order of the optimizer's variables)."""
        return self._lb_codes

    def rank_local_paths(self) -> tuple:
        """Paths of the variables that legitimately differ across ranks (each rank's own partial
        gradient sums between updates): left out of the rank-consistency check."""
        return getattr(self, "_lb_rank_local_paths", ())

    def applied_updates(self):
        """Updates applied so far: ``iterations`` less the skipped ones (LAMB's bias correction)."""
        skipped = getattr(self, "_lb_skipped", None)
        return self.iterations if skipped is None else self.iterations - skipped

    def noise_norms(self):
        """The last update's [‖g_small‖², ‖g_big‖²] for the gradient noise scale
        (:mod:`largebatch.noise_scale`): this rank's gradient before the average and the averaged
        one (on one rank: the last micro-batch's and the accumulated one), loss scale divided out.
        Needs ``measure_noise=True``."""
        return self._lb_noise_norms

    def _lb_square_sum(self, grads):
        total = tf.add_n([tf.reduce_sum(tf.square(tf.cast(tf.convert_to_tensor(g), tf.float32)))
                          for g in grads if g is not None] or [tf.zeros(())])
        scale = getattr(self, "dynamic_scale", None)        # fp16: the gradients carry the loss scale
        return total if scale is None else total / tf.square(tf.cast(scale, tf.float32))

    def _lb_average(self, grads, small_sq=None):
        hvd = _hvd()
        if not hvd.is_initialized():
            raise RuntimeError("largebatch.keras.DistributedOptimizer: Horovod is not initialized; call "
                               "horovod.tensorflow.init() before training")
        reduced = self._lb_allreduce(grads, hvd)
        if self._lb_noise:                  # before and after the average (McCandlish et al. 2018)
            local = self._lb_square_sum(grads) if small_sq is None else small_sq
            self._lb_noise_norms.assign(tf.stack([local, self._lb_square_sum(reduced)]))
        return reduced

    def _lb_allreduce(self, grads, hvd):
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
        guard_horovod_callbacks()
        _refuse_outer_loss_scale(self)             # fit builds the optimizer before tracing: fail there
        if self.built:
            return
        super().build(variables)
        if self._lb_accumulation_steps > 1 or self._lb_elastic:
            self._lb_accumulators = self.add_optimizer_variables(variables, "lb_gradient_accumulator")
            self._lb_micro_step = self.add_variable(shape=(), dtype="int64", name="lb_micro_step")
            # each rank's own partial sums: legitimately different across ranks
            self._lb_rank_local_paths = tuple(a.path for a in self._lb_accumulators if a is not None)
            if getattr(type(self), "_lb_clars", False):      # CLARS: norm sums and batch sizes so far
                self._lb_norm_accumulator = self.add_variable(shape=(len(variables) + 1,),
                                                              name="lb_norm_sum_accumulator")
                self._lb_rank_local_paths += (self._lb_norm_accumulator.path,)
        if self._lb_guard:
            self._lb_build_guard(variables)
        if self._lb_noise:
            self._lb_noise_norms = self.add_variable(shape=(2,), name="lb_noise_norms")
            # each rank's own gradient norm: legitimately different across ranks
            self._lb_rank_local_paths = getattr(self, "_lb_rank_local_paths", ()) + (self._lb_noise_norms.path,)

    def _lb_build_guard(self, variables):
        self._lb_skipped = self.add_variable(shape=(), dtype="int64", name="lb_skipped_steps")
        self._lb_codes = self.add_variable(shape=(len(variables),), dtype="int32", name="lb_nonfinite_codes")

    def set_accumulation_steps(self, k):
        """Use ``k`` accumulation steps from the next update on (Horovod Elastic: the world size
        changed and the global batch is kept). Needs ``DistributedOptimizer(..., elastic=True)``;
        call between updates, outside the train function, then have Keras trace it again
        (``model.make_train_function(force=True)``): ``k`` is part of the traced step."""
        k = check_positive_int("accumulation_steps", k)
        if not self._lb_elastic:
            raise ValueError("set_accumulation_steps: needs largebatch.keras.DistributedOptimizer(..., elastic=True)")
        self._lb_accumulation_steps = k
        if self.built:                     # a fresh count of micro-batches, nothing accumulated
            self._lb_micro_step.assign(0)
            for a in self._lb_accumulators:
                if a is not None:
                    a.assign(tf.zeros_like(a.value))
            if getattr(self, "_lb_norm_accumulator", None) is not None:
                self._lb_norm_accumulator.assign(tf.zeros_like(self._lb_norm_accumulator.value))

    # ---- non-finite guard --------------------------------------------------------------
    def _lb_nonfinite_codes(self, grads, trainable_variables):
        """int32 vector over the optimizer's variables: 1 NaN gradient, 2 Inf gradient, 4 non-finite
        trust ratio of the previous update, 0 fine (computed in the graph, no host read)."""
        codes = [tf.zeros((), tf.int32)] * len(self._trainable_variables)
        for g, v in zip(grads, trainable_variables):
            if g is None:
                continue
            g = tf.convert_to_tensor(g)
            nan = tf.reduce_any(tf.math.is_nan(g))
            finite = tf.reduce_all(tf.math.is_finite(g))
            codes[self._get_variable_index(v)] = tf.where(nan, 1, tf.where(finite, 0, 2))
        codes = tf.stack(codes)
        rates = getattr(self, "_layer_lrs", None)        # LARS/LAMB: the previous update's layer rates
        if rates is not None and rates.shape[0] == len(self._trainable_variables):
            ratio_bad = tf.logical_not(tf.math.is_finite(tf.convert_to_tensor(rates.value)))
            codes = tf.where(tf.logical_and(tf.equal(codes, 0), ratio_bad), 4, codes)
        return codes

    def _backend_apply_gradients(self, grads, trainable_variables):
        if not self._lb_guard:
            return super()._backend_apply_gradients(grads, trainable_variables)
        codes = self._lb_nonfinite_codes(grads, trainable_variables)
        self._lb_codes.assign(codes)
        finite = tf.equal(tf.reduce_max(codes), 0)

        def apply():
            super(_DistributedMixin, self)._backend_apply_gradients(grads, trainable_variables)

        def skip():                         # Keras still advances self._iterations after this
            self._lb_skipped.assign_add(1)

        keras.ops.cond(finite, apply, skip)

    def apply_gradients(self, grads_and_vars):
        grads, trainable_variables = zip(*grads_and_vars)
        self.apply(grads, trainable_variables)
        return self._iterations

    def apply(self, grads, trainable_variables=None):
        guard_horovod_callbacks()                  # runs while Keras traces the train step (once)
        _refuse_outer_loss_scale(self)
        grads = list(grads)
        if not grads:
            return
        clars = getattr(type(self), "_lb_clars", False)
        if clars and trainable_variables is not None and not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(list(trainable_variables))
        if self._lb_accumulation_steps == 1:
            if not clars:
                return super().apply(self._lb_average(grads), trainable_variables)
            local = self._lb_norm_vector(trainable_variables)
            return self._lb_apply_clars(self._lb_average(grads), trainable_variables, local)
        return self._lb_accumulate(grads, trainable_variables)

    # ---- CLARS: per-example norm sums added over ranks (and micro-batches) -------------------
    def _lb_norm_vector(self, trainable_variables):
        """[Σ_i ‖∇_l f_i‖ per variable..., batch size]: this rank's, for this micro-batch."""
        sums, batch = self._lb_local_norm_sums(trainable_variables)
        return tf.concat([sums, tf.reshape(batch, (1,))], axis=0)

    def _lb_apply_clars(self, grads, trainable_variables, local):
        """One allreduce(Sum) of the per-rank norm sums and batch sizes, then CLARS's apply."""
        hvd = _hvd()
        total = local
        if hvd.is_initialized() and hvd.size() > 1:
            total = hvd.allreduce(local, op=hvd.Sum)
        self._lb_set_norm_sums(total[:-1], total[-1])
        try:
            return super(_DistributedMixin, self).apply(grads, trainable_variables)
        finally:
            self._lb_norm_means = None

    def _lb_accumulate(self, grads, trainable_variables):
        k = self._lb_accumulation_steps
        if trainable_variables is None:
            trainable_variables = self._trainable_variables
        else:
            trainable_variables = list(trainable_variables)
            if not self.built:
                with keras.name_scope(self.name, caller=self):
                    self.build(trainable_variables)
        accumulators = [self._lb_accumulators[self._get_variable_index(v)] for v in trainable_variables]
        grads = [None if g is None else tf.convert_to_tensor(g) for g in grads]
        micro = self._lb_micro_step
        clars = getattr(type(self), "_lb_clars", False)
        norms = self._lb_norm_vector(trainable_variables) if clars else None

        def update():
            total = [None if g is None else (tf.cast(g, a.dtype) + a.value) / k
                     for g, a in zip(grads, accumulators)]
            # one rank: the last micro-batch's gradient is the noise scale's small one
            micro_sq = self._lb_square_sum(grads) if self._lb_noise and _hvd().size() == 1 else None
            if clars:
                self._lb_apply_clars(self._lb_average(total, micro_sq), trainable_variables,
                                     norms + self._lb_norm_accumulator.value)
                self._lb_norm_accumulator.assign(tf.zeros_like(self._lb_norm_accumulator.value))
            else:
                super(_DistributedMixin, self).apply(self._lb_average(total, micro_sq), trainable_variables)
            for g, a in zip(grads, accumulators):
                if g is not None:
                    a.assign(tf.zeros_like(a.value))

        def accumulate():
            for g, a in zip(grads, accumulators):
                if g is not None:
                    a.assign_add(tf.cast(g, a.dtype))
            if clars:
                self._lb_norm_accumulator.assign_add(norms)

        is_update = tf.equal((micro.value + 1) % k, 0)
        keras.ops.cond(is_update, update, accumulate)
        micro.assign_add(1)


class _CountedLossScale(keras.optimizers.LossScaleOptimizer):
    """Keras's dynamic loss scaling whose skipped updates still count: ``iterations`` advances and
    ``lb_loss_scale_skips`` is incremented (see the module docstring)."""

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._lb_build_skip_counter()

    def _lb_build_skip_counter(self):
        self._lb_scale_skips = self.add_variable(shape=(), dtype="int64", name="lb_loss_scale_skips")
        if hasattr(self.inner_optimizer, "count_skips_of"):       # LARS/LAMB: count applied updates
            self.inner_optimizer.count_skips_of(self._lb_scale_skips)

    def _stateful_handle_non_finite_grads(self):
        super()._stateful_handle_non_finite_grads()
        self.inner_optimizer.iterations.assign_add(1)
        self._lb_scale_skips.assign_add(1)


def _counted(optimizer):
    """A Keras LossScaleOptimizer as a :class:`_CountedLossScale` (in place when it is built)."""
    if isinstance(optimizer, _CountedLossScale):
        return optimizer
    if getattr(type(optimizer.inner_optimizer), "_lb_clars", False):
        raise ValueError("optimizer: CLARS inside a LossScaleOptimizer under DistributedOptimizer is not supported "
                         "(its per-example norms would not be added over ranks); use float32 or mixed_bfloat16")
    if optimizer.built:
        optimizer.__class__ = _CountedLossScale
        optimizer._lb_build_skip_counter()
        return optimizer
    return _CountedLossScale(optimizer.inner_optimizer, initial_scale=optimizer.initial_scale,
                             dynamic_growth_steps=optimizer.dynamic_growth_steps, name=optimizer.name)


def loss_scale_skips(optimizer):
    """Updates skipped for an inf/NaN of the loss scale so far (0 without loss scaling)."""
    found = find_inner(optimizer, "_lb_build_skip_counter")
    counter = getattr(found, "_lb_scale_skips", None)
    return 0 if counter is None else int(counter.numpy())


def _refuse_outer_loss_scale(optimizer):
    """Called while the train step is traced: is a LossScaleOptimizer applying ``optimizer``
    from outside (it decided skip-or-apply on this rank's own gradients)?"""
    frame = sys._getframe(2)
    for _ in range(80):                # TF's cond adds a dozen frames between the two applies
        if frame is None:
            return
        outer = frame.f_locals.get("self")
        if isinstance(outer, keras.optimizers.LossScaleOptimizer) and outer.inner_optimizer is optimizer:
            raise ValueError("optimizer: a LossScaleOptimizer around largebatch.keras.DistributedOptimizer checks "
                             "each rank's gradients for inf before the allreduce (ranks could disagree and hang); "
                             "put it inside: DistributedOptimizer(keras.optimizers.LossScaleOptimizer(opt))")
        frame = frame.f_back


def is_distributed(optimizer):
    """True if ``optimizer`` came from :func:`DistributedOptimizer` (or is a LossScaleOptimizer around one)."""
    return find_inner(optimizer, "_lb_distributed") is not None


def DistributedOptimizer(optimizer, compression=None, accumulation_steps=1, nonfinite_guard=False, elastic=False,
                         measure_noise=False):
    """Return a copy of the Keras 3 ``optimizer`` that averages gradients over Horovod ranks.

    ``compression``: None or 'fp16' (gradients are sent as float16, averaged, cast back).
    ``accumulation_steps``: batches whose gradients are summed locally before one averaged update
    (global batch = per-rank batch × ranks × accumulation_steps).
    ``nonfinite_guard``: skip an update whose averaged gradients (or the previous update's trust
    ratios) hold NaN/Inf, decided by one in-graph flag that is the same on every rank; put
    :class:`largebatch.keras.callbacks.NonFiniteGuard` in the callbacks to report (and stop).
    ``elastic``: Horovod Elastic; the accumulation variables exist whatever ``accumulation_steps``,
    so ``set_accumulation_steps`` can change it when the world size changes (every rank then holds
    the same variables, which ``largebatch.keras.elastic_state`` commits and broadcasts).
    ``measure_noise``: keep each update's two squared gradient norms for the gradient noise scale
    (:meth:`noise_norms`; :class:`largebatch.noise_scale.NoiseScale` turns them into B_simple).

    Works with any Keras 3 optimizer (LARS, LAMB, SGD, Adam ...); then
    ``model.compile(optimizer=..., jit_compile=False)``. An optimizer that is not built yet is
    copied (from its config); a built one (e.g. ``keras.models.load_model(...).optimizer`` when
    resuming) is converted in place, keeping its state. Horovod must be
    initialised (``hvd.init()``) before training. Refuses a
    ``horovod.tensorflow.keras.DistributedOptimizer``, which does not average under Keras 3.
    """
    check_optimizer(optimizer)
    guard_horovod_callbacks()        # Horovod's Keras callbacks in fit with this optimizer: an error at once
    if is_distributed(optimizer):
        raise ValueError("optimizer: already a largebatch.keras.DistributedOptimizer")
    _compression(compression)
    accumulation_steps = check_positive_int("accumulation_steps", accumulation_steps)
    for flag, value in (("nonfinite_guard", nonfinite_guard), ("elastic", elastic), ("measure_noise", measure_noise)):
        if value not in (True, False):
            raise ValueError(f"{flag}: expected True or False, got {value!r}")
    built = getattr(optimizer, "built", False)
    if built and (accumulation_steps > 1 or elastic):
        raise ValueError("accumulation_steps: an optimizer that is already built (e.g. loaded with a model) "
                         "can only be wrapped with accumulation_steps=1")
    if accumulation_steps > 1 and getattr(optimizer, "gradient_accumulation_steps", None):
        raise ValueError("accumulation_steps: the optimizer already has gradient_accumulation_steps="
                         f"{optimizer.gradient_accumulation_steps}; use one or the other")
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = _counted(optimizer)            # averaged first, then unscaled and checked: one decision
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
    wrapped._lb_guard = bool(nonfinite_guard)
    wrapped._lb_elastic = bool(elastic)
    wrapped._lb_noise = bool(measure_noise)
    if built and nonfinite_guard:
        wrapped._lb_build_guard(wrapped._trainable_variables)
    if built and measure_noise:
        wrapped._lb_noise_norms = wrapped.add_variable(shape=(2,), name="lb_noise_norms")
        wrapped._lb_rank_local_paths = getattr(wrapped, "_lb_rank_local_paths", ()) + (wrapped._lb_noise_norms.path,)
    return wrapped
