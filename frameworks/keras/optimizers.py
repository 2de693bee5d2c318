"""LARS / LARC and LAMB as Keras 3 optimizers (``keras.optimizers.Optimizer`` subclasses).

Every formula comes from :mod:`largebatch.trust` (called with ``xp=tensorflow``); this module
only computes norms, picks per-variable options from :class:`largebatch.policy.ParamPolicy`
and assigns the results.

Speed: the per-variable elementwise update (``trust.lars_momentum_update``, LAMB's moments and
direction) runs as a small XLA-compiled function (``fused=None``/``True``): XLA fuses the
formula's five elementwise operations into one pass over w, g and v, which makes a LARS step
as cheap as Keras' unfused SGD(momentum) (bench/keras_optimizer_cost.py). Norms are computed
outside XLA with ``tf.nn.l2_loss`` (one fused pass). ``fused=False`` runs the same core formulas as
plain TensorFlow ops.
"""
import difflib
import inspect
import warnings

import numpy as np
import keras
import tensorflow as tf

from largebatch import registry, trust
from largebatch.policy import ExclusionWarning, ParamPolicy, exclusion_warning
from largebatch.registry import (BETAS, LAMB_EPS, LARS_EPS, MOMENTUM, NORM_OF_SUM, SUM_OF_NORMS,
                                 TRUST_COEFFICIENT)
from largebatch.validation import check_beta, check_hyperparameters, check_number

from ._checks import HOROVOD_KERAS_MESSAGE, HorovodKerasError, guard_horovod_callbacks, is_horovod_keras_optimizer

__all__ = ["LARS", "LAMB", "CLARS"]

# Keras' own keyword arguments that make sense for a LARS/LAMB optimizer.
_KERAS_KWARGS = ("clipnorm", "clipvalue", "global_clipnorm", "use_ema", "ema_momentum",
                 "ema_overwrite_frequency", "loss_scale_factor", "gradient_accumulation_steps")


# Other libraries' names for our arguments (torch: lr; TF Model Garden: eeta; Adam: beta1).
_ALIASES = {"lr": "learning_rate", "learningrate": "learning_rate", "beta1": "beta_1", "beta2": "beta_2",
            "betas": "beta_1 and beta_2", "wd": "weight_decay", "eeta": "trust_coefficient", "eta": "trust_coefficient",
            "trust_coeff": "trust_coefficient", "epsilon": "eps"}


def _unknown_argument(cls, name):
    """One line for an unknown keyword argument, with the closest accepted name."""
    accepted = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "kwargs")]
    accepted += list(_KERAS_KWARGS)
    guess = _ALIASES.get(name)
    if guess is not None and guess.split(" and ")[0] not in accepted:
        guess = None
    if guess is None:
        close = difflib.get_close_matches(name, accepted, n=1, cutoff=0.6)
        guess = close[0] if close else None
    hint = f"; did you mean {guess}?" if guess else f"; expected one of: {', '.join(accepted)}"
    if name == "lr" and guess == "learning_rate":
        hint += " (Keras optimizers call it learning_rate; largebatch.torch's call it lr)"
    return f"{name}: unknown argument for {cls.__name__}{hint}"


def _tf_var(variable):
    return variable.value if isinstance(variable, keras.Variable) else variable


def _half_sum_sq(x):
    """Σx²/2 in float32 (float64 for float64 x): ``tf.nn.l2_loss`` is one fused, accurate pass
    over x, cheaper than square + reduce_sum (and far more accurate than a dot product)."""
    if x.dtype not in (tf.float32, tf.float64):
        x = tf.cast(x, tf.float32)
    return tf.nn.l2_loss(x)


def _norm_from_half(half_sum_sq):
    return tf.sqrt(2.0 * half_sum_sq)


def _norm(x):
    """‖x‖₂ (see :func:`_half_sum_sq`)."""
    return _norm_from_half(_half_sum_sq(x))


def _dense(gradient, dtype):
    if isinstance(gradient, tf.IndexedSlices):
        gradient = tf.convert_to_tensor(gradient)
    return tf.cast(gradient, dtype)


def _learning_rate_arg(learning_rate):
    check_hyperparameters(lr=learning_rate, lr_name="learning_rate")
    if isinstance(learning_rate, (int, float)) and not isinstance(learning_rate, bool):
        return float(learning_rate)                 # Keras insists on a float
    if hasattr(learning_rate, "numpy") and getattr(learning_rate, "shape", None) == ():
        return float(learning_rate)
    return learning_rate


