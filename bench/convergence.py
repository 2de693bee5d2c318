"""Large-batch convergence study: final accuracy vs batch size, SGD + linear scaling + gradual
warmup (Goyal et al. 2017) against LARS (You et al. 2017), LARC and LAMB, at a fixed epoch budget.

Task (generated in-process, no downloads): 10 classes, each a fixed smooth random 3×12×12
"prototype" image; a sample is a random 8×8 crop of its class prototype (shifts of up to ±2
pixels) plus strong Gaussian pixel noise (σ = 2 × the prototype's std), so it is learnable but
not trivial. Student: a plain (BatchNorm-free) 6-conv CNN with He initialisation, defined here
(``DeepPlainCNN``): the no-BN deep net is the setting where the LARS paper says linear-scaled
SGD fails first, and where the layers' weight/gradient norm ratios differ most. Large batches are
emulated in one process by gradient accumulation over chunks (exact for a BN-free net: the
accumulated gradient equals the full-batch gradient up to float rounding).

Protocol: every method gets the same number of learning rates (a factor-2 grid); all grid points
run with the first seed and the lr is picked on a validation split; a best lr on a grid edge
widens the grid by one factor-2 step in that direction (up to ``max_extend`` times, the same rule
for every method); the picked lr is then rerun with the other seeds, and the mean ± std of the
test accuracy is reported, with the gap to the small-batch SGD baseline trained for the same
number of epochs (its lr picked the same way). The methods in ``base_methods`` (full: SGD and
LARS) also run at the base batch, which gives each its own small-batch reference too. CLARS
(``--methods ... clars``) takes its per-example gradient norms from
``largebatch.torch.per_example_norm_sums`` (hook method: about 5× a training pass here).

    python bench/convergence.py [--quick] [--out DIR] [--resume]
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
from torch import nn  # noqa: E402

from _common import DEFAULT_OUT, machine_info, print_header, print_table, write_outputs  # noqa: E402
from largebatch.schedules import build_schedule, scaled_lr  # noqa: E402
from largebatch.torch import CLARS, LAMB, LARS, per_example_norm_sums  # noqa: E402

PRESETS = {
    "quick": dict(n_train=2048, n_val=1024, n_test=1024, noise=1.0, width=8, depth=4, epochs=12,
                  batches=[128, 1024], base_batch=128, methods=["sgd", "lars"], base_methods=["sgd"], large_only=[],
                  grid=2, max_extend=0, seeds=[0], warmup_frac=0.1),
    # 16384 samples × 250 epochs: B=8192 gets 500 steps, B=512 8000 (≈ 4.1 M samples per run)
    "full": dict(n_train=16384, n_val=4096, n_test=8192, noise=2.0, width=16, depth=6, epochs=250,
                 batches=[512, 2048, 8192], base_batch=512, methods=["sgd", "lars", "larc", "lamb", "clars"],
                 base_methods=["sgd", "lars"], large_only=["larc", "lamb", "clars"], grid=4, max_extend=2, seeds=[0, 1, 2],
                 warmup_frac=0.25),
}

# Learning-rate grids, all factor 2 and the same size for every method (``grid`` points, ordered
# from the centre outwards so a smaller ``grid`` keeps the middle):
# - SGD at the base batch: absolute lr.
# - SGD at a large batch: multiples of the linear-scaled lr (Goyal et al. keep ×1; the lower ones
#   let SGD back off below linear scaling).
# - LARS: global lr γ with trust coefficient η = 0.001 (the LARS paper's scale; only γ·η matters).
# - LARC: NVIDIA's clipping variant, η = 0.02 (apex's default) and rate = min(η‖w‖/‖g‖…, γ);
#   γ on the SGD scale, as multiples of the linear-scaled SGD lr.
# - LAMB: absolute lr (the relative per-step change of every layer).
BASE_GRID = [0.1, 0.05, 0.2, 0.025]
SGD_MULTS = [0.5, 0.25, 1.0, 0.125]
LARS_LRS = [20.0, 40.0, 10.0, 80.0]
LARC_MULTS = [0.5, 1.0, 0.25, 2.0]
LAMB_LRS = [0.02, 0.04, 0.01, 0.08]
LARS_ETA, LARC_ETA = 0.001, 0.02
MOMENTUM, WD, LAMB_WD = 0.9, 5e-4, 1e-4
CHUNK = 2048


def make_task(n, hw=8, shift=2, noise=2.0, classes=10, seed=1234):
    """Balanced 10-class images: random crops of smooth class prototypes plus pixel noise."""
    g = torch.Generator().manual_seed(seed)
    size = hw + 2 * shift
    protos = torch.randn(classes, 3, size + 2, size + 2, generator=g)
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :]) / 16.0
    protos = F.conv2d(protos, k.expand(3, 1, 3, 3).contiguous(), groups=3)     # 3x3 binomial blur
    protos = (protos - protos.mean()) / protos.std()
    y = (torch.arange(n) % classes)[torch.randperm(n, generator=g)]
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=g)
    r = torch.arange(hw)
    rows = (dy[:, None] + r)[:, None, :, None]
    cols = (dx[:, None] + r)[:, None, None, :]
    x = protos[y[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
    x = x + noise * torch.randn(x.shape, generator=g)
    x = (x - x.mean()) / x.std()
    return x.contiguous(), y


class DeepPlainCNN(nn.Module):
    """conv3x3/2 → conv3x3/2 → (depth−2) × conv3x3, each + ReLU, no BatchNorm; global average
    pool, linear. He (Kaiming-normal, fan-in) weights, zero biases: trainable without BN at
    small batch, but its layers' ‖w‖/‖∇w‖ ratios differ by orders of magnitude."""

    def __init__(self, width=16, depth=6, classes=10, in_channels=3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, width, 3, 2, 1), nn.ReLU(), nn.Conv2d(width, width, 3, 2, 1), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, 1, 1), nn.ReLU()]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(width, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.fc(self.features(x))


def make_optimizer(method, params, lr):
    # Layer-wise methods adapt and decay every tensor here, biases included (Algorithm 1 of the LARS
    # paper, exclude=False). The library's default adapts them too but does not decay them; the
    # former default (ndim <= 1 not adapted) gave the biases of this BN-free net the raw global lr
    # (10-80 for LARS), which diverges at once (bench/exclusion.py measures the rules).
    if method == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, weight_decay=WD)
    if method == "lars":
        return LARS(params, lr=lr, momentum=MOMENTUM, weight_decay=WD, trust_coefficient=LARS_ETA, exclude=False)
    if method == "larc":
        return LARS(params, lr=lr, momentum=MOMENTUM, weight_decay=WD, trust_coefficient=LARC_ETA, clip=True,
                    exclude=False)
    if method == "lamb":
        return LAMB(params, lr=lr, weight_decay=LAMB_WD, exclude=False)
    if method == "clars":
        return CLARS(params, lr=lr, momentum=MOMENTUM, weight_decay=WD, trust_coefficient=LARS_ETA, exclude=False)
    raise ValueError(method)


