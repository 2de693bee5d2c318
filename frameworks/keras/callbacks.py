"""Keras 3 callbacks for large-batch training on Horovod.

- :class:`BroadcastGlobalVariables`: rank ``root_rank``'s initial model and optimizer
  variables to every rank before the first step.
- :class:`MetricAverage`: epoch metrics averaged over ranks (put it first in the list).
- :class:`LearningRateSchedule`: a :mod:`largebatch.schedules` callable ``lr(step)`` applied
  before every optimizer update, with Goyal et al.'s momentum correction where the lr lives
  inside the momentum buffer (LARS, SGD with momentum).
- :class:`TrustRatioLogger`: per-layer trust ratios to TensorBoard and/or CSV.
- :class:`RankConsistencyCheck`: a checksum of the weights gathered from every rank every N
  steps; stops training with :class:`RankDivergenceError` if ranks differ.
- :class:`NonFiniteGuard`: reports every update that ``DistributedOptimizer(nonfinite_guard=True)``
  skipped for NaN/Inf (first offending variable and step); stops training or goes on.

Every callback refuses a ``horovod.tensorflow.keras.DistributedOptimizer`` (it does not
average under Keras 3) with :class:`largebatch.keras.HorovodKerasError`.
"""
import csv
import importlib
import math
import os

import keras
import numpy as np
import tensorflow as tf

from largebatch import registry
from largebatch import schedules as _schedules
from largebatch.consistency import RankDivergenceError, first_divergence  # noqa: F401 (re-exported)
from largebatch.horovod_support import import_horovod
from largebatch.nonfinite import NonFinite
from largebatch.validation import check_positive_int

from ._checks import HorovodKerasError, _inner_optimizers, check_optimizer, innermost
from .distributed import is_distributed

__all__ = ["BroadcastGlobalVariables", "MetricAverage", "LearningRateSchedule", "TrustRatioLogger",
           "RankConsistencyCheck", "RankDivergenceError", "NonFiniteGuard", "NonFinite"]



def _hvd():
    hvd = import_horovod("tensorflow")
    if not hvd.is_initialized():
        raise RuntimeError("largebatch.keras.callbacks: Horovod is not initialized; call horovod.tensorflow.init()")
    return hvd



def _tf_vars(variables):
    return [v.value if isinstance(v, keras.Variable) else v for v in variables]


class _Callback(keras.callbacks.Callback):
    def _check_model_optimizer(self):
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None:
            check_optimizer(optimizer)
        return optimizer

    def on_train_begin(self, logs=None):
        self._check_model_optimizer()


class BroadcastGlobalVariables(_Callback):
    """Broadcast the model's and the optimizer's variables from ``root_rank`` before training.

    The optimizer is built first (Keras 3 builds it lazily), so its state (momentum buffers,
    iteration count, learning rate) starts identical too. With more than one rank it also
    refuses an optimizer that does not average gradients (not wrapped by
    ``largebatch.keras.DistributedOptimizer``) unless ``require_distributed_optimizer=False``.
    """

    def __init__(self, root_rank=0, require_distributed_optimizer=True):
        super().__init__()
        self.root_rank = check_positive_int("root_rank", root_rank, allow_zero=True)
        self.require_distributed_optimizer = bool(require_distributed_optimizer)
        self._done = False

    def on_train_begin(self, logs=None):
        optimizer = self._check_model_optimizer()
        hvd = _hvd()
        if (self.require_distributed_optimizer and hvd.size() > 1 and optimizer is not None
                and not is_distributed(optimizer)):
            raise HorovodKerasError(
                f"model.optimizer ({type(optimizer).__name__}) does not average gradients over the "
                f"{hvd.size()} ranks: wrap it with largebatch.keras.DistributedOptimizer(optimizer) "
                "(or pass require_distributed_optimizer=False if the train step averages itself)")
        if self._done:
            return
        if self.model.built:
            self._broadcast()

    def on_train_batch_end(self, batch, logs=None):
        if not self._done:            # model built lazily by the first step: broadcast after it
            self._broadcast()

    def _broadcast(self):
        hvd = _hvd()
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        variables = list(self.model.variables) + (list(optimizer.variables) if optimizer is not None else [])
        if hvd.size() > 1 and variables:
            hvd.broadcast_variables(_tf_vars(variables), root_rank=self.root_rank)
        self._done = True


