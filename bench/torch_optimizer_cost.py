"""Optimizer step cost on ResNet-50 parameter shapes (161 tensors, 25.6M params), PyTorch, CPU (or --device cuda).

Compares largebatch LARS/LARC/LAMB (foreach, single-tensor loop, torch.compile-fused) with
torch.optim.SGD(momentum, weight_decay, foreach=True), and measures in the same run the memory
traffic bound: one triad pass a += s·b over a parameter-sized buffer moves 3 tensors, so
7 tensor passes (LARS's minimum: read w, g for the norms; read w, g, v, write w, v) take
7/3 of it. Each method runs in its own process (clean allocator, compile memory kept apart),
reporting the median step time and the transient memory a step allocates on top of
parameters + gradients + optimizer state (peak RSS sampled during steps).

    python bench/torch_optimizer_cost.py [--threads 1] [--steps 20] [--quick] [--out bench/results]

``--device cuda``: the same question on a GPU, for ResNet-50 shapes and a BERT-large-like set
(391 tensors, 335M params): LARS and LAMB (foreach, fused) against torch.optim.SGD(momentum,
weight_decay, fused=True) and torch.optim.AdamW(fused=True), timed with CUDA events (median of
``--steps`` steps after warm-up), each against its own memory-traffic bound from a triad measured
on the device (SGD 5 tensor passes, AdamW and LARS 7, LAMB 10). Each (set, method) warms up
(compiles) in its own process, all side by side, then they are timed one at a time; ``--budget-s``
caps the whole run (those not warm by then are reported as timed out). Writes
torch_optimizer_cost_cuda.{csv,json,png}.

    python bench/torch_optimizer_cost.py --device cuda [--steps 50] [--sets resnet50,bert_large] [--budget-s 170]
"""
import argparse
import ctypes
import json
import math
import os
import platform
import queue
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


# ----------------------------------------------------------------------------------------- CUDA

CUDA_METHODS = {        # name: (optimizer, options, minimum tensor passes a step over parameter-sized data)
    "sgd_fused": ("torch.optim.SGD", dict(fused=True), 5),       # read w, g, v; write v, w
    "lars_foreach": ("LARS", dict(foreach=True), 7),             # + read w, g once more for the two norms
    "lars_fused": ("LARS", dict(fused=True), 7),
    "adamw_fused": ("torch.optim.AdamW", dict(fused=True), 7),   # read w, g, m, v; write w, m, v
    "lamb_foreach": ("LAMB", dict(foreach=True), 10),            # AdamW's 6 with both norms, then read w, m, v, write w
    "lamb_fused": ("LAMB", dict(fused=True), 10),
}
BASELINE = {"LARS": "sgd_fused", "torch.optim.SGD": "sgd_fused", "LAMB": "adamw_fused",
            "torch.optim.AdamW": "adamw_fused"}
PARAM_SETS = ("resnet50", "bert_large")
TARGET_VS_BASELINE, TARGET_VS_BOUND = 1.2, 1.5


def bert_large_shapes(layers=24, hidden=1024, ffn=4096, vocab=30522, positions=512):
    """BERT-large's parameter shapes (Devlin et al. 2019): embeddings, 24 encoder layers, pooler."""
    shapes = [(vocab, hidden), (positions, hidden), (2, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (hidden,)] * 4                    # query, key, value, attention output
        shapes += [(hidden,), (hidden,)]                               # attention LayerNorm
        shapes += [(ffn, hidden), (ffn,), (hidden, ffn), (hidden,)]    # feed-forward
        shapes += [(hidden,), (hidden,)]                               # output LayerNorm
    return shapes + [(hidden, hidden), (hidden,)]                      # pooler


def param_shapes(name):
    if name == "resnet50":
        from largebatch.torch.models import resnet50
        return [tuple(p.shape) for p in resnet50().parameters()]
    return bert_large_shapes()


def make_optimizer(method, params):
    import torch
    import largebatch.torch as lbt
    kind, options, _ = CUDA_METHODS[method]
    if kind == "torch.optim.SGD":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-5, **options)
    if kind == "torch.optim.AdamW":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, **options)
    if kind == "LARS":
        return lbt.LARS(params, lr=0.1, momentum=0.9, weight_decay=5e-5, **options)
    return lbt.LAMB(params, lr=1e-3, weight_decay=1e-2, **options)


