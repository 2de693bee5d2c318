"""largebatch.torch on CUDA tensors: LARS, LARC, LAMB, CLARS against the NumPy reference, step by step.

Marker ``gpu``; the whole module is skipped when ``torch.cuda.is_available()`` is false, so runs
without a GPU are unchanged. On a GPU machine: ``bash bench/gpu_check.sh`` (or
``python -m pytest tests/test_gpu.py -m gpu``).

Covered: float32 and bfloat16 parameters, every implementation (``foreach=False``,
``foreach=True``, ``fused=True``), a 0-d parameter, no host synchronisation inside ``step()``
(``torch.cuda.set_sync_debug_mode("error")``), parameter groups mixing CPU and CUDA tensors,
state_dict round trips across devices, and AMP (autocast + ``torch.amp.GradScaler``) with LARS.

bfloat16: the optimizers keep their state (momentum buffer, Adam moments) in the parameter's
dtype, as ``torch.optim.SGD``/``AdamW`` do; LAMB's step counter stays float64. With bf16 state a
20-step trajectory drifts from a float32 reference by more than bf16 rounding says anything
about (LAMB's β2·v with β2 = 0.999 even rounds back to v), so the bf16 test checks each step on
its own: the reference starts every step from the optimizer's own bf16 weights and state.
"""
import copy
import io
import shutil

import numpy as np
import pytest
import torch

from largebatch import ReferenceOptimizer
from largebatch.torch import CLARS, LAMB, LARS
from test_torch_optim import STEPS, assert_close, make_problem

if not torch.cuda.is_available():
    pytest.skip("no CUDA device (torch.cuda.is_available() is False): the gpu tests need a GPU",
                allow_module_level=True)

pytestmark = pytest.mark.gpu
DEVICE = torch.device("cuda", 0)     # tensors report an indexed device; compare like with like
CPU = torch.device("cpu")
F32_RTOL = 1e-5       # CPU tests: 1e-6; CUDA sums in another order than NumPy and contracts into FMAs
BF16_RTOL = 2.0 ** -5  # a few bf16 roundings (8-bit significand); worst seen on CPU: 0.012 (LAMB foreach)

