"""The Keras 3 training loop each rank runs: ``model.fit`` with largebatch.keras.

Gradients are averaged by ``largebatch.keras.DistributedOptimizer`` (Horovod's own Keras
optimizer does not average under Keras 3), variables are broadcast from rank 0 by
``largebatch.keras.callbacks.BroadcastGlobalVariables``, the learning rate follows the core's
schedule through ``largebatch.keras.callbacks.LearningRateSchedule`` (per optimizer update,
with momentum correction), and the runner's callback logs, evaluates and checkpoints.

Checkpoints (``checkpoints/epoch-NNNN.ckpt``, :mod:`largebatch.keras.checkpoint`) hold the model's
and the optimizer's variables, step, epoch, RNG states and the resolved configuration;
``train.resume`` loads one on rank 0 before anything in the run directory is written (the
broadcast callback then sends rank 0's variables to every rank) and training continues at the
saved step, inside the saved epoch if need be. NaN/Inf gradients (or trust ratios) are caught by
the optimizer's in-graph guard and reported by ``largebatch.keras.callbacks.NonFiniteGuard``
(``train.on_nonfinite``).
"""
import importlib
import math
import signal
import time

import numpy as np

from largebatch.config import ConfigError
from largebatch.horovod_support import import_horovod
from largebatch.policy import ParamPolicy
from . import faults, lifeline
from .common import (Progress, RunLog, Throughput, announce_resume, claim_run_dir, datasets_and_steps,
                     make_schedule, read_resume, save_run_checkpoint, summary_dict, versions, weights_digest,
                     world_record)
from .data import Prefetcher, epoch_batches, eval_batches
from .entry import run_dir_of

__all__ = ["run", "build_model", "build_optimizer"]


def build_model(cfg, derived):
    import keras
    lbk_models = importlib.import_module("largebatch.keras.models")
    name, classes = cfg["model"]["name"], derived["num_classes"]
    shape = (derived["image_size"], derived["image_size"], cfg["data"]["channels"])
    seed = cfg["train"]["seed"]
    if name == "small_cnn":
        return lbk_models.small_cnn(input_shape=shape, num_classes=classes, batch_norm=cfg["model"]["batch_norm"],
                                    seed=seed)
    if name == "small_resnet":
        return lbk_models.small_resnet(input_shape=shape, num_classes=classes, seed=seed)
    if name == "resnet50":
        return keras.applications.ResNet50(weights=None, input_shape=shape, classes=classes,
                                           classifier_activation=None)
    raise ConfigError([f"model.name: {name!r} is not available for framework 'keras'"])


def build_optimizer(cfg, model, lr):
    import keras
    o = cfg["optimizer"]
    if o["name"] == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=o["momentum"], nesterov=o["nesterov"],
                                    weight_decay=o["weight_decay"] or None)
    lbk = importlib.import_module("largebatch.keras")
    if o["name"] == "lamb":
        return lbk.LAMB(learning_rate=lr, beta_1=o["betas"][0], beta_2=o["betas"][1], epsilon=o["eps"],
                        weight_decay=o["weight_decay"], exclude=o["exclude"])
    if o["name"] == "clars":
        return lbk.CLARS(learning_rate=lr, momentum=o["momentum"], weight_decay=o["weight_decay"],
                         trust_coefficient=o["trust_coefficient"], eps=o["eps"], nesterov=o["nesterov"],
                         exclude=o["exclude"])
    return lbk.LARS(learning_rate=lr, momentum=o["momentum"], weight_decay=o["weight_decay"],
                    trust_coefficient=o["trust_coefficient"], eps=o["eps"], trust_denominator=o["trust_denominator"],
                    clip=o["name"] == "larc", nesterov=o["nesterov"], exclude=o["exclude"])


def exclude_from_decay(optimizer, cfg, model):
    """Keras SGD: keep weight decay off the tensors the policy excludes (default: ndim <= 1).
    Called on the final (wrapped) optimizer: the exclusion list is not part of get_config()."""
    o = cfg["optimizer"]
    if o["name"] == "sgd" and o["weight_decay"]:
        policy = ParamPolicy.from_spec(o["exclude"])
        excluded = [v for v in model.trainable_variables if not policy.decays(v.path, tuple(v.shape))]
        if excluded:
            optimizer.exclude_from_weight_decay(var_list=excluded)


