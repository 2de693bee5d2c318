"""CPU threads per rank: the rule, the environment it becomes, and the rank-side resolution.

The rule (the one Horovod's CPU guides and Intel's TensorFlow/PyTorch tuning guides give):

    threads per rank = floor(cores per host / ranks per host), at least 1
    inter-op threads = 1, or 2 when a rank has 4 or more threads

"Cores" are physical cores (hyper-threads add little to dense math and oversubscribe easily).
Without this, every rank starts one OpenMP/MKL/TF thread per logical CPU of the host: with 16
ranks on a 64-core node that is 16×64 threads fighting for 64 cores, the most common reason a
CPU Horovod job scales badly.

The launcher exports the result (:func:`thread_env`) for every library that reads the
environment (OpenMP, MKL, OpenBLAS, TensorFlow), and the rank entry point calls
:func:`rank_threads` before importing torch or TensorFlow, so that a rank on a host with a
different core count or rank count still gets its own share, then passes the numbers to
``torch.set_num_threads`` / TF's intra-/inter-op settings.
"""
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

__all__ = ["threads_per_rank", "interop_threads", "physical_cores", "detect_cores", "ThreadPlan",
           "plan_threads", "thread_env", "local_size_from_env", "rank_threads", "BINDINGS", "THREAD_ENV_VARS"]

BINDINGS = ("none", "core", "socket", "numa")
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                   "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")


def threads_per_rank(cores_per_host, ranks_per_host):
    """floor(cores / ranks), at least 1."""
    if cores_per_host < 1 or ranks_per_host < 1:
        raise ValueError(f"cores and ranks per host must be >= 1, got {cores_per_host} and {ranks_per_host}")
    return max(1, cores_per_host // ranks_per_host)


def interop_threads(threads):
    """Inter-op pool size for a rank with ``threads`` intra-op threads: 1, or 2 from 4 threads on.

    Inter-op parallelism only helps graphs with independent branches; more than 2 threads just
    compete with the intra-op pool on a CPU node.
    """
    return 2 if threads >= 4 else 1


def _affinity():
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return list(range(os.cpu_count() or 1))


def physical_cores(cpus=None, cpuinfo="/proc/cpuinfo"):
    """Physical cores among the logical CPUs ``cpus`` (default: this process's affinity),
    from the (physical id, core id) pairs in /proc/cpuinfo; the logical count if unreadable."""
    cpus = _affinity() if cpus is None else list(cpus)
    try:
        with open(cpuinfo) as fh:
            text = fh.read()
    except OSError:
        return max(1, len(cpus))
    pairs, wanted = set(), set(cpus)
    for block in text.strip().split("\n\n"):
        info = {}
        for line in block.splitlines():
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
        if "processor" not in info or int(info["processor"]) not in wanted:
            continue
        if "core id" not in info:
            return max(1, len(cpus))  # no topology (some VMs, non-x86): count logical CPUs
        pairs.add((info.get("physical id", "0"), info["core id"]))
    return max(1, len(pairs) or len(cpus))


def detect_cores():
    """(physical cores, logical CPUs) available to this process."""
    cpus = _affinity()
    return physical_cores(cpus), len(cpus)


@dataclass
class ThreadPlan:
    """What the launcher decided: per-host ranks and threads, and the environment to export."""
    cores_per_host: int
    cores_source: str                      # "launcher.cores_per_host" or "this machine (N physical cores)"
    per_host: List[Tuple[str, int, int]]   # (host, ranks, threads per rank)
    threads: int                           # exported value: the smallest share over the hosts
    interop: int
    binding: str
    env: Dict[str, str] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)


def thread_env(threads, interop, binding="none"):
    """Environment variables for ``threads`` intra-op and ``interop`` inter-op threads per rank.

    OpenMP threads are pinned (OMP_PROC_BIND/OMP_PLACES) only when the rank itself is bound to
    its own cores ('core' binding): pinning threads of unbound ranks would put every rank's
    threads on the same first cores of the host.
    """
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "OPENBLAS_NUM_THREADS": str(threads), "TF_NUM_INTRAOP_THREADS": str(threads),
           "TF_NUM_INTEROP_THREADS": str(interop)}
    if binding == "core":
        env.update({"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"})
    return env


