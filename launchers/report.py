"""``largebatch report RUN_DIR [RUN_DIR ...] [--out DIR] [--x step|epoch] [--no-plots]``: pictures and a
one-screen summary of finished (or running) runs.

For each run directory (its format: :mod:`largebatch.rundir`) it reads ``metrics.csv``,
``trust_ratios.csv`` (if any), ``summary.json`` (if the run finished) and ``config.yaml``, and
writes PNGs:

    loss.png             train loss (lines) and eval loss (dots) against step
    accuracy.png         eval accuracy (and train accuracy, if recorded) against step
    lr.png               the learning rate against step
    images_per_sec.png   throughput against step, with the steady mean from summary.json
    trust_ratios.png     each layer's trust ratio (layer lr / global lr) against step, log y,
                         coloured from the input layer to the output layer, next to the last
                         logged ratio of every layer (several runs: trust_ratios-<run>.png each)
    noise_scale.png      the gradient noise scale B_simple against step (log y), with each run's
                         global batch dotted, beside the train loss it grew with

Several runs (a batch-size sweep, say) are overlaid in one figure per metric, with a legend
of run name and global batch. Output: ``RUN_DIR/report/`` for one run, else ``--out`` (default
``./report-<YYYYmmdd-HHMMSS>``). The summary goes to stdout.

Bad input (not a run directory, no or empty metrics.csv, malformed files) is exit 2 with one
line per problem naming the path and what was expected; nothing is written then.

It sits beside the CLI, above the core (matplotlib is a plotting dependency, not a core one):
numpy and matplotlib (Agg, no pyplot) are imported only when plotting.
"""
import argparse
import csv
import importlib.util
import json
import math
import os
import sys
import time

from largebatch import rundir

__all__ = ["main", "load_run", "summary_text", "write_plots", "Run", "ReportError"]

NUMERIC = tuple(f for f in rundir.METRIC_FIELDS if f not in ("kind", "step"))
LEGEND_LAYERS = 12          # up to this many layers: a legend of layer names; more: colour only


class ReportError(Exception):
    """One line: the path and what was expected."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        sys.stderr.write(f"{self.prog}: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


class Run:
    """One run directory's contents."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        self.summary = {}
        self.config = {}
        self.train = []           # rows (dicts) sorted by step; a resumed run's later rows win
        self.eval = []
        self.trust = {}           # layer -> [(step, ratio)], layers in model order
        self.name = os.path.basename(self.path)
        self.label = self.name

    # what the summary says, else the config, else the metrics
    def get(self, key):
        if self.summary.get(key) is not None:
            return self.summary[key]
        cfg, derived = self.config, self.config.get("derived") or {}
        fallback = {
            "framework": cfg.get("framework"),
            "model": (cfg.get("model") or {}).get("name"),
            "optimizer": (cfg.get("optimizer") or {}).get("name"),
            "global_batch": derived.get("global_batch"),
            "ranks": derived.get("np"),
            "total_steps": derived.get("total_steps"),
            "steps_done": self.train[-1]["step"] if self.train else None,
            "final_train_loss": _last(self.train, "loss"),
            "final_eval_loss": _last(self.eval, "loss"),
            "final_eval_accuracy": _last(self.eval, "accuracy"),
            "wall_time_s": _last(self.train + self.eval, "elapsed_s"),
        }
        return fallback.get(key)

    @property
    def status(self):
        if not self.summary:
            return "no summary.json (still running, or ended without one)"
        status = self.summary.get("status") or "?"
        if self.summary.get("stopped_by"):
            status += f" by {self.summary['stopped_by']}"
        return status

    @property
    def short_status(self):
        return (self.summary.get("status") or "?") if self.summary else "running?"


def _last(rows, key):
    for row in reversed(rows):
        if row.get(key) is not None:
            return row[key]
    return None


def _number(text, where, column):
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise ReportError(f"{where}: expected a number in column '{column}', got {text!r}") from None
    return value if math.isfinite(value) else None


