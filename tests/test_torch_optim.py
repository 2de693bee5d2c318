"""largebatch.torch optimizers against the core's NumPy reference, step by step."""
import copy

import numpy as np
import pytest
import torch

from largebatch import ReferenceOptimizer
from largebatch.torch import CLARS, LAMB, LARS, param_groups, per_example_norm_sums

STEPS = 20
# name -> shape: conv/fc weights (adapted), bias and BN (excluded by default), a zero-initialised
# weight (‖w‖ = 0 at first), a weight whose gradient is always zero (‖g‖ = 0), and a 0-d
# parameter (a learnable temperature; torch.compile once dropped its state updates)
SHAPES = {"conv.weight": (4, 3, 3, 3), "conv.bias": (4,), "bn.weight": (4,), "fc.weight": (5, 4),
          "fc.bias": (5,), "zero_init.weight": (3, 3), "no_grad.weight": (2, 3), "temperature": ()}


def make_problem(dtype, seed=0):
    rng = np.random.default_rng(seed)
    init = {n: rng.normal(size=s) for n, s in SHAPES.items()}
    init["zero_init.weight"][:] = 0.0
    grads = []
    for _ in range(STEPS):
        step = {n: rng.normal(scale=rng.uniform(0.01, 3.0), size=s) for n, s in SHAPES.items()}
        step["no_grad.weight"][:] = 0.0
        grads.append(step)
    lrs = [0.5 * (1 + 0.1 * np.sin(t)) for t in range(STEPS)]       # the lr changes every step
    np_dtype = {torch.float32: np.float32, torch.float64: np.float64}[dtype]
    init = {n: v.astype(np_dtype) for n, v in init.items()}
    grads = [{n: v.astype(np_dtype) for n, v in g.items()} for g in grads]
    return init, grads, lrs


def assert_close(got, want, rtol):
    for name in want:
        w = want[name]
        scale = max(float(np.abs(w).max()), 1e-30)
        np.testing.assert_allclose(got[name], w, rtol=rtol, atol=rtol * scale, err_msg=name)


def assert_state_moved(opt, params):
    """Every parameter that had a non-zero gradient has non-zero optimizer state."""
    for name, p in params.items():
        if name == "no_grad.weight":
            continue
        for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            if key in opt.state[p]:
                assert bool(opt.state[p][key].abs().sum() > 0), f"{name}: {key} is still zero"


def run_pair(algorithm, torch_cls, torch_kwargs, ref_kwargs, dtype, norm_sums=None):
    init, grads, lrs = make_problem(dtype)
    ref_w = {n: v.copy() for n, v in init.items()}
    ref = ReferenceOptimizer(algorithm, lr=lrs[0], **ref_kwargs)
    params = {n: torch.tensor(v, dtype=dtype, requires_grad=True) for n, v in init.items()}
    opt = torch_cls([{"params": list(params.values()), "param_names": list(params)}], lr=lrs[0], **torch_kwargs)
    for t in range(STEPS):
        for n, p in params.items():
            p.grad = torch.tensor(grads[t][n], dtype=dtype)
        for group in opt.param_groups:
            group["lr"] = lrs[t]
        extra = {}
        if norm_sums is not None:
            sums = {n: norm_sums(grads[t][n]) for n in params}
            opt.set_per_example_norms({params[n]: torch.tensor(s, dtype=torch.float64) for n, s in sums.items()}, 8)
            extra = dict(per_example_norm_sums=sums, global_batch_size=8)
        opt.step()
        ref.step(ref_w, grads[t], lr=lrs[t], **extra)
    assert_state_moved(opt, params)
    return {n: p.detach().numpy() for n, p in params.items()}, ref_w, opt, ref


