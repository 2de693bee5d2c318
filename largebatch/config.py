"""The experiment file: YAML schema, command-line overrides, validation, derived values.

One YAML file describes an experiment for PyTorch or Keras. Every key has a default, so a
minimal file is two lines (``framework: torch`` and ``optimizer: lars``); ``largebatch
validate`` prints the fully resolved file. Sections and keys (see docs/experiments.md):

    name, description
    framework      torch | keras
    model          name, num_classes, batch_norm, zero_init_residual
    data           kind (synthetic | folder), path, val_path, image_size, resize, channels,
                   num_classes, samples, val_samples, augment, loader_workers
    batch          per_worker, global, accumulation_steps
    optimizer      name (sgd | lars | larc | lamb | clars), momentum, weight_decay,
                   trust_coefficient, eps, trust_denominator, nesterov, betas, exclude
    schedule       base_lr, base_batch, scaling, warmup, warmup_epochs, warmup_start_lr,
                   decay, power, end_lr, milestones, factor, momentum_correction
    train          epochs | steps, seed, log_every, eval, label_smoothing, resume, on_nonfinite
    output         dir, run_dir, checkpoint_every, checkpoint_keep, tensorboard, trust_ratios, progress
    launcher       type, np, hosts | hostfile, ranks_per_host, controller, cores_per_host,
                   threads_per_rank, interop_threads, binding, network_interface, env, args, python

A section may be written as its main key alone: ``model: resnet50``, ``optimizer: lamb``,
``data: synthetic``, ``launcher: mpirun``.

Validation collects every problem, one line each, naming the YAML key and what was expected:
``optimizer.trust_coefficient: expected a number > 0, got 'abc'``. :func:`load` raises
:class:`ConfigError` holding the lines; nothing is written and nothing runs.
"""
import copy
import difflib
import math
import os
import re
from pathlib import Path

import yaml

from . import hostfile
from .schedules import DECAYS, SCALING_RULES, WARMUPS, scaled_lr
from .validation import TRUST_DENOMINATORS, check_number

__all__ = ["ConfigError", "Experiment", "load", "load_dict", "parse_override", "apply_overrides",
           "SCHEMA", "FRAMEWORKS", "MODELS", "OPTIMIZERS", "OPTIMIZER_KEYS", "LAUNCHERS", "CONTROLLERS",
           "BINDINGS", "IMAGE_EXTENSIONS", "dump_yaml", "describe"]

FRAMEWORKS = ("torch", "keras")
MODELS = {"torch": ("small_cnn", "resnet18", "resnet50", "alexnet_bn"),
          "keras": ("small_cnn", "small_resnet", "resnet50")}
OPTIMIZERS = ("sgd", "lars", "larc", "lamb", "clars")
FRAMEWORK_OPTIMIZERS = {"torch": OPTIMIZERS, "keras": OPTIMIZERS}
_LARS_KEYS = ("momentum", "weight_decay", "trust_coefficient", "eps", "trust_denominator", "nesterov", "exclude")
OPTIMIZER_KEYS = {"sgd": ("momentum", "weight_decay", "nesterov", "exclude"),
                  "lars": _LARS_KEYS, "larc": _LARS_KEYS, "clars": _LARS_KEYS,
                  "lamb": ("weight_decay", "betas", "eps", "exclude")}
LAUNCHERS = ("horovodrun", "mpirun", "srun")
CONTROLLERS = ("mpi", "gloo")
BINDINGS = ("none", "core", "socket", "numa")
DATA_KINDS = ("synthetic", "folder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff")
RECOMPUTED = ("derived", "source")      # sections of a resolved config.yaml, ignored on load
SHORTHAND = {"model": "name", "optimizer": "name", "data": "kind", "launcher": "type"}