def measure_cuda(method, sets, steps, device="cuda"):
    """Child process: build and warm up (compile) every set, say so, wait for 'go' on stdin, then
    time ``steps`` steps per set and print one JSON line per set."""
    import torch
    torch.manual_seed(0)
    prepared = []
    for name in sets:
        params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.05) for s in param_shapes(name)]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt = make_optimizer(method, params)
        start = time.perf_counter()
        for _ in range(3):                      # state creation, compilation, warm caches
            opt.step()
        torch.cuda.synchronize(device)
        prepared.append((name, params, opt, time.perf_counter() - start))
    print(json.dumps(dict(ready=method)), flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    for name, params, opt, warmup_s in prepared:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
        wall = time.perf_counter()
        for i in range(steps):
            starts[i].record()
            opt.step()
            ends[i].record()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - wall
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        n_params = sum(p.numel() for p in params)
        state_mb = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                       if torch.is_tensor(t)) / 2**20
        print(json.dumps(dict(set=name, method=method, median_ms=statistics.median(times), min_ms=min(times),
                              host_ms=1e3 * wall / steps, warmup_s=warmup_s, state_mb=state_mb,
                              transient_mb=max(0, torch.cuda.max_memory_allocated(device) - baseline) / 2**20,
                              tensors=len(params), params=n_params)), flush=True)


def triad_cuda_ms(numel, repeats=20, device="cuda"):
    """Median time of one a += s·b over ``numel`` float32 elements on the device (3 tensor passes)."""
    import torch
    a = torch.randn(numel, device=device)
    b = torch.randn(numel, device=device)
    for _ in range(3):
        a.add_(b, alpha=0.5)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a.add_(b, alpha=0.5)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del a, b
    torch.cuda.empty_cache()
    return statistics.median(times)


