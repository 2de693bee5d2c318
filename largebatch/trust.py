"""Layer-wise trust ratios: LARS, LARC, LAMB and CLARS.

Every function here is written once and runs unchanged on NumPy arrays, torch tensors and
TensorFlow tensors. Functions that need more than arithmetic operators take ``xp``, the array
namespace (``numpy``, ``torch`` or ``tensorflow``): only ``xp.where``, ``xp.minimum``,
``xp.ones_like`` and ``xp.sqrt`` are used, which the three share. Arguments may be scalars (one layer) or
vectors holding one entry per layer (the adapters' batched paths).

Terms, following You, Gitman, Ginsburg 2017, "Large Batch Training of Convolutional
Networks" (arXiv 1708.03888), Algorithm 1:
    γ_t   global learning rate at step t
    η     trust coefficient
    β     weight decay
    λ     local learning rate  η‖w‖ / (‖∇L(w)‖ + β‖w‖)
    layer lr = the rate a layer's update is actually scaled with:
               γ_t·λ (LARS, scale mode), min(λ, γ_t) (LARC, clip mode); an excluded layer
               γ_t (the default), or γ_t·η / min(η, γ_t) (``excluded_rate="trust"``)
The trust ratio reported in telemetry is layer lr / γ_t.
"""

__all__ = [
    "lars_local_lr", "lars_layer_lr", "lamb_trust_ratio", "clars_mean_example_norm",
    "lars_momentum_update", "adam_moments", "lamb_bias_corrections", "lamb_direction", "lamb_update",
]


def _safe_ratio(xp, numerator, denominator, defined):
    """numerator / denominator where ``defined``, 1 elsewhere; never divides by zero."""
    ones = xp.ones_like(denominator)
    return xp.where(defined, numerator / xp.where(defined, denominator, ones), ones)


def lars_local_lr(xp, w_norm, grad_norm, *, trust_coefficient, weight_decay=0.0, eps=0.0,
                  update_norm=None):
    """Local learning rate λ of LARS (You et al. 2017, Algorithm 1, line "local LR").

    λ = η‖w‖ / (‖g‖ + β‖w‖ + eps)        (trust_denominator="sum_of_norms", the paper's form)
    λ = η‖w‖ / (‖g + βw‖ + eps)          when ``update_norm`` = ‖g + βw‖ is given
                                          ("norm_of_sum": TF Model Garden / optax form)

    λ = 1 when ‖w‖ = 0 or ‖g‖ = 0: a freshly zero-initialised layer or a layer without
    gradient keeps the global rate instead of freezing or producing NaN/Inf.

    For CLARS pass the layer's mean per-example gradient norm as ``grad_norm``
    (see :func:`clars_mean_example_norm`).
    """
    local, _ = _local_lr_and_mask(xp, w_norm, grad_norm, trust_coefficient, weight_decay, eps, update_norm)
    return local


def _local_lr_and_mask(xp, w_norm, grad_norm, trust_coefficient, weight_decay, eps, update_norm):
    if update_norm is None:
        denominator = grad_norm + weight_decay * w_norm + eps
    else:
        denominator = update_norm + eps
    defined = (w_norm > 0) & (grad_norm > 0)
    return _safe_ratio(xp, trust_coefficient * w_norm, denominator, defined), defined


def lars_layer_lr(xp, w_norm, grad_norm, lr, *, trust_coefficient, weight_decay=0.0, eps=0.0,
                  update_norm=None, clip=False, adapt=True, excluded_rate="global"):
    """The rate one layer's LARS update is scaled with, from its norms and the global lr γ_t.

    scale mode (LARS, default):   γ_t·λ, with λ from :func:`lars_local_lr`
    clip mode (LARC, ``clip``):   min(λ, γ_t) — λ used as an absolute rate and clipped at the
                                  global one, as in NVIDIA apex / OpenSeq2Seq LARC and timm
    zero ‖w‖ or ‖g‖:              γ_t in both modes (trust ratio 1)
    not adapted (``adapt`` false, e.g. an excluded bias or BN parameter), by ``excluded_rate``:
        "global" (default)        γ_t itself (timm, optax, MLPerf's LARS)
        "trust"                   the rate of a layer whose ‖w‖/(‖g‖ + β‖w‖) is 1, i.e. λ = η:
                                  γ_t·η (scale mode), min(η, γ_t) (clip mode). LARS's γ_t is in
                                  trust units (10-80 for η = 0.001), so this is the global rate
                                  in the units of an SGD learning rate.

    ``adapt`` may be a Python bool or a per-layer boolean vector. ``lr`` may be a number or a
    0-d tensor.
    """
    local, defined = _local_lr_and_mask(xp, w_norm, grad_norm, trust_coefficient, weight_decay, eps,
                                        update_norm)
    global_lr = lr * xp.ones_like(local)
    if adapt is not True:
        if excluded_rate == "global":
            excluded = global_lr
        elif clip:
            excluded = xp.minimum(trust_coefficient * xp.ones_like(local), global_lr)
        else:
            excluded = trust_coefficient * global_lr
        if adapt is False:
            return excluded
    if clip:
        adapted = xp.where(defined, xp.minimum(local, global_lr), global_lr)
    else:
        adapted = global_lr * local
    if adapt is True:
        return adapted
    return xp.where(adapt, adapted, excluded)