# the scale and shift of Keras's normalisation layers (BatchNormalization, LayerNormalization,
# GroupNormalization) are named gamma and beta; Dense and Conv name theirs kernel and bias
_NORMALIZATION_NAMES = ("gamma", "beta")


def is_normalization_variable(variable):
    """True for a normalisation layer's scale or shift (by Keras's variable names)."""
    return (getattr(variable, "path", None) or variable.name).rsplit("/", 1)[-1] in _NORMALIZATION_NAMES


def _exclude_to_config(exclude):
    if isinstance(exclude, ParamPolicy):
        return exclude.to_spec()
    return exclude


class _Collector:
    """Holds the per-layer rates of one step while update_step runs (not tracked by Keras)."""
    def __init__(self):
        self.items = {}


class _LayerwiseOptimizer(keras.optimizers.Optimizer):
    """Shared machinery: the exclusion policy, weight decay handled by the algorithm (never by
    Keras' base class), per-layer learning-rate telemetry and the Horovod-Keras refusal."""

    _lb_layerwise = True          # a largebatch optimizer (see _checks.is_largebatch_optimizer)

    def __init__(self, learning_rate, weight_decay, exclude, fused, name, kwargs):
        if is_horovod_keras_optimizer(type(self)):
            # horovod.tensorflow.keras.DistributedOptimizer re-creates us as a subclass of our class
            raise HorovodKerasError(HOROVOD_KERAS_MESSAGE)
        unknown = sorted(set(kwargs) - set(_KERAS_KWARGS) - {"decay"})
        if unknown:
            raise ValueError(_unknown_argument(type(self), unknown[0]))
        guard_horovod_callbacks()     # Horovod's Keras callbacks in fit with this optimizer: an error at once
        learning_rate = _learning_rate_arg(learning_rate)
        if weight_decay is None:
            weight_decay = 0.0
        weight_decay = check_number("weight_decay", weight_decay, low=0.0)
        if fused not in (None, True, False):
            raise ValueError(f"fused: expected None, True or False, got {fused!r}")
        try:
            policy = ParamPolicy.from_spec(exclude)
        except ValueError as err:
            message = str(err)
            raise ValueError(message if message.startswith("exclude:") else f"exclude: {message}") from None
        # weight_decay is NOT given to Keras: its base class would decay every variable a second
        # time, outside the trust ratio (and regardless of the exclusion policy).
        super().__init__(learning_rate=learning_rate, weight_decay=None, name=name, **kwargs)
        self.weight_decay = weight_decay
        self.exclude = exclude
        self.fused = fused
        self._lb_policy = policy
        self._lb_collector = None

    # Keras' decoupled weight decay is replaced by the algorithm's own (inside the update).
    def _apply_weight_decay(self, variables):
        return

    def build(self, variables):
        guard_horovod_callbacks()
        if self.built:
            return
        super().build(variables)
        names, adapt, decay = [], [], []
        for variable in variables:
            name = getattr(variable, "path", None) or variable.name
            shape = tuple(variable.shape)
            names.append(name)
            adapt.append(bool(self._lb_policy.adapts(name, shape)))
            decay.append(bool(self._lb_policy.decays(name, shape)) and self._use_weight_decay(variable))
        self._lb_names, self._lb_adapt, self._lb_decay = tuple(names), tuple(adapt), tuple(decay)
        self._layer_lrs = self.add_variable(shape=(len(variables),), name="layer_learning_rates")
        self._last_lr = self.add_variable(shape=(), name="last_learning_rate")

    _lb_pending_variables = None  # saved values that arrived before build (a copy of a built optimizer)

    def load_own_variables(self, store):
        """As Keras's, except for an optimizer that is not built yet: the saved values are kept and
        assigned once :meth:`build` has made the variables, instead of being dropped with a
        warning. That is what ``copy.deepcopy`` and ``pickle`` of a built optimizer go through
        (Keras copies a saveable through its file format), so the copy continues from the
        original's momentum and step count once it is built on the same model's variables."""
        if not self.built and len(store.keys()) > len(self.variables):
            self._lb_pending_variables = {key: np.array(store[key]) for key in store.keys()}
            return
        super().load_own_variables(store)

    def _lb_restore_pending(self):
        """Called at the end of each algorithm's build(): values loaded before it now go in."""
        pending, self._lb_pending_variables = self._lb_pending_variables, None
        if pending is not None:
            # build may run while fit traces its train step: assign now, outside that graph,
            # as Keras creates the variables themselves
            with tf.init_scope():
                super().load_own_variables(pending)

    def _use_fused(self, variable):
        """XLA kernel for tensors big enough to gain from it; below ``_FUSE_MIN_SIZE`` elements
        (biases, BatchNorm scale/shift) the kernel launch costs more than the plain ops."""
        if self.fused is None:
            return variable.shape.num_elements() >= _FUSE_MIN_SIZE
        return self.fused

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        collector = self._lb_collector = _Collector()
        try:
            super()._backend_update_step(grads, trainable_variables, learning_rate)
        finally:
            self._lb_collector = None
        if collector.items:
            index = sorted(collector.items)
            values = tf.stack([tf.cast(collector.items[i], tf.float32) for i in index])
            if len(index) == len(self._lb_names):
                new = values
            else:
                new = tf.tensor_scatter_nd_update(tf.convert_to_tensor(self._layer_lrs.value),
                                                  [[i] for i in index], values)
            self._layer_lrs.assign(new)
            self._last_lr.assign(tf.cast(learning_rate, tf.float32))

    _outer_skips = None               # a loss-scale optimizer's skip counter, when one wraps this

    def count_skips_of(self, counter) -> None:
        """A loss-scale optimizer around this one hands over its skip counter: those updates
        advance ``iterations`` but apply nothing, and :meth:`applied_updates` leaves them out."""
        self._outer_skips = counter

    def applied_updates(self):
        """Updates applied so far: ``iterations`` less the updates a loss-scale optimizer around
        this one skipped (LAMB's bias correction counts applied updates). DistributedOptimizer's
        non-finite guard subtracts its own skips (its override)."""
        skips = self._outer_skips
        return self.iterations if skips is None else self.iterations - skips

    def _record(self, index, layer_lr):
        if self._lb_collector is not None:
            self._lb_collector.items[index] = layer_lr

    # ---- telemetry (eager) -------------------------------------------------------------
    def layer_learning_rates(self):
        """{variable path: the rate its last update was scaled with} (eager; empty before the first step)."""
        if not self.built:
            return {}
        values = self._layer_lrs.numpy()
        return {name: float(v) for name, v in zip(self._lb_names, values)}

    def trust_ratios(self):
        """{variable path: layer lr / global lr} of the last step (1 for excluded variables)."""
        lr = float(self._last_lr.numpy()) if self.built else 0.0
        return {name: (v / lr if lr > 0 else 1.0) for name, v in self.layer_learning_rates().items()}

    def get_config(self):
        config = super().get_config()
        config.update({"weight_decay": self.weight_decay, "exclude": _exclude_to_config(self.exclude),
                       "fused": self.fused})
        return config


