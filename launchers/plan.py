"""``largebatch plan RUN_DIR``: how large a batch and how many nodes, from a run's measured noise scale.

Reads the run's ``summary.json`` (its gradient noise scale B_noise, global and per-worker batch,
steps done, images/s, ranks, parameter count) and predicts, for node counts 1 ... 1024 and the
per-node batches given (default: the run's, half and twice it), the steps, the examples and the
time to reach the run's loss, with McCandlish et al.'s model of training and a ring-allreduce
model of a step (:mod:`largebatch.planning`). The network is an α-β fit from
``largebatch bench allreduce`` (``--allreduce allreduce_hosts.json``) or an assumed link
(``--link-gbps``, ``--latency-us``); the time per example is the run's own (its images/s per
rank), or ``--seconds-per-example``. Writes ``plan.csv``, ``plan.json`` and ``plan.png`` to
``RUN_DIR/plan/`` (or ``--out``) and prints a table with the recommendation.

Bad input (no run, no noise scale, numbers out of range) is exit 2 with one line naming it.
"""
import argparse
import csv
import json
import os
import sys

from largebatch import rundir
from largebatch.planning import NODE_COUNTS, plan, recommend

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"largebatch plan: {message} (see largebatch plan --help)", file=sys.stderr)
        raise SystemExit(2)


