"""The NumPy reference optimizer, the parameter policy, and the core's import hygiene."""
import subprocess
import sys

import numpy as np
import pytest

from largebatch import ParamPolicy, ReferenceOptimizer
from largebatch.policy import MLPERF


def test_reference_lars_two_steps_by_hand():
    w = {"w": np.array([[3.0, 4.0]])}                     # ndim 2: adapted and decayed by default
    g = {"w": np.array([[0.6, 0.8]])}
    opt = ReferenceOptimizer("lars", lr=0.5, momentum=0.9, weight_decay=0.01, trust_coefficient=0.1)
    opt.step(w, g)
    lam0 = 0.1 * 5 / (1 + 0.05)
    v1 = 0.5 * lam0 * np.array([[0.63, 0.84]])
    np.testing.assert_allclose(w["w"], [[3.0, 4.0]] - v1)
    assert opt.trust_ratios["w"] == pytest.approx(lam0)
    w1 = w["w"].copy()
    opt.step(w, g)
    n1 = np.linalg.norm(w1)
    v2 = 0.9 * v1 + 0.5 * (0.1 * n1 / (1 + 0.01 * n1)) * (g["w"] + 0.01 * w1)
    np.testing.assert_allclose(w["w"], w1 - v2)
    np.testing.assert_allclose(opt.state["w"]["momentum_buffer"], v2)


def test_excluded_params_get_plain_sgd_without_decay():
    """Excluded (the MLPerf convention): no ratio, no decay, the rate γ; with rate 'trust' γ·η."""
    w = {"bias": np.array([1.0, 2.0])}
    opt = ReferenceOptimizer("lars", lr=0.1, momentum=0.0, weight_decay=0.5, exclude=MLPERF)
    opt.step(w, {"bias": np.array([1.0, 1.0])})
    np.testing.assert_allclose(w["bias"], [0.9, 1.9])
    assert opt.trust_ratios["bias"] == 1.0
    w = {"bias": np.array([1.0, 2.0])}
    safe = ReferenceOptimizer("lars", lr=20.0, momentum=0.0, weight_decay=0.5, trust_coefficient=0.005,
                              exclude=dict(MLPERF, rate="trust"))
    safe.step(w, {"bias": np.array([1.0, 1.0])})
    np.testing.assert_allclose(w["bias"], [0.9, 1.9])                 # rate 20 × 0.005 = 0.1
    assert safe.trust_ratios["bias"] == pytest.approx(0.005)


def test_the_default_adapts_every_tensor_and_decays_none_of_ndim_1():
    w = {"bias": np.array([3.0, 4.0])}                                 # ‖w‖ = 5
    opt = ReferenceOptimizer("lars", lr=2.0, momentum=0.0, weight_decay=0.5, trust_coefficient=0.1)
    opt.step(w, {"bias": np.array([0.6, 0.8])})                        # ‖g‖ = 1, not decayed: λ = 0.1·5/1
    assert opt.trust_ratios["bias"] == pytest.approx(0.5)
    np.testing.assert_allclose(w["bias"], [3.0 - 2.0 * 0.5 * 0.6, 4.0 - 2.0 * 0.5 * 0.8])


def test_larc_clips_at_global_lr():
    w = {"w": np.full((2, 2), 100.0)}
    opt = ReferenceOptimizer("larc", lr=0.01, momentum=0.0, trust_coefficient=1.0)
    opt.step(w, {"w": np.full((2, 2), 1e-3)})                          # λ = 1e5 ≫ γ
    assert opt.layer_lrs["w"] == pytest.approx(0.01)
    np.testing.assert_allclose(w["w"], 100.0 - 0.01 * 1e-3)


def test_clars_needs_norm_sums_and_uses_them():
    w = {"w": np.ones((2, 2))}
    opt = ReferenceOptimizer("clars", lr=1.0, momentum=0.0, trust_coefficient=0.1)
    with pytest.raises(ValueError, match="per_example_norm_sums"):
        opt.step(w, {"w": np.ones((2, 2))})
    opt.step(w, {"w": np.ones((2, 2))}, per_example_norm_sums={"w": 16.0}, global_batch_size=4)
    assert opt.layer_lrs["w"] == pytest.approx(0.1 * 2.0 / 4.0)      # η‖w‖ / mean per-example norm


def test_lamb_reference_zero_weights_keep_ratio_one():
    w = {"w": np.zeros((2, 2)), "b": np.zeros(2)}
    opt = ReferenceOptimizer("lamb", lr=0.1, weight_decay=0.01)
    with np.errstate(divide="raise", invalid="raise"):
        opt.step(w, {"w": np.ones((2, 2)), "b": np.ones(2)})
    assert opt.trust_ratios["w"] == 1.0
    np.testing.assert_allclose(w["w"], -0.1 * 1 / (1 + 1e-6), rtol=1e-9)


def test_dtype_is_kept():
    w = {"w": np.ones((3, 3), np.float32)}
    ReferenceOptimizer("lars", lr=0.1).step(w, {"w": np.ones((3, 3), np.float32)})
    assert w["w"].dtype == np.float32


