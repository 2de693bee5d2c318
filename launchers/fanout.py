"""``largebatch run --launcher torchrun`` across hosts: one torchrun per host, kept as one job.

torchrun starts the ranks of one host; across hosts every host runs a torchrun of its own and
they meet at a c10d rendezvous on the first host (``--rdzv-backend c10d``; c10d numbers the
hosts in the order of their hostnames). This process starts them, every host's in a tether
(:mod:`largebatch.launchers.tether`: this host's directly, the others' over ssh), and keeps
them one job, as mpirun and horovodrun do:

- a torchrun that fails (a rank crashed or was killed: torchrun ends that host's ranks and exits
  non-zero), or an ssh session that drops (its host lost the network: ssh's keepalives give up
  after about ``--host-timeout`` seconds), stops every other host; the job exits with that code;
- SIGTERM, SIGINT or SIGHUP stops every host in order (torchrun passes SIGTERM to its ranks,
  which agree on a step and checkpoint); a second one kills every host's ranks at once.

With ``--elastic`` (torchrun ``--nnodes MIN:MAX``) a host that fails leaves the job instead of
ending it: the other hosts' agents restart their ranks in a smaller world. The first host's
agent serves the rendezvous (``is_host=1`` in ``--rdzv-conf``, the others ``is_host=0``, so that
two agents on one machine do not guess), and the job exits 0 when a host's torchrun did.

    python -m largebatch.launchers.fanout -H lbh1:1,lbh2:1 [--ssh-port P] [--ssh-identity KEY]
        [--host-timeout S] [--env VAR ...] -- torchrun --nnodes=2 --rdzv-backend=c10d ... PROGRAM

Each host's torchrun gets ``--nproc-per-node`` from its slots and the forwarded environment
(:data:`FORWARDED_PREFIXES`, :data:`FORWARDED_NAMES` and every ``--env`` name), and runs in
this directory's path there (hosts share the filesystem layout, as the preflight checks).
"""
import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from largebatch import hostfile as _hostfile
from . import preflight

__all__ = ["main", "host_commands", "host_torchrun", "FORWARDED_PREFIXES", "FORWARDED_NAMES", "SSH_LOST"]

FORWARDED_PREFIXES = ("LARGEBATCH_", "OMP_", "MKL_", "KMP_", "TORCH_", "NCCL_", "GLOO_", "TF_")
FORWARDED_NAMES = ("PYTHONPATH", "PYTHONUNBUFFERED", "LD_LIBRARY_PATH", "VIRTUAL_ENV", "COLUMNS", "LINES")
SSH_LOST = 255                   # ssh's own exit code: the session could not start or was lost
STOP_GRACE_S = 40                # a stopping host's torchrun gets this long before it is killed
KILL_WAIT_S = 10                 # and a tether told to kill this long before it is killed itself


def _forwarded(environ: Dict[str, str], names: Sequence[str]) -> Dict[str, str]:
    return {k: v for k, v in environ.items()
            if k in names or k in FORWARDED_NAMES or k.startswith(FORWARDED_PREFIXES)}


def host_torchrun(torchrun: Sequence[str], slots: int, is_host: bool) -> List[str]:
    """One host's torchrun: ``torchrun`` (its argv without ``--nproc-per-node``) for ``slots``
    ranks, ``is_host`` added to its ``--rdzv-conf`` (unchanged without one): whether this host's
    agent serves the c10d rendezvous's store."""
    flag = "--rdzv-conf="
    own = [f"{a},is_host={int(is_host)}" if a.startswith(flag) else a for a in torchrun]
    return [own[0], f"--nproc-per-node={slots}", *own[1:]]


def host_commands(placed: Sequence[Tuple[str, int]], torchrun: Sequence[str], *, python: str,
                  ssh: preflight.SSH, environ: Dict[str, str], env_names: Sequence[str] = (),
                  cwd: Optional[str] = None) -> List[Tuple[str, List[str]]]:
    """[(host, argv)]: what starts each host's torchrun (``torchrun``: its argv without
    ``--nproc-per-node``), tethered to this process's pipe; the first host's agent serves the
    rendezvous when ``torchrun`` has a ``--rdzv-conf``."""
    cwd = cwd or os.getcwd()
    env = _forwarded(environ, env_names)
    out = []
    for i, (host, slots) in enumerate(placed):
        argv = host_torchrun(torchrun, slots, is_host=i == 0)
        tethered = [python, "-m", "largebatch.launchers.tether", "--", *argv]
        if _hostfile.is_local(host):
            out.append((host, tethered))
            continue
        assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
        remote = f"cd {shlex.quote(cwd)} && exec env {assignments} {' '.join(shlex.quote(a) for a in tethered)}"
        out.append((host, ssh.argv(host, remote)))
    return out