_FUSE_MIN_SIZE = 4096

# One XLA-compiled kernel per (variable shape and dtype, formula options): each tf.function is
# traced once (no retracing warnings on models with many shapes).
_KERNELS = {}

# The kernels take variables as resource *handles* (tensors), never as tf.Variable objects: a
# tf.Function traced inside Keras' train function with Variable arguments captures those
# Variables, and a later model with same-shaped variables would reuse the trace and fail
# ("referencing variables which have been deleted").


def _signature(variable):
    return tuple(variable.shape), variable.dtype.name


def _read(handle, dtype, shape):
    return tf.ensure_shape(tf.raw_ops.ReadVariableOp(resource=handle, dtype=dtype), shape)


def _write(handle, value):
    tf.raw_ops.AssignVariableOp(resource=handle, value=value)


def _lars_kernel(signature, momentum, weight_decay, nesterov, trust_coefficient, eps, clip, adapt, norm_of_sum,
                 excluded_rate):
    """XLA kernel for one variable: layer lr from the norms (trust.lars_layer_lr), then the update
    (trust.lars_momentum_update); returns the layer lr. Scalars and the elementwise update fuse."""
    key = ("lars", signature, momentum, weight_decay, nesterov, trust_coefficient, eps, clip, adapt, norm_of_sum,
           excluded_rate)
    if key not in _KERNELS:
        shape, dtype = signature[0], tf.as_dtype(signature[1])

        def lars_kernel(w_handle, g, v_handle, lr, w_half, g_half, update_half):
            w, v = _read(w_handle, dtype, shape), _read(v_handle, dtype, shape)
            w_norm, g_norm, update_norm = (_norm_from_half(h) for h in (w_half, g_half, update_half))
            layer_lr = trust.lars_layer_lr(tf, w_norm, g_norm, lr, trust_coefficient=trust_coefficient,
                                           weight_decay=weight_decay, eps=eps,
                                           update_norm=update_norm if norm_of_sum else None,
                                           clip=clip, adapt=adapt, excluded_rate=excluded_rate)
            layer_lr = tf.cast(layer_lr, dtype)
            new_w, new_v = trust.lars_momentum_update(w, g, v, layer_lr, momentum=momentum,
                                                      weight_decay=weight_decay, nesterov=nesterov)
            _write(v_handle, new_v)
            _write(w_handle, new_w)
            return layer_lr
        _KERNELS[key] = tf.function(lars_kernel, jit_compile=True, autograph=False)
    return _KERNELS[key]


