"""LARS, LARC, LAMB and CLARS as ``torch.optim.Optimizer`` subclasses.

Thin by design: the formulas are the core's (:mod:`largebatch.trust`) and the per-step kernels
are :mod:`largebatch.torch.functional`'s (:func:`~largebatch.torch.functional.lars`,
:func:`~largebatch.torch.functional.lamb`: ``foreach``, ``fused`` or a per-tensor loop, per
(device, dtype)). The optimizers hold the state, resolve the exclusion policy into per-tensor
flags and keep, per param group, the :class:`~largebatch.torch.functional.TensorGroups` the
kernels reuse between steps, so that once it exists no step synchronises with the host. It is
remade when the parameter groups, their weight decay or the set of parameters with gradients
change.
"""
import warnings

import torch
from torch.optim.optimizer import Optimizer

from largebatch import registry, trust
from largebatch.policy import ExclusionWarning, ParamPolicy, exclusion_warning
from largebatch.registry import BETAS, LAMB_EPS, LARS_EPS, MOMENTUM, SUM_OF_NORMS, TRUST_COEFFICIENT
from largebatch.validation import check_hyperparameters

from . import functional

__all__ = ["LARS", "LAMB", "CLARS"]


def _policy_flags(group, policy, names_of):
    """Per-parameter (adapt, decay) booleans from the core policy, using names if the group has them.

    Names are looked up by parameter (``names_of``), not by position: Horovod's Adasum optimizer
    steps a group with its parameters swapped for one at a time."""
    names = [names_of.get(id(p)) for p in group["params"]]
    return [(policy.adapts(n, p.shape), policy.decays(n, p.shape)) for n, p in zip(names, group["params"])]


