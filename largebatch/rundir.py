"""The run directory's format: what ``largebatch run`` writes (rank 0) and ``largebatch report``,
the CLI and the Slurm scripts read. File names, columns and the summary's atomic write live here
once.

    config.yaml          the resolved experiment (every key, plus ``derived`` values)
    metrics.csv          METRIC_FIELDS (train and eval rows)
    metrics.jsonl        the same rows as JSON objects
    trust_ratios.csv     TRUST_FIELDS: step, layer, trust ratio (layer lr / global lr)
    tensorboard/         event file: train/*, eval/*, trust_ratio/<layer> scalars
    checkpoints/         epoch-NNNN.<ext> (format: largebatch.checkpoint)
    summary.json         final numbers (written last, atomically; its presence means the run ended)
    launch.sh            the command that continues the run
"""
import json
import math
import os

from . import checkpoint

__all__ = ["CONFIG", "METRICS", "METRICS_JSONL", "TRUST_RATIOS", "TENSORBOARD", "CHECKPOINTS", "SUMMARY",
           "LAUNCH_SCRIPT", "JOIN_SCRIPT", "COMMITS", "METRIC_FIELDS", "TRUST_FIELDS", "RUN_FILES", "json_safe", "write_summary", "read_summary",
           "holds_run", "run_dir_refusal", "fresh_run_dir", "RunDirTaken", "base_run_dir", "resume_path",
           "choose_run_dir"]

CONFIG = "config.yaml"
METRICS = "metrics.csv"
METRICS_JSONL = "metrics.jsonl"
TRUST_RATIOS = "trust_ratios.csv"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
SUMMARY = "summary.json"
LAUNCH_SCRIPT = "launch.sh"
JOIN_SCRIPT = "join.sh"                # elastic torchrun: what a joining host runs
COMMITS = "elastic"                    # elastic torchrun: each agent's last committed state

METRIC_FIELDS = ("kind", "step", "epoch", "lr", "loss", "accuracy", "images_per_sec", "elapsed_s", "noise_scale")
TRUST_FIELDS = ("step", "layer", "trust_ratio")
# files that show a folder holds a run (a folder `largebatch run` or `largebatch sbatch` has just
# created holds only launch.sh, job.sbatch, slurm-*.out)
RUN_FILES = (SUMMARY, METRICS, METRICS_JSONL, TRUST_RATIOS, CONFIG)


def json_safe(values: dict) -> dict:
    """``values`` with non-finite floats as None (JSON has no NaN; metrics.csv shows them empty)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}


def write_summary(run_dir: str, values: dict) -> None:
    """summary.json, replaced atomically (a reader sees the old file or the new one, never half of
    one); non-finite numbers are written as null."""
    values = json_safe(values)
    path = os.path.join(run_dir, SUMMARY)
    tmp = os.path.join(run_dir, f".{SUMMARY}.tmp")
    with open(tmp, "w") as fh:
        json.dump(values, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


def read_summary(run_dir: str):
    """summary.json as a dict, or None when there is none (or it does not parse)."""
    try:
        with open(os.path.join(run_dir, SUMMARY)) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def holds_run(run_dir: str):
    """What shows that ``run_dir`` holds a run (``'summary.json'``, ``'checkpoints/'``, ...), or
    None: no such folder, an empty one, or one just created for this run."""
    if not os.path.isdir(run_dir):
        return None
    for name in RUN_FILES:
        if os.path.exists(os.path.join(run_dir, name)):
            return name
    if checkpoint.list_checkpoints(os.path.join(run_dir, CHECKPOINTS)):
        return f"{CHECKPOINTS}/"
    tb = os.path.join(run_dir, TENSORBOARD)
    if os.path.isdir(tb) and any(n.startswith("events.out.tfevents.") for n in os.listdir(tb)):
        return f"{TENSORBOARD}/"
    return None


def run_dir_refusal(run_dir: str, found: str) -> str:
    """The one line for a run directory that holds another run."""
    return (f"output.run_dir: {run_dir} holds another run ({found}); give this run a fresh output.run_dir, "
            f"or set train.resume=auto (or train.resume=PATH) to continue that one")


def fresh_run_dir(base: str) -> str:
    """``base`` if it does not exist, else the first of ``base-2``, ``base-3``, ... that does not."""
    candidate, n = base, 1
    while os.path.exists(candidate):
        n += 1
        candidate = f"{base}-{n}"
    return candidate


class RunDirTaken(ValueError):
    """An explicit ``output.run_dir`` holds another run and this one would not continue it; the
    message is the one line to show (:func:`run_dir_refusal`)."""


def base_run_dir(output: dict, name: str) -> str:
    """``output.run_dir``, else ``<output.dir>/<name>``, absolute (the same on every rank)."""
    return os.path.abspath(output["run_dir"] or os.path.join(output["dir"], name))


def resume_path(resume: str, run_dir: str):
    """The checkpoint ``train.resume`` names: None for ``none`` (and for ``auto`` in a run
    directory without checkpoints), the newest in ``run_dir`` for ``auto``, else the path given."""
    if resume == "none":
        return None
    if resume == "auto":
        return checkpoint.latest(os.path.join(run_dir, CHECKPOINTS))
    return resume


def choose_run_dir(cfg: dict, *, create: bool = False, requeue: bool = False, launching: bool = False):
    """Where a run writes: ``(path, note)``, the one rule for ``largebatch run``, ``largebatch
    sbatch`` and the ranks started by hand. A run never writes over another run's files:

    - an explicit ``output.run_dir`` is used; if it holds another run and this one does not
      continue it (``train.resume`` none, and not a requeued Slurm job), :class:`RunDirTaken`;
    - the default ``<output.dir>/<name>`` is continued by ``train.resume=auto`` (or a checkpoint
      inside it), used when it holds no run, and else becomes the first free ``<name>-2``,
      ``-3``, ... (``note`` says so; ``create=True`` makes the folder, so that two runs cannot
      pick the same one). ``launching`` (``largebatch run`` / ``sbatch``, which then name the
      folder to the ranks): any existing default folder counts as taken, since a launch that
      stopped before its first step leaves one with only ``launch.sh``."""
    out, resume = cfg["output"], cfg["train"]["resume"]
    path = base_run_dir(out, cfg["name"])
    if out["run_dir"]:
        found = None if resume != "none" or requeue else holds_run(path)
        if found:
            raise RunDirTaken(run_dir_refusal(path, found))
        return path, None
    continues = resume == "auto" or (resume != "none" and os.path.abspath(resume).startswith(path + os.sep))
    found = None if continues else holds_run(path)
    if found is None and launching and not continues and os.path.exists(path):
        found = "an earlier launch"
    if found is None:
        return path, None
    while True:
        fresh = fresh_run_dir(path)
        if not create:
            break
        try:
            os.makedirs(fresh)
            break
        except FileExistsError:          # another run took it in between
            continue
    return fresh, f"{path} holds another run ({found}); this run writes to {fresh}"
