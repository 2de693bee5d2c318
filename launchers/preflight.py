"""Checks of the hosts of a multi-host job: before launching (``largebatch doctor --hosts``, and
``largebatch run`` for the checks whose failure is a hang or a crash) and after a failed job
(which host stopped answering).

Every probe is one ``ssh -o BatchMode=yes -o ConnectTimeout=...`` command with a hard timeout,
run for all hosts at once, so a dead host costs one timeout, not one per check. Each problem is
one line naming the host and the fix.
"""
import concurrent.futures
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Optional

__all__ = ["SSH", "HostReport", "probe_hosts", "check_hosts", "unreachable", "local_addresses", "PROBE_TIMEOUT_S"]

PROBE_TIMEOUT_S = 10


@dataclass
class SSH:
    """How to reach the hosts: what ``launcher.ssh_port`` / ``ssh_identity`` say."""
    port: Optional[int] = None
    identity: Optional[str] = None
    connect_timeout: int = 5
    keepalive: Optional[int] = None      # seconds after which a silent host ends the session

    def argv(self, host, command):
        argv = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.connect_timeout}"]
        if self.keepalive:               # three unanswered probes, keepalive/3 apart
            argv += ["-o", f"ServerAliveInterval={max(1, self.keepalive // 3)}", "-o", "ServerAliveCountMax=3"]
        if self.port:
            argv += ["-p", str(self.port)]
        if self.identity:
            argv += ["-i", os.path.abspath(os.path.expanduser(self.identity))]
        return argv + [host, command]


# What each host reports about itself: run by the host's own python (the launch node's path,
# since ranks run that same interpreter), printing one JSON line. Versions are read from
# package metadata, which is fast and imports no framework.
_REPORT = r"""
import json, os, socket, sys
out = {"hostname": socket.gethostname(), "python": sys.version.split()[0], "executable": sys.executable,
       "prefix": sys.prefix, "cores": len(os.sched_getaffinity(0)), "packages": {}, "resolves": {}, "reach": {},
       "files": {path: os.path.isfile(path) for path in FILES}, "bind": {},
       "interfaces": sorted(os.listdir("/sys/class/net")) if os.path.isdir("/sys/class/net") else []}
try:
    from importlib.metadata import version
except ImportError:
    version = None
for name in ("torch", "tensorflow-cpu", "tensorflow", "horovod", "largebatch"):
    try:
        out["packages"][name] = version(name)
    except Exception:
        pass
for name in NAMES:
    try:
        out["resolves"][name] = socket.gethostbyname(name)
    except OSError as err:
        out["resolves"][name] = None
for name, port in REACH:
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((name, port))
        out["reach"][f"{name}:{port}"] = "ok"
    except OSError as err:
        out["reach"][f"{name}:{port}"] = str(err) or type(err).__name__
    finally:
        s.close()
for port in BIND:
    s = socket.socket()
    try:
        # as a server binds (c10d's store does): a port held only by closed connections is free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", port))
        out["bind"][str(port)] = "ok"
    except OSError as err:
        out["bind"][str(port)] = str(err) or type(err).__name__
    finally:
        s.close()
print("LARGEBATCH-HOST " + json.dumps(out))
"""


@dataclass
class HostReport:
    host: str
    ok: bool
    error: str = ""
    seconds: float = 0.0
    facts: Dict = field(default_factory=dict)