LARS_OPTIONS = [
    dict(),
    dict(weight_decay=1e-3),
    dict(weight_decay=5e-2, trust_denominator="norm_of_sum"),
    dict(weight_decay=1e-3, clip=True),
    dict(weight_decay=1e-3, clip=True, trust_coefficient=0.02),
    dict(weight_decay=1e-3, nesterov=True),
    dict(weight_decay=1e-3, eps=1e-3),
    dict(weight_decay=1e-3, exclude=False),                           # adapt and decay everything
    dict(weight_decay=1e-3, exclude=r"^fc\."),                        # name regex
    dict(weight_decay=1e-3, exclude={"adaptation": r"conv", "decay": False}),
    dict(weight_decay=1e-3, momentum=0.0),
]


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-6)], ids=["f64", "f32"])
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("options", LARS_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_lars_matches_reference(options, foreach, dtype, rtol):
    options = {"trust_coefficient": 0.01, "momentum": 0.9, **options}
    got, want, opt, ref = run_pair("lars", LARS, dict(options, foreach=foreach), options, dtype)
    assert_close(got, want, rtol)
    assert all(np.isfinite(v).all() for v in got.values())


@pytest.mark.parametrize("foreach", [True, False])
def test_larc_reference_alias(foreach):
    got, want, _, _ = run_pair("larc", LARS, dict(clip=True, weight_decay=1e-3, foreach=foreach),
                               dict(weight_decay=1e-3), torch.float64)
    assert_close(got, want, 1e-10)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-6)], ids=["f64", "f32"])
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("options", [dict(), dict(weight_decay=1e-2), dict(weight_decay=1e-2, exclude=False),
                                     dict(weight_decay=1e-2, exclude={"adaptation": r"conv", "decay": False}),
                                     dict(betas=(0.8, 0.99), eps=1e-4)], ids=str)
def test_lamb_matches_reference(options, foreach, dtype, rtol):
    got, want, opt, _ = run_pair("lamb", LAMB, dict(options, foreach=foreach), options, dtype)
    assert_close(got, want, rtol)
    assert all(np.isfinite(v).all() for v in got.values())


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-6)], ids=["f64", "f32"])
@pytest.mark.parametrize("options", [dict(weight_decay=1e-3), dict(weight_decay=1e-3, clip=True, nesterov=True)],
                         ids=str)
def test_clars_matches_reference(options, dtype, rtol):
    options = dict(trust_coefficient=0.01, **options)
    # a made-up per-example norm sum >= 8·‖g‖ (triangle inequality holds for real ones)
    norm_sums = lambda g: float(np.linalg.norm(g)) * 8 * 1.7   # noqa: E731
    got, want, _, _ = run_pair("clars", CLARS, options, options, dtype, norm_sums=norm_sums)
    assert_close(got, want, rtol)


def test_trust_ratio_telemetry_matches_reference():
    got, want, opt, ref = run_pair("lars", LARS, dict(trust_coefficient=0.01, track_trust_ratios=True),
                                   dict(trust_coefficient=0.01), torch.float64)
    ratios = opt.trust_ratios()
    assert set(ratios) == set(SHAPES)
    for name, value in ratios.items():
        assert float(value) == pytest.approx(ref.trust_ratios[name], rel=1e-10), name
    # the default adapts biases too; zero_init grew from ‖w‖ = 0
    assert float(ratios["conv.bias"]) != 1.0 and float(ratios["zero_init.weight"]) != 1.0