class ConfigError(ValueError):
    """Invalid experiment: ``problems`` holds one line per problem."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class _Bad(Exception):
    """A field check failed; the message is the part after ``key: ``."""


# ---------------------------------------------------------------------------------------------
# field checks: each takes (key, value) and returns the normalised value or raises _Bad
# ---------------------------------------------------------------------------------------------
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
            close = difflib.get_close_matches(value, options, n=1, cutoff=0.6)
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


def betas(key, value):
    if not isinstance(value, list) or len(value) != 2:
        raise _Bad(f"expected a pair [beta_1, beta_2] of numbers in [0, 1), got {value!r}")
    out = []
    for v in value:
        v = _numeric_string(v)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 1:
            raise _Bad(f"expected a pair [beta_1, beta_2] of numbers in [0, 1), got {value!r}")
        out.append(float(v))
    return out


def _exclude_rule(key, rule):
    if rule is None or isinstance(rule, bool):
        return rule
    if isinstance(rule, str):
        try:
            re.compile(rule)
        except re.error as err:
            raise _Bad(f"expected a regular expression, got {rule!r} ({err})") from None
        return rule
    if isinstance(rule, list):
        return [_exclude_rule(key, r) for r in rule]
    raise _Bad(f"expected null (ndim <= 1 excluded), true, false, a regular expression or a list of "
               f"those, or a mapping with 'adaptation' and/or 'decay', got {rule!r}")


def exclude(key, value):
    """The optimizer's ``exclude`` as in the Python API (largebatch.policy.ParamPolicy.from_spec)."""
    if isinstance(value, dict):
        for k in value:
            if k not in ("adaptation", "decay"):
                raise _Bad(f"unknown key {k!r} in the mapping, expected 'adaptation' and/or 'decay'")
        return {k: _exclude_rule(key, v) for k, v in value.items()}
    return _exclude_rule(key, value)


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
    import shlex
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
        return [str(h) for h in hostfile.parse_hosts(value)]
    except ValueError as err:
        raise _Bad(str(err)) from None


class F:
    """A leaf of the schema: a check, a default, and whether null is accepted."""

    def __init__(self, check, default=None, nullable=False, doc=""):
        self.check, self.default, self.nullable, self.doc = check, default, nullable, doc

    def __call__(self, key, value):
        if value is None:
            if self.nullable:
                return None
            # null for a key with a default means "use the default"
            return self.default
        return self.check(key, value)


