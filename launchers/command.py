"""Launch command lines: ``horovodrun``, the ``mpirun`` line horovodrun would build, and ``srun``.

The mpirun line follows horovod/runner/mpi_run.py (Horovod 0.28.1) for Open MPI:

    mpirun --allow-run-as-root --tag-output -np N -H host:slots,...
           -bind-to none -map-by slot            (horovodrun's default binding)
           -mca pml ob1 -mca btl ^openib          (horovodrun's Open MPI flags)
           [-mca plm_rsh_no_tree_spawn true -mca plm_rsh_num_concurrent H]   (64 hosts or more)
           [-mca btl_tcp_if_include IF -x NCCL_SOCKET_IFNAME=IF]
           -x VAR ...  program

horovodrun forwards its whole environment with one ``-x`` per variable; the line built here
forwards what a rank needs (PATH, PYTHONPATH, LD_LIBRARY_PATH and the thread variables), so it
stays readable and copy-pasteable. ``--allow-run-as-root`` is passed always, as horovodrun does
(it is needed as root and harmless otherwise).

Binding (``launcher.binding``):
    none    -bind-to none -map-by slot                  (horovodrun's default)
    core    -bind-to core -map-by slot:PE=<threads>     each rank owns <threads> cores
    socket  -bind-to socket -map-by socket -rank-by core (horovodrun's Spectrum MPI default)
    numa    -bind-to numa -map-by numa -rank-by core
srun: --cpu-bind=none | cores | sockets | ldoms, with --cpus-per-task=<threads>, and --mpi=pmix
(the plugin that works with Open MPI 4.1 and Slurm 22.05; ``launcher.args: "--mpi=..."`` wins).
"""
import os
import secrets
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from largebatch import hostfile as _hostfile
from . import hvdrun
from .threads import plan_threads

__all__ = ["LaunchCommand", "mpi_binding_args", "elastic_args", "srun_cpu_bind", "horovodrun_command",
           "mpirun_command", "srun_command", "torchrun_command", "torchrun_elastic_args", "build_command", "rank_program", "find_executable",
           "remote_hosts",
           "host_timeout_settings", "launch_plan",
           "LARGE_CLUSTER_HOSTS"]

# seconds a torch.distributed collective waits for a silent peer, set for jobs across hosts from
# launcher.host_timeout and read by the ranks (Horovod's Gloo reads HOROVOD_GLOO_TIMEOUT_SECONDS)
COLLECTIVE_TIMEOUT_ENV = "LARGEBATCH_COLLECTIVE_TIMEOUT_S"
LARGE_CLUSTER_HOSTS = 64          # horovodrun's _LARGE_CLUSTER_THRESHOLD
SRUN_MPI = "pmix"                 # srun's --mpi plugin unless launcher.args names one
OMPI_FLAGS = ["-mca", "pml", "ob1", "-mca", "btl", "^openib"]
FORWARDED_ENV = ("PATH", "PYTHONPATH", "LD_LIBRARY_PATH", "VIRTUAL_ENV")


@dataclass
class LaunchCommand:
    """``argv`` to run with ``env`` added to the current environment."""
    argv: List[str]
    env: Dict[str, str] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    threads: object = None                      # the ThreadPlan
    join: Optional[List[str]] = None            # elastic torchrun: what a joining host runs (join.sh)

    def shell(self):
        """One copy-pasteable shell line: ``VAR=value ... launcher args program``."""
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        line = " ".join(shlex.quote(a) for a in self.argv)
        return f"{prefix} {line}" if prefix else line


def mpi_binding_args(binding, threads):
    """mpirun process-binding arguments (see the module docstring)."""
    return {"none": ["-bind-to", "none", "-map-by", "slot"],
            "core": ["-bind-to", "core", "-map-by", f"slot:PE={threads}"],
            "socket": ["-bind-to", "socket", "-map-by", "socket", "-rank-by", "core"],
            "numa": ["-bind-to", "numa", "-map-by", "numa", "-rank-by", "core"]}[binding]


def srun_cpu_bind(binding):
    return {"none": "none", "core": "cores", "socket": "sockets", "numa": "ldoms"}[binding]


def find_executable(name):
    """``name`` next to this Python (a virtual environment's bin/), else on PATH, else ``name``."""
    local = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.isfile(local) and os.access(local, os.X_OK):
        return local
    return shutil.which(name) or name


def rank_program(python, yaml_path, overrides):
    """What each rank runs: the per-rank entry point on the same YAML and overrides."""
    return [python or sys.executable, "-m", "largebatch.runner", os.path.abspath(yaml_path), *overrides]


