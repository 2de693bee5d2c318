"""The gradient noise scale (largebatch.noise_scale; McCandlish et al. 2018): the estimators, the
torch tap that reads a rank's gradient before the engine averages it, and the value measured in
real runs against the exact one computed over the whole training set at the same weights."""
import csv
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from largebatch import noise_scale as ns

ROOT = Path(__file__).resolve().parents[1]
LARGEBATCH = str(Path(sys.executable).with_name("largebatch"))


# ------------------------------------------------------------------ the estimators (core)
def test_the_unbiased_estimators_invert_the_expected_squared_norms():
    """E|g_B|² = |G|² + tr(Σ)/B: given those expectations, eqs. A.2 and A.3 return |G|² and tr(Σ)."""
    g2, trace = 0.37, 5.2
    for b_small, b_big in [(32, 64), (16, 256), (1, 2)]:
        got = ns.unbiased_estimates(g2 + trace / b_small, g2 + trace / b_big, b_small, b_big)
        assert got == pytest.approx((g2, trace), rel=1e-12)
    with pytest.raises(ValueError, match="0 < b_small < b_big"):
        ns.unbiased_estimates(1.0, 1.0, 64, 64)


def test_the_estimate_from_sampled_gradients_approaches_the_exact_noise_scale():
    """Per-example gradients drawn around G: averaged over many updates, the EMA ratio is B_simple."""
    rng = np.random.default_rng(0)
    d, b_small, ranks = 20, 8, 4
    G = rng.normal(size=d) * 0.3
    sigma = rng.uniform(0.5, 1.5, size=d)
    exact = float(np.sum(sigma ** 2) / (G @ G))
    noise, values = ns.NoiseScale(decay=0.99), []
    for _ in range(3000):
        per_rank = [G + (rng.normal(size=(b_small, d)) * sigma).mean(0) for _ in range(ranks)]
        small = float(np.mean([g @ g for g in per_rank]))
        big_g = np.mean(per_rank, axis=0)
        values.append(noise.update(small, float(big_g @ big_g), b_small, b_small * ranks))
    assert noise.value == pytest.approx(exact, rel=0.1)
    assert np.mean(values[1000:]) == pytest.approx(exact, rel=0.05)


def test_the_moving_average_skips_non_finite_steps_and_round_trips():
    noise = ns.NoiseScale()
    assert noise.value is None
    noise.update(2.0, 1.0, 32, 64)
    before = noise.state_dict()
    assert noise.update(float("nan"), 1.0, 32, 64) == noise.value and noise.state_dict() == before
    again = ns.NoiseScale()
    again.load_state_dict(before)
    assert again.value == noise.value and again.updates == 1
    with pytest.raises(ValueError, match="decay"):
        ns.NoiseScale(decay=1.0)


def test_the_papers_tradeoff_and_adascales_gain():
    assert ns.batch_tradeoff(100, 100) == (2.0, 2.0)              # at B = B_noise: twice the minimum of both
    assert ns.batch_tradeoff(100, 25) == (5.0, 1.25)
    assert ns.adascale_gain(trace=1.0, g2=0.0, base_batch=1, scale=8) == 8.0      # pure noise: linear scaling
    assert ns.adascale_gain(trace=0.0, g2=1.0, base_batch=1, scale=8) == 1.0      # no noise: no gain
    r = ns.adascale_gain(trace=64.0, g2=1.0, base_batch=64, scale=4)              # σ² = |G|²
    assert r == pytest.approx(2 / (0.25 + 1))
    assert ns.adascale_gain(trace=5.0, g2=1.0, base_batch=1, scale=1) == 1.0


