"""largebatch.torch.create_optimizer: the registry's optimizers by name, as the runner builds them."""
import pytest
import torch

from largebatch import registry
from largebatch.torch import CLARS, LAMB, LARS, create_optimizer


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.Linear(4, 2))


@pytest.mark.parametrize("name,cls,fixed", [("lars", LARS, {"clip": False}), ("larc", LARS, {"clip": True}),
                                            ("lamb", LAMB, {}), ("clars", CLARS, {"clip": False}),
                                            ("sgd", torch.optim.SGD, {})])
def test_every_registry_name_gives_its_class_with_the_fixed_options(name, cls, fixed):
    assert set(registry.for_framework("torch")) == {"sgd", "lars", "larc", "lamb", "clars"}
    opt = create_optimizer(name, model(), lr=0.5, weight_decay=1e-3)
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == 0.5 and all(group[k] == v for k, v in fixed.items())
    if cls is not torch.optim.SGD:       # named: name regexes work
        assert group["param_names"] == [n for n, _ in model().named_parameters()]


def test_hyper_parameters_reach_the_groups():
    opt = create_optimizer("lars", model(), lr=2.0, momentum=0.8, weight_decay=5e-4, trust_coefficient=0.02,
                           nesterov=True, exclude=r"^1\.", track_trust_ratios=True, foreach=False)
    g = opt.param_groups[0]
    assert (g["momentum"], g["weight_decay"], g["trust_coefficient"], g["nesterov"], g["exclude"],
            g["track_trust_ratios"], g["foreach"]) == (0.8, 5e-4, 0.02, True, r"^1\.", True, False)
    lamb = create_optimizer("lamb", model().parameters(), lr=1e-3, betas=[0.8, 0.99])
    assert lamb.param_groups[0]["betas"] == (0.8, 0.99) and "param_names" not in lamb.param_groups[0]


def test_sgd_decays_only_what_the_policy_decays():
    m = model()
    opt = create_optimizer("sgd", m, lr=0.1, momentum=0.9, weight_decay=1e-4)
    decayed, undecayed = opt.param_groups
    assert decayed["weight_decay"] == 1e-4 and undecayed["weight_decay"] == 0.0
    assert [p.ndim for p in decayed["params"]] == [4, 2] and all(p.ndim == 1 for p in undecayed["params"])
    everything = create_optimizer("sgd", m.parameters(), lr=0.1, weight_decay=1e-4, exclude=False)
    assert len(everything.param_groups) == 1 and everything.param_groups[0]["weight_decay"] == 1e-4


@pytest.mark.parametrize("name,kwargs,message", [
    ("lars", dict(betas=(0.9, 0.99)), r"^betas: not an argument of 'lars' in torch; expected one of lr, momentum, "),
    ("larc", dict(clip=False), r"^clip: not an argument of 'larc' in torch; "),
    ("sgd", dict(fused=True), r"^fused: not an argument of 'sgd' in torch; "),
    ("adam", {}, r"^optimizer: expected one of 'sgd', 'lars', 'larc', 'lamb', 'clars', got 'adam'$"),
])
def test_what_an_optimizer_does_not_take_is_refused_in_one_line(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_optimizer(name, model(), lr=0.1, **kwargs)


def test_sgd_refuses_an_exclude_it_cannot_apply_to_param_groups():
    with pytest.raises(ValueError, match=r"^exclude: 'sgd' applies it to a model or to parameters"):
        create_optimizer("sgd", [dict(params=list(model().parameters()))], lr=0.1, exclude=False)


# ---- Keras ---------------------------------------------------------------------------------

def test_keras_every_registry_name_gives_its_class_with_the_fixed_options():
    keras = pytest.importorskip("keras")
    import largebatch.keras as lbk
    assert set(registry.for_framework("keras")) == {"sgd", "lars", "larc", "lamb", "clars"}
    want = {"sgd": keras.optimizers.SGD, "lars": lbk.LARS, "larc": lbk.LARS, "lamb": lbk.LAMB, "clars": lbk.CLARS}
    for name, cls in want.items():
        opt = lbk.create_optimizer(name, learning_rate=0.5, weight_decay=1e-3)
        assert type(opt) is cls, name
        assert float(opt.learning_rate) == 0.5
    assert lbk.create_optimizer("larc", learning_rate=0.5).clip is True
    assert lbk.create_optimizer("sgd", learning_rate=0.5, weight_decay=0.0).weight_decay is None


def test_keras_hyper_parameters_reach_the_optimizer():
    pytest.importorskip("keras")
    import largebatch.keras as lbk
    from largebatch.policy import MLPERF
    lars = lbk.create_optimizer("lars", learning_rate=2.0, momentum=0.8, weight_decay=5e-4, trust_coefficient=0.02,
                                nesterov=True, exclude=MLPERF, fused=False, clipnorm=1.0)
    assert (lars.momentum, lars.weight_decay, lars.trust_coefficient, lars.nesterov, lars.exclude, lars.fused,
            lars.clipnorm) == (0.8, 5e-4, 0.02, True, MLPERF, False, 1.0)
    lamb = lbk.create_optimizer("lamb", learning_rate=1e-3, betas=[0.8, 0.99], eps=1e-8)
    assert (lamb.beta_1, lamb.beta_2, lamb.eps) == (0.8, 0.99, 1e-8)
    assert lbk.create_optimizer("lamb", learning_rate=1e-3, beta_1=0.7).beta_1 == 0.7


@pytest.mark.parametrize("name,kwargs,message", [
    ("lars", dict(lr=0.1), r"^lr: not an argument of 'lars' in Keras; expected one of learning_rate, momentum, "),
    ("larc", dict(clip=False), r"^clip: not an argument of 'larc' in Keras; "),
    ("sgd", dict(exclude=False), r"^exclude: Keras's SGD takes its weight-decay exclusions from "),
])
def test_keras_what_an_optimizer_does_not_take_is_refused_in_one_line(name, kwargs, message):
    pytest.importorskip("keras")
    import largebatch.keras as lbk
    with pytest.raises(ValueError, match=message):
        lbk.create_optimizer(name, **kwargs)