def training_loss(cfg, num_classes):
    """Cross-entropy on the logits; with ``train.label_smoothing`` ε > 0 against smoothed targets
    (1 - ε on the label, ε / classes everywhere: Keras' ``CategoricalCrossentropy(label_smoothing)``
    and torch's ``CrossEntropyLoss(label_smoothing)`` agree). Evaluation reports the plain loss."""
    import keras
    smoothing = cfg["train"]["label_smoothing"]
    if not smoothing:
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def smoothed_cross_entropy(y_true, logits):
        labels = keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32")
        return keras.losses.categorical_crossentropy(keras.ops.one_hot(labels, num_classes), logits,
                                                     from_logits=True, label_smoothing=smoothing)
    return smoothed_cross_entropy


def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _load_resume(cfg, run_dir, model, optimizer, hvd, rank):
    """Rank 0 reads and checks the checkpoint into model and optimizer (the broadcast callback
    sends its variables to the others before the first step); every rank gets step, epoch, extra
    and RNG (see common.read_resume)."""
    lbk_ckpt = importlib.import_module("largebatch.keras.checkpoint")
    info = read_resume(cfg, run_dir, hvd, rank, rng_state=lbk_ckpt.rng_state,
                       load=lambda path, cfg_hash: lbk_ckpt.load_checkpoint(path, model, optimizer, cfg_hash=cfg_hash))
    if info is not None and rank != 0:
        lbk_ckpt.set_rng_state(info["rng"])
    return info


