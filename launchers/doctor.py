"""``largebatch doctor``: what the stack is, and whether it can run multi-rank training.

Prints Python / NumPy / torch / TensorFlow / Keras / Horovod / MPI versions, which Horovod
frameworks and controllers are built, which engines are usable (torch + torchrun needs no
Horovod), and known traps (Horovod's Keras integration under
Keras 3). A part that is not installed (TensorFlow in a PyTorch environment, Horovod where
torchrun does) is a note saying what it takes away; exit code 0 when something can run and nothing
installed is broken, 1 otherwise, with one line per problem saying how to fix it.
"""
import importlib
import importlib.util
import platform
import shutil
import subprocess
import sys

from largebatch.horovod_support import FIX, HorovodUnavailable, import_horovod

KERAS3_TRAP = ("WARNING: Keras {keras} is active and horovod.tensorflow.keras is importable: under Keras 3 "
               "its DistributedOptimizer raises nothing and does NOT average gradients (ranks silently "
               "diverge); use largebatch.keras.DistributedOptimizer instead.")


# what a missing optional part takes away, and how to add it
OPTIONAL = {
    "torch": "PyTorch runs unavailable (pip install 'largebatch[torch]')",
    "tensorflow": "Keras runs unavailable (pip install 'largebatch[keras]')",
    "keras": "Keras runs unavailable (pip install 'largebatch[keras]')",
    "horovod": "horovodrun, mpirun and srun launches unavailable; PyTorch runs use --launcher torchrun "
               "(Horovod: `make setup` builds it, docs/install.md)",
    "matplotlib": "largebatch report prints its summary without the PNGs (pip install 'largebatch[report]')",
}


