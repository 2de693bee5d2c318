"""Rank script (one rank): largebatch.keras.elastic_state and DistributedOptimizer(elastic=True).

- accumulation changed 1 -> 2 between epochs (set_accumulation_steps, the train function traced
  again) equals accumulation 2 throughout (the same global batches: B = 8 = 8 x 1 = 4 x 2);
- commit, train, restore: the model and optimizer variables are back, iterations included;
- set_accumulation_steps without elastic=True: the error.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import keras_common as kc  # noqa: E402

kc.single_thread()

import horovod.tensorflow as hvd  # noqa: E402
import numpy as np  # noqa: E402

import largebatch.keras as lbk  # noqa: E402
from multirank import error_of, report  # noqa: E402

hvd.init()
x, y = kc.data(0)


def lars():
    return lbk.LARS(learning_rate=0.5, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02)


changed = kc.compile_model(kc.tiny_model(), lbk.DistributedOptimizer(lars(), elastic=True))
changed.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
changed.optimizer.set_accumulation_steps(2)
changed.make_train_function(force=True)
changed.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)

fixed = kc.compile_model(kc.tiny_model(), lbk.DistributedOptimizer(lars(), accumulation_steps=2))
fixed.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)

state = lbk.elastic_state(changed, changed.optimizer, step=6)
saved = [np.array(v.numpy()) for v in list(changed.variables) + list(changed.optimizer.variables)]
changed.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
moved = not all(np.array_equal(a, v.numpy()) for a, v in zip(saved, changed.variables))
state.step = 9
state.restore()
after = [np.array(v.numpy()) for v in list(changed.variables) + list(changed.optimizer.variables)]
report(hvd.rank(),
       diff=max(float(np.max(np.abs(a.numpy() - b.numpy())))
                for a, b in zip(changed.trainable_variables, fixed.trainable_variables)),
       iterations=[int(changed.optimizer.iterations.numpy()), int(fixed.optimizer.iterations.numpy())],
       moved=moved, restored=all(np.array_equal(a, b) for a, b in zip(saved, after)), step=state.step,
       refused=error_of(lambda: fixed.optimizer.set_accumulation_steps(1)))
