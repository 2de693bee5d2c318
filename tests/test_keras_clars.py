"""largebatch.keras.CLARS with model.fit (largebatch.keras.enable_clars).

- per-example norm sums (hook and vmap methods) equal a loop over single examples, for Dense
  (2-D and 3-D inputs) and Conv2D (valid/same padding, strides, dilation), and for BatchNorm
  models (vmap: each example's own statistics);
- model.fit with CLARS equals torch CLARS (same model, weights and data, hook method there)
  after 6 steps, both methods: within 1e-5 relative (max |Δ| / max |w| per tensor);
- model.fit with CLARS equals the NumPy reference step by step (per-example norms from a loop);
- a LossScaleOptimizer around CLARS gives the unscaled norms; refusals are one line;
- 2 ranks under horovodrun (tests/ranks/keras_clars.py, different data per rank; hooks, vmap,
  2 accumulation steps) equal one process on the concatenated batches (the last test).
"""
import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import largebatch.keras as lbk  # noqa: E402
from largebatch import ReferenceOptimizer  # noqa: E402
from ranks import keras_common as kc  # noqa: E402

REL = 1e-5
OPTIONS = dict(learning_rate=0.5, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.05)


def loss_fn():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def loop_norm_sums(model, x, y):
    """Σ_i ‖∇ f_i‖ per trainable variable, one example at a time (the definition)."""
    sums = np.zeros(len(model.trainable_variables))
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = model.compute_loss(y=y[i:i + 1], y_pred=model(x[i:i + 1], training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        sums += [float(tf.norm(g)) for g in grads]
    return sums


def compiled(model, optimizer=None):
    model.compile(optimizer=optimizer or lbk.CLARS(**OPTIONS), loss=loss_fn(), jit_compile=False)
    return model


def dense3d_model():
    inputs = keras.Input((5, 6))
    h = keras.layers.Dense(7, activation="tanh", name="seq")(inputs)
    h = keras.layers.Flatten()(h)
    return keras.Model(inputs, keras.layers.Dense(4, name="fc")(h))


def conv_model(padding="valid", strides=1, dilation=1, batch_norm=False):
    inputs = keras.Input((9, 9, 2))
    h = keras.layers.Conv2D(3, 3, padding=padding, strides=strides, dilation_rate=dilation, activation="relu",
                            name="conv")(inputs)
    if batch_norm:
        h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Conv2D(4, 2, name="conv2")(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(inputs, keras.layers.Dense(4, name="fc")(h))


MODELS = {
    "tiny": (kc.tiny_model, kc.INPUT_SHAPE),
    "dense3d": (dense3d_model, (5, 6)),
    "conv_valid": (conv_model, (9, 9, 2)),
    "conv_same_stride2": (lambda: conv_model("same", 2), (9, 9, 2)),
    "conv_same_dilated": (lambda: conv_model("same", 1, 2), (9, 9, 2)),
    "conv_valid_stride2": (lambda: conv_model("valid", 2), (9, 9, 2)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("method", ["hooks", "vmap"])
def test_norm_sums_equal_a_loop_over_examples(name, method):
    make, shape = MODELS[name]
    keras.utils.set_random_seed(0)
    model = compiled(make())
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6,) + shape).astype("float32")
    y = rng.integers(0, 4, 6).astype("int32")
    sums, batch = lbk.per_example_norm_sums(model, x, y, method=method)
    assert int(batch) == 6
    assert list(sums) == [v.path for v in model.trainable_variables]
    np.testing.assert_allclose([float(s) for s in sums.values()], loop_norm_sums(model, x, y), rtol=2e-6)


def test_batchnorm_model_uses_vmap_with_per_example_statistics():
    keras.utils.set_random_seed(0)
    model = compiled(conv_model(batch_norm=True))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 9, 9, 2)).astype("float32")
    y = rng.integers(0, 4, 4).astype("int32")
    moving = [v.numpy().copy() for v in model.non_trainable_variables]
    with pytest.raises(ValueError, match=r"^method='hooks': BatchNormalization 'bn' in training mode couples"):
        lbk.per_example_norm_sums(model, x, y, method="hooks")
    sums, _ = lbk.per_example_norm_sums(model, x, y)                       # auto -> vmap
    for before, v in zip(moving, model.non_trainable_variables):
        np.testing.assert_array_equal(before, v.numpy())                    # moving statistics untouched
    expected = loop_norm_sums(model, x, y)
    np.testing.assert_allclose([float(s) for s in sums.values()], expected, rtol=2e-6)


# ---- the same trajectory as torch CLARS ------------------------------------------------------

def _torch():
    torch = pytest.importorskip("torch")
    import largebatch.torch as lbt
    return torch, lbt


def torch_tiny(torch, weights):
    """kc.tiny_model in torch: conv (NCHW), ReLU, flatten in Keras' NHWC order, fc."""
    class NHWCFlatten(torch.nn.Module):
        def forward(self, x):
            return x.permute(0, 2, 3, 1).flatten(1)

    conv = torch.nn.Conv2d(1, 3, 3)
    fc = torch.nn.Linear(48, kc.CLASSES)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(weights[0].transpose(3, 2, 0, 1)))
        conv.bias.copy_(torch.tensor(weights[1]))
        fc.weight.copy_(torch.tensor(weights[2].T))
        fc.bias.copy_(torch.tensor(weights[3]))
    model = torch.nn.Sequential(conv, torch.nn.ReLU(), NHWCFlatten(), fc)
    to_keras = lambda: [conv.weight.detach().numpy().transpose(2, 3, 1, 0), conv.bias.detach().numpy(),  # noqa: E731
                        fc.weight.detach().numpy().T, fc.bias.detach().numpy()]
    return model, to_keras


