"""The training loop's skeleton, shared by the torch and Keras runners.

The driver (:mod:`.driver`) sets a run up; a framework part drives its own steps (a Python loop
for torch, ``model.fit`` for Keras). Everything around a step is here, once:

- after every optimizer update (:meth:`TrainingLoop.after_step`): the loss averaged over ranks,
  images/s, metrics and trust ratios every ``train.log_every`` steps, progress, the divergence
  stop, the rank-consistency check every ``train.check_ranks_every`` steps, and the agreed stop
  (a signal on any rank: every rank stops after the same step, rank 0 checkpoints);
- at the end of an epoch (:meth:`TrainingLoop.end_epoch`): evaluation and the checkpoint;
- at the end (:meth:`TrainingLoop.finish`): summary.json, the world record (hosts, identical
  weights), the closing line and the exit code; and the summary when a signal ends the run.

The framework part hands over what differs in a :class:`Hooks` (evaluation, checkpoint writer,
trust ratios, rank check, weights); the collectives are the engine's :class:`~.comm.Comm`.
"""
import math
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

from largebatch.config import ConfigError, elastic_accumulation
from largebatch.consistency import RankDivergenceError
from largebatch.noise_scale import AdaScaleClock, NoiseScale, batch_tradeoff

from . import lifeline
from .commits import discard_commit, own_commit, writes_commits
from .common import (Progress, RunLog, Throughput, announce_resume, claim_run_dir, datasets_and_steps, make_schedule,
                     save_run_checkpoint, summary_dict, versions, weights_digest, world_record)

__all__ = ["Hooks", "TrainingLoop", "prepare", "accumulation_for", "measures_noise"]


def measures_noise(cfg, size, accumulation) -> bool:
    """True when a run measures the gradient noise scale: ``train.noise_scale`` and two batch sizes
    to compare (several ranks, or accumulation on one)."""
    return bool(cfg["train"]["noise_scale"]) and (size > 1 or accumulation > 1)


def accumulation_for(derived, size, elastic):
    """Accumulation steps on ``size`` ranks: the configured ones, or (elastic) those that keep the
    global batch with the launch's per-worker batch."""
    if not elastic:
        return derived["accumulation_steps"]
    acc = elastic_accumulation(derived["global_batch"], derived["per_worker_batch"], size)
    if acc is None:
        raise ConfigError([f"launcher.elastic: world size {size} cannot keep the global batch "
                           f"{derived['global_batch']} with {derived['per_worker_batch']} samples per rank"])
    return acc


def world_size_note(declared, actual):
    """The line saying what a world size other than the experiment's changed (its ``derived``
    values before and after): a run started without ``largebatch run``, as a plain python say."""
    return (f"largebatch: the experiment says {declared['np']} rank(s), this job has {actual['np']}: global batch "
            f"{declared['global_batch']} -> {actual['global_batch']} ({actual['per_worker_batch']} per rank x "
            f"{actual['np']} x {actual['accumulation_steps']} accumulation), peak lr {declared['peak_lr']:g} -> "
            f"{actual['peak_lr']:g}; set batch.global to keep the global batch")


def prepare(exp, loader, comm, *, elastic=False):
    """Once the engine runs: the experiment for the real world size (``loader(size)``, unless an
    elastic job, whose size changes), this rank's data, the schedule and the claimed run
    directory. Returns (exp, train_set, val_set, schedule, run_dir)."""
    if not elastic and exp.derived["np"] != comm.size():
        before = exp.derived
        exp = loader(comm.size())
        if comm.rank() == 0:           # the launcher's environment said otherwise
            print(world_size_note(before, exp.derived), file=sys.stderr, flush=True)
    train_set, val_set = datasets_and_steps(exp)
    schedule = make_schedule(exp)
    run_dir = claim_run_dir(exp, comm, elastic)    # never over another run's files
    return exp, train_set, val_set, schedule, run_dir


