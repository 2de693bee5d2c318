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

A group may mix devices and dtypes: the foreach and fused paths split its parameters by
(device, dtype), as ``torch.optim`` does, and call their kernel once per part.

Once its caches exist, no path synchronises with the host inside ``step`` (no ``.item()``,
no Python branch on a tensor value, no ``torch.tensor(...)`` host-to-device copy), so steps
queue asynchronously on GPUs. The small per-group tensors the kernels take (per-layer decay and adapt flags, the
fused path's 0-d lr) are cached per group and (device, dtype): the first step after the
parameter groups, their weight decay or the set of parameters with gradients change creates
them (the flag tensors with one small host-to-device copy each), later steps reuse them, and
the lr is written into its tensor in place with ``fill_``. ``fused=True`` may also synchronise
while it compiles (its first steps per shape set).
"""
import torch
from torch.optim.optimizer import Optimizer

from largebatch import trust
from largebatch.policy import ParamPolicy
from largebatch.validation import check_hyperparameters

__all__ = ["LARS", "LAMB", "CLARS"]


def _policy_flags(group, policy, names_of):
    """Per-parameter (adapt, decay) booleans from the core policy, using names if the group has them.

    Names are looked up by parameter (``names_of``), not by position: Horovod's Adasum optimizer
    steps a group with its parameters swapped for one at a time."""
    names = [names_of.get(id(p)) for p in group["params"]]
    return [(policy.adapts(n, p.shape), policy.decays(n, p.shape)) for n, p in zip(names, group["params"])]


class _LayerwiseOptimizer(Optimizer):
    """Shared plumbing: policy resolution, closures, telemetry and implementation choice."""

    _state_keys = ()

    def __init__(self, params, defaults):
        self._flag_cache = {}
        self._names_of = {}       # id(parameter) -> its name, from the groups' param_names
        self._plans = {}          # group index -> _Plan of its last step (see _plan)
        super().__init__(params, defaults)      # checks each group through add_param_group

    def _check_group(self, group):
        policy = ParamPolicy.from_spec(group["exclude"])     # raises on a malformed rule
        uses_names = any(isinstance(r, str) or (isinstance(r, (list, tuple)) and any(isinstance(x, str) for x in r))
                         for r in (policy.exclude_from_adaptation, policy.exclude_from_decay))
        if uses_names and not group.get("param_names"):
            raise ValueError("exclude: a name regex needs parameter names; pass model.named_parameters() "
                             "or largebatch.torch.param_groups(model) as params")
        if group.get("fused") and group.get("foreach"):
            raise ValueError("fused: expected fused=True or foreach=True, not both")
        for p, name in zip(group["params"], group.get("param_names") or ()):
            self._names_of[id(p)] = name

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])
        self._clear_caches()

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._clear_caches()

    def _clear_caches(self):
        self._flag_cache.clear()
        self._plans.clear()

    def _flags(self, index, group):
        key = (index, id(group["exclude"]), tuple(id(p) for p in group["params"]))
        if key not in self._flag_cache:
            self._flag_cache[key] = _policy_flags(group, ParamPolicy.from_spec(group["exclude"]), self._names_of)
        return self._flag_cache[key]

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            plan = self._plan(index, group)
            if plan is not None:
                self._step_group(group, plan)
        return loss

    def _plan(self, index, group):
        """The group's parameters with gradients, their flags and their (device, dtype) buckets;
        reused while the same parameters (same devices, dtypes), policy and weight decay step."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return None
        key = (id(group["exclude"]), len(group["params"]), group["weight_decay"],
               tuple((id(p), p.device, p.dtype) for p in params))
        plan = self._plans.get(index)
        if plan is None or plan.key != key:
            flags = self._flags(index, group)
            active = [f for p, f in zip(group["params"], flags) if p.grad is not None]
            plan = self._plans[index] = _Plan(key, params, active, group["weight_decay"])
        return plan

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


class _Bucket:
    """The parameters of one (device, dtype) within a group's plan, with the small tensors the
    kernels take, created on first use and then kept: no host-to-device copy in later steps."""

    __slots__ = ("device", "dtype", "index", "decays", "adapts", "_decay_t", "_adapt_t", "_lr_t")

    def __init__(self, device, dtype, index, decays, adapts):
        self.device, self.dtype = device, dtype
        self.index = index                  # positions in the plan's lists; None: all of them
        self.decays, self.adapts = decays, adapts
        self._decay_t = self._adapt_t = self._lr_t = None

    def pick(self, values):
        """The bucket's entries of a list aligned with the plan's parameters."""
        if values is None or self.index is None:
            return values
        return [values[i] for i in self.index]

    def decay_tensor(self):
        if self._decay_t is None:
            self._decay_t = torch.tensor(self.decays, device=self.device, dtype=self.dtype)
        return self._decay_t

    def adapt_tensor(self):
        if self._adapt_t is None:
            self._adapt_t = torch.tensor(self.adapts, device=self.device)
        return self._adapt_t

    def lr_tensor(self, lr):
        """lr as a 0-d tensor of the bucket's device and dtype, written in place (``fill_`` with
        a Python number queues a kernel and does not wait for the device)."""
        if self._lr_t is None:
            self._lr_t = torch.empty((), device=self.device, dtype=self.dtype)
        return self._lr_t.fill_(lr)


class _Plan:
    """One group's step layout: its parameters with gradients and their per-parameter flags
    (decay value, adapt), and those split by (device, dtype), order kept within each part."""

    __slots__ = ("key", "params", "decays", "adapts", "buckets")

    def __init__(self, key, params, flags, weight_decay):
        self.key, self.params = key, params
        self.decays, self.adapts = _lars_scalars(weight_decay, flags)
        parts = {}
        for i, p in enumerate(params):
            parts.setdefault((p.device, p.dtype), []).append(i)
        if len(parts) == 1:
            (device, dtype), = parts
            self.buckets = [_Bucket(device, dtype, None, self.decays, self.adapts)]
        else:
            self.buckets = [_Bucket(device, dtype, index, [self.decays[i] for i in index],
                                    [self.adapts[i] for i in index])
                            for (device, dtype), index in parts.items()]


# --------------------------------------------------------------------------------------- LARS

def _lars_scalars(weight_decay, flags):
    beta = weight_decay
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
                       norm_of_sum, clip, nesterov, ratios=None, decay_tensor=None, adapt_tensor=None):
    """Batched: one norm call per list, the core's ratio formula once on per-layer vectors, then
    ``_foreach`` in-place ops implementing :func:`largebatch.trust.lars_momentum_update`.

    All tensors on one device, in one dtype. ``decay_tensor``/``adapt_tensor``: ``decays`` and
    ``adapts`` as tensors on that device (the optimizer passes cached ones; made here if None,
    a host-to-device copy)."""
    device, dtype = params[0].device, params[0].dtype
    if decay_tensor is None:
        decay_tensor = torch.tensor(decays, device=device, dtype=dtype)
    if adapt_tensor is None:
        adapt_tensor = torch.tensor(adapts, device=device)
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
                                weight_decay=decay_tensor, eps=eps, update_norm=update_norms, clip=clip,
                                adapt=adapt_tensor)
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

    def _step_group(self, group, plan):
        params = plan.params
        override = self._grad_norm_override(group, params)    # before buffers: CLARS asks if state is fresh
        grads = [p.grad for p in params]
        bufs = self._buffers(params)
        ratios = self._ratio_slots(group, params)
        kwargs = dict(momentum=group["momentum"], trust_coefficient=group["trust_coefficient"], eps=group["eps"],
                      norm_of_sum=group["trust_denominator"] == "norm_of_sum", clip=group["clip"],
                      nesterov=group["nesterov"])
        impl = self._impl(group)
        if override is not None or impl == "single":
            _single_tensor_lars(params, grads, bufs, group["lr"], plan.decays, plan.adapts, ratios=ratios,
                                grad_norms=override, **kwargs)
            return
        for part in plan.buckets:         # _foreach ops and compiled graphs: one device and dtype each
            w, g, v, r = part.pick(params), part.pick(grads), part.pick(bufs), part.pick(ratios)
            if impl == "fused":
                # lr as a 0-d tensor so a schedule does not trigger a recompile every step
                _fused(_single_tensor_lars)(_no_0d(w), _no_0d(g), _no_0d(v), part.lr_tensor(group["lr"]),
                                            part.decays, part.adapts, ratios=_no_0d(r), **kwargs)
            else:
                _multi_tensor_lars(w, g, v, group["lr"], part.decays, part.adapts, ratios=r,
                                   decay_tensor=part.decay_tensor(), adapt_tensor=part.adapt_tensor(), **kwargs)


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
        u = trust.lamb_direction(torch, w, new_m, new_v, step=t, beta1=beta1, beta2=beta2, eps=eps,
                                 weight_decay=beta)
        if adapt:
            ratio = trust.lamb_trust_ratio(torch, torch.linalg.vector_norm(w), torch.linalg.vector_norm(u))
        else:
            ratio = torch.ones((), device=w.device, dtype=w.dtype)
        w.copy_(trust.lamb_update(w, u, lr, ratio))
        if ratios is not None:
            ratios[i].copy_(ratio)


