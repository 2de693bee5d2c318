"""Rank script: Keras mixed precision under largebatch.keras.DistributedOptimizer, DIFFERENT data
on each rank (keras_common's shards of the same global batches).

    keras_mixed.py POLICY [nan_step]   POLICY: mixed_bfloat16 | mixed_float16 | float32
    keras_mixed.py refuse              the orders and optimizers that are refused, and their messages

mixed_float16 wraps the loss-scale optimizer inside: DistributedOptimizer(LossScaleOptimizer(LARS)).
``nan_step``: rank 1 alone gets a NaN gradient at that update (the averaged gradient is then NaN
on every rank, so every rank skips it). With one rank this is the concatenated-batch twin.
Reports the final weights, their dtypes, the iterations, the loss-scale skips and the scale.
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
from largebatch.runner.faults import inject_keras_nan  # noqa: E402
from multirank import error_of, report  # noqa: E402

policy = sys.argv[1]
if policy == "refuse":
    hvd.init()
    keras.mixed_precision.set_global_policy("mixed_float16")
    x, y = kc.data(0)
    model = kc.compile_model(kc.tiny_model(), lbk.DistributedOptimizer(lbk.LARS(learning_rate=0.5)))
    report(hvd.rank(), outer_type=type(model.optimizer).__name__,       # compile wrapped it, as Keras does
           outer=error_of(lambda: model.fit(x, y, batch_size=8, epochs=1, verbose=0)),
           clars=error_of(lambda: lbk.DistributedOptimizer(keras.optimizers.LossScaleOptimizer(lbk.CLARS()))))
    sys.exit(0)
nan_step = int(sys.argv[2]) if len(sys.argv) > 2 else None
hvd.init()
rank, size = hvd.rank(), hvd.size()
keras.mixed_precision.set_global_policy(policy)
x_all, y_all = kc.data(0)
x, y = kc.shard(x_all, rank, size), kc.shard(y_all, rank, size)
model = kc.tiny_model()
lamb = os.environ.get("LB_TEST_OPTIMIZER") == "lamb"
inner = (lbk.LAMB(learning_rate=0.01, weight_decay=1e-3) if lamb
         else lbk.LARS(learning_rate=0.5, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02))
if policy == "mixed_float16":
    inner = keras.optimizers.LossScaleOptimizer(inner, initial_scale=2.0 ** 10)
optimizer = lbk.DistributedOptimizer(inner)
if nan_step is not None and rank == size - 1:
    inject_keras_nan(optimizer, nan_step, "fc/kernel")
kc.compile_model(model, optimizer)
model.fit(x, y, batch_size=kc.GLOBAL_BATCH // size, epochs=kc.EPOCHS, shuffle=False, verbose=0,
          callbacks=[lbk.callbacks.BroadcastGlobalVariables(0)])
out = {f"w{i}": w.numpy() for i, w in enumerate(model.trainable_variables)}
out["dtypes"] = np.array([w.dtype for w in model.trainable_variables])
out["compute_dtype"] = np.array(model.layers[-1].compute_dtype)
out["iterations"] = int(optimizer.iterations.numpy())
out["skips"] = lbk.loss_scale_skips(optimizer)
out["scale"] = float(optimizer.dynamic_scale.numpy()) if policy == "mixed_float16" else 0.0
out["ratios"] = np.array([float(v) for v in lbk.innermost(optimizer).trust_ratios().values()])
out["applied"] = int(lbk.innermost(optimizer).applied_updates().numpy())      # LAMB's bias-correction count
report(rank, **out)
