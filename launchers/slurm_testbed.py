"""A throw-away Slurm for tests: munged + slurmctld + one slurmd per host, all in a temp dir.

Nothing on the machine is configured or touched: every daemon gets its own key, socket, pid,
log, spool and state paths inside the temp dir, the clients find the cluster through
``SLURM_CONF`` (see :meth:`SlurmTestbed.env`), and :meth:`SlurmTestbed.stop` ends exactly the
processes it started (plus any job step of this cluster still alive: they carry this
testbed's marker in their environment), then removes the temp dir. /etc/slurm and /etc/munge
are not read or written (the Debian packages' system services stay stopped and disabled).

Hosts are :class:`Host` objects: ``name`` is the Slurm node name (``slurmd -N name``),
``address`` where slurmctld reaches that node's slurmd, ``exec_prefix`` the argv prefix that
runs a command on that host (``[]`` for this machine, ``["ip", "netns", "exec", "ns1"]`` or
testcluster's ``Node.exec_prefix()`` for a network-namespace host). The controller runs where
``ctld_prefix`` says (default ``[]``: this machine; e.g. a namespace cluster's launch node) and
listens on ``ctld_address`` (default: 127.0.0.1 when every host is local, else the first
host's address); the clients (:meth:`SlurmTestbed.run`) run there too unless
``client_prefix`` is given. One munged serves every host: its socket is a path on the shared
filesystem, which works across network namespaces. Several slurmd on one machine work too
(distinct names and ports; each node gets its own spool and TmpFS), though every such node
then reports all of the machine's CPUs.

    with SlurmTestbed() as sb:                     # one node: this machine
        subprocess.run(["srun", "-n2", "hostname"], env=sb.env())

CLI (daemons stay up between commands; the state lives in a small JSON file):

    python -m largebatch.launchers.slurm_testbed up [--nodes N] [--state FILE]   # prints export SLURM_CONF=...
    python -m largebatch.launchers.slurm_testbed status
    python -m largebatch.launchers.slurm_testbed down

Requires root (slurmd launches tasks as the submitting user) and Debian's ``slurmctld``,
``slurmd``, ``slurm-client`` and ``munge`` packages.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

__all__ = ["Host", "SlurmTestbed", "TestbedError", "missing_requirements", "local_host", "DAEMONS",
           "CLIENTS", "MARKER_ENV"]

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("srun", "sinfo", "squeue", "scontrol", "sbatch", "salloc", "scancel")
MARKER_ENV = "LARGEBATCH_SLURM_TESTBED"
DEFAULT_STATE = os.path.join(tempfile.gettempdir(), "largebatch-slurm-testbed.json")
_SBIN = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")


class TestbedError(RuntimeError):
    """The testbed could not start; the message says why (with the daemon's log tail)."""


@dataclass
class Host:
    name: str                                   # Slurm node name (slurmd -N name)
    address: str = "127.0.0.1"                  # NodeAddr: where slurmctld reaches this slurmd
    exec_prefix: List[str] = field(default_factory=list)   # argv prefix running a command there
    cpus: Optional[Dict[str, int]] = None       # CPUs/Sockets/Cores/Threads; None: ask the host (slurmd -C)


def _which(name):
    found = shutil.which(name)
    if found:
        return found
    for d in _SBIN:
        p = os.path.join(d, name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


def missing_requirements():
    """One line saying why the testbed cannot start here, or None."""
    if os.geteuid() != 0:
        return "the Slurm testbed needs root (slurmd runs job steps as the submitting user)"
    missing = [n for n in DAEMONS + ("srun", "sinfo", "scontrol") if _which(n) is None]
    if missing:
        return ("Slurm/munge not installed (missing " + ", ".join(missing) +
                "; apt-get install slurmctld slurmd slurm-client munge)")
    return None


def local_host():
    """This machine as a one-node cluster: its short hostname, on loopback."""
    return Host(name=socket.gethostname().split(".")[0], address="127.0.0.1", exec_prefix=[])


def _free_port(address="127.0.0.1"):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((address, 0))
        return s.getsockname()[1]


def _node_cpus(host):
    """CPUs, Boards, SocketsPerBoard, CoresPerSocket, ThreadsPerCore as the host's slurmd -C reports."""
    if host.cpus:
        return dict(host.cpus)
    out = subprocess.run([*host.exec_prefix, _which("slurmd") or "slurmd", "-C"], capture_output=True,
                         text=True, timeout=30, env=_clean_env()).stdout
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    found = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", out) if k in keys}
    if "CPUs" not in found:
        n = os.cpu_count() or 1
        found = {"CPUs": n}
    return found


def _clean_env(extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SLURMD_", "SALLOC_", "SBATCH_",
                                                                     "SRUN_"))}
    env.update(extra or {})
    return env


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:                                       # a zombie is not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _proc_env_has(pid, needle):
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return needle in fh.read().split(b"\0")
    except OSError:
        return False


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _has_fd_under(pid, root):
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    prefix = root.rstrip("/") + "/"
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                return True
        except OSError:
            pass
    return False