def _round_trip(cls, kwargs, edit_saved=lambda saved: None):
    """10 steps straight, and 5 steps, a state_dict saved (and passed to ``edit_saved``), loaded into
    a default-constructed optimizer, 5 more: (straight model, resumed model, its optimizer, saved)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    data = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(10)]

    def train(model, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    straight = copy.deepcopy(model)
    train(straight, cls(straight.parameters(), **kwargs), data)
    first = copy.deepcopy(model)
    opt_first = cls(first.parameters(), **kwargs)
    train(first, opt_first, data[:5])
    saved = copy.deepcopy((first.state_dict(), opt_first.state_dict()))
    edit_saved(saved[1])
    resumed = copy.deepcopy(model)
    resumed.load_state_dict(saved[0])
    opt_resumed = cls(resumed.parameters())                        # defaults differ: the state dict rules
    opt_resumed.load_state_dict(saved[1])
    loaded = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt_resumed.state[p].items()}
              for p in resumed.parameters()}                        # the state as loaded, before training on
    groups = copy.deepcopy(opt_resumed.param_groups)
    train(resumed, opt_resumed, data[5:])
    return straight, resumed, opt_resumed, saved[1], loaded, groups


def test_state_dict_round_trip_continues_identically():
    straight, resumed, _, _, _, groups = _round_trip(LARS, dict(lr=0.5, weight_decay=1e-3, trust_coefficient=0.02))
    assert groups[0]["lr"] == 0.5 and groups[0]["trust_coefficient"] == 0.02
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_closure_is_called_and_its_loss_returned():
    w = torch.nn.Parameter(torch.ones(3, 3))
    opt = LARS([w], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 9.0             # the closure's loss, returned as is
    assert w.detach().sum().item() < 9.0


def test_step_never_synchronises_with_the_host(monkeypatch):
    """No .item(), float() or Python branch on a tensor inside step()."""
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4)),
              torch.nn.Parameter(torch.zeros(2, 2))]
    opts = [LARS(params, lr=0.1, weight_decay=1e-3, foreach=True, track_trust_ratios=True),
            LARS(params, lr=0.1, weight_decay=1e-3, foreach=False, clip=True, trust_denominator="norm_of_sum"),
            LAMB(params, lr=0.1, weight_decay=1e-3)]
    for p in params:
        p.grad = torch.randn_like(p)

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation inside step()")

    for method in ("item", "__bool__", "__float__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, method, forbidden)
    for opt in opts:
        opt.step()
        opt.step()


def test_zero_gradient_first_step_gives_no_nan():
    """Horovod's broadcast_optimizer_state steps once on all-zero gradients."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 2))
    torch.nn.init.zeros_(model[3].weight)
    for opt in (LARS(model.parameters(), lr=5.0, weight_decay=1e-4), LARS(model.parameters(), clip=True),
                LAMB(model.parameters(), weight_decay=1e-2), CLARS(model.parameters(), lr=5.0)):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_clars_without_norms_raises_after_first_step():
    w = torch.nn.Parameter(torch.ones(3, 3))
    opt = CLARS([w], lr=0.1)
    w.grad = torch.zeros(3, 3)
    opt.step()                                  # fresh state: the broadcast initialisation step
    w.grad = torch.ones(3, 3)
    with pytest.raises(RuntimeError, match="no per-example gradient norms for this step"):
        opt.step()


def test_per_example_norm_sums_match_brute_force():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3))
    x, y = torch.randn(6, 3, 6, 6), torch.randint(0, 3, (6,))
    loss_fn = torch.nn.functional.cross_entropy
    running_before = model[1].running_mean.clone()
    sums, batch = per_example_norm_sums(model, loss_fn, x, y, chunk_size=4)
    assert batch == 6
    torch.testing.assert_close(model[1].running_mean, running_before)      # BN stats untouched
    brute = {p: torch.zeros((), dtype=torch.float64) for p in model.parameters()}
    for i in range(6):
        model.zero_grad()
        saved = model[1].track_running_stats
        model[1].track_running_stats = False                                # same per-example BN semantics
        loss_fn(model(x[i:i + 1]), y[i:i + 1]).backward()
        model[1].track_running_stats = saved
        for p in model.parameters():
            brute[p] += p.grad.double().norm()
    for p in model.parameters():
        torch.testing.assert_close(sums[p].double(), brute[p], rtol=1e-5, atol=1e-7)


def _brute_force_norm_sums(model, loss_fn, x, y):
    sums = {p: torch.zeros((), dtype=torch.float64) for p in model.parameters()}
    for i in range(len(x)):
        model.zero_grad()
        loss_fn(model(x[i:i + 1]), y[i:i + 1]).backward()
        for p in model.parameters():
            sums[p] += p.grad.double().norm()
    return sums


