"""largebatch.keras.LARS / LAMB against the NumPy reference, step by step, for every option.

The same random gradients go to both; after each of 20 steps every variable must agree with
the reference to rtol 1e-5 in float32, with atol = 1e-5·max|w| of the tensor (entries near 0
carry the absolute rounding of 20 steps of float32 sums, not a relative one), and each
layer's lr to 5e-5 (a ratio of norms of those weights).
"""
import copy
import os
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import largebatch.keras as lbk  # noqa: E402
from largebatch import ParamPolicy, ReferenceOptimizer  # noqa: E402

STEPS = 20
RTOL, ATOL = 1e-5, 1e-6          # ATOL: only for the few tests on tensors that are not O(1)
LR_RTOL = 5e-5          # a layer lr is a ratio of norms of weights that carry 20 steps of float32 rounding


def tiny_variables(seed=0, zero=()):
    """The trainable variables of a small conv/BN/dense model (real Keras paths), random values."""
    inputs = keras.Input((4, 4, 2))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(3, name="fc")(x)
    model = keras.Model(inputs, outputs, name="m")
    rng = np.random.default_rng(seed)
    for v in model.trainable_variables:
        value = rng.standard_normal(v.shape).astype("float32") * 0.5
        v.assign(np.zeros(v.shape, "float32") if v.path in zero else value)
    return model.trainable_variables


PATHS = ("conv/kernel", "conv/bias", "bn/gamma", "bn/beta", "fc/kernel", "fc/bias")


def assert_close(actual, desired, what):
    desired = np.asarray(desired)
    scale = float(np.max(np.abs(desired))) if desired.size else 0.0
    np.testing.assert_allclose(actual, desired, rtol=RTOL, atol=RTOL * scale, err_msg=what)


def run_against_reference(make_keras, reference, *, steps=STEPS, zero_grads=(), zero=(), lr_of_step=None,
                          graph=False, seed=0):
    variables = tiny_variables(seed, zero)
    assert tuple(v.path for v in variables) == PATHS
    params = {v.path: v.numpy().copy() for v in variables}
    opt = make_keras()
    rng = np.random.default_rng(seed + 1)
    apply = opt.apply
    if graph:
        apply = tf.function(lambda grads: opt.apply(grads, variables))
    for step in range(steps):
        grads = {p: (np.zeros(params[p].shape, "float32") if p in zero_grads
                     else rng.standard_normal(params[p].shape).astype("float32")) for p in PATHS}
        tensors = [tf.constant(grads[v.path]) for v in variables]
        if graph:
            apply(tensors)
        else:
            apply(tensors, variables)
        reference.step(params, grads, lr=None if lr_of_step is None else lr_of_step(step))
        for v in variables:
            assert_close(v.numpy(), params[v.path], f"{v.path} after step {step + 1}")
            assert np.all(np.isfinite(v.numpy()))
        lrs = opt.layer_learning_rates()
        for p in PATHS:
            np.testing.assert_allclose(lrs[p], reference.layer_lrs[p], rtol=LR_RTOL, err_msg=f"layer lr of {p}")
    return opt, variables


LARS_CASES = {
    "default": {},
    "weight_decay": dict(weight_decay=1e-2),
    "norm_of_sum": dict(weight_decay=1e-2, trust_denominator="norm_of_sum"),
    "clip_larc": dict(weight_decay=1e-2, clip=True),
    "nesterov": dict(weight_decay=1e-2, nesterov=True),
    "eps": dict(weight_decay=1e-2, eps=0.5),
    "no_momentum": dict(momentum=0.0, weight_decay=1e-2),
    "exclude_nothing": dict(weight_decay=1e-2, exclude=False),
    "exclude_everything": dict(weight_decay=1e-2, exclude=True),
    "exclude_regex": dict(weight_decay=1e-2, exclude=r"^fc/"),
    "exclude_list": dict(weight_decay=1e-2, exclude=[None, r"conv/kernel"]),
    "exclude_dict": dict(weight_decay=1e-2, exclude={"adaptation": None, "decay": False}),
    "exclude_callable": dict(weight_decay=1e-2, exclude=lambda name, shape: name.endswith("gamma") or len(shape) == 2),
    "exclude_policy": dict(weight_decay=1e-2, exclude=ParamPolicy(r"bias$", False)),
}


