"""Rank script: model.fit under horovodrun with DIFFERENT data on each rank.

    keras_fit.py train    largebatch.keras.DistributedOptimizer scenarios (keras_common.SCENARIOS);
                          rank 1 starts from different weights (BroadcastGlobalVariables fixes it)
    keras_fit.py refuse   Horovod's Keras DistributedOptimizer / unwrapped optimizers: the errors

Reports per scenario the final trainable weights, the epoch losses and error messages.
"""
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import keras_common as kc  # noqa: E402

kc.single_thread()

import horovod.tensorflow as hvd  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import largebatch.keras as lbk  # noqa: E402
from multirank import error_of, report  # noqa: E402

hvd.init()
rank, size = hvd.rank(), hvd.size()
x_all, y_all = kc.data(0)
out = {}


def train(scenario):
    make, k, compression, with_schedule = kc.SCENARIOS[scenario]
    x, y = kc.shard(x_all, rank, size, k), kc.shard(y_all, rank, size, k)
    model = kc.tiny_model(weights_seed=1 if rank == 0 else 100 + rank)      # broadcast must fix rank 1
    optimizer = lbk.DistributedOptimizer(make(), compression=compression, accumulation_steps=k)
    kc.compile_model(model, optimizer)
    check = lbk.callbacks.RankConsistencyCheck(every_n_steps=1)
    csv_path = os.path.join(tempfile.mkdtemp(), "trust.csv")
    callbacks = [lbk.callbacks.MetricAverage(), lbk.callbacks.BroadcastGlobalVariables(0), check,
                 lbk.callbacks.TrustRatioLogger(csv_path=csv_path, every_n_steps=1)]
    if with_schedule:
        callbacks.append(lbk.callbacks.LearningRateSchedule(kc.schedule()))
    history = model.fit(x, y, batch_size=kc.GLOBAL_BATCH // (size * k), epochs=kc.EPOCHS, shuffle=False,
                        verbose=0, callbacks=callbacks)
    for i, w in enumerate(model.trainable_variables):
        out[f"{scenario}.w{i}"] = w.numpy()
    out[f"{scenario}.loss"] = np.array(history.history["loss"])
    out[f"{scenario}.checks"] = check.checks
    out[f"{scenario}.iterations"] = int(optimizer.iterations.numpy())
    out[f"{scenario}.csv_rows"] = sum(1 for _ in open(csv_path)) if os.path.exists(csv_path) else 0


def refuse():
    import horovod.tensorflow.keras as hvd_keras
    x, y = kc.shard(x_all, rank, size), kc.shard(y_all, rank, size)
    batch = kc.GLOBAL_BATCH // size

    # 1. Horovod's Keras optimizer around largebatch's LARS: refused when it is created.
    out["hvd_lars"] = error_of(lambda: hvd_keras.DistributedOptimizer(kc.lars()))

    # 2. ... around Keras SGD: refused by our callbacks, by check_optimizer and by our wrapper.
    def fit_with_our_callback():
        model = kc.compile_model(kc.tiny_model(), hvd_keras.DistributedOptimizer(keras.optimizers.SGD(0.1)))
        model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0,
                  callbacks=[lbk.callbacks.BroadcastGlobalVariables(0)])
    out["hvd_sgd_callback"] = error_of(fit_with_our_callback)
    out["hvd_sgd_check"] = error_of(lambda: lbk.check_optimizer(
        hvd_keras.DistributedOptimizer(keras.optimizers.SGD(0.1))))
    out["hvd_sgd_wrap"] = error_of(lambda: lbk.DistributedOptimizer(
        hvd_keras.DistributedOptimizer(keras.optimizers.SGD(0.1))))

    # Horovod's Keras callbacks: refused by check_callbacks
    out["hvd_callbacks"] = error_of(lambda: lbk.check_callbacks(
        [lbk.callbacks.MetricAverage(), hvd_keras.callbacks.BroadcastGlobalVariablesCallback(0)]))

    # 3. The silent failure itself (no largebatch object involved): Horovod's Keras optimizer
    #    under Keras 3 trains, raises nothing, and the ranks end with different weights.
    model = kc.compile_model(kc.tiny_model(), hvd_keras.DistributedOptimizer(keras.optimizers.SGD(0.1)))
    out["hvd_sgd_silent"] = error_of(lambda: model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0))
    for i, w in enumerate(model.trainable_variables):
        out[f"hvd_sgd_silent.w{i}"] = w.numpy()

    # 4. A plain (unwrapped) optimizer: BroadcastGlobalVariables refuses it; RankConsistencyCheck
    #    stops the divergence it causes.
    def unwrapped_broadcast():
        model = kc.compile_model(kc.tiny_model(), kc.lars())
        model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0,
                  callbacks=[lbk.callbacks.BroadcastGlobalVariables(0)])
    out["unwrapped_broadcast"] = error_of(unwrapped_broadcast)

    def unwrapped_check():
        model = kc.compile_model(kc.tiny_model(), kc.lars())
        model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0,
                  callbacks=[lbk.callbacks.RankConsistencyCheck(every_n_steps=2)])
    out["unwrapped_check"] = error_of(unwrapped_check)


{"train": lambda: [train(s) for s in kc.SCENARIOS], "refuse": refuse}[sys.argv[1]]()
report(rank, **out)