def plan_threads(placed, *, cores_per_host=None, threads=None, interop=None, binding="none"):
    """Plan threads for ranks ``placed`` as [(host, ranks)].

    ``cores_per_host`` None means this machine's physical cores (correct for local runs and
    homogeneous clusters launched from a compute node; set it when launching from a login
    node). ``threads``/``interop`` None mean the rule above.
    """
    notes = []
    if cores_per_host is None:
        cores_per_host = detect_cores()[0]
        source = f"this machine ({cores_per_host} physical cores)"
        if any(not _is_local(h) for h, _ in placed):
            notes.append(f"launcher.cores_per_host is auto: assuming every host has this machine's "
                         f"{cores_per_host} physical cores (each rank re-checks its own host)")
    else:
        source = "launcher.cores_per_host"
    per_host = []
    for host, ranks in placed:
        t = threads if threads is not None else threads_per_rank(cores_per_host, ranks)
        per_host.append((host, ranks, t))
        if ranks > cores_per_host:
            notes.append(f"{host}: {ranks} ranks on {cores_per_host} cores is oversubscribed; "
                         f"expect poor scaling")
        elif t * ranks > cores_per_host:
            notes.append(f"{host}: {ranks} ranks × {t} threads = {ranks * t} threads on "
                         f"{cores_per_host} cores (oversubscribed)")
    t = min(p[2] for p in per_host)
    i = interop if interop is not None else interop_threads(t)
    return ThreadPlan(cores_per_host, source, per_host, t, i, binding, thread_env(t, i, binding), notes)


def _is_local(host):
    from largebatch.hostfile import is_local
    return is_local(host)


_LOCAL_SIZE_VARS = ("HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
                    "MV2_COMM_WORLD_LOCAL_SIZE", "PMI_LOCAL_SIZE", "PALS_LOCAL_SIZE")


def _slurm_tasks_on_this_node(env):
    """SLURM_STEP_TASKS_PER_NODE ("2(x3),1") at index SLURM_NODEID."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return None
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = int(env.get("SLURM_NODEID", "0") or 0)
    return counts[node] if 0 <= node < len(counts) else None


def local_size_from_env(env=None):
    """Ranks on this host, from the variables the launchers set (Horovod gloo, Open MPI, MPICH,
    MVAPICH, PMI, Slurm), or None when not under a launcher."""
    env = os.environ if env is None else env
    for var in _LOCAL_SIZE_VARS:
        value = env.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return _slurm_tasks_on_this_node(env)


def rank_threads(*, threads=None, interop=None, cores_per_host=None, binding="none", env=None,
                 cores=None, affinity=None):
    """The threads this rank should use, decided on the rank's own host.

    Explicit ``threads`` wins. Otherwise: bound to its own cores ('core' binding) -> the
    cores it is bound to; else (cores_per_host or this host's physical cores) ÷ ranks on this
    host. ``cores``/``affinity`` are for tests (physical cores, logical CPUs of this process).
    Returns (threads, interop, how) with ``how`` a short human-readable reason.
    """
    local = local_size_from_env(env) or 1
    if threads is not None:
        t, how = threads, "launcher.threads_per_rank"
    elif binding == "core":
        n = cores if cores is not None else detect_cores()[0]
        t, how = max(1, n), f"bound to {n} cores"
    else:
        if cores_per_host is not None:
            n = cores_per_host
        elif cores is not None:
            n = cores
        else:  # unbound: the cores this process may run on (a Slurm allocation, say); bound to a
            # socket / NUMA node: the whole host's, shared by its ranks
            n = detect_cores()[0] if binding == "none" else _host_cores()
        t, how = threads_per_rank(n, local), f"{n} cores / {local} ranks on this host"
    i = interop if interop is not None else interop_threads(t)
    return t, i, how


def _host_cores():
    """Physical cores of the whole host (not just this process's affinity)."""
    return physical_cores(range(os.cpu_count() or 1))
