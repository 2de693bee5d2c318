"""A throw-away cluster on one machine: hosts made of Linux network namespaces.

Each host is a network namespace on a private bridge, with its own hostname (a UTS namespace),
its own ``/etc/hosts`` in which every host's name resolves (``ip netns exec`` binds
``/etc/netns/<ns>/hosts`` over ``/etc/hosts``), and its own sshd accepting a throw-away key.
A separate *launch node* (a namespace with no ranks) stands for a login node. The bridge sits in
a namespace of its own, so the machine's own network is not touched: no interface, address or
route is added outside the namespaces, and deleting them removes every link.

The hosts share the machine's filesystem (like a cluster with a shared home) and its cores and
memory, so timings model a network, not a cluster.

    python -m largebatch.launchers.testcluster up [--hosts 2]     # prints how to use it
    python -m largebatch.launchers.testcluster exec lbh1 -- hostname
    python -m largebatch.launchers.testcluster down [--all]

The user's ``~/.ssh`` is never read or written: the key, the hosts' keys and the known-hosts
file live in the cluster's own directory; :meth:`Cluster.env` puts an ``ssh`` shim first on
PATH that points ssh at them (``UserKnownHostsFile``), and the identity and port reach
horovodrun and mpirun through ``launcher.ssh_identity`` / ``launcher.ssh_port``
(:meth:`Cluster.launcher_overrides`).

Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN), iproute2, util-linux (unshare, nsenter) and
openssh-server; :func:`unavailable` says in one line what is missing.
"""
import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import List, Optional

__all__ = ["Cluster", "Node", "unavailable", "ClusterError", "STATE_DIR"]

STATE_DIR = "/run/largebatch-testcluster"      # one JSON per live cluster, for `down --all`
PREFIX = "lbt"                                  # every namespace we make starts with this
SUBNET = "198.18.0"                             # RFC 2544's benchmarking range, inside the bridge only
SSH_PORT = 2222
SSHD = "/usr/sbin/sshd"
WAIT_S = 20                                     # every start-up wait is bounded by this


class ClusterError(RuntimeError):
    pass


@dataclass
class Node:
    name: str                 # hostname, resolvable on every node
    namespace: str
    address: str
    launch_only: bool = False
    sshd_pid: Optional[int] = None

    def exec_prefix(self, cwd=None):
        """argv prefix that runs a command on this node, in its network, UTS and mount namespaces
        (the same ones an ssh session there gets), in ``cwd`` (default: the current directory)."""
        return ["nsenter", f"--target={self.sshd_pid}", "--net", "--uts", "--mount",
                f"--wd={cwd or os.getcwd()}", "--"]


def _run(argv, check=True, timeout=WAIT_S, **kw):
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise ClusterError(f"{' '.join(argv)}: {(proc.stderr or proc.stdout).strip() or 'exit %d' % proc.returncode}")
    return proc


def unavailable():
    """None when namespace hosts can be made here, else one line saying why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces need CAP_NET_ADMIN)"
    for tool in ("ip", "unshare", "nsenter", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"needs {tool!r} on PATH"
    if not os.access(SSHD, os.X_OK):
        return f"needs openssh-server ({SSHD} missing; launchers/setup.sh installs it)"
    probe = f"{PREFIX}probe{os.getpid()}"
    proc = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=WAIT_S)
    if proc.returncode != 0:
        return f"cannot create a network namespace ({proc.stderr.strip()}); needs CAP_NET_ADMIN"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=WAIT_S)
    return None


SSHD_CONFIG = """\
Port {port}
ListenAddress {address}
HostKey {dir}/hostkey-{name}
AuthorizedKeysFile {dir}/id_ed25519.pub
PidFile {dir}/sshd-{name}.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
PrintMotd no
AcceptEnv *
PermitUserEnvironment no
ClientAliveInterval 5
ClientAliveCountMax 3
MaxStartups 100
MaxSessions 100
LogLevel ERROR
"""

SSH_SHIM = """\
#!/bin/sh
# written by largebatch.launchers.testcluster: ssh that trusts only this cluster's own files
exec /usr/bin/ssh -o UserKnownHostsFile={dir}/known_hosts -o GlobalKnownHostsFile=/dev/null \\
  -o StrictHostKeyChecking=no -o BatchMode=yes -o LogLevel=ERROR -o ConnectTimeout=5 \\
  -o ServerAliveInterval=5 -o ServerAliveCountMax=3 "$@"
