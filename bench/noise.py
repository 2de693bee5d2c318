"""The gradient noise scale in real runs: does it grow as the loss falls, does McCandlish et al.'s
model predict the steps at other batch sizes from it, and what does measuring it cost.

Runs ``largebatch run`` on the synthetic small-CNN example (2 ranks, one thread each) at three
global batches (``--batches``, per-worker batch × 2 ranks; the learning rate follows the linear
scaling rule from the middle one), logging every update:

- **grows as the loss falls** (McCandlish et al. 2018, §3.3): B_simple early (the first logged
  quarter) and late (the last quarter) of the middle run, and the rank correlation between
  B_simple and the training loss over the run (negative: it grows as the loss falls);
- **predicted vs measured steps**: the steps each run needs to bring its smoothed training loss
  under a target (``--target-loss``; default: the highest of the three runs' final smoothed
  losses, so every run gets there) against S(B) = S_min (1 + B_noise/B), with S_min and B_noise
  taken from the middle run at the step it reaches the target;
- **cost**: the middle run again with ``train.noise_scale=false``, interleaved (``--repeats``),
  steady images/s with and without the measurement.

Writes ``noise.{csv,json,png}``.

    python bench/noise.py [--quick] [--out DIR] [--batches 16 32 64] [--epochs 6]
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from _common import DEFAULT_OUT, finish_figure, machine_info, print_header, print_table, write_outputs  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "synthetic_torch.yaml"
LARGEBATCH = str(Path(sys.executable).with_name("largebatch"))


def run(global_batch, base_batch, epochs, samples, noise, run_dir, timeout):
    """One run of the example; its metrics rows and summary."""
    cmd = [LARGEBATCH, "run", str(EXAMPLE), "--np", "2", f"batch.per_worker={global_batch // 2}",
           f"data.samples={samples}", "data.val_samples=128", f"train.epochs={epochs}", "train.log_every=1",
           f"schedule.base_batch={base_batch}", f"train.noise_scale={'true' if noise else 'false'}",
           "output.progress=false", "output.tensorboard=false", "output.trust_ratios=false",
           "launcher.threads_per_rank=1", f"output.run_dir={run_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    with open(Path(run_dir) / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["kind"] == "train"]
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    return rows, summary


def tap_cost(model_name, batch, image_size, reps):
    """Median forward+backward ms of one process (one thread) without and with what the noise
    scale adds to a step: the tap's per-parameter squared norms and the averaged gradient's norm."""
    import torch
    from largebatch.config import load
    from largebatch.runner.torch_train import build_model
    from largebatch.torch import GradientNormTap, squared_norm
    torch.set_num_threads(1)
    exp = load(str(EXAMPLE), [f"model.name={model_name}", f"data.image_size={image_size}", "launcher.np=1",
                              "optimizer.trust_coefficient=0.02"])
    model = build_model(exp.cfg, exp.derived)
    x = torch.randn(batch, 3, image_size, image_size)
    y = torch.randint(0, 10, (batch,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(tap):
        model.zero_grad()
        if tap is not None:
            tap.begin_update()
        loss_fn(model(x), y).backward()
        if tap is not None:
            tap.end_pass()
            tap.last_pass()
            squared_norm(model.parameters())

    times = {False: [], True: []}
    tap = GradientNormTap(model.parameters())
    for i in range(reps + 2):
        for measured in (False, True):               # interleaved
            if not measured:
                tap.remove()
            t = time.perf_counter()
            step(tap if measured else None)
            if i >= 2:
                times[measured].append(time.perf_counter() - t)
            if not measured:
                tap = GradientNormTap(model.parameters())
    without, with_ = float(np.median(times[False])) * 1e3, float(np.median(times[True])) * 1e3
    return dict(model=model_name, batch=batch, image_size=image_size, params=sum(p.numel() for p in model.parameters()),
                step_ms=without, step_with_noise_ms=with_, overhead=with_ / without - 1)


def smoothed(values, window):
    """Trailing mean over ``window`` values (the first ones over what there is)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def first_below(values, target):
    return next((i for i, v in enumerate(values) if v <= target), None)


def spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small runs (about a minute) for the smoke test")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--batches", type=int, nargs=3, help="three global batches, even (default 16 32 64)")
    ap.add_argument("--epochs", type=float, help="epochs per run (default 6; quick 2)")
    ap.add_argument("--samples", type=int, help="training images (default 4096; quick 1024)")
    ap.add_argument("--target-loss", type=float, help="the loss every run must reach (default: see above)")
    ap.add_argument("--repeats", type=int, help="runs with and without the measurement, each (default 3; quick 1)")
    ap.add_argument("--timeout", type=float, default=600)
    a = ap.parse_args(argv)
    batches = a.batches or [16, 32, 64]
    epochs = a.epochs or (2 if a.quick else 6)
    samples = a.samples or (1024 if a.quick else 4096)
    repeats = a.repeats or (1 if a.quick else 3)
    settings = dict(mode="quick" if a.quick else "full", batches=batches, epochs=epochs, samples=samples,
                    repeats=repeats, model="small_cnn (synthetic 16x16, 2 ranks x 1 thread, lars)")
    meta = machine_info(**settings)
    print_header(meta, "noise scale: growth, predicted vs measured steps, cost")
    tmp = Path(tempfile.mkdtemp(prefix="lb-noise-"))
    base = batches[1]
    runs = {}
    for b in batches:
        runs[b] = run(b, base, epochs, samples, True, tmp / f"b{b}", a.timeout)
        print(f"   B={b}: {runs[b][1]['steps_done']} steps, final noise scale {runs[b][1]['noise_scale']:.4g}",
              flush=True)
    window = 8
    losses = {b: smoothed([float(r["loss"]) for r in rows], window) for b, (rows, _) in runs.items()}
    target = a.target_loss or max(v[-1] for v in losses.values())
    reached = {b: first_below(losses[b], target) for b in batches}
    rows_mid = runs[base][0]
    noise_mid = [float(r["noise_scale"]) if r["noise_scale"] else float("nan") for r in rows_mid]
    at = reached[base]
    out_rows, errors = [], []
    if at is not None and np.isfinite(noise_mid[at]):
        b_noise = noise_mid[at]
        s_ref = int(rows_mid[at]["step"])
        s_min = s_ref / (1 + b_noise / base)
        for b in batches:
            measured = int(runs[b][0][reached[b]]["step"]) if reached[b] is not None else None
            predicted = s_min * (1 + b_noise / b)
            err = (predicted / measured - 1) if measured else None
            if b != base and err is not None:
                errors.append(err)
            out_rows.append(dict(global_batch=b, steps_to_target=measured, predicted_steps=predicted,
                                 error=err, final_noise_scale=runs[b][1]["noise_scale"]))
    else:
        b_noise = None
    quarter = max(1, len(noise_mid) // 4)
    finite = [(float(r["loss"]), n) for r, n in zip(rows_mid, noise_mid) if np.isfinite(n)]
    growth = dict(early=float(np.nanmedian(noise_mid[quarter // 2:quarter + 1])), late=float(np.nanmedian(noise_mid[-quarter:])),
                  spearman_loss_noise=spearman([f[0] for f in finite], [f[1] for f in finite]))
    # cost: the middle batch with and without the measurement, interleaved
    with_ips, without_ips = [], []
    for i in range(repeats):
        for noise, into in ((False, without_ips), (True, with_ips)):
            _, s = run(base, base, epochs, samples, noise, tmp / f"cost-{int(noise)}-{i}", a.timeout)
            into.append(s["images_per_sec"])
    cost = dict(images_per_sec_with=float(np.median(with_ips)), images_per_sec_without=float(np.median(without_ips)))
    cost["overhead"] = cost["images_per_sec_without"] / cost["images_per_sec_with"] - 1
    cost["in_process"] = [tap_cost("small_cnn", 16, 16, 40 if a.quick else 200)]
    if not a.quick:
        cost["in_process"].append(tap_cost("resnet50", 8, 64, 15))
    meta.update(target_loss=target, noise_scale_at_target=b_noise, growth=growth, cost=cost,
                mean_abs_error=float(np.mean(np.abs(errors))) if errors else None)
    out = Path(a.out)
    csv_path, json_path = write_outputs(out, "noise", out_rows, meta)
    plot(runs, losses, target, reached, out / "noise.png", base)
    print()
    if out_rows:
        print_table(out_rows, ["global_batch", "steps_to_target", "predicted_steps", "error", "final_noise_scale"],
                    {"predicted_steps": "{:.1f}", "error": "{:+.1%}", "final_noise_scale": "{:.4g}"})
        print(f"   target loss {target:.4g} (smoothed over {window} updates); B_noise {b_noise:.4g} from B={base} "
              f"at step {s_ref}; S(B) = S_min (1 + B_noise/B)")
    else:
        print(f"   B={base} never reached the target loss {target:.4g}: no prediction")
    print(f"   B={base}: noise scale early {growth['early']:.4g}, late {growth['late']:.4g}; rank correlation with "
          f"the loss {growth['spearman_loss_noise']:+.2f} (negative: it grows as the loss falls)")
    print(f"   cost: {cost['images_per_sec_with']:.0f} images/s measuring, {cost['images_per_sec_without']:.0f} "
          f"without ({cost['overhead']:+.1%}; median of {repeats}, interleaved)")
    for c in cost["in_process"]:
        print(f"   cost in one process, {c['model']} ({c['params'] / 1e6:.2f}M parameters), batch {c['batch']}, "
              f"{c['image_size']}x{c['image_size']}: forward+backward {c['step_ms']:.2f} ms, with the noise "
              f"scale's norms {c['step_with_noise_ms']:.2f} ms ({c['overhead']:+.1%})")
    print(f"   wrote {csv_path}, {json_path}, {out / 'noise.png'}")
    return 0


def plot(runs, losses, target, reached, path, base):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    for i, (b, (rows, _)) in enumerate(sorted(runs.items())):
        steps = [int(r["step"]) for r in rows]
        ax1.plot(steps, losses[b], color=f"C{i}", label=f"B={b}")
        if reached[b] is not None:
            ax1.plot([steps[reached[b]]], [losses[b][reached[b]]], "o", color=f"C{i}")
        ns = [(s, float(r["noise_scale"])) for s, r in zip(steps, rows) if r["noise_scale"]]
        ax2.semilogy([s for s, _ in ns], [v for _, v in ns], color=f"C{i}", label=f"B={b}")
    ax1.axhline(target, color="k", ls=":", lw=1, label="target loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("train loss (smoothed)")
    ax1.set_title("steps to the target loss (dots)")
    ax2.set_xlabel("step")
    ax2.set_ylabel("B_simple (examples, log)")
    ax2.set_title(f"gradient noise scale (EMA), B={base} is the reference")
    finish_figure(fig, (ax1, ax2), path)


if __name__ == "__main__":
    sys.exit(main())
