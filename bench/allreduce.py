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

With hosts (``-H h1:1,h2:1`` or ``--hostfile F``, plus ``--ssh-port``, ``--ssh-identity``,
``--network-interface``, handed to horovodrun as ``--ssh-port``, ``--ssh-identity-file``,
``--network-interfaces``) the ranks run on those hosts, Horovod's allreduce is timed under each
controller (``--controllers mpi gloo``; raw mpi4py too under MPI), the raw TCP bandwidth between
the first two hosts is measured with iperf3 over ssh (a Python socket probe where iperf3 is
missing), and each row reports bus bandwidth ÷ link bandwidth. The α-β fitted across the hosts
drives the projection. Hosts that share this machine's kernel (network namespaces, e.g.
``python -m largebatch.launchers.testcluster up``) share its cores and memory: that models a
network, not a cluster, and the output says so. Writes ``allreduce_hosts.{csv,json,png}``.

    python bench/allreduce.py [--quick] [--out DIR] [--np 2] [--controller mpi|gloo]
    python bench/allreduce.py -H lbh1:1,lbh2:1 --ssh-port 2222 --ssh-identity KEY --network-interface eth0
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from largebatch.planning import ring_allreduce_time  # noqa: E402

from _common import (DEFAULT_OUT, SAME_MACHINE_NOTE, add_host_args, engine_launch, finish_figure,  # noqa: E402
                     hosts_from_args, machine_info, print_header, print_table, run_bounded,
                     same_machine, ssh_argv, write_outputs)

RESULT_MARK = "LB_ALLREDUCE_RESULT "     # rank 0's result line in horovodrun's output (hosts need no shared /tmp)

WORKERS = [8, 16, 32, 64, 128, 256, 512, 1024]
QUICK_SIZES = [4 << 10, 64 << 10, 1 << 20]
FULL_SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]


def reps_for(nbytes, quick):
    base = 5 if quick else 20
    return max(3, min(base, int(base * (1 << 20) / max(nbytes, 1)))) if nbytes > (1 << 20) else base


