"""What the torch and Keras runners share: the run directory, metrics, schedule, summary.

The run directory (written by rank 0 only) has the format of :mod:`largebatch.rundir`: trust
ratios every train.log_every steps, a checkpoint every output.checkpoint_every epochs and at the
end (the newest output.checkpoint_keep kept), summary.json last.
"""
import csv
import json
import os
import platform
import sys
import time

from largebatch import __version__, rundir
from largebatch.config import dump_yaml, run_length
from largebatch.schedules import build_schedule

__all__ = ["RunLog", "make_schedule", "Progress", "Throughput", "versions", "claim_run_dir", "read_resume",
           "progress_mode"]


def make_schedule(exp):
    """lr(step) from the core (scaled peak lr, warmup, decay), for exp.derived's step counts."""
    sch, d = exp.cfg["schedule"], exp.derived
    warm = sch["warmup"] if sch["warmup_epochs"] > 0 else "none"
    # AdaScale: the base run's schedule, over its iterations (S per update at the global batch)
    spe = max(1, round(d["steps_per_epoch"] * d["adascale_scale"])) if sch["adascale"] else d["steps_per_epoch"]
    try:
        return build_schedule(peak_lr=d["peak_lr"], steps_per_epoch=spe, epochs=d["epochs"],
                              warmup=warm, warmup_epochs=sch["warmup_epochs"],
                              warmup_start_lr=d.get("warmup_start_lr"), decay=sch["decay"], power=sch["power"],
                              end_lr=sch["end_lr"], milestones=sch["milestones"], factor=sch["factor"])
    except ValueError as err:
        from largebatch.config import ConfigError
        raise ConfigError([f"schedule.{err}"]) from None


def versions(framework):
    out = {"python": platform.python_version(), "largebatch": __version__}
    for name in (("torch",) if framework == "torch" else ("tensorflow", "keras")) + ("horovod", "numpy"):
        module = sys.modules.get(name)
        if module is not None:
            out[name] = getattr(module, "__version__", "?")
    return out


