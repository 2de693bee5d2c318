"""Which parameters get layer-wise adaptation and which get weight decay.

The LARS paper adapts every layer; in practice (TF Model Garden, optax, timm, NVIDIA's
recipes) biases and BatchNorm scale/shift — tensors with ndim <= 1 — are excluded from both
adaptation and weight decay. That is the default here. Adaptation and decay are separate
decisions, each given by a *rule*:

    None           the default rule: exclude tensors with ndim <= 1
    False          exclude nothing
    True           exclude everything
    "regex"        exclude parameters whose name matches (re.search)
    callable       f(name, shape) -> bool, True to exclude
    list/tuple     exclude if any of the rules does

The policy is data. Adapters ask it (``adapts``/``decays``) per parameter; they never
re-implement the decision.
"""
import re

__all__ = ["ParamPolicy", "DEFAULT_RULE"]

DEFAULT_RULE = None


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

    >>> p = ParamPolicy()                   # default: ndim <= 1 excluded from both
    >>> p.adapts("conv1.weight", (64, 3, 7, 7)), p.decays("bn1.bias", (64,))
    (True, False)
    >>> ParamPolicy(exclude_from_decay=r"\\.bias$").decays("fc.weight", (10, 4))
    True
    """

    def __init__(self, exclude_from_adaptation=DEFAULT_RULE, exclude_from_decay=DEFAULT_RULE):
        self.exclude_from_adaptation = exclude_from_adaptation
        self.exclude_from_decay = exclude_from_decay
        self._no_adapt = _compile(exclude_from_adaptation, "exclude_from_adaptation")
        self._no_decay = _compile(exclude_from_decay, "exclude_from_decay")

    @classmethod
    def from_spec(cls, exclude):
        """Build a policy from an optimizer's ``exclude`` argument.

        ``exclude`` is a ParamPolicy, one rule applied to both decisions, or a dict with the
        keys ``"adaptation"`` and/or ``"decay"`` (a missing key takes the default rule).
        """
        if isinstance(exclude, ParamPolicy):
            return exclude
        if isinstance(exclude, dict):
            unknown = set(exclude) - {"adaptation", "decay"}
            if unknown:
                raise ValueError(f"exclude: unknown key {sorted(unknown)[0]!r}, expected 'adaptation' and/or 'decay'")
            return cls(exclude.get("adaptation", DEFAULT_RULE), exclude.get("decay", DEFAULT_RULE))
        return cls(exclude, exclude)

    def adapts(self, name, shape):
        """True if the tensor gets a layer-wise trust ratio."""
        return not self._no_adapt(name, tuple(shape))

    def decays(self, name, shape):
        """True if weight decay applies to the tensor."""
        return not self._no_decay(name, tuple(shape))

    def __repr__(self):
        return (f"ParamPolicy(exclude_from_adaptation={self.exclude_from_adaptation!r}, "
                f"exclude_from_decay={self.exclude_from_decay!r})")
