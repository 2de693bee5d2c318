"""largebatch.keras callbacks and models in one process (the multi-rank behaviour is in
test_keras_distributed.py): learning-rate schedule with momentum correction, trust-ratio
logging to CSV and TensorBoard event files, argument checks, model builders."""
import csv

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import largebatch.keras as lbk  # noqa: E402
from largebatch import schedules  # noqa: E402


def compiled_model(optimizer, seed=0):
    model = lbk.models.small_cnn((8, 8, 1), 3, width=4, blocks=1, seed=seed)
    model.compile(optimizer=optimizer, jit_compile=False,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 8, 8, 1)).astype("float32"), rng.integers(0, 3, n)


def one_step(model):
    x, y = data(4)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)


@pytest.mark.parametrize("make,corrected", [
    (lambda: lbk.LARS(learning_rate=1.0, weight_decay=1e-4), True),
    (lambda: keras.optimizers.SGD(1.0, momentum=0.9), True),
    (lambda: lbk.LAMB(learning_rate=1.0), False),        # Adam moments hold no learning rate
], ids=["lars", "keras-sgd", "lamb"])
def test_learning_rate_schedule_momentum_correction(make, corrected):
    opt = make()
    model = compiled_model(opt)
    one_step(model)                                       # momentum buffers now hold lr 1.0
    before = [m.numpy().copy() for m in opt.momentums]
    callback = lbk.callbacks.LearningRateSchedule(lambda step: 1.0 if step < 1 else 0.25)
    callback.set_model(model)
    callback.on_train_begin()
    callback.on_train_batch_begin(0)                      # optimizer step 1: lr 1.0 -> 0.25
    assert float(opt.learning_rate.numpy()) == 0.25
    factor = schedules.momentum_correction(0.25, 1.0) if corrected else 1.0
    for b, m in zip(before, opt.momentums):
        np.testing.assert_allclose(m.numpy(), b * factor, rtol=1e-6)
    callback.on_train_batch_begin(1)                      # same step, same lr: nothing more
    for b, m in zip(before, opt.momentums):
        np.testing.assert_allclose(m.numpy(), b * factor, rtol=1e-6)


def test_learning_rate_schedule_without_correction_and_in_fit():
    opt = lbk.LARS(learning_rate=1.0)
    model = compiled_model(opt)
    one_step(model)
    before = [m.numpy().copy() for m in opt.momentums]
    callback = lbk.callbacks.LearningRateSchedule(lambda step: 0.5, momentum_correction=False)
    callback.set_model(model)
    callback.on_train_begin()
    callback.on_train_batch_begin(0)
    for b, m in zip(before, opt.momentums):
        np.testing.assert_array_equal(m.numpy(), b)
    # in fit: the lr of each update is schedule(optimizer step), logged per epoch
    schedule = schedules.build_schedule(peak_lr=0.8, steps_per_epoch=4, epochs=2, warmup_epochs=1,
                                        warmup_start_lr=0.2)
    opt = lbk.LARS(learning_rate=1.0)
    model = compiled_model(opt)
    seen = []
    probe = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: seen.append(
        (int(opt.iterations.numpy()) - 1, float(opt.learning_rate.numpy()))))
    x, y = data(16)
    history = model.fit(x, y, batch_size=4, epochs=2, verbose=0, shuffle=False,
                        callbacks=[lbk.callbacks.LearningRateSchedule(schedule), probe])
    assert [s for s, _ in seen] == list(range(8))
    np.testing.assert_allclose([lr for _, lr in seen], [schedule(s) for s in range(8)], rtol=1e-6)
    assert history.history["learning_rate"] == pytest.approx([schedule(3), schedule(7)])


