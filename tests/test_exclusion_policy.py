"""The exclusion policy's default and the warning that remains for the MLPerf convention
(issue "LARS that trains on the first try"), in the core, torch, Keras and the runner's views.

Default: every tensor adapted, ndim <= 1 (biases, normalisation scale/shift) not decayed.
``largebatch.policy.MLPERF``: ndim <= 1 neither adapted nor decayed, stepping at the global rate;
LARS/LARC warn once when that rate is above what plain SGD survives and the model has no
normalisation layer.
"""
import warnings

import numpy as np
import pytest

from largebatch.policy import MLPERF, ExclusionWarning, ParamPolicy, exclusion_warning

torch = pytest.importorskip("torch")
from largebatch.torch import LARS, LAMB, create_optimizer, param_groups  # noqa: E402
from largebatch.torch.groups import normalization_parameters  # noqa: E402


def torch_nets():
    """A BN net, a BN-free net with biases, and a transformer-style block (LayerNorm)."""
    torch.manual_seed(0)
    bn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                             torch.nn.Flatten(), torch.nn.Linear(16, 2))
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16, 2))

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
            self.ln = torch.nn.LayerNorm(8)
            self.ff = torch.nn.Linear(8, 8)

        def forward(self, x):
            x = self.ln(x + self.attn(x, x, x)[0])
            return self.ff(x).flatten(1)

    return {"bn": bn, "plain": plain, "block": Block()}


def decisions(model, exclude=None):
    policy = ParamPolicy.from_spec(exclude)
    return {n: (policy.adapts(n, p.shape), policy.decays(n, p.shape)) for n, p in model.named_parameters()}


EXPECTED_DEFAULT = {   # (adapted, decayed): everything adapted; only matrices and kernels decayed
    "bn": {"0.weight": (True, True), "1.weight": (True, False), "1.bias": (True, False),
           "4.weight": (True, True), "4.bias": (True, False)},
    "plain": {"0.weight": (True, True), "0.bias": (True, False), "3.weight": (True, True), "3.bias": (True, False)},
    "block": {"attn.in_proj_weight": (True, True), "attn.in_proj_bias": (True, False),
              "attn.out_proj.weight": (True, True), "attn.out_proj.bias": (True, False),
              "ln.weight": (True, False), "ln.bias": (True, False), "ff.weight": (True, True), "ff.bias": (True, False)},
}


@pytest.mark.parametrize("net", EXPECTED_DEFAULT)
def test_torch_default_adapts_everything_and_decays_only_matrices(net):
    model = torch_nets()[net]
    assert decisions(model) == EXPECTED_DEFAULT[net]
    opt = LARS(param_groups(model), lr=1.0, weight_decay=1e-3)                  # what the optimizer resolves
    flags = opt._flags(0, opt.param_groups[0])
    assert dict(zip(opt.param_groups[0]["param_names"], flags)) == EXPECTED_DEFAULT[net]
    # the MLPerf convention: ndim <= 1 neither adapted nor decayed
    assert decisions(model, MLPERF) == {n: (a and d, d) for n, (a, d) in EXPECTED_DEFAULT[net].items()}


def test_normalization_layers_are_found_from_module_types():
    nets = torch_nets()
    assert normalization_parameters(nets["bn"]) == {"1.weight", "1.bias"}
    assert normalization_parameters(nets["plain"]) == set()
    assert normalization_parameters(nets["block"]) == {"ln.weight", "ln.bias"}
    assert [param_groups(nets[n])[0]["normalization_layers"] for n in ("bn", "plain", "block")] == [True, False, True]