def _read_csv(path):
    """(header, rows as lists) of a CSV file; ReportError if it is empty."""
    try:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
    except UnicodeDecodeError:
        raise ReportError(f"{path}: not a text CSV file (expected one written by largebatch run)") from None
    except OSError as err:
        raise ReportError(f"{path}: cannot be read ({err.strerror or err})") from None
    rows = [r for r in rows if r]
    if not rows:
        raise ReportError(f"{path}: empty file (expected a header line and metric rows)")
    return rows[0], rows[1:]


def _read_metrics(run, path):
    header, rows = _read_csv(path)
    missing = [c for c in ("kind", "step", "loss") if c not in header]
    if missing:
        raise ReportError(f"{path}: expected the header {','.join(rundir.METRIC_FIELDS)}, got {','.join(header)}")
    col = {name: i for i, name in enumerate(header)}
    by_kind = {"train": {}, "eval": {}}
    for n, cells in enumerate(rows, start=2):
        where = f"{path}: line {n}"
        if len(cells) != len(header):
            raise ReportError(f"{where}: expected {len(header)} comma-separated values, got {len(cells)}")
        kind = cells[col["kind"]]
        if kind not in by_kind:
            continue
        step = _number(cells[col["step"]], where, "step")
        if step is None:
            raise ReportError(f"{where}: expected a step number, got {cells[col['step']]!r}")
        row = {"step": int(step)}
        for name in NUMERIC:
            if name in col:
                row[name] = _number(cells[col[name]], where, name)
        by_kind[kind][row["step"]] = row          # a resumed run repeats steps: the later row wins
    if not by_kind["train"] and not by_kind["eval"]:
        raise ReportError(f"{path}: no train or eval rows yet (expected at least one; has the run "
                          f"logged its first train.log_every steps?)")
    run.train = [by_kind["train"][s] for s in sorted(by_kind["train"])]
    run.eval = [by_kind["eval"][s] for s in sorted(by_kind["eval"])]


def _read_trust(run, path):
    header, rows = _read_csv(path)
    if tuple(header[:3]) != rundir.TRUST_FIELDS:
        raise ReportError(f"{path}: expected the header {','.join(rundir.TRUST_FIELDS)}, got {','.join(header)}")
    trust = {}
    for n, cells in enumerate(rows, start=2):
        where = f"{path}: line {n}"
        if len(cells) < 3:
            raise ReportError(f"{where}: expected {','.join(rundir.TRUST_FIELDS)}, got {','.join(cells)}")
        step = _number(cells[0], where, "step")
        if step is None:
            raise ReportError(f"{where}: expected a step number, got {cells[0]!r}")
        value = _number(cells[2], where, "trust_ratio")
        trust.setdefault(cells[1], {})[int(step)] = value
    run.trust = {layer: sorted(points.items()) for layer, points in trust.items()}


def load_run(path):
    """A :class:`Run` from a run directory; ReportError (one line) if it is not one."""
    if not os.path.exists(path):
        raise ReportError(f"{path}: no such folder (expected a run directory with metrics.csv, e.g. runs/NAME)")
    if not os.path.isdir(path):
        raise ReportError(f"{path}: not a folder (expected a run directory with metrics.csv, e.g. runs/NAME)")
    run = Run(path)
    metrics = os.path.join(path, rundir.METRICS)
    if not os.path.isfile(metrics):
        ended = rundir.read_summary(path)
        if ended is not None:                # stopped during start-up (a signal, a failed rank)
            raise ReportError(f"{path}: the run stopped before its first step ({rundir.SUMMARY} says status "
                              f"{ended.get('status', '?')!r}{', by ' + ended['stopped_by'] if ended.get('stopped_by') else ''}; "
                              f"no {rundir.METRICS})")
        raise ReportError(f"{path}: no metrics.csv (expected a run directory written by largebatch run)")
    _read_metrics(run, metrics)
    summary = os.path.join(path, rundir.SUMMARY)
    if os.path.isfile(summary):
        try:
            with open(summary) as fh:
                run.summary = json.load(fh)
        except (OSError, ValueError) as err:
            raise ReportError(f"{summary}: expected the JSON object largebatch run writes ({err})") from None
        if not isinstance(run.summary, dict):
            raise ReportError(f"{summary}: expected a JSON object, got {type(run.summary).__name__}")
    config = os.path.join(path, rundir.CONFIG)
    if os.path.isfile(config):
        try:
            import yaml
            with open(config) as fh:
                loaded = yaml.safe_load(fh)
            run.config = loaded if isinstance(loaded, dict) else {}
        except Exception:          # only a fallback for runs without summary.json
            run.config = {}
    trust = os.path.join(path, rundir.TRUST_RATIOS)
    if os.path.isfile(trust) and os.path.getsize(trust) > 0:
        _read_trust(run, trust)
    run.name = str(run.summary.get("name") or run.config.get("name") or run.name)
    return run