ALGORITHMS = {                         # reference algorithm -> (class, options shared by both sides)
    "lars": (LARS, dict(trust_coefficient=0.01, weight_decay=1e-3, momentum=0.9)),
    "larc": (LARS, dict(trust_coefficient=0.01, weight_decay=1e-3, momentum=0.9, clip=True)),
    "lamb": (LAMB, dict(weight_decay=1e-2)),
    "clars": (CLARS, dict(trust_coefficient=0.01, weight_decay=1e-3, momentum=0.9)),
}
IMPLS = {"single": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
BATCH = 8                              # CLARS global batch size


def _needs_cxx(impl):
    """fused=True on CPU tensors compiles C++ with inductor; a GPU machine may have no compiler."""
    if impl == "fused" and not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        pytest.skip("fused=True on CPU parameters needs a C++ compiler for torch.compile; none on PATH")


@pytest.fixture(autouse=True, scope="module")
def _room_for_recompiles():
    """fused=True compiles per dtype and option set; keep them all compiled (no silent eager fallback)."""
    import torch._dynamo
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    old = getattr(cfg, name)
    setattr(cfg, name, max(old, 64))
    yield
    setattr(cfg, name, old)


def problem(seed=0):
    """test_torch_optim's problem (conv/fc weights, biases, BN, a zero-initialised weight, a weight
    whose gradient is always zero, an lr that changes every step) plus a 0-d parameter; float32."""
    init, grads, lrs = make_problem(torch.float32, seed)
    rng = np.random.default_rng(seed + 100)
    init["scale"] = np.array(1.5 + rng.normal(), dtype=np.float32)
    for g in grads:
        g["scale"] = np.array(rng.normal(scale=0.5), dtype=np.float32)
    return init, grads, [float(lr) for lr in lrs]       # Python floats: torch.load(weights_only) refuses NumPy


def norm_sum(g):
    """A made-up CLARS per-example norm sum >= B·‖g‖ (the triangle inequality holds for real ones)."""
    return float(np.linalg.norm(g)) * BATCH * 1.7


def numpy_of(t):
    return t.detach().to(CPU, torch.float32).numpy().copy()


def build(algorithm, impl, params, lr, extra=None, groups=None):
    cls, options = ALGORITHMS[algorithm]
    kwargs = dict(options, **IMPLS[impl], **(extra or {}))
    if groups is None:
        groups = [list(params)]
    return cls([{"params": [params[n] for n in names], "param_names": list(names)} for names in groups],
               lr=lr, **kwargs)


def reference(algorithm, lr, extra=None):
    options = dict(ALGORITHMS[algorithm][1], **{k: v for k, v in (extra or {}).items() if k != "track_trust_ratios"})
    return ReferenceOptimizer(algorithm, lr=lr, **options)


def device_grads(grads, devices, dtype):
    """Every step's gradients, created on each parameter's device up front (outside step())."""
    return [{n: torch.tensor(g[n], dtype=dtype, device=devices[n]) for n in g} for g in grads]


def set_grads(opt, params, grads_t, algorithm, devices):
    for n, p in params.items():
        p.grad = grads_t[n]
    if algorithm == "clars":
        opt.set_per_example_norms({p: torch.tensor(norm_sum(numpy_of(grads_t[n])), dtype=torch.float64,
                                                   device=devices[n]) for n, p in params.items()}, BATCH)


def reference_step(ref, algorithm, w, grads_t, lr):
    extra = {}
    if algorithm == "clars":
        extra = dict(per_example_norm_sums={n: norm_sum(g) for n, g in grads_t.items()}, global_batch_size=BATCH)
    ref.step(w, grads_t, lr=lr, **extra)


def run_trajectory(algorithm, impl, devices, dtype=torch.float32, extra=None, groups=None, steps=STEPS):
    """``steps`` optimizer steps on parameters placed per ``devices`` (name -> device) next to the
    reference's; returns (torch weights as numpy, reference weights, optimizer, params)."""
    init, grads, lrs = problem()
    params = {n: torch.tensor(v, dtype=dtype, device=devices[n], requires_grad=True) for n, v in init.items()}
    opt = build(algorithm, impl, params, lrs[0], extra, groups)
    ref, ref_w = reference(algorithm, lrs[0], extra), {n: v.copy() for n, v in init.items()}
    dgrads = device_grads(grads[:steps], devices, dtype)
    for t in range(steps):
        set_grads(opt, params, dgrads[t], algorithm, devices)
        for group in opt.param_groups:
            group["lr"] = lrs[t]
        opt.step()
        reference_step(ref, algorithm, ref_w, grads[t], lrs[t])
    return {n: numpy_of(p) for n, p in params.items()}, ref_w, opt, params, ref


def assert_state_placed(opt, params):
    """Every state tensor on its parameter's device; moments in the parameter's dtype; LAMB's step float64."""
    for name, p in params.items():
        for key, value in opt.state[p].items():
            assert torch.is_tensor(value), (name, key)
            assert value.device == p.device, f"{name}: state[{key!r}] on {value.device}, parameter on {p.device}"
            want = torch.float64 if key == "step" else p.dtype
            assert value.dtype == want, f"{name}: state[{key!r}] is {value.dtype}, expected {want}"


ALL = [(a, i) for a in ALGORITHMS for i in IMPLS]
ALL_IDS = [f"{a}-{i}" for a, i in ALL]


# ----------------------------------------------------------------------------- float32 trajectories

@pytest.mark.parametrize("algorithm,impl", ALL, ids=ALL_IDS)
def test_float32_matches_reference(algorithm, impl):
    extra = dict(track_trust_ratios=True) if algorithm in ("lars", "larc", "lamb") else None
    devices = {n: DEVICE for n in problem()[0]}
    got, want, opt, params, ref = run_trajectory(algorithm, impl, devices, extra=extra)
    assert_close(got, want, F32_RTOL)
    assert all(np.isfinite(v).all() for v in got.values())
    assert_state_placed(opt, params)
    if extra:
        ratios = opt.trust_ratios()
        assert set(ratios) == set(params)
        for name, value in ratios.items():
            assert value.device == DEVICE
            assert float(value) == pytest.approx(ref.trust_ratios[name], rel=1e-4, abs=1e-7), name


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("algorithm,extra", [
    ("lars", dict(nesterov=True, trust_denominator="norm_of_sum", exclude=False)),   # the 0-d param adapted
    ("lamb", dict(exclude=False, betas=(0.8, 0.99), eps=1e-4)),
], ids=["lars-nesterov-norm_of_sum-adapt_all", "lamb-adapt_all-betas"])
def test_float32_options_match_reference(algorithm, extra, impl):
    devices = {n: DEVICE for n in problem()[0]}
    got, want, _, _, _ = run_trajectory(algorithm, impl, devices, extra=extra)
    assert_close(got, want, F32_RTOL)


# ----------------------------------------------------------------------------- bfloat16, step by step

def _snapshot_state(opt, params):
    out = {}
    for n, p in params.items():
        st = opt.state[p]
        if st:                              # none before the first step: the reference creates zeros
            out[n] = {k: (int(round(float(v))) if k == "step" else numpy_of(v)) for k, v in st.items()
                      if k != "trust_ratio"}
    return out


def _assert_bf16_close(got, want, before, what):
    """Within a few bf16 roundings of the step's operands: the tolerance scales with the tensor's
    largest value before or after the step (x − y can cancel far below its operands) plus twice
    the largest change (LAMB's update is ~lr·‖w‖ and goes through ~6 roundings: norms, ratio, m̂, √v̂)."""
    scale = max(float(np.abs(want).max()), float(np.abs(before).max())) + 2 * float(np.abs(want - before).max())
    np.testing.assert_allclose(got, want, rtol=BF16_RTOL, atol=BF16_RTOL * max(scale, 1e-30), err_msg=what)


@pytest.mark.parametrize("algorithm,impl", ALL, ids=ALL_IDS)
def test_bfloat16_each_step_matches_reference(algorithm, impl):
    """Each step from the optimizer's own bf16 weights and state: the reference (float32 NumPy)
    takes the same weights, state and bf16-rounded gradients; weights and state agree within a
    few bf16 roundings (see _assert_bf16_close)."""
    dtype = torch.bfloat16
    init, grads, lrs = problem()
    devices = {n: DEVICE for n in init}
    params = {n: torch.tensor(v, dtype=dtype, device=DEVICE, requires_grad=True) for n, v in init.items()}
    opt = build(algorithm, impl, params, lrs[0])
    dgrads = device_grads(grads, devices, dtype)
    for t in range(STEPS):
        w_before, state_before = {n: numpy_of(p) for n, p in params.items()}, _snapshot_state(opt, params)
        want = copy.deepcopy(w_before)
        ref = reference(algorithm, lrs[t])
        ref.state = copy.deepcopy(state_before)                          # the reference updates it in place
        g = {n: numpy_of(dgrads[t][n]) for n in params}                 # the gradients the optimizer sees
        reference_step(ref, algorithm, want, g, lrs[t])
        set_grads(opt, params, dgrads[t], algorithm, devices)
        for group in opt.param_groups:
            group["lr"] = lrs[t]
        opt.step()
        state = _snapshot_state(opt, params)
        for n, p in params.items():
            _assert_bf16_close(numpy_of(p), want[n], w_before[n], f"{n} step {t}")
            for key, value in ref.state[n].items():
                if key == "step":
                    assert state[n][key] == value, (n, t)
                else:
                    _assert_bf16_close(state[n][key], value, state_before.get(n, {}).get(key, value),
                                       f"{n}[{key}] step {t}")
    assert_state_placed(opt, params)     # state in bf16 like the parameters (LAMB's step: float64)


# ----------------------------------------------------------------------------- no host synchronisation

@pytest.mark.parametrize("algorithm,impl", ALL, ids=ALL_IDS)
def test_step_does_not_synchronise_with_the_host(algorithm, impl):
    """torch.cuda.set_sync_debug_mode("error") raises on a synchronising call (.item(), a Python
    branch on a tensor, a blocking host-to-device copy such as torch.tensor(x, device="cuda"))."""
    init, grads, lrs = problem()
    devices = {n: DEVICE for n in init}
    params = {n: torch.tensor(v, device=DEVICE, requires_grad=True) for n, v in init.items()}
    opt = build(algorithm, impl, params, lrs[0], dict(track_trust_ratios=True))
    dgrads = device_grads(grads[:5], devices, torch.float32)
    warmup = 2 if impl == "fused" else 0          # compilation may synchronise; later steps must not
    for t in range(5):
        set_grads(opt, params, dgrads[t], algorithm, devices)    # outside the checked region
        for group in opt.param_groups:
            group["lr"] = lrs[t]
        if t < warmup:
            opt.step()
            continue
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in params.values())


