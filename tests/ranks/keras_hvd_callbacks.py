"""Rank script: Horovod's Keras callback kept next to largebatch.keras.DistributedOptimizer.

No check_callbacks call in the script: model.fit must stop with HorovodKerasError when it starts,
before the first batch, on every rank (Horovod's own failure is an AttributeError after batch 1).
Reports the error message and how many batches began.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import keras_common as kc  # noqa: E402

kc.single_thread()

import horovod.tensorflow as hvd  # noqa: E402
import largebatch.keras as lbk  # noqa: E402  (imported before Horovod's Keras module, on purpose)
import horovod.tensorflow.keras as hvd_keras  # noqa: E402
import keras  # noqa: E402

from multirank import report  # noqa: E402

hvd.init()
rank, size = hvd.rank(), hvd.size()
x_all, y_all = kc.data(0)
x, y = kc.shard(x_all, rank, size), kc.shard(y_all, rank, size)
batches = []


class Count(keras.callbacks.Callback):
    def on_train_batch_begin(self, batch, logs=None):
        batches.append(batch)


model = kc.compile_model(kc.tiny_model(), lbk.DistributedOptimizer(kc.lars()))
try:
    model.fit(x, y, batch_size=kc.GLOBAL_BATCH // size, epochs=1, shuffle=False, verbose=0,
              callbacks=[Count(), hvd_keras.callbacks.BroadcastGlobalVariablesCallback(0)])
    message = "no error"
except Exception as err:                       # noqa: BLE001 - the message is what we test
    message = f"{type(err).__name__}: {err}"
report(rank, message=message, batches=len(batches))
