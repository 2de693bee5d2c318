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

import keras
import numpy as np

from largebatch import registry
from largebatch.config import ConfigError
from largebatch.horovod_support import import_horovod
from largebatch.policy import ParamPolicy
from . import faults, user
from .comm import HorovodComm
from .common import read_resume
from .data import Prefetcher, epoch_batches, eval_batches
from .driver import Framework
from .loop import Hooks, measures_noise

__all__ = ["KerasPart", "FRAMEWORK", "build_model", "build_optimizer", "training_loss"]

KERAS_POLICIES = {"bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


def build_model(cfg, derived):
    """The built-in model ``model.name``, or the user's ``model.factory`` (offered ``input_shape``:
    (size, size, channels) for the built-in images)."""
    if user.uses_user_model(cfg):
        if "input_shape" not in derived:
            derived = dict(derived, input_shape=(derived["image_size"], derived["image_size"], cfg["data"]["channels"]))
        return user.build_model(cfg, derived, "keras")
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


class Shard(keras.utils.PyDataset):
    """This rank's micro-batches of one training epoch (``set_epoch`` by the runner's callback at
    every epoch begin: Keras calls ``on_epoch_end`` also once before training starts, so counting
    those calls would be off by one), from micro-batch ``skip`` on (a resumed run that starts
    inside an epoch)."""

    def __init__(self, part, epoch, skip=0):
        super().__init__(workers=max(1, part.exp.cfg["data"]["loader_workers"]), use_multiprocessing=False)
        loop = part.loop
        self.part, self.skip, self.rank, self.size, self.acc = part, skip, loop.rank, loop.size, loop.accumulation
        self.set_epoch(epoch)

    def set_epoch(self, epoch):
        cfg, d = self.part.exp.cfg, self.part.exp.derived
        self.epoch = epoch
        self._batches = epoch_batches(len(self.part.train_set), epoch, seed=cfg["train"]["seed"], rank=self.rank,
                                      size=self.size, per_worker=d["per_worker_batch"], accumulation=self.acc,
                                      steps=d["steps_per_epoch"])[self.skip:]

    def __len__(self):
        return self.part.exp.derived["steps_per_epoch"] * self.acc - self.skip

    def __getitem__(self, index):
        return self.part.train_set.batch(self._batches[index], self.epoch, True)


class RunnerCallback(keras.callbacks.Callback):
    """The loop's hooks at Keras's update and epoch boundaries (an update is ``acc`` batches)."""

    def __init__(self, part):
        super().__init__()
        self.part = part

    def on_epoch_begin(self, epoch, logs=None):
        self.sum_seen, self.n_seen = 0.0, 0
        self.part.shard.set_epoch(epoch)          # data order: a function of (seed, epoch)

    def on_train_batch_begin(self, batch, logs=None):
        fault = self.part.fault
        if fault is not None and batch % self.part.loop.accumulation == 0:
            fault.before_step(int(self.model.optimizer.iterations.numpy()) + 1, self.model)

    def on_train_batch_end(self, batch, logs=None):
        part, loop = self.part, self.part.loop
        if (batch + 1) % loop.accumulation:
            return

        def local_loss():
            # Keras's logs hold the epoch's running mean: this rank's mean since the last log
            epoch_sum, n = float(logs["loss"]) * (batch + 1), batch + 1
            mean = (epoch_sum - self.sum_seen) / max(n - self.n_seen, 1)
            self.sum_seen, self.n_seen = epoch_sum, n
            return mean
        step = part.state.step = int(self.model.optimizer.iterations.numpy())
        if loop.noise is not None:            # the update's two squared gradient norms (one host read)
            loop.noise_sample(*(float(v) for v in part.optimizer.noise_norms().numpy()))
        if not loop.after_step(step, part.shard.epoch, local_loss, part.extra) or step >= loop.total:
            self.model.stop_training = True
        elif loop.commit_due(step):
            part.state.commit()

    def on_epoch_end(self, epoch, logs=None):
        part, loop = self.part, self.part.loop
        if part.guard.stopped is not None:
            loop.status = "nonfinite"
        loop.end_epoch(epoch + 1, part.extra)
        if loop.elastic and loop.status == "completed" and loop.step < loop.total:
            part.state.commit()


class KerasPart(Framework):
    """A run with Keras 3 over Horovod: ``largebatch.keras.DistributedOptimizer`` averages the
    gradients, ``BroadcastGlobalVariables`` sends rank 0's variables, ``model.fit`` steps."""

    def start_engine(self, exp, threads):
        import tensorflow as tf
        self.tf = tf
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads[0])
            tf.config.threading.set_inter_op_parallelism_threads(threads[1])
        except RuntimeError:       # TF already initialised by an import; the environment variables hold
            pass
        faults.horovod_timeouts()
        self.hvd = hvd = import_horovod("tensorflow")
        hvd.init()
        self.comm = HorovodComm(hvd, lambda v: tf.constant(v, tf.float64), lambda t: t.numpy().tolist())
        self.lbk = importlib.import_module("largebatch.keras")
        return self.comm

    def seed(self, seed):
        keras.utils.set_random_seed(seed)

    def build_model(self, exp):
        self.exp = exp
        precision = exp.cfg["train"]["precision"]
        if precision != "fp32":            # float32 variables (and trust ratios), bf16/fp16 compute
            keras.mixed_precision.set_global_policy(KERAS_POLICIES[precision])
        self.model = build_model(exp.cfg, exp.derived)
        return self.model

    def build_optimizer(self, exp, model, schedule, accumulation, elastic):
        cfg, lbk = exp.cfg, self.lbk
        fp16 = cfg["train"]["precision"] == "fp16"
        inner = build_optimizer(cfg, model, schedule(0))
        if fp16:                           # averaged, then unscaled and checked: one skip decision on every rank
            inner = keras.optimizers.LossScaleOptimizer(inner)
        # fp16: an inf from the loss scale skips the update (not divergence), as torch's GradScaler
        compression = cfg["launcher"]["compression"]
        self.optimizer = optimizer = lbk.DistributedOptimizer(
            inner, accumulation_steps=accumulation, nonfinite_guard=not fp16, elastic=elastic,
            compression=None if compression == "none" else compression,
            measure_noise=measures_noise(cfg, self.comm.size(), accumulation))
        exclude_from_decay(optimizer, cfg, model)
        self.fault = faults.from_env(self.comm.rank())
        if self.fault is not None:
            self.fault.arm_keras(model, optimizer)          # before the train function is traced
        model.compile(optimizer=optimizer, loss=training_loss(cfg, exp.derived["num_classes"]),
                      metrics=["accuracy"], jit_compile=False)
        if registry.get(cfg["optimizer"]["name"]).per_example_norms:
            lbk.enable_clars(model)                    # the train step hands CLARS its per-example norms
        optimizer.build(model.trainable_variables)     # its variables exist before a checkpoint is loaded
        self.track = cfg["output"]["trust_ratios"] and hasattr(lbk.innermost(optimizer), "trust_ratios")

    def load_resume(self, exp, run_dir, commit=None):        # (torchrun elastic only: no commit here)
        """Rank 0 reads and checks the checkpoint into model and optimizer (the broadcast callback
        sends its variables to the others before the first step); every rank gets step, epoch,
        extra and RNG (see common.read_resume)."""
        ckpt = importlib.import_module("largebatch.keras.checkpoint")
        model, optimizer = self.model, self.optimizer
        info = read_resume(exp.cfg, run_dir, self.comm, rng_state=ckpt.rng_state,
                           load=lambda path, cfg_hash: ckpt.load_checkpoint(path, model, optimizer, cfg_hash=cfg_hash))
        if info is not None and self.comm.rank() != 0:
            ckpt.set_rng_state(info["rng"])
        return info

    def broadcast_initial(self):
        """Done by the BroadcastGlobalVariables callback at the first batch (Keras builds lazily)."""

    def hooks(self, val_set):
        self.val_set = val_set
        rank_check = self.lbk.callbacks.RankConsistencyCheck(every_n_steps=1)     # called by the loop
        rank_check.set_model(self.model)
        model, lbk = self.model, self.lbk
        return Hooks(save=importlib.import_module("largebatch.keras.checkpoint").save_checkpoint, model=model,
                     optimizer=lambda: model.optimizer, weights=lambda: (v.numpy() for v in model.weights),
                     evaluate=self.evaluate if val_set is not None else None, check_ranks=rank_check.check,
                     trust_ratios=(lambda: lbk.innermost(model.optimizer).trust_ratios()) if self.track else None)

    def attach(self, loop, train_set, schedule, resumed):
        cfg, lbk = self.exp.cfg, self.lbk
        self.loop, self.train_set = loop, train_set
        # AdaScale: the gain from the noise measured so far times the base schedule at its clock
        rate = schedule if loop.adascale is None else (lambda _step: loop.adascale_lr())
        self.lr_callback = lbk.callbacks.LearningRateSchedule(
            rate, momentum_correction=cfg["schedule"]["momentum_correction"])
        # elastic: the state's sync broadcasts rank 0's variables (when the job starts and after a reset)
        self.callbacks = ([] if loop.elastic else [lbk.callbacks.BroadcastGlobalVariables(0)]) + \
            [self.lr_callback, RunnerCallback(self)]
        if cfg["train"]["precision"] == "fp16":
            self.guard = _NoGuard()             # the loss scale handles inf/NaN updates
        else:
            self.guard = lbk.callbacks.NonFiniteGuard(cfg["train"]["on_nonfinite"],
                                                      log=lambda line: loop.say(f"largebatch: {line}"))
            self.callbacks.insert(-1, self.guard)
        return dict(step=loop.step)

    # -- training -------------------------------------------------------------------------
    def evaluate(self):
        """Loss and accuracy over the validation set, every rank its share, summed over ranks."""
        loss_sum = correct = count = 0.0
        loop = self.loop
        batches = eval_batches(len(self.val_set), rank=loop.rank, size=loop.size,
                               batch=self.exp.derived["per_worker_batch"])
        for x, y in Prefetcher(self.val_set, batches, train=False, workers=self.exp.cfg["data"]["loader_workers"]):
            logits = np.asarray(self.model.predict_on_batch(x), dtype=np.float64)
            logp = _log_softmax(logits)
            loss_sum += float(-logp[np.arange(len(y)), y].sum())
            correct += float((logits.argmax(1) == y).sum())
            count += len(y)
        loss_sum, correct, count = self.comm.sum([loss_sum, correct, count], name="largebatch.eval")
        return {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1)}

    def extra(self):
        """What a checkpoint written now carries besides the variables."""
        return {"last_lr": self.lr_callback.last_lr, "skipped_steps": self.guard.skipped}

    def _fit(self, epoch, epochs, steps_per_epoch, skip=0):
        self.shard = Shard(self, epoch, skip=skip)
        # shuffle=False: the order is epoch_batches' (Keras would shuffle the PyDataset's indices
        # with Python's random, mixing micro-batches across updates)
        self.model.fit(self.shard, initial_epoch=epoch, epochs=epochs, steps_per_epoch=steps_per_epoch,
                       shuffle=False, verbose=0, callbacks=self.callbacks)

    def train(self, state):
        """Updates from ``state.step`` to the end; an elastic restart calls it again after a reset
        (``_on_reset`` has set the new rank, world size and accumulation steps; model and optimizer
        variables are restored from the last commit)."""
        loop, d = self.loop, self.exp.derived
        spe, total = d["steps_per_epoch"], d["total_steps"]
        self.state = state
        loop.seek(state.step)
        k = loop.accumulation
        epoch, first_in_epoch = divmod(state.step, spe)
        try:
            if first_in_epoch and state.step < total:
                # a checkpoint (or commit) inside an epoch: the rest of that epoch, then the others
                self._fit(epoch, epoch + 1, (spe - first_in_epoch) * k, skip=first_in_epoch * k)
                epoch += 1
            if epoch < math.ceil(total / spe) and loop.step < total and loop.status == "completed" \
                    and self.guard.stopped is None:
                self._fit(epoch, math.ceil(total / spe), spe * k)
        except self.tf.errors.OpError as err:
            # a peer lost inside the compiled step: Horovod Elastic restores the last commit
            if loop.elastic and "horovod" in str(err).lower():
                raise importlib.import_module("horovod.common.exceptions").HorovodInternalError(err) from err
            raise

    def elastic_state(self, start):
        self.state = state = self.lbk.elastic_state(self.model, self.optimizer, **start)
        state.register_reset_callbacks([self._on_reset])
        return state

    def _on_reset(self):
        """After Horovod re-formed the ring: new rank, world size and accumulation steps, and a
        train function traced again for them."""
        self.loop.rebind(self.state.step)
        self.optimizer.set_accumulation_steps(self.loop.accumulation)
        self.model.make_train_function(force=True)

    def outcome(self, state):
        if self.guard.stopped is not None:
            self.loop.status = "nonfinite"
        # the update that stopped the run was not applied either, but is not counted as skipped (as torch)
        fp16 = self.exp.cfg["train"]["precision"] == "fp16"
        fields = {"loss_scale_skips": self.lbk.loss_scale_skips(self.optimizer)} if fp16 else {}
        return self.guard.skipped - (self.guard.stopped is not None), fields


FRAMEWORK = KerasPart


class _NoGuard:
    """Stands in for NonFiniteGuard under fp16 loss scaling: nothing skipped, nothing stopped."""
    skipped, stopped = 0, None
