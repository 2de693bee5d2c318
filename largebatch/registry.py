"""The optimizer registry: one entry per optimizer, read by everything that names one.

An entry says what an optimizer is called, which class implements it in each framework (as an
import path, so the core imports no framework), the hyper-parameters it takes with their
defaults, the options it fixes (LARC is LARS with ``clip=True``), whether its momentum buffer
holds the learning rate (then a changing lr needs momentum correction, Goyal et al. 2017 eq. 10),
and the rules that tie its hyper-parameters together. The YAML schema, the NumPy reference, the
adapters' argument checks, both runners, the Keras lr callback and the docs' key table all read
it; adding an optimizer means one entry here plus its kernels.

Hyper-parameters are defined once, with their bounds, in :data:`HYPERPARAMETERS`: the config
checks YAML values against them and the adapters check constructor arguments against them.

    >>> get("larc").fixed
    {'clip': True}
    >>> [name for name, info in OPTIMIZERS.items() if info.holds_lr("keras")]
    ['sgd', 'lars', 'larc', 'clars']
    >>> [name for name, info in OPTIMIZERS.items() if info.holds_lr("torch")]    # torch's SGD keeps lr outside
    ['lars', 'larc', 'clars']
    >>> get("lamb").default("eps"), get("lars").default("eps")
    (1e-06, 0.0)
"""
from dataclasses import dataclass, field

__all__ = ["Hyperparameter", "Constraint", "OptimizerInfo", "HYPERPARAMETERS", "OPTIMIZERS", "get", "names",
           "for_framework", "class_paths", "TRUST_DENOMINATORS", "SUM_OF_NORMS", "NORM_OF_SUM", "TRUST_COEFFICIENT", "LARS_EPS", "LAMB_EPS",
           "MOMENTUM", "BETAS", "check_constraints"]

SUM_OF_NORMS, NORM_OF_SUM = "sum_of_norms", "norm_of_sum"     # ‖g‖ + β‖w‖ (the paper's), ‖g + βw‖
TRUST_DENOMINATORS = (SUM_OF_NORMS, NORM_OF_SUM)
TRUST_COEFFICIENT = 0.001      # η of the LARS paper (You, Gitman, Ginsburg 2017, §3)
MOMENTUM = 0.9
LARS_EPS = 0.0                 # the paper's denominator has no ε
LAMB_EPS = 1e-6                # You et al. 2019, Algorithm 2 (ε = 1e-6)
BETAS = (0.9, 0.999)


@dataclass(frozen=True)
class Hyperparameter:
    """One hyper-parameter: its kind, default and accepted interval (or choices).

    ``kind``: 'number' (bounds apply), 'bool', 'choice', 'betas' (a pair, each within the bounds) or 'exclude'
    (a :class:`largebatch.policy.ParamPolicy` spec). ``default`` None: each optimizer entry
    supplies it (eps), or null is a value of its own (exclude)."""
    name: str
    kind: str
    default: object = None
    low: float = None
    high: float = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    doc: str = ""

    @property
    def bounds(self):
        """Keyword arguments for :func:`largebatch.validation.check_number`."""
        return dict(low=self.low, high=self.high, low_open=self.low_open, high_open=self.high_open)


HYPERPARAMETERS = {hp.name: hp for hp in (
    Hyperparameter("momentum", "number", MOMENTUM, low=0.0, high=1.0, high_open=True, doc="m"),
    Hyperparameter("weight_decay", "number", 0.0, low=0.0, doc="β"),
    Hyperparameter("trust_coefficient", "number", TRUST_COEFFICIENT, low=0.0, low_open=True, doc="η"),
    Hyperparameter("eps", "number", None, low=0.0, doc="default 0 (LARS family), 1e-6 (LAMB)"),
    Hyperparameter("trust_denominator", "choice", SUM_OF_NORMS, choices=TRUST_DENOMINATORS),
    Hyperparameter("nesterov", "bool", False),
    Hyperparameter("betas", "betas", list(BETAS), low=0.0, high=1.0, high_open=True, doc="each of the pair"),
    Hyperparameter("exclude", "exclude", None, doc="null: every tensor adapted, ndim <= 1 (biases, BN) not decayed"),
)}


@dataclass(frozen=True)
class Constraint:
    """A rule across hyper-parameters. ``violated(hp)`` takes a dict of values; the message
    templates (``str.format`` over the same dict) are the adapters' (argument names) and the
    config's (YAML keys)."""
    key: str
    violated: object
    api_message: str
    config_message: str


_NESTEROV = Constraint(
    "nesterov", lambda hp: bool(hp["nesterov"]) and hp["momentum"] <= 0,
    "nesterov: needs momentum > 0, got momentum={momentum}",
    "optimizer.nesterov: needs optimizer.momentum > 0, got momentum {momentum:g}")
_CLARS_DENOMINATOR = Constraint(
    "trust_denominator", lambda hp: hp["trust_denominator"] != SUM_OF_NORMS,
    "trust_denominator: CLARS defines its own denominator, expected 'sum_of_norms', got {trust_denominator!r}",
    "optimizer.trust_denominator: CLARS uses the mean per-example gradient norm; expected 'sum_of_norms', "
    "got {trust_denominator!r}")


