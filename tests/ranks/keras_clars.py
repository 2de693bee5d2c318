"""Rank script: model.fit with largebatch.keras.CLARS under horovodrun, DIFFERENT data per rank.

Per scenario (method, accumulation steps): rank 1 starts from other weights (broadcast fixes
it); each rank fits its shard (keras_common.shard); the per-example norm sums and batch sizes
are added over ranks by DistributedOptimizer. Reports the final weights, epoch losses,
iterations and RankConsistencyCheck's count.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import keras_common as kc  # noqa: E402

kc.single_thread()

import horovod.tensorflow as hvd  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import largebatch.keras as lbk  # noqa: E402
from multirank import report  # noqa: E402

OPTIONS = dict(learning_rate=0.5, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.05)
SCENARIOS = {"hooks": ("hooks", 1), "vmap": ("vmap", 1), "hooks_accum": ("hooks", 2)}

hvd.init()
rank, size = hvd.rank(), hvd.size()
x_all, y_all = kc.data(0)
out = {}
for scenario, (method, k) in SCENARIOS.items():
    x, y = kc.shard(x_all, rank, size, k), kc.shard(y_all, rank, size, k)
    model = kc.tiny_model(weights_seed=1 if rank == 0 else 100 + rank)
    optimizer = lbk.DistributedOptimizer(lbk.CLARS(**OPTIONS), accumulation_steps=k)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=False)
    lbk.enable_clars(model, method=method)
    check = lbk.callbacks.RankConsistencyCheck(every_n_steps=1)
    history = model.fit(x, y, batch_size=kc.GLOBAL_BATCH // (size * k), epochs=kc.EPOCHS, shuffle=False,
                        verbose=0, callbacks=[lbk.callbacks.MetricAverage(), lbk.callbacks.BroadcastGlobalVariables(0),
                                              check])
    for i, w in enumerate(model.trainable_variables):
        out[f"{scenario}.w{i}"] = w.numpy()
    out[f"{scenario}.loss"] = np.array(history.history["loss"])
    out[f"{scenario}.iterations"] = int(optimizer.iterations.numpy())
    out[f"{scenario}.checks"] = check.checks
report(rank, **out)
