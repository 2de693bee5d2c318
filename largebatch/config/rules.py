"""Checks across keys, one small function per section. Each reads the resolved configuration and
its derived values and returns problems (one line each, naming the key and what was expected);
none changes what it checks. "Only used with" rules come from the schema's :class:`When`
(:func:`inapplicable`), so the same definition also trims the resolved configuration.
"""
import difflib
import os

from .. import hostfile, registry
from .derive import elastic_accumulation
from .schema import ELASTIC_KEYS, FRAMEWORK_OPTIMIZERS, MODELS, SCHEMA, USER_DATA_KINDS

__all__ = ["check", "inapplicable", "read_hosts", "read_folder"]


def inapplicable(section, cfg, explicit, keys=None):
    """Problems for keys of ``section`` the user set where they do not apply (schema ``when``)."""
    spec = SCHEMA[section]
    out = []
    for key in keys if keys is not None else spec:
        when = spec[key].when
        if when is not None and f"{section}.{key}" in explicit and not when.applies(cfg):
            out.append(f"{section}.{key}: {when.message(cfg)}")
    return out


def read_hosts(la, check_paths):
    """(hosts listed in launcher.hosts or launcher.hostfile or None, problems reading them)."""
    if la["hosts"] is not None and la["hostfile"] is not None:
        return None, ["launcher.hostfile: set either launcher.hosts or launcher.hostfile, not both"]
    if la["hosts"] is not None:
        return hostfile.parse_hosts(la["hosts"]), []
    if la["hostfile"] is None or not check_paths:
        return None, []
    if not os.path.isfile(la["hostfile"]):
        return None, [f"launcher.hostfile: expected an existing hostfile, got {la['hostfile']!r} (no such file)"]
    try:
        return hostfile.parse_hostfile(la["hostfile"]), []
    except ValueError as err:
        return None, [f"launcher.hostfile: {err}"]
    except OSError as err:
        return None, [f"launcher.hostfile: cannot read {la['hostfile']!r} ({err.strerror})"]


def read_folder(key, path):
    """(class subfolders of ``path`` or None, problems)."""
    what = "expected a folder with one subfolder of images per class"
    if not os.path.exists(path):
        return None, [f"{key}: {what}, got {path!r} (no such folder)"]
    if not os.path.isdir(path):
        return None, [f"{key}: {what}, got {path!r} (a file)"]
    try:
        classes = sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    except OSError as err:
        return None, [f"{key}: cannot read {path!r} ({err.strerror})"]
    if not classes:
        return None, [f"{key}: {what}, got {path!r} (no subfolders)"]
    return classes, []


def _choices(names):
    return ", ".join(repr(m) for m in names)


def model_and_optimizer(cfg, explicit):
    fw, model, opt = cfg["framework"], cfg["model"], cfg["optimizer"]
    out = []
    known = {m for ms in MODELS.values() for m in ms}
    if model["factory"] is not None:
        if "model.name" in explicit:
            out.append("model.factory: set either model.name (a built-in model) or model.factory (your own), not both")
    elif model["name"] not in known:
        close = difflib.get_close_matches(model["name"], MODELS[fw], n=1, cutoff=0.6)
        out.append(f"model.name: expected one of {_choices(MODELS[fw])} (framework {fw!r}), got {model['name']!r}"
                   + (f" (did you mean {close[0]!r}?)" if close else ""))
    elif model["name"] not in MODELS[fw]:
        out.append(f"model.name: {model['name']!r} is not available for framework {fw!r} "
                   f"(available: {_choices(MODELS[fw])})")
    bad_model = bool(out)
    if opt["name"] not in FRAMEWORK_OPTIMIZERS[fw]:
        out.append(f"optimizer.name: {opt['name']!r} is not available for framework {fw!r} "
                   f"(available: {_choices(FRAMEWORK_OPTIMIZERS[fw])})")
    if not bad_model:          # after a bad model.name, its keys' "only used with" lines would mislead
        out += inapplicable("model", cfg, explicit)
    out += inapplicable("optimizer", cfg, explicit, keys=sorted(k for k in SCHEMA["optimizer"] if k != "name"))
    out += registry.get(opt["name"]).violations(opt, config=True)
    return out