def _lamb_direction(w, m, v, step, beta_1, beta_2, eps, weight_decay):
    """trust.lamb_direction with its two bias corrections computed from the float64 ``step`` and
    then cast to w's dtype (see trust.lamb_bias_corrections: in float32, 1 − 0.999^t would lose
    digits); the elementwise work stays in w's dtype."""
    c1, c2 = trust.lamb_bias_corrections(tf.cast(step, tf.float64), beta_1, beta_2)
    return trust.lamb_direction(tf, w, m, v, beta1=beta_1, beta2=beta_2, eps=eps,
                                weight_decay=weight_decay,
                                bias_corrections=(tf.cast(c1, w.dtype), tf.cast(c2, w.dtype)))


def _lamb_kernel(signature, beta_1, beta_2, eps, weight_decay):
    key = ("lamb", signature, beta_1, beta_2, eps, weight_decay)
    if key not in _KERNELS:
        shape, dtype = signature[0], tf.as_dtype(signature[1])

        def lamb_kernel(w_handle, g, m_handle, v_handle, step):
            w, m, v = (_read(h, dtype, shape) for h in (w_handle, m_handle, v_handle))
            new_m, new_v = trust.adam_moments(m, v, g, beta_1, beta_2)
            _write(m_handle, new_m)
            _write(v_handle, new_v)
            return _lamb_direction(w, new_m, new_v, step, beta_1, beta_2, eps, weight_decay)
        _KERNELS[key] = tf.function(lamb_kernel, jit_compile=True, autograph=False)
    return _KERNELS[key]


