"""Which parameters get layer-wise adaptation and which get weight decay.

The default: **every tensor is adapted** (a trust ratio each, as Algorithm 1 of the LARS paper
is written), and **tensors with ndim <= 1 (biases, normalisation layers' scale and shift) get no
weight decay** — the LAMB/BERT convention. Measured (docs/benchmarks.md, "Which tensors LARS
leaves unadapted"; bench/exclusion.py; LARS at B=8192, 3 seeds): on a BatchNorm-free CNN the
former default (ndim <= 1 neither adapted nor decayed) reached 86.9 % against 92.5 % for this
one, because LARS's global rate γ is in trust units (10-80 for η = 0.001) and an unadapted bias
receives γ itself; on the same CNN with BatchNorm this one reached 94.7 % against 94.2 %.

Adaptation and decay are separate decisions, each given by a *rule*:

    None           tensors with ndim <= 1
    False          nothing
    True           everything
    "regex"        parameters whose name matches (re.search)
    callable       f(name, shape) -> bool, True to exclude
    list/tuple     excluded if any of the rules says so

A third setting, ``excluded_rate``, says how fast the tensors excluded from adaptation step
under LARS and LARC (:func:`largebatch.trust.lars_layer_lr`):

    "global"       (default) the global rate γ itself: the timm / optax / MLPerf convention
    "trust"        as a layer whose ‖w‖/(‖g‖ + β‖w‖) is 1: γ·η (LARS), min(η, γ) (LARC) — the
                   global rate in the units of an SGD learning rate

The timm / optax / MLPerf convention (ndim <= 1 neither adapted nor decayed, stepping at γ) is
:data:`MLPERF`, ``exclude={"adaptation": None, "decay": None}``. It trains BatchNorm networks; on
a network without normalisation layers it hands the biases γ, which diverges for γ > 1 (LARS and
LARC warn once: :func:`exclusion_warning`). LAMB's excluded tensors take ratio 1 whatever the
rate (its lr is already a per-step rate).

The policy is data. Adapters ask it (``adapts``/``decays``/``excluded_rate``) per parameter;
they never re-implement the decision.
"""
import re

import numpy as np

from .trust import lars_layer_lr

__all__ = ["ParamPolicy", "NDIM_RULE", "EXCLUDED_RATES", "MLPERF", "SGD_SAFE_RATE", "ExclusionWarning",
           "exclusion_warning", "check_spec"]

NDIM_RULE = None                # the rule that excludes tensors with ndim <= 1
DEFAULT_ADAPTATION = False      # every tensor adapted
DEFAULT_DECAY = NDIM_RULE       # no weight decay on biases and normalisation parameters
EXCLUDED_RATES = ("global", "trust")


SPEC_KEYS = ("adaptation", "decay", "rate")
_YAML_RULES = ("expected null (ndim <= 1 excluded), true, false, a regular expression or a list of those, or "
               "a mapping with 'adaptation', 'decay' and/or 'rate'")


def check_spec(exclude, *, yaml: bool = False):
    """The one parser of an ``exclude`` spec: return it checked (rules compiled once to find
    errors), or raise ValueError with one line. ``yaml``: the YAML's forms and wording (no
    callables; the message is the part after ``optimizer.exclude: ``); else the Python API's."""
    if isinstance(exclude, dict):
        unknown = [k for k in exclude if k not in SPEC_KEYS]
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r} in the mapping, expected 'adaptation', 'decay' and/or "
                             f"'rate'" if yaml else f"exclude: unknown key {sorted(unknown)[0]!r}, expected "
                             f"'adaptation', 'decay' and/or 'rate'")
        if "rate" in exclude and exclude["rate"] not in EXCLUDED_RATES:
            raise ValueError(f"rate: expected one of {', '.join(EXCLUDED_RATES)} (how the excluded tensors step: "
                             f"γ·η, or γ as in MLPerf), got {exclude['rate']!r}" if yaml else
                             f"exclude: rate: expected one of {', '.join(map(repr, EXCLUDED_RATES))}, "
                             f"got {exclude['rate']!r}")
        return {k: v if k == "rate" else _check_rule(v, k, yaml) for k, v in exclude.items()}
    return _check_rule(exclude, "exclude_from_adaptation", yaml)


def _check_rule(rule, what, yaml):
    if yaml:
        if rule is None or isinstance(rule, (bool, str, list)):
            if isinstance(rule, str):
                try:
                    re.compile(rule)
                except re.error as err:
                    raise ValueError(f"expected a regular expression, got {rule!r} ({err})") from None
            if isinstance(rule, list):
                return [_check_rule(r, what, yaml) for r in rule]
            return rule
        raise ValueError(f"{_YAML_RULES}, got {rule!r}")
    _compile(rule, what if what.startswith("exclude_from") else f"exclude_from_{what}")
    return rule


def _compile(rule, what):
    if rule is None:
        return lambda name, shape: len(shape) <= 1
    if rule is True or rule is False:
        return lambda name, shape, value=rule: value
    if isinstance(rule, str):
        try:
            pattern = re.compile(rule)
        except re.error as err:
            raise ValueError(f"{what}: invalid regular expression {rule!r} ({err})") from None
        return lambda name, shape: name is not None and pattern.search(name) is not None
    if callable(rule):
        return lambda name, shape: bool(rule(name, tuple(shape)))
    if isinstance(rule, (list, tuple)):
        parts = [_compile(r, what) for r in rule]
        return lambda name, shape: any(p(name, shape) for p in parts)
    raise ValueError(f"{what}: expected None, a bool, a regex string, a callable (name, shape) -> bool "
                     f"or a list of those, got {rule!r}")