class _LayerwiseOptimizer(Optimizer):
    """Shared plumbing: policy resolution, closures, telemetry and the per-group kernel inputs."""

    _state_keys = ()

    def __init__(self, params, defaults):
        self._flag_cache = {}
        self._names_of = {}       # id(parameter) -> its name, from the groups' param_names
        self._plans = {}          # group index -> (key, parameters, TensorGroups, policy) of its last step
        self._lr_checked = {}     # group index -> the largest lr the exclusion warning looked at
        super().__init__(params, defaults)      # checks each group through add_param_group

    def _check_group(self, group):
        policy = ParamPolicy.from_spec(group["exclude"])     # raises on a malformed rule
        uses_names = any(isinstance(r, str) or (isinstance(r, (list, tuple)) and any(isinstance(x, str) for x in r))
                         for r in (policy.exclude_from_adaptation, policy.exclude_from_decay))
        if uses_names and not group.get("param_names"):
            raise ValueError("exclude: a name regex needs parameter names; pass model.named_parameters() "
                             "or largebatch.torch.param_groups(model) as params")
        functional._implementation(group.get("foreach"), group.get("fused"))     # raises on both set
        if group.get("fused"):
            for p in group["params"]:
                functional.check_fused_support(p.device, p.dtype)
        self._index_names(group)

    def _index_names(self, group):
        for p, name in zip(group["params"], group.get("param_names") or ()):
            self._names_of[id(p)] = name

    def __setstate__(self, state):
        """Unpickling, ``copy.deepcopy`` and ``torch.load`` of the whole optimizer:
        ``Optimizer.__getstate__`` keeps only defaults, state and param_groups, so the caches
        (whose keys are the ids of the original parameters) are made anew for these ones."""
        super().__setstate__(state)
        self._flag_cache, self._plans, self._names_of, self._lr_checked = {}, {}, {}, {}
        for group in self.param_groups:
            self._index_names(group)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except Exception:
            self.param_groups.pop()             # a refused group is not kept
            raise
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
        try:
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for index, group in enumerate(self.param_groups):
                params, groups, policy = self._plan(index, group)
                if params:
                    self._step_group(index, group, params, groups, policy)
        finally:
            self._step_ended()
        return loss

    def _step_ended(self):
        """Hook for subclasses, run after every step, also one that raised. (Not an override of
        ``step``: torch wraps each class's ``step`` with the step hooks, which would then run
        once per level of ``super().step()``.)"""

    def _plan(self, index, group):
        """The group's parameters with gradients, their :class:`functional.TensorGroups` and the
        group's :class:`ParamPolicy`; reused while the same parameters (same devices, dtypes),
        policy and weight decay step."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return None, None, None
        key = (id(group["exclude"]), len(group["params"]), group["weight_decay"],
               tuple((id(p), p.device, p.dtype) for p in params))
        plan = self._plans.get(index)
        if plan is None or plan[0] != key:
            active = [f for p, f in zip(group["params"], self._flags(index, group)) if p.grad is not None]
            groups = functional.TensorGroups(params, group["weight_decay"], decay=[d for _, d in active],
                                             adapt=[a for a, _ in active])
            plan = self._plans[index] = (key, params, groups, ParamPolicy.from_spec(group["exclude"]))
        return plan[1], plan[2], plan[3]

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


# --------------------------------------------------------------------------------------- LARS

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
        exclude: which tensors get no trust ratio and which no weight decay (see
            :class:`largebatch.policy.ParamPolicy`; default: every tensor adapted, ndim <= 1 —
            biases, BN — not decayed; ``largebatch.policy.MLPERF`` excludes ndim <= 1 from both,
            stepping them at γ_t, the timm / optax / MLPerf convention). Name regexes need named
            parameters.
        foreach, fused: implementation (see :mod:`largebatch.torch.functional`); default foreach.
        track_trust_ratios: keep each layer's last trust ratio for :meth:`trust_ratios`.
    """

    _registry_name = "lars"       # whose constraints (largebatch.registry) the arguments must meet

    def __init__(self, params, lr=1.0, momentum=MOMENTUM, weight_decay=0.0, trust_coefficient=TRUST_COEFFICIENT,
                 eps=LARS_EPS, trust_denominator=SUM_OF_NORMS, clip=False, nesterov=False, exclude=None,
                 foreach=None, fused=None, track_trust_ratios=False):
        check_hyperparameters(lr=lr, momentum=momentum, weight_decay=weight_decay,
                              trust_coefficient=trust_coefficient, eps=eps, trust_denominator=trust_denominator)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        eps=eps, trust_denominator=trust_denominator, clip=bool(clip), nesterov=bool(nesterov),
                        exclude=exclude, foreach=foreach, fused=fused, track_trust_ratios=track_trust_ratios)
        super().__init__(params, defaults)

    def _check_group(self, group):
        super()._check_group(group)
        check_hyperparameters(lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"],
                              trust_coefficient=group["trust_coefficient"], eps=group["eps"],
                              trust_denominator=group["trust_denominator"])
        # every group, not only the constructor's defaults: a CLARS group with another
        # denominator would silently ignore its per-example norms
        registry.check_constraints(self._registry_name, group)

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

    _exclusion_warned = False

    def _warn_exclusion(self, index, group, policy):
        """Once per optimizer: tensors excluded from adaptation about to step at a rate plain SGD
        does not survive without normalisation layers (:func:`largebatch.policy.exclusion_warning`).
        Looked at when a group's lr (a number) exceeds the largest it had, so a warm-up is seen."""
        lr = group["lr"]
        if self._exclusion_warned or isinstance(lr, torch.Tensor) or lr <= self._lr_checked.get(index, 0.0):
            return
        self._lr_checked[index] = lr
        names = group.get("param_names") or [None] * len(group["params"])
        excluded = [n or f"param{i}{tuple(p.shape)}"
                    for i, (n, p, (adapt, _)) in enumerate(zip(names, group["params"], self._flags(index, group)))
                    if not adapt]
        line = exclusion_warning(excluded, lr, trust_coefficient=group["trust_coefficient"], clip=group["clip"],
                                 excluded_rate=policy.excluded_rate, normalized=group.get("normalization_layers"),
                                 optimizer="LARC" if group["clip"] else type(self).__name__)
        if line:
            self._exclusion_warned = True
            warnings.warn(line, ExclusionWarning, stacklevel=4)

    def _grad_norm_override(self, group, params):
        """Hook for CLARS: the per-layer norm that replaces ‖g‖ in the ratio (None: use ‖g‖)."""
        return None

    def _step_group(self, index, group, params, groups, policy):
        self._warn_exclusion(index, group, policy)
        grad_norms = self._grad_norm_override(group, params)    # before buffers: CLARS asks if state is fresh
        bufs = self._buffers(params)
        functional.lars(params, [p.grad for p in params], bufs, lr=group["lr"], momentum=group["momentum"],
                        weight_decay=group["weight_decay"], trust_coefficient=group["trust_coefficient"],
                        eps=group["eps"], trust_denominator=group["trust_denominator"], clip=group["clip"],
                        nesterov=group["nesterov"], excluded_rate=policy.excluded_rate, grad_norms=grad_norms,
                        trust_ratios=self._ratio_slots(group, params), foreach=group.get("foreach"),
                        fused=group.get("fused"), groups=groups)


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

    Same arguments as :class:`LARS`; ``trust_denominator`` must be 'sum_of_norms' (the registry's
    CLARS constraint, checked by :class:`LARS`'s constructor).
    """

    _registry_name = "clars"
    _pending_norms = None             # Σ_i ‖∇_l f_i‖ / B per parameter, for the next step only

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

    def _step_ended(self):
        self._pending_norms = None          # the norms are of this step's gradients only


# --------------------------------------------------------------------------------------- LAMB

class LAMB(_LayerwiseOptimizer):
    r"""Layer-wise Adaptive Moments for Batch training (You et al. 2019, arXiv 1904.00962, Alg. 2).

        m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²
        u = m̂/(√v̂ + ε) + β·w;  w ← w − γ_t·(‖w‖/‖u‖)·u     (ratio 1 on zero norms)

    Args mirror :class:`LARS` (``betas`` = (β1, β2), ``eps`` = ε); excluded tensors get ratio 1
    and no decay. ``foreach`` (the default) batches the update across tensors with ``_foreach``
    ops; ``foreach=False`` runs the per-tensor core formulas; ``fused=True`` compiles the
    per-tensor step.
    """

    def __init__(self, params, lr=1e-3, betas=BETAS, eps=LAMB_EPS, weight_decay=0.0, exclude=None,
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

    def _step_group(self, index, group, params, groups, policy):
        exp_avgs, exp_avg_sqs, steps = self._moments(params)
        functional.lamb(params, [p.grad for p in params], exp_avgs, exp_avg_sqs, steps, lr=group["lr"],
                        betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
                        trust_ratios=self._ratio_slots(group, params), foreach=group.get("foreach"),
                        fused=group.get("fused"), groups=groups)

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