class _Tokens(torch.nn.Module):
    """Linear on (B, T, features) inputs, then a mean over T."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(5, 4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.proj(x)).mean(1))


@pytest.mark.parametrize("case", ["conv", "tokens"])
def test_per_example_norm_sums_by_hooks_match_brute_force(case):
    torch.manual_seed(0)
    if case == "conv":     # stride, padding, dilation, a bias-free conv, Linear on 2-D inputs
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(4, 5, 3, padding=2, dilation=2, bias=False), torch.nn.ReLU(),
            torch.nn.Flatten(), torch.nn.Linear(5 * 4 * 4, 3))
        x = torch.randn(6, 3, 8, 8)
    else:
        model = _Tokens()
        x = torch.randn(6, 7, 5)
    y = torch.randint(0, 3, (6,))
    loss_fn = torch.nn.functional.cross_entropy
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    sums, batch = per_example_norm_sums(model, loss_fn, x, y, method="hooks")
    assert batch == 6 and all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    vmapped, _ = per_example_norm_sums(model, loss_fn, x, y, method="vmap")
    brute = _brute_force_norm_sums(model, loss_fn, x, y)
    for p in model.parameters():
        torch.testing.assert_close(sums[p].double(), brute[p], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(sums[p], vmapped[p], rtol=1e-5, atol=1e-7)


def test_per_example_norm_sums_hooks_refuse_what_they_cannot_do():
    bn = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    loss_fn = torch.nn.functional.cross_entropy
    with pytest.raises(ValueError, match=r"^method='hooks': BatchNorm '1' in training mode couples the examples; "
                                         r"use method='vmap'$"):
        per_example_norm_sums(bn, loss_fn, x, y, method="hooks")
    shared = torch.nn.Linear(3, 3)
    twice = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)
    with pytest.raises(ValueError, match="called more than once"):
        per_example_norm_sums(twice, loss_fn, x, y, method="hooks")
    auto, _ = per_example_norm_sums(twice, loss_fn, x, y)                  # auto falls back to vmap
    brute = _brute_force_norm_sums(twice, loss_fn, x, y)
    torch.testing.assert_close(auto[shared.weight].double(), brute[shared.weight], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"^method: expected 'auto', 'hooks' or 'vmap', got 'fast'$"):
        per_example_norm_sums(twice, loss_fn, x, y, method="fast")


def test_param_groups_helper_and_regex_needs_names():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    groups = param_groups(model, exclude=r"^2\.", weight_decay=1e-3)
    assert groups[0]["param_names"] == [n for n, _ in model.named_parameters()]
    LARS(groups, lr=0.1)
    with pytest.raises(ValueError, match=r"^exclude: a name regex needs parameter names; pass "):
        LARS(model.parameters(), exclude=r"bias")
    LARS(model.named_parameters(), exclude=r"bias")            # torch's named-parameter form works too


@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=-0.1), "lr: expected a number >= 0, got -0.1"),
    (dict(momentum=1.0), "momentum: expected a number in [0, 1), got 1.0"),
    (dict(trust_coefficient=-1.0), "trust_coefficient: expected a number > 0, got -1.0"),
    (dict(trust_denominator="max"), "trust_denominator: expected one of 'sum_of_norms', 'norm_of_sum', got 'max'"),
    (dict(nesterov=True, momentum=0.0), "nesterov: needs momentum > 0, got momentum=0.0"),
    (dict(foreach=True, fused=True), "fused: expected fused=True or foreach=True, not both"),
    (dict(exclude=42), "exclude_from_adaptation: expected None, a bool, a regex string, a callable "
                       "(name, shape) -> bool or a list of those, got 42"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError) as err:
        LARS([torch.nn.Parameter(torch.ones(2, 2))], **kwargs)
    assert str(err.value) == message


@pytest.mark.slow
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-6)], ids=["f64", "f32"])
@pytest.mark.parametrize("algorithm,cls,options", [
    ("lars", LARS, dict(trust_coefficient=0.01, weight_decay=1e-3, nesterov=True)),
    ("larc", LARS, dict(trust_coefficient=0.01, weight_decay=1e-3, clip=True, exclude=False)),
    ("lamb", LAMB, dict(weight_decay=1e-2)),
    ("lamb", LAMB, dict(weight_decay=1e-2, exclude=False)),
], ids=["lars", "larc-adapt-all", "lamb", "lamb-adapt-all"])
def test_fused_compiled_path_matches_reference(algorithm, cls, options, dtype, rtol):
    """fused=True runs the single-tensor kernel through torch.compile (inductor); same numbers,
    0-d parameters included (their state once stayed zero under compile in float64)."""
    ref_options = {k: v for k, v in options.items() if not (algorithm == "larc" and k == "clip")}
    got, want, _, _ = run_pair(algorithm, cls, dict(options, fused=True), ref_options, dtype)
    assert_close(got, want, rtol)


@pytest.mark.parametrize("impl", [dict(foreach=True), dict(foreach=False), dict(fused=True)], ids=str)
def test_clars_every_implementation_matches_reference(impl):
    """CLARS takes the per-tensor kernel whatever the flags say; pinned for each flag."""
    options = dict(trust_coefficient=0.01, weight_decay=1e-3, exclude=False)
    norm_sums = lambda g: float(np.linalg.norm(g)) * 8 * 1.3   # noqa: E731
    got, want, _, _ = run_pair("clars", CLARS, dict(options, **impl), options, torch.float64, norm_sums=norm_sums)
    assert_close(got, want, 1e-10)


FOREACH_AND_FUSED = [
    pytest.param(dict(foreach=True), id="foreach"),
    pytest.param(dict(fused=True), id="fused", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("impl", FOREACH_AND_FUSED)
@pytest.mark.parametrize("cls,kwargs", [(LARS, dict(weight_decay=1e-3, trust_coefficient=0.01)),
                                        (LAMB, dict(weight_decay=1e-2))], ids=["lars", "lamb"])
def test_step_makes_no_torch_tensor_after_the_first_step(monkeypatch, cls, kwargs, impl):
    """torch.tensor(list_or_number, device=cuda) is a blocking host-to-device copy: only the first
    step (which creates the cached per-group tensors) may call it. The CPU-visible proxy for
    tests/test_gpu.py's set_sync_debug_mode check."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4)),
              torch.nn.Parameter(torch.randn(())), torch.nn.Parameter(torch.randn(2, 2))]
    opt = cls(params, lr=0.1, track_trust_ratios=True, **kwargs, **impl)
    grads = [[torch.randn_like(p) for p in params] for _ in range(3)]

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.tensor(...) inside step(): a host-to-device copy on CUDA")

    for t in range(3):
        for p, g in zip(params, grads[t]):
            p.grad = g
        opt.param_groups[0]["lr"] = 0.1 * (t + 1)           # a schedule: the cached lr is refilled
        with monkeypatch.context() as m:
            if t > 0:
                m.setattr(torch, "tensor", forbidden)
            opt.step()
    assert all(torch.isfinite(p).all() for p in params)