class MetricAverage(_Callback):
    """Replace every numeric entry of the epoch logs by its mean over ranks.

    Put it before callbacks that read the logs (ModelCheckpoint, EarlyStopping, CSVLogger).
    """

    def on_epoch_end(self, epoch, logs=None):
        if not logs:
            return
        hvd = _hvd()
        if hvd.size() == 1:
            return
        for key in sorted(logs):
            value = logs[key]
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            averaged = hvd.allreduce(tf.constant(number, tf.float64), op=hvd.Average,
                                     name=f"largebatch.metric.{key}")
            logs[key] = float(averaged.numpy())


_LR_IN_BUFFER = []          # the classes of registry.class_paths("keras", lr_in_buffer=True), once imported


def _classes_with_lr_in_buffer():
    """The Keras optimizer classes whose momentum buffer holds the lr (v ← m·v + γ·g; the registry's
    lr_in_buffer: SGD, LARS/LARC, CLARS), imported from their 'module:attribute' paths on first use
    (the core names them and imports no framework)."""
    if not _LR_IN_BUFFER:
        paths = [path.partition(":") for path in registry.class_paths("keras", lr_in_buffer=True)]
        _LR_IN_BUFFER[:] = [getattr(importlib.import_module(module), name) for module, _, name in paths]
    return tuple(_LR_IN_BUFFER)


def _momentum_buffers_with_lr(optimizer):
    """Momentum buffers that hold the learning rate inside: those of the registry's lr-in-buffer
    optimizers, when they have momentum (Keras SGD with momentum 0 keeps no buffer to correct)."""
    optimizer = innermost(optimizer)
    if isinstance(optimizer, keras.optimizers.SGD) and not optimizer.momentum:
        return []
    if isinstance(optimizer, _classes_with_lr_in_buffer()):
        return [m for m in getattr(optimizer, "momentums", []) if m is not None]
    return []


class LearningRateSchedule(_Callback):
    """Set the optimizer's learning rate from ``schedule(step)`` before every batch.

    ``schedule`` is a callable of the optimizer update step (an int from 0), e.g.
    ``largebatch.schedules.build_schedule(peak_lr=..., steps_per_epoch=..., epochs=...,
    warmup_epochs=5)``. The step is ``optimizer.iterations``, so gradient accumulation and
    resumed training count updates correctly. With ``momentum_correction`` (default) the
    momentum buffers of optimizers that keep the lr inside them (LARS, SGD with momentum) are
    multiplied by new_lr/old_lr when the rate changes (Goyal et al. 2017, §3, eq. 10;
    :func:`largebatch.schedules.momentum_correction`). The rate of the epoch's last batch is
    added to the epoch logs as ``learning_rate``.
    """

    def __init__(self, schedule, momentum_correction=True, verbose=0):
        super().__init__()
        if not callable(schedule):
            raise ValueError(f"schedule: expected a callable step -> lr, got {schedule!r}")
        self.schedule = schedule
        self.momentum_correction = bool(momentum_correction)
        self.verbose = verbose
        self._scale = None
        self.last_lr = None

    def on_train_begin(self, logs=None):
        optimizer = self._check_model_optimizer()
        if optimizer is None:
            raise ValueError("model.optimizer: compile the model before fit with LearningRateSchedule")
        if not isinstance(innermost(optimizer)._learning_rate, keras.Variable):
            raise ValueError("learning_rate: the optimizer was created with a schedule or callable; "
                             "LearningRateSchedule needs a float learning_rate to set")

    def on_train_batch_begin(self, batch, logs=None):
        optimizer = innermost(self.model.optimizer)
        step = int(optimizer.iterations.numpy())
        new_lr = float(self.schedule(step))
        if not math.isfinite(new_lr) or new_lr < 0:
            raise ValueError(f"schedule: returned {new_lr!r} at step {step}, expected a finite lr >= 0")
        old_lr = float(optimizer.learning_rate.numpy())            # the float32 the variable holds
        stored = float(np.float32(new_lr))
        if stored != old_lr:
            optimizer.learning_rate = new_lr
            factor = _schedules.momentum_correction(stored, old_lr)
            if self.momentum_correction and factor != 1.0:
                buffers = _momentum_buffers_with_lr(optimizer)
                if buffers:
                    self._scale_buffers(buffers, factor)
            if self.verbose:
                print(f"\nstep {step}: learning rate {new_lr:.6g}")
        self.last_lr = new_lr

    def _scale_buffers(self, buffers, factor):
        if self._scale is None:
            @tf.function(autograph=False)
            def scale(variables, factor):
                for v in variables:
                    v.assign(v * tf.cast(factor, v.dtype))
            self._scale = scale
        self._scale(_tf_vars(buffers), tf.constant(factor, tf.float64))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.last_lr is not None:
            logs["learning_rate"] = self.last_lr


