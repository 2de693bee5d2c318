"""Argument checks shared by the core, the reference and both adapters.

Every error is a ValueError whose one-line message names the argument, the accepted range
and the value received, e.g. ``momentum: expected a number in [0, 1), got 1.5``.
"""
import math
import numbers

from .registry import HYPERPARAMETERS, TRUST_DENOMINATORS

__all__ = ["check_number", "check_one_element", "check_choice", "check_positive_int", "check_hyperparameters",
           "check_beta", "TRUST_DENOMINATORS"]


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_number(name, value, *, low=None, high=None, low_open=False, high_open=False):
    """Return ``float(value)`` if it is a finite real number inside the interval, else raise.

    ``low_open``/``high_open`` make the bound exclusive. Arrays and tensors holding one number
    (a learning-rate tensor of shape (), (1,) or (1, 1), say) are accepted, as ``torch.optim``
    accepts them; one of more elements is refused (:func:`check_one_element`).
    """
    if not _is_number(value):
        shape = getattr(value, "shape", None)
        if shape is not None:
            check_one_element(name, tuple(shape))
        try:
            if shape is None:                   # neither a number nor an array: True, "0.1", ...
                raise TypeError
            value = value.item() if hasattr(value, "item") else float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected a number{_interval(low, high, low_open, high_open)}, "
                             f"got {value!r}") from None
    value = float(value)
    bad = math.isnan(value) or math.isinf(value)
    bad = bad or (low is not None and (value <= low if low_open else value < low))
    bad = bad or (high is not None and (value >= high if high_open else value > high))
    if bad:
        raise ValueError(f"{name}: expected a number{_interval(low, high, low_open, high_open)}, got {value!r}")
    return value


def check_one_element(name, shape):
    """Refuse an array or tensor of ``shape`` as one number unless it holds exactly one element
    (any number of size-1 dimensions), with ``torch.optim``'s wording for a tensor lr."""
    if math.prod(int(d) for d in shape) != 1:
        raise ValueError(f"{name}: Tensor {name} must be 1-element, got shape {tuple(int(d) for d in shape)}")


def _interval(low, high, low_open, high_open):
    if low is None and high is None:
        return ""
    if high is None:
        return f" {'>' if low_open else '>='} {low:g}"
    if low is None:
        return f" {'<' if high_open else '<='} {high:g}"
    return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_choice(name, value, choices):
    """Return ``value`` if it is one of ``choices``, else raise naming them all."""
    if value not in choices:
        accepted = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name}: expected one of {accepted}, got {value!r}")
    return value


def check_positive_int(name, value, *, allow_zero=False):
    """Return ``value`` if it is an int > 0 (or >= 0), else raise."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}: expected an integer {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return int(value)


def check_hyperparameters(*, lr=None, momentum=None, weight_decay=None, trust_coefficient=None,
                          eps=None, trust_denominator=None, betas=None, lr_name="lr"):
    """Check the optimizer hyper-parameters every algorithm shares; ``None`` means not used.

    The adapters call this once in their constructors, so a bad value fails before any step.
    """
    if lr is not None and not callable(lr):
        check_number(lr_name, lr, low=0.0)
    for name, value in (("momentum", momentum), ("weight_decay", weight_decay),
                        ("trust_coefficient", trust_coefficient), ("eps", eps)):
        if value is not None:
            check_number(name, value, **HYPERPARAMETERS[name].bounds)
    if trust_denominator is not None:
        check_choice("trust_denominator", trust_denominator, TRUST_DENOMINATORS)
    if betas is not None:
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas: expected a pair (beta_1, beta_2), got {betas!r}")
        check_beta("betas[0]", betas[0])
        check_beta("betas[1]", betas[1])


def check_beta(name, value):
    """An Adam/LAMB moment decay: a number within the registry's bounds for betas ([0, 1))."""
    return check_number(name, value, **HYPERPARAMETERS["betas"].bounds)