SCHEMA = {
    "name": F(string, None, nullable=True, doc="run name (default: the YAML file's stem)"),
    "description": F(text, ""),
    "framework": F(choice(FRAMEWORKS), "torch"),
    "model": {
        "name": F(string, "small_cnn", doc="checked against the framework's models (MODELS)"),
        "num_classes": F(integer(1), None, nullable=True, doc="default: from data"),
        "batch_norm": F(boolean, True, doc="small_cnn: BatchNorm after each convolution"),
        "zero_init_residual": F(boolean, False, doc="torch ResNets: γ = 0 in each block's last BN (Goyal et al.)"),
    },
    "data": {
        "kind": F(choice(DATA_KINDS), "synthetic"),
        "path": F(string, None, nullable=True, doc="folder: root with one subfolder of images per class"),
        "val_path": F(string, None, nullable=True),
        "image_size": F(integer(1), None, nullable=True, doc="default 32 (synthetic), 224 (folder)"),
        "resize": F(integer(1), None, nullable=True, doc="shorter side before cropping; default size×256/224"),
        "channels": F(choice((1, 3)), 3),
        "num_classes": F(integer(1), None, nullable=True, doc="default 10 (synthetic), subfolders (folder)"),
        "samples": F(integer(1), 1024, doc="synthetic training images (all ranks together)"),
        "val_samples": F(integer(0), 256, doc="synthetic validation images; 0 = none"),
        "augment": F(boolean, True),
        "loader_workers": F(integer(0), 2),
    },
    "batch": {
        "per_worker": F(integer(1), None, nullable=True, doc="default 32, or global ÷ (np × accumulation)"),
        "global": F(integer(1), None, nullable=True, doc="declared global batch; must divide exactly"),
        "accumulation_steps": F(integer(1), 1),
    },
    "optimizer": {
        "name": F(choice(OPTIMIZERS), "lars"),
        "momentum": F(number(0, 1, high_open=True), 0.9),
        "weight_decay": F(number(0), 0.0),
        "trust_coefficient": F(number(0, low_open=True), 0.001),
        "eps": F(number(0), None, nullable=True, doc="default 0 (LARS family), 1e-6 (LAMB)"),
        "trust_denominator": F(choice(TRUST_DENOMINATORS), "sum_of_norms"),
        "nesterov": F(boolean, False),
        "betas": F(betas, [0.9, 0.999]),
        "exclude": F(exclude, None, nullable=True, doc="null: tensors with ndim <= 1 (biases, BN)"),
    },
    "schedule": {
        "base_lr": F(number(0, low_open=True), 0.1),
        "base_batch": F(integer(1), 256),
        "scaling": F(choice(SCALING_RULES), "linear"),
        "warmup": F(choice(WARMUPS), "gradual"),
        "warmup_epochs": F(number(0), 0.0),
        "warmup_start_lr": F(number(0), None, nullable=True, doc="default base_lr (Goyal et al.)"),
        "decay": F(choice(DECAYS), "poly"),
        "power": F(number(0, low_open=True), 2.0),
        "end_lr": F(number(0), 0.0),
        "milestones": F(milestones, []),
        "factor": F(number(0, 1, low_open=True), 0.1),
        "momentum_correction": F(boolean, True, doc="scale momentum buffers by new/old lr (Goyal et al. eq. 10)"),
    },
    "train": {
        "epochs": F(number(0, low_open=True), 1.0),
        "steps": F(integer(1), None, nullable=True, doc="total optimizer steps; replaces epochs"),
        "seed": F(integer(0), 0),
        "log_every": F(integer(1), 10),
        "eval": F(boolean, True),
        "label_smoothing": F(number(0, 1, high_open=True), 0.0,
                             doc="ε of label smoothing in the training loss (Szegedy et al.); 0 = none"),
        "resume": F(string, "none", doc="auto (newest checkpoint in the run dir, if any) | PATH | none"),
        "on_nonfinite": F(choice(("stop", "skip")), "stop",
                          doc="NaN/Inf gradient: stop the run (exit 1) or skip the step; always reported"),
        "precision": F(choice(("fp32", "bf16", "fp16")), "fp32",
                       doc="torch: autocast to bfloat16 or float16 (fp16 with a GradScaler); weights, optimizer "
                           "state and trust ratios stay float32"),
        "check_ranks_every": F(integer(0), 100, doc="steps between rank-consistency checks (one allgather of two "
                                                   "float64 numbers per tensor); ranks whose weights differ stop the "
                                                   "run, naming the tensor and the step; 0 = never"),
        "commit_every": F(integer(1), 10, doc="launcher.elastic: steps between in-memory commits (work lost "
                                             "on a failure is at most this many steps)"),
    },
    "output": {
        "dir": F(string, "runs"),
        "run_dir": F(string, None, nullable=True, doc="default: <dir>/<name>, made unique by `largebatch run`"),
        "checkpoint_every": F(integer(0), 1, doc="epochs between checkpoints; 0 = none"),
        "checkpoint_keep": F(integer(0), 5, doc="keep the newest K checkpoints; 0 = all"),
        "tensorboard": F(boolean, True),
        "trust_ratios": F(boolean, True),
        "progress": F(boolean, True),
    },
    "launcher": {
        "type": F(choice(LAUNCHERS), "horovodrun"),
        "np": F(integer(1), None, nullable=True, doc="default: the slots in hosts, else 1"),
        "hosts": F(hosts, None, nullable=True),
        "hostfile": F(string, None, nullable=True),
        "ranks_per_host": F(integer(1), None, nullable=True, doc="srun only"),
        "controller": F(choice(CONTROLLERS), "mpi"),
        "cores_per_host": F(auto_integer, None, nullable=True),
        "threads_per_rank": F(auto_integer, None, nullable=True),
        "interop_threads": F(auto_integer, None, nullable=True),
        "binding": F(choice(BINDINGS), "none"),
        "network_interface": F(string, None, nullable=True,
                               doc="NIC for rank traffic: horovodrun --network-interfaces, Open MPI's "
                                   "btl/oob_tcp_if_include, Gloo's HOROVOD_GLOO_IFACE"),
        "ssh_identity": F(string, None, nullable=True,
                          doc="private key for ssh to the hosts (horovodrun --ssh-identity-file, mpirun's rsh agent)"),
        "ssh_port": F(integer(1, 65535), None, nullable=True, doc="sshd port on the hosts (default 22)"),
        "host_timeout": F(integer(5), 30, doc="seconds after which a host that stopped answering ends the job"),
        "preflight": F(boolean, True, doc="multi-host runs: check ssh, names, ports and versions on every "
                                          "host before launching (largebatch doctor --hosts)"),
        "env": F(env_mapping, {}),
        "args": F(args_list, []),
        "python": F(string, None, nullable=True),
        "elastic": F(boolean, False, doc="Horovod Elastic (horovodrun --gloo, torch): ranks may leave and "
                                         "join; the global batch is kept by changing accumulation steps"),
        "min_np": F(integer(1), None, nullable=True, doc="elastic: fewest ranks to keep training (default 1)"),
        "max_np": F(integer(1), None, nullable=True, doc="elastic: most ranks (default launcher.np)"),
        "host_discovery_script": F(string, None, nullable=True,
                                   doc="elastic: executable printing host:slots lines (default: launcher.hosts)"),
        "elastic_timeout": F(integer(1), None, nullable=True, doc="elastic: seconds to wait for min_np (600)"),
        "reset_limit": F(integer(1), None, nullable=True, doc="elastic: most world-size resets before failing"),
    },
}

