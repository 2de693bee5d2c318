"""Learning-rate schedules and the large-batch scaling rules.

Sources:
- Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour"
  (arXiv 1706.02677): linear scaling rule (§2.1), constant and gradual warmup (§2.2),
  momentum correction (§3, eq. 10), global batch kn (§3).
- You, Gitman, Ginsburg 2017 (arXiv 1708.03888): polynomial decay with power 2.

Every schedule is a pure function of the global step (an int counted from 0, one per optimizer
update); epochs are turned into steps with ``steps_per_epoch``. Schedules are small frozen
dataclasses, callable as ``schedule(step) -> lr``, so they pickle, compare and print well.
"""
import math
from dataclasses import dataclass
from typing import Sequence, Tuple

from .validation import check_choice, check_number, check_positive_int

__all__ = [
    "global_batch_size", "scaled_lr", "momentum_correction",
    "Constant", "GradualWarmup", "ConstantWarmup", "PolynomialDecay", "CosineDecay", "MultiStep",
    "WarmupThen", "build_schedule", "SCALING_RULES", "WARMUPS", "DECAYS",
]

SCALING_RULES = ("linear", "sqrt", "none")
WARMUPS = ("gradual", "constant", "none")
DECAYS = ("poly", "cosine", "multistep", "none")


def global_batch_size(per_worker_batch, workers, accumulation_steps=1):
    """Global batch = per-worker batch × workers × gradient-accumulation steps (Goyal et al. §3, kn)."""
    return (check_positive_int("per_worker_batch", per_worker_batch)
            * check_positive_int("workers", workers)
            * check_positive_int("accumulation_steps", accumulation_steps))


def scaled_lr(base_lr, global_batch, base_batch, rule="linear"):
    """Learning rate for ``global_batch`` given one tuned at ``base_batch``.

    linear: base_lr·B/B₀ (Goyal et al. §2.1: "multiply the learning rate by k");
    sqrt:   base_lr·√(B/B₀) (the alternative Goyal et al. compare against, Table 2c);
    none:   base_lr (LARS-style recipes often tune the global lr directly).
    """
    check_number("base_lr", base_lr, low=0.0)
    check_positive_int("global_batch", global_batch)
    check_positive_int("base_batch", base_batch)
    check_choice("scaling rule", rule, SCALING_RULES)
    k = global_batch / base_batch
    return base_lr * {"linear": k, "sqrt": math.sqrt(k), "none": 1.0}[rule]


def momentum_correction(new_lr, old_lr):
    """Factor to multiply the momentum buffer by when the lr changes from old to new.

    With the lr inside the buffer (v ← m·v + η·g, as in LARS Algorithm 1), a change of η
    leaves the buffer scaled for the old rate; Goyal et al. (§3, eq. 10) multiply it by
    η_{t+1}/η_t. Returns 1 when the old lr is 0 (nothing to correct).
    """
    return 1.0 if old_lr == 0 else new_lr / old_lr


@dataclass(frozen=True)
class Constant:
    """lr(step) = value."""
    value: float

    def __call__(self, step):
        return self.value


@dataclass(frozen=True)
class GradualWarmup:
    """Goyal et al. §2.2 gradual warmup: from ``start`` to ``peak`` linearly over ``steps``
    steps, updated every step; ``peak`` from step ``steps`` on (exactly, no rounding)."""
    start: float
    peak: float
    steps: int

    def __call__(self, step):
        if step >= self.steps:
            return self.peak
        return self.start + (self.peak - self.start) * (step / self.steps)


@dataclass(frozen=True)
class ConstantWarmup:
    """Goyal et al. §2.2 constant warmup: ``low`` for the first ``steps`` steps, then ``peak``."""
    low: float
    peak: float
    steps: int

    def __call__(self, step):
        return self.low if step < self.steps else self.peak