def marked_processes(root):
    """PIDs of this testbed: those whose environment carries its marker (daemons, srun/sbatch
    run through :meth:`SlurmTestbed.env`, job tasks) or that hold a file open in its temp dir
    (slurmstepd, which blanks its environment but keeps the testbed's slurmd log open)."""
    needle = f"{MARKER_ENV}={root}".encode()
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        if (_proc_env_has(entry, needle) or _has_fd_under(entry, root)) and _pid_alive(int(entry)):
            pids.append(int(entry))
    return sorted(pids)


def step_daemons(root):
    """The testbed's slurmstepd processes still alive."""
    return [p for p in marked_processes(root) if _cmdline(p).startswith("slurmstepd")]


def _tail(path, n=15):
    try:
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-n:])
    except OSError:
        return ""


class SlurmTestbed:
    """See the module docstring. ``hosts`` default: this machine (:func:`local_host`)."""

    def __init__(self, hosts=None, *, ctld_address=None, ctld_prefix=(), client_prefix=None, cluster="lbtest",
                 partition="debug", workdir=None, start_timeout=60.0, extra_conf="", cred_expire=10):
        self.hosts = [h if isinstance(h, Host) else Host(**h) for h in (hosts or [local_host()])]
        names = [h.name for h in self.hosts]
        if len(set(names)) != len(names):
            raise ValueError(f"host names must differ, got {names}")
        local = all(not h.exec_prefix for h in self.hosts)
        self.ctld_address = ctld_address or ("127.0.0.1" if local else self.hosts[0].address)
        self.ctld_prefix = list(ctld_prefix)
        # where clients (srun, sbatch, sinfo) run: they must reach slurmctld and every slurmd
        self.client_prefix = list(self.ctld_prefix if client_prefix is None else client_prefix)
        self.cluster, self.partition = cluster, partition
        self.start_timeout, self.extra_conf = float(start_timeout), extra_conf
        self.cred_expire = int(cred_expire)
        self._workdir_parent = workdir
        self.root = None
        self.procs = {}                          # label -> pid (the Popen'ed process)
        self._popen = {}
        self.ports = {}

    # -- paths and environment ----------------------------------------------------------------
    def path(self, *parts):
        return os.path.join(self.root, *parts)

    @property
    def conf(self):
        return self.path("slurm.conf")

    @property
    def munge_socket(self):
        return self.path("munge", "munge.socket")

    def env(self, base=None):
        """The environment for Slurm clients (srun, sbatch, sinfo ...) of this cluster."""
        env = _clean_env() if base is None else dict(base)
        env["SLURM_CONF"] = self.conf
        env[MARKER_ENV] = self.root
        return env

    # -- start ---------------------------------------------------------------------------------
    def start(self):
        why = missing_requirements()
        if why:
            raise TestbedError(why)
        self.root = tempfile.mkdtemp(prefix="lb-slurm-", dir=self._workdir_parent)
        os.chmod(self.root, 0o755)               # job steps (root here) read slurm.conf
        try:
            for d in ("munge", "state", "spool", "log", "run", "tmp"):
                os.makedirs(self.path(d), exist_ok=True)
            os.chmod(self.path("munge"), 0o755)
            self._start_munged()
            self._write_conf()
            self._start_slurmctld()
            for h in self.hosts:
                self._start_slurmd(h)
            self.wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, label, argv, prefix=()):
        log = open(self.path("log", f"{label}.out"), "ab")
        env = _clean_env({MARKER_ENV: self.root, "SLURM_CONF": self.conf})
        p = subprocess.Popen([*prefix, *argv], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             env=env, start_new_session=True, close_fds=True)
        log.close()
        self._popen[label] = p
        self.procs[label] = p.pid
        return p

    def _start_munged(self):
        key = self.path("munge", "munge.key")
        with open(key, "wb") as fh:
            fh.write(os.urandom(1024))
        os.chmod(key, 0o400)
        self._spawn("munged", [_which("munged"), "-F", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={self.path('munge', 'munged.pid')}",
                               f"--log-file={self.path('log', 'munged.log')}",
                               f"--seed-file={self.path('munge', 'munged.seed')}"])
        self._wait(lambda: os.path.exists(self.munge_socket), 15, "munged", self.path("log", "munged.log"))

    def _write_conf(self):
        ctld_name = self._ctld_hostname()
        self.ports["slurmctld"] = _free_port("127.0.0.1" if not self.ctld_prefix else "0.0.0.0")
        used = {self.ports["slurmctld"]}
        lines = [
            "# generated by largebatch.launchers.slurm_testbed: a throw-away test cluster",
            f"ClusterName={self.cluster}",
            f"SlurmctldHost={ctld_name}({self.ctld_address})",
            f"SlurmctldPort={self.ports['slurmctld']}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            # cred_expire: a requeued job waits cred_expire + 1 s before it may start again (default
            # 120 s); 10 s keeps requeue tests short
            f"AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}",
            f"StateSaveLocation={self.path('state')}",
            f"SlurmdSpoolDir={self.path('spool', '%n')}",
            f"SlurmctldPidFile={self.path('run', 'slurmctld.pid')}",
            f"SlurmdPidFile={self.path('run', 'slurmd-%n.pid')}",
            f"SlurmctldLogFile={self.path('log', 'slurmctld.log')}",
            f"SlurmdLogFile={self.path('log', 'slurmd-%n.log')}",
            f"PlugStackConfig={self.path('plugstack.conf')}",
            # per node: hosts share the filesystem, and pmix makes spmix_appdir_<uid>_<step> there
            f"TmpFS={self.path('tmp', '%n')}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/affinity",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "MpiDefault=none", "SwitchType=switch/none",
            # bf_interval: a requeued job, eligible again after cred_expire, starts within 2 s (default 30)
            "SchedulerType=sched/backfill", "SchedulerParameters=bf_interval=2", "ReturnToService=2",
            "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none", "MailProg=/bin/true",
            "SlurmctldTimeout=30", "SlurmdTimeout=30", "InactiveLimit=0", "MinJobAge=10",
            "KillWait=5", "Waittime=0", "MessageTimeout=10", "SlurmctldDebug=info", "SlurmdDebug=info",
        ]
        for h in self.hosts:
            for d in ("spool", "tmp"):
                os.makedirs(self.path(d, h.name), exist_ok=True)
            port = _free_port("127.0.0.1" if not h.exec_prefix else "0.0.0.0")
            while port in used:
                port = _free_port()
            used.add(port)
            self.ports[h.name] = port
            cpus = " ".join(f"{k}={v}" for k, v in _node_cpus(h).items())
            lines.append(f"NodeName={h.name} NodeAddr={h.address} Port={port} {cpus} State=UNKNOWN")
        lines.append(f"PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        if self.extra_conf:
            lines.append(self.extra_conf)
        with open(self.conf, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        with open(self.path("plugstack.conf"), "w") as fh:
            fh.write("# none\n")
        # slurmd 22.05 always loads a cgroup plugin, even with proctrack/linuxproc and task/affinity;
        # its autodetection fails where /sys/fs/cgroup is not mounted (a network-namespace host's
        # fresh /sys). Naming cgroup/v1 skips the detection; nothing here uses cgroups.
        os.makedirs(self.path("cgroup"), exist_ok=True)
        with open(self.path("cgroup.conf"), "w") as fh:
            fh.write(f"CgroupPlugin=cgroup/v1\nCgroupMountpoint={self.path('cgroup')}\nCgroupAutomount=no\n")

    def _ctld_hostname(self):
        out = subprocess.run([*self.ctld_prefix, "hostname", "-s"], capture_output=True, text=True, timeout=15)
        name = out.stdout.strip()
        if out.returncode != 0 or not name:
            raise TestbedError(f"cannot read the controller's hostname: {out.stderr.strip()}")
        return name

    def _start_slurmctld(self):
        # -i: ignore (empty) saved state; -c would clear it too
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", self.conf], prefix=self.ctld_prefix)
        self._wait(lambda: self.scontrol("ping", check=False).returncode == 0
                   and "UP" in self.scontrol("ping", check=False).stdout,
                   self.start_timeout, "slurmctld", self.path("log", "slurmctld.log"))

    def _start_slurmd(self, host):
        self._spawn(f"slurmd-{host.name}", [_which("slurmd"), "-D", "-N", host.name, "-f", self.conf],
                    prefix=host.exec_prefix)

    def _wait(self, ok, timeout, label, log):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = self._popen.get(label)
            if p is not None and p.poll() is not None:
                raise TestbedError(f"{label} exited with {p.returncode}:\n" + _tail(log) +
                                   _tail(self.path("log", f"{label}.out")))
            try:
                if ok():
                    return
            except (OSError, subprocess.SubprocessError):
                pass
            time.sleep(0.3)
        raise TestbedError(f"{label} not ready after {timeout:g} s:\n" + _tail(log) +
                           _tail(self.path("log", f"{label}.out")))

    def node_states(self):
        """{node name: state} as sinfo reports it (idle, mix, alloc, down*, unk* ...)."""
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False, timeout=15).stdout
        return dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)

    def wait_idle(self, timeout=None):
        """Bounded wait until every node is idle (or mixed/allocated by a running job)."""
        timeout = self.start_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        states = {}
        while time.monotonic() < deadline:
            for label, p in self._popen.items():
                if p.poll() is not None:
                    name = label.split("-", 1)[1] if label.startswith("slurmd-") else None
                    log = self.path("log", f"slurmd-{name}.log") if name else self.path("log", f"{label}.log")
                    raise TestbedError(f"{label} exited with {p.returncode}:\n" + _tail(log) +
                                       _tail(self.path("log", f"{label}.out")))
            states = self.node_states()
            if len(states) == len(self.hosts) and all(s.rstrip("*~#") in ("idle", "mix", "alloc")
                                                      and not s.endswith("*") for s in states.values()):
                return states
            time.sleep(0.5)
        logs = "".join(_tail(self.path("log", f"slurmd-{h.name}.log"), 8) for h in self.hosts)
        raise TestbedError(f"nodes not idle after {timeout:g} s: {states}\n{logs}"
                           + _tail(self.path("log", "slurmctld.log"), 8))

    # -- clients -------------------------------------------------------------------------------
    def run(self, argv, *, check=True, timeout=60, env=None, **kw):
        """Run a Slurm client (``argv[0]`` found in /usr/bin) against this cluster, where the
        clients run (``client_prefix``: the controller's host unless given)."""
        exe = _which(argv[0]) or argv[0]
        return subprocess.run([*self.client_prefix, exe, *argv[1:]], env=self.env(env), capture_output=True,
                              text=True, timeout=timeout, check=check, **kw)

    def popen(self, argv, env=None, **kw):
        """Start a Slurm client in the background (same place and environment as :meth:`run`)."""
        exe = _which(argv[0]) or argv[0]
        return subprocess.Popen([*self.client_prefix, exe, *argv[1:]], env=self.env(env), **kw)

    def scontrol(self, *args, check=True):
        return self.run(["scontrol", *args], check=check, timeout=15)

    # -- stop ----------------------------------------------------------------------------------
    def cancel_all(self, timeout=15):
        """scancel every job of this cluster and wait (bounded) until none is left."""
        if not self.root or not os.path.exists(self.conf):
            return
        try:
            self.run(["scancel", "--full", "-u", "root"], check=False, timeout=10)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if not self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=10).stdout.strip():
                    break
                time.sleep(0.5)
        except (OSError, subprocess.SubprocessError):
            pass

    def stop(self, timeout=15):
        """End every job, then exactly the daemons started here (TERM, then KILL after
        ``timeout``), then any leftover process carrying this testbed's marker (job steps),
        and remove the temp dir. Returns the list of leftovers that had to be killed."""
        if self.root is None:
            return []
        if "slurmctld" in self.procs and _pid_alive(self.procs["slurmctld"]):
            self.cancel_all()
        deadline = time.monotonic() + timeout          # let job steps finish their clean-up
        while time.monotonic() < deadline and step_daemons(self.root):
            time.sleep(0.2)
        order = [l for l in self.procs if l.startswith("slurmd-")] + ["slurmctld", "munged"]
        for label in order:
            if label in self.procs:
                _terminate([self.procs[label]], timeout, self._popen.get(label))
        leftovers = marked_processes(self.root)
        _terminate(leftovers, 5)
        for p in self._popen.values():
            try:
                p.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.root, ignore_errors=True)
        self.root, self.procs, self._popen = None, {}, {}
        return leftovers

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    # -- CLI state -----------------------------------------------------------------------------
    def state(self):
        return {"root": self.root, "conf": self.conf, "pids": self.procs, "ports": self.ports,
                "hosts": [asdict(h) for h in self.hosts], "cmdlines": {l: _cmdline(p) for l, p in self.procs.items()}}