# ------------------------------------------------------------------ the torch tap
def test_the_tap_reads_each_pass_before_an_engine_averages_in_place():
    """An engine's hook on the gradient accumulator (as Horovod's and DDP's are) that halves the
    gradient in place, as an average over two ranks would: the tap saw the gradient before it."""
    torch = pytest.importorskip("torch")
    from largebatch.torch import GradientNormTap, squared_norm
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    tap = GradientNormTap(model.parameters())
    def halve(p):
        def hook(*_):
            p.grad.mul_(0.5)
        return hook
    accumulators = []                       # held, as Horovod holds them (else autograd makes new ones)
    for p in model.parameters():
        accumulators.append(p.expand_as(p).grad_fn.next_functions[0][0])
        accumulators[-1].register_hook(halve(p))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    tap.begin_update()
    passes = []
    for part in (slice(0, 4), slice(4, 8)):
        loss = torch.nn.functional.cross_entropy(model(x[part]), y[part]) / 2
        loss.backward()
        tap.end_pass()
        passes.append([p.grad.clone() for p in model.parameters()])
    # the first pass's gradient before the halving, and the accumulated one before the last halving
    first = sum(float((2 * g).square().sum()) for g in passes[0])
    last = sum(float((2 * g).square().sum()) for g in passes[1])
    assert squared_norm(model.parameters()) == pytest.approx(last / 4, rel=1e-6)      # the engine did halve
    assert tap.first_pass() == pytest.approx(first, rel=1e-6)
    assert tap.last_pass() == pytest.approx(last, rel=1e-6)
    assert tap.last_pass(scale=2.0) == pytest.approx(last / 4, rel=1e-6)
    tap.remove()


# ------------------------------------------------------------------ measured in runs, against the exact value
MODELS = textwrap.dedent('''
    import numpy as np


    def blobs(samples=4096, features=8, classes=3, seed=0):
        rng = np.random.default_rng(seed)
        centres = rng.standard_normal((classes, features)) * 0.7
        y = rng.integers(0, classes, samples)
        x = (centres[y] + rng.standard_normal((samples, features))).astype(np.float32)
        return (x, y), None


    def torch_linear(input_shape, num_classes):
        import torch
        torch.manual_seed(0)
        return torch.nn.Linear(input_shape[0], num_classes)


    def keras_linear(input_shape, num_classes):
        import keras
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input(input_shape), keras.layers.Dense(num_classes)])
''')


def _experiment(folder, framework, **train):
    (folder / "models.py").write_text(MODELS)
    doc = {"framework": framework, "model": {"factory": f"models.py:{framework}_linear"},
           "data": {"kind": "python", "factory": "models.py:blobs"}, "batch": {"per_worker": 32},
           "optimizer": {"name": "sgd", "momentum": 0.0},
           # a learning rate this small keeps the weights where the exact value is computed
           "schedule": {"base_lr": 1.0e-6, "base_batch": 64, "warmup": "none", "decay": "none"},
           "train": {"epochs": 4, "log_every": 1, **train},
           "output": {"progress": False, "checkpoint_every": 0, "tensorboard": False}}
    import yaml
    (folder / "exp.yaml").write_text(yaml.safe_dump(doc))
    return folder / "exp.yaml"


def _models(folder):
    sys.path.insert(0, str(folder))
    try:
        import models
        return models
    finally:
        sys.path.pop(0)
        sys.modules.pop("models", None)


def _exact_softmax_regression(x, y, weight, bias):
    """B_simple = tr(Σ)/|G|² of the mean cross-entropy of a linear softmax model over the whole
    training set, from the per-example gradients (x_i ⊗ (p_i - y_i), p_i - y_i)."""
    logits = x.astype(np.float64) @ weight + bias
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    err = p - np.eye(weight.shape[1])[y]
    per_example = np.concatenate([(x[:, :, None] * err[:, None, :]).reshape(len(x), -1), err], axis=1)
    mean = per_example.mean(0)
    trace = float(((per_example - mean) ** 2).sum(1).mean())
    return trace / float(mean @ mean)


def _logged(run_dir):
    with open(run_dir / "metrics.csv") as fh:
        return [float(r["noise_scale"]) for r in csv.DictReader(fh) if r["kind"] == "train" and r["noise_scale"]]