# ----------------------------------------------------------------------------- mixed devices

def _split_devices(names):
    """Interleave: every other parameter (the first included) on CUDA, the rest on the CPU."""
    return {n: (DEVICE if i % 2 == 0 else CPU) for i, n in enumerate(names)}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("algorithm", ["lars", "lamb", "clars"])
def test_one_group_with_cpu_and_cuda_parameters(algorithm, impl):
    _needs_cxx(impl)
    devices = _split_devices(problem()[0])
    got, want, opt, params, _ = run_trajectory(algorithm, impl, devices)
    assert {p.device.type for p in params.values()} == {"cpu", DEVICE.type}
    assert_close(got, want, F32_RTOL)
    assert_state_placed(opt, params)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("algorithm", ["lars", "lamb", "clars"])
def test_separate_cpu_and_cuda_groups(algorithm, impl):
    _needs_cxx(impl)
    names = list(problem()[0])
    devices = _split_devices(names)
    groups = [names[0::2], names[1::2]]                      # the CUDA ones, the CPU ones
    got, want, opt, params, _ = run_trajectory(algorithm, impl, devices, groups=groups)
    assert [{p.device for p in g["params"]} for g in opt.param_groups] == [{DEVICE}, {CPU}]
    assert_close(got, want, F32_RTOL)
    assert_state_placed(opt, params)