def test_caches_follow_the_parameters_with_gradients_and_the_weight_decay():
    """A parameter that gets its first gradient late, one that loses it, a weight decay changed
    between steps: the foreach path (cached per-group tensors) stays equal to the uncached loop."""
    torch.manual_seed(0)
    init = [torch.randn(4, 3), torch.randn(4), torch.randn(3, 3)]
    runs = []
    for foreach in (True, False):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = LARS(params, lr=0.5, weight_decay=1e-3, trust_coefficient=0.02, foreach=foreach)
        gen = torch.Generator().manual_seed(1)
        for t in range(6):
            for i, p in enumerate(params):
                has_grad = not (i == 2 and t < 2) and not (i == 0 and t == 4)
                p.grad = torch.randn(p.shape, generator=gen) if has_grad else None
            opt.param_groups[0]["weight_decay"] = 1e-3 if t < 3 else 5e-2
            opt.step()
        runs.append(params)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", FOREACH_AND_FUSED)
@pytest.mark.parametrize("algorithm,cls,options", [
    ("lars", LARS, dict(trust_coefficient=0.01, weight_decay=1e-3)),
    ("lamb", LAMB, dict(weight_decay=1e-2)),
], ids=["lars", "lamb"])
def test_one_group_mixing_float32_and_float64(algorithm, cls, options, impl):
    """One group, float64 and float32 parameters interleaved: the kernels run once per dtype and
    each parameter matches the reference in its own dtype (the reference keeps each array's dtype)."""
    init, grads, lrs = make_problem(torch.float64)
    f32 = set(list(SHAPES)[1::2])
    dtypes = {n: torch.float32 if n in f32 else torch.float64 for n in SHAPES}
    np_dtypes = {torch.float32: np.float32, torch.float64: np.float64}
    init = {n: v.astype(np_dtypes[dtypes[n]]) for n, v in init.items()}
    grads = [{n: v.astype(np_dtypes[dtypes[n]]) for n, v in g.items()} for g in grads]
    ref_w = {n: v.copy() for n, v in init.items()}
    ref = ReferenceOptimizer(algorithm, lr=lrs[0], **options)
    params = {n: torch.tensor(v, requires_grad=True) for n, v in init.items()}
    assert {p.dtype for p in params.values()} == {torch.float32, torch.float64}
    opt = cls([{"params": list(params.values()), "param_names": list(params)}], lr=lrs[0], **options, **impl)
    for t in range(STEPS):
        for n, p in params.items():
            p.grad = torch.tensor(grads[t][n])
        opt.param_groups[0]["lr"] = lrs[t]
        opt.step()
        ref.step(ref_w, grads[t], lr=lrs[t])
    assert_state_moved(opt, params)
    for n, p in params.items():
        assert p.dtype == dtypes[n]
        for key, value in opt.state[p].items():
            assert value.dtype == (torch.float64 if key == "step" else p.dtype), (n, key)
        rtol = 1e-6 if n in f32 else 1e-10
        assert_close({n: p.detach().numpy()}, {n: ref_w[n]}, rtol)


