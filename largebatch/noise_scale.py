"""The gradient noise scale and what it says about the batch size.

McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training"
(arXiv 1812.06162). With G the true gradient and Σ the per-example gradient covariance, the
simple noise scale is

    B_simple = tr(Σ) / |G|²                                                   (§2.2, eq. 2.7)

A gradient averaged over B examples has E|g_B|² = |G|² + tr(Σ)/B. Two batch sizes, B_small
(one rank's batch, or one micro-batch) and B_big (the global batch), give the unbiased
estimators of Appendix A (eqs. A.2, A.3):

    |G|² ≈ (B_big |g_big|² - B_small |g_small|²) / (B_big - B_small)
    tr(Σ) ≈ (|g_small|² - |g_big|²) / (1/B_small - 1/B_big)

Each is noisy, so each is smoothed with an exponential moving average and the ratio is taken
after smoothing, as the paper does (Appendix A.1). Data-parallel training has both gradients
for the price of one scalar reduction: every rank's local squared norm before the allreduce,
and the averaged gradient's after it.

The paper's model of training (§2.3, eq. 2.11, with B_crit ≈ B_simple): to reach a given loss,
steps S and examples E trade off as (S/S_min - 1)(E/E_min - 1) = 1 with E = B·S, so at batch B

    S/S_min = 1 + B_noise/B,       E/E_min = 1 + B/B_noise.

AdaScale SGD (Johnson, Agrawal, Gu, Guestrin 2020, arXiv 2007.05105, eq. 3) uses the same two
quantities: at S times the base batch B_0, with σ² = tr(Σ)/B_0 the variance of a base-batch
gradient, the gain

    r = (σ² + |G|²) / (σ²/S + |G|²),        1 ≤ r ≤ S,

multiplies the base run's learning rate, and the schedule advances r base iterations per step.

Pure Python: the framework adapters hand in floats.
"""
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

__all__ = ["unbiased_estimates", "NoiseScale", "batch_tradeoff", "adascale_gain", "AdaScaleClock", "DEFAULT_DECAY"]

DEFAULT_DECAY = 0.99          # EMA factor per update: about the last 100 updates


def unbiased_estimates(small_sq: float, big_sq: float, b_small: float, b_big: float) -> Tuple[float, float]:
    """(|G|², tr(Σ)) from the squared norms of a gradient over ``b_small`` examples and one over
    ``b_big`` examples (McCandlish et al. 2018, eqs. A.2, A.3). Either may come out negative on
    one step: only their averages are meaningful."""
    if not b_big > b_small > 0:
        raise ValueError(f"expected 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g2, trace


@dataclass
class NoiseScale:
    """Exponential moving averages of |G|² and tr(Σ) and their ratio, B_simple.

    ``update`` takes one update's squared norms; ``value`` is the smoothed B_simple (None until
    the smoothed |G|² is positive). The averages start at zero; both carry the same start-up
    bias, which cancels in the ratio."""
    decay: float = DEFAULT_DECAY
    g2: float = 0.0
    trace: float = 0.0
    updates: int = 0

    def __post_init__(self):
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay: expected a number in [0, 1), got {self.decay!r}")

    def update(self, small_sq: float, big_sq: float, b_small: float, b_big: float) -> Optional[float]:
        g2, trace = unbiased_estimates(small_sq, big_sq, b_small, b_big)
        if not (math.isfinite(g2) and math.isfinite(trace)):
            return self.value                         # a non-finite step leaves the averages alone
        self.g2 = self.decay * self.g2 + (1.0 - self.decay) * g2
        self.trace = self.decay * self.trace + (1.0 - self.decay) * trace
        self.updates += 1
        return self.value

    @property
    def value(self) -> Optional[float]:
        """The smoothed B_simple = EMA(tr Σ) / EMA(|G|²), or None while that is not defined."""
        if self.updates == 0 or not self.g2 > 0.0:
            return None
        return self.trace / self.g2

    def state_dict(self) -> Dict[str, float]:
        return {"decay": self.decay, "g2": self.g2, "trace": self.trace, "updates": self.updates}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.decay, self.g2, self.trace = float(state["decay"]), float(state["g2"]), float(state["trace"])
        self.updates = int(state["updates"])


def batch_tradeoff(noise_scale: float, batch: float) -> Tuple[float, float]:
    """(S/S_min, E/E_min): the steps and the examples to reach a given loss at ``batch``,
    relative to their minima (McCandlish et al. 2018, eq. 2.11, B_crit ≈ B_simple)."""
    if not (noise_scale > 0 and batch > 0):
        raise ValueError(f"expected a noise scale and a batch > 0, got {noise_scale!r} and {batch!r}")
    return 1.0 + noise_scale / batch, 1.0 + batch / noise_scale


def adascale_gain(trace: float, g2: float, base_batch: float, scale: float) -> float:
    """AdaScale's gain r at ``scale`` times ``base_batch`` (Johnson et al. 2020, eq. 3), with
    σ² = tr(Σ)/base_batch; clipped to [1, scale] (the bounds the paper proves for the exact values,
    which noisy estimates can leave)."""
    if scale <= 1.0:
        return 1.0
    sigma2 = max(trace, 0.0) / base_batch
    g2 = max(g2, 0.0)
    if sigma2 + g2 == 0.0:
        return 1.0
    r = (sigma2 + g2) / (sigma2 / scale + g2)
    return min(max(r, 1.0), scale)


@dataclass
class AdaScaleClock:
    """AdaScale's progress in scale-invariant iterations (Johnson et al. 2020, Algorithm 1).

    At S = ``scale`` times the base batch, update t uses ``gain(noise)`` × the base run's rate at
    iteration τ_t, then τ_{t+1} = τ_t + r_t; the run is over when τ reaches ``base_steps`` (the
    base run's iterations), so it takes between base_steps/S updates (r = S, pure noise: linear
    scaling) and base_steps (r = 1, no noise: a larger batch buys nothing)."""
    scale: float
    base_steps: float
    base_batch: float
    tau: float = 0.0
    updates: int = 0
    gain_sum: float = 0.0
    last_gain: float = 1.0

    def gain(self, noise: Optional[NoiseScale]) -> float:
        """r_t from the smoothed |G|² and tr(Σ) (1 until there is an estimate)."""
        if noise is None or noise.updates == 0:
            r = 1.0
        else:
            r = adascale_gain(noise.trace, noise.g2, self.base_batch, self.scale)
        self.last_gain = r
        return r

    def advance(self) -> None:
        self.tau += self.last_gain
        self.updates += 1
        self.gain_sum += self.last_gain

    @property
    def done(self) -> bool:
        return self.tau >= self.base_steps - 1e-9

    @property
    def mean_gain(self) -> Optional[float]:
        return self.gain_sum / self.updates if self.updates else None

    def state_dict(self) -> Dict[str, float]:
        return {"tau": self.tau, "updates": self.updates, "gain_sum": self.gain_sum, "last_gain": self.last_gain}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.tau, self.updates = float(state["tau"]), int(state["updates"])
        self.gain_sum, self.last_gain = float(state["gain_sum"]), float(state["last_gain"])
