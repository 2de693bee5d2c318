"""Writing an experiment out: YAML in schema order, and the one-line summary of what will run."""
import yaml

__all__ = ["dump_yaml", "describe"]


class _Dumper(yaml.SafeDumper):
    pass


def _list_rep(dumper, data):
    flow = all(not isinstance(v, (dict, list, tuple)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", list(data), flow_style=flow)


_Dumper.add_representer(tuple, _list_rep)
_Dumper.add_representer(list, _list_rep)


def dump_yaml(data):
    """YAML text of plain data, keys in schema order."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100, allow_unicode=True)


def describe(exp):
    """A one-line summary: what will run."""
    c, d = exp.cfg, exp.derived
    length = (f"{c['train']['steps']} steps" if c["train"]["steps"] is not None
              else f"{d['epochs']:g} epoch{'s' if d['epochs'] != 1 else ''}")
    warm = ""
    if c["schedule"]["warmup"] != "none" and c["schedule"]["warmup_epochs"] > 0:
        warm = f", {c['schedule']['warmup']} warmup {c['schedule']['warmup_epochs']:g} epochs"
    decay = c["schedule"]["decay"] + (f" {c['schedule']['power']:g}" if c["schedule"]["decay"] == "poly" else "")
    smooth = c["train"]["label_smoothing"]
    length += f", label smoothing {smooth:g}" if smooth else ""
    if c["schedule"]["adascale"]:
        rate = (f"AdaScale: lr {c['schedule']['base_lr']:g} at {c['schedule']['base_batch']} × the measured gain "
                f"(S = {d['adascale_scale']:g}), at most {d['total_steps']} updates")
    else:
        rate = (f"peak lr {d['peak_lr']:g} ({c['schedule']['scaling']} from {c['schedule']['base_lr']:g} at "
                f"{c['schedule']['base_batch']})")
    return (f"{c['name']}: {c['framework']} {exp.derived['model']} on {c['data']['kind']} data, "
            f"{c['optimizer']['name']}, global batch {d['global_batch']} = {d['per_worker_batch']} per worker × "
            f"{d['np']} ranks × {d['accumulation_steps']} accumulation, {rate}, {decay} decay{warm}, {length}")
