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
import os
import types

import numpy as np

from largebatch import registry
from largebatch.config import ConfigError
from largebatch.horovod_support import import_horovod
from largebatch.policy import ParamPolicy
from . import faults
from .common import read_resume
from .data import Prefetcher, epoch_batches, eval_batches
from .loop import Hooks, TrainingLoop, accumulation_for, prepare
from .params import announce_exclusion

__all__ = ["run", "build_model", "build_optimizer"]

KERAS_POLICIES = {"bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


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
    """The configured optimizer: ``largebatch.keras.create_optimizer`` with the YAML's
    hyper-parameters (the registry's keys for the name; SGD's exclusions: :func:`exclude_from_decay`)."""
    o = cfg["optimizer"]
    info = registry.get(o["name"])
    hyper = {k: o[k] for k in info.keys if not (k == "exclude" and not info.layerwise)}
    return importlib.import_module("largebatch.keras").create_optimizer(o["name"], learning_rate=lr, **hyper)


def exclude_from_decay(optimizer, cfg, model):
    """Keras SGD: keep weight decay off the tensors the policy does not decay (default: ndim <= 1).
    Called on the final (wrapped) optimizer: the exclusion list is not part of get_config()."""
    o = cfg["optimizer"]
    if not registry.get(o["name"]).layerwise and o["weight_decay"]:
        policy = ParamPolicy.from_spec(o["exclude"])
        excluded = [v for v in model.trainable_variables if not policy.decays(v.path, tuple(v.shape))]
        if excluded:
            importlib.import_module("largebatch.keras").innermost(optimizer).exclude_from_weight_decay(var_list=excluded)


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
    # elastic only when horovodrun started an elastic job (a plain launch of the YAML trains as usual)
    elastic = exp.cfg["launcher"]["elastic"] and os.environ.get("HOROVOD_ELASTIC") == "1"
    keras.utils.set_random_seed(exp.cfg["train"]["seed"])
    exp, train_set, val_set, schedule, run_dir = prepare(exp, loader, hvd, elastic=elastic)
    cfg, derived = exp.cfg, exp.derived
    rank, size = hvd.rank(), hvd.size()
    lbk = importlib.import_module("largebatch.keras")
    lbk_ckpt = importlib.import_module("largebatch.keras.checkpoint")
    pw, spe, total = derived["per_worker_batch"], derived["steps_per_epoch"], derived["total_steps"]
    acc = accumulation_for(derived, size, elastic)

    precision = cfg["train"]["precision"]
    if precision != "fp32":            # float32 variables (and trust ratios), bf16/fp16 compute
        keras.mixed_precision.set_global_policy(KERAS_POLICIES[precision])
    model = build_model(cfg, derived)
    announce_exclusion(exp, model, rank)
    inner = build_optimizer(cfg, model, schedule(0))
    if precision == "fp16":            # averaged, then unscaled and checked: one skip decision on every rank
        inner = keras.optimizers.LossScaleOptimizer(inner)
    # fp16: an inf from the loss scale skips the update (not divergence), as torch's GradScaler
    optimizer = lbk.DistributedOptimizer(inner, accumulation_steps=acc, nonfinite_guard=precision != "fp16",
                                         elastic=elastic)
    exclude_from_decay(optimizer, cfg, model)
    fault = faults.from_env(rank)
    if fault is not None:
        fault.arm_keras(model, optimizer)          # before the train function is traced
    model.compile(optimizer=optimizer, loss=training_loss(cfg, derived["num_classes"]),
                  metrics=["accuracy"], jit_compile=False)
    if registry.get(cfg["optimizer"]["name"]).per_example_norms:
        lbk.enable_clars(model)                    # the train step hands CLARS its per-example norms
    optimizer.build(model.trainable_variables)     # its variables exist before a checkpoint is loaded
    resumed = _load_resume(cfg, run_dir, model, optimizer, hvd, rank)   # before anything is written
    rank_check = lbk.callbacks.RankConsistencyCheck(every_n_steps=1)     # called by the loop
    rank_check.set_model(model)
    workers = cfg["data"]["loader_workers"]

    def evaluate():
        loss_sum = correct = count = 0.0
        batches = eval_batches(len(val_set), rank=loop.rank, size=loop.size, batch=pw)
        for x, y in Prefetcher(val_set, batches, train=False, workers=workers):
            logits = np.asarray(model.predict_on_batch(x), dtype=np.float64)
            logp = _log_softmax(logits)
            loss_sum += float(-logp[np.arange(len(y)), y].sum())
            correct += float((logits.argmax(1) == y).sum())
            count += len(y)
        totals = hvd.allreduce(tf.constant([loss_sum, correct, count], tf.float64), op=hvd.Sum,
                               name="largebatch.eval").numpy()
        return {"loss": totals[0] / max(totals[2], 1), "accuracy": totals[1] / max(totals[2], 1)}

    def reduce(op, name):
        return lambda x: float(hvd.allreduce(tf.constant(x, tf.float64), op=op, name=name).numpy())

    track = cfg["output"]["trust_ratios"] and hasattr(lbk.innermost(optimizer), "trust_ratios")
    loop = TrainingLoop(
        exp, Hooks(mean=reduce(hvd.Average, "largebatch.loss"), maximum=reduce(hvd.Max, "largebatch.stop"),
                   allgather_object=hvd.allgather_object, save=lbk_ckpt.save_checkpoint, model=model,
                   optimizer=lambda: model.optimizer, weights=lambda: (v.numpy() for v in model.weights),
                   evaluate=evaluate if val_set is not None else None, check_ranks=rank_check.check,
                   trust_ratios=(lambda: lbk.innermost(model.optimizer).trust_ratios()) if track else None),
        run_dir=run_dir, rank=rank, size=size, accumulation=acc, threads=threads, resumed=resumed,
        schedule=schedule, track_trust_ratios=track, check_ranks=size > 1 or elastic, elastic=elastic)

    class Shard(keras.utils.PyDataset):
        """This rank's micro-batches of one training epoch (``set_epoch`` by the runner's callback
        at every epoch begin: Keras calls ``on_epoch_end`` also once before training starts, so
        counting those calls would be off by one), from micro-batch ``skip`` on (a resumed run
        that starts inside an epoch)."""

        def __init__(self, epoch, skip=0):
            super().__init__(workers=max(1, workers), use_multiprocessing=False)
            self.skip, self.rank, self.size, self.acc = skip, loop.rank, loop.size, loop.accumulation
            self.set_epoch(epoch)

        def set_epoch(self, epoch):
            self.epoch = epoch
            self._batches = epoch_batches(len(train_set), epoch, seed=cfg["train"]["seed"], rank=self.rank,
                                          size=self.size, per_worker=pw, accumulation=self.acc, steps=spe)[self.skip:]

        def __len__(self):
            return spe * self.acc - self.skip

        def __getitem__(self, index):
            return train_set.batch(self._batches[index], self.epoch, True)

    shard, current = {}, {}              # the epoch's data; the counters (an elastic state or a namespace)

    def extra():
        return {"last_lr": lr_callback.last_lr, "skipped_steps": guard.skipped}

    class RunnerCallback(keras.callbacks.Callback):
        """The loop's hooks at Keras's update and epoch boundaries (an update is ``acc`` batches)."""

        def on_epoch_begin(self, epoch, logs=None):
            self.sum_seen, self.n_seen = 0.0, 0
            shard["now"].set_epoch(epoch)          # data order: a function of (seed, epoch)

        def on_train_batch_begin(self, batch, logs=None):
            if fault is not None and batch % loop.accumulation == 0:
                fault.before_step(int(self.model.optimizer.iterations.numpy()) + 1, self.model)

        def on_train_batch_end(self, batch, logs=None):
            if (batch + 1) % loop.accumulation:
                return

            def local_loss():
                # Keras's logs hold the epoch's running mean: this rank's mean since the last log
                epoch_sum, n = float(logs["loss"]) * (batch + 1), batch + 1
                mean = (epoch_sum - self.sum_seen) / max(n - self.n_seen, 1)
                self.sum_seen, self.n_seen = epoch_sum, n
                return mean
            step = current["state"].step = int(self.model.optimizer.iterations.numpy())
            if not loop.after_step(step, shard["now"].epoch, local_loss, extra) or step >= total:
                self.model.stop_training = True
            elif loop.commit_due(step):
                current["state"].commit()

        def on_epoch_end(self, epoch, logs=None):
            if guard.stopped is not None:
                loop.status = "nonfinite"
            loop.end_epoch(epoch + 1, extra)
            if elastic and loop.status == "completed" and loop.step < total:
                current["state"].commit()

    lr_callback = lbk.callbacks.LearningRateSchedule(schedule,
                                                     momentum_correction=cfg["schedule"]["momentum_correction"])
    # elastic: the state's sync broadcasts rank 0's variables (when the job starts and after a reset)
    callbacks = ([] if elastic else [lbk.callbacks.BroadcastGlobalVariables(0)]) + [lr_callback, RunnerCallback()]
    if precision == "fp16":
        guard = _NoGuard()             # the loss scale handles inf/NaN updates
    else:
        guard = lbk.callbacks.NonFiniteGuard(cfg["train"]["on_nonfinite"], log=lambda line: loop.say(f"largebatch: {line}"))
        callbacks.insert(-1, guard)
    epochs = math.ceil(total / spe)

    def train(state):
        """Updates from ``state.step`` to the end; an elastic restart calls it again after a reset
        (``on_reset`` has set the new rank, world size and accumulation steps; model and optimizer
        variables are restored from the last commit)."""
        current["state"] = state
        loop.seek(state.step)
        k = loop.accumulation
        epoch, first_in_epoch = divmod(state.step, spe)
        try:
            if first_in_epoch and state.step < total:
                # a checkpoint (or commit) inside an epoch: the rest of that epoch, then the others
                shard["now"] = Shard(epoch, skip=first_in_epoch * k)
                model.fit(shard["now"], initial_epoch=epoch, epochs=epoch + 1, shuffle=False,
                          steps_per_epoch=(spe - first_in_epoch) * k, verbose=0, callbacks=callbacks)
                epoch += 1
            if epoch < epochs and loop.step < total and loop.status == "completed" and guard.stopped is None:
                shard["now"] = Shard(epoch)
                # shuffle=False: the order is epoch_batches' (Keras would shuffle the PyDataset's
                # indices with Python's random, mixing micro-batches across updates)
                model.fit(shard["now"], initial_epoch=epoch, epochs=epochs, steps_per_epoch=spe * k, shuffle=False,
                          verbose=0, callbacks=callbacks)
        except tf.errors.OpError as err:
            # a peer lost inside the compiled step: Horovod Elastic restores the last commit
            if elastic and "horovod" in str(err).lower():
                raise importlib.import_module("horovod.common.exceptions").HorovodInternalError(err) from err
            raise

    try:
        if elastic:
            state = lbk.elastic_state(model, optimizer, step=loop.step)

            def on_reset():
                """After Horovod re-formed the ring: new rank, world size and accumulation steps,
                and a train function traced again for them."""
                loop.rebind(hvd.rank(), hvd.size(), state.step)
                optimizer.set_accumulation_steps(loop.accumulation)
                model.make_train_function(force=True)

            state.register_reset_callbacks([on_reset])
            hvd.elastic.run(train)(state)
        else:
            train(types.SimpleNamespace(step=loop.step))     # the counter an elastic state would carry
    finally:
        loop.progress.close()
    if guard.stopped is not None:
        loop.status = "nonfinite"
    # the update that stopped the run was not applied either, but is not counted as skipped (as torch)
    fields = {"loss_scale_skips": lbk.loss_scale_skips(optimizer)} if precision == "fp16" else {}
    return loop.finish(guard.skipped - (guard.stopped is not None), **fields)


class _NoGuard:
    """Stands in for NonFiniteGuard under fp16 loss scaling: nothing skipped, nothing stopped."""
    skipped, stopped = 0, None