# ----------------------------------------------------------------------------- state_dict across devices

@pytest.mark.parametrize("via", ["state_dict", "torch.save+map_location"])
@pytest.mark.parametrize("impl", ["single", "foreach"])
@pytest.mark.parametrize("algorithm", ["lars", "lamb"])
@pytest.mark.parametrize("src,dst", [(DEVICE, CPU), (CPU, DEVICE)], ids=["cuda_to_cpu", "cpu_to_cuda"])
def test_state_dict_round_trip_across_devices(src, dst, algorithm, impl, via):
    """Steps on one device, state saved, loaded into an optimizer over the same weights on the
    other device, steps continued there: the whole trajectory matches the reference."""
    init, grads, lrs = problem()
    half = STEPS // 2
    ref, ref_w = reference(algorithm, lrs[0]), {n: v.copy() for n, v in init.items()}
    for t in range(STEPS):
        reference_step(ref, algorithm, ref_w, grads[t], lrs[t])

    params = {n: torch.tensor(v, device=src, requires_grad=True) for n, v in init.items()}
    opt = build(algorithm, impl, params, lrs[0])
    dgrads = device_grads(grads[:half], {n: src for n in init}, torch.float32)
    for t in range(half):
        set_grads(opt, params, dgrads[t], algorithm, {n: src for n in init})
        opt.param_groups[0]["lr"] = lrs[t]
        opt.step()
    if via == "state_dict":
        saved = copy.deepcopy(opt.state_dict())         # what a checkpoint holds: no tensors shared with opt
    else:
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        saved = torch.load(buf, map_location=dst)

    moved = {n: torch.tensor(numpy_of(p), device=dst, requires_grad=True) for n, p in params.items()}
    cls = ALGORITHMS[algorithm][0]
    resumed = cls([{"params": list(moved.values()), "param_names": list(moved)}], **IMPLS[impl])
    resumed.load_state_dict(saved)                                      # hyper-parameters come from the save
    assert resumed.param_groups[0]["weight_decay"] == ALGORITHMS[algorithm][1]["weight_decay"]
    assert_state_placed(resumed, moved)
    dgrads = device_grads(grads[half:], {n: dst for n in init}, torch.float32)
    for t in range(half, STEPS):
        set_grads(resumed, moved, dgrads[t - half], algorithm, {n: dst for n in init})
        resumed.param_groups[0]["lr"] = lrs[t]
        resumed.step()
    assert_close({n: numpy_of(p) for n, p in moved.items()}, ref_w, F32_RTOL)
    assert_state_placed(resumed, moved)


# ----------------------------------------------------------------------------- AMP

def _grad_scaler(**kwargs):
    if hasattr(torch.amp, "GradScaler"):                  # torch >= 2.3
        return torch.amp.GradScaler(DEVICE.type, **kwargs)
    return torch.cuda.amp.GradScaler(**kwargs)


@pytest.mark.parametrize("impl", ["single", "foreach"])
def test_amp_autocast_and_grad_scaler_with_lars(impl):
    """scaler.step(opt) unscales the gradients and steps LARS on them (same weights as a plain LARS
    step on the unscaled gradients); a step with an inf gradient is skipped, state untouched, and
    the scale backs off."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 5)).to(DEVICE)
    twin = copy.deepcopy(model)
    kwargs = dict(lr=0.5, weight_decay=1e-3, trust_coefficient=0.01, **IMPLS[impl])
    opt, twin_opt = LARS(model.parameters(), **kwargs), LARS(twin.parameters(), **kwargs)
    scaler = _grad_scaler(init_scale=2.0 ** 12)
    x = torch.randn(16, 3, 8, 8, device=DEVICE)
    y = torch.randint(0, 5, (16,), device=DEVICE)
    inf_step = 2
    for step in range(5):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE.type, dtype=torch.float16 if DEVICE.type == "cuda" else torch.bfloat16):
            out = model(x)
            loss = torch.nn.functional.cross_entropy(out, y)
        assert out.dtype != torch.float32 and loss.dtype == torch.float32
        scaler.scale(loss).backward()
        if step == inf_step:
            model[0].weight.grad.view(-1)[0] = float("inf")
        before = [p.detach().clone() for p in model.parameters()]
        bufs_before = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()] if step else None
        scale_before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if step == inf_step:
            for p, b in zip(model.parameters(), before):
                torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)
            for p, b in zip(model.parameters(), bufs_before):
                torch.testing.assert_close(opt.state[p]["momentum_buffer"], b, rtol=0, atol=0)
            assert scaler.get_scale() == scale_before * 0.5
            continue
        assert scaler.get_scale() == scale_before
        assert any(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.isfinite(p.grad).all()
            q.grad = p.grad.detach().clone()                    # scaler.step left them unscaled
        twin_opt.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
