"""The registry's Keras optimizers by name (:func:`create_optimizer`)."""
import importlib

from largebatch import registry

__all__ = ["create_optimizer"]

# registry key -> the Keras constructor's arguments, where they differ
_KERAS_ARGS = {"betas": lambda v: {"beta_1": v[0], "beta_2": v[1]}}
# what largebatch's own (layer-wise) Keras optimizers take besides the registry's keys
_LAYERWISE = ("fused", "name")


def create_optimizer(name, **hyper):
    """The registry's Keras optimizer ``name`` ('sgd', 'lars', 'larc', 'lamb', 'clars') with the
    options the name fixes (larc: ``clip=True``).

    ``hyper``: ``learning_rate`` (a number or a schedule) and the registry's keys for ``name``
    (``momentum``, ``weight_decay``, ``betas`` — or Keras's ``beta_1``/``beta_2`` — ``exclude``, ...),
    plus ``fused`` and ``name`` for largebatch's own optimizers and Keras's common arguments
    (``clipnorm``, ...); anything else is refused in one line. 'sgd' is ``keras.optimizers.SGD``
    (``weight_decay`` 0 means none); its weight-decay exclusions need the model's variables
    (``optimizer.exclude_from_weight_decay(var_list=...)``, which ``largebatch run`` calls).

        model.compile(optimizer=create_optimizer("lars", learning_rate=2.0, weight_decay=5e-4), ...)
    """
    info = registry.get(name)
    if info.keras is None:
        raise ValueError(f"optimizer: {name!r} has no Keras implementation")
    keras_common = ("clipnorm", "clipvalue", "global_clipnorm", "use_ema", "ema_momentum",
                    "ema_overwrite_frequency", "loss_scale_factor", "gradient_accumulation_steps")
    keys = info.keys + (("beta_1", "beta_2") if "betas" in info.keys else ())
    allowed = ("learning_rate",) + keys + (_LAYERWISE if info.layerwise else ()) + keras_common
    unknown = sorted(set(hyper) - set(allowed))
    if unknown:
        raise ValueError(f"{unknown[0]}: not an argument of {name!r} in Keras; expected one of {', '.join(allowed)}")
    module, _, attr = info.keras.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    kwargs = {}
    for key, value in hyper.items():
        kwargs.update(_KERAS_ARGS[key](value) if key in _KERAS_ARGS else {key: value})
    if not info.layerwise:
        if kwargs.pop("exclude", None) is not None:
            raise ValueError("exclude: Keras's SGD takes its weight-decay exclusions from "
                             "optimizer.exclude_from_weight_decay(var_list=...) once the model exists")
        kwargs["weight_decay"] = kwargs.get("weight_decay") or None
    return cls(**kwargs, **info.fixed)