@pytest.mark.parametrize("net,exclude,lr,clip,warns", [
    ("plain", None, 40.0, False, False),                  # the default excludes nothing
    ("plain", MLPERF, 40.0, False, True),                 # biases at γ = 40, no normalisation layer
    ("plain", MLPERF, 0.9, False, False),                 # γ below what plain SGD survives
    ("plain", dict(MLPERF, rate="trust"), 40.0, False, False),      # γ·η = 0.04
    ("plain", MLPERF, 2.0, True, True),                   # LARC: excluded at γ too
    ("plain", dict(MLPERF, rate="trust"), 40.0, True, False),       # LARC, trust rate: min(η, γ)
    ("bn", MLPERF, 40.0, False, False),                   # BatchNorm present: the convention works
    ("block", MLPERF, 40.0, False, False),                # LayerNorm present
])
def test_torch_warning_appears_exactly_when_it_should(net, exclude, lr, clip, warns):
    model = torch_nets()[net]
    opt = LARS(param_groups(model, exclude=exclude), lr=lr, clip=clip)
    x = torch.randn(2, 3, 4, 4) if net != "block" else torch.randn(2, 3, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            model(x).sum().backward()
            opt.step()
    lines = [str(w.message) for w in caught if issubclass(w.category, ExclusionWarning)]
    if not warns:
        assert lines == []
        return
    assert len(lines) == 1                               # once, not per step
    assert lines[0].startswith(f"{'LARC' if clip else 'LARS'}: 2 tensor(s) excluded from adaptation (0.bias, 3.bias) "
                               f"step at the global rate {lr:g}, where plain SGD diverges")
    assert "exclude={..., 'rate': 'trust'}" in lines[0] and "\n" not in lines[0]


def test_torch_warning_waits_for_the_warm_up_to_reach_the_rate():
    model = torch_nets()["plain"]
    opt = LARS(param_groups(model, exclude=MLPERF), lr=0.1)
    x = torch.randn(2, 3, 4, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for lr in (0.1, 0.5, 2.0, 4.0, 8.0):                  # a warm-up
            opt.param_groups[0]["lr"] = lr
            model(x).sum().backward()
            opt.step()
            count = sum(issubclass(w.category, ExclusionWarning) for w in caught)
            assert count == (1 if lr > 1.0 else 0), lr
    assert "rate 2," in str(caught[-1].message)


def test_plain_parameters_warn_as_unknown_and_lamb_never():
    model = torch_nets()["bn"]
    with pytest.warns(ExclusionWarning, match=r"no normalisation layer was seen"):
        opt = LARS(model.parameters(), lr=40.0, exclude=MLPERF)           # no model: its layers are unknown
        model(torch.randn(2, 3, 4, 4)).sum().backward()
        opt.step()
    lamb = LAMB(param_groups(torch_nets()["plain"], exclude=MLPERF), lr=40.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExclusionWarning)
        for p in lamb.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        lamb.step()


def test_create_optimizer_from_a_model_knows_its_normalisation_layers():
    opt = create_optimizer("lars", torch_nets()["bn"], lr=40.0, exclude=MLPERF)
    assert opt.param_groups[0]["normalization_layers"] is True


def test_core_warning_wording():
    line = exclusion_warning([f"l{i}.bias" for i in range(5)], 20.0, trust_coefficient=1e-3, normalized=False)
    assert line == ("LARS: 5 tensor(s) excluded from adaptation (l0.bias, l1.bias, l2.bias and 2 more) step at the "
                    "global rate 20, where plain SGD diverges without normalisation layers (the model has no "
                    "normalisation layer); exclude=False (or the default) adapts them, exclude={..., 'rate': "
                    "'trust'} steps them at lr·trust_coefficient (YAML: optimizer.exclude)")
    assert exclusion_warning([], 20.0, trust_coefficient=1e-3) is None
    assert exclusion_warning(["b"], 20.0, trust_coefficient=1e-3, normalized=True) is None


# ---- Keras -------------------------------------------------------------------------------

def keras_nets():
    keras = pytest.importorskip("keras")
    inputs = keras.Input((4, 4, 3))
    x = keras.layers.Conv2D(4, 3, use_bias=False, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    bn = keras.Model(inputs, keras.layers.Dense(2, name="fc")(keras.layers.Flatten()(x)), name="bnnet")
    inputs = keras.Input((4, 4, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    plain = keras.Model(inputs, keras.layers.Dense(2, name="fc")(keras.layers.Flatten()(x)), name="plain")
    inputs = keras.Input((3, 8))
    x = keras.layers.MultiHeadAttention(2, 4, name="attn")(inputs, inputs)
    x = keras.layers.LayerNormalization(name="ln")(x + inputs)
    block = keras.Model(inputs, keras.layers.Dense(8, name="ff")(x), name="block")
    return {"bn": bn, "plain": plain, "block": block}


def test_keras_default_adapts_everything_and_decays_only_matrices():
    lbk = pytest.importorskip("largebatch.keras")
    for name, model in keras_nets().items():
        opt = lbk.LARS(learning_rate=1.0, weight_decay=1e-3)
        opt.build(model.trainable_variables)
        shapes = [tuple(v.shape) for v in model.trainable_variables]
        assert all(opt._lb_adapt), name
        assert list(opt._lb_decay) == [len(s) > 1 for s in shapes], name
        mlperf = lbk.LARS(learning_rate=1.0, weight_decay=1e-3, exclude=MLPERF)
        mlperf.build(model.trainable_variables)
        assert list(mlperf._lb_adapt) == [len(s) > 1 for s in shapes], name


@pytest.mark.parametrize("net,exclude,lr,warns", [
    ("plain", None, 40.0, False), ("plain", MLPERF, 40.0, True), ("plain", MLPERF, 0.5, False),
    ("plain", dict(MLPERF, rate="trust"), 40.0, False), ("bn", MLPERF, 40.0, False), ("block", MLPERF, 40.0, False),
])
def test_keras_warning_appears_exactly_when_it_should(net, exclude, lr, warns):
    lbk = pytest.importorskip("largebatch.keras")
    model = keras_nets()[net]
    opt = lbk.LARS(learning_rate=lr, exclude=exclude)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.build(model.trainable_variables)
    lines = [str(w.message) for w in caught if issubclass(w.category, ExclusionWarning)]
    assert len(lines) == (1 if warns else 0)
    if warns:
        assert lines[0].startswith("LARS: 2 tensor(s) excluded from adaptation (conv/bias, fc/bias) step at the "
                                   "global rate 40")


def test_the_reference_follows_the_default():
    from largebatch import ReferenceOptimizer
    ref = ReferenceOptimizer("lars", lr=1.0, momentum=0.0, weight_decay=0.1, trust_coefficient=0.1)
    w = {"fc.bias": np.array([3.0, 4.0]), "fc.weight": np.array([[3.0, 4.0]])}
    ref.step(w, {"fc.bias": np.array([0.6, 0.8]), "fc.weight": np.array([[0.6, 0.8]])})
    assert ref.trust_ratios["fc.bias"] == pytest.approx(0.1 * 5 / 1.0)              # adapted, not decayed
    assert ref.trust_ratios["fc.weight"] == pytest.approx(0.1 * 5 / (1.0 + 0.1 * 5))  # adapted and decayed


def test_the_runner_says_it_once_at_start_for_the_peak_lr(tmp_path, capsys):
    """largebatch run's start: rank 0 prints the line for the peak lr (the optimizer is built at the
    warm-up's first lr, below it), and every rank silences the optimizer's own per-rank warning."""
    from largebatch.config import load
    from largebatch.runner.params import announce_exclusion
    from largebatch.runner.torch_train import build_model
    (tmp_path / "exp.yaml").write_text("framework: torch\noptimizer: lars\nbatch: {per_worker: 16}\n"
                                       "model: {batch_norm: false}\nschedule: {base_lr: 320}\n")
    risky = load(str(tmp_path / "exp.yaml"), ["optimizer.exclude={adaptation: null, decay: null}"])
    with warnings.catch_warnings():
        for exp, rank, said in ((risky, 0, True), (risky, 1, False),
                                (load(str(tmp_path / "exp.yaml")), 0, False)):       # the default: nothing to say
            announce_exclusion(exp, build_model(exp.cfg, exp.derived), rank)
            out = capsys.readouterr().out
            assert out.startswith("largebatch: warning: LARS: 3 tensor(s) excluded from adaptation") == said, out
            assert out.count("\n") == (1 if said else 0)
        assert any(f[2] is ExclusionWarning and f[0] == "ignore" for f in warnings.filters)