def _terminate(pids, timeout, popen=None):
    pids = [p for p in pids if _pid_alive(p)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
        if popen is not None:
            popen.poll()
        time.sleep(0.1)
    for pid in pids:
        if _pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if popen is not None:
        try:
            popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _load_state(path):
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None


def _cli_down(state_path):
    st = _load_state(state_path)
    if st is None:
        print(f"no testbed recorded in {state_path}")
        return 0
    root = st["root"]
    env = _clean_env({"SLURM_CONF": st["conf"]})
    if os.path.exists(st["conf"]):
        subprocess.run([_which("scancel") or "scancel", "--full", "-u", "root"], env=env, capture_output=True,
                       timeout=10)
        time.sleep(1)
    for label in [l for l in st["pids"] if l.startswith("slurmd-")] + ["slurmctld", "munged"]:
        pid = st["pids"].get(label)
        # only the process recorded, and only if it still is that process (pid not reused)
        if pid and _pid_alive(pid) and _cmdline(pid) == st["cmdlines"].get(label):
            _terminate([pid], 15)
    _terminate(marked_processes(root), 5)
    shutil.rmtree(root, ignore_errors=True)
    os.unlink(state_path)
    print(f"testbed in {root} stopped")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m largebatch.launchers.slurm_testbed",
                                 description="A throw-away Slurm (munged, slurmctld, slurmd) in a temp dir.")
    ap.add_argument("action", choices=("up", "down", "status"))
    ap.add_argument("--state", default=DEFAULT_STATE, help=f"state file (default {DEFAULT_STATE})")
    ap.add_argument("--hosts-json", help="JSON list of {name, address, exec_prefix} (default: this machine)")
    args = ap.parse_args(argv)
    if args.action == "down":
        return _cli_down(args.state)
    if args.action == "status":
        st = _load_state(args.state)
        if st is None:
            print(f"no testbed recorded in {args.state}")
            return 1
        alive = {l: _pid_alive(p) for l, p in st["pids"].items()}
        print(json.dumps({"conf": st["conf"], "alive": alive}, indent=1))
        r = subprocess.run([_which("sinfo") or "sinfo", "-N"], env=_clean_env({"SLURM_CONF": st["conf"]}),
                           capture_output=True, text=True, timeout=15)
        print(r.stdout + r.stderr, end="")
        return 0 if all(alive.values()) else 1
    if _load_state(args.state) is not None:
        print(f"a testbed is already recorded in {args.state}; run `down` first", file=sys.stderr)
        return 1
    hosts = [Host(**h) for h in json.loads(args.hosts_json)] if args.hosts_json else None
    tb = SlurmTestbed(hosts)
    try:
        tb.start()
    except TestbedError as err:
        print(f"testbed did not start: {err}", file=sys.stderr)
        return 1
    with open(args.state, "w") as fh:
        json.dump(tb.state(), fh, indent=1)
    print(f"export SLURM_CONF={tb.conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