def _scalar_summary(tag, value, step):
    """A TensorBoard scalar written with core TF only (tf.summary.scalar needs the tensorboard
    package, which tensorflow-cpu >= 2.20 no longer installs): the scalars plugin's metadata."""
    from tensorflow.core.framework import summary_pb2
    metadata = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    tf.summary.write(tag, tf.constant(value, tf.float32), step=step, metadata=metadata)


class TrustRatioLogger(_Callback):
    """Log every layer's trust ratio (layer lr / global lr) every ``every_n_steps`` updates.

    Writes TensorBoard scalars ``trust_ratio/<variable path>`` under ``log_dir`` and/or rows
    ``step,variable,trust_ratio,layer_lr`` to ``csv_path``; only on rank 0 when Horovod runs
    (``all_ranks=True`` to log everywhere). ``records`` keeps (step, {path: ratio}) in memory.
    Needs a largebatch.keras optimizer (LARS, LAMB).
    """

    def __init__(self, log_dir=None, csv_path=None, every_n_steps=100, all_ranks=False):
        super().__init__()
        self.log_dir, self.csv_path = log_dir, csv_path
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        self.all_ranks = bool(all_ranks)
        self.records = []
        self._writer = self._csv_file = self._csv = None
        self._last_step = None

    def _is_writer(self):
        if self.all_ranks:
            return True
        try:
            import horovod.tensorflow as hvd
            return not hvd.is_initialized() or hvd.rank() == 0
        except ImportError:
            return True

    def on_train_begin(self, logs=None):
        optimizer = self._check_model_optimizer()
        if optimizer is None or not hasattr(innermost(optimizer), "trust_ratios"):
            raise ValueError("optimizer: TrustRatioLogger needs a largebatch.keras optimizer (LARS, LAMB), got "
                             f"{type(optimizer).__name__}")
        if not self._is_writer():
            return
        if self.log_dir is not None and self._writer is None:
            self._writer = tf.summary.create_file_writer(str(self.log_dir))
        if self.csv_path is not None and self._csv is None:
            new = not os.path.exists(self.csv_path) or os.path.getsize(self.csv_path) == 0
            self._csv_file = open(self.csv_path, "a", newline="")
            self._csv = csv.writer(self._csv_file)
            if new:
                self._csv.writerow(["step", "variable", "trust_ratio", "layer_lr"])

    def on_train_batch_end(self, batch, logs=None):
        optimizer = innermost(self.model.optimizer)
        step = int(optimizer.iterations.numpy())
        if step == 0 or step % self.every_n_steps or step == self._last_step or not self._is_writer():
            return
        self._last_step = step
        ratios, layer_lrs = optimizer.trust_ratios(), optimizer.layer_learning_rates()
        self.records.append((step, ratios))
        if self._writer is not None:
            with self._writer.as_default():
                for name, value in ratios.items():
                    _scalar_summary(f"trust_ratio/{name}", value, step)
            self._writer.flush()
        if self._csv is not None:
            for name, value in ratios.items():
                self._csv.writerow([step, name, repr(value), repr(layer_lrs[name])])
            self._csv_file.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._csv_file is not None:
            self._csv_file.close()
            self._csv_file = self._csv = None


class RankConsistencyCheck(_Callback):
    """Every ``every_n_steps`` batches (and at the end of training) gather a checksum of the
    trainable weights (and optimizer state) from every rank; if ranks differ, stop training and
    raise :class:`RankDivergenceError` naming the first variable that differs.

    The checksum is (Σw, Σw²) per variable in float64: two small numbers per variable, one
    allgather. With ``rtol=0`` (default) ranks must agree bit for bit, which they do when
    gradients are averaged. Non-trainable variables (BatchNorm moving statistics) are
    computed from each rank's own batches and are not compared.
    """

    def __init__(self, every_n_steps=100, include_optimizer=True, rtol=0.0):
        super().__init__()
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        self.include_optimizer = bool(include_optimizer)
        self.rtol = float(rtol)
        self._batches = 0
        self._checksum = None
        self.checks = 0

    def _variables(self):
        variables = list(self.model.trainable_variables)
        optimizer = self.model.optimizer
        if self.include_optimizer and optimizer is not None and optimizer.built:
            # gradient accumulators are rank-local by design
            local = {p for opt in _inner_optimizers(optimizer) if hasattr(opt, "rank_local_paths")
                     for p in opt.rank_local_paths()}
            variables += [v for v in optimizer.variables if v.path not in local]
        return variables

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        if self._batches % self.every_n_steps == 0:
            self.check(f"batch {self._batches}")

    def on_train_end(self, logs=None):
        if self._batches % self.every_n_steps:
            self.check(f"the end of training (batch {self._batches})")

    def check(self, where="now"):
        hvd = _hvd()
        variables = self._variables()
        if self._checksum is None or self._checksum[0] != len(variables):
            @tf.function(autograph=False)
            def checksum(vs):
                parts = []
                for v in vs:
                    x = tf.cast(v, tf.float64)
                    parts += [tf.reduce_sum(x), tf.reduce_sum(x * x)]
                return tf.stack(parts)
            self._checksum = (len(variables), checksum)
        local = self._checksum[1](_tf_vars(variables))
        gathered = hvd.allgather(local[None, :], name="largebatch.rank_consistency").numpy()
        self.checks += 1
        message = first_divergence(gathered, [getattr(v, "path", None) or v.name for v in variables], where,
                                   rtol=self.rtol, hint="is the optimizer wrapped with largebatch.keras."
                                   "DistributedOptimizer and BroadcastGlobalVariables(0) in the callbacks?")
        if message:
            self.model.stop_training = True
            raise RankDivergenceError(message)


