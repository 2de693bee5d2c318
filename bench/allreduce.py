"""Allreduce latency/bandwidth: raw MPI (mpi4py ``Allreduce``) vs Horovod (``hvd.allreduce``),
fit of the α-β ring model and a projection of scaling efficiency and epoch time to 8..1024 workers.

Ring allreduce of n bytes over p workers (Patarasuk & Yuan 2009; Thakur et al. 2005):

    t(n, p) = 2(p-1)·α + 2·(p-1)/p · n·β        (α: per-message latency, β: seconds per byte)

The driver launches itself under ``horovodrun -np 2`` (``--np``), the ranks time both
implementations on float32 buffers (median of repeats, after warm-up), rank 0 writes the samples,
the driver fits (α, β) by least squares on t(n) for each implementation and projects

    step(p) = compute + t_allreduce(gradient bytes, p)      (no overlap; upper bound on cost)
    efficiency(p) = compute / step(p),   epoch(p) = ceil(images / (p·batch)) · step(p)

for a model (default ResNet-50, 25.6 M float32 parameters) and a per-worker compute time. The
measured α, β are intra-node shared memory; a second curve uses an assumed inter-node network
(--net-gbps, --net-latency-us) because on one machine nothing else can be measured.

    python bench/allreduce.py [--quick] [--out DIR] [--np 2] [--controller mpi|gloo]
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from _common import DEFAULT_OUT, finish_figure, machine_info, print_header, print_table, write_outputs  # noqa: E402

QUICK_SIZES = [4 << 10, 64 << 10, 1 << 20]
FULL_SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]


def reps_for(nbytes, quick):
    base = 5 if quick else 20
    return max(3, min(base, int(base * (1 << 20) / max(nbytes, 1)))) if nbytes > (1 << 20) else base


# ----------------------------------------------------------------------------------- rank side
def worker(args):
    import torch
    import horovod.torch as hvd
    hvd.init()
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    torch.set_num_threads(1)
    sizes = json.loads(args.sizes)
    rows = []
    for nbytes in sizes:
        n = nbytes // 4
        reps = reps_for(nbytes, args.quick)
        # raw MPI
        a = np.ones(n, np.float32)
        b = np.empty_like(a)
        for _ in range(2):
            comm.Allreduce(a, b, op=MPI.SUM)
        ts = []
        for _ in range(reps):
            comm.Barrier()
            t = time.perf_counter()
            comm.Allreduce(a, b, op=MPI.SUM)
            ts.append(time.perf_counter() - t)
        mpi_t = comm.allreduce(float(np.median(ts)), op=MPI.MAX)
        # Horovod
        x = torch.ones(n)
        for i in range(2):
            hvd.allreduce(x, op=hvd.Sum, name=f"w{nbytes}_{i}")
        ts = []
        for i in range(reps):
            comm.Barrier()
            t = time.perf_counter()
            hvd.allreduce(x, op=hvd.Sum, name=f"t{nbytes}_{i}")
            ts.append(time.perf_counter() - t)
        hvd_t = comm.allreduce(float(np.median(ts)), op=MPI.MAX)
        rows.append(dict(bytes=nbytes, reps=reps, mpi4py_s=mpi_t, horovod_s=hvd_t))
        if comm.rank == 0:
            print(f"   {nbytes:>10d} B  mpi4py {mpi_t * 1e6:10.1f} us  horovod {hvd_t * 1e6:10.1f} us", flush=True)
    if comm.rank == 0:
        Path(args.worker_out).write_text(json.dumps(dict(np=comm.size, rows=rows)))


# ----------------------------------------------------------------------------------- model
def fit_alpha_beta(sizes, times, p):
    """Least squares of t = 2(p-1)α + 2(p-1)/p·n·β, weighted by 1/t (relative error)."""
    n = np.asarray(sizes, float)
    t = np.asarray(times, float)
    A = np.stack([np.full_like(n, 2 * (p - 1)), 2 * (p - 1) / p * n], 1)
    w = 1.0 / t
    coef, *_ = np.linalg.lstsq(A * w[:, None], t * w, rcond=None)
    alpha, beta = float(max(coef[0], 0.0)), float(max(coef[1], 1e-15))
    return alpha, beta


def ring_time(nbytes, p, alpha, beta):
    return 0.0 if p == 1 else 2 * (p - 1) * alpha + 2 * (p - 1) / p * nbytes * beta


def project(alpha, beta, params, compute_s, batch, images, workers):
    nbytes = 4 * params
    out = []
    for p in workers:
        comm = ring_time(nbytes, p, alpha, beta)
        step = compute_s + comm
        out.append(dict(workers=p, allreduce_s=comm, step_s=step, efficiency=compute_s / step,
                        efficiency_overlap=min(1.0, compute_s / max(comm, 1e-12)),
                        epoch_s=math.ceil(images / (p * batch)) * step))
    return out


def plot(rows, fits, proj, settings, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4))
    n = np.array([r["bytes"] for r in rows], float)
    p = settings["np"]
    for key, m in (("mpi4py_s", "o"), ("horovod_s", "s")):
        ax1.loglog(n, [r[key] * 1e6 for r in rows], m, label=key[:-2])
        a, b = fits[key[:-2]]["alpha_s"], fits[key[:-2]]["beta_s_per_byte"]
        nn = np.logspace(np.log10(n.min()), np.log10(n.max()), 50)
        ax1.loglog(nn, [ring_time(x, p, a, b) * 1e6 for x in nn], "--", lw=1,
                   label=f"fit {key[:-2]}: α={a * 1e6:.1f}us, 1/β={1 / b / 1e9:.2f} GB/s")
    ax1.set_xlabel("message size (bytes)")
    ax1.set_ylabel("allreduce time (us)")
    ax1.set_title(f"allreduce, np={p} (measured)")
    for label, pr in proj.items():
        w = [r["workers"] for r in pr]
        ax2.semilogx(w, [100 * r["efficiency"] for r in pr], marker="o", label=label)
        ax3.loglog(w, [r["epoch_s"] / 60 for r in pr], marker="o", label=label)
    ax2.set_xscale("log", base=2)
    ax3.set_xscale("log", base=2)
    ax2.set_xlabel("workers")
    ax2.set_ylabel("projected scaling efficiency (%)")
    ax2.set_title(f"{settings['model']}: {settings['params'] / 1e6:.1f}M params, "
                  f"{settings['compute_s'] * 1e3:.0f} ms compute/step", fontsize=9)
    ax3.set_xlabel("workers")
    ax3.set_ylabel("projected epoch time (min)")
    ax3.set_title(f"{settings['images']} images/epoch, batch {settings['batch']}/worker", fontsize=9)
    finish_figure(fig, (ax1, ax2, ax3), path, legend_size=7, grid_which="both")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--np", type=int, default=2)
    ap.add_argument("--controller", choices=["mpi", "gloo"], default="mpi")
    ap.add_argument("--model", default="ResNet-50")
    ap.add_argument("--params", type=float, default=25.6e6, help="model parameters (float32 gradients)")
    ap.add_argument("--compute-s", type=float, default=0.1,
                    help="per-worker forward+backward time per step (default 0.1 s: ResNet-50, batch 32, "
                         "roughly a V100 in mixed precision)")
    ap.add_argument("--batch", type=int, default=32, help="per-worker batch")
    ap.add_argument("--images", type=int, default=1281167, help="images per epoch (ImageNet-1k)")
    ap.add_argument("--net-gbps", type=float, default=25.0, help="assumed inter-node link, Gbit/s")
    ap.add_argument("--net-latency-us", type=float, default=10.0, help="assumed inter-node latency")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a) or 0

    import horovod  # noqa: F401  (version in the header)
    import mpi4py  # noqa: F401
    import torch  # noqa: F401  (version in the header)
    sizes = QUICK_SIZES if a.quick else FULL_SIZES
    workers = [8, 16, 32, 64, 128, 256, 512, 1024]
    settings = dict(mode="quick" if a.quick else "full", np=a.np, controller=a.controller, sizes=sizes,
                    model=a.model, params=a.params, compute_s=a.compute_s, batch=a.batch, images=a.images,
                    net_gbps=a.net_gbps, net_latency_us=a.net_latency_us, threads_per_rank=1)
    meta = machine_info(**settings)
    print_header(meta, "allreduce: mpi4py vs Horovod, alpha-beta ring fit, projection")
    hvdrun = Path(sys.executable).with_name("horovodrun")
    hvdrun = str(hvdrun) if hvdrun.exists() else "horovodrun"
    tmp = Path(tempfile.mkdtemp(prefix="lb-allreduce-")) / "rank0.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               OMPI_MCA_btl_vader_single_copy_mechanism="none")
    cmd = [hvdrun, "-np", str(a.np), "-H", f"localhost:{a.np}", f"--{a.controller}", sys.executable,
           str(Path(__file__).resolve()), "--worker", "--sizes", json.dumps(sizes), "--worker-out", str(tmp)]
    if a.quick:
        cmd.append("--quick")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not tmp.exists():
        sys.stderr.write(f"allreduce: {' '.join(cmd)} exited {proc.returncode}\n{(proc.stdout + proc.stderr)[-4000:]}\n")
        return 1
    got = json.loads(tmp.read_text())
    rows = got["rows"]
    p = got["np"]
    for r in rows:
        for k in ("mpi4py", "horovod"):
            r[f"{k}_algbw_GBps"] = r["bytes"] / r[f"{k}_s"] / 1e9
            r[f"{k}_busbw_GBps"] = 2 * (p - 1) / p * r["bytes"] / r[f"{k}_s"] / 1e9
    fits = {}
    for k in ("mpi4py", "horovod"):
        alpha, beta = fit_alpha_beta([r["bytes"] for r in rows], [r[f"{k}_s"] for r in rows], p)
        fits[k] = dict(alpha_s=alpha, beta_s_per_byte=beta, bandwidth_GBps=1 / beta / 1e9)
    net_beta = 8 / (a.net_gbps * 1e9)
    proj_args = dict(params=a.params, compute_s=a.compute_s, batch=a.batch, images=a.images, workers=workers)
    proj = {
        "measured fit (horovod, intra-node)": project(fits["horovod"]["alpha_s"], fits["horovod"]["beta_s_per_byte"],
                                                       **proj_args),
        f"assumed {a.net_gbps:g} Gbit/s, {a.net_latency_us:g} us": project(a.net_latency_us * 1e-6, net_beta,
                                                                            **proj_args),
    }
    meta["fits"] = fits
    meta["projection"] = proj
    out = Path(a.out)
    csv_path, json_path = write_outputs(out, "allreduce", rows, meta)
    proj_rows = [dict(scenario=k, **r) for k, v in proj.items() for r in v]
    write_outputs(out, "allreduce_projection", proj_rows, meta)
    plot(rows, fits, proj, dict(settings, np=p), out / "allreduce.png")
    print()
    print_table(rows, ["bytes", "mpi4py_s", "horovod_s", "mpi4py_busbw_GBps", "horovod_busbw_GBps"],
                {"mpi4py_s": "{:.2e}", "horovod_s": "{:.2e}", "mpi4py_busbw_GBps": "{:.3f}",
                 "horovod_busbw_GBps": "{:.3f}"})
    for k, f in fits.items():
        print(f"   fit {k:8s}: alpha = {f['alpha_s'] * 1e6:.2f} us, beta = {f['beta_s_per_byte']:.3e} s/B "
              f"({f['bandwidth_GBps']:.2f} GB/s)")
    print(f"   projection for {a.model} ({a.params / 1e6:.1f}M params, {a.compute_s * 1e3:.0f} ms compute/step, "
          f"batch {a.batch}/worker, no compute/communication overlap):")
    print_table(proj_rows, ["scenario", "workers", "allreduce_s", "efficiency", "epoch_s"],
                {"allreduce_s": "{:.4f}", "efficiency": "{:.3f}", "epoch_s": "{:.1f}"})
    print(f"   wrote {csv_path}, {json_path}, {out / 'allreduce.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
