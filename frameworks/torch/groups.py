"""Param groups from a model, using the core's parameter policy, and the registry's optimizers by name."""
import importlib

import torch

from largebatch import registry
from largebatch.policy import ParamPolicy

__all__ = ["param_groups", "create_optimizer", "normalization_parameters"]

# layers whose parameters are a normalisation's scale and shift (BatchNorm, InstanceNorm, GroupNorm,
# LayerNorm, RMSNorm)
NORMALIZATION_LAYERS = tuple(t for t in (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm,
                                         torch.nn.LayerNorm, getattr(torch.nn, "RMSNorm", None)) if t is not None)

# what every torch optimizer of the registry takes besides its registry keys
_COMMON = ("lr",)
# what largebatch's own (layer-wise) torch optimizers take besides those
_LAYERWISE = ("foreach", "fused", "track_trust_ratios")


def param_groups(model, exclude=None, **group_options):
    """One named param group holding every trainable parameter of ``model``.

    The group carries the parameter names, so name regexes in ``exclude`` work, and the
    policy (default: every tensor adapted, ndim <= 1 not decayed) is applied per tensor by
    the optimizer. ``normalization_layers`` records whether the model has any (LARS's warning
    about excluded tensors at a large global rate needs to know). Extra keyword arguments
    become group options (lr, weight_decay, ...).

        optimizer = LARS(param_groups(model, exclude={"decay": r"bn|bias"}), lr=2.0)
    """
    ParamPolicy.from_spec(exclude)                 # fail here on a malformed rule
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [dict(params=[p for _, p in named], param_names=[n for n, _ in named], exclude=exclude,
                 normalization_layers=bool(normalization_parameters(model)), **group_options)]


def normalization_parameters(model):
    """Names of ``model``'s parameters that belong to normalisation layers."""
    return {f"{prefix}.{n}" if prefix else n for prefix, module in model.named_modules()
            if isinstance(module, NORMALIZATION_LAYERS) for n, _ in module.named_parameters(recurse=False)}


def create_optimizer(name, params_or_model, **hyper):
    """The registry's torch optimizer ``name`` (``largebatch.registry.names()``: 'sgd', 'lars',
    'larc', 'lamb', 'clars') with the options the name fixes (larc: ``clip=True``).

    ``params_or_model``: a ``torch.nn.Module`` (its trainable parameters, named, so name regexes
    in ``exclude`` work) or what the optimizer's ``params`` takes. ``hyper``: ``lr`` and the
    registry's keys for ``name`` (``momentum``, ``weight_decay``, ``exclude``, ...), plus
    ``foreach``, ``fused``, ``track_trust_ratios`` for largebatch's own optimizers; a key the
    optimizer does not take is refused in one line. 'sgd' is ``torch.optim.SGD`` with weight decay
    only on the tensors the ``exclude`` policy decays (default: not on ndim <= 1).

        optimizer = create_optimizer("lars", model, lr=2.0, weight_decay=5e-4)
    """
    info = registry.get(name)
    if info.torch is None:
        raise ValueError(f"optimizer: {name!r} has no torch implementation")
    allowed = _COMMON + info.keys + (_LAYERWISE if info.layerwise else ())
    unknown = sorted(set(hyper) - set(allowed))
    if unknown:
        raise ValueError(f"{unknown[0]}: not an argument of {name!r} in torch; expected one of {', '.join(allowed)}")
    module, _, attr = info.torch.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if "betas" in hyper:
        hyper["betas"] = tuple(hyper["betas"])
    exclude = hyper.pop("exclude", None)
    if isinstance(params_or_model, torch.nn.Module) and info.layerwise:
        return cls(param_groups(params_or_model, exclude=exclude), **hyper, **info.fixed)
    named = _named(params_or_model)
    if named is None:                       # param groups: as given, with their own options
        if not info.layerwise:
            if exclude is not None:
                raise ValueError("exclude: 'sgd' applies it to a model or to parameters, not to param groups "
                                 "(give each group its weight_decay instead)")
            return cls(params_or_model, **hyper)
        return cls(params_or_model, exclude=exclude, **hyper, **info.fixed)
    if not info.layerwise:
        return cls(_decay_groups(named, exclude, hyper.pop("weight_decay", 0.0)), **hyper)
    group = dict(params=[p for _, p in named])
    if all(n is not None for n, _ in named):
        group["param_names"] = [n for n, _ in named]
    return cls([group], exclude=exclude, **hyper, **info.fixed)


def _named(params_or_model):
    """(name, parameter) pairs: a model's trainable parameters, or the pairs given (names None for
    plain parameters); None for param-group dicts, which go to the optimizer as they are."""
    named_parameters = getattr(params_or_model, "named_parameters", None)
    if named_parameters is not None:
        return [(n, p) for n, p in named_parameters() if p.requires_grad]
    items = list(params_or_model)
    if any(isinstance(item, dict) for item in items):
        return None
    return [item if isinstance(item, tuple) else (None, item) for item in items]


def _decay_groups(named, exclude, weight_decay):
    """Plain SGD's param groups: weight decay on what the policy decays, none on the rest."""
    policy = ParamPolicy.from_spec(exclude)
    decay = [p for n, p in named if policy.decays(n, p.shape)]
    no_decay = [p for n, p in named if not policy.decays(n, p.shape)]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]