class Throughput:
    """Images per second between calls of :meth:`tick` (global images, rank 0's clock)."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.rates = []

    def tick(self, images):
        now = time.perf_counter()
        rate = images / max(now - self.last, 1e-9)
        self.last = now
        self.rates.append(rate)
        return rate

    def steady(self):
        """Mean rate without the first interval (start-up, first-step allocation)."""
        rates = self.rates[1:] or self.rates
        return sum(rates) / len(rates) if rates else float("nan")


PROGRESS_ENV = "LARGEBATCH_PROGRESS"


def progress_mode(stream=None, env=None):
    """How rank 0 shows progress: ``bar`` (tqdm, redrawn with carriage returns) or ``lines`` (one
    plain line per logged step). ``LARGEBATCH_PROGRESS=bar|lines`` decides (``largebatch run`` sets
    it from its own terminal: a rank's stderr is a pipe to the launcher); else a bar on a terminal
    and lines anywhere else (a log file, a pipe, horovodrun started by hand)."""
    env = os.environ if env is None else env
    mode = env.get(PROGRESS_ENV, "")
    if mode in ("bar", "lines"):
        return mode
    stream = sys.stderr if stream is None else stream
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError, OSError):
        return "lines"


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else v


class Progress:
    """Rank 0's progress (steps, with loss, lr and images/s): a tqdm bar, or a plain line per
    logged step (see :func:`progress_mode`); nothing elsewhere."""

    def __init__(self, total, enabled, desc, rank=0):
        self.bar = None
        self.rank, self.total, self.desc, self.n = rank, total, desc, 0
        self.lines = False
        if enabled and rank == 0:
            if progress_mode() == "bar":
                try:
                    from tqdm import tqdm
                except ImportError:
                    tqdm = None
                if tqdm is not None:
                    self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, mininterval=0.5,
                                    file=sys.stderr, smoothing=0.1)
                    return
            self.lines = True

    def update(self, n=1, step=None, **postfix):
        """``n`` more steps done; ``postfix`` (loss, lr, ...) at a logged step, which is ``step``."""
        self.n += n
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)
            self.bar.update(n)
        elif self.lines and postfix:
            step = self.n if step is None else step
            values = "  ".join(f"{k} {_fmt(v)}" for k, v in postfix.items())
            print(f"{self.desc}: step {step}/{self.total}  {values}", file=sys.stderr, flush=True)

    def seek(self, n):
        """Show step ``n`` (a restart from an elastic commit goes back)."""
        self.n = n
        if self.bar is not None:
            self.bar.n = n
            self.bar.refresh()

    def write(self, text):
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        elif self.rank == 0:
            print(text, file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class RunLog:
    """The run directory's files; a no-op on ranks other than 0."""

    def __init__(self, run_dir, exp, rank, append=False):
        """``append=True`` (a resumed run): keep the metrics, trust ratios and event files."""
        self.run_dir, self.exp, self.active, self.append = run_dir, exp, rank == 0, append
        self._csv = self._jsonl = self._trust = self._trust_csv = self.tb = None
        self.t0 = time.perf_counter()
        if not self.active:
            return
        os.makedirs(run_dir, exist_ok=True)
        for stale in (rundir.SUMMARY,) + (() if append else (rundir.TRUST_RATIOS,)):   # a rerun into the same dir
            path = os.path.join(run_dir, stale)
            if os.path.exists(path):
                os.remove(path)
        metrics = os.path.join(run_dir, rundir.METRICS)
        keep = append and os.path.exists(metrics) and os.path.getsize(metrics) > 0
        self._csv_fh = open(metrics, "a" if keep else "w", newline="")
        self._csv = csv.DictWriter(self._csv_fh, rundir.METRIC_FIELDS)
        if not keep:
            self._csv.writeheader()
        self._jsonl = open(os.path.join(run_dir, rundir.METRICS_JSONL), "a" if keep else "w")
        from .tbevents import available
        missing = available() if exp.cfg["output"]["tensorboard"] else None
        if missing:
            print(f"largebatch: output.tensorboard: no event file: {missing} (or set output.tensorboard=false)",
                  file=sys.stderr, flush=True)
        elif exp.cfg["output"]["tensorboard"]:
            from .tbevents import EventWriter
            tb_dir = os.path.join(run_dir, rundir.TENSORBOARD)
            if os.path.isdir(tb_dir) and not append:   # a rerun into the same directory replaces the run
                for name in os.listdir(tb_dir):
                    if name.startswith("events.out.tfevents."):
                        os.remove(os.path.join(tb_dir, name))
            self.tb = EventWriter(tb_dir)

    def path(self, *parts):
        return os.path.join(self.run_dir, *parts)

    def write_config(self):
        if self.active:
            with open(self.path(rundir.CONFIG), "w") as fh:
                fh.write("# resolved by largebatch: every key with its value, plus derived values\n")
                fh.write("# `largebatch run` on this file repeats the run into a new run directory\n")
                resolved = self.exp.resolved()
                resolved["output"]["run_dir"] = None
                resolved["derived"]["run_dir"] = self.run_dir
                fh.write(dump_yaml(resolved))

    def metrics(self, kind, step, epoch, **values):
        if not self.active:
            return
        row = {"kind": kind, "step": step, "epoch": round(epoch, 4),
               "elapsed_s": round(time.perf_counter() - self.t0, 3), **values}
        row = rundir.json_safe(row)
        self._csv.writerow({k: row.get(k) for k in rundir.METRIC_FIELDS})
        self._csv_fh.flush()
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self.tb is not None:
            self.tb.scalars(step, {f"{kind}/{k}": v for k, v in values.items()
                                   if isinstance(v, (int, float)) and v is not None})
            self.tb.flush()

    def trust_ratios(self, step, ratios):
        if not self.active or not ratios:
            return
        if self._trust is None:
            path = self.path(rundir.TRUST_RATIOS)
            keep = self.append and os.path.exists(path) and os.path.getsize(path) > 0
            self._trust_fh = open(path, "a" if keep else "w", newline="")
            self._trust = csv.writer(self._trust_fh)
            if not keep:
                self._trust.writerow(rundir.TRUST_FIELDS)
        for name, value in ratios.items():
            self._trust.writerow([step, name, f"{value:.6g}"])
        self._trust_fh.flush()
        if self.tb is not None:
            self.tb.scalars(step, {f"trust_ratio/{k}": v for k, v in ratios.items()})

    def checkpoint_path(self, name):
        os.makedirs(self.path(rundir.CHECKPOINTS), exist_ok=True)
        return self.path(rundir.CHECKPOINTS, name)

    def summary(self, values):
        if self.active:
            rundir.write_summary(self.run_dir, values)

    def close(self):
        if not self.active:
            return
        for fh in (getattr(self, "_csv_fh", None), self._jsonl, getattr(self, "_trust_fh", None)):
            if fh is not None:
                fh.close()
        if self.tb is not None:
            self.tb.close()


def summary_dict(exp, *, status, steps, epochs_done, final_loss, eval_result, throughput, wall, threads,
                 framework_versions, size):
    c, d = exp.cfg, exp.derived
    return {
        "name": c["name"], "status": status, "framework": c["framework"], "model": d["model"],
        "optimizer": c["optimizer"]["name"], "data": c["data"]["kind"], "ranks": size,
        "per_worker_batch": d["per_worker_batch"], "accumulation_steps": d["accumulation_steps"],
        "global_batch": d["global_batch"], "base_lr": c["schedule"]["base_lr"], "peak_lr": d["peak_lr"],
        "steps_per_epoch": d["steps_per_epoch"], "total_steps": d["total_steps"], "steps_done": steps,
        "epochs_done": round(epochs_done, 4), "final_train_loss": final_loss,
        "final_eval_loss": eval_result.get("loss") if eval_result else None,
        "final_eval_accuracy": eval_result.get("accuracy") if eval_result else None,
        "images_per_sec": throughput, "wall_time_s": round(wall, 3),
        "threads_per_rank": threads[0], "interop_threads": threads[1], "threads_reason": threads[2],
        "versions": framework_versions,
    }


def weights_digest(arrays):
    """SHA-1 of the parameters' bytes, in order: equal digests mean bit-identical weights."""
    import hashlib
    h = hashlib.sha1()
    for a in arrays:
        h.update(memoryview(a).cast("B") if a.flags.c_contiguous else a.tobytes())
    return h.hexdigest()


def world_record(allgather_object, digest):
    """Which host each rank ran on and whether the ranks' final weights are bit-identical,
    for summary.json (one small allgather at the end of the run, on every rank)."""
    gathered = allgather_object((platform.node(), digest))
    hosts = [h for h, _ in gathered]
    return {"hosts": hosts, "weights_sha1": gathered[0][1],
            "ranks_agree": all(d == gathered[0][1] for _, d in gathered)}


def datasets_and_steps(exp):
    """Build this rank's datasets and fill ``exp.derived`` with steps_per_epoch and total_steps
    (and epochs, for a step budget). Shared by the torch and Keras runners."""
    from largebatch.config import ConfigError
    from .data import DataError, build_datasets
    cfg, derived = exp.cfg, exp.derived
    try:
        train_set, val_set = build_datasets(cfg, derived)
    except DataError as err:
        raise ConfigError([str(err)]) from None
    gb = derived["global_batch"]
    spe = len(train_set) // gb
    if spe < 1:
        key = "data.factory" if cfg["data"]["kind"] == "python" else "data.path"
        raise ConfigError([f"{key}: expected at least the global batch ({gb}) samples for one step, "
                           f"got {len(train_set)}"])
    derived["steps_per_epoch"] = spe
    derived.update(run_length(cfg, spe, gb))
    return train_set, val_set


def claim_run_dir(exp, comm, elastic=False):
    """Rank 0 decides where the run writes (:func:`largebatch.rundir.choose_run_dir`, the folder
    created); every rank gets the answer (or the refusal: ConfigError, exit 2, on every rank,
    before anything is written). Horovod Elastic ranks skip it (a rank joining later could not
    take part in the broadcast): ``largebatch run`` checks the folder before it launches."""
    from largebatch.config import ConfigError
    if elastic:
        return rundir.base_run_dir(exp.cfg["output"], exp.cfg["name"])
    answer = None
    if comm.rank() == 0:
        try:
            answer = rundir.choose_run_dir(exp.cfg, create=True) + (None,)
        except rundir.RunDirTaken as err:
            answer = (None, None, str(err))
    path, note, problem = comm.broadcast_object(answer, name="largebatch.run_dir")
    if problem:
        raise ConfigError([problem])
    if note and comm.rank() == 0:
        print(f"largebatch: {note}", file=sys.stderr, flush=True)
    return path


def read_resume(cfg, run_dir, comm, load, rng_state, commit=None):
    """Rank 0 resolves ``train.resume`` and calls ``load(path, cfg_hash)`` (the adapter's
    load_checkpoint, filling model and optimizer in place); every rank gets the same
    ``{path, step, epoch, extra, warning, rng, commit}`` (or None). ``commit``: (rank 0's path,
    step) of a torchrun elastic job's freshest commit, taken instead (``commit`` True). A bad
    checkpoint raises ConfigError (exit 2) on every rank, before anything in the run directory is
    written."""
    from largebatch import checkpoint as core
    from largebatch.config import ConfigError
    path = commit[0] if commit is not None else rundir.resume_path(cfg["train"]["resume"], run_dir)
    info, error = None, None
    if path is not None and comm.rank() == 0:
        try:
            got = load(path, core.config_hash(cfg))
            info = {"path": os.path.abspath(path), "step": got["step"], "epoch": got["epoch"],
                    "extra": got["extra"], "warning": got["warning"], "rng": rng_state(),
                    "commit": commit is not None}
        except core.CheckpointError as err:
            error = f"train.resume: {err}" if commit is None else f"elastic commit: {err}"
    if cfg["train"]["resume"] != "none" or commit is not None:    # every rank takes part (other hosts)
        info, error = comm.broadcast_object((info, error), name="largebatch.resume")
    if error:
        raise ConfigError([error])
    return info


def announce_resume(resumed, rank, steps_per_epoch):
    """Rank 0 says where a resumed run starts (and any config-hash warning), on stderr."""
    if rank != 0:
        return
    if resumed["warning"]:
        print(f"largebatch: {resumed['warning']}", file=sys.stderr, flush=True)
    step = int(resumed["step"])
    print(f"largebatch: resumed from {resumed['path']} at step {step} ({epoch_position(step, steps_per_epoch)})",
          file=sys.stderr, flush=True)


def epoch_position(step, steps_per_epoch):
    """Where update ``step`` is, in the 1-based epochs checkpoint files are named by: 'end of
    epoch 18', or 'epoch 19, 23 of its 32 steps done'."""
    done, into = divmod(step, steps_per_epoch)
    if into == 0:
        return f"end of epoch {done}"
    return f"epoch {done + 1}, {into} of its {steps_per_epoch} steps done"


def save_run_checkpoint(log, exp, save, model, optimizer, *, step, epoch, extra, path=None):
    """``checkpoints/epoch-NNNN.pt|.ckpt`` in the run directory with ``save`` (the framework's
    save_checkpoint: atomic, keeps the newest ``output.checkpoint_keep``); call on rank 0. The
    file names the epoch it ends (a partial last epoch included). ``path``: write there instead,
    nothing pruned (a torchrun elastic commit, on each agent's first rank)."""
    from largebatch import checkpoint as core
    cfg = exp.cfg
    keep = cfg["output"]["checkpoint_keep"] if path is None else None
    if path is None:
        path = log.checkpoint_path(core.checkpoint_name(epoch, cfg["framework"]))
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    save(path, model, optimizer, step=step, epoch=epoch, config=exp.resolved(), cfg_hash=core.config_hash(cfg),
         model_name=exp.derived["model"], extra=extra, keep=keep)
    return path