def lars_pair(options, fused, lr=1.0, trust_coefficient=0.02):
    reference = ReferenceOptimizer("lars", lr=lr, trust_coefficient=trust_coefficient, **options)
    return (lambda: lbk.LARS(learning_rate=lr, trust_coefficient=trust_coefficient, fused=fused, **options)), reference


@pytest.mark.parametrize("fused", [True, False], ids=["xla", "plain"])
@pytest.mark.parametrize("case", sorted(LARS_CASES))
def test_lars_matches_reference(case, fused):
    make, reference = lars_pair(LARS_CASES[case], fused)
    run_against_reference(make, reference)


@pytest.mark.parametrize("fused", [True, False], ids=["xla", "plain"])
@pytest.mark.parametrize("clip", [False, True], ids=["lars", "larc"])
def test_lars_zero_norms(clip, fused):
    """Zero-initialised weights (‖w‖ = 0), zero gradients (‖g‖ = 0) and both: ratio 1, no NaN/Inf."""
    options = dict(weight_decay=1e-2, clip=clip, exclude=False)
    make, reference = lars_pair(options, fused)
    opt, _ = run_against_reference(make, reference, zero=("fc/kernel", "conv/bias"),
                                   zero_grads=("conv/kernel", "conv/bias", "bn/gamma"))
    assert opt.trust_ratios()["conv/kernel"] == pytest.approx(1.0)


def test_lars_zero_everything_stays_finite():
    """A zero weight with a zero gradient forever: nothing moves, nothing becomes NaN."""
    make, reference = lars_pair(dict(weight_decay=1e-2, exclude=False), True)
    opt, variables = run_against_reference(make, reference, steps=3, zero=PATHS, zero_grads=PATHS)
    assert all(not np.any(v.numpy()) for v in variables)
    assert set(opt.trust_ratios().values()) == {1.0}


def test_lars_schedule_graph_mode():
    """A keras LearningRateSchedule as learning_rate, apply() inside tf.function (as in model.fit)."""
    schedule = keras.optimizers.schedules.ExponentialDecay(1.0, decay_steps=3, decay_rate=0.5)
    options = dict(weight_decay=1e-2, nesterov=True)
    reference = ReferenceOptimizer("lars", lr=1.0, trust_coefficient=0.02, **options)
    make = lambda: lbk.LARS(learning_rate=schedule, trust_coefficient=0.02, **options)  # noqa: E731
    run_against_reference(make, reference, lr_of_step=lambda s: float(schedule(s)), graph=True)