class _Job:
    """The hosts' tethers: told ``stop`` / ``kill`` through their stdin."""

    def __init__(self, commands: List[Tuple[str, List[str]]], environ: Dict[str, str], elastic: bool = False):
        self.hosts, self.elastic, self.left = [host for host, _ in commands], elastic, set()
        self.procs = [subprocess.Popen(argv, stdin=subprocess.PIPE, env=environ) for _, argv in commands]
        self.signals: List[int] = []
        self.failure: Optional[Tuple[str, int]] = None
        self.deadline: Optional[float] = None
        self.killing = False

    def tell(self, word: str) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.stdin.write(f"{word}\n".encode())
                    proc.stdin.flush()
                except OSError:          # that host's session is gone already
                    pass

    def stop(self) -> None:
        if self.deadline is None:
            self.deadline = time.monotonic() + STOP_GRACE_S
            self.tell("stop")

    def kill(self) -> None:
        """Every tether kills what it runs; a tether that cannot be told (a lost host's ssh) is
        killed itself :data:`KILL_WAIT_S` later."""
        self.tell("kill")
        for proc in self.procs:
            try:
                proc.stdin.close()
            except OSError:
                pass
        self.deadline = time.monotonic() + KILL_WAIT_S
        self.killing = True

    def on_signal(self, signum: int, _frame) -> None:
        self.signals.append(signum)
        if len(self.signals) == 1:
            self.stop()
        else:
            self.kill()

    def wait(self) -> int:
        while True:
            codes = [proc.poll() for proc in self.procs]
            for host, code in zip(self.hosts, codes):
                if code in (None, 0) or self.failure is not None or self.signals or self.deadline is not None:
                    continue
                why = ("its ssh session ended (the host stopped answering, or ssh failed)" if code == SSH_LOST
                       else f"its torchrun exited with {code}")
                if self.elastic and host not in self.left and any(c is None for c in codes):
                    self.left.add(host)
                    print(f"largebatch: host {host}: {why}; the elastic job goes on without it",
                          file=sys.stderr, flush=True)
                elif host not in self.left:
                    self.failure = (host, code)
                    print(f"largebatch: host {host}: {why}; stopping the job on the other hosts",
                          file=sys.stderr, flush=True)
                    self.stop()
            if all(code is not None for code in codes):
                break
            if self.deadline is not None and time.monotonic() > self.deadline:
                if self.killing:
                    for proc in self.procs:
                        if proc.poll() is None:
                            proc.kill()
                    self.deadline = float("inf")
                else:
                    print(f"largebatch: hosts still running {STOP_GRACE_S} s after the stop; killing their ranks",
                          file=sys.stderr, flush=True)
                    self.kill()
            time.sleep(0.2)
        if self.signals:
            return 128 + self.signals[0]
        if self.failure is not None:
            return self.failure[1]
        if self.elastic and 0 in codes:          # the hosts that stayed finished the job
            return 0
        return next((code for code in codes if code), 0)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: python -m largebatch.launchers.fanout -H HOST:SLOTS,... [options] -- torchrun ARGS ...",
              file=sys.stderr)
        return 2
    cut = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m largebatch.launchers.fanout")
    parser.add_argument("-H", "--hosts", required=True)
    parser.add_argument("--ssh-port", type=int)
    parser.add_argument("--ssh-identity")
    parser.add_argument("--host-timeout", type=int, default=30)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--env", action="append", default=[], help="a variable to pass to every host")
    parser.add_argument("--elastic", action="store_true", help="a host that fails leaves the job (torchrun --nnodes MIN:MAX)")
    args = parser.parse_args(argv[:cut])
    placed = [(h.name, h.slots) for h in _hostfile.parse_hosts(args.hosts)]
    ssh = preflight.SSH(port=args.ssh_port, identity=args.ssh_identity, keepalive=args.host_timeout)
    commands = host_commands(placed, argv[cut + 1:], python=args.python, ssh=ssh, environ=dict(os.environ),
                             env_names=args.env)
    job = _Job(commands, dict(os.environ), elastic=args.elastic)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, job.on_signal)
    return job.wait()


if __name__ == "__main__":
    sys.exit(main())
