"""Values that follow from a resolved configuration: placement, batch sizes, image sizes,
training length, peak and warm-up learning rates. Pure functions of their inputs: the config
checks read them, and the runners call them (:func:`training_length` once the data set's size
is known) instead of computing them again.
"""
import os

from .. import hostfile as _hostfile
from ..schedules import scaled_lr
from .schema import engine

__all__ = ["derive", "model_label", "placement", "batch_sizes", "image_sizes", "training_length", "learning_rates",
           "elastic_range", "elastic_accumulation"]


def placement(la, host_list):
    """(np, [(host, ranks)]) for the launcher section and the hosts read from it (None: none listed
    or unreadable). More ranks than slots are capped at the slots (the checks say so)."""
    np_ = la["np"]
    if host_list is not None:
        slots = _hostfile.total_slots(host_list)
        np_ = slots if np_ is None else min(np_, slots)
        return np_, _hostfile.place_ranks(np_, host_list)
    np_ = np_ or 1
    if la["type"] == "srun" and la["ranks_per_host"]:
        return np_, [(f"node{i}", la["ranks_per_host"]) for i in range(-(-np_ // la["ranks_per_host"]))]
    return np_, [("localhost", np_)]


def batch_sizes(batch, np_):
    """(per-worker batch, accumulation steps, global batch): global = per worker × ranks × accumulation
    (Goyal et al. 2017). With only batch.global set, the per-worker batch is its share (at least 1)."""
    acc = batch["accumulation_steps"]
    if batch["per_worker"] is not None:
        per_worker = batch["per_worker"]
    elif batch["global"] is not None:
        per_worker = max(1, batch["global"] // (np_ * acc))
    else:
        per_worker = 32
    return per_worker, acc, per_worker * np_ * acc


def image_sizes(data):
    """(image size, resize): 32 for synthetic data and 224 for folders; the shorter side before
    cropping is size × 256/224 unless set."""
    size = data["image_size"] or (32 if data["kind"] == "synthetic" else 224)
    return size, data["resize"] or max(size, round(size * 256 / 224))


def training_length(train, steps_per_epoch):
    """{'total_steps', 'epochs'} from train.steps or train.epochs; only what the known
    ``steps_per_epoch`` (None: not yet known) allows."""
    out = {}
    if train["steps"] is not None:
        out["total_steps"] = train["steps"]
        if steps_per_epoch:
            out["epochs"] = train["steps"] / steps_per_epoch
    else:
        out["epochs"] = train["epochs"]
        if steps_per_epoch:
            out["total_steps"] = max(1, round(train["epochs"] * steps_per_epoch))
    return out


def learning_rates(sch, global_batch):
    """{'peak_lr'} and, with warm-up, {'warmup_start_lr'}: the scaled rate (linear or sqrt rule)
    and where warm-up starts (Goyal et al.: from η to kη; None: the core's default)."""
    peak = scaled_lr(sch["base_lr"], global_batch, sch["base_batch"], sch["scaling"])
    out = {"peak_lr": peak}
    if sch["warmup"] != "none" and sch["warmup_epochs"] > 0:
        start = sch["warmup_start_lr"]
        if start is None and sch["scaling"] != "none" and sch["base_lr"] < peak:
            start = sch["base_lr"]
        out["warmup_start_lr"] = start
    return out


def elastic_range(la, np_):
    """(min_np, max_np) of an elastic job."""
    return (la["min_np"] if la["min_np"] is not None else 1), (la["max_np"] if la["max_np"] is not None else np_)


def elastic_accumulation(global_batch, per_worker, size):
    """Accumulation steps that keep ``global_batch`` on ``size`` ranks of ``per_worker`` samples,
    or None when it cannot be kept exactly (the elastic global-batch policy)."""
    ranks_batch = per_worker * size
    return global_batch // ranks_batch if global_batch % ranks_batch == 0 else None


def model_label(model):
    """The model's name in summaries and checkpoints: the built-in's name, or the factory as
    ``file.py:callable`` / ``module:callable`` (a file without its folder, which may move)."""
    if model["factory"] is None:
        return model["name"]
    where, _, attr = model["factory"].rpartition(":")
    return f"{os.path.basename(where) if where.endswith('.py') else where}:{attr}"


def derive(cfg, host_list=None, folder_classes=None):
    """Every derived value of ``cfg`` (see the module docstring). ``host_list``: the hosts read
    from launcher.hosts/hostfile; ``folder_classes``: the class subfolders found in data.path
    (None where not read)."""
    la, data = cfg["launcher"], cfg["data"]
    np_, placed = placement(la, host_list)
    per_worker, acc, global_batch = batch_sizes(cfg["batch"], np_)
    d = {"model": model_label(cfg["model"]), "engine": engine(la), "np": np_, "placement": placed,
         "per_worker_batch": per_worker,
         "accumulation_steps": acc,
         "global_batch": global_batch}
    if la["elastic"]:
        d["min_np"], d["max_np"] = elastic_range(la, np_)
    d["image_size"], d["resize"] = image_sizes(data)
    if data["kind"] == "synthetic":
        d["num_classes"] = data["num_classes"] or 10
        d["steps_per_epoch"] = data["samples"] // global_batch
        d["train_samples"] = data["samples"]
    elif data["kind"] == "folder":
        d["num_classes"] = data["num_classes"] or (len(folder_classes) if folder_classes else None)
    else:                               # the user's data: from its labels when read, unless given
        d["num_classes"] = data["num_classes"] or cfg["model"]["num_classes"]
    d.update(learning_rates(cfg["schedule"], global_batch))
    d.update(run_length(cfg, d.get("steps_per_epoch"), global_batch))
    return d


def run_length(cfg, steps_per_epoch, global_batch):
    """:func:`training_length`, and with AdaScale its rate and its bound on the updates."""
    out = training_length(cfg["train"], steps_per_epoch)
    if cfg["schedule"]["adascale"]:
        out.update(adascale(cfg["schedule"], global_batch, out.get("total_steps")))
    return out


def adascale(sch, global_batch, total_steps):
    """AdaScale (Johnson et al. 2020): the base run's rate (no scaling rule), S = global / base
    batch, and the base run's iterations T, which the run's scale-invariant clock must reach:
    ``total_steps`` becomes that bound (r ≥ 1), the run ends as soon as the clock gets there."""
    scale = global_batch / sch["base_batch"]
    out = {"peak_lr": sch["base_lr"], "adascale_scale": scale}
    if sch["warmup"] != "none" and sch["warmup_epochs"] > 0:
        out["warmup_start_lr"] = sch["warmup_start_lr"]
    if total_steps is not None:
        out["adascale_base_steps"] = out["total_steps"] = max(1, round(total_steps * scale))
    return out