def test_learning_rate_schedule_refuses_schedule_objects():
    opt = lbk.LARS(learning_rate=keras.optimizers.schedules.ExponentialDecay(1.0, 10, 0.5))
    model = compiled_model(opt)
    callback = lbk.callbacks.LearningRateSchedule(lambda step: 0.1)
    callback.set_model(model)
    with pytest.raises(ValueError, match="^learning_rate: the optimizer was created with a schedule"):
        callback.on_train_begin()
    with pytest.raises(ValueError, match="^schedule: expected a callable"):
        lbk.callbacks.LearningRateSchedule(0.1)


def test_trust_ratio_logger_csv_and_tensorboard(tmp_path):
    opt = lbk.LARS(learning_rate=0.5, weight_decay=1e-3, trust_coefficient=0.02)
    model = compiled_model(opt)
    csv_path = tmp_path / "trust.csv"
    logger = lbk.callbacks.TrustRatioLogger(log_dir=tmp_path / "tb", csv_path=str(csv_path), every_n_steps=2)
    x, y = data(16)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False, callbacks=[logger])
    names = [v.path for v in model.trainable_variables]
    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [2] * len(names) + [4] * len(names)
    last = {r["variable"]: float(r["trust_ratio"]) for r in rows if r["step"] == "4"}
    assert last == pytest.approx(opt.trust_ratios())
    assert [step for step, _ in logger.records] == [2, 4]
    assert last["conv1/bias"] != 1.0 and last["conv1/kernel"] != 1.0       # the default adapts biases too
    for r in rows:       # layer lr = trust ratio × lr (constant lr here)
        assert float(r["layer_lr"]) == pytest.approx(float(r["trust_ratio"]) * 0.5, rel=1e-6)
    # TensorBoard: scalar summaries (scalars plugin) trust_ratio/<path> at steps 2 and 4
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1
    seen = {}
    for event in tf.compat.v1.train.summary_iterator(str(events[0])):
        for value in event.summary.value:
            assert value.metadata.plugin_data.plugin_name == "scalars"
            seen[(value.tag, event.step)] = float(tf.make_ndarray(value.tensor))
    assert seen[("trust_ratio/conv1/kernel", 4)] == pytest.approx(last["conv1/kernel"])
    assert len(seen) == 2 * len(names)


def test_trust_ratio_logger_needs_largebatch_optimizer():
    model = compiled_model(keras.optimizers.SGD(0.1))
    logger = lbk.callbacks.TrustRatioLogger(every_n_steps=1)
    logger.set_model(model)
    with pytest.raises(ValueError, match="^optimizer: TrustRatioLogger needs a largebatch.keras optimizer"):
        logger.on_train_begin()


@pytest.mark.parametrize("make,name", [
    (lambda: lbk.callbacks.TrustRatioLogger(every_n_steps=0), "every_n_steps"),
    (lambda: lbk.callbacks.RankConsistencyCheck(every_n_steps=-1), "every_n_steps"),
    (lambda: lbk.callbacks.BroadcastGlobalVariables(root_rank=-1), "root_rank"),
    (lambda: lbk.DistributedOptimizer(lbk.LARS(), accumulation_steps=0), "accumulation_steps"),
    (lambda: lbk.DistributedOptimizer(lbk.LARS(), compression="int8"), "compression"),
    (lambda: lbk.DistributedOptimizer(lbk.DistributedOptimizer(lbk.LARS())), "optimizer"),
    (lambda: lbk.DistributedOptimizer(keras.optimizers.SGD(gradient_accumulation_steps=2),
                                      accumulation_steps=2), "accumulation_steps"),
    (lambda: lbk.models.small_cnn((8, 8), 3), "input_shape"),
    (lambda: lbk.models.small_resnet((8, 8, 1), 0), "num_classes"),
], ids=["logger-steps", "check-steps", "root-rank", "accum", "compression", "double-wrap", "keras-accum",
        "cnn-shape", "resnet-classes"])
def test_bad_arguments(make, name):
    with pytest.raises(ValueError) as info:
        make()
    message = str(info.value)
    assert message.startswith(f"{name}:") and "\n" not in message, message