@dataclass
class Hooks:
    """What a framework gives the loop. ``evaluate()``: {'loss', 'accuracy'} over the validation set
    (every rank; None when there is none); ``save(path, model, optimizer, **kw)``: the adapter's
    save_checkpoint; ``weights()``: the parameters as NumPy arrays, in order; ``check_ranks(label)``
    raises RankDivergenceError; ``trust_ratios()``: {layer: ratio}."""
    save: Callable
    model: object
    optimizer: Callable                  # () -> the optimizer to checkpoint (Keras wraps it late)
    weights: Callable
    evaluate: Optional[Callable] = None
    check_ranks: Optional[Callable] = None
    trust_ratios: Optional[Callable] = None


class TrainingLoop:
    """The shared part of one rank's run (see the module docstring). ``step`` is the optimizer
    updates done; ``status`` is 'completed' until something stops the run ('diverged',
    'nonfinite', 'ranks_diverged', 'stopped')."""

    def __init__(self, exp, hooks, comm, *, run_dir, accumulation, threads, resumed, schedule,
                 track_trust_ratios, check_ranks=True, elastic=False, file_commits=False):
        cfg, d = exp.cfg, exp.derived
        self.exp, self.hooks, self.run_dir, self.threads, self.schedule = exp, hooks, run_dir, threads, schedule
        self.comm, self.rank, self.size = comm, comm.rank(), comm.size()
        self.total, self.steps_per_epoch, self.global_batch = d["total_steps"], d["steps_per_epoch"], d["global_batch"]
        self.log_every, self.checkpoint_every = cfg["train"]["log_every"], cfg["output"]["checkpoint_every"]
        self.check_every = cfg["train"]["check_ranks_every"] if check_ranks and hooks.check_ranks else 0
        self.track = track_trust_ratios and hooks.trust_ratios is not None
        self.resumed = resumed
        self.elastic, self.resets, self.accumulation = elastic, [], accumulation
        self.file_commits = file_commits              # torchrun elastic: commits are files (.commits)
        self.commit_every = cfg["train"]["commit_every"]
        self.status, self.stopped_by, self.checkpoint = "completed", None, None
        self.final_loss, self.eval_result = float("nan"), None
        self.step = self.logged = int(resumed["step"]) if resumed else 0
        self.log = RunLog(run_dir, exp, self.rank, append=resumed is not None)
        self.log.write_config()
        self.progress = Progress(self.total, cfg["output"]["progress"], cfg["name"], self.rank)
        self.rate = Throughput()
        self.started = time.perf_counter()
        # training time of the launches before this one (a resumed run), carried in checkpoints
        self.earlier_time = float(resumed["extra"].get("training_time_s", 0.0)) if resumed else 0.0
        if resumed is not None and resumed.get("commit"):
            # torchrun restarted the job (a rank failed, a host left or joined): its history goes on
            self.resets = list(resumed["extra"].get("elastic_resets", []))
            self.rebind(self.step)
            self.progress.update(self.step)
        elif resumed is not None:
            announce_resume(resumed, self.rank, self.steps_per_epoch)
            self.progress.update(self.step)
        self.noise = self._noise_scale(cfg, d, resumed)
        self.adascale = self._adascale(cfg, d, resumed)
        self.current_lr = None
        self._pending_noise = None
        lifeline.set_on_signal(self._on_signal)
        lifeline.set_graceful()

    # -- the gradient noise scale (largebatch.noise_scale) ----------------------------------
    def _noise_scale(self, cfg, d, resumed):
        """A NoiseScale when there are two batch sizes to compare: several ranks (each rank's
        gradient against the average), or one rank with accumulation (one micro-batch against the
        update); None otherwise or with ``train.noise_scale: false``."""
        if not measures_noise(cfg, self.size, self.accumulation):
            return None
        noise = NoiseScale()
        state = (resumed or {}).get("extra", {}).get("noise_scale")
        if state:
            noise.load_state_dict(state)
        return noise

    def _adascale(self, cfg, d, resumed):
        """AdaScale's clock (schedule.adascale), resumed with the run."""
        if not cfg["schedule"]["adascale"]:
            return None
        clock = AdaScaleClock(scale=d["adascale_scale"], base_steps=d["adascale_base_steps"],
                              base_batch=cfg["schedule"]["base_batch"])
        state = (resumed or {}).get("extra", {}).get("adascale")
        if state:
            clock.load_state_dict(state)
        return clock

    def adascale_lr(self):
        """This update's rate under AdaScale: the gain from the noise measured so far (up to the
        previous update: its norms are reduced with the stop flag after the step) times the base
        schedule at the clock's iteration."""
        gain = self.adascale.gain(self.noise)
        self.current_lr = gain * float(self.schedule(min(int(self.adascale.tau), int(self.adascale.base_steps) - 1)))
        return self.current_lr

    @property
    def noise_from_micro_batch(self):
        """True when the small gradient is one micro-batch's (one rank), else each rank's own."""
        return self.size == 1

    def noise_batches(self):
        """(B_small, B_big) of :meth:`noise_sample`'s two gradients."""
        pw = self.exp.derived["per_worker_batch"]
        if self.size == 1:
            return pw, pw * self.accumulation
        return pw * self.accumulation, pw * self.accumulation * self.size

    def noise_sample(self, small_sq, big_sq):
        """One update's squared gradient norms: ``small_sq`` this rank's gradient before the
        average (or one micro-batch's, on one rank), ``big_sq`` the averaged one's. The small ones
        are averaged over ranks in the update's stop-flag allreduce (:meth:`after_step`): no
        collective of their own."""
        self._pending_noise = (float(small_sq), float(big_sq))

    def noise_line(self):
        """What the measured noise scale says about this run's global batch (McCandlish et al. 2018)."""
        value = self.noise.value if self.noise is not None else None
        if value is None or not value > 0:
            return None
        steps, examples = batch_tradeoff(value, self.global_batch)
        return (f"gradient noise scale B_simple ≈ {value:.4g} examples (smoothed, last update {self.step}); global "
                f"batch {self.global_batch}: by McCandlish et al.'s model {steps:.2f}× the fewest steps and "
                f"{examples:.2f}× the fewest examples to the same loss"
                + ("; a larger batch would still cut the steps" if value > self.global_batch else
                   "; past the noise scale a larger batch buys few steps"))

    # -- during training ------------------------------------------------------------------
    def say(self, text):
        self.progress.write(text)

    def seek(self, step):
        """Training goes on from ``step`` (a resumed run, an elastic restart from its commit)."""
        self.step = self.logged = step
        self.progress.seek(step)

    def after_step(self, step, epoch, local_loss, extra):
        """Update ``step`` (1-based) of epoch ``epoch`` (0-based) is done. ``local_loss()``: this
        rank's mean training loss since the last logged step; ``extra()``: what a checkpoint
        written now carries. Returns False when the run must stop (``status`` says why)."""
        self.step = step
        self.progress.update(1)
        stop = self._agree_on_stop_and_noise()
        if self.adascale is not None:
            self.adascale.advance()
            if self.adascale.done:          # the base run's iterations are done: this is the last update
                self.total = step
        if step % self.log_every == 0 or step >= self.total:
            if not self._log_step(step, local_loss()):
                return False
        if self.check_every and step % self.check_every == 0:
            try:
                self.hooks.check_ranks(f"step {step}")
            except RankDivergenceError as err:
                return self._stop("ranks_diverged", f"largebatch: {err}; stopping")
        if stop:
            self.stopped_by = signal.Signals(stop).name
            if self.rank == 0 and step < self.total:
                self.checkpoint = self._save(step, epoch + 1, extra())
            if self.file_commits and step < self.total:     # torchrun's agent may be restarting the job
                self.commit_file(step, extra())
            return self._stop("stopped", f"largebatch: {self.stopped_by}: stopped after step {step}"
                              + (" and committed (torchrun's agent stops the ranks to restart them when a host "
                                 "joins or leaves)" if self.file_commits else "")
                              + (f", checkpoint {self.checkpoint}" if self.checkpoint else ""))
        return True

    def _agree_on_stop_and_noise(self):
        """One small allreduce per update: a stop signal on any rank (every rank then stops after
        this same update; the highest signal number wins, as a maximum would) and, when measuring
        the noise scale, the ranks' squared gradient norms. Returns the signal number or 0."""
        signals = lifeline.STOP_SIGNALS
        mine = lifeline.stop_requested()
        values = [1.0 if mine == s else 0.0 for s in signals]
        pending, self._pending_noise = self._pending_noise, None
        if pending is not None:
            values.append(pending[0])
        reduced = self.comm.sum(values, name="largebatch.stop") if self.size > 1 else values
        if pending is not None:
            self.noise.update(reduced[-1] / self.size, pending[1], *self.noise_batches())
        return max((int(s) for s, n in zip(signals, reduced) if n > 0), default=0)

    def _log_step(self, step, local_loss):
        self.final_loss = loss = self.comm.mean(local_loss, name="largebatch.loss")
        # the rate this update used
        lr = self.current_lr if self.adascale is not None else float(self.schedule(step - 1))
        ips = self.rate.tick(self.global_batch * max(step - self.logged, 0))
        self.logged = step
        noise = {"noise_scale": self.noise.value} if self.noise is not None and self.noise.value is not None else {}
        self.log.metrics("train", step, step / self.steps_per_epoch, lr=lr, loss=loss, images_per_sec=ips, **noise)
        if self.track and self.log.active:
            self.log.trust_ratios(step, {k: float(v) for k, v in self.hooks.trust_ratios().items()})
        self.progress.update(0, step=step, loss=loss, lr=lr, img_s=round(ips, 1))
        if not math.isfinite(loss):
            return self._stop("diverged", f"step {step}: loss is {loss}; stopping (diverged)")
        return True

    def _stop(self, status, line):
        self.status = status
        self.say(line)
        return False

    def stop_nonfinite(self, line):
        """A NaN/Inf step with ``train.on_nonfinite: stop``."""
        return self._stop("nonfinite", line)

    def end_epoch(self, epochs_done, extra):
        """Epoch ``epochs_done`` (1-based) ended: evaluate, then checkpoint (every
        ``output.checkpoint_every`` epochs and at the end), on a run still going."""
        if self.status != "completed":
            return
        step = self.step
        if self.hooks.evaluate is not None and self.exp.cfg["train"]["eval"]:
            self.eval_result = ev = self.hooks.evaluate()
            self.log.metrics("eval", step, step / self.steps_per_epoch, loss=ev["loss"], accuracy=ev["accuracy"])
            self.say(f"epoch {epochs_done}: eval loss {ev['loss']:.4f}, accuracy {ev['accuracy']:.4f}")
        every = self.checkpoint_every
        if every and (epochs_done % every == 0 or step >= self.total) and self.rank == 0:
            self._save(step, epochs_done, extra())

    def _save(self, step, epoch, extra, path=None):
        extra = {**extra, "training_time_s": self.earlier_time + time.perf_counter() - self.started}
        if self.noise is not None:
            extra = {**extra, "noise_scale": self.noise.state_dict()}
        if self.adascale is not None:
            extra = {**extra, "adascale": self.adascale.state_dict()}
        return save_run_checkpoint(self.log, self.exp, self.hooks.save, self.hooks.model, self.hooks.optimizer(),
                                   step=step, epoch=epoch, extra=extra, path=path)

    def commit_file(self, step, extra):
        """torchrun elastic: this agent's commit of update ``step`` (written by its first rank; a
        restarted job resumes from the freshest commit of any agent, see :mod:`.commits`)."""
        if not writes_commits():
            return
        extra = {**extra, "elastic_resets": self.resets}
        self._save(step, step // self.steps_per_epoch, extra, path=own_commit(self.run_dir))

    def commit_due(self, step):
        """Elastic: commit after update ``step`` (every ``train.commit_every`` updates; an epoch's
        last update commits after its evaluation and checkpoint instead, the last one not at all)."""
        return self.elastic and step % self.commit_every == 0 and step % self.steps_per_epoch and step < self.total

    def rebind(self, step):
        """An elastic reset: this process is now ``comm.rank()`` of ``comm.size()``, with the
        accumulation steps that keep the global batch (``self.accumulation``), going on from
        ``step`` (it logs if it became rank 0; the reset is recorded in summary.json's
        ``elastic.resets``)."""
        cfg, d = self.exp.cfg, self.exp.derived
        rank, size = self.comm.rank(), self.comm.size()
        accumulation = accumulation_for(d, size, self.elastic)
        if (rank == 0) != self.log.active:      # the former rank 0 left: this process logs now
            self.log.close()
            self.log = RunLog(self.run_dir, self.exp, rank, append=True)
            self.progress.close()
            self.progress = Progress(self.total, cfg["output"]["progress"], cfg["name"], rank)
        self.rank, self.size, self.accumulation = rank, size, accumulation
        self.resets.append({"step": step, "world_size": size})
        if rank == 0:
            print(f"largebatch: world size is now {size}; global batch {d['global_batch']} kept as "
                  f"{d['per_worker_batch']} per rank × {size} ranks × {accumulation} accumulation steps; "
                  f"continuing from step {step}", file=sys.stderr, flush=True)

    # -- the end ----------------------------------------------------------------------------
    def _summary(self, status):
        wall = time.perf_counter() - self.started
        summary = summary_dict(self.exp, status=status, steps=self.step, epochs_done=self.step / self.steps_per_epoch,
                               final_loss=self.final_loss, eval_result=self.eval_result,
                               throughput=self.rate.steady(), wall=wall, threads=self.threads,
                               framework_versions=versions(self.exp.cfg["framework"]), size=self.size)
        # wall_time_s: this launch's training (start-up not included); with the launches a resumed
        # run went through before, up to the checkpoint it resumed from
        summary["training_time_total_s"] = round(self.earlier_time + wall, 3)
        return summary

    def _on_signal(self, name):
        """Rank 0's summary when a signal stops the run (called on the signal thread)."""
        if self.log.active:
            summary = self._summary("stopped")
            summary["stopped_by"] = name
            self.log.summary(summary)

    def finish(self, skipped_steps, **fields):
        """Write summary.json (``fields`` added), close the run directory, print the closing line
        on rank 0; return the exit code (0 completed, 128+signal stopped, 1 otherwise)."""
        self.progress.close()
        summary = self._summary(self.status)
        summary["skipped_steps"] = skipped_steps
        summary["resumed_from"] = self.resumed["path"] if self.resumed and not self.resumed.get("commit") else None
        if self.status == "stopped":
            summary.update(stopped_by=self.stopped_by, checkpoint=self.checkpoint)
        if self.status == "completed":
            summary.update(world_record(self.comm.allgather_object, weights_digest(self.hooks.weights())))
        if self.elastic:
            d = self.exp.derived
            fields = dict(fields, accumulation_steps=self.accumulation,
                          elastic={"min_np": d["min_np"], "max_np": d["max_np"], "resets": self.resets})
        summary.update(fields)
        summary["noise_scale"] = self.noise.value if self.noise is not None else None
        summary["parameters"] = int(sum(w.size for w in self.hooks.weights()))      # what a step sends (largebatch plan)
        if self.adascale is not None:
            a = self.adascale
            summary["adascale"] = {"scale": a.scale, "base_steps": a.base_steps, "steps": self.step,
                                   "scale_invariant_iterations": a.tau, "mean_gain": a.mean_gain}
        self.log.summary(summary)
        self.log.close()
        if self.file_commits and self.status == "completed" and writes_commits():
            discard_commit(self.run_dir, every_agent=self.rank == 0)
        if self.rank == 0:
            line = self.noise_line()
            if line:
                print(line, flush=True)
            ev = self.eval_result
            print(f"run dir: {self.run_dir} ({self.status}, {self.step} steps, loss {self.final_loss:.4g}"
                  + (f", eval accuracy {ev['accuracy']:.4f}" if ev else "") + ")", flush=True)
        if self.status == "stopped":
            return lifeline.stop_exit_code(signal.Signals[self.stopped_by])
        return 0 if self.status == "completed" else 1
