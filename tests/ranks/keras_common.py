"""Shared by the Keras multi-rank tests and their single-process twins: a tiny CNN with a fixed
NumPy initialisation, the data, and how the global batches are split over ranks.

Global update j uses rows [B·j, B·(j+1)) of the data (B = GLOBAL_BATCH). Rank r, micro-batch s
of that update (accumulation_steps = k) gets the rows
    B·j + (B/size)·r + (B/(size·k))·s  ...  + B/(size·k)
so the union over ranks and micro-batches of update j is exactly global batch j, and with a
mean loss the average of the ranks' mean gradients is the global batch's mean gradient.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

GLOBAL_BATCH = 8
STEPS_PER_EPOCH = 3
EPOCHS = 2
INPUT_SHAPE = (6, 6, 1)
CLASSES = 4


def single_thread():
    import tensorflow as tf
    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:            # already initialised (pytest process): fine
        pass


def data(seed=0):
    rng = np.random.default_rng(seed)
    n = GLOBAL_BATCH * STEPS_PER_EPOCH
    x = rng.standard_normal((n,) + INPUT_SHAPE).astype("float32")
    y = rng.integers(0, CLASSES, size=n).astype("int32")
    return x, y


def shard(x, rank, size, accumulation_steps=1):
    """The rows rank ``rank`` trains on, in its batch order (batch size B/(size·k))."""
    micro = GLOBAL_BATCH // (size * accumulation_steps)
    rows = []
    for j in range(len(x) // GLOBAL_BATCH):
        for s in range(accumulation_steps):
            start = GLOBAL_BATCH * j + (GLOBAL_BATCH // size) * rank + micro * s
            rows.extend(range(start, start + micro))
    return x[rows]


def initial_weights(seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((3, 3, 1, 3)).astype("float32") * 0.5,
            rng.standard_normal(3).astype("float32") * 0.1,
            rng.standard_normal((48, CLASSES)).astype("float32") * 0.3,
            rng.standard_normal(CLASSES).astype("float32") * 0.1]


def tiny_model(weights_seed=1):
    import keras
    inputs = keras.Input(INPUT_SHAPE)
    x = keras.layers.Conv2D(3, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(CLASSES, name="fc")(x)
    model = keras.Model(inputs, outputs, name="tiny")
    model.set_weights(initial_weights(weights_seed))
    return model


def compile_model(model, optimizer):
    import keras
    model.compile(optimizer=optimizer, jit_compile=False,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def schedule():
    from largebatch.schedules import build_schedule
    return build_schedule(peak_lr=0.8, steps_per_epoch=STEPS_PER_EPOCH, epochs=EPOCHS, warmup="gradual",
                          warmup_epochs=1, warmup_start_lr=0.2, decay="poly")


def lars(**kwargs):
    import largebatch.keras as lbk
    # fused=True: the XLA kernel inside model.fit's train function (the default uses it only for
    # variables of >= 4096 elements, bigger than this model's)
    options = dict(learning_rate=0.5, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.05, fused=True)
    options.update(kwargs)
    return lbk.LARS(**options)


def lamb(**kwargs):
    import largebatch.keras as lbk
    options = dict(learning_rate=0.01, weight_decay=1e-2, fused=True)
    options.update(kwargs)
    return lbk.LAMB(**options)


# scenario -> (optimizer factory, accumulation steps, compression, learning-rate schedule callback?)
SCENARIOS = {
    "lars": (lars, 1, None, True),
    "lars_accum": (lars, 2, None, False),
    # smaller lr: with fp16 gradients (rel. error ~5e-4) a ReLU flips within 6 steps at lr 0.5
    "lars_fp16": (lambda: lars(learning_rate=0.1), 1, "fp16", False),
    "lamb": (lamb, 1, None, False),
}


def fit_single(scenario, seed=0):
    """The single-process run: the plain optimizer on the concatenated batches (B = GLOBAL_BATCH)."""
    import largebatch.keras as lbk
    make, _, _, with_schedule = SCENARIOS[scenario]
    x, y = data(seed)
    model = compile_model(tiny_model(), make())
    callbacks = [lbk.callbacks.LearningRateSchedule(schedule())] if with_schedule else []
    history = model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=EPOCHS, shuffle=False, verbose=0,
                        callbacks=callbacks)
    return [w.numpy() for w in model.trainable_variables], history.history
