"""What the configured optimizer does with each tensor of the configured model: adapted (a trust
ratio) or not, decayed or not, as the core's :class:`largebatch.policy.ParamPolicy` decides.

``largebatch validate --print`` lists it (:func:`decisions_table`); the runners print
:func:`exclusion_line` at start when the excluded tensors would step at a rate plain SGD does not
survive (the optimizers' own :class:`largebatch.policy.ExclusionWarning` would come from every
rank and only once the warm-up reaches that rate).
"""
import importlib
import warnings

from largebatch import registry
from largebatch.policy import ExclusionWarning, ParamPolicy, exclusion_warning

__all__ = ["model_tensors", "exclusion_line", "announce_exclusion", "decisions_table"]


def model_tensors(framework, model):
    """[(name, shape, is a normalisation layer's)] of the model's trainable tensors."""
    if framework == "torch":
        norms = importlib.import_module("largebatch.torch.groups").normalization_parameters(model)
        return [(n, tuple(p.shape), n in norms) for n, p in model.named_parameters() if p.requires_grad]
    is_norm = importlib.import_module("largebatch.keras.optimizers").is_normalization_variable
    return [(v.path, tuple(v.shape), is_norm(v)) for v in model.trainable_variables]


def exclusion_line(exp, tensors):
    """One line (or None) when the configured LARS/LARC steps excluded tensors at the peak lr at a
    rate plain SGD does not survive without normalisation layers."""
    o = exp.cfg["optimizer"]
    info = registry.get(o["name"])
    if "trust_coefficient" not in info.keys:                  # LARS family only
        return None
    policy = ParamPolicy.from_spec(o["exclude"])
    clip = bool(info.fixed.get("clip"))
    return exclusion_warning([n for n, shape, _ in tensors if not policy.adapts(n, shape)], exp.derived["peak_lr"],
                             trust_coefficient=o["trust_coefficient"], clip=clip,
                             excluded_rate=policy.excluded_rate, normalized=any(norm for _, _, norm in tensors),
                             optimizer=o["name"].upper())


def announce_exclusion(exp, model, rank):
    """At start: rank 0 prints :func:`exclusion_line` (for the peak lr) if there is one, and every
    rank silences the optimizer's own ExclusionWarning, which would repeat it per rank, later."""
    line = exclusion_line(exp, model_tensors(exp.cfg["framework"], model))
    if line and rank == 0:
        print(f"largebatch: warning: {line}", flush=True)
    warnings.simplefilter("ignore", ExclusionWarning)


def decisions_table(exp):
    """The experiment's model (built here, on the CPU) with each tensor's decisions, as YAML comment
    lines (``validate --print`` appends them to the YAML)."""
    cfg = exp.cfg
    module = importlib.import_module(f"largebatch.runner.{cfg['framework']}_train")
    tensors = model_tensors(cfg["framework"], module.build_model(cfg, exp.derived))
    o = cfg["optimizer"]
    info = registry.get(o["name"])
    policy = ParamPolicy.from_spec(o["exclude"])
    rows = [(name, shape, info.layerwise and policy.adapts(name, shape),
             bool(o["weight_decay"]) and policy.decays(name, shape)) for name, shape, _ in tensors]
    width = max(len(name) for name, _, _, _ in rows)
    normalized = any(norm for _, _, norm in tensors)
    lines = [f"# {len(rows)} trainable tensors of {cfg['model']['name']} ({cfg['framework']}, "
             f"{'with' if normalized else 'no'} normalisation layers): {sum(r[2] for r in rows)} adapted by "
             f"{o['name']}, {sum(r[3] for r in rows)} decayed (weight_decay {o['weight_decay']:g})"]
    lines += [f"#   {name:<{width}}  {str(shape):<18} {'adapted' if a else '-':<8} {'decayed' if d else '-'}"
              for name, shape, a, d in rows]
    warning = exclusion_line(exp, tensors)
    if warning:
        lines.append(f"# warning: {warning}")
    return "\n".join(lines) + "\n"