"""


@dataclass
class Cluster:
    """``hosts`` hosts named ``lbh1..lbhN`` plus a launch node ``lblaunch``.

    Use as a context manager (tear-down always runs) or call :meth:`up` / :meth:`down`."""
    hosts: int = 2
    launch_node: bool = True
    ssh_port: int = SSH_PORT
    id: str = field(default_factory=lambda: secrets.token_hex(2))
    dir: Optional[str] = None
    nodes: List[Node] = field(default_factory=list)

    # ------------------------------------------------------------------ public
    @property
    def host_nodes(self):
        return [n for n in self.nodes if not n.launch_only]

    @property
    def launcher(self):
        return next(n for n in self.nodes if n.launch_only)

    def node(self, name):
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node {name!r} in this cluster (have: {', '.join(n.name for n in self.nodes)})")

    @property
    def identity(self):
        return os.path.join(self.dir, "id_ed25519")

    def env(self, base=None):
        """Environment for a launcher running on a node: the ssh shim first on PATH."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = os.pathsep.join([os.path.join(self.dir, "bin"), env.get("PATH", "/usr/bin:/bin")])
        return env

    def launcher_overrides(self):
        """``largebatch run`` overrides that hand this cluster's ssh identity and port to the launcher."""
        return [f"launcher.ssh_identity={self.identity}", f"launcher.ssh_port={self.ssh_port}"]

    def hosts_arg(self, slots=1):
        return ",".join(f"{n.name}:{slots}" for n in self.host_nodes)

    def write_hostfile(self, path, slots=1):
        with open(path, "w") as fh:
            fh.write("# written by largebatch.launchers.testcluster\n")
            for n in self.host_nodes:
                fh.write(f"{n.name} slots={slots}\n")
        return path

    def run(self, node, argv, **kw):
        """subprocess.run ``argv`` on ``node`` (a name or Node) with the cluster's environment."""
        node = self.node(node) if isinstance(node, str) else node
        kw.setdefault("env", self.env())
        return subprocess.run(node.exec_prefix(kw.pop("cwd", None)) + list(argv), **kw)

    def popen(self, node, argv, **kw):
        node = self.node(node) if isinstance(node, str) else node
        kw.setdefault("env", self.env())
        return subprocess.Popen(node.exec_prefix(kw.pop("cwd", None)) + list(argv), **kw)

    def pids(self, node):
        """PIDs of every process in ``node``'s network namespace (all started by this cluster)."""
        node = self.node(node) if isinstance(node, str) else node
        proc = subprocess.run(["ip", "netns", "pids", node.namespace], capture_output=True, text=True,
                              timeout=WAIT_S)
        return [int(p) for p in proc.stdout.split()]

    def processes(self, node, exclude_sshd=True):
        """[(pid, command line)] running on ``node``, the node's sshd left out by default."""
        node = self.node(node) if isinstance(node, str) else node
        out = []
        for pid in self.pids(node):
            if exclude_sshd and pid == node.sshd_pid:
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            out.append((pid, cmd))
        return out

    def link(self, node, up):
        """Take ``node``'s network link down (``up=False``) or back up: a host that loses its network."""
        node = self.node(node) if isinstance(node, str) else node
        _run(["ip", "-n", node.namespace, "link", "set", "eth0", "up" if up else "down"])

    # ------------------------------------------------------------------ up / down
    def up(self):
        reason = unavailable()
        if reason:
            raise ClusterError(f"cannot build the test cluster: {reason}")
        self.dir = self.dir or tempfile.mkdtemp(prefix=f"largebatch-cluster-{self.id}-")
        os.makedirs(self.dir, exist_ok=True)
        names = [f"lbh{i + 1}" for i in range(self.hosts)] + (["lblaunch"] if self.launch_node else [])
        self.nodes = [Node(name, f"{PREFIX}{self.id}-{name}", f"{SUBNET}.{10 + i}", launch_only=(name == "lblaunch"))
                      for i, name in enumerate(names)]
        self._save()
        try:
            self._make_keys()
            switch = f"{PREFIX}{self.id}-switch"
            _run(["ip", "netns", "add", switch])
            _run(["ip", "-n", switch, "link", "add", "br0", "type", "bridge"])
            _run(["ip", "-n", switch, "link", "set", "br0", "up"])
            hosts_text = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n" + \
                "".join(f"{n.address}\t{n.name}\n" for n in self.nodes)
            for i, n in enumerate(self.nodes):
                _run(["ip", "netns", "add", n.namespace])
                _run(["ip", "-n", switch, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0",
                      "netns", n.namespace])
                _run(["ip", "-n", switch, "link", "set", f"v{i}", "master", "br0", "up"])
                _run(["ip", "-n", n.namespace, "addr", "add", f"{n.address}/24", "dev", "eth0"])
                _run(["ip", "-n", n.namespace, "link", "set", "eth0", "up"])
                _run(["ip", "-n", n.namespace, "link", "set", "lo", "up"])
                etc = f"/etc/netns/{n.namespace}"
                os.makedirs(etc, exist_ok=True)
                with open(os.path.join(etc, "hosts"), "w") as fh:
                    fh.write(hosts_text)
                with open(os.path.join(etc, "hostname"), "w") as fh:
                    fh.write(n.name + "\n")
            for n in self.nodes:
                self._start_sshd(n)
            self._save()
            self._wait_ssh()
        except BaseException:
            self.down()
            raise
        return self

    def down(self):
        """Kill every process in the cluster's namespaces, delete them and their files. Idempotent."""
        namespaces = [n.namespace for n in self.nodes] + [f"{PREFIX}{self.id}-switch"]
        _teardown(namespaces, self.dir, self._state_path())

    def __enter__(self):
        return self.up()

    def __exit__(self, *exc):
        self.down()

    # ------------------------------------------------------------------ internals
    def _state_path(self):
        return os.path.join(STATE_DIR, f"{self.id}.json")

    def _save(self):
        os.makedirs(STATE_DIR, exist_ok=True)
        tmp = self._state_path() + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"id": self.id, "dir": self.dir, "ssh_port": self.ssh_port, "hosts": self.hosts,
                       "nodes": [asdict(n) for n in self.nodes]}, fh, indent=1)
        os.replace(tmp, self._state_path())

    def _make_keys(self):
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"largebatch-testcluster-{self.id}",
              "-f", self.identity])
        for n in self.nodes:
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(self.dir, f"hostkey-{n.name}")])
        open(os.path.join(self.dir, "known_hosts"), "w").close()
        os.makedirs(os.path.join(self.dir, "bin"), exist_ok=True)
        shim = os.path.join(self.dir, "bin", "ssh")
        with open(shim, "w") as fh:
            fh.write(SSH_SHIM.format(dir=self.dir))
        os.chmod(shim, 0o755)

    def _start_sshd(self, n):
        config = os.path.join(self.dir, f"sshd-{n.name}.conf")
        with open(config, "w") as fh:
            fh.write(SSHD_CONFIG.format(port=self.ssh_port, address=n.address, dir=self.dir, name=n.name))
        os.makedirs("/run/sshd", exist_ok=True)            # sshd's privilege-separation directory
        log = open(os.path.join(self.dir, f"sshd-{n.name}.log"), "w")
        # ip netns exec: the namespace's network and /etc/netns/<ns>/hosts as /etc/hosts;
        # unshare --uts: the host's own hostname; exec keeps one PID, which we own
        proc = subprocess.Popen(["ip", "netns", "exec", n.namespace, "unshare", "--uts", "sh", "-c",
                                 f"hostname {n.name} && exec {SSHD} -D -e -f {config}"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        n.sshd_pid = proc.pid

    def _wait_ssh(self):
        deadline = time.monotonic() + WAIT_S
        pending = list(self.nodes)
        probe = self.launcher if self.launch_node else self.nodes[0]
        while pending and time.monotonic() < deadline:
            for n in list(pending):
                proc = self.run(probe, ["ssh", "-i", self.identity, "-p", str(self.ssh_port), n.name, "hostname"],
                                capture_output=True, text=True, timeout=10)
                if proc.returncode == 0 and proc.stdout.strip() == n.name:
                    pending.remove(n)
            if pending:
                time.sleep(0.2)
        if pending:
            logs = "; ".join(open(os.path.join(self.dir, f"sshd-{n.name}.log")).read().strip()[-200:]
                             for n in pending)
            raise ClusterError(f"sshd on {', '.join(n.name for n in pending)} did not answer within {WAIT_S} s"
                               f" ({logs or 'no sshd log'})")


def _kill_namespace(namespace, deadline):
    """SIGTERM, then SIGKILL, every process in ``namespace`` (each one was started inside it by us)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, timeout=WAIT_S)
        pids = [int(p) for p in proc.stdout.split()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        limit = min(deadline, time.monotonic() + 3)
        while time.monotonic() < limit:
            proc = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True,
                                  timeout=WAIT_S)
            if not proc.stdout.split():
                return
            time.sleep(0.1)


def _teardown(namespaces, directory, state_path):
    existing = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                  timeout=WAIT_S).stdout.split())
    deadline = time.monotonic() + 15
    for ns in namespaces:
        if ns in existing:
            _kill_namespace(ns, deadline)
    for ns in namespaces:
        if ns in existing:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=WAIT_S)
        shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
    try:
        os.rmdir("/etc/netns")             # only if we left it empty
    except OSError:
        pass
    if directory:
        shutil.rmtree(directory, ignore_errors=True)
    if state_path and os.path.exists(state_path):
        os.remove(state_path)


def _load(state_path):
    with open(state_path) as fh:
        state = json.load(fh)
    c = Cluster(hosts=state["hosts"], ssh_port=state["ssh_port"], id=state["id"], dir=state["dir"])
    c.nodes = [Node(**n) for n in state["nodes"]]
    return c


def _live_states():
    if not os.path.isdir(STATE_DIR):
        return []
    return sorted(os.path.join(STATE_DIR, f) for f in os.listdir(STATE_DIR) if f.endswith(".json"))


def _one_cluster(args):
    states = _live_states()
    if args.id:
        path = os.path.join(STATE_DIR, f"{args.id}.json")
        if not os.path.exists(path):
            raise ClusterError(f"no test cluster {args.id!r} (live: {', '.join(_ids(states)) or 'none'})")
        return _load(path)
    if len(states) != 1:
        raise ClusterError("expected exactly one live test cluster, found "
                           f"{len(states)}{' (' + ', '.join(_ids(states)) + ')' if states else ''}; pass --id")
    return _load(states[0])


def _ids(states):
    return [os.path.basename(p)[:-5] for p in states]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m largebatch.launchers.testcluster",
                                description="A throw-away cluster of network-namespace hosts on this machine.")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build the hosts and start their sshd")
    up.add_argument("--hosts", type=int, default=2, help="number of hosts (default 2)")
    ex = sub.add_parser("exec", help="run a command on a node: exec lbh1 -- hostname")
    ex.add_argument("node")
    ex.add_argument("cmd", nargs=argparse.REMAINDER)
    for s in (ex, sub.add_parser("status", help="list the nodes")):
        s.add_argument("--id")
    down = sub.add_parser("down", help="remove the cluster (every namespace, sshd, file and process)")
    down.add_argument("--id")
    down.add_argument("--all", action="store_true", help="remove every live test cluster")
    args = p.parse_args(argv)
    try:
        if args.command == "up":
            if not 1 <= args.hosts <= 8:
                raise ClusterError(f"--hosts: expected 1 to 8, got {args.hosts}")
            c = Cluster(hosts=args.hosts).up()
            print(f"test cluster {c.id} up: " + ", ".join(f"{n.name} {n.address}" for n in c.nodes))
            me = f"{sys.executable} -m largebatch.launchers.testcluster"
            largebatch = os.path.join(os.path.dirname(sys.executable), "largebatch")
            print(f"  a shell on the launch node:  {me} exec lblaunch -- bash")
            # absolute paths: the hint works from any directory, not only the checkout
            example = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                                   "synthetic_torch.yaml")
            if not os.path.isfile(example):
                example = "EXP.yaml"
            print(f"  then, in it:                 {largebatch} run {example} -H {c.hosts_arg()} "
                  + " ".join(c.launcher_overrides()))
            print(f"  remove it:                   {me} down")
            return 0
        if args.command == "down":
            paths = _live_states() if args.all else [os.path.join(STATE_DIR, f"{_one_cluster(args).id}.json")]
            for path in paths:
                c = _load(path)
                c.down()
                print(f"test cluster {c.id} removed")
            return 0
        c = _one_cluster(args)
        if args.command == "status":
            for n in c.nodes:
                alive = n.sshd_pid and os.path.exists(f"/proc/{n.sshd_pid}")
                print(f"{n.name:<10} {n.address:<14} {'launch node' if n.launch_only else 'host':<12} "
                      f"sshd {'up' if alive else 'DOWN'}")
            return 0
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            raise ClusterError("exec: expected a command after the node name, e.g. exec lbh1 -- hostname")
        return subprocess.call(c.node(args.node).exec_prefix() + cmd, env=c.env())
    except (ClusterError, KeyError) as err:
        print(f"testcluster: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