def accuracy(model, x, y):
    model.eval()                            # BatchNorm's running statistics, where the model has any
    with torch.no_grad():
        pred = torch.cat([model(c).argmax(1) for c in x.split(4096)])
    model.train()
    return float((pred == y).float().mean())


def train(data, method, batch, lr_peak, cfg, seed, base_lr, model_fn=None, optimizer_fn=None):
    """One run; ``model_fn()`` and ``optimizer_fn(model, lr)`` replace the study's model and
    ``make_optimizer`` (bench/exclusion.py). A param group's ``lr_scale`` multiplies the schedule."""
    xtr, ytr, xva, yva, xte, yte = data
    torch.manual_seed(seed)
    model = model_fn() if model_fn else DeepPlainCNN(cfg["width"], cfg["depth"])
    opt = optimizer_fn(model, lr_peak) if optimizer_fn else make_optimizer(method, model.parameters(), lr_peak)
    steps_per_epoch = len(xtr) // batch
    warm = cfg["warmup_frac"] * cfg["epochs"] if batch > cfg["base_batch"] else 0.0
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
                grp["lr"] = sched(step) * grp.get("lr_scale", 1.0)
            opt.zero_grad(set_to_none=True)
            norm_sums = None
            for c in idx.split(CHUNK):       # gradient accumulation: loss normalised by the global batch
                loss = F.cross_entropy(model(xtr[c]), ytr[c], reduction="sum") / batch
                loss.backward()
                if method == "clars":        # Σ_i ‖∇f_i‖ per layer, summed over the chunks
                    sums, _ = per_example_norm_sums(model, F.cross_entropy, xtr[c], ytr[c])
                    norm_sums = sums if norm_sums is None else {p: norm_sums[p] + v for p, v in sums.items()}
            if method == "clars":
                opt.set_per_example_norms(norm_sums, len(idx))
            opt.step()
            step += 1
        if not math.isfinite(loss.item()):
            diverged = True
            break
    secs = time.perf_counter() - t0
    tr = accuracy(model, xtr[:4096], ytr[:4096])
    va = 0.1 if diverged else accuracy(model, xva, yva)
    te = 0.1 if diverged else accuracy(model, xte, yte)
    return dict(train_acc=tr, val_acc=va, test_acc=te, steps=step, seconds=round(secs, 1), diverged=diverged)