def precision(cfg):
    if cfg["train"]["precision"] == "fp16" and cfg["framework"] == "keras" \
            and registry.get(cfg["optimizer"]["name"]).per_example_norms:
        return [f"train.precision: 'fp16' is not supported with optimizer {cfg['optimizer']['name']!r} for "
                f"framework 'keras' (its per-example norms would not be added over ranks under a loss-scale "
                f"optimizer); expected 'fp32' or 'bf16'"]
    return []


def launcher(cfg, explicit, derived, host_list, host_problems, check_paths):
    la, np_, placed = cfg["launcher"], derived["np"], derived["placement"]
    out = list(host_problems)
    if host_list is not None and la["np"] is not None and la["np"] > np_:
        where = "launcher.hosts" if la["hosts"] is not None else "launcher.hostfile"
        out.append(f"launcher.np: expected at most {np_} (the slots in {where}), got {la['np']}")
    out += inapplicable("launcher", cfg, explicit, keys=("ranks_per_host",))
    if la["ranks_per_host"] is not None and la["type"] == "srun" and np_ % la["ranks_per_host"]:
        out.append(f"launcher.np: expected a multiple of launcher.ranks_per_host ({la['ranks_per_host']}), "
                   f"got {np_}")
    if la["type"] == "srun" and host_list is not None and len({n for _, n in placed}) > 1:
        out.append(f"launcher.{'hosts' if la['hosts'] is not None else 'hostfile'}: srun needs the same "
                   f"ranks on every host, got {hostfile.hosts_arg(placed)}")
    if derived["engine"] == "torch.distributed":
        out += _torch_distributed(cfg)
    elif la["compression"] == "bf16":
        out.append(f"launcher.compression: 'bf16' needs torch.distributed (launcher.type 'torchrun'; Horovod "
                   f"compresses to fp16 only), got launcher.type {la['type']!r}")
    if la["type"] == "torchrun" and derived["engine"] != "torch.distributed":
        out.append(f"launcher.engine: launcher.type 'torchrun' starts torch.distributed; expected "
                   f"'torch.distributed' or no launcher.engine, got {la['engine']!r}")
    if la["controller"] == "gloo" and la["type"] != "horovodrun":
        out.append(f"launcher.controller: 'gloo' needs launcher.type 'horovodrun', got {la['type']!r}")
    if la["controller"] == "gloo" and la["binding"] != "none":
        out.append(f"launcher.binding: {la['binding']!r} needs the MPI controller (gloo ranks are not "
                   f"bound); expected 'none' with launcher.controller 'gloo'")
    out += inapplicable("launcher", cfg, explicit, keys=("network_interface", "ssh_identity", "ssh_port", "rendezvous_port"))
    if la["ssh_identity"] is not None and check_paths and not os.path.isfile(os.path.expanduser(la["ssh_identity"])):
        out.append(f"launcher.ssh_identity: expected an existing private key file, got {la['ssh_identity']!r} "
                   f"(no such file)")
    if la["python"] is not None and check_paths and os.sep in la["python"] and not os.path.exists(la["python"]):
        out.append(f"launcher.python: expected an existing interpreter, got {la['python']!r} (no such file)")
    return out


def _torch_distributed(cfg):
    """torch.distributed (DDP): started by torchrun (one host or several, over ssh) or by srun."""
    la, out = cfg["launcher"], []
    if cfg["framework"] != "torch":
        out.append(f"launcher.type: 'torchrun' runs framework 'torch' (torch.distributed), got framework "
                   f"{cfg['framework']!r}; use horovodrun, mpirun or srun" if la["type"] == "torchrun" else
                   f"launcher.engine: 'torch.distributed' runs framework 'torch', got framework "
                   f"{cfg['framework']!r}; expected 'horovod'")
    if la["type"] not in ("torchrun", "srun"):
        out.append(f"launcher.engine: 'torch.distributed' is started by launcher.type 'torchrun' or 'srun', got "
                   f"{la['type']!r}")
    if la["elastic"] and la["type"] != "torchrun":
        out.append(f"launcher.elastic: torch.distributed's elastic jobs are started by launcher.type 'torchrun', "
                   f"got {la['type']!r}")
    if la["binding"] != "none" and la["type"] == "torchrun":
        out.append(f"launcher.binding: torchrun does not bind ranks to cores; expected 'none', got {la['binding']!r}")
    return out