def _label_runs(runs):
    """Legend labels: the run name (the directory's name where names repeat) and global batch."""
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = os.path.basename(r.path)
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = os.path.join(os.path.basename(os.path.dirname(r.path)), os.path.basename(r.path))
    for r in runs:
        gb = r.get("global_batch")
        r.label = f"{r.name} (B={gb})" if gb is not None else r.name
        if r.summary and r.summary.get("status") not in (None, "completed"):
            r.label += f", {r.summary['status']}"


# ------------------------------------------------------------------------------ text
def _fmt(value, spec=".4f"):
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _fmt_wall(seconds):
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def _fmt_rate(value):
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _hosts(run):
    hosts = run.summary.get("hosts")
    if not hosts:
        return None
    counts = {}
    for h in hosts:
        counts[h] = counts.get(h, 0) + 1
    return ", ".join(f"{h} ×{n}" if n > 1 else h for h, n in counts.items())


def adapted_layers(run):
    """Layers whose trust ratio is not 1 throughout (excluded tensors, e.g. biases and BN under MLPERF,
    keep a ratio of 1), in model order."""
    return [layer for layer, points in run.trust.items()
            if any(v is not None and v != 1.0 for _, v in points)]


def _trust_line(run):
    if not run.trust:
        return "none recorded" + (" (sgd has none)" if run.get("optimizer") == "sgd" else "")
    layers = adapted_layers(run)
    if not layers:
        return f"{len(run.trust)} layers, all at ratio 1 (none adapted)"
    step = max(points[-1][0] for points in run.trust.values())
    last = {layer: run.trust[layer][-1][1] for layer in layers if run.trust[layer][-1][1] is not None}
    text = f"{len(layers)} adapted layers of {len(run.trust)}"
    if last:
        lo, hi = min(last, key=last.get), max(last, key=last.get)
        text += f"; at step {step} from {last[lo]:.3g} ({lo}) to {last[hi]:.3g} ({hi})"
    return text


