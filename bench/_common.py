"""Shared helpers for the benchmarks: machine/version header, load, CSV/JSON writing."""
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results"


def machine_info(**settings):
    info = {"time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": platform.node(), "platform": platform.platform(),
            "cpu": _cpu_model(), "cpus": os.cpu_count(), "python": sys.version.split()[0]}
    try:
        info["loadavg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    for mod in ("numpy", "torch", "horovod", "mpi4py", "tensorflow", "keras"):
        m = sys.modules.get(mod)
        if m is not None:
            info[mod] = getattr(m, "__version__", "?")
    info["settings"] = settings
    return info


def _cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def print_header(info, title):
    print(f"== {title}")
    print(f"   machine: {info['cpu']} x{info['cpus']}  {info['platform']}  load(1/5/15)={info.get('loadavg_1_5_15')}")
    vers = "  ".join(f"{k} {info[k]}" for k in ("python", "numpy", "torch", "horovod", "mpi4py", "tensorflow")
                     if k in info)
    print(f"   versions: {vers}")
    print(f"   settings: {json.dumps(info['settings'], default=str)}")
    sys.stdout.flush()


def write_outputs(out_dir, stem, rows, meta):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if rows:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(out_dir / f"{stem}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    with open(out_dir / f"{stem}.json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
    return out_dir / f"{stem}.csv", out_dir / f"{stem}.json"


def print_table(rows, cols, fmt=None):
    fmt = fmt or {}
    cells = [[(fmt.get(c, "{}").format(r[c]) if r.get(c) is not None else "-") for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for x in cells:
        print("  ".join(v.rjust(w) for v, w in zip(x, widths)))
    sys.stdout.flush()


def bar_chart(path, labels, values_ms, xlabel, ref=None, ref_label=None):
    """Horizontal bars of step times (ms) with an optional reference line (a bound, SGD) -> PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 1.4))
    ax.barh(labels, values_ms, color="tab:blue")
    ax.invert_yaxis()
    if ref is not None:
        ax.axvline(ref, color="tab:red", ls="--", label=ref_label)
        ax.legend(loc="lower right")
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def finish_figure(fig, axes, path, legend_size=8, grid_which="major"):
    """Grid and legend on each of ``axes``, tight layout, save the PNG, free the figure."""
    import matplotlib.pyplot as plt
    for ax in axes:
        ax.grid(alpha=0.3, which=grid_which)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