class ParamPolicy:
    """Per-tensor decisions: is it adapted (trust ratio), is it decayed (weight decay)?

    >>> p = ParamPolicy()                   # default: all adapted, ndim <= 1 not decayed
    >>> p.adapts("bn1.bias", (64,)), p.decays("bn1.bias", (64,)), p.decays("conv1.weight", (64, 3, 7, 7))
    (True, False, True)
    >>> ParamPolicy.from_spec(MLPERF).adapts("bn1.bias", (64,))
    False
    >>> ParamPolicy(exclude_from_decay=r"\\.bias$").decays("fc.weight", (10, 4))
    True
    """

    def __init__(self, exclude_from_adaptation=DEFAULT_ADAPTATION, exclude_from_decay=DEFAULT_DECAY,
                 excluded_rate="global"):
        if excluded_rate not in EXCLUDED_RATES:
            raise ValueError(f"exclude: rate: expected one of {', '.join(map(repr, EXCLUDED_RATES))}, "
                             f"got {excluded_rate!r}")
        self.exclude_from_adaptation = exclude_from_adaptation
        self.exclude_from_decay = exclude_from_decay
        self.excluded_rate = excluded_rate
        self._no_adapt = _compile(exclude_from_adaptation, "exclude_from_adaptation")
        self._no_decay = _compile(exclude_from_decay, "exclude_from_decay")

    @classmethod
    def from_spec(cls, exclude):
        """Build a policy from an optimizer's ``exclude`` argument.

        ``exclude`` is None (the default policy), a ParamPolicy, one rule applied to both
        decisions, or a dict with the keys ``"adaptation"``, ``"decay"`` (a missing one keeps its
        default: all adapted, ndim <= 1 not decayed) and ``"rate"`` (``excluded_rate``).
        """
        if exclude is None:
            return cls()
        if isinstance(exclude, ParamPolicy):
            return exclude
        if isinstance(exclude, dict):
            check_spec(exclude)
            return cls(exclude.get("adaptation", DEFAULT_ADAPTATION), exclude.get("decay", DEFAULT_DECAY),
                       exclude.get("rate", "global"))
        return cls(exclude, exclude)

    def adapts(self, name, shape):
        """True if the tensor gets a layer-wise trust ratio."""
        return not self._no_adapt(name, tuple(shape))

    def decays(self, name, shape):
        """True if weight decay applies to the tensor."""
        return not self._no_decay(name, tuple(shape))

    def to_spec(self):
        """The dict form :meth:`from_spec` reads back (for configs): rules and rate."""
        return {"adaptation": self.exclude_from_adaptation, "decay": self.exclude_from_decay,
                "rate": self.excluded_rate}

    def __repr__(self):
        return (f"ParamPolicy(exclude_from_adaptation={self.exclude_from_adaptation!r}, "
                f"exclude_from_decay={self.exclude_from_decay!r}, excluded_rate={self.excluded_rate!r})")


# timm / optax / MLPerf's LARS: ndim <= 1 neither adapted nor decayed, stepping at γ itself
MLPERF = {"adaptation": NDIM_RULE, "decay": NDIM_RULE, "rate": "global"}

# An SGD learning rate above this diverged on the BatchNorm-free networks measured
# (docs/benchmarks.md: SGD at B=8192 died at lr 0.8-3.2 and trained at 0.2-0.4)
SGD_SAFE_RATE = 1.0


class ExclusionWarning(UserWarning):
    """LARS/LARC would step excluded tensors at a rate plain SGD does not survive (see
    :func:`exclusion_warning`); the adapters warn with it once per optimizer."""


def exclusion_warning(excluded, lr, *, trust_coefficient, clip=False, excluded_rate="global", normalized=None,
                      optimizer="LARS"):
    """One line when LARS/LARC would step the tensors excluded from adaptation (``excluded``:
    their names) at a rate above :data:`SGD_SAFE_RATE` and the model is not known to have
    normalisation layers (``normalized``: True, False or None for unknown); None otherwise."""
    if not excluded or normalized:
        return None
    rate = float(lars_layer_lr(np, 1.0, 1.0, float(lr), trust_coefficient=trust_coefficient, clip=clip,
                               adapt=False, excluded_rate=excluded_rate))
    if rate <= SGD_SAFE_RATE:
        return None
    shown = ", ".join(excluded[:3]) + (f" and {len(excluded) - 3} more" if len(excluded) > 3 else "")
    seen = "the model has no normalisation layer" if normalized is False else "no normalisation layer was seen"
    return (f"{optimizer}: {len(excluded)} tensor(s) excluded from adaptation ({shown}) step at the global rate "
            f"{rate:g}, where plain SGD diverges without normalisation layers ({seen}); exclude=False (or the "
            f"default) adapts them, exclude={{..., 'rate': 'trust'}} steps them at lr·trust_coefficient "
            f"(YAML: optimizer.exclude)")