def _single_summary(run):
    g = run.get
    steps = g("steps_done")
    total = g("total_steps")
    epochs = run.summary.get("epochs_done")
    batch = f"global {_fmt(g('global_batch'))}"
    if run.summary.get("per_worker_batch") is not None:
        ranks = g("ranks")
        batch += (f" = {run.summary['per_worker_batch']} per worker × {_fmt(ranks)} rank{'s' if ranks != 1 else ''}"
                  f" × {run.summary.get('accumulation_steps', 1)} accumulation")
    lines = [
        ("run", f"{run.name}  ({run.path})"),
        ("status", run.status),
        ("framework", " · ".join(str(x) for x in (g("framework"), g("model"), g("optimizer")) if x)),
        ("batch", batch),
        ("lr", f"base {_fmt(run.summary.get('base_lr'), 'g')} -> peak {_fmt(run.summary.get('peak_lr'), 'g')}"
         if run.summary.get("peak_lr") is not None else None),
        ("steps", f"{_fmt(steps)}" + (f" of {total}" if total is not None else "")
         + (f" ({epochs:g} epochs)" if isinstance(epochs, (int, float)) else "")),
        ("loss", f"train {_fmt(g('final_train_loss'))} · eval {_fmt(g('final_eval_loss'))}"),
        ("accuracy", f"eval {_fmt(g('final_eval_accuracy'))}"),
        ("images/s", _fmt_rate(run.summary.get("images_per_sec") or _last(run.train, "images_per_sec"))
         + (" (steady mean)" if run.summary.get("images_per_sec") else " (last interval)")),
        ("wall time", _fmt_wall(g("wall_time_s")) + " training, this launch"
         + (f" · {_fmt_wall(run.summary['training_time_total_s'])} with the launches it resumed"
            if (run.summary.get("training_time_total_s") or 0) > (g("wall_time_s") or 0) + 0.5 else "")
         if g("wall_time_s") is not None else "-"),
        ("hosts", _hosts(run)),
        ("trust ratio", _trust_line(run)),
        ("noise scale", _noise_line(run)),
    ]
    if run.summary.get("skipped_steps"):
        lines.append(("skipped", f"{run.summary['skipped_steps']} non-finite updates skipped"))
    if run.summary.get("resumed_from"):
        lines.append(("resumed", str(run.summary["resumed_from"])))
    return [f"{key:<13}{value}" for key, value in lines if value is not None]


def _table_summary(runs):
    cols = ("run", "status", "framework", "optimizer", "global batch", "steps", "train loss", "eval loss",
            "eval acc", "images/s", "wall", "hosts")
    cells = []
    for r in runs:
        g = r.get
        cells.append([r.name, r.short_status, _fmt(g("framework")), _fmt(g("optimizer")),
                      _fmt(g("global_batch")), _fmt(g("steps_done")), _fmt(g("final_train_loss")),
                      _fmt(g("final_eval_loss")), _fmt(g("final_eval_accuracy")),
                      _fmt_rate(r.summary.get("images_per_sec")), _fmt_wall(g("wall_time_s")),
                      _hosts(r) or "-"])
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    left = {0, 1, 2, 3, 11}
    fmt = lambda row: "  ".join(v.ljust(w) if i in left else v.rjust(w)  # noqa: E731
                                for i, (v, w) in enumerate(zip(row, widths))).rstrip()
    return [fmt(cols)] + [fmt(row) for row in cells]


def summary_text(runs):
    """The one-screen summary: a block for one run, a table for several."""
    if len(runs) == 1:
        return "\n".join(_single_summary(runs[0]))
    return "\n".join(_table_summary(runs))


# ------------------------------------------------------------------------------ pictures
def _figure(width=8.0, height=4.8, ncols=1, width_ratios=None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, gridspec_kw={"width_ratios": width_ratios} if width_ratios else None)
    return fig, axes


def _save(fig, path):
    fig.savefig(path, dpi=110)
    return path


def _series(rows, key, x):
    pts = [(row[x], row[key]) for row in rows if row.get(key) is not None and row.get(x) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _wide_range(values, decades=1.0):
    values = [v for v in values if v is not None]
    return bool(values) and min(values) > 0 and math.log10(max(values) / min(values)) >= decades


def _colors(runs):
    from matplotlib import colormaps
    if len(runs) <= 10:
        cmap = colormaps["tab10"]
        return [cmap(i) for i in range(len(runs))]
    cmap = colormaps["viridis"]
    return [cmap(i / max(len(runs) - 1, 1)) for i in range(len(runs))]


def _title(runs, what):
    if len(runs) == 1:
        r = runs[0]
        return f"{what} — {r.label}, {r.get('optimizer') or '?'} ({r.get('framework') or '?'})"
    return f"{what} — {len(runs)} runs"


def _finish(ax, xlabel, ylabel, title, legend=True):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="major")
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _plot_loss(runs, colors, x, path):
    fig, ax = _figure()
    values = []
    for r, c in zip(runs, colors):
        xs, ys = _series(r.train, "loss", x)
        values += ys
        many = len(runs) > 1
        ax.plot(xs, ys, color=c, lw=1.5, label=r.label if many else "train")
        ex, ey = _series(r.eval, "loss", x)
        values += ey
        if ex:
            ax.plot(ex, ey, color=c if many else "tab:orange", marker="o", ms=5, ls="--" if many else "-",
                    lw=1, label=None if many else "eval")
    if _wide_range(values):
        ax.set_yscale("log")
    note = " (lines: train, dots: eval)" if len(runs) > 1 else ""
    _finish(ax, x, "loss (log)" if ax.get_yscale() == "log" else "loss", _title(runs, "Loss" + note))
    fig.tight_layout()
    return _save(fig, path)