class _Child:
    """One benchmark child process whose stdout lines arrive on a queue (read by a thread)."""

    def __init__(self, method, param_set, steps):
        self.method, self.set = method, param_set
        self.proc = subprocess.Popen([sys.executable, __file__, "--device", "cuda", "--child", method,
                                      "--steps", str(steps), "--sets", param_set],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.lines, self.stderr, self.closed = queue.Queue(), [], False
        threading.Thread(target=self._read_stdout, daemon=True).start()
        self._stderr_reader = threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True)
        self._stderr_reader.start()

    def _read_stdout(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)                    # the child closed its stdout (exited)

    def next_json(self, deadline):
        """The next JSON line before ``deadline`` (time.monotonic), None on timeout or exit."""
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if line is None:
                self.closed = True
                self.lines.put(None)            # stays at end of file for later calls
                return None
            if line.startswith("{"):
                return json.loads(line)

    def why(self):
        """Why no (more) results: the exit code and last stderr line of a child that died, else ''."""
        code = self.proc.poll()
        if self.closed:                         # its stdout closes a moment before it exits
            try:
                code = self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self._stderr_reader.join(timeout=5)
        tail = "".join(self.stderr).strip().splitlines()
        last = next((ln for ln in reversed(tail) if ln.strip()), "")
        return f"exit {code}: {last[-300:]}" if code not in (None, 0) else ""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def main_cuda(args):
    import torch
    if not torch.cuda.is_available():
        print(f"torch_optimizer_cost: --device cuda: no CUDA device (torch {torch.__version__}, "
              f"built with CUDA {torch.version.cuda}); nothing measured", file=sys.stderr)
        return 2
    start = time.monotonic()
    deadline = start + args.budget_s
    # one process per (set, method): they warm up (compile) side by side, then are timed one at a time
    children = [_Child(m, name, args.steps) for name in args.sets for m in args.methods]
    status, rows = {}, []
    try:
        ready = []
        for child in children:
            msg = child.next_json(deadline - 15)
            if msg and msg.get("ready") == child.method:
                ready.append(child)
            else:
                status[child.set, child.method] = child.why() or \
                    f"not warm after {time.monotonic() - start:.0f} s (still compiling?); stopped"
                child.stop()
        for child in ready:                     # the others wait on stdin meanwhile
            child.proc.stdin.write("go\n")
            child.proc.stdin.flush()
            row = child.next_json(max(deadline, time.monotonic() + 30))
            if row is None:
                status[child.set, child.method] = child.why() or "no result"
            else:
                rows.append(row)
                print(f"  {row['set']:<11} {row['method']:<14} {row['median_ms']:8.3f} ms  "
                      f"(warm-up {row['warmup_s']:.1f} s)", flush=True)
            child.stop()
    finally:
        for child in children:
            child.stop()
    for (name, method), why in status.items():
        print(f"  {name:<11} {method:<14} {why}", file=sys.stderr, flush=True)

    triads = {}
    for name in args.sets:
        numel = next((r["params"] for r in rows if r["set"] == name), None)
        if numel is None:
            numel = sum(math.prod(s) for s in param_shapes(name))
        triads[name] = (numel, triad_cuda_ms(numel))
    by_key = {(r["set"], r["method"]): r for r in rows}
    for r in rows:
        kind, _, passes = CUDA_METHODS[r["method"]]
        numel, triad = triads[r["set"]]
        base = by_key.get((r["set"], BASELINE[kind]))
        bound_ms = triad * passes / 3
        r.update(baseline=BASELINE[kind], vs_baseline=r["median_ms"] / base["median_ms"] if base else None,
                 passes=passes, bound_ms=bound_ms, vs_bound=r["median_ms"] / bound_ms, status="ok")
    for (name, method), why in status.items():
        rows.append(dict(set=name, method=method, status=why))
    rows.sort(key=lambda r: (args.sets.index(r["set"]), args.methods.index(r["method"])))
    targets = cuda_targets(by_key, args.sets)

    from _common import machine_info, write_outputs
    props = torch.cuda.get_device_properties(0)
    meta = machine_info(device="cuda", steps=args.steps, sets=args.sets, methods=args.methods,
                        budget_s=args.budget_s)
    meta.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda, torch=torch.__version__,
                triad={n: dict(numel=k, ms=t, gb_s=3 * k * 4 / (t / 1e3) / 1e9) for n, (k, t) in triads.items()},
                targets=targets, wall_s=round(time.monotonic() - start, 1))
    out = Path(args.out)
    write_outputs(out, "torch_optimizer_cost_cuda", rows, meta)
    print(f"\n{props.name} ({meta['gpu_memory_gb']} GB, sm {meta['capability']}), torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, {args.steps} timed steps, run {meta['wall_s']} s")
    for name in args.sets:
        numel, triad = triads[name]
        set_rows = [r for r in rows if r["set"] == name]
        tensors = next((r["tensors"] for r in set_rows if "tensors" in r), "?")
        print(f"\n{name}: {tensors} tensors, {numel / 1e6:.1f}M params; triad {triad:.3f} ms "
              f"({meta['triad'][name]['gb_s']:.0f} GB/s)")
        print(f"{'method':<14} {'median ms':>10} {'host ms':>8} {'x base':>7} {'passes':>6} {'bound ms':>9} "
              f"{'x bound':>8} {'state MB':>9} {'transient MB':>13} {'warm-up s':>10}")
        for r in set_rows:
            if r["status"] != "ok":
                print(f"{r['method']:<14} {r['status']}")
                continue
            vs_base = f"{r['vs_baseline']:7.2f}" if r["vs_baseline"] is not None else f"{'-':>7}"
            print(f"{r['method']:<14} {r['median_ms']:10.3f} {r['host_ms']:8.3f} {vs_base} {r['passes']:6d} "
                  f"{r['bound_ms']:9.3f} {r['vs_bound']:8.2f} {r['state_mb']:9.0f} {r['transient_mb']:13.0f} "
                  f"{r['warmup_s']:10.1f}")
    print("\ntargets (reported, not asserted):")
    for t in targets:
        print(f"  {t['set']:<11} {t['what']:<34} {t['value'] if t['value'] is None else round(t['value'], 2)!s:>6} "
              f"(<= {t['limit']})  {t['verdict']}")
    try:
        cuda_chart(out / "torch_optimizer_cost_cuda.png", rows, args.sets)
    except ImportError as err:
        print(f"PNG not written: {err}")
    return 0 if not status else 1


