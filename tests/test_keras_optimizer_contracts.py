"""The Keras 3 optimizer contracts largebatch's Keras optimizers keep, where one applies: a copy
(``copy.deepcopy``, ``pickle``) of a built optimizer, a ``get_config``/``from_config`` clone, and a
model saved with ``model.save`` and loaded with ``keras.models.load_model``, each then training
on exactly as the original does.

Keras copies a saveable through its file format, whose loader drops the state of an optimizer
that is not built yet (Keras's own SGD loses its momentum that way, with a warning); ours keep it
until they are built on the model's variables.
"""
import copy
import pickle
import warnings

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import largebatch.keras as lbk  # noqa: E402

OPTIMIZERS = {
    "lars": lambda: lbk.LARS(learning_rate=0.5, weight_decay=1e-3, trust_coefficient=0.02, nesterov=True),
    "larc": lambda: lbk.LARS(learning_rate=0.5, weight_decay=1e-3, trust_coefficient=0.02, clip=True, fused=True),
    "lamb": lambda: lbk.LAMB(learning_rate=1e-2, weight_decay=1e-2),
}


def make_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d1"),
                             keras.layers.BatchNormalization(name="bn"), keras.layers.Dense(2, name="d2")])


def fit(model, epochs):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((16, 4)).astype("float32"), rng.standard_normal((16, 2)).astype("float32")
    model.fit(x, y, batch_size=8, epochs=epochs, verbose=0, shuffle=False)


def compiled(optimizer, weights=None):
    model = make_model()
    if weights is not None:
        model.set_weights(weights)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=False)
    return model


def assert_same_weights(a, b, what):
    for x, y in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(x, y, err_msg=what)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_copy_of_a_built_optimizer_trains_on_as_the_original(name, how):
    """Copied after one epoch (2 updates), built on a twin of the model: the twin's next two epochs
    equal the original's, its step counter included, and no state is dropped with a warning."""
    model = compiled(OPTIMIZERS[name]())
    fit(model, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        twin_opt = copy.deepcopy(model.optimizer) if how == "deepcopy" else pickle.loads(pickle.dumps(model.optimizer))
    assert not [w for w in caught if "Skipping variable loading" in str(w.message)]
    twin = compiled(twin_opt, model.get_weights())
    fit(model, 2)
    fit(twin, 2)
    assert_same_weights(model, twin, how)
    assert int(twin.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy()) == 6
    for a, b in zip(model.optimizer.variables, twin.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_from_config_clone_trains_as_the_original(name):
    """get_config/from_config gives a fresh optimizer of the same hyper-parameters: trained from
    the same start, it makes the same updates."""
    original = OPTIMIZERS[name]()
    clone = type(original).from_config(copy.deepcopy(original.get_config()))
    assert clone.get_config() == original.get_config()
    a, b = compiled(original), compiled(clone)
    fit(a, 2)
    fit(b, 2)
    assert_same_weights(a, b, "from_config")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_save_and_load_model_then_train_on_identically(name, tmp_path):
    """model.save / keras.models.load_model after one epoch: the loaded model's next two epochs
    equal the original's (the optimizer's slots and step counter came back)."""
    model = compiled(OPTIMIZERS[name]())
    fit(model, 1)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert type(loaded.optimizer) is type(model.optimizer)
    fit(model, 2)
    fit(loaded, 2)
    assert_same_weights(model, loaded, "load_model")
    assert int(loaded.optimizer.iterations.numpy()) == 6