def torch_clars_trajectory(x, y, steps):
    torch, lbt = _torch()
    torch.set_num_threads(1)
    model, to_keras = torch_tiny(torch, kc.initial_weights())
    options = dict(OPTIONS)
    opt = lbt.CLARS(model.parameters(), lr=options.pop("learning_rate"), **options)
    loss_fn = torch.nn.CrossEntropyLoss()
    xt = torch.tensor(x.transpose(0, 3, 1, 2))
    yt = torch.tensor(y, dtype=torch.long)
    out = []
    for step in range(steps):
        rows = slice(kc.GLOBAL_BATCH * (step % kc.STEPS_PER_EPOCH), kc.GLOBAL_BATCH * (step % kc.STEPS_PER_EPOCH + 1))
        opt.zero_grad()
        loss_fn(model(xt[rows]), yt[rows]).backward()
        sums, batch = lbt.per_example_norm_sums(model, loss_fn, xt[rows], yt[rows], method="hooks")
        opt.set_per_example_norms(sums, batch)
        opt.step()
        out.append(to_keras())
    return out


def relative_difference(got, expected):
    return max(float(np.max(np.abs(g - e)) / np.max(np.abs(e))) for g, e in zip(got, expected))


@pytest.mark.parametrize("method", ["hooks", "vmap"])
def test_fit_matches_torch_clars(method):
    x, y = kc.data(0)
    steps = kc.STEPS_PER_EPOCH * kc.EPOCHS
    expected = torch_clars_trajectory(x, y, steps)[-1]
    model = lbk.enable_clars(compiled(kc.tiny_model()), method=method)
    model.fit(x, y, batch_size=kc.GLOBAL_BATCH, epochs=kc.EPOCHS, shuffle=False, verbose=0)
    got = [v.numpy() for v in model.trainable_variables]
    diff = relative_difference(got, expected)
    print(f"\nkeras CLARS ({method}) vs torch CLARS after {steps} steps: max |Δ|/max|w| = {diff:.2e}")
    assert diff < REL
    for g, w0 in zip(got, kc.initial_weights()):
        # training moved every tensor (biases too: the default adapts them, so they move less)
        assert np.max(np.abs(g - w0)) > 1e-3
    ratios = model.optimizer.trust_ratios()
    assert ratios["conv/bias"] != 1.0 and 0 < ratios["conv/kernel"] < 1


