"""Horovod Elastic for Keras 3.

Horovod 0.28.1's ``hvd.elastic.TensorFlowKerasState`` calls ``optimizer.variables()``, a list (not
a method) under Keras 3, so it fails before the first commit. :func:`elastic_state` is that state
with Keras 3's variables: the model's (weights, BatchNorm statistics, seed states) and the
optimizer's (``iterations``, momentum or moments, trust-ratio slots, the accumulation variables of
:func:`largebatch.keras.DistributedOptimizer`), committed as host copies and broadcast from rank 0
when workers join or leave. With ``hvd.elastic.run``::

    opt = lbk.DistributedOptimizer(lbk.LARS(...), accumulation_steps=k, elastic=True)
    model.compile(optimizer=opt, ...); opt.build(model.trainable_variables)
    state = lbk.elastic_state(model, opt, step=0)

    @hvd.elastic.run
    def train(state):
        ...  # model.fit from state.step; state.commit() every few updates (an update boundary)
"""
import numpy as np

from largebatch.horovod_support import import_horovod

from .callbacks import _tf_vars

__all__ = ["elastic_state"]


def elastic_state(model, optimizer=None, **attrs):
    """A Horovod Elastic state for a built Keras 3 ``model`` and its (built) ``optimizer``
    (default ``model.optimizer``). ``attrs`` (step counters, ...) are committed, restored and
    broadcast with the variables. ``commit()`` at an update boundary: with gradient accumulation
    the accumulators are then empty, and a restored state holds none of a lost micro-batch."""
    hvd = import_horovod("tensorflow")

    class KerasState(hvd.elastic.TensorFlowKerasState):
        def __init__(self, model, optimizer, **kwargs):
            if optimizer is not None and not optimizer.built:
                optimizer.build(model.trainable_variables)
            super().__init__(model, optimizer, **kwargs)      # saves through _save_model below
            self._bcast_model = self._broadcast

        def _variables(self):
            return list(self.model.variables) + list(self.optimizer.variables)

        def _save_model(self):
            self._saved_variables = [np.array(v.numpy()) for v in self._variables()]

        def _load_model(self):
            for v, value in zip(self._variables(), self._saved_variables):
                v.assign(value)

        def _broadcast(self):
            if hvd.size() > 1:
                hvd.broadcast_variables(_tf_vars(self._variables()), root_rank=0)

    return KerasState(model, optimizer, **attrs)