@keras.saving.register_keras_serializable(package="largebatch")
class LARS(_LayerwiseOptimizer):
    """LARS (You, Gitman, Ginsburg 2017, Algorithm 1) and LARC (``clip=True``) for Keras 3.

    For each variable w with gradient g, global lr γ_t, momentum m, weight decay β, trust
    coefficient η::

        λ = η‖w‖ / (‖g‖ + β‖w‖ + eps)          (trust_denominator="norm_of_sum": ‖g + βw‖ + eps)
        layer lr = γ_t·λ   (clip=True: min(λ, γ_t); λ = 1 when ‖w‖ = 0 or ‖g‖ = 0)
        v ← m·v + layer lr·(g + βw);   w ← w − v   (nesterov: w ← w − (m·v + layer lr·(g + βw)))

    By default every variable is adapted and those with ndim <= 1 (biases, BatchNorm
    scale/shift) are not decayed. ``exclude`` is None (that default), a rule for both decisions
    (None: ndim <= 1, a bool, a regex searched in the variable's path such as
    ``"sequential/dense/kernel"``, a callable ``(path, shape) -> bool``, a list of those), a dict
    ``{"adaptation": rule, "decay": rule, "rate": "global" | "trust"}`` or a
    :class:`largebatch.ParamPolicy`; ``largebatch.policy.MLPERF`` is the timm / optax / MLPerf
    convention (ndim <= 1 neither adapted nor decayed, stepping at γ_t). Keras' ``exclude_from_weight_decay()`` is honoured too.
    ``weight_decay`` is the paper's (inside the trust ratio and the update); Keras' own
    decoupled decay is never applied on top. The momentum buffers are ``self.momentums`` and
    hold v as written above (γ_t inside, so schedules should use momentum correction:
    :class:`largebatch.keras.callbacks.LearningRateSchedule` does). ``name`` defaults to the
    registry's name of the class ('lars', 'clars').
    """

    _registry_name = "lars"       # whose constraints (largebatch.registry) the arguments must meet

    def __init__(self, learning_rate=1.0, momentum=MOMENTUM, weight_decay=0.0, trust_coefficient=TRUST_COEFFICIENT,
                 eps=LARS_EPS, trust_denominator=SUM_OF_NORMS, clip=False, nesterov=False, exclude=None,
                 fused=None, name=None, **kwargs):
        check_hyperparameters(momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                              eps=eps, trust_denominator=trust_denominator)
        for flag, value in (("clip", clip), ("nesterov", nesterov)):
            if not isinstance(value, bool):
                raise ValueError(f"{flag}: expected True or False, got {value!r}")
        registry.check_constraints(self._registry_name, dict(momentum=momentum, nesterov=nesterov,
                                                             trust_denominator=trust_denominator))
        self._lb_check_kwargs(kwargs)
        super().__init__(learning_rate, weight_decay, exclude, fused,
                         self._registry_name if name is None else name, kwargs)
        self.momentum = float(momentum)
        self.trust_coefficient = float(trust_coefficient)
        self.eps = float(eps)
        self.trust_denominator = trust_denominator
        self.clip = clip
        self.nesterov = nesterov

    def _lb_check_kwargs(self, kwargs):
        """Hook for subclasses that refuse some of Keras' own arguments (CLARS)."""

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = self.add_optimizer_variables(variables, "momentum")
        self._lb_restore_pending()
        self._lb_warn_exclusion(variables)

    def _lb_warn_exclusion(self, variables):
        """Once, at build: variables excluded from adaptation would step at a constant learning
        rate plain SGD does not survive without normalisation layers
        (:func:`largebatch.policy.exclusion_warning`). A schedule is not evaluated here."""
        excluded = [name for name, adapt in zip(self._lb_names, self._lb_adapt) if not adapt]
        if not excluded or callable(self._learning_rate):
            return
        with tf.init_scope():                # build may run while fit traces its step
            lr = float(keras.ops.convert_to_numpy(self._learning_rate))
        line = exclusion_warning(excluded, lr,
                                 trust_coefficient=self.trust_coefficient, clip=self.clip,
                                 excluded_rate=self._lb_policy.excluded_rate,
                                 normalized=any(is_normalization_variable(v) for v in variables),
                                 optimizer="LARC" if self.clip else type(self).__name__)
        if line:
            warnings.warn(line, ExclusionWarning, stacklevel=2)

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        w = _tf_var(variable)
        v = _tf_var(self.momentums[index])
        dtype = w.dtype
        g = _dense(gradient, dtype)
        beta = self.weight_decay if self._lb_decay[index] else 0.0
        adapt = self._lb_adapt[index]
        norm_of_sum = self.trust_denominator == NORM_OF_SUM
        # norms in float32 (float64 for float64 variables), as halved sums of squares
        if adapt:
            w_half, g_half = _half_sum_sq(w), self._lb_grad_half(index, g)
            update_half = _half_sum_sq(g + beta * w) if norm_of_sum else tf.zeros((), w_half.dtype)
        else:                                        # not adapted: the layer lr needs no norms
            w_half = g_half = update_half = tf.zeros((), tf.float64 if dtype == tf.float64 else tf.float32)
        lr = tf.cast(learning_rate, w_half.dtype)
        if self._use_fused(w):
            kernel = _lars_kernel(_signature(w), self.momentum, beta, self.nesterov, self.trust_coefficient, self.eps,
                                  self.clip, adapt, norm_of_sum, self._lb_policy.excluded_rate)
            layer_lr = kernel(w.handle, g, v.handle, lr, w_half, g_half, update_half)
        else:
            w_norm, g_norm, update_norm = (_norm_from_half(h) for h in (w_half, g_half, update_half))
            layer_lr = trust.lars_layer_lr(tf, w_norm, g_norm, lr, trust_coefficient=self.trust_coefficient,
                                           weight_decay=beta, eps=self.eps,
                                           update_norm=update_norm if norm_of_sum else None,
                                           clip=self.clip, adapt=adapt, excluded_rate=self._lb_policy.excluded_rate)
            layer_lr = tf.cast(layer_lr, dtype)
            new_w, new_v = trust.lars_momentum_update(w, g, v, layer_lr, momentum=self.momentum,
                                                      weight_decay=beta, nesterov=self.nesterov)
            self.assign(v, new_v)
            self.assign(w, new_w)
        self._record(index, layer_lr)

    def _lb_grad_half(self, index, g):
        """‖g‖²/2 for the ratio's denominator (CLARS: from the mean per-example norm instead)."""
        return _half_sum_sq(g)

    def get_config(self):
        config = super().get_config()
        config.update({"momentum": self.momentum, "trust_coefficient": self.trust_coefficient,
                       "eps": self.eps, "trust_denominator": self.trust_denominator, "clip": self.clip,
                       "nesterov": self.nesterov})
        return config