@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=-1.0), "lr: expected a number >= 0, got -1.0"),
    (dict(lr=0.1, momentum=1.0), "momentum: expected a number in [0, 1), got 1.0"),
    (dict(lr=0.1, momentum=-0.1), "momentum: expected a number in [0, 1), got -0.1"),
    (dict(lr=0.1, trust_coefficient=0.0), "trust_coefficient: expected a number > 0, got 0.0"),
    (dict(lr=0.1, trust_coefficient="abc"), "trust_coefficient: expected a number > 0, got 'abc'"),
    (dict(lr=0.1, weight_decay=-1e-4), "weight_decay: expected a number >= 0, got -0.0001"),
    (dict(lr=0.1, trust_denominator="l2"),
     "trust_denominator: expected one of 'sum_of_norms', 'norm_of_sum', got 'l2'"),
    (dict(lr=float("nan")), "lr: expected a number >= 0, got nan"),
])
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError) as err:
        ReferenceOptimizer("lars", **kwargs)
    assert str(err.value) == message


def test_unknown_algorithm():
    with pytest.raises(ValueError, match=r"^algorithm: expected one of 'lars', 'larc', 'lamb', 'clars', got 'adam'$"):
        ReferenceOptimizer("adam", lr=0.1)


def test_policy_rules():
    default = ParamPolicy()                 # every tensor adapted; ndim <= 1 not decayed
    assert default.adapts("conv.weight", (8, 3, 3, 3)) and default.adapts("bn.weight", (8,))
    assert default.decays("conv.weight", (8, 3, 3, 3)) and not default.decays("bn.weight", (8,))
    mlperf = ParamPolicy.from_spec(MLPERF)
    assert not mlperf.adapts("bn.weight", (8,)) and not mlperf.decays("bn.weight", (8,)) and mlperf.adapts("w", (8, 3))
    sep = ParamPolicy(exclude_from_adaptation=r"^fc\.", exclude_from_decay=False)
    assert not sep.adapts("fc.weight", (10, 4)) and sep.adapts("fc2.weight", (10, 4))
    assert sep.decays("bn.bias", (8,))
    custom = ParamPolicy.from_spec(lambda name, shape: shape[0] == 10)
    assert not custom.adapts("x", (10, 4)) and not custom.decays("x", (10, 4)) and custom.adapts("y", (3, 4))
    split = ParamPolicy.from_spec({"decay": r"bias"})              # adaptation keeps its default: all
    assert split.adapts("b", (3,)) and split.decays("bn.weight", (3,)) and not split.decays("fc.bias", (3, 1))
    assert not ParamPolicy.from_spec({"adaptation": None}).adapts("b", (3,))   # a None rule: ndim <= 1
    anyof = ParamPolicy.from_spec([r"embed", None])
    assert not anyof.adapts("embed.weight", (5, 5)) and not anyof.adapts("b", (5,))
    assert ParamPolicy.from_spec(True).adapts("w", (3, 3)) is False


@pytest.mark.parametrize("spec,message", [
    ("(", "exclude_from_adaptation: invalid regular expression '(' (missing ), unterminated subpattern at position 0)"),
    (3, "exclude_from_adaptation: expected None, a bool, a regex string, a callable (name, shape) -> bool "
        "or a list of those, got 3"),
    ({"adapt": None}, "exclude: unknown key 'adapt', expected 'adaptation', 'decay' and/or 'rate'"),
    ({"rate": "gamma"}, "exclude: rate: expected one of 'global', 'trust', got 'gamma'"),
])
def test_policy_bad_input(spec, message):
    with pytest.raises(ValueError) as err:
        ParamPolicy.from_spec(spec)
    assert str(err.value) == message


def test_core_imports_without_torch_or_tensorflow():
    code = ("import sys, largebatch, largebatch.reference, largebatch.schedules, largebatch.policy, "
            "largebatch.trust, largebatch.validation;"
            "bad = [m for m in ('torch', 'tensorflow', 'keras', 'horovod') if m in sys.modules];"
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_reference_reads_the_registry():
    """ALGORITHMS, the eps default, larc's clip and the constraints come from largebatch.registry."""
    from largebatch import registry
    from largebatch.reference import ALGORITHMS
    assert ALGORITHMS == tuple(i.reference for i in registry.OPTIMIZERS.values() if i.reference)
    assert ReferenceOptimizer("lamb", lr=0.1).eps == registry.LAMB_EPS
    assert ReferenceOptimizer("lars", lr=0.1).eps == registry.LARS_EPS
    assert ReferenceOptimizer("larc", lr=0.1).clip and not ReferenceOptimizer("lars", lr=0.1).clip
    with pytest.raises(ValueError) as err:
        ReferenceOptimizer("clars", lr=0.1, trust_denominator="norm_of_sum")
    assert str(err.value) == registry.get("clars").violations(dict(trust_denominator="norm_of_sum",
                                                                   nesterov=False, momentum=0.9))[0]
    with pytest.raises(ValueError, match=r"^nesterov: needs momentum > 0, got momentum=0.0$"):
        ReferenceOptimizer("lars", lr=0.1, momentum=0.0, nesterov=True)