def lr_value(method, batch, cfg, base_lr, k):
    """The grid's lr ``k`` factor-2 steps above its reference point (k may be negative)."""
    if method == "sgd" and batch == cfg["base_batch"]:
        ref = BASE_GRID[0]
    elif method == "sgd":
        ref = scaled_lr(base_lr, batch, cfg["base_batch"], "linear") * SGD_MULTS[0]
    elif method == "larc":
        ref = scaled_lr(base_lr, batch, cfg["base_batch"], "linear") * LARC_MULTS[0]
    else:
        ref = {"lars": LARS_LRS, "clars": LARS_LRS, "lamb": LAMB_LRS}[method][0]
    return ref * 2.0 ** k


def grid_exponents(method, batch, cfg):
    table = {"lars": LARS_LRS, "clars": LARS_LRS, "lamb": LAMB_LRS, "larc": LARC_MULTS,
             "sgd": BASE_GRID if batch == cfg["base_batch"] else SGD_MULTS}[method]
    return sorted(round(math.log2(v / table[0])) for v in table[:cfg["grid"]])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny run (< 60 s) for the smoke test")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output directory (default bench/results)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    p.add_argument("--seeds", type=int, nargs="*", help="override the seeds (the first picks the lr)")
    p.add_argument("--batches", type=int, nargs="*", help="override the batch sizes (the first is the base)")
    p.add_argument("--methods", nargs="*", help="subset of sgd lars larc lamb clars")
    p.add_argument("--base-methods", nargs="*", help="methods also run at the base batch (default: preset's)")
    p.add_argument("--resume", action="store_true",
                   help="reuse finished runs from OUT/convergence_runs.json (same settings) instead of rerunning")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    mode = "quick" if a.quick else "full"
    cfg = dict(PRESETS[mode])
    if a.seeds:
        cfg["seeds"] = a.seeds
    if a.batches:
        cfg["batches"] = a.batches
        cfg["base_batch"] = a.batches[0]
    if a.methods:
        cfg["methods"] = a.methods
    if a.base_methods is not None:
        cfg["base_methods"] = a.base_methods
    meta = machine_info(mode=mode, threads=a.threads, chunk=CHUNK, momentum=MOMENTUM, weight_decay=WD,
                        lamb_weight_decay=LAMB_WD, lars_eta=LARS_ETA, larc_eta=LARC_ETA,
                        base_grid=sorted(BASE_GRID[:cfg["grid"]]), sgd_mults=sorted(SGD_MULTS[:cfg["grid"]]),
                        lars_lrs=sorted(LARS_LRS[:cfg["grid"]]), larc_mults=sorted(LARC_MULTS[:cfg["grid"]]),
                        lamb_lrs=sorted(LAMB_LRS[:cfg["grid"]]), schedule="gradual warmup (large batches) + poly-2",
                        model=f"DeepPlainCNN(width={cfg['width']}, depth={cfg['depth']}), no BN, He init", **cfg)
    print_header(meta, "convergence: final accuracy vs global batch size")
    n = cfg["n_train"] + cfg["n_val"] + cfg["n_test"]
    x, y = make_task(n, noise=cfg["noise"])
    a1, a2 = cfg["n_train"], cfg["n_train"] + cfg["n_val"]
    data = (x[:a1], y[:a1], x[a1:a2], y[a1:a2], x[a2:], y[a2:])
    nparams = sum(q.numel() for q in DeepPlainCNN(cfg["width"], cfg["depth"]).parameters())
    print(f"   task: {n} samples 3x8x8 ({a1} train / {cfg['n_val']} val / {cfg['n_test']} test), "
          f"model {nparams} parameters", flush=True)
    t_all = time.perf_counter()
    out = Path(a.out)
    done = {}
    if a.resume and (out / "convergence_runs.json").exists():
        for r in json.loads((out / "convergence_runs.json").read_text())["rows"]:
            done[(r["method"], r["batch"], round(r["lr"], 10), r["seed"])] = r
    runs = []

    def run(method, batch, lr, seed, base_lr):
        key = (method, batch, round(lr, 10), seed)
        for r in runs:
            if (r["method"], r["batch"], round(r["lr"], 10), r["seed"]) == key:
                return r
        if key in done:
            r = done[key]
        else:
            r = train(data, method, batch, lr, cfg, seed, base_lr)
            r.update(method=method, batch=batch, lr=lr, seed=seed)
        runs.append(r)
        write_outputs(out, "convergence_runs", runs, meta)           # progress survives a kill
        print(f"   {method:5s} B={batch:5d} lr={lr:<8.4g} seed={seed} steps={r['steps']:5d} train={r['train_acc']:.3f} "
              f"val={r['val_acc']:.3f} test={r['test_acc']:.3f} ({r['seconds']:.1f}s, "
              f"{time.perf_counter() - t_all:.0f}s total)", flush=True)
        return r

    summary = []
    base_lr = BASE_GRID[0]
    largest = max(cfg["batches"])
    order = [cfg["base_batch"]] + sorted((b for b in cfg["batches"] if b != cfg["base_batch"]), reverse=True)
    for batch in order:
        for method in cfg["methods"]:
            if batch == cfg["base_batch"] and method not in cfg["base_methods"]:
                continue
            if method in cfg["large_only"] and batch != largest:
                continue
            sel_seed = cfg["seeds"][0]
            exps = grid_exponents(method, batch, cfg)
            res = {k: run(method, batch, lr_value(method, batch, cfg, base_lr, k), sel_seed, base_lr) for k in exps}
            extended = 0
            while extended < cfg["max_extend"]:
                best_k = max(res, key=lambda k: (res[k]["val_acc"], -abs(k)))
                if best_k not in (min(res), max(res)):
                    break
                k = best_k + (1 if best_k == max(res) else -1)
                res[k] = run(method, batch, lr_value(method, batch, cfg, base_lr, k), sel_seed, base_lr)
                extended += 1
            best_k = max(res, key=lambda k: (res[k]["val_acc"], -abs(k)))
            lr = lr_value(method, batch, cfg, base_lr, best_k)
            rs = [res[best_k]] + [run(method, batch, lr, s, base_lr) for s in cfg["seeds"][1:]]
            te = [r["test_acc"] for r in rs]
            summary.append(dict(method=method, batch=batch, steps=rs[0]["steps"], best_lr=lr,
                                lr_vs_linear=(lr / scaled_lr(base_lr, batch, cfg["base_batch"], "linear")
                                              if method in ("sgd", "larc") else None),
                                grid=" ".join(f"{lr_value(method, batch, cfg, base_lr, k):.4g}" for k in sorted(res)),
                                grid_val=" ".join(f"{res[k]['val_acc']:.3f}" for k in sorted(res)),
                                lr_at_grid_edge=len(res) > 1 and best_k in (min(res), max(res)),
                                test_acc_mean=float(np.mean(te)), test_acc_std=float(np.std(te)), seeds=len(te),
                                seconds_mean=float(np.mean([r["seconds"] for r in rs]))))
            if method == "sgd" and batch == cfg["base_batch"]:
                base_lr = lr
    base = [s for s in summary if s["method"] == "sgd" and s["batch"] == cfg["base_batch"]]
    for s in summary:
        s["gap_pts"] = (100 * (base[0]["test_acc_mean"] - s["test_acc_mean"])) if base else None
        own = [o for o in summary if o["method"] == s["method"] and o["batch"] == cfg["base_batch"]]
        s["gap_own_small_pts"] = (100 * (own[0]["test_acc_mean"] - s["test_acc_mean"])) if own else None
    meta["total_seconds"] = round(time.perf_counter() - t_all, 1)
    write_outputs(out, "convergence_runs", runs, meta)
    csv_path, json_path = write_outputs(out, "convergence", summary, meta)
    plot(summary, cfg, out / "convergence.png")
    print(f"\n   best lr per method and batch (picked on validation with seed {cfg['seeds'][0]}), test accuracy "
          f"mean/std over {len(cfg['seeds'])} seed(s), gap to SGD B={cfg['base_batch']} (points):")
    print_table(summary, ["method", "batch", "steps", "best_lr", "lr_at_grid_edge", "test_acc_mean",
                          "test_acc_std", "gap_pts", "gap_own_small_pts"],
                {"best_lr": "{:.4g}", "test_acc_mean": "{:.4f}", "test_acc_std": "{:.4f}", "gap_pts": "{:+.2f}",
                 "gap_own_small_pts": "{:+.2f}"})
    print("   (gap_own_small_pts: to the same method at the base batch, where it was run)")
    edge = [f"{s['method']} B={s['batch']}" for s in summary if s["lr_at_grid_edge"]]
    if edge:
        print(f"   WARNING: best lr on a grid edge (after widening) for {', '.join(edge)}")
    print(f"   wrote {csv_path}, {json_path}, {out / 'convergence.png'}  ({meta['total_seconds']} s)")
    return 0