@dataclass(frozen=True)
class OptimizerInfo:
    """One optimizer. ``torch``/``keras``: 'module:attribute' of the class, None when the
    framework has none. ``reference``: the NumPy reference's algorithm name, None when the
    reference does not model it (plain SGD is the frameworks' own)."""
    name: str
    summary: str
    keys: tuple
    torch: str = None
    keras: str = None
    defaults: dict = field(default_factory=dict)      # per-optimizer defaults over HYPERPARAMETERS'
    fixed: dict = field(default_factory=dict)         # constructor options this name implies
    lr_in_buffer: tuple = ()                           # frameworks whose momentum buffer holds γ_t
    reference: str = None
    constraints: tuple = ()
    layerwise: bool = True                            # a trust ratio per layer (False: the frameworks' SGD)
    per_example_norms: bool = False                   # needs Σ_i ‖∇_l f_i‖ over the global batch (CLARS)

    def holds_lr(self, framework):
        """True when ``framework``'s momentum buffer for this optimizer holds the learning rate
        (v ← m·v + γ·g): a changing lr then needs momentum correction (Goyal et al. eq. 10)."""
        return framework in self.lr_in_buffer

    def default(self, key):
        return self.defaults[key] if key in self.defaults else HYPERPARAMETERS[key].default

    def hyperparameters(self, values=None):
        """Every key this optimizer takes, from ``values`` or its default."""
        values = values or {}
        return {k: values[k] if values.get(k) is not None else self.default(k) for k in self.keys}

    def violations(self, values, *, config=False):
        """The messages of the constraints ``values`` break (config keys or argument names)."""
        return [(c.config_message if config else c.api_message).format(**values)
                for c in self.constraints if c.violated(values)]


_BOTH = ("torch", "keras")
_LARS_KEYS = ("momentum", "weight_decay", "trust_coefficient", "eps", "trust_denominator", "nesterov", "exclude")

OPTIMIZERS = {info.name: info for info in (
    OptimizerInfo("sgd", "SGD with momentum (the frameworks' own; weight decay off excluded tensors)",
                  ("momentum", "weight_decay", "nesterov", "exclude"),
                  torch="torch.optim:SGD", keras="keras.optimizers:SGD", lr_in_buffer=("keras",),
                  constraints=(_NESTEROV,), layerwise=False),
    OptimizerInfo("lars", "LARS, You, Gitman, Ginsburg 2017, Algorithm 1", _LARS_KEYS,
                  torch="largebatch.torch:LARS", keras="largebatch.keras:LARS", defaults={"eps": LARS_EPS},
                  lr_in_buffer=_BOTH, reference="lars", constraints=(_NESTEROV,)),
    OptimizerInfo("larc", "LARC: LARS with the local lr clipped at the global one", _LARS_KEYS,
                  torch="largebatch.torch:LARS", keras="largebatch.keras:LARS", defaults={"eps": LARS_EPS},
                  fixed={"clip": True}, lr_in_buffer=_BOTH, reference="larc", constraints=(_NESTEROV,)),
    OptimizerInfo("lamb", "LAMB, You et al. 2019, Algorithm 2", ("weight_decay", "betas", "eps", "exclude"),
                  torch="largebatch.torch:LAMB", keras="largebatch.keras:LAMB", defaults={"eps": LAMB_EPS},
                  reference="lamb"),
    OptimizerInfo("clars", "CLARS: LARS over the mean per-example gradient norm, Huo, Gu, Huang 2020", _LARS_KEYS,
                  torch="largebatch.torch:CLARS", keras="largebatch.keras:CLARS", defaults={"eps": LARS_EPS},
                  lr_in_buffer=_BOTH, reference="clars", constraints=(_NESTEROV, _CLARS_DENOMINATOR),
                  per_example_norms=True),
)}


def names():
    return tuple(OPTIMIZERS)


def get(name):
    """The entry for ``name``; a one-line ValueError naming the known ones otherwise."""
    try:
        return OPTIMIZERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"optimizer: expected one of {', '.join(map(repr, OPTIMIZERS))}, got {name!r}") from None


def for_framework(framework):
    """Names of the optimizers ``framework`` ('torch' | 'keras') implements."""
    return tuple(n for n, info in OPTIMIZERS.items() if getattr(info, framework))


def class_paths(framework, *, lr_in_buffer=None):
    """The 'module:attribute' class paths of ``framework``'s optimizers, each once; with
    ``lr_in_buffer`` True/False only those whose momentum buffer does/does not hold the lr.
    The caller (an adapter or a runner) imports them: the core imports no framework."""
    paths = [getattr(i, framework) for i in OPTIMIZERS.values()
             if getattr(i, framework) and (lr_in_buffer is None or i.holds_lr(framework) == lr_in_buffer)]
    return tuple(dict.fromkeys(paths))


def check_constraints(name, values):
    """Raise the first constraint ``values`` (argument names) break for optimizer ``name``."""
    broken = get(name).violations(values)
    if broken:
        raise ValueError(broken[0])
