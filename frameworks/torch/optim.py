"""LARS, LARC, LAMB and CLARS as ``torch.optim.Optimizer`` subclasses.

Thin by design: the formulas are the core's (:mod:`largebatch.trust`). This module gathers
tensors, computes norms, calls the core and writes results back, in three implementations
chosen like ``torch.optim.SGD`` chooses its own:

- ``foreach=False``: ``_single_tensor_*`` — a plain loop over parameters calling the core's
  functional update per tensor. The readable path.
- ``foreach=True`` (default): ``_multi_tensor_*`` — all layer norms in one ``_foreach_norm``,
  the trust ratios for all layers in one vectorised call of the core formula, the update
  with ``torch._foreach_*`` in-place ops.
- ``fused=True``: the single-tensor path compiled with ``torch.compile`` (inductor), which
  fuses each layer's update into one pass over w, g and v. Compiles once per parameter-shape
  set (tens of seconds on CPU for ResNet-50), then is the fastest path.

No path synchronises with the host inside ``step`` (no ``.item()``, no Python branch on a
tensor value), so steps queue asynchronously on GPUs.
"""
import torch
from torch.optim.optimizer import Optimizer

from largebatch import trust
from largebatch.policy import ParamPolicy
from largebatch.validation import check_hyperparameters

__all__ = ["LARS", "LAMB", "CLARS"]


def _policy_flags(group, policy):
    """Per-parameter (adapt, decay) booleans from the core policy, using names if the group has them."""
    names = group.get("param_names") or [None] * len(group["params"])
    return [(policy.adapts(n, p.shape), policy.decays(n, p.shape)) for n, p in zip(names, group["params"])]


class _LayerwiseOptimizer(Optimizer):
    """Shared plumbing: policy resolution, closures, telemetry and implementation choice."""

    _state_keys = ()

    def __init__(self, params, defaults):
        self._flag_cache = {}
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)

    def _check_group(self, group):
        policy = ParamPolicy.from_spec(group["exclude"])     # raises on a malformed rule
        uses_names = any(isinstance(r, str) or (isinstance(r, (list, tuple)) and any(isinstance(x, str) for x in r))
                         for r in (policy.exclude_from_adaptation, policy.exclude_from_decay))
        if uses_names and not group.get("param_names"):
            raise ValueError("exclude: a name regex needs parameter names; pass model.named_parameters() "
                             "or largebatch.torch.param_groups(model) as params")
        if group.get("fused") and group.get("foreach"):
            raise ValueError("fused: expected fused=True or foreach=True, not both")

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        self._flag_cache.clear()

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._flag_cache.clear()

    def _flags(self, index, group):
        key = (index, id(group["exclude"]), len(group["params"]))
        if key not in self._flag_cache:
            self._flag_cache[key] = _policy_flags(group, ParamPolicy.from_spec(group["exclude"]))
        return self._flag_cache[key]

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            flags = self._flags(index, group)
            active = [(p, f) for p, f in zip(group["params"], flags) if p.grad is not None]
            if active:
                self._step_group(group, [p for p, _ in active], [f for _, f in active])
        return loss

    def trust_ratios(self):
        """Per-parameter trust ratio (layer lr / global lr) of the last step, as 0-d tensors.

        Recorded only for groups with ``track_trust_ratios=True`` (off by default: it keeps
        one small tensor per parameter). Reading them synchronises, so log every N steps.
        """
        out = {}
        for group in self.param_groups:
            names = group.get("param_names") or [None] * len(group["params"])
            for i, (name, p) in enumerate(zip(names, group["params"])):
                ratio = self.state.get(p, {}).get("trust_ratio")
                if ratio is not None:
                    out[name if name is not None else f"param{i}"] = ratio
        return out

    def _ratio_slots(self, group, params):
        if not group.get("track_trust_ratios"):
            return None
        slots = []
        for p in params:
            state = self.state[p]
            if "trust_ratio" not in state:
                state["trust_ratio"] = torch.ones((), device=p.device, dtype=p.dtype)
            slots.append(state["trust_ratio"])
        return slots

    @staticmethod
    def _impl(group):
        if group.get("fused"):
            return "fused"
        return "single" if group.get("foreach") is False else "foreach"


# --------------------------------------------------------------------------------------- LARS