def _built_lars():
    opt = lbk.LARS()
    opt.build([keras.Variable(np.zeros((2, 2), "float32"))])
    return opt


def test_distributed_optimizer_is_a_subclass_with_the_same_config():
    base = lbk.LARS(learning_rate=2.0, weight_decay=1e-4, exclude=r"bias$", name="my_lars")
    wrapped = lbk.DistributedOptimizer(base, compression="fp16", accumulation_steps=4)
    assert isinstance(wrapped, lbk.LARS) and type(wrapped) is not lbk.LARS
    assert type(wrapped).__name__ == "LARS" and lbk.is_distributed(wrapped) and not lbk.is_distributed(base)
    assert wrapped.get_config() == base.get_config()
    # saved models record the plain class, so they load without largebatch's wrapper
    assert keras.optimizers.serialize(wrapped)["class_name"] == "LARS"
    # a built optimizer (resuming from a saved model) is converted in place, keeping its state
    built = lbk.LARS(learning_rate=0.5)
    variables = [keras.Variable(np.ones((2, 2), "float32"))]
    built.apply([tf.ones((2, 2))], variables)
    state = [v.numpy().copy() for v in built.variables]
    same = lbk.DistributedOptimizer(built)
    assert same is built and lbk.is_distributed(same) and isinstance(same, lbk.LARS)
    for a, b in zip(state, same.variables):
        np.testing.assert_array_equal(a, b.numpy())
    with pytest.raises(ValueError, match="^accumulation_steps: an optimizer that is already built"):
        lbk.DistributedOptimizer(_built_lars(), accumulation_steps=2)