def test_lars_auto_fused_on_large_variable():
    """fused=None (default) uses the XLA kernel for big tensors and plain ops for small ones."""
    rng = np.random.default_rng(3)
    big = keras.Variable(rng.standard_normal((64, 128)).astype("float32"), name="big")
    small = keras.Variable(rng.standard_normal((3, 5)).astype("float32"), name="small")
    params = {"big": big.numpy().copy(), "small": small.numpy().copy()}
    opt = lbk.LARS(learning_rate=1.0, trust_coefficient=0.02, weight_decay=1e-3)
    assert opt._use_fused(big.value) and not opt._use_fused(small.value)
    reference = ReferenceOptimizer("lars", lr=1.0, trust_coefficient=0.02, weight_decay=1e-3)
    for _ in range(5):
        grads = {k: rng.standard_normal(v.shape).astype("float32") for k, v in params.items()}
        opt.apply([tf.constant(grads["big"]), tf.constant(grads["small"])], [big, small])
        reference.step(params, grads)
    np.testing.assert_allclose(big.numpy(), params["big"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(small.numpy(), params["small"], rtol=RTOL, atol=ATOL)


LAMB_CASES = {
    "default": {},
    "weight_decay": dict(weight_decay=1e-2),
    "exclude_nothing": dict(weight_decay=1e-2, exclude=False),
    "exclude_regex": dict(weight_decay=1e-2, exclude=r"(bias|beta)$"),
    "betas_eps": dict(weight_decay=1e-2, beta_1=0.8, beta_2=0.99, epsilon=1e-3),     # the former name
    "betas_eps_torch_name": dict(weight_decay=1e-2, beta_1=0.8, beta_2=0.99, eps=1e-3),
}


def lamb_pair(options, fused, lr=0.05):
    options = dict(options)
    betas = (options.pop("beta_1", 0.9), options.pop("beta_2", 0.999))
    eps_name = "eps" if "eps" in options else "epsilon"      # LAMB takes both (eps; epsilon, its former name)
    eps = options.pop(eps_name, 1e-6)
    reference = ReferenceOptimizer("lamb", lr=lr, betas=betas, eps=eps, **options)
    make = lambda: lbk.LAMB(learning_rate=lr, beta_1=betas[0], beta_2=betas[1], **{eps_name: eps},  # noqa: E731
                            fused=fused, **options)
    return make, reference


@pytest.mark.parametrize("fused", [True, False], ids=["xla", "plain"])
@pytest.mark.parametrize("case", sorted(LAMB_CASES))
def test_lamb_matches_reference(case, fused):
    make, reference = lamb_pair(LAMB_CASES[case], fused)
    run_against_reference(make, reference)


@pytest.mark.parametrize("fused", [True, False], ids=["xla", "plain"])
def test_lamb_zero_norms(fused):
    make, reference = lamb_pair(dict(weight_decay=1e-2, exclude=False), fused)
    run_against_reference(make, reference, zero=("fc/kernel",), zero_grads=("conv/kernel", "fc/kernel"))


def test_keras_weight_decay_is_not_applied_twice():
    """Keras' base class would decay every variable itself if given weight_decay: LARS must not
    let it (one step from w with a zero gradient and excluded-from-adaptation rules)."""
    v = keras.Variable(np.ones((2, 3), "float32"), name="w")
    opt = lbk.LARS(learning_rate=0.1, momentum=0.0, weight_decay=0.5,
                   exclude={"adaptation": True, "decay": False, "rate": "global"})
    opt.apply([tf.zeros((2, 3))], [v])
    np.testing.assert_allclose(v.numpy(), 1.0 - 0.1 * 0.5, rtol=1e-6)   # w − γ·β·w, once
    assert opt.weight_decay == 0.5 and opt.get_config()["weight_decay"] == 0.5


def test_keras_exclude_from_weight_decay_is_honoured():
    variables = tiny_variables()
    params = {v.path: v.numpy().copy() for v in variables}
    opt = lbk.LARS(learning_rate=1.0, trust_coefficient=0.02, weight_decay=1e-2)
    opt.exclude_from_weight_decay(var_names=["kernel"])
    reference = ReferenceOptimizer("lars", lr=1.0, trust_coefficient=0.02, weight_decay=1e-2,
                                   exclude={"decay": [None, "kernel"]})        # adaptation: the default, all
    rng = np.random.default_rng(5)
    for _ in range(3):
        grads = {p: rng.standard_normal(params[p].shape).astype("float32") for p in PATHS}
        opt.apply([tf.constant(grads[v.path]) for v in variables], variables)
        reference.step(params, grads)
    for v in variables:
        np.testing.assert_allclose(v.numpy(), params[v.path], rtol=RTOL, atol=ATOL)


def test_trust_ratios_are_layer_lr_over_lr():
    make, reference = lars_pair(dict(weight_decay=1e-2), True, lr=0.5)
    opt, _ = run_against_reference(make, reference, steps=2)
    ratios = opt.trust_ratios()
    for p in PATHS:
        assert ratios[p] == pytest.approx(reference.trust_ratios[p], rel=RTOL)
    assert ratios["conv/bias"] != 1.0 and ratios["conv/kernel"] != 1.0     # the default adapts biases too


# ---- configuration ------------------------------------------------------------------------

def test_get_config_round_trip():
    schedule = keras.optimizers.schedules.PolynomialDecay(2.0, 100, end_learning_rate=0.1, power=2.0)
    for opt in (lbk.LARS(learning_rate=3.0, momentum=0.8, weight_decay=5e-4, trust_coefficient=0.01, eps=1e-9,
                         trust_denominator="norm_of_sum", clip=True, nesterov=True, exclude=r"bias$", fused=False,
                         name="my_lars", clipnorm=1.0),
                lbk.LARS(learning_rate=schedule, exclude={"adaptation": None, "decay": False}),
                lbk.LARS(exclude=ParamPolicy(r"bn", None)),
                lbk.LAMB(learning_rate=2e-3, beta_1=0.85, beta_2=0.98, epsilon=1e-8, weight_decay=0.01,
                         exclude=[None, "bias"], name="my_lamb")):
        config = opt.get_config()
        clone = type(opt).from_config(copy.deepcopy(config))     # Keras' from_config edits its argument
        assert clone.get_config() == config
        # and through Keras' own (JSON-able) serialization
        serialized = keras.optimizers.serialize(opt)
        again = keras.optimizers.deserialize(serialized)
        assert type(again) is type(opt) and again.get_config() == config


def test_lamb_eps_and_its_former_name_epsilon():
    """LAMB takes eps (torch's name, as LARS does) and still epsilon; the config holds eps, and a
    config written with 'epsilon' (before the rename) still loads."""
    new, old = lbk.LAMB(eps=1e-4), lbk.LAMB(epsilon=1e-4)
    assert new.eps == old.eps == old.epsilon == 1e-4
    config = new.get_config()
    assert config["eps"] == 1e-4 and "epsilon" not in config and old.get_config() == config
    former = dict(config)
    former["epsilon"] = former.pop("eps")
    loaded = lbk.LAMB.from_config(former)
    assert loaded.eps == 1e-4 and loaded.get_config() == config
    assert lbk.LAMB().eps == 1e-6 and lbk.LARS().eps == 0.0


def test_config_values():
    config = lbk.LARS(learning_rate=2, momentum=0.5, eps=1e-3, clip=True).get_config()
    assert config["learning_rate"] == 2.0 and config["momentum"] == 0.5 and config["eps"] == 1e-3
    assert config["clip"] is True and config["trust_denominator"] == "sum_of_norms"
    assert config["exclude"] is None and config["name"] == "lars"


BAD_ARGUMENTS = [
    (lbk.LARS, dict(learning_rate=-1.0), "learning_rate"),
    (lbk.LARS, dict(learning_rate="fast"), "learning_rate"),
    (lbk.LARS, dict(momentum=1.0), "momentum"),
    (lbk.LARS, dict(momentum=-0.1), "momentum"),
    (lbk.LARS, dict(weight_decay=-1e-4), "weight_decay"),
    (lbk.LARS, dict(trust_coefficient=0.0), "trust_coefficient"),
    (lbk.LARS, dict(eps=-1.0), "eps"),
    (lbk.LARS, dict(eps=float("nan")), "eps"),
    (lbk.LARS, dict(trust_denominator="max"), "trust_denominator"),
    (lbk.LARS, dict(clip="yes"), "clip"),
    (lbk.LARS, dict(nesterov=1), "nesterov"),
    (lbk.LARS, dict(nesterov=True, momentum=0.0), "nesterov"),
    (lbk.LARS, dict(exclude=3), "exclude"),
    (lbk.LARS, dict(exclude="[unclosed"), "exclude"),
    (lbk.LARS, dict(exclude={"adapt": None}), "exclude"),
    (lbk.LARS, dict(fused="yes"), "fused"),
    (lbk.LARS, dict(lr=0.1), "lr"),
    (lbk.LAMB, dict(learning_rate=-1e-3), "learning_rate"),
    (lbk.LAMB, dict(beta_1=1.0), "beta_1"),
    (lbk.LAMB, dict(beta_2=-0.5), "beta_2"),
    (lbk.LAMB, dict(epsilon=-1.0), "epsilon"),
    (lbk.LAMB, dict(eps=-1.0), "eps"),
    (lbk.LAMB, dict(eps=1e-3, epsilon=1e-4), "epsilon"),
    (lbk.LAMB, dict(weight_decay=-1.0), "weight_decay"),
]


@pytest.mark.parametrize("cls,kwargs,name", BAD_ARGUMENTS,
                         ids=[f"{c.__name__}-{'-'.join(k)}-{i}" for i, (c, k, _) in enumerate(BAD_ARGUMENTS)])
def test_bad_arguments(cls, kwargs, name):
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{name}:"), message


@pytest.mark.parametrize("cls,name,suggestion", [
    (lbk.LARS, "lr", "learning_rate"), (lbk.LAMB, "lr", "learning_rate"), (lbk.LAMB, "betas", "beta_1 and beta_2"),
    (lbk.LARS, "epsilon", "eps"), (lbk.LAMB, "beta1", "beta_1"), (lbk.LARS, "trust_coeficient", "trust_coefficient"),
    (lbk.LARS, "eeta", "trust_coefficient"),
])
def test_unknown_argument_suggests_the_name(cls, name, suggestion):
    """lbk.LARS(lr=0.1): one line naming the argument Keras calls it (torch users write lr)."""
    with pytest.raises(ValueError) as info:
        cls(**{name: 0.1})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{name}: unknown argument for {cls.__name__}; did you mean {suggestion}?"), message


def test_unknown_argument_without_a_close_name_lists_them():
    with pytest.raises(ValueError, match=r"^zzz: unknown argument for LARS; expected one of: learning_rate, momentum"):
        lbk.LARS(zzz=1)


def test_clars_is_lars_with_its_own_denominator():
    # largebatch.keras.CLARS with model.fit: tests/test_keras_clars.py
    assert issubclass(lbk.CLARS, lbk.LARS)


# ---- the legacy-Keras refusal ----------------------------------------------------------------

def test_legacy_keras_is_refused():
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", "import largebatch.keras"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: largebatch.keras supports Keras 3 only"), last
    assert "TF_USE_LEGACY_KERAS" in last


def test_check_optimizer_accepts_keras3_optimizers():
    opt = lbk.LARS()
    assert lbk.check_optimizer(opt) is opt
    assert lbk.check_optimizer(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()))
    with pytest.raises(ValueError, match="^optimizer: expected a Keras 3"):
        lbk.check_optimizer("sgd")


