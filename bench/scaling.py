"""Scaling efficiency of synthetic-data training: images/s for np = 1..N, PyTorch and Keras 3, SGD
vs LARS, on three engines: Horovod with its MPI or Gloo controller (horovodrun), and, for
PyTorch, torch.distributed (``--controllers ddp``: torchrun, gloo, DistributedDataParallel).

What is compared (CPU): the same total cores in every run. np=1 runs with ``--cores`` threads,
np=N with cores/N threads per rank (the launcher's rule: threads per rank = cores per host ÷
ranks per host). Every rank trains the same small CNN (``largebatch.torch.models.SmallCNN`` /
``largebatch.keras.models.small_cnn``, with BN) on random 3×32×32 data at a fixed per-rank batch
(weak scaling, Horovod's definition), gradients averaged with ``hvd.DistributedOptimizer`` (torch)
or ``largebatch.keras.DistributedOptimizer`` (Keras, ``train_on_batch``). Throughput is measured as a total, not rank 0 × N:

    total(N) = Σ_ranks images / max_ranks wall time        (timed between barriers, after warm-up)
    efficiency(N) = total(N) / (N × total(1))

On a machine with fewer cores than N × threads this measures oversubscription, not Horovod;
with cores fixed, efficiency < 1 mostly shows the per-rank compute getting fewer threads.

What N ranks add to one update (``added_ms``) is split in two (``--split-added``, the default
outside ``--quick``): every rank also times each optimizer without gradient averaging, in the same
interleaved rounds, so ``shared_ms`` is what the ranks cost each other by sharing the machine and
``averaging_ms`` what Horovod's allreduce (and the wait for the slower rank) adds on top.
``horovod_thread_cpu`` is the CPU time of the threads ``hvd.init()`` started over the timed wall
time, on the busiest rank.

With hosts (``-H h1:1,h2:1`` or ``--hostfile F``, plus ``--ssh-port``, ``--ssh-identity``,
``--network-interface``, handed to horovodrun as ``--ssh-port``, ``--ssh-identity-file``,
``--network-interfaces``) the ranks of each np are placed on the hosts in order (horovodrun's
rule), ``--cores`` is cores per host and threads per rank = cores ÷ ranks on the fullest host.
Hosts that share this machine's kernel (network namespaces) share its cores and memory: that
models a network, not a cluster, and the output says so.

    python bench/scaling.py [--quick] [--out DIR] [--np 1 2] [--controllers mpi gloo ddp] [--frameworks torch keras]
    python bench/scaling.py -H lbh1:1,lbh2:1 --ssh-port 2222 --ssh-identity KEY --network-interface eth0 --cores 1
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import (DEFAULT_OUT, SAME_MACHINE_NOTE, add_host_args, engine_launch, finish_figure,  # noqa: E402
                     hosts_from_args, machine_info, print_header, print_table, run_bounded,
                     same_machine, write_outputs)


RESULT_MARK = "LB_SCALING_RESULT "      # rank 0's result line in horovodrun's output (hosts need no shared /tmp)


LOCAL = "/local"       # a result key's suffix: the same step without gradient averaging (--split-added)


def variants(a, size):
    """(optimizer, local) pairs to time: each optimizer averaged, and with --split-added at np > 1 the same
    model and optimizer without Horovod's averaging, timed in the same rounds (the same machine load)."""
    names = a.optimizers.split(",")
    return [(n, False) for n in names] + [(n, True) for n in names if a.split_added and size > 1]


def _tasks():
    try:
        return set(os.listdir("/proc/self/task"))
    except OSError:                  # no procfs: the thread columns stay empty
        return set()


def horovod_init(hvd):
    """hvd.init(), returning the ids of the threads it started (Horovod's background loop and its
    controller's helpers), whose CPU time the worker reports."""
    before = _tasks()
    hvd.init()
    return _tasks() - before


def thread_cpu_s(tids):
    """CPU seconds (user + system) used so far by these threads of this process; None without procfs."""
    if not tids:
        return None
    total = 0
    for tid in tids:
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:              # the thread has ended
            continue
        total += int(fields[11]) + int(fields[12])         # utime, stime (clock ticks)
    return total / os.sysconf("SC_CLK_TCK")


ENGINES = {"mpi": "horovod mpi", "gloo": "horovod gloo", "ddp": "torch.distributed gloo"}


def torch_problem(a):
    """The per-rank batch (random 3x32x32 images, 10 classes) with the threads set."""
    import torch
    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    return torch.randn(a.batch, 3, 32, 32), torch.randint(0, 10, (a.batch,))