@keras.saving.register_keras_serializable(package="largebatch")
class LAMB(_LayerwiseOptimizer):
    """LAMB (You et al. 2019, arXiv 1904.00962, Algorithm 2) for Keras 3.

    Adam moments with bias correction, u = m̂/(√v̂ + ε) + βw, layer ratio ‖w‖/‖u‖ (1 when either
    norm is 0, and for excluded variables), w ← w − γ_t·ratio·u. Same ``exclude`` policy as
    :class:`LARS` (excluded variables: ratio 1 and no weight decay). ``eps`` is ε (torch's name,
    as for :class:`LARS`); ``epsilon=``, its former name, is still accepted, so older ``get_config``
    dicts load; the config holds ``eps``.
    """

    def __init__(self, learning_rate=1e-3, beta_1=BETAS[0], beta_2=BETAS[1], eps=LAMB_EPS, weight_decay=0.0,
                 exclude=None, fused=None, name="lamb", **kwargs):
        beta_1, beta_2 = check_beta("beta_1", beta_1), check_beta("beta_2", beta_2)
        eps_name = "eps"
        if "epsilon" in kwargs:
            if eps != LAMB_EPS:
                raise ValueError("epsilon: the former name of eps; pass eps only")
            eps_name, eps = "epsilon", kwargs.pop("epsilon")
        eps = check_number(eps_name, eps, **registry.HYPERPARAMETERS["eps"].bounds)
        super().__init__(learning_rate, weight_decay, exclude, fused, name, kwargs)
        self.beta_1, self.beta_2, self.eps = beta_1, beta_2, eps

    @property
    def epsilon(self):
        """``eps`` under its former name."""
        return self.eps

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums, self.velocities = self.add_optimizer_variables(variables, ["momentum", "velocity"])
        self._lb_restore_pending()

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        w = _tf_var(variable)
        m, v = _tf_var(self.momentums[index]), _tf_var(self.velocities[index])
        dtype = w.dtype
        g = _dense(gradient, dtype)
        lr = tf.cast(learning_rate, dtype)
        # t >= 1: updates applied (per update, also with accumulation; skipped non-finite ones excluded)
        step = tf.cast(self.applied_updates() + 1, tf.float64)
        beta = self.weight_decay if self._lb_decay[index] else 0.0
        if self._use_fused(w):
            u = _lamb_kernel(_signature(w), self.beta_1, self.beta_2, self.eps, beta)(w.handle, g, m.handle, v.handle, step)
        else:
            new_m, new_v = trust.adam_moments(m, v, g, self.beta_1, self.beta_2)
            self.assign(m, new_m)
            self.assign(v, new_v)
            u = _lamb_direction(w, new_m, new_v, step, self.beta_1, self.beta_2, self.eps, beta)
        if self._lb_adapt[index]:
            ratio = tf.cast(trust.lamb_trust_ratio(tf, _norm(w), _norm(u)), dtype)
        else:
            ratio = tf.ones((), dtype)
        self._record(index, lr * ratio)
        self.assign(w, trust.lamb_update(w, u, lr, ratio))

    def get_config(self):
        config = super().get_config()
        config.update({"beta_1": self.beta_1, "beta_2": self.beta_2, "eps": self.eps})
        return config


