"""A small schema library: field checks that normalise a YAML value or say in one line what
was expected, and :class:`F`, a schema leaf (check, default, nullable, where it applies).

Each check takes ``(key, value)`` and returns the normalised value or raises :class:`_Bad` with
the part of the message after ``key: ``.
"""
import difflib
import math
import re
import shlex

from .. import hostfile as _hostfile
from ..validation import check_number
from ..policy import check_spec

class ConfigError(ValueError):
    """Invalid experiment: ``problems`` holds one line per problem."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class _Bad(Exception):
    """A field check failed; the message is the part after ``key: ``."""


_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _numeric_string(value):
    # PyYAML reads 5e-4 (no dot) as a string; accept it as the number it obviously is.
    if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
        return float(value)
    return value


def _strip(key, err):
    msg = str(err)
    return msg[len(key) + 2:] if msg.startswith(key + ": ") else msg


def number(low=None, high=None, low_open=False, high_open=False):
    def check(key, value):
        try:
            return check_number(key, _numeric_string(value), low=low, high=high, low_open=low_open,
                                high_open=high_open)
        except ValueError as err:
            raise _Bad(_strip(key, err)) from None
    return check


def integer(low=1, high=None):
    def check(key, value):
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and value >= low and (high is None or value <= high):
            return value
        if high is not None:
            raise _Bad(f"expected an integer in [{low}, {high}], got {value!r}")
        raise _Bad(f"expected an integer {'> 0' if low == 1 else f'>= {low}'}, got {value!r}")
    return check


def auto_integer(key, value):
    """'auto' (or null) -> None, else an integer > 0."""
    if value is None or value == "auto":
        return None
    ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    if not ok:
        raise _Bad(f"expected an integer > 0 or 'auto', got {value!r}")
    return value


def boolean(key, value):
    if isinstance(value, bool):
        return value
    raise _Bad(f"expected true or false, got {value!r}")


def string(key, value):
    if isinstance(value, str) and value.strip():
        return value
    raise _Bad(f"expected a non-empty string, got {value!r}")


def factory_ref(key, value):
    """``"pkg.module:callable"`` or ``"path/to/file.py:callable"``: a callable named by where it lives."""
    if isinstance(value, str) and value.count(":") >= 1:
        where, _, attr = value.rpartition(":")
        if where.strip() and attr.strip().isidentifier():
            return value.strip()
    raise _Bad(f"expected 'pkg.module:callable' or 'path/to/file.py:callable', got {value!r}")


def keyword_args(key, value):
    """A mapping of keyword arguments (names that are Python identifiers)."""
    if not isinstance(value, dict):
        raise _Bad(f"expected a mapping of keyword arguments (name: value), got {value!r}")
    for k in value:
        if not isinstance(k, str) or not k.isidentifier():
            raise _Bad(f"expected keyword argument names, got {k!r}")
    return dict(value)


def text(key, value):
    if isinstance(value, str):
        return value
    raise _Bad(f"expected a string, got {value!r}")


def choice(options):
    def check(key, value):
        if value in options:
            return value
        hint = ""
        if isinstance(value, str):
            same_letters = [o for o in options if isinstance(o, str) and o.lower() == value.lower()]
            close = same_letters or difflib.get_close_matches(value, options, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _Bad(f"expected one of {', '.join(repr(o) for o in options)}, got {value!r}{hint}")
    return check


def milestones(key, value):
    if not isinstance(value, list):
        raise _Bad(f"expected a list of epochs (numbers > 0), got {value!r}")
    out = []
    for v in value:
        v = _numeric_string(v)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            raise _Bad(f"expected a list of epochs (numbers > 0), got {value!r}")
        out.append(v)
    if out != sorted(out) or len(set(out)) != len(out):
        raise _Bad(f"expected increasing epochs, got {value!r}")
    return out


def betas(low=None, high=None, low_open=False, high_open=False):
    """A pair [beta_1, beta_2], each a number within the bounds (the registry's)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def check(key, value):
        bad = _Bad(f"expected a pair [beta_1, beta_2] of numbers in {interval}, got {value!r}")
        if not isinstance(value, list) or len(value) != 2:
            raise bad
        out = []
        for v in value:
            try:
                out.append(float(check_number(key, _numeric_string(v), low=low, high=high, low_open=low_open,
                                              high_open=high_open)))
            except ValueError:
                raise bad from None
        return out
    return check


def exclude(key, value):
    """The optimizer's ``exclude`` as in the Python API, checked by the policy's own parser
    (:func:`largebatch.policy.check_spec`, YAML forms)."""
    try:
        return check_spec(value, yaml=True)
    except ValueError as err:
        raise _Bad(str(err)) from None


def env_mapping(key, value):
    if not isinstance(value, dict):
        raise _Bad(f"expected a mapping of environment variables (NAME: value), got {value!r}")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            raise _Bad(f"expected environment variable names, got {k!r}")
        if isinstance(v, (dict, list)) or v is None:
            raise _Bad(f"expected a string or number for {k}, got {v!r}")
        out[k] = str(v).lower() if isinstance(v, bool) else str(v)
    return out


def args_list(key, value):
    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError as err:
            raise _Bad(f"expected shell-quoted arguments, got {value!r} ({err})") from None
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
        return [str(v) for v in value]
    raise _Bad(f"expected a string or a list of arguments, got {value!r}")


def hosts(key, value):
    try:
        return [str(h) for h in _hostfile.parse_hosts(value)]
    except ValueError as err:
        raise _Bad(str(err)) from None


class When:
    """Where a key applies. ``applies(cfg)`` is true where it does; a key set where it does not
    is refused with ``message(cfg)`` (the part after ``key: ``), and with ``drop`` the resolved
    configuration leaves it out there. One definition serves both."""

    def __init__(self, applies, message, drop=True):
        self.applies, self.message, self.drop = applies, message, drop


class F:
    """A leaf of the schema: a check, a default, whether null is accepted, where it applies."""

    def __init__(self, check, default=None, nullable=False, doc="", when=None):
        self.check, self.default, self.nullable, self.doc, self.when = check, default, nullable, doc, when

    def __call__(self, key, value):
        if value is None:
            if self.nullable:
                return None
            # null for a key with a default means "use the default"
            return self.default
        return self.check(key, value)