def torch_model_and_optimizer(a, opt_name, size):
    """The same SmallCNN (seeded) and SGD or LARS, lr scaled by the world size, for every engine."""
    import torch
    from largebatch.torch import LARS
    from largebatch.torch.models import SmallCNN
    torch.manual_seed(0)
    model = SmallCNN(10, 3, a.width, batchnorm=True)
    if opt_name == "sgd":
        return model, torch.optim.SGD(model.parameters(), lr=0.1 * size, momentum=0.9, weight_decay=5e-4)
    return model, LARS(model.parameters(), lr=1.0 * size, momentum=0.9, weight_decay=5e-4)


def ddp_setups(a):
    """The same for PyTorch on torch.distributed (torchrun): the gradients averaged by
    DistributedDataParallel during backward, the barriers and maxima through its gloo group."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from largebatch.torch import TorchDistributed
    before = _tasks()
    dist.init_process_group("gloo")
    started, engine = _tasks() - before, TorchDistributed()
    x, y = torch_problem(a)
    steps = {}
    for opt_name, local in variants(a, engine.size()):
        model, opt = torch_model_and_optimizer(a, opt_name, engine.size())
        forward = model if local else torch.nn.parallel.DistributedDataParallel(model)

        def step(forward=forward, opt=opt):
            opt.zero_grad()
            F.cross_entropy(forward(x), y).backward()
            opt.step()
        steps[opt_name + LOCAL * local] = step
    return (steps, started, engine.size(), engine.rank(), lambda tag: engine.allreduce(torch.zeros(1), "sum"),
            lambda v, tag: float(engine.allgather(torch.tensor([v])).max()))


def torch_setups(a):
    """{optimizer: step()} for PyTorch, plus (size, rank, barrier(tag), max_over_ranks(value, tag))."""
    if a.controller == "ddp":
        return ddp_setups(a)
    import torch
    import torch.nn.functional as F
    import horovod.torch as hvd
    started = horovod_init(hvd)
    x, y = torch_problem(a)
    steps = {}
    for opt_name, local in variants(a, hvd.size()):
        model, opt = torch_model_and_optimizer(a, opt_name, hvd.size())
        if not local:
            opt = hvd.DistributedOptimizer(opt, named_parameters=[(f"{opt_name}.{n}", p)
                                                                  for n, p in model.named_parameters()])
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)

        def step(model=model, opt=opt):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        steps[opt_name + LOCAL * local] = step
    return (steps, started, hvd.size(), hvd.rank(), lambda tag: hvd.allreduce(torch.zeros(1), name=tag),
            lambda v, tag: float(hvd.allgather(torch.tensor([v]), name=tag).max()))


def keras_setups(a):
    """The same for Keras 3: the same network (largebatch.keras.models.small_cnn with BN), Keras
    SGD or largebatch.keras.LARS inside largebatch.keras.DistributedOptimizer, train_on_batch."""
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(a.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras
    import numpy as np
    import horovod.tensorflow as hvd
    from largebatch.keras import LARS, DistributedOptimizer
    from largebatch.keras.models import small_cnn
    started = horovod_init(hvd)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((a.batch, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, a.batch)
    steps = {}
    for opt_name, local in variants(a, hvd.size()):
        model = small_cnn((32, 32, 3), 10, width=a.keras_width or a.width, batch_norm=True, seed=0)
        if opt_name == "sgd":
            base = keras.optimizers.SGD(learning_rate=0.1 * hvd.size(), momentum=0.9, weight_decay=5e-4)
        else:
            base = LARS(learning_rate=1.0 * hvd.size(), momentum=0.9, weight_decay=5e-4)
        model.compile(optimizer=base if local else DistributedOptimizer(base), jit_compile=False,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        steps[opt_name + LOCAL * local] = lambda model=model: model.train_on_batch(x, y)
    return (steps, started, hvd.size(), hvd.rank(), lambda tag: hvd.allreduce(tf.zeros(1), name=tag).numpy(),
            lambda v, tag: float(tf.reduce_max(hvd.allgather(tf.constant([v]), name=tag))))


def worker(a):
    steps, horovod_tids, size, rank, barrier, max_over_ranks = (
        torch_setups if a.framework == "torch" else keras_setups)(a)
    for step in steps.values():
        for _ in range(a.warmup):
            step()
    samples = {k: [] for k in steps}
    horovod_cpu = {k: [0.0, 0.0] for k in steps}      # Horovod's threads: CPU seconds, wall seconds
    for rep in range(a.repeats):            # interleaved repeats: SGD and LARS see the same machine load
        for opt_name, step in steps.items():
            barrier(f"b0_{opt_name}_{rep}")
            cpu0 = thread_cpu_s(horovod_tids)
            t = time.perf_counter()
            for _ in range(a.steps):
                step()
            barrier(f"b1_{opt_name}_{rep}")
            wall = time.perf_counter() - t
            if cpu0 is not None:
                horovod_cpu[opt_name][0] += thread_cpu_s(horovod_tids) - cpu0
                horovod_cpu[opt_name][1] += wall
            slowest = max_over_ranks(wall, f"w_{opt_name}_{rep}")
            samples[opt_name].append((a.steps * a.batch * size / slowest, a.steps * a.batch / wall))
    results = {}
    for k, v in samples.items():
        tot = sorted(s[0] for s in v)
        r0 = sorted(s[1] for s in v)
        cpu, wall = horovod_cpu[k]
        # the busiest rank's: with Open MPI one rank's background loop polls while it waits for the other
        share = max_over_ranks(cpu / wall if wall else -1.0, f"cpu_{k}")
        results[k] = dict(total_images_s=tot[len(tot) // 2], rank0_images_s=r0[len(r0) // 2],
                          total_images_s_min=tot[0], total_images_s_max=tot[-1], repeats=len(v),
                          horovod_thread_cpu=share if share >= 0 else None)
    if rank == 0:
        text = json.dumps(dict(np=size, results=results))
        try:
            Path(a.worker_out).write_text(text)
        except OSError:            # rank 0 on a host without the launcher's /tmp: the line below carries it
            pass
        print(RESULT_MARK + text, flush=True)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    keys = sorted({(r["framework"], r["optimizer"], r["controller"]) for r in rows})
    for fw, opt, ctl in keys:
        rr = sorted((r for r in rows if (r["framework"], r["optimizer"], r["controller"]) == (fw, opt, ctl)
                     and r["np"] * r["threads_per_rank"] == max(x["np"] * x["threads_per_rank"] for x in rows)),
                    key=lambda r: r["np"])
        ax1.plot([r["np"] for r in rr], [r["total_images_s"] for r in rr], marker="o", label=f"{fw} {opt}/{ctl}")
        rr = [r for r in rr if r["efficiency"] is not None and not (r["np"] == 1 and r["threads_per_rank"] != min(
            x["threads_per_rank"] for x in rows))]
        ax2.plot([r["np"] for r in rr], [100 * r["efficiency"] for r in rr], marker="o", label=f"{fw} {opt}/{ctl}")
    ax1.set_title("total throughput, all cores used", fontsize=9)
    ax2.set_title("efficiency vs N x one rank at the same threads/rank", fontsize=9)
    ax1.set_xlabel("ranks (same total cores)")
    ax1.set_ylabel("total images/s")
    ax2.set_xlabel("ranks")
    ax2.set_ylabel("scaling efficiency total(N)/(N*single) %")
    finish_figure(fig, (ax1, ax2), path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--np", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--controllers", nargs="*", choices=["mpi", "gloo", "ddp"],
                    help="Horovod's MPI / Gloo controller (horovodrun), or ddp: torch.distributed under torchrun "
                         "(torch only; default: mpi, gloo and ddp, quick: mpi)")
    ap.add_argument("--optimizers", default="sgd,lars")
    ap.add_argument("--frameworks", nargs="*", choices=["torch", "keras"],
                    help="default: torch and keras (quick: torch)")
    ap.add_argument("--cores", type=int, default=os.cpu_count(),
                    help="total cores shared by all ranks (with hosts: cores per host)")
    ap.add_argument("--batch", type=int, default=64, help="per-rank batch")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--keras-width", type=int,
                    help="Keras's network width (default --width): a wider Keras net takes as long per step as "
                         "torch's, to compare efficiencies at equal compute per step")
    ap.add_argument("--mpi-yield", choices=["auto", "on", "off"], default="auto",
                    help="Open MPI's mpi_yield_when_idle: auto = as largebatch run (on when the ranks' threads "
                         "take every core)")
    ap.add_argument("--split-added", action=argparse.BooleanOptionalAction,
                    help="at np > 1 also time each optimizer without gradient averaging (each rank steps on its "
                         "own, in the same interleaved rounds), to split added_ms into shared_ms (the ranks sharing "
                         "the machine) and averaging_ms (Horovod's part); default: on, off with --quick")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, help="interleaved timing rounds; the median is reported")
    ap.add_argument("--timeout", type=float, default=600, help="limit for each horovodrun, seconds")
    add_host_args(ap)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--framework", default="torch", help=argparse.SUPPRESS)
    ap.add_argument("--controller", default="mpi", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a) or 0
    import horovod  # noqa: F401  (version in the header)
    import torch  # noqa: F401
    from largebatch import hostfile as hf
    from largebatch.launchers.command import mpi_yield_when_idle
    from largebatch.launchers.threads import plan_threads
    hosts = hosts_from_args(a)

    def placement(n):
        """[(host, ranks)] for n ranks: on the hosts given, else all on this machine."""
        return hf.place_ranks(n, hosts) if hosts else [("localhost", n)]

    def threads_for(n):
        return max(1, a.cores // max(k for _, k in placement(n)))
    controllers = a.controllers or (["mpi"] if a.quick else ["mpi", "gloo", "ddp"])
    frameworks = a.frameworks or (["torch"] if a.quick else ["torch", "keras"])
    steps = a.steps or (4 if a.quick else 10)
    repeats = a.repeats or (1 if a.quick else 5)
    split = not a.quick if a.split_added is None else a.split_added
    settings = dict(mode="quick" if a.quick else "full", np=a.np, controllers=controllers, frameworks=frameworks,
                    optimizers=a.optimizers, mpi_yield_when_idle=a.mpi_yield, split_added=split,
                    cores=a.cores, per_rank_batch=a.batch, model=f"SmallCNN(width={a.width}, BN) 3x32x32 (torch and Keras: the same layers)"
                    + (f"; Keras width {a.keras_width}" if a.keras_width else ""),
                    steps=steps, warmup=a.warmup, repeats=repeats, threads_per_rank={n: threads_for(n) for n in a.np},
                    hosts=hf.hosts_arg(hosts and [(h.name, h.slots) for h in hosts]) if hosts else None,
                    network_interface=a.network_interface)
    meta = machine_info(**settings)
    print_header(meta, "scaling: synthetic-data training throughput under horovodrun"
                 + (f" on hosts {settings['hosts']}" if hosts else ""))
    if hosts:
        same = same_machine(a, [h.name for h in hosts])
        meta["same_machine"] = same
        if same:
            meta["note"] = SAME_MACHINE_NOTE
            print(f"   NOTE: {SAME_MACHINE_NOTE}", flush=True)
    rows = []
    # (ranks, threads per rank): every np at cores/np threads, plus np=1 at the per-rank threads of
    # the largest np, the "single worker" that Horovod's efficiency definition divides by
    configs = [(n, threads_for(n)) for n in a.np]
    single_threads = threads_for(max(a.np))
    if (1, single_threads) not in configs:
        configs.insert(1, (1, single_threads))
    local_results = {}          # (framework, controller, optimizer, np) -> that run without averaging

    def step_ms(n, result):
        """One update on the slowest rank, from a run's total images/s."""
        return 1000.0 * n * a.batch / result["total_images_s"]

    def measure(fw, ctl, n, threads):
        """Rank 0's results of one horovodrun (None after printing why it failed)."""
        tmp = Path(tempfile.mkdtemp(prefix="lb-scaling-")) / "rank0.json"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
                   OMPI_MCA_btl_vader_single_copy_mechanism="none")
        if ctl == "mpi" and (a.mpi_yield == "on" or a.mpi_yield == "auto" and mpi_yield_when_idle(
                plan_threads(placement(n), cores_per_host=a.cores, threads=threads))):
            env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")     # the rule `largebatch run` launches with
        program = [sys.executable,
                   str(Path(__file__).resolve()), "--worker", "--threads", str(threads), "--batch", str(a.batch),
                   "--width", str(a.width), *(["--keras-width", str(a.keras_width)] if a.keras_width else []),
                   "--steps", str(steps), "--warmup", str(a.warmup), "--repeats", str(repeats),
                   "--optimizers", a.optimizers, "--framework", fw, "--controller", ctl, "--worker-out", str(tmp),
                   *(["--split-added"] if split else [])]
        cmd, extra = engine_launch(a, ctl, placement(n), program, threads=threads)
        env.update(extra)
        rc, out = run_bounded(cmd, env, a.timeout)
        got = [line.split(RESULT_MARK, 1)[1] for line in out.splitlines() if RESULT_MARK in line]
        if rc != 0 or not (tmp.exists() or got):
            sys.stderr.write(f"scaling: {' '.join(cmd)} exited {rc}\n{out[-4000:]}\n")
            return None
        return json.loads(tmp.read_text()) if tmp.exists() else json.JSONDecoder().raw_decode(got[-1])[0]

    for fw, ctl, (n, threads) in ((fw, ctl, c) for fw in frameworks for ctl in controllers for c in configs):
        if ctl == "ddp" and fw != "torch":
            continue                      # torch.distributed: PyTorch only
        got = measure(fw, ctl, n, threads)
        if got is None:
            return 1
        for opt, r in got["results"].items():
            if opt.endswith(LOCAL):
                local_results[fw, ctl, opt[:-len(LOCAL)], n] = r
                continue
            rows.append(dict(framework=fw, controller=ctl, engine=ENGINES[ctl], optimizer=opt, np=n,
                             threads_per_rank=threads,
                             **({"hosts": hf.hosts_arg(placement(n))} if hosts else {}), **r))
            print(f"   {fw:5s} {ctl:4s} {opt:4s} np={n} threads/rank={threads}: {r['total_images_s']:.1f} images/s total",
                  flush=True)
    for r in rows:
        same = [s for s in rows if (s["framework"], s["controller"], s["optimizer"]) ==
                (r["framework"], r["controller"], r["optimizer"])]
        single = [s for s in same if s["np"] == 1 and s["threads_per_rank"] == r["threads_per_rank"]]
        full = [s for s in same if s["np"] == 1 and s["threads_per_rank"] == max(1, a.cores)]
        # Horovod's definition: total(N) / (N x one worker with the same threads per worker)
        r["efficiency"] = r["total_images_s"] / (r["np"] * single[0]["total_images_s"]) if single else None
        # same total cores: N ranks x cores/N threads against one rank with all the cores
        r["speedup_same_cores"] = r["total_images_s"] / full[0]["total_images_s"] if full else None
        # the time of one update (the slowest rank's), and what N ranks add to it: communication,
        # Horovod's background thread and the ranks sharing the machine (efficiency = 1 / (1 + added/step))
        r["step_ms"] = step_ms(r["np"], r)
        single_ms = step_ms(1, single[0]) if single else None
        r["added_ms"] = r["step_ms"] - single_ms if single else None
        # added_ms split: the same ranks without gradient averaging give what sharing the machine costs
        # (caches, memory bandwidth, the cores); the rest is Horovod's part
        local = local_results.get((r["framework"], r["controller"], r["optimizer"], r["np"]))
        r["local_step_ms"] = step_ms(r["np"], local) if local else None
        r["local_horovod_thread_cpu"] = local.get("horovod_thread_cpu") if local else None
        r["shared_ms"] = r["local_step_ms"] - single_ms if local and single else None
        r["averaging_ms"] = r["step_ms"] - r["local_step_ms"] if local else None
    meta["total_cores_note"] = "every row uses the same total cores; np x threads_per_rank = cores"
    out = Path(a.out)
    csv_path, json_path = write_outputs(out, "scaling", rows, meta)
    plot(rows, out / "scaling.png")
    print()
    print_table(rows, ["framework", "engine", "optimizer", "np", "threads_per_rank", "total_images_s", "total_images_s_min",
                       "total_images_s_max", "rank0_images_s", "efficiency", "speedup_same_cores", "step_ms", "added_ms",
                       *(["shared_ms", "averaging_ms"] if split else []), "horovod_thread_cpu"],
                {"total_images_s": "{:.1f}", "total_images_s_min": "{:.1f}", "total_images_s_max": "{:.1f}",
                 "rank0_images_s": "{:.1f}", "efficiency": "{:.3f}", "speedup_same_cores": "{:.3f}",
                 "step_ms": "{:.1f}", "added_ms": "{:.1f}", "shared_ms": "{:.1f}", "averaging_ms": "{:.1f}",
                 "horovod_thread_cpu": "{:.2f}"})
    print("   efficiency = total(N) / (N x total(np=1 at the same threads/rank)); speedup_same_cores = "
          "total(N) / total(np=1 with all cores)")
    print("   total = median over interleaved repeats of sum(images)/max(rank wall); min/max show the noise")
    print("   step_ms = one update (the slowest rank); added_ms = step_ms - step_ms(np=1, same threads/rank): "
          "what N ranks add per update")
    print("   horovod_thread_cpu = CPU time of the threads hvd.init() started (Horovod's background loop) / wall "
          "time, on the busiest rank (1.00 = a whole core)")
    if split:
        print("   shared_ms = the same ranks without gradient averaging, less np=1 (sharing the machine); "
              "averaging_ms = step_ms less that run (Horovod's part)")
    if meta.get("note"):
        print(f"   NOTE: {meta['note']}")
    print(f"   wrote {csv_path}, {json_path}, {out / 'scaling.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
