"""Horovod's Gloo controller under ``srun``, without horovodrun: a rendezvous server and the
per-rank environment that ``horovodrun --gloo`` would provide.

horovodrun --gloo starts Horovod's HTTP rendezvous server (horovod/runner/gloo_run.py) and gives
every rank HOROVOD_GLOO_RENDEZVOUS_ADDR/PORT, HOROVOD_CONTROLLER=gloo, HOROVOD_CPU_OPERATIONS=gloo
and its slot (HOROVOD_RANK, _SIZE, _LOCAL_RANK, _LOCAL_SIZE, _CROSS_RANK, _CROSS_SIZE,
HOROVOD_HOSTNAME). Under srun the same comes from Slurm:

    python -m largebatch.launchers.srun_gloo [--addr ADDR] [srun options ...] -- program [args ...]

1. a probe step (``srun <options> --mpi=none``, one line per task) learns the step's layout:
   the tasks per node and the node names, in Slurm's node order;
2. the rendezvous server starts here, on every interface, with that layout (the scope sizes it
   needs to know when every rank has finished with a scope), advertised as ``--addr`` (default:
   this host's name resolved; on a batch job, the first node of the allocation);
3. ``srun <options> --mpi=none`` runs ``python -m largebatch.launchers.srun_gloo --task -- program``
   on every task, which maps SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_NODEID /
   SLURM_STEP_TASKS_PER_NODE / SLURMD_NODENAME to the HOROVOD_* slot variables and execs the
   program. Its exit code is srun's.

No MPI is involved (``--mpi=none``); Horovod Elastic is not supported this way (horovodrun's
elastic driver also re-launches workers itself).
"""
import os
import re
import signal
import socket
import subprocess
import sys

__all__ = ["tasks_per_node", "slot_env", "layout_from_probe", "host_alloc_plan", "main"]

PROBE = 'echo "lbprobe $SLURM_PROCID $SLURM_NODEID $SLURMD_NODENAME $SLURM_STEP_TASKS_PER_NODE"'


def tasks_per_node(text):
    """Slurm's compressed tasks-per-node list: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    out = []
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ValueError(f"cannot read tasks per node {text!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def slot_env(env):
    """The HOROVOD_* slot variables for the task whose Slurm environment is ``env``."""
    per = tasks_per_node(env["SLURM_STEP_TASKS_PER_NODE"])
    node, local_rank = int(env["SLURM_NODEID"]), int(env["SLURM_LOCALID"])
    cross = [i for i, n in enumerate(per) if n > local_rank]   # nodes with a task of this local rank
    return {"HOROVOD_RANK": env["SLURM_PROCID"], "HOROVOD_SIZE": env.get("SLURM_STEP_NUM_TASKS", env["SLURM_NTASKS"]),
            "HOROVOD_LOCAL_RANK": str(local_rank), "HOROVOD_LOCAL_SIZE": str(per[node]),
            "HOROVOD_CROSS_RANK": str(cross.index(node)), "HOROVOD_CROSS_SIZE": str(len(cross)),
            "HOROVOD_HOSTNAME": env["SLURMD_NODENAME"]}


def layout_from_probe(text):
    """[(node name, tasks)] in Slurm's node order, from the probe step's output."""
    names, per = {}, None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[0] == "lbprobe":
            names[int(parts[2])] = parts[3]
            per = tasks_per_node(parts[4])
    if per is None or sorted(names) != list(range(len(per))):
        raise RuntimeError(f"the probe step did not report every node: {text.strip()[:500]!r}")
    return [(names[i], n) for i, n in enumerate(per)]


def host_alloc_plan(layout):
    """Horovod SlotInfos for ``layout``, with the numbering :func:`slot_env` gives each task
    (Slurm's block distribution: node 0's tasks first)."""
    from horovod.runner.common.util.hosts import SlotInfo
    size = sum(n for _, n in layout)
    plan, rank = [], 0
    for node, (host, n) in enumerate(layout):
        for local_rank in range(n):
            cross = [i for i, (_, m) in enumerate(layout) if m > local_rank]
            plan.append(SlotInfo(hostname=host, rank=rank, local_rank=local_rank, cross_rank=cross.index(node),
                                 size=size, local_size=n, cross_size=len(cross)))
            rank += 1
    return plan


def _split(argv):
    if "--" not in argv:
        raise SystemExit("usage: python -m largebatch.launchers.srun_gloo [--addr ADDR] [srun options] -- program ...")
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def _task(program):
    os.environ.update(slot_env(os.environ))
    os.execvp(program[0], program)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--task":
        return _task(_split(argv[1:])[1])
    addr = None
    if argv and argv[0].startswith("--addr"):
        addr = argv[0].split("=", 1)[1] if "=" in argv[0] else argv.pop(1)
        argv.pop(0)
    srun_opts, program = _split(argv)
    if any(a.startswith("--mpi") for a in srun_opts):
        raise SystemExit("srun_gloo: leave out --mpi (the ranks run with --mpi=none)")
    srun = os.environ.get("SRUN", "srun")
    probe = subprocess.run([srun, *srun_opts, "--mpi=none", "sh", "-c", PROBE], capture_output=True, text=True,
                           timeout=float(os.environ.get("LARGEBATCH_PROBE_TIMEOUT", "120")))
    if probe.returncode != 0:
        sys.stderr.write(probe.stderr)
        return probe.returncode
    layout = layout_from_probe(probe.stdout)

    from horovod.runner.http.http_server import RendezvousServer
    server = RendezvousServer(verbose=0)
    port = server.start()
    server.init(host_alloc_plan(layout))
    env = dict(os.environ)
    env.update({"HOROVOD_GLOO_RENDEZVOUS_ADDR": addr or socket.gethostbyname(socket.gethostname()),
                "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port), "HOROVOD_CONTROLLER": "gloo",
                "HOROVOD_CPU_OPERATIONS": "gloo"})
    cmd = [srun, *srun_opts, "--mpi=none", sys.executable, "-m", "largebatch.launchers.srun_gloo", "--task", "--",
           *program]
    child = subprocess.Popen(cmd, env=env)

    def forward(signum, _frame):
        child.send_signal(signum)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, forward)
    try:
        rc = child.wait()
    finally:
        server.stop()
    return rc


if __name__ == "__main__":
    sys.exit(main())