def _parser():
    p = _Parser(prog="largebatch plan", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run that measured the noise scale")
    p.add_argument("--per-worker", type=int, nargs="+", metavar="B",
                   help="per-node batches to consider (default: the run's, half and twice it)")
    p.add_argument("--max-nodes", type=int, default=1024, help="largest node count [1024]")
    p.add_argument("--seconds-per-example", type=float,
                   help="compute time per example on one node (default: the run's, from its images/s per rank)")
    p.add_argument("--params", type=float, help="parameters sent per step (default: the run's)")
    p.add_argument("--allreduce", metavar="JSON",
                   help="α and β from `largebatch bench allreduce` (allreduce.json or allreduce_hosts.json)")
    p.add_argument("--link-gbps", type=float, default=25.0, help="assumed link without --allreduce [25]")
    p.add_argument("--latency-us", type=float, default=10.0, help="assumed latency without --allreduce [10]")
    p.add_argument("--out", metavar="DIR", help="folder for plan.csv/json/png (default RUN_DIR/plan)")
    return p


def _network(args):
    """(α, β, where they came from)."""
    if args.allreduce is None:
        return args.latency_us * 1e-6, 8.0 / (args.link_gbps * 1e9), \
            f"assumed link {args.link_gbps:g} Gbit/s, {args.latency_us:g} us"
    with open(args.allreduce) as fh:
        fits = json.load(fh)["meta"]["fits"]
    engines = [k for k in fits if k != "mpi4py"]
    if not engines:
        raise ValueError(f"--allreduce {args.allreduce}: no fit of Horovod or torch.distributed in it")
    best = min(engines, key=lambda k: fits[k]["beta_s_per_byte"])
    return fits[best]["alpha_s"], fits[best]["beta_s_per_byte"], f"{best} from {args.allreduce}"


def _inputs(args):
    """The run's numbers, or ValueError naming what is missing."""
    summary = rundir.read_summary(args.run_dir)
    if summary is None:
        raise ValueError(f"{args.run_dir}: no summary.json (expected a finished run directory)")
    noise = summary.get("noise_scale")
    if not noise or not noise > 0:
        raise ValueError(f"{args.run_dir}: no gradient noise scale in summary.json (expected a run with several "
                         f"ranks or accumulation and train.noise_scale: true)")
    ranks, ips = summary.get("ranks") or 1, summary.get("images_per_sec")
    per_example = args.seconds_per_example or (ranks / ips if ips else None)
    if not per_example or not per_example > 0:
        raise ValueError("--seconds-per-example: the run has no images/s; expected a number > 0")
    params = args.params or summary.get("parameters")
    if not params or not params > 0:
        raise ValueError("--params: the run's summary.json has no parameter count; expected a number > 0")
    pw = summary.get("per_worker_batch") or summary["global_batch"]
    batches = args.per_worker or sorted({max(1, pw // 2), pw, pw * 2})
    if any(b < 1 for b in batches) or args.max_nodes < 1:
        raise ValueError("--per-worker / --max-nodes: expected integers > 0")
    return summary, noise, per_example, params, batches


def _plot(rows, balanced, fastest, noise, title, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(12, 4.6))
    FigureCanvasAgg(fig)
    ax_time, ax_eff = fig.subplots(1, 2)
    for i, b in enumerate(sorted({r.per_worker_batch for r in rows})):
        mine, color = [r for r in rows if r.per_worker_batch == b], f"C{i}"
        ax_time.loglog([r.nodes for r in mine], [r.time_s / 3600 for r in mine], marker="o", ms=3, color=color,
                       label=f"{b} per node")
        ax_eff.semilogx([r.nodes for r in mine], [100 / r.examples_over_min for r in mine], ls="--", lw=1,
                        color=color)
        ax_eff.semilogx([r.nodes for r in mine], [100 * r.hardware_efficiency for r in mine], marker="o", ms=3,
                        color=color, label=f"{b} per node")
    for r, what, m in ((balanced, "recommended (B ≈ B_noise)", "*"), (fastest, "fastest", "D")):
        ax_time.plot([r.nodes], [r.time_s / 3600], m, ms=12, color="k", fillstyle="none", label=what)
    for ax in (ax_time, ax_eff):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("nodes")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    ax_time.set_ylabel("predicted time to the run's loss (h)")
    ax_time.set_title(f"{title}\nB_noise ≈ {noise:.4g}", fontsize=10)
    ax_eff.set_ylabel("%: step efficiency (solid), examples efficiency E_min/E (dashed)")
    ax_eff.set_ylim(0, 105)
    ax_eff.set_title("what each node count wastes: waiting on the allreduce, or extra examples", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        summary, noise, per_example, params, batches = _inputs(args)
        alpha, beta, network = _network(args)
    except (ValueError, OSError, KeyError) as err:
        print(f"largebatch plan: {err}", file=sys.stderr)
        return 2
    nodes = [n for n in NODE_COUNTS if n <= args.max_nodes]
    rows = plan(noise, summary["global_batch"], summary["steps_done"], per_example, params, alpha, beta,
                batches, nodes)
    balanced, fastest = recommend(rows, noise)
    out = args.out or os.path.join(args.run_dir, "plan")
    os.makedirs(out, exist_ok=True)
    fields = list(rows[0].as_dict())
    with open(os.path.join(out, "plan.csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fields)
        writer.writeheader()
        writer.writerows(r.as_dict() for r in rows)
    meta = {"run_dir": os.path.abspath(args.run_dir), "noise_scale": noise, "reference_batch": summary["global_batch"],
            "reference_steps": summary["steps_done"], "seconds_per_example": per_example, "parameters": params,
            "alpha_s": alpha, "beta_s_per_byte": beta, "network": network,
            "recommended": balanced.as_dict(), "fastest": fastest.as_dict()}
    with open(os.path.join(out, "plan.json"), "w") as fh:
        json.dump({"meta": meta, "rows": [r.as_dict() for r in rows]}, fh, indent=1)
    _plot(rows, balanced, fastest, noise, f"{summary.get('name', 'run')}: {summary.get('model', '')}",
          os.path.join(out, "plan.png"))
    print(f"noise scale B_noise ≈ {noise:.4g} (the run's, at global batch {summary['global_batch']}, "
          f"{summary['steps_done']} steps); {per_example * 1e3:.3g} ms per example per node; "
          f"{params / 1e6:.3g}M parameters; network: {network}")
    print(f"{'nodes':>6} {'per node':>8} {'global':>8} {'steps':>10} {'S/S_min':>8} {'E/E_min':>8} "
          f"{'step ms':>9} {'comm %':>7} {'time':>10}")
    for r in rows:
        if r.per_worker_batch != batches[len(batches) // 2] and r not in (balanced, fastest):
            continue
        mark = " <- recommended" if r is balanced else (" <- fastest" if r is fastest else "")
        print(f"{r.nodes:>6} {r.per_worker_batch:>8} {r.global_batch:>8} {r.steps:>10.0f} {r.steps_over_min:>8.2f} "
              f"{r.examples_over_min:>8.2f} {r.step_s * 1e3:>9.3g} {100 * (1 - r.hardware_efficiency):>6.1f}% "
              f"{_duration(r.time_s):>10}{mark}")
    print(f"recommended: {balanced.nodes} node(s) × {balanced.per_worker_batch} = global batch "
          f"{balanced.global_batch} (B ≈ B_noise: {balanced.steps_over_min:.2f}× the fewest steps, "
          f"{balanced.examples_over_min:.2f}× the fewest examples), {_duration(balanced.time_s)} to the run's loss")
    print(f"fastest:     {fastest.nodes} node(s) × {fastest.per_worker_batch} = global batch {fastest.global_batch}, "
          f"{_duration(fastest.time_s)} ({fastest.examples_over_min:.2f}× the fewest examples)")
    print(f"wrote {out}/plan.csv, plan.json, plan.png")
    return 0


def _duration(seconds):
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


if __name__ == "__main__":
    sys.exit(main())