@pytest.mark.parametrize("builder,kwargs,params", [
    (lbk.models.small_cnn, dict(width=8, blocks=2), 8 * 27 + 8 + 16 * 72 + 16 + 16 * 10 + 10),
    (lbk.models.small_cnn, dict(width=8, blocks=2, batch_norm=True), 8 * 27 + 16 + 16 * 72 + 32 + 16 * 10 + 10),
    (lbk.models.small_resnet, dict(width=8, blocks_per_stage=(1, 1)), None),
], ids=["cnn", "cnn-bn", "resnet"])
def test_models_build_and_train(builder, kwargs, params):
    model = builder((16, 16, 3), 10, seed=3, **kwargs)
    assert model.output_shape == (None, 10)
    if params is not None:
        assert model.count_params() - sum(int(np.prod(w.shape)) for w in model.non_trainable_weights) == params
    again = builder((16, 16, 3), 10, seed=3, **kwargs)
    for a, b in zip(model.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)                 # seeded: identical init in every process
    model.compile(optimizer=lbk.LARS(learning_rate=0.1), jit_compile=False,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    history = model.fit(rng.standard_normal((8, 16, 16, 3)).astype("float32"), rng.integers(0, 10, 8),
                        batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_model_save_and_load_keeps_optimizer(tmp_path):
    """A compiled model with LARS saves to .keras and loads back with its optimizer state."""
    opt = lbk.LARS(learning_rate=0.5, weight_decay=1e-3, exclude=r"bias$", nesterov=True)
    model = compiled_model(opt)
    one_step(model)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.optimizer) is lbk.LARS
    assert loaded.optimizer.get_config() == opt.get_config()
    for a, b in zip(opt.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert loaded.optimizer.trust_ratios() == pytest.approx(opt.trust_ratios())


# ---- Horovod's Keras callbacks with a largebatch optimizer: refused when fit starts --------------

class _CountBatches(keras.callbacks.Callback):
    batches = 0

    def on_train_batch_begin(self, batch, logs=None):
        type(self).batches += 1


@pytest.mark.parametrize("name,replacement", [
    ("BroadcastGlobalVariablesCallback", "largebatch.keras.callbacks.BroadcastGlobalVariables(root_rank)"),
    ("MetricAverageCallback", "largebatch.keras.callbacks.MetricAverage()"),
    ("LearningRateWarmupCallback", "largebatch.keras.callbacks.LearningRateSchedule(largebatch.schedules.build_schedule"),
])
@pytest.mark.parametrize("wrap", [False, True], ids=["lars", "distributed-lars"])
def test_horovod_keras_callback_is_refused_when_fit_starts(name, replacement, wrap):
    """No check_callbacks call: fit itself raises HorovodKerasError before the first batch, naming
    the callback and what replaces it (Horovod's own failure is an AttributeError after batch 1)."""
    hvd_keras = pytest.importorskip("horovod.tensorflow.keras")       # imported after largebatch.keras
    make = {"BroadcastGlobalVariablesCallback": lambda: hvd_keras.callbacks.BroadcastGlobalVariablesCallback(0),
            "MetricAverageCallback": lambda: hvd_keras.callbacks.MetricAverageCallback(),
            "LearningRateWarmupCallback": lambda: hvd_keras.callbacks.LearningRateWarmupCallback(initial_lr=0.1)}
    opt = lbk.LARS(learning_rate=1.0)
    if wrap:
        opt = lbk.DistributedOptimizer(opt)
    model = compiled_model(opt)
    x, y = data(8)
    _CountBatches.batches = 0
    with pytest.raises(lbk.HorovodKerasError) as info:
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[_CountBatches(), make[name]()])
    message = str(info.value)
    assert message.startswith(f"{name} from horovod.tensorflow.keras.callbacks does not work under Keras 3"), message
    assert replacement in message and "\n" not in message
    assert _CountBatches.batches == 0                      # refused before any batch ran


def test_horovod_keras_callbacks_untouched_without_a_largebatch_optimizer():
    hvd_keras = pytest.importorskip("horovod.tensorflow.keras")
    lbk.guard_horovod_callbacks()
    model = compiled_model(keras.optimizers.SGD(0.1))
    callback = hvd_keras.callbacks.BroadcastGlobalVariablesCallback(0)
    callback.set_model(model)
    callback.on_train_begin()                              # Keras SGD: Horovod's behaviour, no error
    assert lbk.check_callbacks([lbk.callbacks.MetricAverage()]) is not None


def test_check_callbacks_names_the_replacement_also_for_subclasses():
    hvd_keras = pytest.importorskip("horovod.tensorflow.keras")

    class MyBroadcast(hvd_keras.callbacks.BroadcastGlobalVariablesCallback):
        pass

    with pytest.raises(lbk.HorovodKerasError, match=r"^BroadcastGlobalVariablesCallback from horovod.*use "
                                                    r"largebatch\.keras\.callbacks\.BroadcastGlobalVariables"):
        lbk.check_callbacks([MyBroadcast(0)])


def test_momentum_buffers_with_lr_follow_the_registry():
    """The lr-in-buffer optimizers come from largebatch.registry (class paths imported by the
    adapter): LARS, CLARS and Keras SGD with momentum; not LAMB, not SGD without momentum."""
    from largebatch import registry
    from largebatch.keras.callbacks import _classes_with_lr_in_buffer, _momentum_buffers_with_lr
    assert set(_classes_with_lr_in_buffer()) == {keras.optimizers.SGD, lbk.LARS, lbk.CLARS}
    assert len(registry.class_paths("keras", lr_in_buffer=True)) == 3
    for opt, has_buffers in ((lbk.LARS(learning_rate=0.1), True), (lbk.CLARS(learning_rate=0.1), True),
                             (keras.optimizers.SGD(0.1, momentum=0.9), True), (keras.optimizers.SGD(0.1), False),
                             (lbk.LAMB(), False)):
        opt.build([keras.Variable(np.ones((2, 2), "float32"))])
        assert bool(_momentum_buffers_with_lr(opt)) == has_buffers, opt
        wrapped = lbk.DistributedOptimizer(opt)
        assert bool(_momentum_buffers_with_lr(wrapped)) == has_buffers, opt
