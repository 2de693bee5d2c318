"""Optimizer step cost on ResNet-50 parameter shapes (161 tensors, 25.6M params), PyTorch, CPU.

Compares largebatch LARS/LARC/LAMB (foreach, single-tensor loop, torch.compile-fused) with
torch.optim.SGD(momentum, weight_decay, foreach=True), and measures in the same run the memory
traffic bound: one triad pass a += s·b over a parameter-sized buffer moves 3 tensors, so
7 tensor passes (LARS's minimum: read w, g for the norms; read w, g, v, write w, v) take
7/3 of it. Each method runs in its own process (clean allocator, compile memory kept apart),
reporting the median step time and the transient memory a step allocates on top of
parameters + gradients + optimizer state (peak RSS sampled during steps).

    python bench/torch_optimizer_cost.py [--threads 1] [--steps 20] [--quick] [--out bench/results]
"""
import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

METHODS = {
    "sgd_foreach": ("torch.optim.SGD", dict(foreach=True)),
    "lars_foreach": ("LARS", dict(foreach=True)),
    "lars_single_loop": ("LARS", dict(foreach=False)),
    "lars_fused": ("LARS", dict(fused=True)),
    "larc_foreach": ("LARS", dict(foreach=True, clip=True)),
    "lamb_foreach": ("LAMB", dict(foreach=True)),
    "lamb_fused": ("LAMB", dict(fused=True)),
}
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


class PeakSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = 0, True

    def run(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.0005)


def measure(method, steps, threads):
    """Child process: time one method; print a JSON line."""
    import torch
    import largebatch.torch as lbt
    from largebatch.torch.models import resnet50
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(p.detach().clone()) for p in resnet50().parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    kind, options = METHODS[method]
    if kind == "torch.optim.SGD":
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-5, **options)
    elif kind == "LARS":
        opt = lbt.LARS(params, lr=0.1, momentum=0.9, weight_decay=5e-5, **options)
    else:
        opt = lbt.LAMB(params, lr=1e-3, weight_decay=1e-2, **options)
    compile_start = time.perf_counter()
    for _ in range(3):                      # state creation, compilation, warm caches
        opt.step()
    warmup_s = time.perf_counter() - compile_start
    ctypes.CDLL("libc.so.6").malloc_trim(0)     # give freed warm-up memory back, so the peak is this step's
    baseline = rss_bytes()
    sampler = PeakSampler()
    sampler.start()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    sampler.running = False
    sampler.join()
    n_params = sum(p.numel() for p in params)
    state_mb = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                   if torch.is_tensor(t)) / 2**20
    print(json.dumps(dict(method=method, state_mb=state_mb, median_ms=1e3 * statistics.median(times), min_ms=1e3 * min(times),
                          warmup_s=warmup_s, transient_mb=max(0, sampler.peak - baseline) / 2**20,
                          param_mb=n_params * 4 / 2**20, tensors=len(params), params=n_params)))


def triad_ms(threads, repeats=15):
    import torch
    torch.set_num_threads(threads)
    a = torch.randn(25_557_032)
    b = torch.randn(25_557_032)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a.add_(b, alpha=0.5)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 timed steps, SGD and foreach LARS only (no compile)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick and not args.child:
        args.steps, args.methods = 3, "sgd_foreach,lars_foreach"
    if args.child:
        measure(args.child, args.steps, args.threads)
        return 0
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown[0]!r}, expected some of {', '.join(METHODS)}")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    rows = []
    for method in methods:
        proc = subprocess.run([sys.executable, __file__, "--child", method, "--steps", str(args.steps),
                               "--threads", str(args.threads)], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"{method}: FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"  {method:<18} {rows[-1]['median_ms']:8.1f} ms", flush=True)
    triad = triad_ms(args.threads)
    bound_ms = triad * 7 / 3
    sgd = next((r["median_ms"] for r in rows if r["method"] == "sgd_foreach"), None)
    import torch
    meta = dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(), threads=args.threads,
                torch=torch.__version__, python=platform.python_version(), steps=args.steps,
                load_avg=os.getloadavg(), triad_ms=triad, seven_pass_bound_ms=bound_ms,
                triad_gb_s=3 * 25_557_032 * 4 / (triad / 1e3) / 1e9)
    for r in rows:
        r["vs_sgd"] = r["median_ms"] / sgd if sgd else None
        r["vs_7pass_bound"] = r["median_ms"] / bound_ms
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "torch_optimizer_cost.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    with open(out / "torch_optimizer_cost.csv", "w") as fh:
        fh.write("method,median_ms,min_ms,vs_sgd,vs_7pass_bound,state_mb,transient_mb,warmup_s\n")
        for r in rows:
            fh.write(f"{r['method']},{r['median_ms']:.2f},{r['min_ms']:.2f},{r['vs_sgd']:.3f},"
                     f"{r['vs_7pass_bound']:.3f},{r['state_mb']:.0f},{r['transient_mb']:.0f},{r['warmup_s']:.1f}\n")
    print(f"\nResNet-50 shapes ({rows[0]['tensors']} tensors, {rows[0]['params'] / 1e6:.1f}M params), "
          f"{args.threads} thread(s), torch {torch.__version__}, load avg {meta['load_avg'][0]:.2f}")
    print(f"triad pass {triad:.1f} ms ({meta['triad_gb_s']:.1f} GB/s); 7-pass bound {bound_ms:.1f} ms")
    print(f"{'method':<18} {'median ms':>10} {'× SGD':>7} {'× bound':>8} {'state MB':>9} {'transient MB':>13}")
    for r in rows:
        print(f"{r['method']:<18} {r['median_ms']:10.1f} {r['vs_sgd']:7.2f} {r['vs_7pass_bound']:8.2f} "
              f"{r['state_mb']:9.0f} {r['transient_mb']:13.0f}")
    from _common import bar_chart
    bar_chart(out / "torch_optimizer_cost.png", [r["method"] for r in rows], [r["median_ms"] for r in rows],
              f"step time, ms (ResNet-50 shapes, {args.threads} thread)", ref=bound_ms,
              ref_label=f"7-pass memory bound {bound_ms:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