def batch(cfg, derived):
    b, np_, acc = cfg["batch"], derived["np"], derived["accumulation_steps"]
    if b["global"] is None:
        return []
    if b["per_worker"] is None:
        if b["global"] % (np_ * acc):
            return [f"batch.global: expected a multiple of launcher.np × batch.accumulation_steps "
                    f"= {np_} × {acc} = {np_ * acc}, got {b['global']}"]
    elif derived["global_batch"] != b["global"]:
        pw = b["per_worker"]
        return [f"batch.global: expected batch.per_worker × launcher.np × batch.accumulation_steps "
                f"= {pw} × {np_} × {acc} = {pw * np_ * acc}, got {b['global']}"]
    return []


def elastic(cfg, explicit, derived, host_list, check_paths, batch_ok):
    """launcher.elastic: Horovod Elastic under horovodrun --gloo (torch and Keras), or torchrun's
    elastic agents (torch); every world size in [min_np, max_np] must keep the global batch with a
    whole number of accumulation steps."""
    la, np_ = cfg["launcher"], derived["np"]
    if not la["elastic"]:
        return inapplicable("launcher", cfg, explicit, keys=ELASTIC_KEYS) + inapplicable(
            "train", cfg, explicit, keys=("commit_every",))
    if la["type"] == "torchrun":
        return _torchrun_elastic(la, derived, batch_ok)
    out = []
    if la["type"] != "horovodrun":
        out.append(f"launcher.elastic: needs launcher.type 'horovodrun' (Horovod Elastic) or 'torchrun' "
                   f"(framework torch), got {la['type']!r}")
    if la["controller"] != "gloo":
        out.append(f"launcher.elastic: needs launcher.controller 'gloo' (Horovod Elastic runs on Gloo), "
                   f"got {la['controller']!r}")
    script = la["host_discovery_script"]
    for other in ("hostfile", "hosts"):
        if la[other] is not None and script is not None:
            out.append(f"launcher.host_discovery_script: set either it or launcher.{other}, not both")
    if script is None:
        if host_list is not None:
            listed = len(host_list)
        else:
            listed = 1 if la["hosts"] is None and la["hostfile"] is None else None
        if listed is not None and listed < 2:
            where = "launcher.hostfile" if la["hostfile"] is not None else "launcher.hosts"
            out.append(f"{where}: Horovod Elastic with a fixed host list needs at least 2 hosts (a failed "
                       f"host is dropped), got {listed}; list more hosts or set launcher.host_discovery_script")
    if script is not None and check_paths and not (os.path.isfile(script) and os.access(script, os.X_OK)):
        out.append(f"launcher.host_discovery_script: expected an executable file, got {script!r}"
                   + (" (not executable)" if os.path.isfile(script) else " (no such file)"))
    return out + _world_sizes(np_, derived, batch_ok)


def _torchrun_elastic(la, derived, batch_ok):
    """torchrun's elastic agents: hosts join and leave whole (``--nnodes MIN:MAX``, each host's
    ``--nproc-per-node`` ranks), so every host runs the same number of ranks and the world sizes
    are multiples of it; a host joins by running the run directory's join.sh."""
    out = []
    if la["host_discovery_script"] is not None:
        out.append("launcher.host_discovery_script: Horovod Elastic only; under torchrun a host joins by running "
                   "the run directory's join.sh")
    slots = {n for _, n in derived["placement"] if n > 0}
    if len(slots) > 1:
        out.append(f"launcher.hosts: torchrun's elastic hosts each run the same number of ranks, got "
                   f"{', '.join(str(n) for _, n in derived['placement'] if n > 0)}")
    per_host = min(slots) if slots else 1
    bad = [k for k in ("min_np", "max_np") if derived[k] % per_host]
    if bad:
        out.append(f"launcher.{bad[0]}: expected a multiple of the {per_host} ranks per host (torchrun adds and "
                   f"removes whole hosts), got {derived[bad[0]]}")
    return out + _world_sizes(derived["np"], derived, batch_ok, per_host)