def plot(summary, cfg, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    base = [r for r in summary if r["batch"] == cfg["base_batch"] and r["method"] == "sgd"]
    for i, m in enumerate(cfg["methods"]):
        pts = sorted((r["batch"], r["test_acc_mean"], r["test_acc_std"]) for r in summary if r["method"] == m)
        if base and not any(r["method"] == m and r["batch"] == cfg["base_batch"] for r in summary):
            pts = [(cfg["base_batch"], base[0]["test_acc_mean"], base[0]["test_acc_std"])] + pts
        if pts:
            b, acc, sd = zip(*pts)
            ax.errorbar([v * (1 + 0.03 * (i - 1.5)) for v in b], [100 * v for v in acc], yerr=[100 * v for v in sd],
                        marker="o", capsize=3, label=m.upper() + (" + linear scaling + warmup" if m == "sgd" else ""))
    if base:
        ax.axhline(100 * base[0]["test_acc_mean"], ls="--", c="gray", lw=1, label=f"SGD B={cfg['base_batch']}")
        ax.axhline(100 * base[0]["test_acc_mean"] - 1, ls=":", c="gray", lw=1, label="baseline − 1 point")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch size")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title(f"{cfg['epochs']} epochs of {cfg['n_train']} samples, plain {cfg['depth']}-conv CNN, no BN",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