def _module_state(module):
    """('ok', version), ('missing', None): not installed, or ('broken', reason): installed, fails to import."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return "missing", None
    try:
        return "ok", getattr(importlib.import_module(module), "__version__", "?")
    except Exception as err:  # noqa: BLE001 - any failure of an installed module
        return "broken", f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"


def _mpi_version():
    mpirun = shutil.which("mpirun")
    if not mpirun:
        return None
    try:
        out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out else None


def collect():
    """Return (rows, problems, warnings): rows are (label, value) pairs. A part that is not
    installed is a note (what it takes away); what is installed and broken, or an installation
    that can run nothing, is a problem."""
    rows, problems, warnings = [], [], []
    rows.append(("python", f"{platform.python_version()} ({sys.executable})"))
    state, versions = {}, {}
    for module in ("numpy", "torch", "tensorflow", "keras", "horovod", "matplotlib"):
        state[module], value = _module_state(module)
        versions[module] = value if state[module] == "ok" else None
        rows.append((module, {"ok": value, "missing": "not installed", "broken": f"BROKEN ({value})"}[state[module]]))
        if state[module] == "broken":
            problems.append(f"{module} is installed but does not import ({value}); "
                            + (FIX if module == "horovod" else f"reinstall {module}"))
        elif state[module] == "missing" and module in OPTIONAL:
            warnings.append(f"note: {module} not installed: {OPTIONAL[module]}")
    mpi = _mpi_version()
    rows.append(("mpi", mpi or "not installed (mpirun not on PATH)"))
    if state["horovod"] == "ok":
        if mpi is None:
            warnings.append("note: mpirun not on PATH: launcher.type mpirun and horovodrun's MPI controller are "
                            "unavailable (launcher.controller gloo works)")
        built = []
        for framework in ("torch", "tensorflow"):
            if state[framework] != "ok":
                continue
            try:
                hvd = import_horovod(framework)
            except HorovodUnavailable as err:
                problems.append(str(err))
                continue
            controllers = [name for name, fn in (("MPI", "mpi_built"), ("Gloo", "gloo_built"),
                                                 ("NCCL", "nccl_built")) if getattr(hvd, fn)()]
            built.append(f"{framework} [{', '.join(controllers) or 'no controller'}]")
            if not controllers:
                problems.append(f"horovod.{framework} has neither MPI nor Gloo; {FIX}")
        rows.append(("horovod built", "; ".join(built) or "nothing"))
        keras = versions["keras"]
        if keras and int(keras.split(".")[0]) >= 3:
            try:
                importlib.import_module("horovod.tensorflow.keras")
                warnings.append(KERAS3_TRAP.format(keras=keras))
            except Exception:  # noqa: BLE001 - Horovod's Keras module failing to import is no trap
                pass
    engines = usable_engines()
    rows.append(("engines usable", ", ".join(engines) or "none"))
    if not engines:
        problems.append("no framework and engine usable: pip install 'largebatch[torch]' for PyTorch with torchrun, "
                        f"or {FIX}")
    return rows, problems, warnings


def usable_engines():
    """The (framework, engine) pairs this installation can run: 'torch + torchrun' (torch.distributed
    with gloo and the torchrun launcher; no Horovod needed), 'torch + horovod', 'keras + horovod'."""
    out = []
    try:
        import torch.distributed as dist
        from .command import find_executable
        if dist.is_available() and dist.is_gloo_available() and shutil.which(find_executable("torchrun")):
            out.append("torch + torchrun")
    except Exception:  # noqa: BLE001 - no torch, or one without torch.distributed
        pass
    for framework, label in (("torch", "torch + horovod"), ("tensorflow", "keras + horovod")):
        try:
            import_horovod(framework)
            out.append(label)
        except Exception:  # noqa: BLE001 - HorovodUnavailable, or the framework itself missing
            pass
    return out


def check_hosts(hosts, *, ssh_port=None, ssh_identity=None, network_interface=None, timeout=None, files=None,
                engine="horovod", rendezvous_port=None):
    """The multi-host preflight (see :mod:`largebatch.launchers.preflight`) for what ``engine``
    will use: (problems, warnings, reports).

    ``horovod`` (horovodrun, mpirun): mpirun's daemons and Horovod's Gloo rendezvous connect back
    to this launch node at its address on ``network_interface`` (any of its addresses if none
    is set); a port is opened here and the hosts must reach it at one of them. ``torchrun``:
    nothing connects back here; the first host must have ``rendezvous_port`` free."""
    import socket
    from . import preflight
    ssh = preflight.SSH(port=ssh_port, identity=ssh_identity)
    common = dict(network_interface=network_interface, files=files, timeout=timeout or preflight.PROBE_TIMEOUT_S)
    me = socket.gethostname()
    if engine == "torchrun":
        return preflight.check_hosts(hosts, ssh, free_port=(hosts[0], rendezvous_port) if rendezvous_port else None,
                                     **common)
    launch = None if me in hosts else me
    addresses = preflight.local_addresses(network_interface) if launch else {}
    listener = socket.socket()
    listener.bind(("0.0.0.0", 0))
    listener.listen(64)
    try:
        problems, warnings, reports = preflight.check_hosts(
            hosts, ssh, launch_node=launch, launch_addresses=addresses,
            rendezvous_port=listener.getsockname()[1] if launch else None, **common)
    finally:
        listener.close()
    if launch and network_interface and not addresses:
        problems.insert(0, f"this launch node ({me}) has no IPv4 address on {network_interface!r}, which horovodrun "
                           f"advertises to the hosts; launch from one of the hosts, or set launcher.network_interface "
                           f"to an interface the launch node and the hosts share")
    return problems, warnings, reports


def _hosts_main(args):
    import time
    from largebatch import hostfile
    try:
        hosts = hostfile.parse_hosts(args.hosts) if args.hosts else hostfile.parse_hostfile(args.hostfile)
    except (ValueError, OSError) as err:
        print(f"largebatch doctor: {'--hosts' if args.hosts else '--hostfile'}: {err}", file=sys.stderr)
        return 2
    names = [h.name for h in hosts]
    started = time.monotonic()
    problems, warnings, reports = check_hosts(names, ssh_port=args.ssh_port, ssh_identity=args.ssh_identity,
                                              network_interface=args.network_interface)
    for r in reports:
        if r.ok:
            f = r.facts
            print(f"{r.host:<16} ok ({r.seconds:.1f} s): hostname {f['hostname']}, {f['cores']} cores, Python "
                  f"{f['python']}, torch {f['packages'].get('torch', '-')}, horovod {f['packages'].get('horovod', '-')}")
        else:
            print(f"{r.host:<16} FAILED ({r.seconds:.1f} s)")
    for line in warnings:
        print(line)
    for line in problems:
        print(f"PROBLEM: {line}")
    took = time.monotonic() - started
    print(f"hosts OK ({len(names)} checked in {took:.1f} s)" if not problems
          else f"hosts BROKEN ({len(problems)} problem(s), {len(names)} hosts checked in {took:.1f} s)")
    return 1 if problems else 0


class _native_stderr_quiet:
    """TensorFlow's C++ start-up lines (oneDNN, cpu_feature_guard; once per library that loads
    it) are written to file descriptor 2 whatever TF_CPP_MIN_LOG_LEVEL says: while the checks
    import the frameworks, descriptor 2 goes to /dev/null (LARGEBATCH_TF_LOGS=1 keeps them).
    What the checks find is returned, not printed, so nothing of theirs is lost."""

    def __enter__(self):
        import os
        self.saved = None
        if os.environ.get("LARGEBATCH_TF_LOGS") == "1":
            return self
        sys.stderr.flush()
        self.saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)
        return self

    def __exit__(self, *exc):
        import os
        if self.saved is not None:
            sys.stderr.flush()
            os.dup2(self.saved, 2)
            os.close(self.saved)
        return False


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(prog="largebatch doctor",
                                description="Check the stack here, or (with --hosts/--hostfile) the hosts of a "
                                            "multi-host job.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("-H", "--hosts", metavar="H1:N,H2:N", help="hosts to check (as horovodrun -H)")
    where.add_argument("--hostfile", metavar="FILE", help="hostfile to check ('host slots=N' lines)")
    p.add_argument("--ssh-port", type=int, metavar="PORT", help="as launcher.ssh_port")
    p.add_argument("--ssh-identity", metavar="KEY", help="as launcher.ssh_identity")
    p.add_argument("--network-interface", metavar="NIC", help="as launcher.network_interface")
    args = p.parse_args(argv)
    if args.hosts or args.hostfile:
        return _hosts_main(args)
    with _native_stderr_quiet():
        rows, problems, warnings = collect()
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    for line in warnings:
        print(line)
    for line in problems:
        print(f"PROBLEM: {line}")
    usable = dict(rows)["engines usable"]
    print(f"stack OK (usable: {usable})" if not problems else f"stack BROKEN ({len(problems)} problem(s))")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