def _hosts_args(placed, hostfile_path, flag_h, flag_file):
    if hostfile_path is not None:          # -np takes the first N slots, in file order
        return [flag_file, os.path.abspath(hostfile_path)]
    return [flag_h, _hostfile.hosts_arg(placed)]


def elastic_args(*, min_np, max_np, host_discovery_script=None, elastic_timeout=None, reset_limit=None):
    """horovodrun's Horovod Elastic flags (``-np`` is then the number of ranks to start with)."""
    argv = ["--min-np", str(min_np), "--max-np", str(max_np)]
    if host_discovery_script is not None:
        argv += ["--host-discovery-script", os.path.abspath(host_discovery_script)]
    if elastic_timeout is not None:
        argv += ["--elastic-timeout", str(elastic_timeout)]
    if reset_limit is not None:
        argv += ["--reset-limit", str(reset_limit)]
    return argv


def _horovodrun_reads(path):
    """True when every line of ``path`` is 'host slots=N' (the only form horovodrun parses)."""
    try:
        with open(path) as fh:
            lines = fh.read().splitlines()
    except OSError:
        return True                 # let horovodrun report it
    return all(len(line.split()) == 2 and line.split()[1].startswith("slots=") for line in lines)


def remote_hosts(placed):
    """The placed hosts that are not this machine."""
    return [h for h, _ in placed if not _hostfile.is_local(h)]


YIELD_WHEN_IDLE = "mpi_yield_when_idle"


def mpi_yield_when_idle(plan):
    """True when every host's ranks × threads take all its cores: then nothing is left for Open
    MPI's progress engine, which busy-polls while a rank waits in a collective and takes the
    core from the compute of a rank (and of Horovod's background thread) beside it. Yielding when
    idle gives it back. Measured with 2 ranks × 1 thread on 2 cores (`largebatch bench scaling`,
    docs/benchmarks.md): efficiency at np = 2 went from 0.55 to 0.79 (Keras) and from 0.65-0.73
    to 0.90 (torch). Open MPI yields by itself only when ranks outnumber the slots."""
    return all(ranks * threads >= plan.cores_per_host for _, ranks, threads in plan.per_host)


def _user_sets(name, env, extra_args, environ):
    return (f"OMPI_MCA_{name}" in (env or {}) or f"OMPI_MCA_{name}" in environ
            or any(str(a) == name for a in extra_args))