def _lars_scalars(group, flags):
    beta = group["weight_decay"]
    return [beta if decay else 0.0 for _, decay in flags], [adapt for adapt, _ in flags]


def _single_tensor_lars(params, grads, bufs, lr, decays, adapts, *, momentum, trust_coefficient, eps,
                        norm_of_sum, clip, nesterov, ratios=None, grad_norms=None):
    """Reference-shaped loop: per layer, norms -> core layer lr -> core momentum update.

    ``grad_norms`` replaces ‖g‖ per layer (CLARS: the mean per-example gradient norm)."""
    for i, (w, g, v, beta, adapt) in enumerate(zip(params, grads, bufs, decays, adapts)):
        w_norm = torch.linalg.vector_norm(w)
        g_norm = torch.linalg.vector_norm(g) if grad_norms is None else grad_norms[i].to(w.dtype)
        update_norm = torch.linalg.vector_norm(g + beta * w) if norm_of_sum else None
        rate = trust.lars_layer_lr(torch, w_norm, g_norm, lr, trust_coefficient=trust_coefficient,
                                   weight_decay=beta, eps=eps, update_norm=update_norm, clip=clip, adapt=adapt)
        new_w, new_v = trust.lars_momentum_update(w, g, v, rate, momentum=momentum, weight_decay=beta,
                                                  nesterov=nesterov)
        w.copy_(new_w)
        v.copy_(new_v)
        if ratios is not None:
            ratios[i].copy_(rate / lr)


def _multi_tensor_lars(params, grads, bufs, lr, decays, adapts, *, momentum, trust_coefficient, eps,
                       norm_of_sum, clip, nesterov, ratios=None):
    """Batched: one norm call per list, the core's ratio formula once on per-layer vectors, then
    ``_foreach`` in-place ops implementing :func:`largebatch.trust.lars_momentum_update`."""
    device, dtype = params[0].device, params[0].dtype
    beta = max(decays)                      # a group's decays are its weight_decay or 0
    decayed = [i for i, b in enumerate(decays) if b]
    w_norms = torch.stack(torch._foreach_norm(params))
    g_norms = torch.stack(torch._foreach_norm(grads))
    # d = g + β·w as new tensors for decayed layers (grads stay untouched, as in torch.optim.SGD)
    d_decayed = torch._foreach_add([grads[i] for i in decayed], [params[i] for i in decayed], alpha=beta) \
        if decayed else []
    d = list(grads)                                           # g for undecayed layers: no copy
    for i, t in zip(decayed, d_decayed):
        d[i] = t
    update_norms = torch.stack(torch._foreach_norm(d)) if norm_of_sum else None
    rates = trust.lars_layer_lr(torch, w_norms, g_norms, lr, trust_coefficient=trust_coefficient,
                                weight_decay=torch.tensor(decays, device=device, dtype=dtype), eps=eps,
                                update_norm=update_norms, clip=clip, adapt=torch.tensor(adapts, device=device))
    rate_list = rates.unbind()
    # v ← m·v + rate·d, with rate·d fused into one addcmul pass (13 tensor passes a step in all,
    # torch.optim.SGD's foreach step makes 11)
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_addcmul_(bufs, d, rate_list)
    if nesterov:
        torch._foreach_add_(params, bufs, alpha=-momentum)   # w ← w − (m·v + rate·d)
        torch._foreach_addcmul_(params, d, (-rates).unbind())
    else:
        torch._foreach_sub_(params, bufs)                     # w ← w − v
    if ratios is not None:
        torch._foreach_copy_(ratios, (rates / lr).unbind())


_compiled = {}