# ---- cross-framework: torch LARS and Keras LARS, same init, same gradients --------------------

def _torch_lars():
    try:
        import torch
        from largebatch.torch import LARS
    except Exception as err:              # noqa: BLE001 - any import problem means "not there yet"
        pytest.skip(f"largebatch.torch.LARS is not importable yet ({type(err).__name__}: {err})")
    return torch, LARS


@pytest.mark.parametrize("options", [dict(weight_decay=1e-2), dict(weight_decay=1e-2, nesterov=True, clip=True),
                                     dict(weight_decay=1e-2, trust_denominator="norm_of_sum", exclude=r"^fc/")],
                         ids=["lars", "larc-nesterov", "norm_of_sum-regex"])
def test_torch_and_keras_lars_agree(options):
    torch, TorchLARS = _torch_lars()
    variables = tiny_variables(seed=7)
    named = [(v.path, torch.nn.Parameter(torch.tensor(v.numpy()))) for v in variables]
    torch_opt = TorchLARS(named, lr=1.0, trust_coefficient=0.02, **options)
    keras_opt = lbk.LARS(learning_rate=1.0, trust_coefficient=0.02, **options)
    rng = np.random.default_rng(8)
    for step in range(STEPS):
        grads = [rng.standard_normal(v.shape).astype("float32") for v in variables]
        for (_, p), g in zip(named, grads):
            p.grad = torch.tensor(g)
        torch_opt.step()
        keras_opt.apply([tf.constant(g) for g in grads], variables)
        for v, (name, p) in zip(variables, named):
            assert_close(v.numpy(), p.detach().numpy(), f"{name} after step {step + 1}")


@pytest.mark.parametrize("make", [lambda: lbk.LARS(learning_rate=0.1, fused=True),
                                  lambda: lbk.LAMB(learning_rate=0.1, fused=True)], ids=["lars", "lamb"])
def test_xla_kernels_are_shared_by_successive_models(make):
    """The XLA kernels are cached per shape; a second model (the first one deleted) must reuse them
    without touching the first model's variables, inside model.fit's compiled train function."""
    import gc

    def fit_once(seed):
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, kernel_initializer=keras.initializers.Ones())])
        model.compile(optimizer=make(), loss="mse", jit_compile=False)
        rng = np.random.default_rng(seed)
        model.fit(rng.standard_normal((4, 3)).astype("float32"), np.ones((4, 2), "float32"), verbose=0,
                  shuffle=False)
        return model.get_weights()[0]

    first = fit_once(0)
    gc.collect()
    second = fit_once(0)
    np.testing.assert_allclose(first, second, rtol=1e-6)