def host_timeout_settings(seconds):
    """Open MPI MCA parameters and Horovod variables that end a job ``seconds`` after a host stops
    answering. Open MPI's daemons talk over TCP and, by default, notice a silent peer only after
    300 s + 9 × 20 s of keepalives (a link that goes down sends no reset): here keepalives start
    after seconds/3 and 4 probes seconds/6 apart declare the peer lost, so mpirun and the
    daemons on the other hosts abort the job. Gloo's collectives time out after ``seconds``."""
    idle, interval = max(1, seconds // 3), max(1, seconds // 6)
    return {"oob_tcp_keepalive_time": str(idle), "oob_tcp_keepalive_intvl": str(interval),
            "oob_tcp_keepalive_probes": "4"}, {"HOROVOD_GLOO_TIMEOUT_SECONDS": str(seconds)}


def _ssh_args(ssh_port, ssh_identity):
    out = []
    if ssh_port:
        out += ["-p", str(ssh_port)]
    if ssh_identity:
        out += ["-i", os.path.abspath(os.path.expanduser(ssh_identity))]
    return out


def horovodrun_command(program, *, np, placed, hostfile=None, controller="mpi", binding="none", plan,
                       network_interface=None, extra_args=(), env=None, elastic=None, ssh_port=None,
                       ssh_identity=None, host_timeout=None):
    """``elastic``: None, or the keyword arguments of :func:`elastic_args`; with a discovery
    script horovodrun gets no -H/--hostfile (the script names the hosts). ``host_timeout``
    applies to jobs with remote hosts (see :func:`host_timeout_settings`)."""
    discovered = elastic is not None and elastic.get("host_discovery_script") is not None
    notes = list(plan.notes)
    if hostfile is not None and not discovered and not _horovodrun_reads(hostfile):
        # horovodrun 0.28.1 reads a hostfile as bare 'host slots=N' lines: a comment, a blank
        # line or a host without slots= crashes it with an IndexError
        hosts = ["-H", ",".join(str(h) for h in _hostfile.parse_hostfile(hostfile))]
        notes.append(f"{hostfile}: has comments, blank lines or hosts without slots=, which horovodrun cannot "
                     f"read; its hosts are passed as -H")
    else:
        hosts = [] if discovered else _hosts_args(placed, hostfile, "-H", "--hostfile")
    # horovodrun's own code, its build check answered from a cache (3-4 s per launch: hvdrun.py)
    argv = [*hvdrun.launcher(), "-np", str(np), *hosts, f"--{controller}"]
    if elastic is not None:
        argv += elastic_args(**elastic)
    if network_interface:
        argv += ["--network-interfaces", network_interface]
    if ssh_port:
        argv += ["--ssh-port", str(ssh_port)]
    if ssh_identity:
        argv += ["--ssh-identity-file", os.path.abspath(os.path.expanduser(ssh_identity))]
    if binding != "none":
        argv.append("--binding-args=" + " ".join(mpi_binding_args(binding, plan.threads)))
    argv += list(extra_args) + list(program)
    extra_env = {}
    if host_timeout and (remote_hosts(placed) or discovered):
        mca, horovod = host_timeout_settings(host_timeout)
        # horovodrun's mpirun reads OMPI_MCA_* from its environment; the ranks get the rest
        extra_env = {**{f"OMPI_MCA_{k}": v for k, v in mca.items()}, **horovod}
    if network_interface and controller == "mpi":
        extra_env["OMPI_MCA_oob_tcp_if_include"] = network_interface
    if controller == "mpi" and mpi_yield_when_idle(plan) and not _user_sets(YIELD_WHEN_IDLE, env, extra_args,
                                                                          os.environ):
        extra_env[f"OMPI_MCA_{YIELD_WHEN_IDLE}"] = "1"
    return LaunchCommand(argv, {**plan.env, **extra_env, **(env or {})}, notes, plan)


def mpirun_command(program, *, np, placed, hostfile=None, binding="none", plan, network_interface=None,
                   extra_args=(), env=None, environ=None, ssh_port=None, ssh_identity=None, host_timeout=None):
    environ = os.environ if environ is None else environ
    argv = [find_executable("mpirun"), "--allow-run-as-root", "--tag-output", "-np", str(np),
            *_hosts_args(placed, hostfile, "-H", "-hostfile"), *mpi_binding_args(binding, plan.threads),
            *OMPI_FLAGS]
    if len(placed) >= LARGE_CLUSTER_HOSTS:
        argv += ["-mca", "plm_rsh_no_tree_spawn", "true", "-mca", "plm_rsh_num_concurrent", str(len(placed))]
    if network_interface:
        argv += ["-mca", "btl_tcp_if_include", network_interface, "-x", f"NCCL_SOCKET_IFNAME={network_interface}",
                 "-mca", "oob_tcp_if_include", network_interface]
    ssh = _ssh_args(ssh_port, ssh_identity)
    if ssh:
        argv += ["-mca", "plm_rsh_args", " ".join(ssh)]
    if host_timeout and remote_hosts(placed):
        mca, horovod = host_timeout_settings(host_timeout)
        for key, value in mca.items():
            argv += ["-mca", key, value]
    if mpi_yield_when_idle(plan) and not _user_sets(YIELD_WHEN_IDLE, env, extra_args, environ):
        argv += ["-mca", YIELD_WHEN_IDLE, "1"]
    for var in FORWARDED_ENV:
        if var in environ:
            argv += ["-x", var]
    for key, value in {**plan.env, **(env or {})}.items():
        argv += ["-x", f"{key}={value}"]
    argv += list(extra_args) + list(program)
    return LaunchCommand(argv, {}, list(plan.notes), plan)


def srun_command(program, *, np, placed, hosts_given=False, ranks_per_host=None, binding="none", plan,
                 extra_args=(), env=None):
    argv = [find_executable("srun"), f"--ntasks={np}"]
    if hosts_given:
        argv += [f"--nodes={len(placed)}", f"--ntasks-per-node={placed[0][1]}",
                 "--nodelist=" + ",".join(h for h, _ in placed)]
    elif ranks_per_host:
        argv += [f"--nodes={len(placed)}", f"--ntasks-per-node={ranks_per_host}"]
    argv += [f"--cpus-per-task={plan.threads}", f"--cpu-bind={srun_cpu_bind(binding)}"]
    if not any(str(a).startswith("--mpi") for a in extra_args):
        # Debian 12's Open MPI 4.1.4 has PMIx (external 4.2) but no Slurm PMI-1/PMI-2: under
        # --mpi=pmi2 or none, MPI_Init aborts ("OMPI was not built with SLURM's PMI support")
        argv.append(f"--mpi={SRUN_MPI}")
    exported = {**plan.env, **(env or {})}
    argv.append("--export=" + ",".join(["ALL"] + [f"{k}={v}" for k, v in exported.items()]))
    argv += list(extra_args) + list(program)
    return LaunchCommand(argv, {}, list(plan.notes), plan)


TORCHRUN_RESTARTS = 3            # elastic torchrun: restarts after a failure (launcher.reset_limit)
TORCHRUN_LAST_CALL_S = 5         # elastic: how long a rendezvous that has min hosts waits for more


def torchrun_elastic_args(*, min_np, max_np, per_host, elastic_timeout=None, reset_limit=None):
    """torchrun's elastic flags: hosts of ``per_host`` ranks, between min_np and max_np ranks in all;
    the agents restart their ranks after a failure (``reset_limit`` times) or when a host joins."""
    conf = f"join_timeout={elastic_timeout or 600},last_call_timeout={TORCHRUN_LAST_CALL_S}"
    return [f"--nnodes={min_np // per_host}:{max_np // per_host}",
            f"--max-restarts={reset_limit or TORCHRUN_RESTARTS}", f"--rdzv-conf={conf}"]


def torchrun_command(program, *, np, placed, plan, extra_args=(), env=None, network_interface=None,
                     ssh_port=None, ssh_identity=None, host_timeout=None, rendezvous_port=None,
                     rendezvous_id=None, elastic=None, **_):
    """torch.distributed's launcher. On this host alone: ``torchrun --standalone --nproc-per-node N
    --no-python PYTHON -m largebatch.runner ...`` (a local c10d rendezvous on a free port). Across
    hosts: one torchrun per host (``--nnodes H --rdzv-backend c10d --rdzv-endpoint FIRST:PORT``),
    started and kept as one job by :mod:`largebatch.launchers.fanout` over ssh. The ranks run
    the same program as under the other launchers; OMP_NUM_THREADS and the other thread
    variables come from the thread plan (torchrun would set OMP_NUM_THREADS=1).

    ``elastic`` (the keyword arguments of :func:`torchrun_elastic_args` but ``per_host``): always
    the c10d form, one host included (another may join: ``LaunchCommand.join`` is its torchrun),
    with ``--nnodes MIN:MAX``; a host that fails leaves the job instead of ending it."""
    notes, extra_env = list(plan.notes), {}
    if network_interface:
        extra_env["GLOO_SOCKET_IFNAME"] = network_interface        # torch's Gloo: the NIC for rank traffic
    hosts = [(h, n) for h, n in placed if n > 0]
    if not remote_hosts(hosts) and elastic is None:
        argv = [find_executable("torchrun"), "--standalone", f"--nproc-per-node={np}", *extra_args,
                "--no-python", *program]
        return LaunchCommand(argv, {**plan.env, **extra_env, **(env or {})}, notes, plan)
    endpoint = f"{hosts[0][0]}:{rendezvous_port}"
    nodes, *restarts = [f"--nnodes={len(hosts)}", "--max-restarts=0"] if elastic is None else \
        torchrun_elastic_args(per_host=hosts[0][1], **elastic)
    torchrun = [find_executable("torchrun"), nodes, "--rdzv-backend=c10d",
                f"--rdzv-endpoint={endpoint}", f"--rdzv-id={rendezvous_id or secrets.token_hex(4)}",
                *restarts, *extra_args, "--no-python", *program]
    argv = [sys.executable, "-m", "largebatch.launchers.fanout", "-H", _hostfile.hosts_arg(hosts)]
    if elastic is not None:
        argv.append("--elastic")
    if ssh_port:
        argv += ["--ssh-port", str(ssh_port)]
    if ssh_identity:
        argv += ["--ssh-identity", os.path.abspath(os.path.expanduser(ssh_identity))]
    timeout = host_timeout or 30
    argv += ["--host-timeout", str(timeout), "--python", program[0], *(f"--env={k}" for k in (env or {})),
             "--", *torchrun]
    extra_env[COLLECTIVE_TIMEOUT_ENV] = str(timeout)
    per_host = ", ".join(f"{h} {n}" for h, n in hosts)
    notes.append(f"one torchrun per host (--nproc-per-node: {per_host}), started over ssh and kept as one job by "
                 f"largebatch.launchers.fanout; c10d rendezvous at {endpoint} (launcher.rendezvous_port); ranks "
                 f"numbered in the order of the hosts' own hostnames")
    join = None
    if elastic is not None:
        # torch 2.13's agents share one store server across rounds, and a round that a host joins
        # then never publishes MASTER_ADDR (the joiner waits 60 s and fails): one per round instead
        extra_env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        from .fanout import host_torchrun
        join = host_torchrun(torchrun, hosts[0][1], is_host=False)
        notes.append(f"elastic: {elastic['min_np']} to {elastic['max_np']} ranks, {hosts[0][1]} per host; a host "
                     f"joins by running the run directory's join.sh")
    return LaunchCommand(argv, {**plan.env, **extra_env, **(env or {})}, notes, plan, join=join)


def build_command(launcher, derived, program, *, environ=None):
    """The launch command for a validated experiment's ``launcher`` section and ``derived``
    values (np, placement): see :func:`largebatch.config.load`."""
    la = launcher
    np_, placed = derived["np"], [tuple(p) for p in derived["placement"]]
    if la["type"] == "srun" and la["hosts"] is None and la["hostfile"] is None and not la["ranks_per_host"]:
        nodes = (environ or os.environ).get("SLURM_JOB_NUM_NODES", "")
        if nodes.isdigit() and int(nodes) > 1:
            per = -(-np_ // int(nodes))
            placed = [(f"node{i}", min(per, np_ - i * per)) for i in range(int(nodes)) if np_ - i * per > 0]
    plan = plan_threads(placed, cores_per_host=la["cores_per_host"], threads=la["threads_per_rank"],
                        interop=la["interop_threads"], binding=la["binding"])
    common = dict(np=np_, placed=placed, binding=la["binding"], plan=plan, extra_args=la["args"], env=la["env"])
    ssh = dict(ssh_port=la.get("ssh_port"), ssh_identity=la.get("ssh_identity"), host_timeout=la.get("host_timeout"))
    if la["type"] == "horovodrun":
        elastic = None
        if la.get("elastic"):
            elastic = dict(min_np=derived["min_np"], max_np=derived["max_np"],
                           host_discovery_script=la["host_discovery_script"],
                           elastic_timeout=la["elastic_timeout"], reset_limit=la["reset_limit"])
        return horovodrun_command(program, hostfile=la["hostfile"], controller=la["controller"],
                                  network_interface=la["network_interface"], elastic=elastic, **ssh, **common)
    if la["type"] == "torchrun":
        elastic = None
        if la.get("elastic"):
            elastic = dict(min_np=derived["min_np"], max_np=derived["max_np"],
                           elastic_timeout=la["elastic_timeout"], reset_limit=la["reset_limit"])
        return torchrun_command(program, network_interface=la["network_interface"],
                                rendezvous_port=la["rendezvous_port"], elastic=elastic, **ssh, **common)
    if la["type"] == "mpirun":
        return mpirun_command(program, hostfile=la["hostfile"], network_interface=la["network_interface"],
                              environ=environ, **ssh, **common)
    return srun_command(program, hosts_given=la["hosts"] is not None or la["hostfile"] is not None,
                        ranks_per_host=la["ranks_per_host"], **common)


def _installed():
    try:
        from importlib.metadata import PackageNotFoundError, distribution
        distribution("largebatch")
        return True
    except PackageNotFoundError:
        return False


def launch_plan(exp, run_dir, overrides):
    """The LaunchCommand that runs ``exp`` with its ranks writing to ``run_dir``."""
    program = rank_program(exp.cfg["launcher"]["python"], exp.source["file"],
                           [*overrides, f"output.run_dir={run_dir}"])
    cmd = build_command(exp.cfg["launcher"], exp.derived, program)
    if not _installed():
        # a source checkout: let every rank import this very package
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))     # the checkout
        path = os.environ.get("PYTHONPATH")
        value = os.pathsep.join([root] + ([path] if path else []))
        if cmd.argv and os.path.basename(cmd.argv[0]) == "mpirun":
            cmd.argv = [a if a != "PYTHONPATH" else f"PYTHONPATH={value}" for a in cmd.argv]
            if f"PYTHONPATH={value}" not in cmd.argv:
                i = cmd.argv.index("-np")
                cmd.argv[i:i] = ["-x", f"PYTHONPATH={value}"]
        elif os.path.basename(cmd.argv[0]) == "srun":
            cmd.argv = [a.replace("--export=ALL", f"--export=ALL,PYTHONPATH={value}", 1)
                        if a.startswith("--export=") else a for a in cmd.argv]
        else:
            cmd.env["PYTHONPATH"] = value
    return cmd