def _fused(fn):
    """torch.compile the single-tensor kernel once per kernel (recompiles per shape set)."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, fullgraph=False, dynamic=False)
    return _compiled[fn]


def _no_0d(tensors):
    """0-d tensors as 1-element views of the same storage, for the compiled kernels: torch 2.13's
    compiled functions drop in-place writes into 0-d CPU tensor arguments (seen with float64
    parameters' momentum and Adam moments), while writes through a view of shape (1,) land."""
    if tensors is None:
        return None
    return [t.view(1) if t.dim() == 0 else t for t in tensors]


class LARS(_LayerwiseOptimizer):
    r"""SGD with Layer-wise Adaptive Rate Scaling (You, Gitman, Ginsburg 2017, Algorithm 1).

    For each parameter tensor (layer) with weight decay β, trust coefficient η, momentum m:

        λ = η‖w‖ / (‖g‖ + β‖w‖ + eps)         (1 if ‖w‖ = 0 or ‖g‖ = 0)
        v ← m·v + γ_t·λ·(g + β·w);   w ← w − v

    Args:
        params: iterable of parameters, (name, parameter) pairs, or param-group dicts.
        lr: the global learning rate γ_t (LARS recipes use large values, e.g. 1-30 with η=0.001).
        momentum: m in [0, 1).
        weight_decay: β, applied inside the trust ratio and the update (not decoupled).
        trust_coefficient: η > 0.
        eps: added to the trust-ratio denominator.
        trust_denominator: "sum_of_norms" (paper, ‖g‖+β‖w‖) or "norm_of_sum" (‖g+βw‖).
        clip: LARC — use λ as an absolute rate clipped at γ_t: rate = min(λ, γ_t).
        nesterov: Nesterov momentum.
        exclude: which tensors get neither adaptation nor decay (see
            :class:`largebatch.policy.ParamPolicy`; default: ndim <= 1, i.e. biases and BN).
            Name regexes need named parameters.
        foreach, fused: implementation (see module docstring); default foreach.
        track_trust_ratios: keep each layer's last trust ratio for :meth:`trust_ratios`.
    """

    def __init__(self, params, lr=1.0, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001, eps=0.0,
                 trust_denominator="sum_of_norms", clip=False, nesterov=False, exclude=None, foreach=None,
                 fused=None, track_trust_ratios=False):
        check_hyperparameters(lr=lr, momentum=momentum, weight_decay=weight_decay,
                              trust_coefficient=trust_coefficient, eps=eps, trust_denominator=trust_denominator)
        if nesterov and momentum <= 0:
            raise ValueError(f"nesterov: needs momentum > 0, got momentum={momentum}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        eps=eps, trust_denominator=trust_denominator, clip=bool(clip), nesterov=bool(nesterov),
                        exclude=exclude, foreach=foreach, fused=fused, track_trust_ratios=track_trust_ratios)
        super().__init__(params, defaults)

    def _check_group(self, group):
        super()._check_group(group)
        check_hyperparameters(lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"],
                              trust_coefficient=group["trust_coefficient"], eps=group["eps"],
                              trust_denominator=group["trust_denominator"])

    def init_state(self):
        """Create every trainable parameter's momentum buffer (zeros) and tracked trust-ratio slot now
        instead of at the first step, so that every rank holds the same state layout."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.requires_grad]
            self._buffers(params)
            self._ratio_slots(group, params)

    def _buffers(self, params):
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        return bufs

    def _grad_norm_override(self, group, params):
        """Hook for CLARS: the per-layer norm that replaces ‖g‖ in the ratio (None: use ‖g‖)."""
        return None

    def _step_group(self, group, params, flags):
        override = self._grad_norm_override(group, params)    # before buffers: CLARS asks if state is fresh
        grads = [p.grad for p in params]
        bufs = self._buffers(params)
        decays, adapts = _lars_scalars(group, flags)
        kwargs = dict(momentum=group["momentum"], trust_coefficient=group["trust_coefficient"], eps=group["eps"],
                      norm_of_sum=group["trust_denominator"] == "norm_of_sum", clip=group["clip"],
                      nesterov=group["nesterov"], ratios=self._ratio_slots(group, params))
        if override is not None:
            _single_tensor_lars(params, grads, bufs, group["lr"], decays, adapts, grad_norms=override, **kwargs)
            return
        impl = self._impl(group)
        if impl == "foreach" and len({(p.device, p.dtype) for p in params}) > 1:
            impl = "single"       # _foreach ops want one device and dtype per call
        if impl == "fused":
            # lr as a 0-d tensor so a schedule does not trigger a recompile every step
            lr = torch.tensor(group["lr"], dtype=params[0].dtype, device=params[0].device)
            kwargs["ratios"] = _no_0d(kwargs["ratios"])
            _fused(_single_tensor_lars)(_no_0d(params), _no_0d(grads), _no_0d(bufs), lr, decays, adapts, **kwargs)
        else:
            kernel = _multi_tensor_lars if impl == "foreach" else _single_tensor_lars
            kernel(params, grads, bufs, group["lr"], decays, adapts, **kwargs)


# --------------------------------------------------------------------------------------- CLARS

class CLARS(LARS):
    r"""LARS whose denominator is each layer's mean per-example gradient norm (CLARS).

    Our reading of Huo, Gu, Huang 2020 (arXiv 2002.01576; AAAI 2021), stated in the docs:

        λ = η‖w‖ / ((1/B)·Σ_i ‖∇_l f_i(w)‖ + β‖w‖ + eps)

    over the global batch B. Before each ``step()``, give the per-example norm sums with
    :meth:`set_per_example_norms` (see :func:`largebatch.torch.per_example_norm_sums`, which
    computes them with ``torch.func`` and sums them across Horovod ranks).

    A step without norms raises, except on a fresh optimizer (empty state): that is
    ``hvd.broadcast_optimizer_state``'s zero-gradient state-initialisation step, which then
    takes ratio 1.
    """

    def __init__(self, params, lr=1.0, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001, eps=0.0,
                 trust_denominator="sum_of_norms", clip=False, nesterov=False, exclude=None, foreach=None,
                 fused=None, track_trust_ratios=False):
        if trust_denominator != "sum_of_norms":
            raise ValueError("trust_denominator: CLARS defines its own denominator, expected 'sum_of_norms', "
                             f"got {trust_denominator!r}")
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                         trust_coefficient=trust_coefficient, eps=eps, trust_denominator=trust_denominator,
                         clip=clip, nesterov=nesterov, exclude=exclude, foreach=foreach, fused=fused,
                         track_trust_ratios=track_trust_ratios)
        self._pending_norms = None

    def set_per_example_norms(self, norm_sums, global_batch_size):
        """Record Σ_i ‖∇_l f_i‖ per parameter for the next step: ``norm_sums`` maps each
        parameter (the tensor itself) to a 0-d tensor; ``global_batch_size`` is B."""
        missing = [i for g in self.param_groups for i, p in enumerate(g["params"])
                   if p.requires_grad and p not in norm_sums]
        if missing:
            raise ValueError(f"norm_sums: expected a norm sum for every trainable parameter, "
                             f"{len(missing)} missing")
        self._pending_norms = {p: trust.clars_mean_example_norm(s, global_batch_size) for p, s in norm_sums.items()}

    def _grad_norm_override(self, group, params):
        if self._pending_norms is None:
            if any(len(self.state[p]) for p in params):
                raise RuntimeError("CLARS.step: no per-example gradient norms for this step; call "
                                   "optimizer.set_per_example_norms(largebatch.torch.per_example_norm_sums(...), B) "
                                   "after backward and before step")
            return [torch.zeros((), device=p.device) for p in params]    # broadcast's init step: ratio 1
        return [self._pending_norms[p] for p in params]

    @torch.no_grad()
    def step(self, closure=None):
        try:
            return super().step(closure)
        finally:
            self._pending_norms = None


# --------------------------------------------------------------------------------------- LAMB

def _single_tensor_lamb(params, grads, exp_avgs, exp_avg_sqs, steps, lr, decays, adapts, *, beta1, beta2, eps,
                        ratios=None):
    for i, (w, g, m, v, t, beta, adapt) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps, decays,
                                                         adapts)):
        new_m, new_v = trust.adam_moments(m, v, g, beta1, beta2)
        m.copy_(new_m)
        v.copy_(new_v)
        u = trust.lamb_direction(torch.sqrt, w, new_m, new_v, step=t, beta1=beta1, beta2=beta2, eps=eps,
                                 weight_decay=beta)
        if adapt:
            ratio = trust.lamb_trust_ratio(torch, torch.linalg.vector_norm(w), torch.linalg.vector_norm(u))
        else:
            ratio = torch.ones((), device=w.device, dtype=w.dtype)
        w.copy_(trust.lamb_update(w, u, lr, ratio))
        if ratios is not None:
            ratios[i].copy_(ratio)


def _multi_tensor_lamb(params, grads, exp_avgs, exp_avg_sqs, steps, lr, decays, adapts, *, beta1, beta2, eps,
                       ratios=None):
    """Batched: the core's bias corrections and ratio formula once on per-layer vectors, and
    ``_foreach`` ops implementing :func:`largebatch.trust.adam_moments`,
    :func:`~largebatch.trust.lamb_direction` and :func:`~largebatch.trust.lamb_update`."""
    device, dtype = params[0].device, params[0].dtype
    # per-layer 1 − β^t from the float64 counters, then rounded to the tensors' dtype
    c1, c2 = trust.lamb_bias_corrections(torch.stack(steps), beta1, beta2)
    c1, c2 = c1.to(dtype).unbind(), c2.to(dtype).unbind()
    torch._foreach_mul_(exp_avgs, beta1)                               # m ← β1·m + (1−β1)·g
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)                            # v ← β2·v + (1−β2)·g²
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    denom = torch._foreach_div(exp_avg_sqs, c2)                        # √v̂ + ε
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    u = torch._foreach_div(exp_avgs, c1)                               # u = m̂ / (√v̂ + ε) + β·w
    torch._foreach_div_(u, denom)
    del denom
    decayed = [i for i, b in enumerate(decays) if b]
    if decayed:
        torch._foreach_add_([u[i] for i in decayed], [params[i] for i in decayed], alpha=max(decays))
    ratio = trust.lamb_trust_ratio(torch, torch.stack(torch._foreach_norm(params)),
                                   torch.stack(torch._foreach_norm(u)))
    ratio = torch.where(torch.tensor(adapts, device=device), ratio, torch.ones_like(ratio))
    torch._foreach_addcmul_(params, u, (-lr * ratio).unbind())          # w ← w − γ·ratio·u
    if ratios is not None:
        torch._foreach_copy_(ratios, ratio.unbind())


class LAMB(_LayerwiseOptimizer):
    r"""Layer-wise Adaptive Moments for Batch training (You et al. 2019, arXiv 1904.00962, Alg. 2).

        m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²
        u = m̂/(√v̂ + ε) + β·w;  w ← w − γ_t·(‖w‖/‖u‖)·u     (ratio 1 on zero norms)

    Args mirror :class:`LARS` (``betas`` = (β1, β2), ``eps`` = ε); excluded tensors get ratio 1
    and no decay. ``foreach`` (the default) batches the update across tensors with ``_foreach``
    ops; ``foreach=False`` runs the per-tensor core formulas; ``fused=True`` compiles the
    per-tensor step.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, exclude=None,
                 foreach=None, fused=None, track_trust_ratios=False):
        check_hyperparameters(lr=lr, weight_decay=weight_decay, eps=eps, betas=betas)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, exclude=exclude,
                        foreach=foreach, fused=fused, track_trust_ratios=track_trust_ratios)
        super().__init__(params, defaults)

    def _check_group(self, group):
        super()._check_group(group)
        check_hyperparameters(lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                              betas=group["betas"])

    def init_state(self):
        """Create every trainable parameter's moments, step counter and tracked trust-ratio slot now."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.requires_grad]
            self._moments(params)
            self._ratio_slots(group, params)

    def _moments(self, params):
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in params:
            state = self.state[p]
            if "step" not in state:
                # float64: 1 − 0.999^t cancels badly in float32 (1e-5 relative error at t = 1)
                state["step"] = torch.zeros((), dtype=torch.float64, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return exp_avgs, exp_avg_sqs, steps

    def _step_group(self, group, params, flags):
        grads = [p.grad for p in params]
        exp_avgs, exp_avg_sqs, steps = self._moments(params)
        decays, adapts = _lars_scalars(group, flags)
        beta1, beta2 = group["betas"]
        ratios = self._ratio_slots(group, params)
        kernel, lr, impl = _single_tensor_lamb, group["lr"], self._impl(group)
        if impl == "foreach" and len({(p.device, p.dtype) for p in params}) > 1:
            impl = "single"       # _foreach ops want one device and dtype per call
        if impl == "fused":
            kernel = _fused(_single_tensor_lamb)
            lr = torch.tensor(lr, dtype=params[0].dtype, device=params[0].device)
        elif impl == "foreach":
            kernel = _multi_tensor_lamb
        # counted outside the kernel: torch.compile does not write back in-place updates of these
        # 0-d counters (the fused step then saw t = 0 and divided by 1 − β⁰ = 0)
        torch._foreach_add_(steps, 1)
        if impl == "fused":
            params, grads, exp_avgs, exp_avg_sqs, ratios = map(_no_0d, (params, grads, exp_avgs, exp_avg_sqs, ratios))
        kernel(params, grads, exp_avgs, exp_avg_sqs, steps, lr, decays, adapts, beta1=beta1, beta2=beta2,
               eps=group["eps"], ratios=ratios)