# ---- the NumPy reference, step by step --------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "dense3d", "conv_same_stride2"])
def test_fit_matches_numpy_reference_step_by_step(name):
    make, shape = MODELS[name]
    keras.utils.set_random_seed(3)
    model = lbk.enable_clars(compiled(make(), lbk.CLARS(**OPTIONS, clip=name == "dense3d")))
    rng = np.random.default_rng(4)
    paths = [v.path for v in model.trainable_variables]
    params = {v.path: v.numpy().copy() for v in model.trainable_variables}
    options = dict(OPTIONS)
    ref = ReferenceOptimizer("clars", lr=options.pop("learning_rate"), clip=name == "dense3d", **options)
    worst = 0.0
    for step in range(5):
        x = rng.standard_normal((8,) + shape).astype("float32")
        y = rng.integers(0, 4, 8).astype("int32")
        with tf.GradientTape() as tape:
            loss = model.compute_loss(y=y, y_pred=model(x, training=True))
        grads = {p: g.numpy() for p, g in zip(paths, tape.gradient(loss, model.trainable_variables))}
        sums = dict(zip(paths, loop_norm_sums(model, x, y)))
        ref.step(params, grads, per_example_norm_sums=sums, global_batch_size=8)
        model.train_on_batch(x, y)
        for v in model.trainable_variables:
            desired = params[v.path]
            scale = float(np.max(np.abs(desired)))
            np.testing.assert_allclose(v.numpy(), desired, rtol=REL, atol=REL * scale, err_msg=f"{v.path} {step}")
            worst = max(worst, float(np.max(np.abs(v.numpy() - desired))) / scale)
        lrs = model.optimizer.layer_learning_rates()
        for p in paths:
            np.testing.assert_allclose(lrs[p], ref.layer_lrs[p], rtol=5e-5)
    print(f"\n{name}: keras CLARS vs NumPy reference, 5 steps: max |Δ|/max|w| = {worst:.2e}")