def _plot_accuracy(runs, colors, x, path):
    if not any(_series(r.eval, "accuracy", x)[0] or _series(r.train, "accuracy", x)[0] for r in runs):
        return None
    fig, ax = _figure()
    many = len(runs) > 1
    for r, c in zip(runs, colors):
        tx, ty = _series(r.train, "accuracy", x)
        if tx:
            ax.plot(tx, ty, color=c, lw=1, alpha=0.6, label=f"{r.label} train" if many else "train")
        ex, ey = _series(r.eval, "accuracy", x)
        if ex:
            ax.plot(ex, ey, color=c if many else "tab:orange", marker="o", ms=5, lw=1.5,
                    label=r.label if many else "eval")
    ax.set_ylim(-0.02, 1.02)
    _finish(ax, x, "accuracy", _title(runs, "Accuracy (eval, each epoch)"))
    fig.tight_layout()
    return _save(fig, path)


def _plot_lr(runs, colors, x, path):
    fig, ax = _figure()
    for r, c in zip(runs, colors):
        xs, ys = _series(r.train, "lr", x)
        ax.plot(xs, ys, color=c, lw=1.5, label=r.label)
        peak = r.summary.get("peak_lr")
        if peak and len(runs) == 1:         # the rows are every train.log_every steps: the peak may fall between
            ax.axhline(peak, color=c, ls=":", lw=1.0, label=f"peak {peak:g} (the schedule's)")
    every = {(r.config.get("train") or {}).get("log_every") for r in runs}
    note = f", logged every {every.pop()} steps" if len(every) == 1 and None not in every else ", as logged"
    _finish(ax, x, "learning rate", _title(runs, f"Learning rate (warmup and decay{note})"), legend=True)
    fig.tight_layout()
    return _save(fig, path)


def _plot_throughput(runs, colors, x, path):
    fig, ax = _figure()
    for r, c in zip(runs, colors):
        xs, ys = _series(r.train, "images_per_sec", x)
        ax.plot(xs, ys, color=c, lw=1.2, marker=".", ms=4, label=r.label if len(runs) > 1 else "per interval")
        steady = r.summary.get("images_per_sec")
        if steady:
            ax.axhline(steady, color=c, ls=":", lw=1.2,
                       label=None if len(runs) > 1 else f"steady mean {_fmt_rate(steady)}")
    ax.set_ylim(bottom=0)
    _finish(ax, x, "images / s (all ranks)", _title(runs, "Throughput" + (" (dotted: steady mean)"
                                                                        if len(runs) > 1 else "")))
    fig.tight_layout()
    return _save(fig, path)