@pytest.mark.parametrize("saved_group", [dict(), dict(capturable=True)], ids=["plain", "capturable"])
def test_lamb_state_dict_round_trip_continues_identically(saved_group):
    """LAMB's step counters come back as 0-d float64 tensors on the parameters' device with the saved
    value (torch's load_state_dict keeps 'step' as saved, or casts it to float32 for a group marked
    capturable or fused), and training continues bit for bit."""
    def mark_groups(saved):
        for group in saved["param_groups"]:
            group.update(saved_group)

    straight, resumed, opt_resumed, saved, loaded, groups = _round_trip(
        LAMB, dict(lr=0.01, weight_decay=1e-2), mark_groups)
    assert groups[0]["lr"] == 0.01 and groups[0]["weight_decay"] == 1e-2
    for p in resumed.parameters():
        step = loaded[p]["step"]
        assert step.dtype == torch.float64 and step.dim() == 0 and step.device == p.device
        assert float(step) == 5.0
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(float(s["step"]) == 5.0 for s in saved["state"].values())    # the saved dict untouched
    assert all(float(opt_resumed.state[p]["step"]) == 10.0 for p in resumed.parameters())


def test_policy_follows_each_parameter_when_a_group_is_narrowed():
    """Horovod's Adasum optimizer steps a group with its params swapped for one at a time: names
    and exclusions must follow the tensors, not their positions."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    twin = copy.deepcopy(model)
    grads = [torch.randn_like(p) for p in model.parameters()]
    whole = LARS(model.named_parameters(), lr=0.5, weight_decay=0.1, exclude=r"^0\.")
    narrowed = LARS(twin.named_parameters(), lr=0.5, weight_decay=0.1, exclude=r"^0\.")
    for p, q, g in zip(model.parameters(), twin.parameters(), grads):
        p.grad, q.grad = g.clone(), g.clone()
    whole.step()
    group = narrowed.param_groups[0]
    everything = group["params"]
    for p in reversed(everything):                  # one at a time, last first (so positions differ)
        group["params"] = [p]
        narrowed.step()
    group["params"] = everything
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("impl", [dict(foreach=True), dict(foreach=False),
                                  pytest.param(dict(fused=True), marks=pytest.mark.slow)], ids=str)
@pytest.mark.parametrize("algorithm", ["lars", "larc-norm_of_sum", "lamb"])
def test_functional_api_matches_the_optimizer_step(algorithm, impl):
    """largebatch.torch.functional.lars/lamb on plain lists give the optimizer's step bit for bit
    (flags from the same exclusion policy, a float64 0-d parameter and a float32 one included);
    fused too: both run the same compiled region (one per shape set, never past torch.compile's
    recompile limit, so never the uncompiled loop, which rounds differently)."""
    from largebatch.policy import ParamPolicy
    from largebatch.torch import functional
    torch.manual_seed(0)
    init = [torch.randn(4, 3), torch.randn(4), torch.randn((), dtype=torch.float64), torch.zeros(3, 3)]
    grads = [[torch.randn_like(t) for t in init] for _ in range(3)]
    params = [torch.nn.Parameter(t.clone()) for t in init]
    plain = [t.clone() for t in init]
    policy = ParamPolicy()
    decay = [policy.decays(None, t.shape) for t in init]
    adapt = [policy.adapts(None, t.shape) for t in init]
    if algorithm == "lamb":
        options = dict(lr=0.05, betas=(0.85, 0.99), eps=1e-5, weight_decay=1e-2)
        opt = LAMB(params, track_trust_ratios=True, **options, **impl)
        state = [[torch.zeros_like(t) for t in init], [torch.zeros_like(t) for t in init],
                 [torch.zeros((), dtype=torch.float64) for _ in init]]
        call = functional.lamb
    else:
        options = dict(lr=0.5, momentum=0.8, weight_decay=1e-3, trust_coefficient=0.02, nesterov=True)
        if algorithm == "larc-norm_of_sum":
            options.update(clip=True, trust_denominator="norm_of_sum", nesterov=False)
        opt = LARS(params, track_trust_ratios=True, **options, **impl)
        state = [[torch.zeros_like(t) for t in init]]
        call = functional.lars
    ratios = [torch.ones((), dtype=t.dtype) for t in init]
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        call(plain, [g.clone() for g in step_grads], *state, decay=decay, adapt=adapt, trust_ratios=ratios,
             **options, **impl)
    for p, t in zip(params, plain):
        torch.testing.assert_close(p.detach(), t, rtol=0, atol=0)
    for r, (name, want) in zip(ratios, sorted(opt.trust_ratios().items())):
        torch.testing.assert_close(r, want, rtol=0, atol=0, msg=name)


def test_functional_api_refuses_foreach_and_fused_together():
    from largebatch.torch import functional
    w = torch.ones(2, 2)
    with pytest.raises(ValueError, match=r"^fused: expected fused=True or foreach=True, not both$"):
        functional.lars([w], [w.clone()], [torch.zeros_like(w)], lr=0.1, foreach=True, fused=True)
    with pytest.raises(ValueError, match=r"^trust_denominator: expected one of"):
        functional.lars([w], [w.clone()], [torch.zeros_like(w)], lr=0.1, trust_denominator="max")


def test_clars_takes_lars_arguments_and_refuses_another_denominator():
    """CLARS has LARS's signature (no copy of it); the registry's CLARS rule is checked by LARS."""
    import inspect
    assert list(inspect.signature(CLARS).parameters) == list(inspect.signature(LARS).parameters)
    w = torch.nn.Parameter(torch.ones(2, 2))
    with pytest.raises(ValueError) as err:
        CLARS([w], lr=0.1, trust_denominator="norm_of_sum")
    assert str(err.value) == ("trust_denominator: CLARS defines its own denominator, expected 'sum_of_norms', "
                              "got 'norm_of_sum'")
    LARS([w], lr=0.1, trust_denominator="norm_of_sum")
    with pytest.raises(ValueError, match=r"^nesterov: needs momentum > 0, got momentum=0.0$"):
        CLARS([w], lr=0.1, momentum=0.0, nesterov=True)
    assert CLARS([w], lr=0.1)._pending_norms is None


def test_clars_refuses_another_denominator_in_a_param_group():
    """The CLARS rule holds for every group, not only the constructor's defaults (a group with
    norm_of_sum would ignore its per-example norms without a word)."""
    a, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=r"^trust_denominator: CLARS defines its own denominator"):
        CLARS([{"params": [a]}, {"params": [b], "trust_denominator": "norm_of_sum"}], lr=0.1)
    opt = CLARS([a], lr=0.1)
    with pytest.raises(ValueError, match=r"^nesterov: needs momentum > 0"):
        opt.add_param_group({"params": [b], "momentum": 0.0, "nesterov": True})
    LARS([{"params": [a]}, {"params": [b], "trust_denominator": "norm_of_sum"}], lr=0.1)