def test_loss_scale_optimizer_sees_unscaled_norms():
    x, y = kc.data(0)
    plain = lbk.enable_clars(compiled(kc.tiny_model()))
    plain.fit(x, y, batch_size=kc.GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    scaled = lbk.enable_clars(compiled(kc.tiny_model(), keras.optimizers.LossScaleOptimizer(
        lbk.CLARS(**OPTIONS), initial_scale=2.0 ** 10)))
    scaled.fit(x, y, batch_size=kc.GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    assert relative_difference([v.numpy() for v in scaled.trainable_variables],
                               [v.numpy() for v in plain.trainable_variables]) < REL


def test_fit_without_enable_clars_is_refused():
    x, y = kc.data(0)
    model = compiled(kc.tiny_model())
    with pytest.raises(ValueError, match=r"no per-example gradient norms for this step; call "
                                         r"largebatch.keras.enable_clars\(model\) before model.fit"):
        model.fit(x, y, batch_size=kc.GLOBAL_BATCH, epochs=1, verbose=0)


def test_enable_clars_needs_a_clars_optimizer():
    x, y = kc.data(0)
    model = lbk.enable_clars(compiled(kc.tiny_model(), lbk.LARS(**OPTIONS)))
    with pytest.raises(ValueError, match=r"^enable_clars: the model's optimizer is not largebatch.keras.CLARS"):
        model.fit(x, y, batch_size=kc.GLOBAL_BATCH, epochs=1, verbose=0)


def test_hooks_method_on_an_unsupported_model_is_one_line():
    model = lbk.enable_clars(compiled(conv_model(batch_norm=True)), method="hooks")
    x = np.zeros((4, 9, 9, 2), "float32")
    with pytest.raises(ValueError, match=r"^method='hooks': BatchNormalization 'bn' in training mode couples the "
                                         r"examples; use method='vmap'$"):
        model.fit(x, np.zeros(4, "int32"), batch_size=4, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"^method: expected 'auto', 'hooks' or 'vmap', got 'loop'$"):
        lbk.enable_clars(model, method="loop")


def test_clars_arguments_and_config_round_trip():
    opt = lbk.CLARS(**OPTIONS, nesterov=True)
    again = lbk.CLARS.from_config(opt.get_config())
    assert again.get_config() == opt.get_config() and isinstance(again, lbk.LARS)
    assert keras.optimizers.deserialize(keras.optimizers.serialize(opt)).__class__ is lbk.CLARS
    with pytest.raises(ValueError, match=r"^trust_denominator: CLARS defines its own denominator, expected "
                                         r"'sum_of_norms', got 'norm_of_sum'$"):
        lbk.CLARS(trust_denominator="norm_of_sum")
    with pytest.raises(ValueError, match=r"^gradient_accumulation_steps: Keras' own accumulation"):
        lbk.CLARS(gradient_accumulation_steps=2)


def test_clars_has_lars_signature_and_its_own_name():
    """CLARS repeats none of LARS's arguments: same signature, the registry's name as default
    name, the unknown-argument hint listing LARS's names."""
    import inspect
    assert list(inspect.signature(lbk.CLARS).parameters) == list(inspect.signature(lbk.LARS).parameters)
    assert lbk.CLARS().name == "clars" and lbk.LARS().name == "lars" and lbk.CLARS(name="c").name == "c"
    assert lbk.CLARS().get_config()["name"] == "clars"
    with pytest.raises(ValueError, match=r"^trust_coeficient: unknown argument for CLARS; did you mean "
                                         r"trust_coefficient\?"):
        lbk.CLARS(trust_coeficient=0.1)
    with pytest.raises(ValueError, match=r"^nesterov: needs momentum > 0, got momentum=0.0$"):
        lbk.CLARS(momentum=0.0, nesterov=True)


def test_custom_loop_with_set_per_example_norms():
    x, y = kc.data(0)
    model = compiled(kc.tiny_model())
    fit_model = lbk.enable_clars(compiled(kc.tiny_model()))
    fit_model.fit(x[:8], y[:8], batch_size=8, epochs=1, shuffle=False, verbose=0)
    opt = model.optimizer
    with tf.GradientTape() as tape:
        loss = model.compute_loss(y=y[:8], y_pred=model(x[:8], training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    opt.set_per_example_norms(*lbk.per_example_norm_sums(model, x[:8], y[:8]))
    opt.apply(grads, model.trainable_variables)
    assert relative_difference([v.numpy() for v in model.trainable_variables],
                               [v.numpy() for v in fit_model.trainable_variables]) < REL
    with pytest.raises(ValueError, match="no per-example gradient norms"):
        opt.apply(grads, model.trainable_variables)


# ---- two ranks under horovodrun ---------------------------------------------------------------

@pytest.fixture(scope="module")
def two_ranks():
    pytest.importorskip("horovod.tensorflow")
    from multirank import run_ranks
    return run_ranks("ranks/keras_clars.py", np=2, timeout=600)


SCENARIOS = {"hooks": ("hooks", 1), "vmap": ("vmap", 1), "hooks_accum": ("hooks", 2)}


@pytest.mark.multirank
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_two_ranks_equal_one_process_on_the_concatenated_batch(two_ranks, scenario):
    method, _ = SCENARIOS[scenario]
    x, y = kc.data(0)
    single = lbk.enable_clars(compiled(kc.tiny_model()), method=method)
    history = single.fit(x, y, batch_size=kc.GLOBAL_BATCH, epochs=kc.EPOCHS, shuffle=False, verbose=0)
    expected = [v.numpy() for v in single.trainable_variables]
    got = [two_ranks[0][f"{scenario}.w{i}"] for i in range(4)]
    for i in range(4):
        np.testing.assert_array_equal(two_ranks[0][f"{scenario}.w{i}"], two_ranks[1][f"{scenario}.w{i}"])
    diff = relative_difference(got, expected)
    print(f"\n2 ranks ({scenario}) vs 1 process: max |Δ|/max|w| = {diff:.2e}")
    assert diff < REL
    np.testing.assert_allclose(two_ranks[0][f"{scenario}.loss"], history.history["loss"], rtol=1e-5)
    for rank in (0, 1):
        assert int(two_ranks[rank][f"{scenario}.iterations"]) == kc.STEPS_PER_EPOCH * kc.EPOCHS
        assert int(two_ranks[rank][f"{scenario}.checks"]) > 0            # RankConsistencyCheck passed


@pytest.mark.multirank
def test_yaml_runner_trains_keras_clars_on_two_ranks(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    run_dir = tmp_path / "run"
    proc = subprocess.run([str(Path(sys.executable).with_name("largebatch")), "run", "examples/synthetic_keras.yaml",
                           "--np", "2", "optimizer.name=clars", "data.samples=256", "data.val_samples=64",
                           "train.epochs=1", "output.progress=false", "launcher.threads_per_rank=1",
                           f"output.run_dir={run_dir}"], cwd=str(root), env=dict(os.environ), capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["optimizer"] == "clars" and summary["ranks_agree"] is True
    ratios = (run_dir / "trust_ratios.csv").read_text().splitlines()
    assert len(ratios) > 1                                           # CLARS's layer ratios were logged
