"""``largebatch bench``: run the benchmarks in the repository's ``bench/`` folder.

    largebatch bench scaling        [--quick] [--out DIR] [script options]
    largebatch bench allreduce      [--quick] [--out DIR] [script options]
    largebatch bench convergence    [--quick] [--out DIR] [script options]
    largebatch bench optimizer-cost [--quick] [--out DIR]     (torch and Keras scripts, if present)
    largebatch bench noise          [--quick] [--out DIR]   # the gradient noise scale: growth, prediction, cost
    largebatch bench adascale       [--quick] [--out DIR]   # AdaScale vs linear scaling at S = 4, 8, 16

Each benchmark prints machine, versions and settings, a short table, and writes CSV, JSON and a
PNG plot to ``--out`` (default ``bench/results/``). ``bench/`` is not installed by setup.py: it is
found next to this package in a source checkout.
"""
import os
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = {"scaling": ["scaling.py"], "allreduce": ["allreduce.py"], "convergence": ["convergence.py"],
           "optimizer-cost": ["torch_optimizer_cost.py", "keras_optimizer_cost.py"], "noise": ["noise.py"],
           "adascale": ["adascale.py"]}
USAGE = ("usage: largebatch bench {" + ",".join(SCRIPTS) + "} [--quick] [--out DIR] [options]\n"
         "       largebatch bench SUBCOMMAND --help   shows a benchmark's own options")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() if argv else USAGE)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SCRIPTS:
        sys.stderr.write(f"largebatch bench: unknown benchmark {name!r}, expected one of {', '.join(SCRIPTS)}\n")
        return 2
    if not BENCH_DIR.is_dir():
        sys.stderr.write(f"largebatch bench: benchmark scripts not found at {BENCH_DIR}; the benchmarks ship "
                         "with the source checkout, not the installed package (run from a git clone)\n")
        return 2
    scripts = [BENCH_DIR / s for s in SCRIPTS[name]]
    present = [s for s in scripts if s.exists()]
    if not present:
        sys.stderr.write(f"largebatch bench: none of {', '.join(str(s) for s in scripts)} exists\n")
        return 2
    for s in scripts:
        if not s.exists():
            print(f"largebatch bench: skipping {s.name} (not present)", flush=True)
    out = next((rest[i + 1] for i, a in enumerate(rest[:-1]) if a == "--out"),
               next((a.split("=", 1)[1] for a in rest if a.startswith("--out=")), None))
    if "-h" not in rest and "--help" not in rest:
        # said first: the results go to the checkout's bench/results unless --out says otherwise
        print(f"largebatch bench {name}: results in {os.path.abspath(out) if out else BENCH_DIR / 'results'}"
              + ("" if out else " (--out DIR for another folder)"), flush=True)
    rc = 0
    for s in present:
        proc = subprocess.run([sys.executable, str(s), *rest])
        rc = rc or proc.returncode
    return rc