SECTION_DOC = {"model": "model settings", "data": "data settings", "batch": "batch settings",
               "optimizer": "optimizer settings", "schedule": "learning-rate schedule settings",
               "train": "training settings", "output": "output settings", "launcher": "launcher settings"}

# keys users put in the wrong section, and where they live
_ELSEWHERE = {"lr": "schedule.base_lr", "learning_rate": "schedule.base_lr", "batch_size": "batch.per_worker",
              "np": "launcher.np", "epochs": "train.epochs", "seed": "train.seed", "warmup": "schedule.warmup"}


# ---------------------------------------------------------------------------------------------
# overrides
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# the experiment
# ---------------------------------------------------------------------------------------------
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
        opt = out["optimizer"]
        out["optimizer"] = {"name": opt["name"], **{k: opt[k] for k in SCHEMA["optimizer"]
                                                    if k in OPTIMIZER_KEYS[opt["name"]]}}
        for key in ("cores_per_host", "threads_per_rank", "interop_threads"):
            if out["launcher"][key] is None:
                out["launcher"][key] = "auto"
        # keys that do not apply to this experiment (they would be rejected if set)
        if out["data"]["kind"] == "folder":
            del out["data"]["samples"], out["data"]["val_samples"]
        if out["schedule"]["decay"] != "multistep":
            del out["schedule"]["milestones"], out["schedule"]["factor"]
        if out["schedule"]["decay"] != "poly":
            del out["schedule"]["power"]
        if out["model"]["name"] != "small_cnn":
            del out["model"]["batch_norm"]
        if not (out["framework"] == "torch" and out["model"]["name"] in ("resnet18", "resnet50")):
            del out["model"]["zero_init_residual"]
        if out["train"]["steps"] is not None:
            del out["train"]["epochs"]
        if not out["launcher"]["elastic"]:
            for key in ELASTIC_KEYS:
                del out["launcher"][key]
            del out["train"]["commit_every"]
        else:
            del out["train"]["steps"]
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
    derived = {}
    cross = []
    script = cfg["launcher"]["host_discovery_script"]
    if script and not os.path.isabs(script) and source_path is not None and not any(
            o.split("=", 1)[0].strip() == "launcher.host_discovery_script" for o in overrides):
        # a relative script in the YAML is the YAML's neighbour, wherever largebatch runs from
        cfg["launcher"]["host_discovery_script"] = os.path.normpath(os.path.join(os.path.dirname(source_path),
                                                                               script))
    _cross_checks(cfg, explicit, derived, cross, check_paths, data_notes)
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
    if key_s in _ELSEWHERE:
        return f"{dotted}: unknown key (did you mean '{_ELSEWHERE[key_s]}'?)"
    for section, spec in SCHEMA.items():      # a key from another section?
        if isinstance(spec, dict) and key_s in spec and f"{section}." != prefix:
            return f"{dotted}: unknown key (did you mean '{section}.{key_s}'?)"
    keys = ", ".join(schema)
    return f"{dotted}: unknown key; expected one of: {keys}"


