"""Reading an experiment: the YAML file, ``key.sub=value`` overrides, the schema walk, the
cross-key rules and the derived values, into an :class:`Experiment`."""
import copy
import difflib
import os
from pathlib import Path

import yaml

from . import rules
from .derive import derive
from .fields import ConfigError, _Bad
from .schema import RECOMPUTED, SCHEMA, SECTION_DOC, SHORTHAND, ELSEWHERE
from .. import registry

__all__ = ["Experiment", "load", "load_dict", "parse_override", "apply_overrides"]


def parse_override(text_):
    """``"optimizer.trust_coefficient=0.02"`` -> (["optimizer", "trust_coefficient"], 0.02).
    The value is read as YAML (``true``, ``[30, 60]``, ``null``); unparsable YAML stays a string."""
    key, sep, raw = text_.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError([f"override {text_!r}: expected key.sub=value"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(doc, overrides):
    """Apply ``key.sub=value`` strings to the mapping ``doc`` (a copy is returned)."""
    doc, problems = _apply_overrides(doc, overrides)
    if problems:
        raise ConfigError(problems)
    return doc


def _apply_overrides(doc, overrides):
    doc = copy.deepcopy(doc)
    problems = []
    for item in overrides:
        try:
            path, value = parse_override(item)
        except ConfigError as err:
            problems += err.problems
            continue
        node = doc
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif isinstance(child, str) and part in SHORTHAND and i == 0:
                child = node[part] = {SHORTHAND[part]: child}
            if not isinstance(child, dict):
                problems.append(f"{'.'.join(path[:i + 1])}: cannot set {'.'.join(path)}, "
                                f"{'.'.join(path[:i + 1])} is {child!r}, not a mapping")
                break
            node = child
        else:
            last = path[-1]
            if len(path) == 1 and last in SHORTHAND and isinstance(node.get(last), dict) \
                    and not isinstance(value, dict):
                node[last][SHORTHAND[last]] = value      # optimizer=lamb keeps optimizer.* args
            else:
                node[last] = value
                # train.steps and train.epochs exclude each other: the command line wins over the file
                other = {("train", "steps"): "epochs", ("train", "epochs"): "steps"}.get(tuple(path))
                if other and value is not None and isinstance(node, dict):
                    node.pop(other, None)
    return doc, problems


class Experiment:
    """A validated experiment.

    ``cfg``: the resolved configuration (every key, defaults filled in), nested dicts.
    ``derived``: values computed from it (np, per-worker and global batch, peak lr, ...).
    ``explicit``: the dotted keys the user set (file or overrides).
    ``source``: the YAML path (or None) and the overrides applied.
    """

    def __init__(self, cfg, derived, explicit, source):
        self.cfg, self.derived, self.explicit, self.source = cfg, derived, explicit, source

    def __getitem__(self, section):
        return self.cfg[section]

    def resolved(self):
        """The resolved configuration plus ``derived``, as plain data (what config.yaml holds).
        The optimizer section lists only the keys the chosen optimizer uses; automatic launcher
        values read 'auto'. Loading this file again gives the same experiment."""
        out = copy.deepcopy(self.cfg)
        for section, spec in SCHEMA.items():
            if isinstance(spec, dict):
                for key, field in spec.items():
                    if field.when is not None and field.when.drop and not field.when.applies(self.cfg):
                        del out[section][key]
        for key in ("cores_per_host", "threads_per_rank", "interop_threads"):
            if out["launcher"][key] is None:
                out["launcher"][key] = "auto"
        # train.steps and train.epochs exclude each other; elastic runs count epochs
        if out["launcher"]["elastic"]:
            del out["train"]["steps"]
        elif out["train"]["steps"] is not None:
            del out["train"]["epochs"]
        out["derived"] = copy.deepcopy(self.derived)
        out["source"] = copy.deepcopy(self.source)
        return out


def load(path, overrides=(), *, check_paths=True, data_notes=None):
    """Read, override and validate an experiment file. Raises :class:`ConfigError`.

    ``data_notes``: a list that collects problems with the data folders instead of raising
    (a dry run, which reads no data, goes on and says so)."""
    overrides = [overrides] if isinstance(overrides, str) else list(overrides)
    path = str(path)
    if not os.path.exists(path):
        raise ConfigError([f"{path}: no such file"])
    if os.path.isdir(path):
        raise ConfigError([f"{path}: expected a YAML file, got a folder"])
    try:
        with open(path) as fh:
            doc = yaml.safe_load(fh)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError([f"{path}: not valid YAML: {where}{problem}"]) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError([f"{path}: cannot read ({err})"]) from None
    if doc is None:
        raise ConfigError([f"{path}: the file is empty"])
    if not isinstance(doc, dict):
        raise ConfigError([f"{path}: expected a mapping of sections (framework, model, data, ...), "
                           f"got {type(doc).__name__} {doc!r}"[:200]])
    return load_dict(doc, overrides, name=Path(path).stem, source_path=os.path.abspath(path),
                     check_paths=check_paths, data_notes=data_notes)


def load_dict(doc, overrides=(), *, name="experiment", source_path=None, check_paths=True, data_notes=None):
    """Validate an experiment given as a mapping (see :func:`load`)."""
    overrides = [overrides] if isinstance(overrides, str) else list(overrides)
    doc, problems = _apply_overrides(doc, overrides)
    explicit = set()
    cfg = _walk(SCHEMA, doc, "", problems, explicit)
    if cfg.get("name") is None:
        cfg["name"] = name
    _fill_defaults(cfg)
    script = cfg["launcher"]["host_discovery_script"]
    if script and not os.path.isabs(script) and source_path is not None and not any(
            o.split("=", 1)[0].strip() == "launcher.host_discovery_script" for o in overrides):
        # a relative script in the YAML is the YAML's neighbour, wherever largebatch runs from
        cfg["launcher"]["host_discovery_script"] = os.path.normpath(os.path.join(os.path.dirname(source_path),
                                                                               script))
    for section in ("model", "data"):     # a factory's relative file is the YAML's neighbour too
        cfg[section]["factory"] = _beside(cfg[section]["factory"], source_path, overrides, f"{section}.factory")
    host_list, host_problems = rules.read_hosts(cfg["launcher"], check_paths)
    folders = _read_folders(cfg["data"], check_paths)
    derived = derive(cfg, host_list, folders.get("classes"))
    if data_notes is not None:       # a dry run reads no data: folder problems are notes
        data_notes += folders.pop("path", []) + folders.pop("val_path", [])
    cross = rules.check(cfg, explicit, derived, host_list=host_list, host_problems=host_problems,
                        folder_problems=folders, check_paths=check_paths)
    # a key that failed its own check was replaced by its default: drop what follows from that
    bad = {p.split(":", 1)[0] for p in problems}
    problems += [p for p in cross if p.split(":", 1)[0] not in bad and not any(b in p for b in bad)]
    if problems:
        raise ConfigError(problems)
    return Experiment(cfg, derived, explicit, {"file": source_path, "overrides": list(overrides)})


def _walk(schema, doc, prefix, problems, explicit):
    out = {}
    for key, value in doc.items():
        dotted = f"{prefix}{key}"
        if not prefix and key in RECOMPUTED:
            continue
        if not isinstance(key, str) or key not in schema:
            problems.append(_unknown(schema, key, dotted, prefix))
    for key, spec in schema.items():
        dotted = f"{prefix}{key}"
        present = key in doc
        value = doc.get(key)
        if isinstance(spec, dict):
            if present and isinstance(value, (str, int, float)) and not isinstance(value, bool) \
                    and key in SHORTHAND and not prefix:
                value = {SHORTHAND[key]: value}
            if present and value is not None and not isinstance(value, dict):
                problems.append(f"{dotted}: expected a mapping of {SECTION_DOC.get(key, 'settings')}"
                                f"{' or a ' + SHORTHAND[key] if key in SHORTHAND else ''}, got {value!r}")
                value = {}
            out[key] = _walk(spec, value or {}, dotted + ".", problems, explicit)
        else:
            if present and value is not None:      # null means "the default"
                explicit.add(dotted)
            try:
                out[key] = spec(dotted, value) if present else copy.deepcopy(spec.default)
            except _Bad as bad:
                problems.append(f"{dotted}: {bad}")
                out[key] = copy.deepcopy(spec.default)
    return out


def _unknown(schema, key, dotted, prefix):
    key_s = str(key)
    close = difflib.get_close_matches(key_s, list(schema), n=1, cutoff=0.6)
    if close:
        return f"{dotted}: unknown key (did you mean '{prefix}{close[0]}'?)"
    if key_s in ELSEWHERE:
        return f"{dotted}: unknown key (did you mean '{ELSEWHERE[key_s]}'?)"
    for section, spec in SCHEMA.items():      # a key from another section?
        if isinstance(spec, dict) and key_s in spec and f"{section}." != prefix:
            return f"{dotted}: unknown key (did you mean '{section}.{key_s}'?)"
    keys = ", ".join(schema)
    return f"{dotted}: unknown key; expected one of: {keys}"



def _beside(ref, source_path, overrides, key):
    """``file.py:callable`` with a relative file named in the YAML: the path from the YAML's
    folder (one given on the command line is taken from where largebatch runs, as any path there)."""
    if ref is None or source_path is None:
        return ref
    where, _, attr = ref.rpartition(":")
    if not where.endswith(".py") or os.path.isabs(where) or any(o.split("=", 1)[0].strip() == key for o in overrides):
        return ref
    return f"{os.path.normpath(os.path.join(os.path.dirname(source_path), where))}:{attr}"


def _fill_defaults(cfg):
    """Defaults that depend on another key: the optimizer's own eps (registry)."""
    opt = cfg["optimizer"]
    if opt["eps"] is None:
        opt["eps"] = registry.get(opt["name"]).default("eps")


def _read_folders(data, check_paths):
    """{'classes', 'path': problems, 'val_path': problems} for data.kind 'folder'."""
    out = {}
    if data["kind"] != "folder" or not check_paths:
        return out
    if data["path"] is not None:
        out["classes"], out["path"] = rules.read_folder("data.path", data["path"])
    if data["val_path"] is not None:
        out["val_path"] = rules.read_folder("data.val_path", data["val_path"])[1]
    return out
