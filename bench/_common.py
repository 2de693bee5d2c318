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
    warning = load_warning(info.get("loadavg_1_5_15"), info["cpus"])
    if warning:
        info["warning"] = warning
    return info


# A benchmark shares the CPUs with whatever else runs: above this many runnable processes per
# core (1-minute load average, taken before the benchmark's own processes start) its timings
# were seen off by up to 1000x (allreduce at load 2 on 2 cores)
BUSY_LOAD_PER_CORE = 0.5


def load_warning(loadavg, cpus):
    """One line when the machine is too busy for timings to mean much, else None."""
    if not loadavg or not cpus or loadavg[0] <= BUSY_LOAD_PER_CORE * cpus:
        return None
    return (f"WARNING: load average {loadavg[0]:.2f} on {cpus} cores before the benchmark started: other "
            f"processes compete for the CPUs and these timings are unreliable; rerun on a quiet machine")


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
    if info.get("warning"):
        print(f"   {info['warning']}")
        print(info["warning"], file=sys.stderr)
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


# ----------------------------------------------------------------------------------- several hosts
SAME_MACHINE_NOTE = ("the hosts run on ONE machine (the same kernel: network namespaces such as "
                     "largebatch.launchers.testcluster's): they share its cores and memory, and their "
                     "'network' is the kernel's TCP stack over veth pairs and a bridge, so these numbers "
                     "model a network, not a cluster")


def add_host_args(ap):
    """-H/--hostfile and the ssh/interface settings handed to horovodrun (as ``largebatch run`` does)."""
    g = ap.add_argument_group("several hosts (ranks placed by horovodrun over ssh)")
    g.add_argument("-H", "--hosts", help="host:slots[,host:slots...], as horovodrun -H")
    g.add_argument("--hostfile", help="'host slots=N' per line (# comments allowed)")
    g.add_argument("--ssh-port", type=int, help="sshd port on the hosts (horovodrun --ssh-port)")
    g.add_argument("--ssh-identity", help="ssh private key (horovodrun --ssh-identity-file)")
    g.add_argument("--network-interface", help="interface the ranks talk over, e.g. eth0 "
                                               "(horovodrun --network-interfaces)")
    return g


def hosts_from_args(a):
    """[launchers.hostfile.Host] from -H / --hostfile, or None when neither is given."""
    from largebatch import hostfile as hf
    if a.hosts and a.hostfile:
        raise SystemExit("give either -H/--hosts or --hostfile, not both")
    if a.hosts:
        return hf.parse_hosts(a.hosts)
    if a.hostfile:
        return hf.parse_hostfile(a.hostfile)
    return None


def horovodrun_host_args(a, placed):
    """horovodrun arguments for ranks ``placed`` as [(host, ranks)] on the hosts of ``a``."""
    from largebatch import hostfile as hf
    out = ["-H", hf.hosts_arg(placed)]
    if a.network_interface:
        out += ["--network-interfaces", a.network_interface]
    if a.ssh_port:
        out += ["--ssh-port", str(a.ssh_port)]
    if a.ssh_identity:
        out += ["--ssh-identity-file", os.path.abspath(os.path.expanduser(a.ssh_identity))]
    return out


def host_env(a, controller, seconds):
    """Extra environment for a multi-host horovodrun: Open MPI's out-of-band channel on the same
    interface as the data, and Gloo/Open MPI giving up on a silent host instead of hanging."""
    env = {"HOROVOD_GLOO_TIMEOUT_SECONDS": str(int(seconds)),
           "OMPI_MCA_oob_tcp_keepalive_time": str(max(1, int(seconds) // 3)),
           "OMPI_MCA_oob_tcp_keepalive_intvl": str(max(1, int(seconds) // 6)),
           "OMPI_MCA_oob_tcp_keepalive_probes": "4"}
    if a.network_interface and controller == "mpi":
        env["OMPI_MCA_oob_tcp_if_include"] = a.network_interface
    return env


def engine_launch(a, engine, placed, program, threads=1, rendezvous_port=29400):
    """(argv, extra env) that runs ``program`` as the ranks ``placed`` ([(host, ranks)]) under
    ``engine``: ``mpi`` / ``gloo``, horovodrun with that controller; ``ddp``, torch.distributed
    started as ``largebatch run --launcher torchrun`` starts it (``torchrun --standalone`` on
    this machine alone, one torchrun per host over ssh across hosts). The ssh and interface
    settings of ``a`` (:func:`add_host_args`) apply to both."""
    from largebatch import hostfile as hf
    n = sum(k for _, k in placed)
    remote = any(not hf.is_local(h) for h, _ in placed)
    seconds = int(min(getattr(a, "timeout", 60), 60))
    env = host_env(a, engine, seconds) if remote else {}
    if engine == "ddp":
        from largebatch.launchers.command import torchrun_command
        from largebatch.launchers.threads import plan_threads
        cmd = torchrun_command(program, np=n, placed=placed, plan=plan_threads(placed, threads=threads),
                               network_interface=a.network_interface, ssh_port=a.ssh_port,
                               ssh_identity=a.ssh_identity, host_timeout=seconds, rendezvous_port=rendezvous_port)
        return cmd.argv, {**env, **cmd.env}
    from largebatch.launchers import hvdrun
    where = horovodrun_host_args(a, placed) if remote else ["-H", f"localhost:{n}"]
    return [*hvdrun.launcher(), "-np", str(n), *where, f"--{engine}", *program], env


def ssh_argv(a, host, command):
    """ssh to ``host`` in batch mode with the port and identity of ``a`` (never prompts)."""
    argv = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]
    if a.ssh_port:
        argv += ["-p", str(a.ssh_port)]
    if a.ssh_identity:
        argv += ["-i", os.path.abspath(os.path.expanduser(a.ssh_identity))]
    return argv + [host, command]


def same_machine(a, names, timeout=15):
    """True when every host runs on this machine's kernel (the same boot id: namespaces, not
    separate nodes), False when one does not, None when it cannot be told. Also the first check
    that ssh to every host works: raises SystemExit naming the host that does not answer."""
    import subprocess
    try:
        mine = open("/proc/sys/kernel/random/boot_id").read().strip()
    except OSError:
        return None
    same = True
    for name in names:
        try:
            proc = subprocess.run(ssh_argv(a, name, "cat /proc/sys/kernel/random/boot_id"), capture_output=True,
                                  text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"host {name}: ssh did not answer within {timeout} s")
        if proc.returncode != 0:
            raise SystemExit(f"host {name}: ssh failed ({(proc.stderr or proc.stdout).strip()[-300:]}); "
                             "check --ssh-port/--ssh-identity (largebatch doctor -H ... checks every host)")
        same = same and proc.stdout.strip() == mine
    return same


def run_bounded(cmd, env, timeout):
    """subprocess.run(cmd) in its own session; on timeout the whole session (horovodrun, mpirun,
    ssh: all started here) gets SIGTERM, then SIGKILL. Returns (returncode or None, output)."""
    import signal
    import subprocess
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                out, _ = proc.communicate(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                out = ""
        return None, f"(killed after {timeout} s)\n{out or ''}"