def clars_mean_example_norm(per_example_norm_sum, global_batch_size):
    """CLARS denominator term: the layer's mean per-example gradient norm (1/B)·Σ_i ‖∇_l f_i(w)‖.

    Our reading of Huo, Gu, Huang 2020 (arXiv 2002.01576, "CLARS"): LARS with ‖∇_l L‖ replaced
    by this mean over the global batch B. ``per_example_norm_sum`` is Σ_i ‖∇_l f_i(w)‖ summed over
    every example of the global batch (across ranks: an allreduce *sum* of each rank's sum).
    The per-example gradients are of the un-normalised per-example loss f_i, so that
    (1/B)·Σ_i ∇f_i is the mean gradient the step uses.
    """
    return per_example_norm_sum / global_batch_size


def lars_momentum_update(w, g, v, layer_lr, *, momentum, weight_decay, nesterov=False):
    """One LARS step for one layer (You et al. 2017, Algorithm 1):

        v ← m·v + layer_lr·(g + β·w)
        w ← w − v                       (nesterov: w ← w − (m·v + layer_lr·(g + β·w)))

    The global lr sits inside the momentum buffer, as in the paper; see
    :func:`largebatch.schedules.momentum_correction` for changing it between steps.
    Returns (new w, new v); nothing is modified in place.
    """
    d = g + weight_decay * w
    scaled = layer_lr * d
    v = momentum * v + scaled
    step = momentum * v + scaled if nesterov else v
    return w - step, v


def adam_moments(m, v, g, beta1, beta2):
    """Adam's moment estimates: m ← β1·m + (1−β1)·g, v ← β2·v + (1−β2)·g²."""
    return beta1 * m + (1.0 - beta1) * g, beta2 * v + (1.0 - beta2) * (g * g)


def lamb_bias_corrections(step, beta1, beta2):
    """Adam's bias corrections (1 − β1^t, 1 − β2^t) for step t ≥ 1 (Kingma & Ba 2015, Algorithm 1).

    Compute them from a float64 (or Python float) ``t``: in float32, 1 − 0.999^t keeps only a few
    digits (relative error ~3e-6 at t = 20). Adapters may then cast the two scalars to the
    tensors' dtype and do the elementwise work there.
    """
    return 1.0 - beta1 ** step, 1.0 - beta2 ** step


def lamb_direction(xp, w, m, v, *, step=None, beta1, beta2, eps, weight_decay, bias_corrections=None):
    """LAMB's per-layer update direction (You et al. 2019, arXiv 1904.00962, Algorithm 2):

        u = m̂ / (√v̂ + ε) + β·w,   m̂ = m / (1 − β1^t),   v̂ = v / (1 − β2^t)

    ``step`` is t ≥ 1, or pass ``bias_corrections`` = :func:`lamb_bias_corrections` computed
    beforehand (then ``step`` is not used).

    >>> import numpy as np
    >>> lamb_direction(np, np.array([3.0]), np.array([0.1]), np.array([0.001]), step=1, beta1=0.9,
    ...                beta2=0.999, eps=0.0, weight_decay=0.01)      # m̂/√v̂ = 1, + βw
    array([1.03])
    """
    if bias_corrections is None:
        if step is None:
            raise ValueError("lamb_direction: expected step (t >= 1) or bias_corrections, got neither")
        bias_corrections = lamb_bias_corrections(step, beta1, beta2)
    c1, c2 = bias_corrections
    return (m / c1) / (xp.sqrt(v / c2) + eps) + weight_decay * w


def lamb_trust_ratio(xp, w_norm, u_norm):
    """LAMB's layer-wise ratio ‖w‖ / ‖u‖, and 1 when either norm is zero (You et al. 2019)."""
    return _safe_ratio(xp, w_norm, u_norm, (w_norm > 0) & (u_norm > 0))


def lamb_update(w, u, lr, ratio):
    """w ← w − γ_t · ratio · u  (LAMB, You et al. 2019, Algorithm 2, last line)."""
    return w - (lr * ratio) * u