def _world_sizes(np_, derived, batch_ok, per_host=1):
    """np within [min_np, max_np], and the global batch kept at every world size the job can
    have (multiples of ``per_host`` where hosts come and go whole)."""
    out = []
    min_np, max_np = derived["min_np"], derived["max_np"]
    if not min_np <= np_ <= max_np:
        out.append(f"launcher.np: expected launcher.min_np <= np <= launcher.max_np = {min_np} <= np <= "
                   f"{max_np}, got {np_}")
    if not batch_ok:
        return out
    gb, pw = derived["global_batch"], derived["per_worker_batch"]
    bad = [s for s in range(min_np, max_np + 1) if s % per_host == 0 and elastic_accumulation(gb, pw, s) is None]
    if bad:
        out.append(f"launcher.min_np: the global batch {gb} is kept by accumulation when ranks leave or "
                   f"join, so it must be a multiple of batch.per_worker ({pw}) × every world size from "
                   f"{min_np} to {max_np}; not for {', '.join(map(str, bad))}")
    return out


def user_data(cfg, explicit, check_paths):
    """data.kind arrays / python: the keys each needs; the file's contents and the factory's
    results are checked where the data is read (``largebatch.runner.user``)."""
    d = cfg["data"]
    out = inapplicable("data", cfg, explicit, keys=("samples", "val_samples", "val_path", "image_size", "resize",
                                                     "channels", "augment"))
    if d["kind"] == "arrays":
        out += inapplicable("data", cfg, explicit, keys=("factory", "args"))
        if d["path"] is None:
            out.append("data.path: required when data.kind is 'arrays' (an .npz file with x_train, y_train "
                       "and optionally x_val, y_val)")
        elif check_paths and not os.path.isfile(d["path"]):
            what = "a folder" if os.path.isdir(d["path"]) else "no such file"
            out.append(f"data.path: expected an .npz file with x_train, y_train, got {d['path']!r} ({what})")
    else:
        out += inapplicable("data", cfg, explicit, keys=("path",))
        if d["factory"] is None:
            out.append("data.factory: required when data.kind is 'python' ('module:callable' or "
                       "'file.py:callable' returning (train, val))")
    return out


def data(cfg, explicit, derived, folder_problems, batch_ok, check_paths=True):
    """``folder_problems``: {'path': [...], 'val_path': [...]} from reading the folders (a dry run
    collects them as notes instead: they are not passed here then)."""
    fw, model, d = cfg["framework"], cfg["model"], cfg["data"]
    out = []
    if d["resize"] is not None and d["resize"] < derived["image_size"]:
        out.append(f"data.resize: expected at least data.image_size ({derived['image_size']}), got {d['resize']}")
    synthetic = d["kind"] == "synthetic"
    if d["kind"] in USER_DATA_KINDS:
        out += user_data(cfg, explicit, check_paths)
    elif synthetic:
        out += inapplicable("data", cfg, explicit, keys=("path", "val_path"))
        gb = derived["global_batch"]
        if d["samples"] < gb and batch_ok:
            out.append(f"data.samples: expected at least the global batch ({gb}) for one step, got {d['samples']}")
    else:
        out += inapplicable("data", cfg, explicit, keys=("samples", "val_samples"))
        if d["path"] is None:
            out.append("data.path: required when data.kind is 'folder' "
                       "(a folder with one subfolder of images per class)")
        else:
            out += folder_problems.get("path", [])
            classes = folder_problems.get("classes")
            if classes is not None and d["num_classes"] is not None and d["num_classes"] != len(classes):
                out.append(f"data.num_classes: expected {len(classes)} (the class subfolders of data.path), "
                           f"got {d['num_classes']}")
        out += folder_problems.get("val_path", [])
    if model["factory"] is None and model["name"] == "alexnet_bn" and derived["image_size"] < 64:
        out.append(f"data.image_size: model 'alexnet_bn' needs images of at least 64 pixels, "
                   f"got {derived['image_size']}")
    if model["num_classes"] is not None and derived.get("num_classes") is not None \
            and model["num_classes"] != derived["num_classes"]:
        out.append(f"model.num_classes: expected {derived['num_classes']} (the classes in the data), "
                   f"got {model['num_classes']}")
    if synthetic and d["channels"] != 3 and model["name"] in ("resnet18", "resnet50", "alexnet_bn") \
            and fw == "keras":
        out.append(f"data.channels: keras {model['name']} expects 3 channels, got {d['channels']}")
    return out


