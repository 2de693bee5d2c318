"""AdaScale SGD against linear scaling with warm-up, at S = 4, 8, 16 times the base batch, with
no learning-rate retuning (Johnson, Agrawal, Gu, Guestrin 2020, the check of their §5).

Task and model: the convergence study's (``bench/convergence.py``: crops of 10 smooth class
prototypes under pixel noise; a plain 4- or 6-conv CNN without BatchNorm), one process, large
batches by accumulating chunks of the base batch. SGD with momentum 0.9, weight decay 5e-4,
poly-2 decay, at the base batch B_0 with lr ``--base-lr``:

- **S = 1**: the base run, T iterations (``--epochs`` of the training set);
- **linear scaling + warm-up** at S·B_0 (Goyal et al. 2017): lr S·base_lr, gradual warm-up over
  ``--warmup-frac`` of the epochs from base_lr, the same epochs (T/S updates);
- **AdaScale** at S·B_0: lr_t = r_t · lr_base(τ_t), τ_{t+1} = τ_t + r_t, until τ reaches T
  (``largebatch.noise_scale.AdaScaleClock``), r_t from the moving averages of |G|² and tr(Σ)
  that the first chunk's gradient and the whole update's give (``NoiseScale``; the same code as
  the runner's ``schedule.adascale``).

Reports the test accuracy of each and the updates each took; the paper's claim is AdaScale within
about 1 point of S = 1 without retuning. Writes ``adascale.{csv,json,png}``.

    python bench/adascale.py [--quick] [--out DIR] [--scales 4 8 16] [--seeds 0 1]
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _common import DEFAULT_OUT, finish_figure, machine_info, print_header, print_table, write_outputs  # noqa: E402
from convergence import DeepPlainCNN, accuracy, make_task  # noqa: E402
from largebatch.noise_scale import AdaScaleClock, NoiseScale  # noqa: E402
from largebatch.schedules import build_schedule  # noqa: E402
from largebatch.torch import GradientNormTap, squared_norm  # noqa: E402

MOMENTUM, WD = 0.9, 5e-4
PRESETS = {"quick": dict(n_train=4096, n_test=2048, noise=1.0, width=8, depth=4, epochs=8, base_batch=64),
           "full": dict(n_train=8192, n_test=4096, noise=1.0, width=8, depth=4, epochs=16, base_batch=64)}


def run(data, cfg, scale, mode, base_lr, warmup_frac, seed):
    """One training run; mode 'base' (S = 1), 'linear' or 'adascale'."""
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = DeepPlainCNN(cfg["width"], cfg["depth"])
    opt = torch.optim.SGD(model.parameters(), lr=base_lr, momentum=MOMENTUM, weight_decay=WD)
    b0 = cfg["base_batch"]
    batch = b0 * scale
    spe = len(xtr) // batch
    base_steps = (len(xtr) // b0) * cfg["epochs"]
    base = build_schedule(peak_lr=base_lr, steps_per_epoch=len(xtr) // b0, epochs=cfg["epochs"], decay="poly",
                          power=2.0)
    if mode == "linear":
        warm = warmup_frac * cfg["epochs"]
        sched = build_schedule(peak_lr=base_lr * scale, steps_per_epoch=spe, epochs=cfg["epochs"], warmup="gradual",
                               warmup_epochs=warm, warmup_start_lr=base_lr, decay="poly", power=2.0)
    clock = AdaScaleClock(scale=scale, base_steps=base_steps, base_batch=b0) if mode == "adascale" else None
    noise = NoiseScale() if mode == "adascale" else None
    tap = GradientNormTap(model.parameters()) if mode == "adascale" else None
    g = torch.Generator().manual_seed(seed + 7)
    updates, gains = 0, []
    limit = base_steps if mode == "base" else spe * cfg["epochs"]

    def finished():
        return clock.done if clock is not None else updates >= limit
    t0 = time.perf_counter()
    while not finished():
        perm = torch.randperm(len(xtr), generator=g)
        for s in range(spe):
            if finished():
                break
            if clock is not None:
                lr = clock.gain(noise) * float(base(min(int(clock.tau), base_steps - 1)))
            else:
                lr = float(base(updates) if mode == "base" else sched(updates))
            for grp in opt.param_groups:
                grp["lr"] = lr
            opt.zero_grad(set_to_none=True)
            idx = perm[s * batch:(s + 1) * batch]
            if tap is not None:
                tap.begin_update()
            for c in idx.split(b0):                   # chunks of the base batch; the loss over the whole batch
                F.cross_entropy(model(xtr[c]), ytr[c], reduction="sum").div(batch).backward()
                if tap is not None:
                    tap.end_pass()
            if noise is not None:                     # the first chunk's gradient against the update's
                noise.update(tap.first_pass() * scale ** 2, squared_norm(model.parameters()), b0, batch)
                gains.append(clock.last_gain)
                clock.advance()
            opt.step()
            updates += 1
    return dict(test_acc=accuracy(model, xte, yte), updates=updates, seconds=round(time.perf_counter() - t0, 1),
                mean_gain=float(np.mean(gains)) if gains else None,
                final_noise_scale=noise.value if noise is not None else None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--scales", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--base-lr", type=float, default=0.05, help="SGD's lr at the base batch [0.05]")
    ap.add_argument("--warmup-frac", type=float, default=0.25, help="linear scaling's warm-up, of the epochs")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    cfg = PRESETS["quick" if a.quick else "full"]
    torch.set_num_threads(a.threads)
    meta = machine_info(**cfg, scales=a.scales, seeds=a.seeds, base_lr=a.base_lr, warmup_frac=a.warmup_frac)
    print_header(meta, "AdaScale vs linear scaling + warm-up, no lr retuning")
    x, y = make_task(cfg["n_train"] + cfg["n_test"], noise=cfg["noise"])
    data = (x[:cfg["n_train"]], y[:cfg["n_train"]], x[cfg["n_train"]:], y[cfg["n_train"]:])
    rows = []
    for seed in a.seeds:
        r = run(data, cfg, 1, "base", a.base_lr, a.warmup_frac, seed)
        rows.append(dict(scale=1, method="S=1 (base)", seed=seed, **r))
        print(f"   S=1: test {r['test_acc']:.4f} in {r['updates']} updates", flush=True)
        for s in a.scales:
            for mode, name in (("linear", "linear + warm-up"), ("adascale", "AdaScale")):
                r = run(data, cfg, s, mode, a.base_lr, a.warmup_frac, seed)
                rows.append(dict(scale=s, method=name, seed=seed, **r))
                print(f"   S={s} {name}: test {r['test_acc']:.4f} in {r['updates']} updates"
                      + (f", mean gain {r['mean_gain']:.2f}" if r["mean_gain"] else ""), flush=True)
    base_acc = float(np.mean([r["test_acc"] for r in rows if r["scale"] == 1]))
    for r in rows:
        r["gap_to_base_points"] = 100 * (r["test_acc"] - base_acc)
    out = Path(a.out)
    csv_path, json_path = write_outputs(out, "adascale", rows, meta)
    plot(rows, out / "adascale.png")
    print()
    print_table(rows, ["scale", "method", "seed", "test_acc", "gap_to_base_points", "updates", "mean_gain", "seconds"],
                {"test_acc": "{:.4f}", "gap_to_base_points": "{:+.2f}", "mean_gain": "{:.2f}"})
    print(f"   wrote {csv_path}, {json_path}, {out / 'adascale.png'}")
    return 0


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, marker in (("linear + warm-up", "s"), ("AdaScale", "o")):
        mine = [r for r in rows if r["method"] == name]
        ax1.plot([r["scale"] for r in mine], [100 * r["test_acc"] for r in mine], marker, label=name)
        ax2.plot([r["scale"] for r in mine], [r["updates"] for r in mine], marker, label=name)
    base = [r for r in rows if r["scale"] == 1]
    ax1.axhline(100 * float(np.mean([r["test_acc"] for r in base])), color="k", ls=":", label="S = 1")
    ax2.axhline(float(np.mean([r["updates"] for r in base])), color="k", ls=":", label="S = 1")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("S = batch / base batch")
    ax1.set_ylabel("test accuracy (%)")
    ax2.set_ylabel("updates")
    ax2.set_yscale("log")
    ax1.set_title("no lr retuning: accuracy")
    ax2.set_title("updates taken")
    finish_figure(fig, (ax1, ax2), path)


if __name__ == "__main__":
    sys.exit(main())