def _plot_noise(runs, colors, x, path):
    """B_simple against step beside the train loss (McCandlish et al.: it grows as the loss falls);
    None when no run measured it."""
    measured = [(r, c) for r, c in zip(runs, colors) if any(row.get("noise_scale") for row in r.train)]
    if not measured:
        return None
    fig, (ax, loss_ax) = _figure(width=11.0, ncols=2)
    for r, c in measured:
        xs, ys = _series([row for row in r.train if row.get("noise_scale")], "noise_scale", x)
        pts = [(a, b) for a, b in zip(xs, ys) if b is not None and b > 0]
        ax.plot([a for a, _ in pts], [b for _, b in pts], color=c, lw=1.5, label=r.label)
        if r.get("global_batch"):
            ax.axhline(r.get("global_batch"), color=c, ls=":", lw=1.0)
        lx, ly = _series(r.train, "loss", x)
        loss_ax.plot(lx, ly, color=c, lw=1.2, label=r.label)
    ax.set_yscale("log")
    _finish(ax, x, "B_simple = tr(Σ)/|G|² (examples, log)",
            _title(runs, "Gradient noise scale (dotted: the global batch)"), legend=len(measured) > 1)
    _finish(loss_ax, x, "train loss", "Train loss", legend=False)
    fig.tight_layout()
    return _save(fig, path)


def _noise_line(run):
    value = run.summary.get("noise_scale")
    if value is None:
        value = _last([row for row in run.train if row.get("noise_scale")], "noise_scale")
    if value is None:
        return None
    from largebatch.noise_scale import batch_tradeoff
    gb = run.get("global_batch")
    if not gb or not value > 0:
        return f"B_simple {value:.4g}"
    steps, examples = batch_tradeoff(value, gb)
    return f"B_simple {value:.4g} at global batch {gb}: {steps:.2f}× the fewest steps, {examples:.2f}× the fewest examples"


def _short(name, n=28):
    return name if len(name) <= n else "…" + name[-(n - 1):]


def _plot_trust(run, x, path):
    """Figure 2 of the LARS paper, per layer: the ratio against step (left), and the last logged
    ratio of every layer from input to output (right), in the same colours."""
    from matplotlib import colormaps
    layers = adapted_layers(run)
    if not layers:
        return None
    steps_to_x = {}
    if x == "epoch":
        spe = run.get("steps_per_epoch") or (run.config.get("derived") or {}).get("steps_per_epoch")
        steps_to_x = {s: s / spe for s in {s for pts in run.trust.values() for s, _ in pts}} if spe else {}
        if not spe:
            x = "step"
    height = min(11.0, max(5.2, 0.13 * len(layers) + 1.6))      # room for the per-layer panel's rows
    fig, (ax, side) = _figure(12.0, height, ncols=2, width_ratios=[2.2, 1])
    cmap = colormaps["viridis"] if len(layers) > 1 else None
    colors = [cmap(i / (len(layers) - 1)) if cmap else "tab:blue" for i in range(len(layers))]
    legend = len(layers) <= LEGEND_LAYERS
    finals = []
    for i, (layer, c) in enumerate(zip(layers, colors)):
        pts = [(steps_to_x.get(s, s), v) for s, v in run.trust[layer] if v is not None and v > 0]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=c, lw=1.3,
                    label=_short(layer) if legend else None)
            finals.append((i, pts[-1][1], c))
    ax.set_yscale("log")
    hidden = len(run.trust) - len(layers)
    sub = f"{len(layers)} adapted layers" + (f"; {hidden} tensors at ratio 1 throughout (not adapted) "
                                             f"not drawn" if hidden else "")
    if not legend:
        sub += "\ncolour: input layer (dark) → output layer (yellow), as on the right"
    _finish(ax, x, "trust ratio = layer lr / global lr (log)",
            f"Trust ratio per layer — {run.label}, {run.get('optimizer') or '?'}\n{sub}", legend=False)
    if legend:
        ax.legend(fontsize=7, loc="best", ncol=2 if len(layers) > 6 else 1)
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    values = [v for _, v, _ in finals]
    side.scatter(values, [i for i, _, _ in finals], c=[c for _, _, c in finals], s=24, zorder=3)
    side.set_xscale("log")
    lo, hi = min(values), max(values)
    side.set_xlim(lo / 1.6, hi * 1.6)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    side.xaxis.set_major_formatter(plain)
    side.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    side.xaxis.set_minor_formatter(plain if math.log10(hi / lo) < 1.2 else NullFormatter())
    side.set_ylim(len(layers) - 0.5, -0.5)
    every = max(1, math.ceil(len(layers) / max(10, int((height - 1.4) * 7))))
    ticks = list(range(0, len(layers), every))
    side.set_yticks(ticks)
    side.set_yticklabels([_short(layers[i], 30) for i in ticks], fontsize=7)
    last_step = max(points[-1][0] for points in run.trust.values())
    side.set_xlabel("trust ratio (log)")
    side.set_title(f"each layer at step {last_step} (input at top)", fontsize=10)
    side.grid(alpha=0.3, which="both", axis="x")
    side.grid(alpha=0.15, which="major", axis="y")
    fig.tight_layout()
    return _save(fig, path)


