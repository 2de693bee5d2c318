"""Param groups from a model, using the core's parameter policy."""
from largebatch.policy import ParamPolicy


def param_groups(model, exclude=None, **group_options):
    """One named param group holding every trainable parameter of ``model``.

    The group carries the parameter names, so name regexes in ``exclude`` work, and the
    policy (default: ndim <= 1 excluded from adaptation and decay) is applied per tensor by
    the optimizer. Extra keyword arguments become group options (lr, weight_decay, ...).

        optimizer = LARS(param_groups(model, exclude={"decay": r"bn|bias"}), lr=2.0)
    """
    ParamPolicy.from_spec(exclude)                 # fail here on a malformed rule
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [dict(params=[p for _, p in named], param_names=[n for n, _ in named], exclude=exclude,
                 **group_options)]