@keras.saving.register_keras_serializable(package="largebatch")
class CLARS(LARS):
    """LARS whose denominator is each layer's mean per-example gradient norm (CLARS) for Keras 3.

    Our reading of Huo, Gu, Huang 2020 (arXiv 2002.01576; AAAI 2021), stated in docs/algorithms.md::

        λ = η‖w‖ / ((1/B)·Σ_i ‖∇_l f_i(w)‖ + β‖w‖ + eps)        over the global batch B

    and otherwise :class:`LARS` (same arguments; ``trust_denominator`` must be 'sum_of_norms').
    The mean comes from :func:`largebatch.trust.clars_mean_example_norm`.

    With ``model.fit``: call :func:`largebatch.keras.enable_clars` on the model; its train step
    computes the per-example norms in the compiled train function and hands them over. Wrapped
    in :func:`largebatch.keras.DistributedOptimizer`, the per-rank sums and batch sizes are added
    with one allreduce (and summed over accumulation micro-batches). In a custom loop, call
    :meth:`set_per_example_norms` before ``apply``. A step without norms is refused when the train
    function is traced.
    """

    _lb_clars = True
    _registry_name = "clars"          # LARS's constructor checks CLARS's constraint (trust_denominator)
    _lb_norm_source = None            # set by enable_clars' train step while it traces
    _lb_explicit_norms = None         # set_per_example_norms (custom loops)
    _lb_norm_means = None             # per variable index, while apply runs

    def _lb_check_kwargs(self, kwargs):
        if kwargs.get("gradient_accumulation_steps"):
            raise ValueError("gradient_accumulation_steps: Keras' own accumulation would give CLARS the norms of "
                             "the last micro-batch only; use largebatch.keras.DistributedOptimizer(opt, "
                             "accumulation_steps=k)")

    def set_per_example_norms(self, norm_sums, global_batch_size):
        """Record Σ_i ‖∇_l f_i‖ for the next ``apply``: ``norm_sums`` maps each trainable variable's
        path (or the variable) to a 0-d tensor, as :func:`largebatch.keras.per_example_norm_sums`
        returns; ``global_batch_size`` is B (a number or 0-d tensor)."""
        self._lb_explicit_norms = ({getattr(k, "path", k): v for k, v in norm_sums.items()}, global_batch_size)

    def _lb_local_norm_sums(self, trainable_variables):
        """(float32 vector over the optimizer's variables, batch size): this process's per-example
        norm sums for this step, from set_per_example_norms or enable_clars' train step."""
        variables = list(self._trainable_variables)
        if self._lb_explicit_norms is not None:
            sums, batch = self._lb_explicit_norms
            self._lb_explicit_norms = None
            missing = [v.path for v in variables if v.path not in sums]
            if missing:
                raise ValueError(f"norm_sums: expected a norm sum for every trainable variable, {len(missing)} "
                                 f"missing (first: {missing[0]!r})")
            vector = tf.stack([tf.cast(sums[v.path], tf.float32) for v in variables])
            return vector, tf.cast(batch, tf.float32)
        if self._lb_norm_source is None:
            raise ValueError("largebatch.keras.CLARS: no per-example gradient norms for this step; call "
                             "largebatch.keras.enable_clars(model) before model.fit (custom loops: "
                             "optimizer.set_per_example_norms(largebatch.keras.per_example_norm_sums(...)) "
                             "before apply)")
        return self._lb_norm_source.norm_sums(variables)

    def _lb_set_norm_sums(self, sums, batch):
        """The denominators of this step from the (global) sums and batch size."""
        means = trust.clars_mean_example_norm(sums, batch)
        self._lb_norm_means = tf.unstack(means, num=len(self._trainable_variables))

    def apply(self, grads, trainable_variables=None):
        if not self.built and trainable_variables is not None:
            with keras.name_scope(self.name, caller=self):
                self.build(list(trainable_variables))
        owner = self._lb_norm_means is None
        if owner:
            self._lb_set_norm_sums(*self._lb_local_norm_sums(trainable_variables))
        try:
            return super().apply(grads, trainable_variables)
        finally:
            if owner:
                self._lb_norm_means = None

    def _lb_grad_half(self, index, g):
        mean = self._lb_norm_means[index]
        dtype = tf.float64 if g.dtype == tf.float64 else tf.float32
        mean = tf.cast(mean, dtype)
        return 0.5 * mean * mean
