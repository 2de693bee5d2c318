"""The NumPy reference optimizer: LARS, LARC, LAMB and CLARS written out step by step.

This is the golden model. The torch and Keras adapters are tested against it, step by step,
for every option. It is meant to be read: one loop over layers, one line per equation, the
paper's symbols in the comments. It calls the core's formulas (:mod:`largebatch.trust`), so
there is one definition of each.

    >>> import numpy as np
    >>> opt = ReferenceOptimizer("lars", lr=0.1, momentum=0.9, weight_decay=1e-4)
    >>> w = {"fc.weight": np.ones((2, 3)), "fc.bias": np.zeros(2)}
    >>> g = {"fc.weight": np.full((2, 3), 0.5), "fc.bias": np.ones(2)}
    >>> opt.step(w, g)            # updates the arrays in ``w`` in place
    >>> round(float(opt.layer_lrs["fc.weight"]), 9)   # γ·η‖w‖/(‖g‖+β‖w‖) = 0.1·0.001·2/(1+0.0002)
    0.00019996
"""
import numpy as np

from . import registry, trust
from .policy import ParamPolicy
from .registry import BETAS, MOMENTUM, NORM_OF_SUM, SUM_OF_NORMS, TRUST_COEFFICIENT
from .validation import check_choice, check_hyperparameters, check_number

__all__ = ["ReferenceOptimizer", "ALGORITHMS"]

# the registry's entries this reference models, by the reference's algorithm name
_ENTRIES = {info.reference: info for info in registry.OPTIMIZERS.values() if info.reference}
ALGORITHMS = tuple(_ENTRIES)


def _norm(x):
    return np.sqrt(np.sum(np.square(x)))


class ReferenceOptimizer:
    """NumPy optimizer for ``algorithm`` in 'lars' | 'larc' | 'lamb' | 'clars'.

    Hyper-parameters have the adapters' names and meanings. 'larc' is 'lars' with
    ``clip=True``. LAMB uses ``betas`` and ``eps`` (default 1e-6) and ignores the LARS-only
    options. Arrays keep their dtype: float32 in, float32 arithmetic.

    ``step(params, grads, lr=None, per_example_norm_sums=None, global_batch_size=None)``
    updates the arrays of the dict ``params`` in place. CLARS needs, per layer, the sum of
    per-example gradient norms over the global batch, and the global batch size.
    After a step, ``layer_lrs[name]`` is the rate the layer was updated with and
    ``trust_ratios[name]`` = layer lr / global lr.
    """

    def __init__(self, algorithm="lars", *, lr, momentum=MOMENTUM, weight_decay=0.0,
                 trust_coefficient=TRUST_COEFFICIENT, eps=None, trust_denominator=SUM_OF_NORMS, clip=False,
                 nesterov=False, betas=BETAS, exclude=None):
        self.algorithm = check_choice("algorithm", algorithm, ALGORITHMS)
        entry = _ENTRIES[algorithm]
        lamb = algorithm == "lamb"
        if eps is None:
            eps = entry.default("eps")                  # 0 for the LARS family, 1e-6 for LAMB
        check_hyperparameters(lr=lr, momentum=None if lamb else momentum, weight_decay=weight_decay,
                              trust_coefficient=None if lamb else trust_coefficient, eps=eps,
                              trust_denominator=trust_denominator, betas=betas if lamb else None)
        # the adapters' rules (nesterov needs momentum; CLARS's own denominator), with their messages
        registry.check_constraints(entry.name, dict(momentum=momentum, nesterov=nesterov,
                                                    trust_denominator=trust_denominator))
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.trust_coefficient, self.eps, self.trust_denominator = trust_coefficient, eps, trust_denominator
        self.clip = bool(clip) or bool(entry.fixed.get("clip"))          # 'larc' fixes clip=True
        self.nesterov, self.betas = bool(nesterov), tuple(betas)
        self.policy = ParamPolicy.from_spec(exclude)
        self.state = {}
        self.layer_lrs, self.trust_ratios = {}, {}

    def step(self, params, grads, lr=None, per_example_norm_sums=None, global_batch_size=None):
        lr = self.lr if lr is None else check_number("lr", lr, low=0.0)
        if self.algorithm == "clars" and (per_example_norm_sums is None or not global_batch_size):
            raise ValueError("per_example_norm_sums: CLARS needs each layer's per-example gradient norm sum "
                             "and global_batch_size")
        for name, w in params.items():
            g = grads[name]
            adapt = self.policy.adapts(name, w.shape)
            beta = self.weight_decay if self.policy.decays(name, w.shape) else 0.0   # β
            if self.algorithm == "lamb":
                self._lamb_layer(name, w, g, lr, adapt, beta)
            else:
                pe_sum = None if per_example_norm_sums is None else per_example_norm_sums[name]
                self._lars_layer(name, w, g, lr, adapt, beta, pe_sum, global_batch_size)
            self.trust_ratios[name] = self.layer_lrs[name] / lr if lr > 0 else 1.0

    def _lars_layer(self, name, w, g, lr, adapt, beta, pe_sum, batch):
        v = self.state.setdefault(name, {"momentum_buffer": np.zeros_like(w)})["momentum_buffer"]
        w_norm = _norm(w)                                                       # ‖w‖
        if self.algorithm == "clars":
            g_norm = trust.clars_mean_example_norm(pe_sum, batch)              # (1/B)Σ‖∇f_i‖
        else:
            g_norm = _norm(g)                                                   # ‖∇L(w)‖
        update_norm = _norm(g + beta * w) if self.trust_denominator == NORM_OF_SUM else None
        layer_lr = trust.lars_layer_lr(np, w_norm, g_norm, lr, trust_coefficient=self.trust_coefficient,
                                       weight_decay=beta, eps=self.eps, update_norm=update_norm,
                                       clip=self.clip, adapt=adapt,
                                       excluded_rate=self.policy.excluded_rate)  # γ·λ
        new_w, new_v = trust.lars_momentum_update(w, g, v, layer_lr, momentum=self.momentum,
                                                  weight_decay=beta, nesterov=self.nesterov)
        w[...], v[...] = new_w, new_v                                           # v ← m·v + γλ(g+βw); w ← w − v
        self.layer_lrs[name] = float(layer_lr)

    def _lamb_layer(self, name, w, g, lr, adapt, beta):
        state = self.state.setdefault(name, {"step": 0, "exp_avg": np.zeros_like(w),
                                             "exp_avg_sq": np.zeros_like(w)})
        state["step"] += 1
        beta1, beta2 = self.betas
        m, v = trust.adam_moments(state["exp_avg"], state["exp_avg_sq"], g, beta1, beta2)
        state["exp_avg"][...], state["exp_avg_sq"][...] = m, v
        u = trust.lamb_direction(np, w, m, v, step=state["step"], beta1=beta1, beta2=beta2,
                                 eps=self.eps, weight_decay=beta)              # u = m̂/(√v̂+ε) + βw
        ratio = trust.lamb_trust_ratio(np, _norm(w), _norm(u)) if adapt else 1.0   # ‖w‖/‖u‖
        w[...] = trust.lamb_update(w, u, lr, ratio)                             # w ← w − γ·ratio·u
        self.layer_lrs[name] = float(lr * ratio)