def run(exp, loader, threads):
    import tensorflow as tf
    t, i, _ = threads
    try:
        tf.config.threading.set_intra_op_parallelism_threads(t)
        tf.config.threading.set_inter_op_parallelism_threads(i)
    except RuntimeError:       # TF already initialised by an import; the environment variables hold
        pass
    import keras
    faults.horovod_timeouts()
    hvd = import_horovod("tensorflow")
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    if exp.derived["np"] != size:
        exp = loader(size)
    cfg, derived = exp.cfg, exp.derived
    lbk = importlib.import_module("largebatch.keras")
    keras.utils.set_random_seed(cfg["train"]["seed"])
    train_set, val_set = datasets_and_steps(exp)
    gb, pw, acc = derived["global_batch"], derived["per_worker_batch"], derived["accumulation_steps"]
    spe = derived["steps_per_epoch"]
    schedule = make_schedule(exp)
    total = derived["total_steps"]

    run_dir = claim_run_dir(exp, run_dir_of(exp), hvd, rank)     # never over another run's files
    model = build_model(cfg, derived)
    optimizer = lbk.DistributedOptimizer(build_optimizer(cfg, model, schedule(0)), accumulation_steps=acc,
                                         nonfinite_guard=True)
    exclude_from_decay(optimizer, cfg, model)
    fault = faults.from_env(rank)
    if fault is not None:
        fault.arm_keras(model, optimizer)          # before the train function is traced
    model.compile(optimizer=optimizer, loss=training_loss(cfg, derived["num_classes"]),
                  metrics=["accuracy"], jit_compile=False)
    if cfg["optimizer"]["name"] == "clars":
        lbk.enable_clars(model)                    # the train step hands CLARS its per-example norms
    optimizer.build(model.trainable_variables)     # its variables exist before a checkpoint is loaded
    resumed = _load_resume(cfg, run_dir, model, optimizer, hvd, rank)   # before anything is written
    log = RunLog(run_dir, exp, rank, append=resumed is not None)
    log.write_config()

    workers = cfg["data"]["loader_workers"]

    class Shard(keras.utils.PyDataset):
        """This rank's micro-batches of one training epoch (``set_epoch`` by the runner's callback
        at every epoch begin: Keras calls ``on_epoch_end`` also once before training starts, so
        counting those calls would be off by one), from micro-batch ``skip`` on (a resumed run
        that starts inside an epoch)."""

        def __init__(self, epoch, skip=0):
            super().__init__(workers=max(1, workers), use_multiprocessing=False)
            self.skip = skip
            self.set_epoch(epoch)

        def set_epoch(self, epoch):
            self.epoch = epoch
            self._batches = epoch_batches(len(train_set), epoch, seed=cfg["train"]["seed"], rank=rank, size=size,
                                          per_worker=pw, accumulation=acc, steps=spe)[self.skip:]

        def __len__(self):
            return spe * acc - self.skip

        def __getitem__(self, index):
            return train_set.batch(self._batches[index], self.epoch, True)

    track = cfg["output"]["trust_ratios"] and hasattr(optimizer, "trust_ratios")
    progress = Progress(total, cfg["output"]["progress"], cfg["name"], rank)
    rate = Throughput()
    state = {"loss": float("nan"), "eval": None, "status": "completed", "step": 0, "logged": 0, "shard": None}
    ckpt_every = cfg["output"]["checkpoint_every"]
    if resumed is not None:
        state["step"] = state["logged"] = int(resumed["step"])
        announce_resume(resumed, rank, spe)
        progress.update(state["step"])

    def evaluate():
        loss_sum = correct = count = 0.0
        batches = eval_batches(len(val_set), rank=rank, size=size, batch=pw)
        for x, y in Prefetcher(val_set, batches, train=False, workers=workers):
            logits = np.asarray(model.predict_on_batch(x), dtype=np.float64)
            logp = _log_softmax(logits)
            loss_sum += float(-logp[np.arange(len(y)), y].sum())
            correct += float((logits.argmax(1) == y).sum())
            count += len(y)
        totals = hvd.allreduce(tf.constant([loss_sum, correct, count], tf.float64), op=hvd.Sum,
                               name="largebatch.eval").numpy()
        return {"loss": totals[0] / max(totals[2], 1), "accuracy": totals[1] / max(totals[2], 1)}

    class RunnerCallback(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.sum_seen, self.n_seen = 0.0, 0
            state["shard"].set_epoch(epoch)          # data order: a function of (seed, epoch)

        def on_train_batch_begin(self, batch, logs=None):
            if fault is not None and batch % acc == 0:
                fault.before_step(int(self.model.optimizer.iterations.numpy()) + 1, self.model)

        def on_train_batch_end(self, batch, logs=None):
            if (batch + 1) % acc:
                return
            step = int(self.model.optimizer.iterations.numpy())
            state["step"] = step
            progress.update(1)
            if step % cfg["train"]["log_every"] == 0 or step >= total:
                running = float(logs["loss"])
                epoch_sum, n = running * (batch + 1), batch + 1
                local = (epoch_sum - self.sum_seen) / max(n - self.n_seen, 1)
                self.sum_seen, self.n_seen = epoch_sum, n
                loss = float(hvd.allreduce(tf.constant(local, tf.float64), op=hvd.Average,
                                           name="largebatch.loss").numpy())
                state["loss"] = loss
                lr = float(schedule(step - 1))
                ips = rate.tick(gb * (step - state["logged"]))
                state["logged"] = step
                log.metrics("train", step, step / spe, lr=lr, loss=loss, images_per_sec=ips)
                if track and rank == 0:
                    log.trust_ratios(step, {k: float(v) for k, v in self.model.optimizer.trust_ratios().items()})
                progress.update(0, step=step, loss=loss, lr=lr, img_s=round(ips, 1))
                if not math.isfinite(loss):
                    state["status"] = "diverged"
                    progress.write(f"step {step}: loss is {loss}; stopping (diverged)")
                    self.model.stop_training = True
            if step >= total:
                self.model.stop_training = True
            if check_every and step % check_every == 0 and state["status"] == "completed":
                try:
                    rank_check.check(f"step {step}")
                except lbk.callbacks.RankDivergenceError as err:
                    state["status"] = "ranks_diverged"
                    progress.write(f"largebatch: {err}; stopping")
                    self.model.stop_training = True
            # a stop signal on any rank: every rank stops after this same update (one small allreduce)
            stop = int(hvd.allreduce(tf.constant(float(lifeline.stop_requested()), tf.float64), op=hvd.Max,
                                     name="largebatch.stop").numpy())
            if stop and state["status"] == "completed":
                state["status"], state["stopped_by"] = "stopped", signal.Signals(stop).name
                if rank == 0 and step < total:
                    state["checkpoint"] = save_run_checkpoint(
                        log, exp, importlib.import_module("largebatch.keras.checkpoint").save_checkpoint, model,
                        self.model.optimizer, step=step, epoch=state["shard"].epoch + 1,
                        extra={"last_lr": lr_callback.last_lr, "skipped_steps": guard.skipped})
                progress.write(f"largebatch: {state['stopped_by']}: stopped after step {step}"
                               + (f", checkpoint {state['checkpoint']}" if state.get("checkpoint") else ""))
                self.model.stop_training = True

        def on_epoch_end(self, epoch, logs=None):
            step = state["step"]
            if guard.stopped is not None:
                state["status"] = "nonfinite"
            if state["status"] != "completed":
                return
            if val_set is not None and cfg["train"]["eval"]:
                state["eval"] = evaluate()
                log.metrics("eval", step, step / spe, loss=state["eval"]["loss"],
                            accuracy=state["eval"]["accuracy"])
                progress.write(f"epoch {epoch + 1}: eval loss {state['eval']['loss']:.4f}, "
                               f"accuracy {state['eval']['accuracy']:.4f}")
            if ckpt_every and ((epoch + 1) % ckpt_every == 0 or step >= total) and rank == 0:
                save_run_checkpoint(log, exp, importlib.import_module("largebatch.keras.checkpoint").save_checkpoint, model,
                                    self.model.optimizer, step=step, epoch=epoch + 1,
                                    extra={"last_lr": lr_callback.last_lr, "skipped_steps": guard.skipped})

    def report(line):
        progress.write(f"largebatch: {line}")

    guard = lbk.callbacks.NonFiniteGuard(cfg["train"]["on_nonfinite"], log=report)
    lr_callback = lbk.callbacks.LearningRateSchedule(schedule,
                                                     momentum_correction=cfg["schedule"]["momentum_correction"])
    callbacks = [lbk.callbacks.BroadcastGlobalVariables(0), lr_callback, guard, RunnerCallback()]
    check_every = cfg["train"]["check_ranks_every"] if size > 1 else 0
    rank_check = lbk.callbacks.RankConsistencyCheck(every_n_steps=1)     # called by RunnerCallback
    rank_check.set_model(model)
    epochs = math.ceil(total / spe)
    epoch, first_in_epoch = divmod(state["step"], spe)
    started = time.perf_counter()

    def on_signal(name):
        """Rank 0's summary when a signal stops the run (called on the signal thread)."""
        if log.active:
            summary = summary_dict(exp, status="stopped", steps=state["step"], epochs_done=state["step"] / spe,
                                   final_loss=state["loss"], eval_result=state["eval"], throughput=rate.steady(),
                                   wall=time.perf_counter() - started, threads=threads,
                                   framework_versions=versions("keras"), size=size)
            summary["stopped_by"] = name
            log.summary(summary)

    lifeline.set_on_signal(on_signal)
    lifeline.set_graceful()
    try:
        if first_in_epoch and state["step"] < total:
            # a checkpoint that ends inside an epoch: the rest of that epoch, then the others
            state["shard"] = Shard(epoch, skip=first_in_epoch * acc)
            model.fit(state["shard"], initial_epoch=epoch, epochs=epoch + 1, shuffle=False,
                      steps_per_epoch=(spe - first_in_epoch) * acc, verbose=0, callbacks=callbacks)
            epoch += 1
        if epoch < epochs and state["step"] < total and state["status"] == "completed" and guard.stopped is None:
            state["shard"] = Shard(epoch)
            # shuffle=False: the order is epoch_batches' (Keras would shuffle the PyDataset's
            # indices with Python's random, mixing micro-batches across updates)
            model.fit(state["shard"], initial_epoch=epoch, epochs=epochs, steps_per_epoch=spe * acc, shuffle=False,
                      verbose=0, callbacks=callbacks)
    finally:
        progress.close()
    if guard.stopped is not None:
        state["status"] = "nonfinite"
    step = state["step"]
    summary = summary_dict(exp, status=state["status"], steps=step, epochs_done=step / spe,
                           final_loss=state["loss"], eval_result=state["eval"], throughput=rate.steady(),
                           wall=time.perf_counter() - started, threads=threads,
                           framework_versions=versions("keras"), size=size)
    # the update that stopped the run was not applied either, but is not counted as skipped (as torch)
    summary["skipped_steps"] = guard.skipped - (guard.stopped is not None)
    summary["resumed_from"] = resumed["path"] if resumed else None
    if state["status"] == "stopped":
        summary.update(stopped_by=state["stopped_by"], checkpoint=state.get("checkpoint"))
    if state["status"] == "completed":
        summary.update(world_record(hvd.allgather_object, weights_digest(v.numpy() for v in model.weights)))
    log.summary(summary)
    log.close()
    if rank == 0:
        ev = state["eval"]
        print(f"run dir: {run_dir} ({state['status']}, {step} steps, loss {state['loss']:.4g}"
              + (f", eval accuracy {ev['accuracy']:.4f}" if ev else "") + ")", flush=True)
    if state["status"] == "stopped":
        return lifeline.stop_exit_code(signal.Signals[state["stopped_by"]])
    return 0 if state["status"] == "completed" else 1