@dataclass(frozen=True)
class PolynomialDecay:
    """peak·(1 − t/T)^power + end·(1 − (1 − t/T)^power) over T = ``steps``, then ``end``.
    power=2 is the LARS paper's schedule."""
    peak: float
    steps: int
    power: float = 2.0
    end: float = 0.0

    def __call__(self, step):
        frac = max(0.0, 1.0 - min(step, self.steps) / self.steps)
        return self.end + (self.peak - self.end) * frac ** self.power


@dataclass(frozen=True)
class CosineDecay:
    """Half-cosine from ``peak`` to ``end`` over ``steps`` steps (Loshchilov & Hutter 2017, no restarts)."""
    peak: float
    steps: int
    end: float = 0.0

    def __call__(self, step):
        frac = min(step, self.steps) / self.steps
        return self.end + 0.5 * (self.peak - self.end) * (1.0 + math.cos(math.pi * frac))


@dataclass(frozen=True)
class MultiStep:
    """``peak``, multiplied by ``factor`` at each milestone step (Goyal et al.: ÷10 at epochs 30, 60, 80)."""
    peak: float
    milestones: Tuple[int, ...]
    factor: float = 0.1

    def __call__(self, step):
        return self.peak * self.factor ** sum(step >= m for m in self.milestones)


@dataclass(frozen=True)
class WarmupThen:
    """``warmup`` for the first ``warmup_steps`` steps, then ``decay(step − warmup_steps)``."""
    warmup: object
    decay: object
    warmup_steps: int

    def __call__(self, step):
        if step < self.warmup_steps:
            return self.warmup(step)
        return self.decay(step - self.warmup_steps)


def build_schedule(*, peak_lr, steps_per_epoch, epochs, warmup="gradual", warmup_epochs=0.0,
                   warmup_start_lr=None, decay="poly", power=2.0, end_lr=0.0,
                   milestones: Sequence[float] = (), factor=0.1):
    """The large-batch recipe's schedule as one callable ``lr(step)``.

    ``peak_lr`` is the scaled lr (see :func:`scaled_lr`); warmup starts at ``warmup_start_lr``
    (default peak/​warmup-steps-worth: Goyal et al. start at the small-batch lr η, pass it) and
    lasts ``warmup_epochs``; decay ('poly' | 'cosine' | 'multistep' | 'none') runs over the
    remaining steps. Multistep ``milestones`` are absolute epochs, as papers state them.
    """
    check_number("peak_lr", peak_lr, low=0.0)
    check_positive_int("steps_per_epoch", steps_per_epoch)
    check_number("epochs", epochs, low=0.0, low_open=True)
    check_choice("warmup", warmup, WARMUPS)
    check_choice("decay", decay, DECAYS)
    check_number("warmup_epochs", warmup_epochs, low=0.0)
    total_steps = max(1, round(epochs * steps_per_epoch))
    warmup_steps = 0 if warmup == "none" else round(warmup_epochs * steps_per_epoch)
    if warmup_steps >= total_steps and warmup != "none":
        raise ValueError(f"warmup_epochs: expected fewer than epochs ({epochs:g}), got {warmup_epochs:g}")
    decay_steps = total_steps - warmup_steps
    if decay == "poly":
        check_number("power", power, low=0.0, low_open=True)
        after = PolynomialDecay(peak_lr, decay_steps, power, end_lr)
    elif decay == "cosine":
        after = CosineDecay(peak_lr, decay_steps, end_lr)
    elif decay == "multistep":
        steps = tuple(round(m * steps_per_epoch) - warmup_steps for m in milestones)
        after = MultiStep(peak_lr, steps, check_number("factor", factor, low=0.0, low_open=True, high=1.0))
    else:
        after = Constant(peak_lr)
    if warmup_steps == 0:
        return after
    start = peak_lr / warmup_steps if warmup_start_lr is None else check_number(
        "warmup_start_lr", warmup_start_lr, low=0.0)
    first = GradualWarmup(start, peak_lr, warmup_steps) if warmup == "gradual" else \
        ConstantWarmup(start, peak_lr, warmup_steps)
    return WarmupThen(first, after, warmup_steps)