_CODES = {1: ("gradient", "nan"), 2: ("gradient", "inf"), 4: ("trust ratio", "nan/inf")}


class NonFiniteGuard(_Callback):
    """Report (and with ``on_nonfinite="stop"`` stop at) updates the optimizer skipped for NaN/Inf.

    Needs ``largebatch.keras.DistributedOptimizer(..., nonfinite_guard=True)``: the decision is
    taken in the train function from one flag computed after the allreduce (identical on every
    rank), and the update is never applied. After each batch this callback reads one scalar
    (the optimizer's skipped-update count); only when it grew is the per-variable code vector
    read to name the first offending variable. Every skip is reported through ``log`` (default:
    print). ``stop``: ``model.stop_training = True`` and :attr:`stopped` holds the
    :class:`NonFinite`; ``skip``: training goes on, :attr:`skipped` counts (also across a
    resumed run: the count lives in the optimizer's variables). :attr:`events` lists them all.
    """

    def __init__(self, on_nonfinite="stop", log=print):
        super().__init__()
        if on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite: expected 'stop' or 'skip', got {on_nonfinite!r}")
        self.on_nonfinite, self.log = on_nonfinite, log
        self.events, self.stopped = [], None
        self._seen = None

    def _guarded(self):
        return next((o for o in _inner_optimizers(self.model.optimizer) if getattr(o, "guards_nonfinite", False)),
                    None)

    def on_train_begin(self, logs=None):
        optimizer = self._check_model_optimizer()
        if optimizer is None or self._guarded() is None:
            raise ValueError("NonFiniteGuard needs an optimizer wrapped with "
                             "largebatch.keras.DistributedOptimizer(optimizer, nonfinite_guard=True), got "
                             f"{type(optimizer).__name__}")

    @property
    def skipped(self):
        optimizer = self._guarded() if self.model is not None else None
        if optimizer is None or not optimizer.built:
            return 0
        return int(optimizer.skipped_updates().numpy())

    def on_train_batch_begin(self, batch, logs=None):
        if self._seen is None:       # after every on_train_begin (the broadcast of a resumed count)
            self._seen = self.skipped

    def on_train_batch_end(self, batch, logs=None):
        optimizer = self._guarded()
        count = int(optimizer.skipped_updates().numpy())     # the one host read per batch
        if self._seen is None:
            self._seen = count
            return
        if count == self._seen:
            return
        self._seen = count
        bad = self.describe(optimizer)
        self.events.append(bad)
        if self.on_nonfinite == "stop":
            self.stopped = bad
            self.model.stop_training = True
            self.log(f"{bad.message}; stopping (train.on_nonfinite=stop)")
        else:
            self.log(f"{bad.message}; step skipped (train.on_nonfinite=skip, {count} skipped so far)")

    @staticmethod
    def describe(optimizer):
        """The :class:`NonFinite` of the last skipped update (host reads: only after a trip)."""
        step = int(optimizer.iterations.numpy())
        codes = optimizer.nonfinite_codes().numpy()
        names = [getattr(v, "path", None) or v.name for v in optimizer._trainable_variables]
        for wanted in ((1, 2), (4,)):                    # gradients first, then trust ratios
            for name, code in zip(names, codes):
                if int(code) in wanted:
                    return NonFinite(step, name, *_CODES[int(code)])
        return NonFinite(step, "<unknown>", "gradient", "nan/inf")