def _probe(host, ssh, python, names, reach, timeout, files=(), bind=()):
    script = _REPORT.replace("NAMES", repr(list(names))).replace("REACH", repr(list(reach))) \
        .replace("FILES", repr(list(files))).replace("BIND", repr(list(bind)))
    command = f"{shlex.quote(python)} -c {shlex.quote(script)}"
    started = time.monotonic()
    try:
        proc = subprocess.run(ssh.argv(host, command), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return HostReport(host, False, f"no answer within {timeout} s", time.monotonic() - started)
    except FileNotFoundError:
        return HostReport(host, False, "ssh not found on this machine (install openssh-client)")
    elapsed = time.monotonic() - started
    for line in proc.stdout.splitlines():
        if line.startswith("LARGEBATCH-HOST "):
            return HostReport(host, True, "", elapsed, json.loads(line[len("LARGEBATCH-HOST "):]))
    err = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    if proc.returncode == 255:
        return HostReport(host, False, f"ssh failed: {err}", elapsed)
    return HostReport(host, False, f"{python} failed there: {err}", elapsed)


def _on_every_host(fn, hosts):
    """[fn(host) for host in hosts], all at once: a dead host costs one timeout, not one per host."""
    hosts = list(hosts)
    if not hosts:
        return []
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        return list(pool.map(fn, hosts))


def probe_hosts(hosts, ssh=None, *, python=None, names=(), reach=(), timeout=PROBE_TIMEOUT_S, files=(), bind=None):
    """One :class:`HostReport` per host, probed concurrently (``files``: paths whose presence each
    reports; ``bind``: {host: ports} that host tries to listen on)."""
    ssh = ssh or SSH()
    python = python or sys.executable
    bind = bind or {}
    return _on_every_host(lambda h: _probe(h, ssh, python, names, reach, timeout, files, bind.get(h, ())), hosts)


def local_addresses(interface: Optional[str] = None) -> Dict[str, str]:
    """{interface: IPv4 address} of this machine, loopback left out (``interface``: that one only).
    What mpirun's daemons and Horovod's Gloo rendezvous advertise to the hosts: an address on the
    chosen interface (horovodrun --network-interfaces), not this machine's name."""
    import fcntl
    import socket
    import struct
    out = {}
    for _, name in socket.if_nameindex():
        if (interface and name != interface) or name == "lo":
            continue
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:                              # SIOCGIFADDR: the interface's IPv4 address
            packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
            out[name] = socket.inet_ntoa(packed[20:24])
        except OSError:                   # no IPv4 address on it
            pass
        finally:
            sock.close()
    return out


def unreachable(hosts, ssh=None, timeout=PROBE_TIMEOUT_S):
    """[(host, reason)] for the hosts that do not answer a plain ssh command (after a failed job)."""
    ssh = ssh or SSH()

    def one(host):
        try:
            proc = subprocess.run(ssh.argv(host, "true"), capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return host, f"no answer within {timeout} s"
        if proc.returncode != 0:
            return host, (proc.stderr.strip().splitlines() or [f"ssh exit {proc.returncode}"])[-1]
        return None

    return [r for r in _on_every_host(one, hosts) if r is not None]


def _local_versions():
    out = {}
    try:
        from importlib.metadata import version
    except ImportError:          # pragma: no cover
        return out
    for name in ("torch", "tensorflow-cpu", "tensorflow", "horovod", "largebatch"):
        try:
            out[name] = version(name)
        except Exception:  # noqa: BLE001 - not installed
            pass
    return out


def check_hosts(hosts, ssh=None, *, launch_node=None, launch_addresses=None, rendezvous_port=None,
                free_port=None, network_interface=None, python=None, timeout=PROBE_TIMEOUT_S, files=None):
    """(problems, warnings, reports): problems break the launch (one line each, naming the host
    and the fix); warnings would not break it.

    Checks: ssh in batch mode; the same Python, venv path and torch / TensorFlow / Horovod /
    largebatch versions as this machine; every host's name resolves on every host; a network
    interface present on every host (``network_interface`` if given); TCP from every host to
    every other host's sshd; back to this launch node at ``launch_addresses`` ({interface:
    address}, the addresses the launcher advertises) on ``rendezvous_port`` (a port listening
    here), a problem when a host reaches none of them; ``launch_node``: this machine's name,
    a warning where it resolves to a loopback address (nothing this launch uses);
    ``free_port``: (host, port) that must be free on that host (torchrun's c10d rendezvous);
    cores per host (reported); ``files`` ({path: the YAML key that names it}: the user's model and
    data files) present at the same path on every host."""
    files = dict(files or {})
    launch_addresses = dict(launch_addresses or {})
    ssh = ssh or SSH()
    python = python or sys.executable
    hosts = list(hosts)
    port = ssh.port or 22
    reach = [(h, port) for h in hosts]
    if rendezvous_port:
        reach += [(address, rendezvous_port) for address in launch_addresses.values()]
    reports = probe_hosts(hosts, ssh, python=python, names=hosts + ([launch_node] if launch_node else []),
                          reach=reach, timeout=timeout, files=sorted(files),
                          bind={free_port[0]: [free_port[1]]} if free_port else None)
    problems, warnings = [], []
    mine = {"python": sys.version.split()[0], "prefix": sys.prefix, "packages": _local_versions()}
    launch_targets = {f"{address}:{rendezvous_port}": name for name, address in launch_addresses.items()}
    for r in reports:
        if not r.ok:
            fix = ("check that the host is up and reachable, that sshd runs there, and that this key is in its "
                   "authorized_keys (launcher.ssh_identity, launcher.ssh_port)") if "ssh" in r.error or "answer" in r.error \
                else f"install the same environment at {python} on {r.host}"
            problems.append(f"host {r.host}: {r.error}; {fix}")
            continue
        f = r.facts
        if f["python"] != mine["python"] or f["prefix"] != mine["prefix"]:
            problems.append(f"host {r.host}: Python {f['python']} at {f['prefix']}, here {mine['python']} at "
                            f"{mine['prefix']}; install the same venv at the same path on every host")
        for name, version in mine["packages"].items():
            theirs = f["packages"].get(name)
            if theirs != version:
                problems.append(f"host {r.host}: {name} {theirs or 'missing'}, here {version}; install "
                                f"{name}=={version} in {f['prefix']}")
        for name, address in f["resolves"].items():
            if name == launch_node:
                if address is None or address.startswith("127."):
                    where = "does not resolve" if address is None else f"resolves to {address}"
                    warnings.append(f"warning: host {r.host}: this launch node's name {name!r} {where} there; "
                                    f"this launch does not use it (the launchers advertise addresses)")
            elif address is None:
                problems.append(f"host {r.host}: the name {name!r} does not resolve there (Gloo then crashes "
                                f"with a segfault or 'Unable to find address'); add it to /etc/hosts or DNS")
        back = {target: result for target, result in f["reach"].items() if target in launch_targets}
        if back and "ok" not in back.values():
            tried = ", ".join(f"{target} on {launch_targets[target]}: {result}" for target, result in back.items())
            problems.append(f"host {r.host}: cannot reach this launch node at any address it advertises ({tried}); "
                            f"mpirun's daemons and Horovod's Gloo rendezvous connect back to it there: launch from "
                            f"one of the hosts, set launcher.network_interface to a routed one, or open the firewall")
        for target, result in f["reach"].items():
            name = target.rsplit(":", 1)[0]
            if target not in launch_targets and result != "ok" and f["resolves"].get(name, "") is not None:
                problems.append(f"host {r.host}: cannot reach {target} ({result}); the hosts must reach each "
                                f"other over TCP (firewall, routes)")
        for bound, result in f.get("bind", {}).items():
            if result != "ok":
                problems.append(f"host {r.host}: port {bound} (launcher.rendezvous_port) is taken there ({result}); "
                                f"torchrun's c10d rendezvous listens on it: choose a free one")
        for path, present in f.get("files", {}).items():
            if not present:
                problems.append(f"host {r.host}: {files[path]}: {path} is not there; copy it to the same path on "
                                f"every host (or keep it on a shared filesystem)")
        if network_interface and network_interface not in f["interfaces"]:
            problems.append(f"host {r.host}: no network interface {network_interface!r} (has "
                            f"{', '.join(f['interfaces'])}); set launcher.network_interface to one every host has")
    alive = [r for r in reports if r.ok]
    # Gloo addresses every rank by its host's own hostname, not by the name it was given (-H
    # with addresses, or aliases): those names must resolve on every host too
    own = {r.host: r.facts["hostname"] for r in alive}
    extra = sorted(set(own.values()) - set(hosts) - ({launch_node} if launch_node else set()))
    if extra:
        second = probe_hosts([r.host for r in alive], ssh, python=python, names=extra, timeout=timeout)
        for r in second:
            for name, address in (r.facts.get("resolves") or {}).items():
                if address is None:
                    given = next(h for h, n in own.items() if n == name)
                    problems.append(f"host {r.host}: the name {name!r} (the hostname of {given}, which Gloo uses) "
                                    f"does not resolve there (Gloo then crashes with a segfault or 'Unable to "
                                    f"find address'); add it to /etc/hosts or DNS")
    if alive and not network_interface:
        common = set.intersection(*(set(r.facts["interfaces"]) for r in alive)) - {"lo"}
        if not common:
            problems.append("hosts: no network interface name is common to every host; set "
                            "launcher.network_interface")
    return problems, warnings, reports