# ----------------------------------------------------------------------------------- rank side
def torch_worker(args):
    """torch.distributed's allreduce (gloo; started by torchrun), timed as Horovod's is."""
    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    size, rank = dist.get_world_size(), dist.get_rank()
    rows = []
    for nbytes in json.loads(args.sizes):
        reps = reps_for(nbytes, args.quick)
        x = torch.ones(nbytes // 4)
        for _ in range(2):
            dist.all_reduce(x)
        ts = []
        for _ in range(reps):
            dist.barrier()
            t = time.perf_counter()
            dist.all_reduce(x)
            ts.append(time.perf_counter() - t)
        slowest = torch.tensor([float(np.median(ts))], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        rows.append(dict(bytes=nbytes, reps=reps, torch_s=float(slowest)))
        if rank == 0:
            print(f"   {nbytes:>10d} B  torch.distributed/gloo {rows[-1]['torch_s'] * 1e6:10.1f} us", flush=True)
    if rank == 0:
        print(RESULT_MARK + json.dumps(dict(np=size, controller="ddp", rows=rows)), flush=True)
    dist.destroy_process_group()


def worker(args):
    if args.controller == "ddp":
        return torch_worker(args)
    import torch
    import horovod.torch as hvd
    hvd.init()
    torch.set_num_threads(1)
    if args.controller == "mpi":           # raw MPI next to Horovod; barriers and max over ranks in MPI
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        barrier = comm.Barrier

        def slowest(v, tag):
            return comm.allreduce(v, op=MPI.MAX)
    else:                                  # Gloo: no MPI world; barriers and max through Horovod
        comm = None

        def barrier(tag="b"):
            hvd.allreduce(torch.zeros(1), name=tag)

        def slowest(v, tag):
            return float(hvd.allgather(torch.tensor([v], dtype=torch.float64), name=tag).max())
    size, rank = hvd.size(), hvd.rank()
    sizes = json.loads(args.sizes)
    rows = []
    for nbytes in sizes:
        n = nbytes // 4
        reps = reps_for(nbytes, args.quick)
        row = dict(bytes=nbytes, reps=reps)
        if comm is not None:   # raw MPI
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
            row["mpi4py_s"] = slowest(float(np.median(ts)), f"m{nbytes}")
        # Horovod
        x = torch.ones(n)
        for i in range(2):
            hvd.allreduce(x, op=hvd.Sum, name=f"w{nbytes}_{i}")
        ts = []
        for i in range(reps):
            barrier(f"b{nbytes}_{i}") if comm is None else barrier()
            t = time.perf_counter()
            hvd.allreduce(x, op=hvd.Sum, name=f"t{nbytes}_{i}")
            ts.append(time.perf_counter() - t)
        row["horovod_s"] = slowest(float(np.median(ts)), f"h{nbytes}")
        rows.append(row)
        if rank == 0:
            mpi = f"mpi4py {row['mpi4py_s'] * 1e6:10.1f} us  " if "mpi4py_s" in row else ""
            print(f"   {nbytes:>10d} B  {mpi}horovod/{args.controller} {row['horovod_s'] * 1e6:10.1f} us", flush=True)
    if rank == 0:
        result = json.dumps(dict(np=size, controller=args.controller, rows=rows))
        print(RESULT_MARK + result, flush=True)


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


def project(alpha, beta, params, compute_s, batch, images, workers):
    nbytes = 4 * params
    out = []
    for p in workers:
        comm = ring_allreduce_time(nbytes, p, alpha, beta)
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
    for key, m in (("mpi4py_s", "o"), ("horovod_s", "s"), ("torch_gloo_s", "^")):
        if key[:-2] not in fits:
            continue
        ax1.loglog(n, [r[key] * 1e6 for r in rows], m, label=key[:-2])
        a, b = fits[key[:-2]]["alpha_s"], fits[key[:-2]]["beta_s_per_byte"]
        nn = np.logspace(np.log10(n.min()), np.log10(n.max()), 50)
        ax1.loglog(nn, [ring_allreduce_time(x, p, a, b) * 1e6 for x in nn], "--", lw=1,
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


# ----------------------------------------------------------------------------------- link probe
def link_server(addr, port, limit_s):
    """One connection: echo 1-byte pings until 'B', then count bytes to EOF and send the count back."""
    import socket
    with socket.create_server((addr, port)) as srv:
        srv.settimeout(limit_s)
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(limit_s)
            while True:
                b = conn.recv(1)
                if b == b"p":
                    conn.sendall(b"p")
                elif b == b"B":
                    break
                else:
                    return 1
            total, buf = 0, bytearray(1 << 20)
            while True:
                n = conn.recv_into(buf)
                if not n:
                    break
                total += n
            conn.sendall(total.to_bytes(8, "big"))
    return 0


def link_client(addr, port, seconds, pings=200, connect_tries=40):
    """Connect (retrying while the server starts), time 1-byte round trips, then stream 1 MiB
    chunks for ``seconds``; print the result as one JSON line."""
    import socket
    for i in range(connect_tries):
        try:
            sock = socket.create_connection((addr, port), timeout=10)
            break
        except OSError:
            if i == connect_tries - 1:
                raise
            time.sleep(0.25)
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = []
        for _ in range(pings):
            t = time.perf_counter()
            sock.sendall(b"p")
            if sock.recv(1) != b"p":
                raise RuntimeError("link probe: server did not echo")
            rtts.append(time.perf_counter() - t)
        sock.sendall(b"B")
        chunk = bytes(1 << 20)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while len(got) < 8:
            part = sock.recv(8 - len(got))
            if not part:
                raise RuntimeError("link probe: server closed without a byte count")
            got += part
        elapsed = time.perf_counter() - t0
    received = int.from_bytes(got, "big")
    print(json.dumps(dict(tool="socket", bits_per_second=8 * received / elapsed, rtt_us=1e6 * float(np.median(rtts)),
                          bytes=received, seconds=elapsed)), flush=True)
    return 0


def _resolve(name):
    import socket
    try:
        return socket.gethostbyname(name)
    except OSError:
        return name


def measure_link(a, server, client):
    """Raw TCP bandwidth (one stream, client -> server) between two hosts, run there over ssh.
    Returns dict(tool, link_GBps, link_rtt_us, ...) or raises RuntimeError with the reason."""
    addr = _resolve(server)
    tool = a.link_probe
    if tool == "auto":
        have = [subprocess.run(ssh_argv(a, h, "command -v iperf3"), capture_output=True, text=True, timeout=20,
                               stdin=subprocess.DEVNULL).returncode == 0 for h in (server, client)]
        tool = "iperf3" if all(have) else "socket"
    limit = int(30 + a.link_seconds)
    if tool == "iperf3":
        srv_cmd = f"timeout {limit} iperf3 -s -1 -B {addr} -p {a.link_port}"
        cli_cmd = f"iperf3 -c {addr} -p {a.link_port} -J -t {max(1, round(a.link_seconds))}"   # whole s; 0 = forever
    else:
        me = f"{sys.executable} {Path(__file__).resolve()}"
        srv_cmd = f"timeout {limit} {me} --link-server {addr} {a.link_port} --link-seconds {a.link_seconds:g}"
        cli_cmd = f"{me} --link-client {addr} {a.link_port} --link-seconds {a.link_seconds:g}"
    srv = subprocess.Popen(ssh_argv(a, server, srv_cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           stdin=subprocess.DEVNULL, start_new_session=True)
    done = False
    try:
        res, error = None, "not run"
        for _ in range(20):                 # iperf3's client does not retry while the server starts
            proc = subprocess.run(ssh_argv(a, client, cli_cmd), capture_output=True, text=True,
                                  timeout=limit + 20, stdin=subprocess.DEVNULL)
            out = proc.stdout
            try:                            # iperf3 -J exits 0 with {"error": ...} when it cannot connect
                res = json.loads(out) if tool == "iperf3" else json.loads(out.strip().splitlines()[-1])
                error = res.get("error")
            except (ValueError, IndexError):
                res, error = None, (out + proc.stderr).strip()[-400:] or f"exit {proc.returncode}"
            if proc.returncode != 0 and not error:
                error = f"exit {proc.returncode}: {(out + proc.stderr).strip()[-400:]}"
            if tool != "iperf3" or not error or not any(s in error for s in ("unable to connect", "refused")):
                break
            time.sleep(0.3)
        if error:
            raise RuntimeError(f"{tool} {client} -> {server}: {error}")
        if tool == "iperf3":
            end = res["end"]
            bps = end["sum_received"]["bits_per_second"]
            rtt = (end.get("streams") or [{}])[0].get("sender", {}).get("mean_rtt")
            info = dict(tool="iperf3", bits_per_second=bps, rtt_us=rtt, seconds=end["sum_received"].get("seconds"),
                        retransmits=end.get("sum_sent", {}).get("retransmits"),
                        rtt_note="iperf3 mean_rtt of the loaded stream (kernel TCP_INFO)")
        else:
            info = res
            info["rtt_note"] = "median 1-byte round trip, TCP_NODELAY"
        done = True
    finally:
        try:
            if not done:
                raise subprocess.TimeoutExpired(srv.args, 0)
            srv.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(srv.pid, 9)            # our own ssh; the remote side is bounded by `timeout`
            srv.communicate(timeout=5)
    info.update(server=server, client=client, address=addr, link_GBps=info["bits_per_second"] / 8e9,
                link_Gbit_s=info["bits_per_second"] / 1e9)
    return info


# ----------------------------------------------------------------------------------- several hosts
def plot_hosts(rows, fits, impls, link, proj, p, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    n = np.array([r["bytes"] for r in rows], float)
    nn = np.logspace(np.log10(n.min()), np.log10(n.max()), 50)
    for k, m, c in zip(impls, "osd^", ("tab:blue", "tab:orange", "tab:green", "tab:purple")):
        ax1.loglog(n, [r[f"{k}_s"] * 1e6 for r in rows], m, color=c, label=k)
        a_, b_ = fits[k]["alpha_s"], fits[k]["beta_s_per_byte"]
        ax1.loglog(nn, [ring_allreduce_time(x, p, a_, b_) * 1e6 for x in nn], "--", lw=1, color=c,
                   label=f"fit {k}: α={a_ * 1e6:.0f}us, 1/β={1 / b_ / 1e9:.2f} GB/s")
        ax2.semilogx(n, [r[f"{k}_busbw_GBps"] for r in rows], marker=m, color=c, label=f"{k} bus bandwidth")
    if link:
        ax2.axhline(link["link_GBps"], color="tab:red", ls="--", label=f"TCP link ({link['tool']}) "
                                                                        f"{link['link_GBps']:.2f} GB/s")
    ax1.set_xlabel("message size (bytes)")
    ax1.set_ylabel("allreduce time (us)")
    ax1.set_title(f"allreduce across hosts, np={p}", fontsize=9)
    ax2.set_xlabel("message size (bytes)")
    ax2.set_ylabel("GB/s")
    ax2.set_title("bus bandwidth vs raw TCP between the hosts", fontsize=9)
    for label, pr in proj.items():
        ax3.semilogx([r["workers"] for r in pr], [100 * r["efficiency"] for r in pr], marker="o", label=label)
    ax3.set_xscale("log", base=2)
    ax3.set_xlabel("workers")
    ax3.set_ylabel("projected scaling efficiency (%)")
    ax3.set_title("projection from the across-host fit (no overlap)", fontsize=9)
    fig.suptitle("namespace hosts share one machine: a model of a network, not a cluster"
                 if rows and rows[0].get("same_machine") else "", fontsize=9)
    finish_figure(fig, (ax1, ax2, ax3), path, legend_size=7, grid_which="both")


def _write_with_projection(out, stem, rows, meta, fits, proj):
    """<stem>.csv/json with the fits and projection in meta, and <stem>_projection.csv/json;
    returns (csv path, json path, the projection's rows)."""
    meta["fits"] = fits
    meta["projection"] = proj
    csv_path, json_path = write_outputs(out, stem, rows, meta)
    proj_rows = [dict(scenario=k, **r) for k, v in proj.items() for r in v]
    write_outputs(out, f"{stem}_projection", proj_rows, meta)
    return csv_path, json_path, proj_rows


# the engines timed (--controllers) and their columns
ENGINES = {"mpi": "horovodrun --mpi", "gloo": "horovodrun --gloo", "ddp": "torchrun (torch.distributed, gloo)"}
IMPL = {"mpi": "horovod_mpi", "gloo": "horovod_gloo", "ddp": "torch_gloo"}


def _engine_command(a, ctl, placed, sizes):
    """(argv, env) that runs this file's ranks on ``placed`` under the engine ``ctl``."""
    program = [sys.executable, str(Path(__file__).resolve()), "--worker", "--controller", ctl,
               "--sizes", json.dumps(sizes)] + (["--quick"] if a.quick else [])
    argv, extra = engine_launch(a, ctl, placed, program, rendezvous_port=a.rendezvous_port)
    return argv, {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                  "OMPI_MCA_btl_vader_single_copy_mechanism": "none", **extra}


def _time_engines(a, engines, placed, sizes):
    """{engine: rank 0's result} for each engine, one launch each; None after a failed launch."""
    results = {}
    for ctl in engines:
        cmd, env = _engine_command(a, ctl, placed, sizes)
        t = time.monotonic()
        rc, out = run_bounded(cmd, env, a.timeout)
        got = [line.split(RESULT_MARK, 1)[1] for line in out.splitlines() if RESULT_MARK in line]
        if rc != 0 or not got:
            sys.stderr.write(f"allreduce: {' '.join(cmd)} exited {rc}\n{out[-4000:]}\n")
            return None
        results[ctl] = json.JSONDecoder().raw_decode(got[-1])[0]    # horovodrun may glue output on
        print(f"   {ENGINES[ctl]}: {time.monotonic() - t:.1f} s", flush=True)
    return results


def main_hosts(a, hosts):
    from largebatch import hostfile as hf
    import horovod  # noqa: F401  (version in the header)
    import torch  # noqa: F401
    np_ = a.np or hf.total_slots(hosts)
    placed = hf.place_ranks(np_, hosts)
    names = [h for h, _ in placed]
    sizes = a.message_bytes or (QUICK_SIZES if a.quick else FULL_SIZES)
    controllers = a.controllers or ["mpi", "gloo", "ddp"]
    settings = dict(mode="quick" if a.quick else "full", np=np_, hosts=hf.hosts_arg(placed), controllers=controllers,
                    sizes=sizes, network_interface=a.network_interface, ssh_port=a.ssh_port,
                    link_probe=a.link_probe, link_seconds=a.link_seconds, model=a.model, params=a.params,
                    compute_s=a.compute_s, batch=a.batch, images=a.images, net_gbps=a.net_gbps,
                    net_latency_us=a.net_latency_us, threads_per_rank=1)
    meta = machine_info(**settings)
    print_header(meta, f"allreduce across hosts {hf.hosts_arg(placed)}: {', '.join(ENGINES[c] for c in controllers)} "
                       "vs the raw TCP link, alpha-beta fit, projection")
    same = same_machine(a, names)
    meta["same_machine"] = same
    if same:
        meta["note"] = SAME_MACHINE_NOTE
        print(f"   NOTE: {SAME_MACHINE_NOTE}", flush=True)
    link = None
    if a.link_probe != "none" and len(set(names)) >= 2:
        try:
            link = measure_link(a, names[0], names[1])
        except (RuntimeError, ValueError, KeyError, subprocess.TimeoutExpired) as err:
            sys.stderr.write(f"allreduce: link probe failed, no bus/link ratio: {err}\n")
        else:
            print(f"   TCP link {link['client']} -> {link['server']} ({link['tool']}, one stream): "
                  f"{link['link_Gbit_s']:.2f} Gbit/s = {link['link_GBps']:.3f} GB/s, rtt "
                  f"{'%.0f' % link['rtt_us'] if link['rtt_us'] is not None else '?'} us", flush=True)
    elif len(set(names)) < 2:
        print("   one host only: no link to measure", flush=True)
    meta["link"] = link
    results = _time_engines(a, controllers, placed, sizes)
    if results is None:
        return 1
    p = results[controllers[0]]["np"]
    impls = [IMPL[c] for c in controllers] + (["mpi4py"] if "mpi" in controllers else [])
    rows = []
    for i, nbytes in enumerate(sizes):
        r = dict(bytes=nbytes, hosts=hf.hosts_arg(placed), np=p)
        for ctl, res in results.items():
            rr = res["rows"][i]
            r[f"{IMPL[ctl]}_s"] = rr["torch_s" if ctl == "ddp" else "horovod_s"]
            if "mpi4py_s" in rr:
                r["mpi4py_s"] = rr["mpi4py_s"]
        r["link_GBps"] = link["link_GBps"] if link else None
        for k in impls:
            busbw = 2 * (p - 1) / p * nbytes / r[f"{k}_s"] / 1e9
            r[f"{k}_busbw_GBps"] = busbw
            r[f"{k}_bus_over_link"] = busbw / link["link_GBps"] if link else None
        r["same_machine"] = same
        rows.append(r)
    fits = {}
    for k in impls:
        alpha, beta = fit_alpha_beta(sizes, [r[f"{k}_s"] for r in rows], p)
        fits[k] = dict(alpha_s=alpha, beta_s_per_byte=beta, bandwidth_GBps=1 / beta / 1e9,
                       bandwidth_over_link=(1 / beta / 1e9) / link["link_GBps"] if link else None)
    proj_args = dict(params=a.params, compute_s=a.compute_s, batch=a.batch, images=a.images, workers=WORKERS)
    what = "namespace hosts" if same else "across hosts"
    proj = {f"measured fit ({k}, {what})": project(fits[k]["alpha_s"], fits[k]["beta_s_per_byte"], **proj_args)
            for k in impls if k != "mpi4py"}
    if link:
        proj[f"raw TCP link ({link['link_Gbit_s']:.1f} Gbit/s), α of {IMPL[controllers[0]]}"] = project(
            fits[IMPL[controllers[0]]]["alpha_s"], 1 / (link["link_GBps"] * 1e9), **proj_args)
    proj[f"assumed {a.net_gbps:g} Gbit/s, {a.net_latency_us:g} us"] = project(
        a.net_latency_us * 1e-6, 8 / (a.net_gbps * 1e9), **proj_args)
    out = Path(a.out)
    csv_path, json_path, proj_rows = _write_with_projection(out, "allreduce_hosts", rows, meta, fits, proj)
    plot_hosts(rows, fits, impls, link, proj, p, out / "allreduce_hosts.png")
    print()
    cols = ["bytes", *(f"{k}_s" for k in impls), *(f"{k}_busbw_GBps" for k in impls), "link_GBps",
            *(f"{k}_bus_over_link" for k in impls)]
    print_table(rows, cols, {c: ("{:.2e}" if c.endswith("_s") else "{:.3f}") for c in cols if c != "bytes"})
    for k, f in fits.items():
        ratio = f" = {f['bandwidth_over_link']:.2f} x link" if f["bandwidth_over_link"] is not None else ""
        print(f"   fit {k:13s}: alpha = {f['alpha_s'] * 1e6:.1f} us, beta = {f['beta_s_per_byte']:.3e} s/B "
              f"({f['bandwidth_GBps']:.3f} GB/s{ratio})")
    print("   bus bandwidth = 2(p-1)/p * bytes / time; link = one TCP stream between the first two hosts")
    print(f"   projection for {a.model} ({a.params / 1e6:.1f}M params, {a.compute_s * 1e3:.0f} ms compute/step, "
          f"batch {a.batch}/worker, no compute/communication overlap):")
    print_table([r for r in proj_rows if r["workers"] in (8, 64, 256, 1024)],
                ["scenario", "workers", "allreduce_s", "efficiency", "epoch_s"],
                {"allreduce_s": "{:.4f}", "efficiency": "{:.3f}", "epoch_s": "{:.1f}"})
    if same:
        print(f"   NOTE: {SAME_MACHINE_NOTE}")
    print(f"   wrote {csv_path}, {json_path}, {out / 'allreduce_hosts.png'}")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--np", type=int, help="ranks (default 2; with hosts: every slot)")
    ap.add_argument("--controller", choices=["mpi", "gloo", "ddp"], default="mpi",
                    help="one host: Horovod's controller beside torch.distributed (default mpi)")
    ap.add_argument("--model", default="ResNet-50")
    ap.add_argument("--params", type=float, default=25.6e6, help="model parameters (float32 gradients)")
    ap.add_argument("--compute-s", type=float, default=0.1,
                    help="per-worker forward+backward time per step (default 0.1 s: ResNet-50, batch 32, "
                         "roughly a V100 in mixed precision)")
    ap.add_argument("--batch", type=int, default=32, help="per-worker batch")
    ap.add_argument("--images", type=int, default=1281167, help="images per epoch (ImageNet-1k)")
    ap.add_argument("--net-gbps", type=float, default=25.0, help="assumed inter-node link, Gbit/s")
    ap.add_argument("--net-latency-us", type=float, default=10.0, help="assumed inter-node latency")
    add_host_args(ap)
    ap.add_argument("--controllers", nargs="+", choices=["mpi", "gloo", "ddp"],
                    help="the engines to time: Horovod's controllers (one horovodrun each) and ddp, "
                         "torch.distributed under torchrun (default: with hosts mpi gloo ddp; on one host "
                         "--controller and ddp)")
    ap.add_argument("--rendezvous-port", type=int, default=29400,
                    help="ddp across hosts: torchrun's c10d rendezvous port on the first host")
    ap.add_argument("--message-bytes", type=int, nargs="+", metavar="N",
                    help="message sizes in bytes (default: the --quick or full list)")
    ap.add_argument("--link-probe", choices=["auto", "iperf3", "socket", "none"], default="auto",
                    help="with hosts: how the raw TCP bandwidth between the first two hosts is measured "
                         "(auto: iperf3 where both hosts have it, else a Python socket probe)")
    ap.add_argument("--link-seconds", type=float, default=3.0, help="duration of the link probe")
    ap.add_argument("--link-port", type=int, default=5201, help="TCP port of the link probe's server")
    ap.add_argument("--timeout", type=float, default=600, help="limit for each horovodrun, seconds")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--link-server", nargs=2, metavar=("ADDR", "PORT"), help=argparse.SUPPRESS)
    ap.add_argument("--link-client", nargs=2, metavar=("ADDR", "PORT"), help=argparse.SUPPRESS)
    ap.add_argument("--sizes", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a) or 0
    if a.link_server:
        return link_server(a.link_server[0], int(a.link_server[1]), limit_s=30 + a.link_seconds)
    if a.link_client:
        return link_client(a.link_client[0], int(a.link_client[1]), a.link_seconds)
    hosts = hosts_from_args(a)
    if hosts is not None:
        return main_hosts(a, hosts)
    a.np = a.np or 2

    import horovod  # noqa: F401  (version in the header)
    import mpi4py  # noqa: F401
    import torch  # noqa: F401  (version in the header)
    sizes = a.message_bytes or (QUICK_SIZES if a.quick else FULL_SIZES)
    workers = WORKERS
    settings = dict(mode="quick" if a.quick else "full", np=a.np, controller=a.controller, sizes=sizes,
                    model=a.model, params=a.params, compute_s=a.compute_s, batch=a.batch, images=a.images,
                    net_gbps=a.net_gbps, net_latency_us=a.net_latency_us, threads_per_rank=1)
    meta = machine_info(**settings)
    print_header(meta, "allreduce: mpi4py vs Horovod vs torch.distributed, alpha-beta ring fit, projection")
    engines = a.controllers or [a.controller, "ddp"]
    results = _time_engines(a, engines, [("localhost", a.np)], sizes)
    if results is None:
        return 1
    base = next((c for c in engines if c != "ddp"), "ddp")          # Horovod's rows, torch's beside them
    rows, p = results[base]["rows"], results[base]["np"]
    if "ddp" in results:
        for r, t in zip(rows, results["ddp"]["rows"]):
            r["torch_gloo_s"] = t["torch_s"]
    impls = [k for k in ("mpi4py", "horovod", "torch_gloo") if all(f"{k}_s" in r for r in rows)]
    for r in rows:
        for k in impls:
            r[f"{k}_algbw_GBps"] = r["bytes"] / r[f"{k}_s"] / 1e9
            r[f"{k}_busbw_GBps"] = 2 * (p - 1) / p * r["bytes"] / r[f"{k}_s"] / 1e9
    fits = {}
    for k in impls:
        alpha, beta = fit_alpha_beta([r["bytes"] for r in rows], [r[f"{k}_s"] for r in rows], p)
        fits[k] = dict(alpha_s=alpha, beta_s_per_byte=beta, bandwidth_GBps=1 / beta / 1e9)
    net_beta = 8 / (a.net_gbps * 1e9)
    proj_args = dict(params=a.params, compute_s=a.compute_s, batch=a.batch, images=a.images, workers=workers)
    proj = {
        **{f"measured fit ({k}, intra-node)": project(fits[k]["alpha_s"], fits[k]["beta_s_per_byte"], **proj_args)
           for k in impls if k != "mpi4py"},
        f"assumed {a.net_gbps:g} Gbit/s, {a.net_latency_us:g} us": project(a.net_latency_us * 1e-6, net_beta,
                                                                            **proj_args),
    }
    out = Path(a.out)
    csv_path, json_path, proj_rows = _write_with_projection(out, "allreduce", rows, meta, fits, proj)
    plot(rows, fits, proj, dict(settings, np=p), out / "allreduce.png")
    print()
    print_table(rows, ["bytes", *(f"{k}_s" for k in impls), *(f"{k}_busbw_GBps" for k in impls)],
                {c: ("{:.2e}" if c.endswith("_s") else "{:.3f}") for k in impls for c in (f"{k}_s", f"{k}_busbw_GBps")})
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