def _safe(name):
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name).strip("._") or "run"


def write_plots(runs, out_dir, x="step"):
    """The PNGs for ``runs`` in ``out_dir``; returns (written paths, notes on what was not drawn)."""
    os.makedirs(out_dir, exist_ok=True)
    colors = _colors(runs)
    written, notes = [], []
    for name, plot in (("loss", _plot_loss), ("accuracy", _plot_accuracy), ("lr", _plot_lr),
                       ("images_per_sec", _plot_throughput), ("noise_scale", _plot_noise)):
        path = plot(runs, colors, x, os.path.join(out_dir, f"{name}.png"))
        if path:
            written.append(path)
        elif name == "accuracy":
            notes.append("accuracy.png: not drawn, no accuracy recorded (train.eval=false or no validation set)")
        elif name == "noise_scale":
            notes.append("noise_scale.png: not drawn, no noise scale recorded (one rank without accumulation, "
                         "or train.noise_scale=false)")
    for r in runs:
        file = "trust_ratios.png" if len(runs) == 1 else f"trust_ratios-{_safe(r.name)}.png"
        path = _plot_trust(r, x, os.path.join(out_dir, file))
        if path:
            written.append(path)
        elif r.trust:
            notes.append(f"{file}: not drawn for {r.name}, every layer's ratio is 1")
        else:
            notes.append(f"{file}: not drawn for {r.name}, no trust_ratios.csv (sgd, or output.trust_ratios=false)")
    return written, notes


# ------------------------------------------------------------------------------ command
def _parser():
    p = _Parser(prog="largebatch report",
                description="PNGs of loss, accuracy, lr, images/s and per-layer trust ratios against step, and a "
                            "one-screen summary, for one run directory or several side by side.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run directories (runs/NAME) written by largebatch run")
    p.add_argument("--out", metavar="DIR",
                   help="folder for the PNGs (default: RUN_DIR/report for one run, ./report-<timestamp> for several)")
    p.add_argument("--x", choices=("step", "epoch"), default="step", help="the horizontal axis [step]")
    p.add_argument("--no-plots", action="store_true", help="print the summary only")
    return p


def main(argv=None):
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    runs, problems, seen = [], [], set()
    for path in args.run_dirs:
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        try:
            runs.append(load_run(path))
        except ReportError as err:
            problems.append(str(err))
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        problems.append(f"--out {args.out}: not a folder (expected a folder for the PNGs, new or existing)")
    if not args.no_plots and importlib.util.find_spec("matplotlib") is None:
        problems.append("the PNGs need matplotlib, which is not installed (pip install matplotlib, or "
                        "largebatch[report]); --no-plots prints the summary alone")
    if problems:
        for line in problems:
            print(f"largebatch report: {line}", file=sys.stderr)
        return 2
    _label_runs(runs)
    print(summary_text(runs))
    if args.no_plots:
        return 0
    out = args.out or (os.path.join(runs[0].path, "report") if len(runs) == 1
                       else os.path.abspath(f"report-{time.strftime('%Y%m%d-%H%M%S')}"))
    try:
        written, notes = write_plots(runs, out, x=args.x)
    except OSError as err:
        print(f"largebatch report: {out}: cannot write the PNGs ({err.strerror or err})", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}")
    print(f"{'report':<13}{os.path.abspath(out)}/: " + " ".join(os.path.basename(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