def cuda_targets(by_key, sets):
    checks = []
    for name in sets:
        for method, baseline in (("lars_fused", "sgd_fused"), ("lamb_fused", "adamw_fused")):
            row, base = by_key.get((name, method)), by_key.get((name, baseline))
            value = row["median_ms"] / base["median_ms"] if row and base else None
            checks.append(dict(set=name, what=f"{method} / {baseline}", value=value, limit=TARGET_VS_BASELINE))
            value = row["vs_bound"] if row else None
            checks.append(dict(set=name, what=f"{method} / its {CUDA_METHODS[method][2]}-pass bound", value=value,
                               limit=TARGET_VS_BOUND))
    for c in checks:
        c["verdict"] = "n/a" if c["value"] is None else ("met" if c["value"] <= c["limit"] else "missed")
    return checks


def cuda_chart(path, rows, sets):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from _common import finish_figure
    fig, axes = plt.subplots(1, len(sets), figsize=(6.5 * len(sets), 3.6), squeeze=False)
    for ax, name in zip(axes[0], sets):
        ok = [r for r in rows if r["set"] == name and r.get("status") == "ok"]
        labels = [r["method"] for r in ok]
        ax.barh(labels, [r["median_ms"] for r in ok], color="tab:blue", label="median step")
        ax.scatter([r["bound_ms"] for r in ok], labels, color="tab:red", marker="|", s=300, zorder=3,
                   label="own memory-traffic bound")
        ax.invert_yaxis()
        ax.set_xlabel("step time, ms")
        ax.set_title(name)
    finish_figure(fig, axes[0], path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu (default): the rows above; cuda: the GPU rows (see the module docstring)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on cpu, 50 on cuda)")
    parser.add_argument("--methods", default=None)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 timed steps, SGD and foreach LARS only (no compile)")
    parser.add_argument("--sets", default=None,
                        help=f"cuda: parameter sets to time (default {','.join(PARAM_SETS)}; --quick: resnet50)")
    parser.add_argument("--budget-s", type=float, default=170.0, help="cuda: wall-clock cap for the whole run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda":
        return cuda_cli(parser, args)
    if args.steps is None:
        args.steps = 20
    if args.methods is None:
        args.methods = ",".join(METHODS)
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


def cuda_cli(parser, args):
    args.sets = (args.sets or ("resnet50" if args.quick else ",".join(PARAM_SETS))).split(",")
    unknown = [n for n in args.sets if n not in PARAM_SETS]
    if unknown:
        parser.error(f"--sets: unknown {unknown[0]!r}, expected some of {', '.join(PARAM_SETS)}")
    if args.steps is None:
        args.steps = 5 if args.quick else 50
    if args.child:
        measure_cuda(args.child, args.sets, args.steps)
        return 0
    if args.methods is None:
        args.methods = "sgd_fused,lars_foreach" if args.quick else ",".join(CUDA_METHODS)
    args.methods = args.methods.split(",")
    unknown = [m for m in args.methods if m not in CUDA_METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown[0]!r}, expected some of {', '.join(CUDA_METHODS)}")
    return main_cuda(args)


if __name__ == "__main__":
    sys.exit(main())
