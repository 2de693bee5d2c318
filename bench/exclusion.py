"""Which tensors should LARS leave unadapted? The exclusion rules measured on a BatchNorm-free
and a BatchNorm network at B=8192 (issue "LARS that trains on the first try").

The task, budget, schedule and lr protocol are bench/convergence.py's full preset (16384 train
samples, 250 epochs, so B=8192 makes 500 steps; 25 % gradual warm-up then poly-2; LARS η = 0.001,
momentum 0.9, weight decay 5e-4; γ from the factor-2 grid {10, 20, 40, 80}, widened at an edge,
picked on validation with the first seed, then rerun with the others). The rules:

- ``ndim``: the former default — tensors with ndim <= 1 (biases, BN scale/shift) are neither
  adapted nor decayed and step at the raw global rate γ (the timm / optax / MLPerf convention).
- ``none``: every tensor adapted and decayed (``exclude=False``, Algorithm 1 as written).
- ``norm``: only normalisation layers' parameters unadapted (found from the model's layer
  types); biases of conv/linear layers adapted; ndim <= 1 not decayed.
- ``adapt``: every tensor adapted; ndim <= 1 not decayed (no model knowledge needed).
- ``eta``: as ``ndim``, but the unadapted tensors step at γ·η (the global rate in the same units
  as the adapted ones' γ·η·‖w‖/‖g‖) instead of γ.
- ``default``: whatever ``LARS(param_groups(model), ...)`` does with no ``exclude`` argument.

    python bench/exclusion.py [--nets plain bn] [--rules ndim none norm adapt eta default] [--seeds 0 1 2]
    python bench/exclusion.py --merge OUT/exclusion_*.json     # one table and exclusion.png from several runs
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import convergence as conv  # noqa: E402
from _common import DEFAULT_OUT, machine_info, print_header, print_table, write_outputs  # noqa: E402
from largebatch.torch import LARS, param_groups  # noqa: E402
from largebatch.torch.groups import normalization_parameters  # noqa: E402


class DeepBNCNN(nn.Module):
    """DeepPlainCNN's layers with BatchNorm after every conv (convs without bias, as in ResNets)."""

    def __init__(self, width=16, depth=6, classes=10, in_channels=3):
        super().__init__()
        layers, c = [], in_channels
        for i in range(depth):
            layers += [nn.Conv2d(c, width, 3, 2 if i < 2 else 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            c = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(width, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x):
        return self.fc(self.features(x))


NETS = {"plain": conv.DeepPlainCNN, "bn": DeepBNCNN}


def make_lars(rule, model, lr):
    options = dict(lr=lr, momentum=conv.MOMENTUM, weight_decay=conv.WD, trust_coefficient=conv.LARS_ETA)
    if rule == "default":
        return LARS(param_groups(model), **options)
    if rule == "ndim":
        return LARS(param_groups(model, exclude=lambda name, shape: len(shape) <= 1), **options)
    if rule == "none":
        return LARS(param_groups(model, exclude=False), **options)
    if rule == "norm":
        norms = normalization_parameters(model)
        return LARS(param_groups(model, exclude={"adaptation": lambda name, shape: name in norms, "decay": None}),
                    **options)
    if rule == "adapt":
        return LARS(param_groups(model, exclude={"adaptation": False, "decay": lambda name, shape: len(shape) <= 1}),
                    **options)
    if rule == "eta":
        named = list(model.named_parameters())
        return LARS([dict(params=[p for _, p in named if p.ndim > 1], exclude=False),
                     dict(params=[p for _, p in named if p.ndim <= 1], exclude=True, lr_scale=conv.LARS_ETA)],
                    **options)
    raise ValueError(f"rule: expected one of ndim, none, norm, adapt, eta, default, got {rule!r}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nets", nargs="*", default=list(NETS))
    p.add_argument("--rules", nargs="*", default=["ndim", "none", "norm", "eta"])
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--lrs", type=float, nargs="*", help="fixed γ values (no widening); default: the grid protocol")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--tag", default="", help="suffix of the output files")
    p.add_argument("--merge", nargs="*", metavar="JSON", help="summaries of earlier runs: print one table and plot")
    a = p.parse_args(argv)
    if a.merge:
        summary = [row for path in a.merge for row in json.loads(Path(path).read_text())["rows"]]
        report(summary, Path(a.out))
        return 0
    torch.set_num_threads(1)
    cfg = dict(conv.PRESETS["full"])
    meta = machine_info(batch=a.batch, nets=a.nets, rules=a.rules, seeds=a.seeds, epochs=cfg["epochs"],
                        n_train=cfg["n_train"], eta=conv.LARS_ETA, weight_decay=conv.WD, momentum=conv.MOMENTUM)
    print_header(meta, "LARS exclusion rules: test accuracy at B=%d" % a.batch)
    n = cfg["n_train"] + cfg["n_val"] + cfg["n_test"]
    x, y = conv.make_task(n, noise=cfg["noise"])
    a1, a2 = cfg["n_train"], cfg["n_train"] + cfg["n_val"]
    data = (x[:a1], y[:a1], x[a1:a2], y[a1:a2], x[a2:], y[a2:])
    out, runs, summary, t0 = Path(a.out), [], [], time.perf_counter()
    tag = f"_{a.tag}" if a.tag else ""

    def run(net, rule, lr, seed):
        r = conv.train(data, "lars", a.batch, lr, cfg, seed, conv.BASE_GRID[0],
                       model_fn=lambda: NETS[net](cfg["width"], cfg["depth"]),
                       optimizer_fn=lambda model, peak: make_lars(rule, model, peak))
        r.update(net=net, rule=rule, lr=lr, seed=seed)
        runs.append(r)
        write_outputs(out, f"exclusion_runs{tag}", runs, meta)
        print(f"   {net:5s} {rule:7s} γ={lr:<5g} seed={seed} val={r['val_acc']:.3f} test={r['test_acc']:.3f} "
              f"({r['seconds']:.0f}s, {time.perf_counter() - t0:.0f}s total)", flush=True)
        return r

    for net in a.nets:
        for rule in a.rules:
            if a.lrs:
                grid = {k: run(net, rule, lr, a.seeds[0]) for k, lr in enumerate(a.lrs)}
                pick = max(grid, key=lambda k: grid[k]["val_acc"])
                lr = a.lrs[pick]
            else:
                exps = conv.grid_exponents("lars", a.batch, cfg)
                grid = {k: run(net, rule, conv.lr_value("lars", a.batch, cfg, 0, k), a.seeds[0]) for k in exps}
                for _ in range(cfg["max_extend"]):
                    pick = max(grid, key=lambda k: (grid[k]["val_acc"], -abs(k)))
                    if pick not in (min(grid), max(grid)):
                        break
                    k = pick + (1 if pick == max(grid) else -1)
                    grid[k] = run(net, rule, conv.lr_value("lars", a.batch, cfg, 0, k), a.seeds[0])
                pick = max(grid, key=lambda k: (grid[k]["val_acc"], -abs(k)))
                lr = conv.lr_value("lars", a.batch, cfg, 0, pick)
            rs = [grid[pick]] + [run(net, rule, lr, s) for s in a.seeds[1:]]
            te = [100 * r["test_acc"] for r in rs]
            summary.append(dict(net=net, rule=rule, best_lr=lr, seeds=len(te), test_acc_mean=float(np.mean(te)),
                                test_acc_std=float(np.std(te)), test_accs=" ".join(f"{v:.1f}" for v in te),
                                grid_val=" ".join(f"{grid[k]['val_acc']:.3f}" for k in sorted(grid))))
            write_outputs(out, f"exclusion{tag}", summary, meta)
    report(summary, out)
    return 0


RULE_LABELS = {"ndim": "biases, BN not adapted (former default, MLPERF)", "none": "exclude=False (Algorithm 1)",
               "norm": "only norm layers not adapted", "adapt": "all adapted, ndim<=1 not decayed",
               "eta": "not adapted at γ·η (rate 'trust')", "default": "the default (no exclude argument)"}


def report(summary, out):
    """The table, and exclusion.png: test accuracy (mean ± std over seeds) per rule and network."""
    print_table(summary, ["net", "rule", "best_lr", "test_acc_mean", "test_acc_std", "test_accs", "grid_val"],
                {"best_lr": "{:g}", "test_acc_mean": "{:.2f}", "test_acc_std": "{:.2f}"})
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    nets = list(dict.fromkeys(r["net"] for r in summary))
    rules = list(dict.fromkeys(r["rule"] for r in summary))
    accs = [r["test_acc_mean"] for r in summary]
    fig, axes = plt.subplots(1, len(nets), figsize=(4.0 + 3.4 * len(nets), 0.5 * len(rules) + 1.6), squeeze=False,
                             sharey=True)
    for i, (ax, net) in enumerate(zip(axes[0], nets)):
        rows = {r["rule"]: r for r in summary if r["net"] == net}
        ys = [k for k, rule in enumerate(rules) if rule in rows]
        ax.barh(ys, [rows[rules[k]]["test_acc_mean"] for k in ys], xerr=[rows[rules[k]]["test_acc_std"] for k in ys],
                color="tab:blue", alpha=0.7, capsize=3)
        for k in ys:
            ax.text(rows[rules[k]]["test_acc_mean"] + rows[rules[k]]["test_acc_std"] + 0.25, k, f"γ={rows[rules[k]]['best_lr']:g}", va="center",
                    fontsize=7)
        if i == 0:
            ax.set_yticks(range(len(rules)), [RULE_LABELS.get(r, r) for r in rules], fontsize=7)
            ax.invert_yaxis()
        ax.set_xlim(min(accs) - 2, max(accs) + 3)
        ax.set_xlabel("test accuracy (%), mean ± std over seeds", fontsize=8)
        ax.set_title({"plain": "no BatchNorm", "bn": "with BatchNorm"}.get(net, net), fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("LARS at B=8192 (500 steps): which tensors are adapted", fontsize=10)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "exclusion.png", dpi=110)
    plt.close(fig)
    print(f"   wrote {out / 'exclusion.png'}")


if __name__ == "__main__":
    sys.exit(main())