def _cross_checks(cfg, explicit, derived, problems, check_paths, data_notes=None):
    fw, model, data, batch = cfg["framework"], cfg["model"], cfg["data"], cfg["batch"]
    opt, sch, train, la = cfg["optimizer"], cfg["schedule"], cfg["train"], cfg["launcher"]

    # model and optimizer for the framework
    known = {m for ms in MODELS.values() for m in ms}
    if model["name"] not in known:
        close = difflib.get_close_matches(model["name"], MODELS[fw], n=1, cutoff=0.6)
        problems.append(f"model.name: expected one of {', '.join(repr(m) for m in MODELS[fw])} (framework {fw!r}), "
                        f"got {model['name']!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    elif model["name"] not in MODELS[fw]:
        problems.append(f"model.name: {model['name']!r} is not available for framework {fw!r} "
                        f"(available: {', '.join(repr(m) for m in MODELS[fw])})")
    if opt["name"] not in FRAMEWORK_OPTIMIZERS[fw]:
        problems.append(f"optimizer.name: {opt['name']!r} is not available for framework {fw!r} "
                        f"(available: {', '.join(repr(m) for m in FRAMEWORK_OPTIMIZERS[fw])})")
    if "model.batch_norm" in explicit and model["name"] != "small_cnn":
        problems.append(f"model.batch_norm: only used with model.name 'small_cnn', got {model['name']!r}")
    if "model.zero_init_residual" in explicit and not (fw == "torch" and model["name"] in ("resnet18", "resnet50")):
        problems.append(f"model.zero_init_residual: only used with torch models 'resnet18' and 'resnet50', "
                        f"got {fw} {model['name']!r}")
    used = OPTIMIZER_KEYS[opt["name"]]
    for key in sorted(k for k in SCHEMA["optimizer"] if f"optimizer.{k}" in explicit):
        if key != "name" and key not in used:
            users = [n for n in OPTIMIZERS if key in OPTIMIZER_KEYS[n]]
            problems.append(f"optimizer.{key}: not used by optimizer {opt['name']!r} "
                            f"(used by: {', '.join(users)})")
    if opt["eps"] is None:
        opt["eps"] = 1e-6 if opt["name"] == "lamb" else 0.0
    if opt["nesterov"] and opt["momentum"] == 0 and "nesterov" in used:
        problems.append("optimizer.nesterov: needs optimizer.momentum > 0, got momentum 0")
    if opt["name"] == "clars" and opt["trust_denominator"] != "sum_of_norms":
        problems.append("optimizer.trust_denominator: CLARS uses the mean per-example gradient norm; "
                        f"expected 'sum_of_norms', got {opt['trust_denominator']!r}")

    if train["precision"] != "fp32" and cfg["framework"] != "torch":
        problems.append(f"train.precision: {train['precision']!r} is not supported for framework 'keras' yet "
                        f"(Keras's loss-scale optimizer checks for inf before our allreduce); expected 'fp32'")
    # launcher: hosts, np, controller, binding
    np_, placed, listed = _check_launcher(la, explicit, problems, check_paths)
    derived["np"] = np_
    derived["placement"] = placed

    # batch
    acc = batch["accumulation_steps"]
    batch_ok = True          # otherwise: carry on with the data checks, skip what needs the batch
    if batch["global"] is not None:
        if batch["per_worker"] is None:
            per_worker = max(1, batch["global"] // (np_ * acc))
            if batch["global"] % (np_ * acc):
                problems.append(f"batch.global: expected a multiple of launcher.np × batch.accumulation_steps "
                                f"= {np_} × {acc} = {np_ * acc}, got {batch['global']}")
                batch_ok = False
        else:
            per_worker = batch["per_worker"]
            if per_worker * np_ * acc != batch["global"]:
                problems.append(f"batch.global: expected batch.per_worker × launcher.np × batch.accumulation_steps "
                                f"= {per_worker} × {np_} × {acc} = {per_worker * np_ * acc}, got {batch['global']}")
                batch_ok = False
    else:
        per_worker = batch["per_worker"] if batch["per_worker"] is not None else 32
    global_batch = per_worker * np_ * acc
    derived.update(per_worker_batch=per_worker, accumulation_steps=acc, global_batch=global_batch)
    _check_elastic(cfg, explicit, derived, problems, check_paths, batch_ok, listed)

    # data
    synthetic = data["kind"] == "synthetic"
    derived["image_size"] = data["image_size"] or (32 if synthetic else 224)
    derived["resize"] = data["resize"] or max(derived["image_size"], round(derived["image_size"] * 256 / 224))
    if data["resize"] is not None and data["resize"] < derived["image_size"]:
        problems.append(f"data.resize: expected at least data.image_size ({derived['image_size']}), "
                        f"got {data['resize']}")
    if synthetic:
        for key in ("path", "val_path"):
            if data[key] is not None:
                problems.append(f"data.{key}: not used with data.kind 'synthetic' (set data.kind: folder)")
        derived["num_classes"] = data["num_classes"] or 10
        if data["samples"] < global_batch and batch_ok:
            problems.append(f"data.samples: expected at least the global batch ({global_batch}) for one step, "
                            f"got {data['samples']}")
        derived["steps_per_epoch"] = data["samples"] // global_batch
        derived["train_samples"] = data["samples"]
    else:
        for key in ("samples", "val_samples"):
            if f"data.{key}" in explicit:
                problems.append(f"data.{key}: only used with data.kind 'synthetic'")
        if data["path"] is None:
            problems.append("data.path: required when data.kind is 'folder' "
                            "(a folder with one subfolder of images per class)")
        elif check_paths:
            classes = _check_folder("data.path", data["path"], problems if data_notes is None else data_notes)
            if classes is not None:
                derived["num_classes"] = data["num_classes"] or len(classes)
                if data["num_classes"] is not None and data["num_classes"] != len(classes):
                    problems.append(f"data.num_classes: expected {len(classes)} (the class subfolders of "
                                    f"data.path), got {data['num_classes']}")
        if data["val_path"] is not None and check_paths:
            _check_folder("data.val_path", data["val_path"], problems if data_notes is None else data_notes)
        derived.setdefault("num_classes", data["num_classes"])
    if model["name"] == "alexnet_bn" and derived["image_size"] < 64:
        problems.append(f"data.image_size: model 'alexnet_bn' needs images of at least 64 pixels, "
                        f"got {derived['image_size']}")
    if model["num_classes"] is not None and derived.get("num_classes") is not None \
            and model["num_classes"] != derived["num_classes"]:
        problems.append(f"model.num_classes: expected {derived['num_classes']} (the classes in the data), "
                        f"got {model['num_classes']}")
    if synthetic and data["channels"] != 3 and model["name"] in ("resnet18", "resnet50", "alexnet_bn") \
            and fw == "keras":
        problems.append(f"data.channels: keras {model['name']} expects 3 channels, got {data['channels']}")

    # resume
    resume = train["resume"]
    if resume not in ("auto", "none") and check_paths:
        if not os.path.exists(resume):
            problems.append(f"train.resume: expected auto, none or a checkpoint file, got {resume!r} (no such file)")
        elif os.path.isdir(resume):
            problems.append(f"train.resume: expected a checkpoint file, got the folder {resume!r}")
        elif not os.access(resume, os.R_OK):
            problems.append(f"train.resume: cannot read {resume!r} (permission denied)")

    # length of training
    if "train.epochs" in explicit and "train.steps" in explicit:
        problems.append("train.steps: set either train.epochs or train.steps, not both")
    spe = derived.get("steps_per_epoch")
    if train["steps"] is not None:
        derived["total_steps"] = train["steps"]
        if spe:
            derived["epochs"] = train["steps"] / spe
    else:
        derived["epochs"] = train["epochs"]
        if spe:
            derived["total_steps"] = max(1, round(train["epochs"] * spe))

    # schedule
    peak = scaled_lr(sch["base_lr"], global_batch, sch["base_batch"], sch["scaling"])
    derived["peak_lr"] = peak
    if sch["warmup"] != "none" and sch["warmup_epochs"] > 0:
        start = sch["warmup_start_lr"]
        if start is None and sch["scaling"] != "none" and sch["base_lr"] < peak:
            start = sch["base_lr"]       # Goyal et al.: ramp from η to kη
        derived["warmup_start_lr"] = start  # None: the core's default (peak / warmup steps)
        epochs = derived.get("epochs")
        if epochs is not None and sch["warmup_epochs"] >= epochs:
            problems.append(f"schedule.warmup_epochs: expected fewer than the training epochs "
                            f"({epochs:g}), got {sch['warmup_epochs']:g}")
    elif "schedule.warmup_start_lr" in explicit and sch["warmup_start_lr"] is not None:
        problems.append("schedule.warmup_start_lr: not used without warmup "
                        "(set schedule.warmup_epochs > 0 and schedule.warmup to gradual or constant)")
    if sch["decay"] == "multistep":
        if not sch["milestones"]:
            problems.append("schedule.milestones: expected a non-empty list of epochs when schedule.decay "
                            "is 'multistep'")
        elif derived.get("epochs") is not None:
            late = [m for m in sch["milestones"] if m >= derived["epochs"] or m <= sch["warmup_epochs"]]
            if late:
                problems.append(f"schedule.milestones: expected epochs between schedule.warmup_epochs "
                                f"({sch['warmup_epochs']:g}) and the training epochs ({derived['epochs']:g}), "
                                f"got {late[0]:g}")
    else:
        for key in ("milestones", "factor"):
            if f"schedule.{key}" in explicit:
                problems.append(f"schedule.{key}: only used with schedule.decay 'multistep', "
                                f"got decay {sch['decay']!r}")
    if sch["decay"] != "poly" and "schedule.power" in explicit:
        problems.append(f"schedule.power: only used with schedule.decay 'poly', got decay {sch['decay']!r}")
    if sch["decay"] in ("poly", "cosine") and sch["end_lr"] > peak:
        problems.append(f"schedule.end_lr: expected at most the peak lr ({peak:g}), got {sch['end_lr']:g}")


def _check_folder(key, path, problems):
    """Class subfolders of ``path``, or None after recording the problem."""
    if not os.path.exists(path):
        problems.append(f"{key}: expected a folder with one subfolder of images per class, "
                        f"got {path!r} (no such folder)")
        return None
    if not os.path.isdir(path):
        problems.append(f"{key}: expected a folder with one subfolder of images per class, "
                        f"got {path!r} (a file)")
        return None
    try:
        classes = sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    except OSError as err:
        problems.append(f"{key}: cannot read {path!r} ({err.strerror})")
        return None
    if not classes:
        problems.append(f"{key}: expected a folder with one subfolder of images per class, "
                        f"got {path!r} (no subfolders)")
        return None
    return classes


def _check_launcher(la, explicit, problems, check_paths):
    """Validate the launcher section; return (np, placement [(host, ranks)], the number of hosts
    listed: 1 for neither hosts nor hostfile (localhost), None if the list could not be read)."""
    host_list = None
    if la["hosts"] is not None and la["hostfile"] is not None:
        problems.append("launcher.hostfile: set either launcher.hosts or launcher.hostfile, not both")
    elif la["hosts"] is not None:
        host_list = hostfile.parse_hosts(la["hosts"])
    elif la["hostfile"] is not None and check_paths:
        if not os.path.isfile(la["hostfile"]):
            problems.append(f"launcher.hostfile: expected an existing hostfile, got {la['hostfile']!r} (no such file)")
        else:
            try:
                host_list = hostfile.parse_hostfile(la["hostfile"])
            except ValueError as err:
                problems.append(f"launcher.hostfile: {err}")
            except OSError as err:
                problems.append(f"launcher.hostfile: cannot read {la['hostfile']!r} ({err.strerror})")
    np_ = la["np"]
    if host_list is not None:
        slots = hostfile.total_slots(host_list)
        where = "launcher.hosts" if la["hosts"] is not None else "launcher.hostfile"
        if np_ is None:
            np_ = slots
        elif np_ > slots:
            problems.append(f"launcher.np: expected at most {slots} (the slots in {where}), got {np_}")
            np_ = slots
        placed = hostfile.place_ranks(np_, host_list)
    else:
        np_ = np_ or 1
        if la["type"] == "srun" and la["ranks_per_host"]:
            placed = [(f"node{i}", la["ranks_per_host"]) for i in range(-(-np_ // la["ranks_per_host"]))]
        else:
            placed = [("localhost", np_)]

    if la["ranks_per_host"] is not None:
        if la["type"] != "srun":
            problems.append(f"launcher.ranks_per_host: only used with launcher.type 'srun' "
                            f"({la['type']} takes the slots from launcher.hosts)")
        elif np_ % la["ranks_per_host"]:
            problems.append(f"launcher.np: expected a multiple of launcher.ranks_per_host "
                            f"({la['ranks_per_host']}), got {np_}")
    if la["type"] == "srun" and host_list is not None and len({n for _, n in placed}) > 1:
        problems.append(f"launcher.{'hosts' if la['hosts'] is not None else 'hostfile'}: srun needs the same "
                        f"ranks on every host, got {hostfile.hosts_arg(placed)}")
    if la["controller"] == "gloo" and la["type"] != "horovodrun":
        problems.append(f"launcher.controller: 'gloo' needs launcher.type 'horovodrun', got {la['type']!r}")
    if la["controller"] == "gloo" and la["binding"] != "none":
        problems.append(f"launcher.binding: {la['binding']!r} needs the MPI controller (gloo ranks are not "
                        f"bound); expected 'none' with launcher.controller 'gloo'")
    if la["network_interface"] is not None and la["type"] == "srun":
        problems.append("launcher.network_interface: not used with launcher.type 'srun' "
                        "(set it in your Slurm/MPI configuration)")
    for key in ("ssh_identity", "ssh_port"):
        if la[key] is not None and la["type"] == "srun":
            problems.append(f"launcher.{key}: not used with launcher.type 'srun' (Slurm starts the ranks, not ssh)")
    if la["ssh_identity"] is not None and check_paths and not os.path.isfile(os.path.expanduser(la["ssh_identity"])):
        problems.append(f"launcher.ssh_identity: expected an existing private key file, got {la['ssh_identity']!r} "
                        f"(no such file)")
    if la["python"] is not None and check_paths and os.sep in la["python"] and not os.path.exists(la["python"]):
        problems.append(f"launcher.python: expected an existing interpreter, got {la['python']!r} (no such file)")
    if host_list is not None:
        listed = len(host_list)
    else:
        listed = 1 if la["hosts"] is None and la["hostfile"] is None else None
    return np_, placed, listed


ELASTIC_KEYS = ("min_np", "max_np", "host_discovery_script", "elastic_timeout", "reset_limit")


def elastic_accumulation(global_batch, per_worker, size):
    """Accumulation steps that keep ``global_batch`` on ``size`` ranks of ``per_worker`` samples,
    or None when it cannot be kept exactly (the elastic global-batch policy)."""
    ranks_batch = per_worker * size
    return global_batch // ranks_batch if global_batch % ranks_batch == 0 else None


def _check_elastic(cfg, explicit, derived, problems, check_paths, batch_ok, listed):
    """launcher.elastic: Horovod Elastic under horovodrun --gloo, torch only; every world size in
    [min_np, max_np] must keep the global batch with a whole number of accumulation steps."""
    la, np_ = cfg["launcher"], derived["np"]
    if not la["elastic"]:
        for key in ELASTIC_KEYS:
            if f"launcher.{key}" in explicit:
                problems.append(f"launcher.{key}: only used with launcher.elastic: true")
        if "train.commit_every" in explicit:
            problems.append("train.commit_every: only used with launcher.elastic: true")
        return
    if cfg["framework"] != "torch":
        problems.append(f"launcher.elastic: needs framework 'torch', got {cfg['framework']!r} (Horovod 0.28.1's "
                        f"elastic Keras state calls optimizer.variables(), a list under Keras 3)")
    if la["type"] != "horovodrun":
        problems.append(f"launcher.elastic: needs launcher.type 'horovodrun' (Horovod Elastic is started by "
                        f"horovodrun), got {la['type']!r}")
    if la["controller"] != "gloo":
        problems.append(f"launcher.elastic: needs launcher.controller 'gloo' (Horovod Elastic runs on Gloo), "
                        f"got {la['controller']!r}")
    if la["hostfile"] is not None and la["host_discovery_script"] is not None:
        problems.append("launcher.host_discovery_script: set either it or launcher.hostfile, not both")
    if la["hosts"] is not None and la["host_discovery_script"] is not None:
        problems.append("launcher.host_discovery_script: set either it or launcher.hosts, not both")
    script = la["host_discovery_script"]
    if script is None:
        if listed is not None and listed < 2:
            where = "launcher.hostfile" if la["hostfile"] is not None else "launcher.hosts"
            problems.append(f"{where}: Horovod Elastic with a fixed host list needs at least 2 hosts (a failed "
                            f"host is dropped), got {listed}; list more hosts or set launcher.host_discovery_script")
    if script is not None and check_paths and not (os.path.isfile(script) and os.access(script, os.X_OK)):
        problems.append(f"launcher.host_discovery_script: expected an executable file, got {script!r}"
                        + (" (not executable)" if os.path.isfile(script) else " (no such file)"))
    min_np = la["min_np"] if la["min_np"] is not None else 1
    max_np = la["max_np"] if la["max_np"] is not None else np_
    if not min_np <= np_ <= max_np:
        problems.append(f"launcher.np: expected launcher.min_np <= np <= launcher.max_np = {min_np} <= np <= "
                        f"{max_np}, got {np_}")
    derived.update(min_np=min_np, max_np=max_np)
    if not batch_ok:
        return
    gb, pw = derived["global_batch"], derived["per_worker_batch"]
    bad = [s for s in range(min_np, max_np + 1) if elastic_accumulation(gb, pw, s) is None]
    if bad:
        problems.append(f"launcher.min_np: the global batch {gb} is kept by accumulation when ranks leave or "
                        f"join, so it must be a multiple of batch.per_worker ({pw}) × every world size from "
                        f"{min_np} to {max_np}; not for {', '.join(map(str, bad))}")


# ---------------------------------------------------------------------------------------------
# output helpers
# ---------------------------------------------------------------------------------------------
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
    return (f"{c['name']}: {c['framework']} {c['model']['name']} on {c['data']['kind']} data, "
            f"{c['optimizer']['name']}, global batch {d['global_batch']} = {d['per_worker_batch']} per worker × "
            f"{d['np']} ranks × {d['accumulation_steps']} accumulation, peak lr {d['peak_lr']:g} "
            f"({c['schedule']['scaling']} from {c['schedule']['base_lr']:g} at {c['schedule']['base_batch']}), "
            f"{decay} decay{warm}, {length}")