def _multi_tensor_lamb(params, grads, exp_avgs, exp_avg_sqs, steps, lr, decays, adapts, *, beta1, beta2, eps,
                       ratios=None, adapt_tensor=None):
    """Batched: the core's bias corrections and ratio formula once on per-layer vectors, and
    ``_foreach`` ops implementing :func:`largebatch.trust.adam_moments`,
    :func:`~largebatch.trust.lamb_direction` and :func:`~largebatch.trust.lamb_update`.

    All tensors on one device, in one dtype (the counters: float64). ``adapt_tensor``: ``adapts``
    as a tensor on that device (cached by the optimizer; made here if None)."""
    device, dtype = params[0].device, params[0].dtype
    if adapt_tensor is None:
        adapt_tensor = torch.tensor(adapts, device=device)
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
    ratio = torch.where(adapt_tensor, ratio, torch.ones_like(ratio))
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

    def _step_group(self, group, plan):
        params = plan.params
        grads = [p.grad for p in params]
        exp_avgs, exp_avg_sqs, steps = self._moments(params)
        ratios = self._ratio_slots(group, params)
        kwargs = dict(beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"])
        impl = self._impl(group)
        # counted outside the kernel: torch.compile does not write back in-place updates of these
        # 0-d counters (the fused step then saw t = 0 and divided by 1 − β⁰ = 0)
        for part in plan.buckets:
            torch._foreach_add_(part.pick(steps), 1)
        if impl == "single":
            _single_tensor_lamb(params, grads, exp_avgs, exp_avg_sqs, steps, group["lr"], plan.decays, plan.adapts,
                                ratios=ratios, **kwargs)
            return
        for part in plan.buckets:         # _foreach ops and compiled graphs: one device and dtype each
            w, g, m, v, t, r = map(part.pick, (params, grads, exp_avgs, exp_avg_sqs, steps, ratios))
            if impl == "fused":
                _fused(_single_tensor_lamb)(*map(_no_0d, (w, g, m, v)), t, part.lr_tensor(group["lr"]), part.decays,
                                            part.adapts, ratios=_no_0d(r), **kwargs)
            else:
                _multi_tensor_lamb(w, g, m, v, t, group["lr"], part.decays, part.adapts, ratios=r,
                                   adapt_tensor=part.adapt_tensor(), **kwargs)

    def load_state_dict(self, state_dict):
        """As ``torch.optim.Optimizer.load_state_dict``, then every step counter a 0-d float64 tensor
        on its parameter's device, with the saved value. (torch keeps a saved 'step' as it was, so a
        state saved on CUDA would count on CUDA for CPU parameters, and casts it to float32 for groups
        marked fused or capturable.)"""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        saved_state = state_dict["state"]
        for saved_id, p in zip(saved_ids, params):
            state = self.state.get(p)
            if not state or "step" not in state:
                continue
            step = saved_state.get(saved_id, {}).get("step", state["step"])
            state["step"] = torch.as_tensor(step).detach().to(device=p.device, dtype=torch.float64,
                                                               copy=True).reshape(())
