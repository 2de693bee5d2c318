"""Large-batch convergence study: final accuracy vs batch size, SGD + linear scaling + gradual
warmup (Goyal et al. 2017) against LARS (You et al. 2017), LARC and LAMB, at a fixed epoch budget.

Task (generated in-process, no downloads): 3×HW×HW low-pass-filtered Gaussian noise labelled by a
fixed random teacher CNN (10 balanced classes); student: ``largebatch.torch.models.SmallCNN``
without BatchNorm (the setting where the LARS paper says plain SGD fails first). Large batches are
emulated in one process by gradient accumulation over chunks (exact for a BN-free net: the
accumulated gradient equals the full-batch gradient up to float rounding).

Every method gets the same number of learning rates; the best lr is picked on a validation split
and the test accuracy of that run is reported, with the gap to the small-batch SGD baseline
trained for the same number of epochs.

    python bench/convergence.py [--quick] [--out DIR]
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _common import DEFAULT_OUT, machine_info, print_header, print_table, write_outputs  # noqa: E402
from largebatch.schedules import build_schedule, scaled_lr  # noqa: E402
from largebatch.torch import LAMB, LARS  # noqa: E402
from largebatch.torch.models import SmallCNN  # noqa: E402

PRESETS = {
    # n_train, epochs, batch sizes, base batch, seeds
    "quick": dict(n_train=4096, n_val=1024, n_test=2048, hw=8, width=8, epochs=6, batches=[128, 1024],
                  base_batch=128, methods=["sgd", "lars"], grid=2, seeds=[0], warmup_epochs=1.0),
    "full": dict(n_train=8192, n_val=2048, n_test=4096, hw=8, width=8, epochs=60, batches=[512, 8192],
                 base_batch=512, methods=["sgd", "lars"], grid=4, seeds=[0], warmup_epochs=10.0),
}

# lr grids (same size for every method). SGD: multiples of the linear-scaled baseline lr (1, 1/2,
# 1/4 ...; Goyal et al. keep ×1, the others let SGD back off). LARS/LARC: global lr γ with η = 0.001.
# LAMB: absolute lr.
BASE_LR = 0.05          # default small-batch SGD lr; the base-batch grid below picks the one actually scaled
SGD_MULTS = [1.0, 0.5, 0.25, 0.125]
LARS_LRS = [20.0, 5.0, 80.0, 320.0]
LARC_LRS = [2.0, 0.5, 8.0, 32.0]
LAMB_LRS = [0.02, 0.005, 0.08, 0.32]
BASE_GRID = [0.05, 0.1, 0.025]
CHUNK = 2048


def make_task(n, hw, seed=1234):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, hw + 2, hw + 2, generator=g)
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :]) / 16.0
    x = F.conv2d(x, k.expand(3, 1, 3, 3).contiguous(), groups=3)         # blur: 3x3 binomial
    x = (x - x.mean()) / x.std()
    torch.manual_seed(seed + 1)
    teacher = SmallCNN(10, 3, 16, batchnorm=False)
    with torch.no_grad():
        logits = torch.cat([teacher(c) for c in x.split(4096)])
        logits = (logits - logits.mean(0)) / logits.std(0)              # balance the classes
    return x.contiguous(), logits.argmax(1)


def make_optimizer(method, params, lr):
    # Layer-wise methods adapt every tensor here, biases included (Algorithm 1 of the LARS paper):
    # with the library's default exclusion (ndim <= 1) the biases of this BN-free net would take
    # the raw global lr (20-80 for LARS), which diverges at once.
    if method == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    if method == "lars":
        return LARS(params, lr=lr, momentum=0.9, weight_decay=5e-4, trust_coefficient=0.001, exclude=False)
    if method == "larc":
        return LARS(params, lr=lr, momentum=0.9, weight_decay=5e-4, trust_coefficient=0.001, clip=True,
                    exclude=False)
    if method == "lamb":
        return LAMB(params, lr=lr, weight_decay=1e-4, exclude=False)
    raise ValueError(method)


def accuracy(model, x, y):
    with torch.no_grad():
        pred = torch.cat([model(c).argmax(1) for c in x.split(4096)])
    return float((pred == y).float().mean())


def train(data, method, batch, lr_peak, cfg, seed, base_lr):
    xtr, ytr, xva, yva, xte, yte = data
    torch.manual_seed(seed)
    model = SmallCNN(10, 3, cfg["width"], batchnorm=False)
    opt = make_optimizer(method, model.parameters(), lr_peak)
    steps_per_epoch = len(xtr) // batch
    warm = cfg["warmup_epochs"] if batch > cfg["base_batch"] else 0.0
    sched = build_schedule(peak_lr=lr_peak, steps_per_epoch=steps_per_epoch, epochs=cfg["epochs"],
                           warmup="gradual" if warm else "none", warmup_epochs=warm,
                           warmup_start_lr=(base_lr if method == "sgd" else None),
                           decay="poly", power=2.0)
    g = torch.Generator().manual_seed(seed + 7)
    step, diverged = 0, False
    t0 = time.perf_counter()
    for _ in range(cfg["epochs"]):
        perm = torch.randperm(len(xtr), generator=g)
        for s in range(steps_per_epoch):
            idx = perm[s * batch:(s + 1) * batch]
            for grp in opt.param_groups:
                grp["lr"] = sched(step)
            opt.zero_grad(set_to_none=True)
            for c in idx.split(CHUNK):       # gradient accumulation: loss normalised by the global batch
                loss = F.cross_entropy(model(xtr[c]), ytr[c], reduction="sum") / batch
                loss.backward()
            opt.step()
            step += 1
        if not math.isfinite(loss.item()):
            diverged = True
            break
    secs = time.perf_counter() - t0
    va = 0.1 if diverged else accuracy(model, xva, yva)
    te = 0.1 if diverged else accuracy(model, xte, yte)
    return dict(val_acc=va, test_acc=te, steps=step, seconds=secs, diverged=diverged)


def lr_grid(method, batch, cfg, base_lr):
    n = cfg["grid"]
    if method == "sgd":
        if batch == cfg["base_batch"]:
            return BASE_GRID[:n]
        return [scaled_lr(base_lr, batch, cfg["base_batch"], "linear") * m for m in SGD_MULTS[:n]]
    return {"lars": LARS_LRS, "larc": LARC_LRS, "lamb": LAMB_LRS}[method][:n]


def plot(summary, cfg, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in cfg["methods"]:
        pts = sorted((r["batch"], r["test_acc_mean"], r["test_acc_std"]) for r in summary if r["method"] == m)
        if pts:
            b, a, s = zip(*pts)
            ax.errorbar(b, [100 * v for v in a], yerr=[100 * v for v in s], marker="o", capsize=3, label=m.upper())
    base = [r for r in summary if r["batch"] == cfg["base_batch"] and r["method"] == "sgd"]
    if base:
        ax.axhline(100 * base[0]["test_acc_mean"], ls="--", c="gray", lw=1, label=f"SGD B={cfg['base_batch']}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch size")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{cfg['epochs']} epochs of {cfg['n_train']} samples, SmallCNN no-BN")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny run (< 60 s) for the smoke test")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output directory (default bench/results)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="*", help="override the seeds")
    p.add_argument("--batches", type=int, nargs="*", help="override the batch sizes")
    p.add_argument("--methods", nargs="*", help="subset of sgd lars larc lamb")
    p.add_argument("--resume", action="store_true",
                   help="reuse finished runs from OUT/convergence_runs.json (same settings) instead of rerunning")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = dict(PRESETS["quick" if a.quick else "full"])
    if a.seeds:
        cfg["seeds"] = a.seeds
    if a.batches:
        cfg["batches"] = a.batches
    if a.methods:
        cfg["methods"] = a.methods
    meta = machine_info(mode="quick" if a.quick else "full", threads=a.threads, chunk=CHUNK, base_lr=BASE_LR,
                        sgd_mults=SGD_MULTS[:cfg["grid"]], lars_lrs=LARS_LRS[:cfg["grid"]],
                        larc_lrs=LARC_LRS[:cfg["grid"]], lamb_lrs=LAMB_LRS[:cfg["grid"]], **cfg)
    print_header(meta, "convergence: final accuracy vs global batch size")
    n = cfg["n_train"] + cfg["n_val"] + cfg["n_test"]
    x, y = make_task(n, cfg["hw"])
    a1, a2 = cfg["n_train"], cfg["n_train"] + cfg["n_val"]
    data = (x[:a1], y[:a1], x[a1:a2], y[a1:a2], x[a2:], y[a2:])
    print(f"   task: {n} samples 3x{cfg['hw']}x{cfg['hw']}, class share max "
          f"{float(torch.bincount(y).max()) / n:.3f}")
    t_all = time.perf_counter()
    runs = []
    out = Path(a.out)
    done = {}
    if a.resume and (out / "convergence_runs.json").exists():
        for r in json.loads((out / "convergence_runs.json").read_text())["rows"]:
            done[(r["method"], r["batch"], round(r["lr"], 10), r["seed"])] = r
    # baseline lr grid at the base batch picks the small-batch lr that linear scaling starts from
    base_lr = BASE_LR
    for method in cfg["methods"]:
        for batch in cfg["batches"]:
            if batch == cfg["base_batch"] and method != "sgd":
                continue
            for lr in lr_grid(method, batch, cfg, base_lr):
                for seed in cfg["seeds"]:
                    key = (method, batch, round(lr, 10), seed)
                    if key in done:
                        r = done[key]
                    else:
                        r = train(data, method, batch, lr, cfg, seed, base_lr)
                        r.update(method=method, batch=batch, lr=lr, seed=seed)
                    runs.append(r)
                    write_outputs(out, "convergence_runs", runs, meta)      # progress survives a kill
                    print(f"   {method:5s} B={batch:5d} lr={lr:<8.4g} seed={seed} steps={r['steps']:5d} "
                          f"val={r['val_acc']:.3f} test={r['test_acc']:.3f} ({r['seconds']:.1f}s)", flush=True)
            if method == "sgd" and batch == cfg["base_batch"]:
                best = max((r for r in runs if r["method"] == "sgd" and r["batch"] == batch),
                           key=lambda r: r["val_acc"])
                base_lr = best["lr"]
    # summary: best lr per (method, batch) by mean validation accuracy over seeds
    summary = []
    for method in cfg["methods"]:
        for batch in cfg["batches"]:
            cand = {}
            for r in runs:
                if r["method"] == method and r["batch"] == batch:
                    cand.setdefault(r["lr"], []).append(r)
            if not cand:
                continue
            lr, rs = max(cand.items(), key=lambda kv: np.mean([r["val_acc"] for r in kv[1]]))
            te = [r["test_acc"] for r in rs]
            lrs = sorted(cand)
            summary.append(dict(method=method, batch=batch, steps=rs[0]["steps"], best_lr=lr,
                                lr_at_grid_edge=lr in (lrs[0], lrs[-1]) and len(lrs) > 1,
                                test_acc_mean=float(np.mean(te)), test_acc_std=float(np.std(te)), seeds=len(te)))
    base = [s for s in summary if s["method"] == "sgd" and s["batch"] == cfg["base_batch"]]
    for s in summary:
        s["gap_pts"] = (100 * (base[0]["test_acc_mean"] - s["test_acc_mean"])) if base else None
    meta["total_seconds"] = round(time.perf_counter() - t_all, 1)
    write_outputs(out, "convergence_runs", runs, meta)
    csv_path, json_path = write_outputs(out, "convergence", summary, meta)
    plot(summary, cfg, out / "convergence.png")
    print(f"\n   best lr per method and batch (picked on validation), test accuracy, gap to SGD "
          f"B={cfg['base_batch']} (points):")
    print_table(summary, ["method", "batch", "steps", "best_lr", "lr_at_grid_edge", "test_acc_mean",
                          "test_acc_std", "gap_pts"],
                {"best_lr": "{:.4g}", "test_acc_mean": "{:.4f}", "test_acc_std": "{:.4f}", "gap_pts": "{:+.2f}"})
    print(f"   wrote {csv_path}, {json_path}, {out / 'convergence.png'}  ({meta['total_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