def resume(cfg, check_paths):
    path = cfg["train"]["resume"]
    if path in ("auto", "none") or not check_paths:
        return []
    if not os.path.exists(path):
        return [f"train.resume: expected auto, none or a checkpoint file, got {path!r} (no such file)"]
    if os.path.isdir(path):
        return [f"train.resume: expected a checkpoint file, got the folder {path!r}"]
    if not os.access(path, os.R_OK):
        return [f"train.resume: cannot read {path!r} (permission denied)"]
    return []


def length(explicit):
    if "train.epochs" in explicit and "train.steps" in explicit:
        return ["train.steps: set either train.epochs or train.steps, not both"]
    return []


def schedule(cfg, explicit, derived):
    sch, epochs, peak = cfg["schedule"], derived.get("epochs"), derived["peak_lr"]
    out = []
    if sch["warmup"] != "none" and sch["warmup_epochs"] > 0:
        if epochs is not None and sch["warmup_epochs"] >= epochs:
            out.append(f"schedule.warmup_epochs: expected fewer than the training epochs "
                       f"({epochs:g}), got {sch['warmup_epochs']:g}")
    else:
        out += inapplicable("schedule", cfg, explicit, keys=("warmup_start_lr",))
    if sch["decay"] == "multistep":
        if not sch["milestones"]:
            out.append("schedule.milestones: expected a non-empty list of epochs when schedule.decay is 'multistep'")
        elif epochs is not None:
            late = [m for m in sch["milestones"] if m >= epochs or m <= sch["warmup_epochs"]]
            if late:
                out.append(f"schedule.milestones: expected epochs between schedule.warmup_epochs "
                           f"({sch['warmup_epochs']:g}) and the training epochs ({epochs:g}), got {late[0]:g}")
    out += inapplicable("schedule", cfg, explicit, keys=("milestones", "factor", "power"))
    if sch["decay"] in ("poly", "cosine") and sch["end_lr"] > peak:
        out.append(f"schedule.end_lr: expected at most the peak lr ({peak:g}), got {sch['end_lr']:g}")
    if sch["adascale"]:
        out += _adascale(cfg, derived)
    return out


def _adascale(cfg, derived):
    """AdaScale needs the measured noise (two batch sizes), an SGD-type update and a batch at
    least the base batch."""
    out, name = [], cfg["optimizer"]["name"]
    if name not in ("sgd", "lars"):
        out.append(f"schedule.adascale: for optimizer 'sgd' or 'lars' (Johnson et al. 2020), got {name!r}")
    if not cfg["train"]["noise_scale"]:
        out.append("schedule.adascale: needs train.noise_scale: true (its gain comes from the measured noise)")
    elif derived["np"] == 1 and derived["accumulation_steps"] == 1:
        out.append("schedule.adascale: needs two batch sizes to measure the noise: launcher.np > 1 or "
                   "batch.accumulation_steps > 1, got one rank without accumulation")
    if cfg["launcher"]["elastic"]:
        out.append("schedule.adascale: not with launcher.elastic (its clock would restart with each reset)")
    if derived["global_batch"] < cfg["schedule"]["base_batch"]:
        out.append(f"schedule.adascale: scales up from schedule.base_batch ({cfg['schedule']['base_batch']}); "
                   f"expected a global batch at least that, got {derived['global_batch']}")
    return out


def check(cfg, explicit, derived, *, host_list, host_problems, folder_problems, check_paths):
    """Every cross-key problem, in the order a reader of the file meets them."""
    batch_problems = batch(cfg, derived)
    batch_ok = not batch_problems          # otherwise: skip what needs the batch
    return (model_and_optimizer(cfg, explicit) + precision(cfg)
            + launcher(cfg, explicit, derived, host_list, host_problems, check_paths) + batch_problems
            + elastic(cfg, explicit, derived, host_list, check_paths, batch_ok)
            + data(cfg, explicit, derived, folder_problems, batch_ok, check_paths) + resume(cfg, check_paths)
            + length(explicit) + schedule(cfg, explicit, derived))