@pytest.mark.multirank
@pytest.mark.parametrize("framework,args", [("torch", ["--np", "2"]),
                                            ("keras", ["--np", "1", "batch.accumulation_steps=2"])],
                         ids=["torch-2-ranks", "keras-1-rank-accumulation"])
def test_the_noise_scale_of_a_run_is_the_exact_one_within_ten_percent(tmp_path, framework, args):
    """Logistic regression on fixed data: tr(Σ) and |G|² computed exactly over the training set at
    the run's weights; the run's smoothed estimate (summary.json) within 10 %, the median of its
    logged values over the second half within 15 %. torch: each rank's gradient against the average (B 32 vs 64);
    Keras: one micro-batch against the accumulated update (B 32 vs 64)."""
    exp = _experiment(tmp_path, framework)
    proc = subprocess.run([LARGEBATCH, "run", str(exp), *args, f"output.run_dir={tmp_path / 'run'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                                      os.environ.get("PYTHONPATH")]))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    models = _models(tmp_path)
    (x, y), _ = models.blobs()
    if framework == "torch":              # the weights the run started from (its lr keeps them there)
        model = models.torch_linear((8,), 3)
        weight, bias = model.weight.detach().numpy().T, model.bias.detach().numpy()
    else:
        weight, bias = models.keras_linear((8,), 3).layers[-1].get_weights()
    exact = _exact_softmax_regression(x, y, weight.astype(np.float64), bias.astype(np.float64))
    logged = _logged(tmp_path / "run")
    print(f"\n{framework}: exact B_simple {exact:.3f}, run {summary['noise_scale']:.3f}, "
          f"mean of {len(logged)} logged {np.mean(logged):.3f}")
    assert len(logged) == 256 and all(math.isfinite(v) for v in logged)
    assert summary["noise_scale"] == pytest.approx(exact, rel=0.10)
    assert np.median(logged[len(logged) // 2:]) == pytest.approx(exact, rel=0.15)
    assert "gradient noise scale B_simple ≈" in proc.stdout + proc.stderr


@pytest.mark.multirank
def test_the_noise_scale_of_a_small_cnn_is_the_exact_one_within_twenty_percent(tmp_path):
    """small_cnn (no BatchNorm: per-example gradients are then defined) on synthetic images, one
    rank with 2 accumulation steps; exact over the 512 training images by per-example gradients."""
    torch = pytest.importorskip("torch")
    from torch.func import functional_call, grad, vmap
    run_dir = tmp_path / "run"
    proc = subprocess.run([LARGEBATCH, "run", str(ROOT / "examples" / "synthetic_torch.yaml"), "--np", "1",
                           "batch.accumulation_steps=2", "batch.per_worker=32", "model.batch_norm=false",
                           "data.samples=512", "data.val_samples=64", "optimizer.momentum=0",
                           "schedule.base_lr=1e-7", "schedule.warmup=none", "train.epochs=16", "output.checkpoint_every=16",
                           "train.log_every=1", "output.progress=false", "output.tensorboard=false",
                           "output.trust_ratios=false", "launcher.threads_per_rank=2", f"output.run_dir={run_dir}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from largebatch.config import load
    from largebatch.runner.common import datasets_and_steps
    from largebatch.runner.torch_train import _to_torch, build_model
    from largebatch.torch.checkpoint import load_checkpoint
    exp = load(str(run_dir / "config.yaml"))
    torch.manual_seed(exp.cfg["train"]["seed"])
    model = build_model(exp.cfg, exp.derived)
    load_checkpoint(str(sorted((run_dir / "checkpoints").glob("*.pt"))[-1]), model, restore_rng=False)
    train_set, _ = datasets_and_steps(exp)
    x, y = _to_torch(train_set.batch(list(range(len(train_set)))), torch, train_set.nhwc_images)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])
    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([g.reshape(len(x), -1) for g in per_example.values()], 1).double()
    mean = flat.mean(0)
    exact = float(((flat - mean) ** 2).sum(1).mean() / (mean @ mean))
    summary = json.loads((run_dir / "summary.json").read_text())
    logged = _logged(run_dir)
    print(f"\nsmall_cnn: exact B_simple {exact:.2f}, run {summary['noise_scale']:.2f}, mean logged {np.mean(logged):.2f}")
    assert summary["noise_scale"] == pytest.approx(exact, rel=0.20)
    assert np.median(logged[len(logged) // 2:]) == pytest.approx(exact, rel=0.25)


# ------------------------------------------------------------------ AdaScale (Johnson et al. 2020)
def test_the_adascale_clock_runs_the_base_iterations_in_fewer_updates():
    noise = ns.NoiseScale()
    clock = ns.AdaScaleClock(scale=4, base_steps=100, base_batch=64)
    assert clock.gain(None) == 1.0 and clock.gain(noise) == 1.0          # no estimate yet: the base rate
    noise.update(small_sq=1.0 + 64.0 / 64, big_sq=1.0 + 64.0 / 256, b_small=64, b_big=256)   # σ² = |G|² = 1
    updates = 0
    while not clock.done:
        clock.gain(noise)
        clock.advance()
        updates += 1
    assert clock.last_gain == pytest.approx(2 / (0.25 + 1))                # eq. 3 with σ² = |G|²
    assert updates == math.ceil(100 / clock.last_gain) and clock.mean_gain == pytest.approx(clock.last_gain)
    again = ns.AdaScaleClock(scale=4, base_steps=100, base_batch=64)
    again.load_state_dict(clock.state_dict())
    assert again.done and again.tau == clock.tau


@pytest.mark.multirank
@pytest.mark.parametrize("framework,base_batch,base_lr,suffix", [("torch", 8, 0.5, "pt"), ("keras", 16, 1.0, "ckpt")])
def test_an_adascale_run_ends_when_it_has_done_the_base_runs_iterations(tmp_path, framework, base_batch, base_lr,
                                                                          suffix):
    """S = 4 (the examples' global batch over a base batch 4 times smaller): the run stops once its
    scale-invariant clock has reached the base run's iterations, after more updates than linear
    scaling would take and fewer than the base run; each logged rate is the gain (1 to S) times
    the base schedule's, and the last epoch's checkpoint is written."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([LARGEBATCH, "run", str(ROOT / "examples" / f"synthetic_{framework}.yaml"), "--np", "2",
                           "schedule.adascale=true", f"schedule.base_batch={base_batch}", "data.samples=512",
                           "data.val_samples=64", "output.progress=false", "launcher.threads_per_rank=1",
                           "train.log_every=1", "output.checkpoint_every=1", f"output.run_dir={run_dir}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    ada, base_steps = summary["adascale"], summary["total_steps"]       # the bound: the base run's iterations
    linear = base_steps // 4                                             # linear scaling's updates
    assert f"AdaScale: lr {base_lr:g} at {base_batch} × the measured gain (S = 4), at most {base_steps} updates" \
        in proc.stderr
    assert ada["scale"] == 4 and ada["base_steps"] == base_steps and ada["scale_invariant_iterations"] >= base_steps
    assert linear < ada["steps"] == summary["steps_done"] < base_steps and 1 < ada["mean_gain"] <= 4
    assert summary["status"] == "completed"
    with open(run_dir / "metrics.csv") as fh:
        lrs = [float(r["lr"]) for r in csv.DictReader(fh) if r["kind"] == "train"]
    assert len(lrs) == ada["steps"] and max(lrs) <= 4 * base_lr + 1e-6
    spe = 512 // summary["global_batch"]
    assert (run_dir / "checkpoints" / f"epoch-{math.ceil(ada['steps'] / spe):04d}.{suffix}").exists()
