"""The ``largebatch`` command.

    largebatch run EXP.yaml [--np N] [--launcher horovodrun|mpirun|srun|torchrun] [--hosts H | --hostfile F]
                            [--dry-run] [--tf-logs] [key.sub=value ...]
    largebatch validate EXP.yaml [--np N] [--launcher L] [--hosts H | --hostfile F] [--print]
                                 [key.sub=value ...]
    largebatch doctor [...]
    largebatch bench [...]

Exit codes: 0 success; 2 bad input (one line per problem on stderr, nothing written, nothing
run); otherwise the launcher's own exit code.

A run never writes over another run's files: ``runs/<name>`` taken, ``largebatch run`` picks
``runs/<name>-2``, ``-3``, ...; an explicit ``output.run_dir`` that holds a run is refused unless
``train.resume`` continues it (the ranks apply the same rule when started by hand). A checkpoint
given to ``train.resume`` is checked before anything is launched.

The launcher's output is relayed: rank 0's ``[1,0]<stderr>:`` tags are taken off, and TensorFlow's
C++ start-up lines (oneDNN, cpu_feature_guard, XLA service ...) are left out unless ``--tf-logs``
or ``LARGEBATCH_TF_LOGS=1``. Rank 0 draws a progress bar when this command's stderr is a
terminal, and writes plain lines otherwise (``LARGEBATCH_PROGRESS=bar|lines`` overrides).
"""
import argparse
import codecs
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from . import hvdrun, proctree

__all__ = ["main", "run_dir_for"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2."""

    def error(self, message):
        if message.startswith("the following arguments are required: EXP.yaml"):
            sys.stderr.write(f"usage: {self.prog} EXP.yaml [options] [key.sub=value ...]: the experiment file "
                             f"is required (see {self.prog} --help)\n")
            raise SystemExit(2)
        sys.stderr.write(f"{self.prog}: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def _fail(problems):
    for line in problems:
        print(line, file=sys.stderr)
    return 2


def _flag_overrides(args):
    out = []
    if getattr(args, "np", None) is not None:
        out.append(f"launcher.np={args.np}")
    if getattr(args, "launcher", None) is not None:
        out.append(f"launcher.type={args.launcher}")
    if getattr(args, "hosts", None) is not None:
        out.append(f"launcher.hosts={args.hosts}")
    if getattr(args, "hostfile", None) is not None:
        out.append(f"launcher.hostfile={args.hostfile}")
    return out


def _load(args, data_notes=None):
    from largebatch.config import load
    return load(args.experiment, list(args.overrides) + _flag_overrides(args), data_notes=data_notes)


def run_dir_for(exp, requeue=False):
    """``(run_dir, problems)``: where the run writes (:func:`largebatch.rundir.choose_run_dir`,
    nothing created), or the one line refusing an explicit folder that holds another run."""
    from largebatch import rundir
    try:
        return rundir.choose_run_dir(exp.cfg, requeue=requeue, launching=True)[0], []
    except rundir.RunDirTaken as err:
        return None, [str(err)]


def resume_problems(exp, run_dir):
    """``train.resume`` (auto: the newest checkpoint in ``run_dir``, or a path) checked before
    anything is launched: the file's integrity (size and SHA-256, largebatch.checkpoint.read), the
    framework that wrote it and its model's name. The ranks check the model's signature (the
    names and shapes of its tensors) when they have built the model."""
    from largebatch import checkpoint as core, rundir
    resume = exp.cfg["train"]["resume"]
    if resume == "none":
        return []
    path = rundir.resume_path(resume, run_dir)
    if path is None:
        return []
    try:
        manifest, _ = core.read(path)
        theirs = manifest.get("model_signature") or {}
        core.check_compatible(path, manifest, framework=exp.cfg["framework"],
                              signature={"hash": theirs.get("hash"), "tensors": theirs.get("tensors")})
    except core.CheckpointError as err:
        return [f"train.resume: {err}"]
    model, ours = manifest.get("model"), exp.derived["model"]
    if model is not None and model != ours:
        return [f"train.resume: checkpoint {path}: from another model (model {model!r}; this run: model {ours!r})"]
    return []


def user_code(exp):
    """``(problems, facts)``: the user's model (``model.factory``) and data (``data.kind`` arrays
    or python) built once on this node before anything is launched (largebatch.runner.user)."""
    import importlib
    from largebatch.runner import user
    if not (user.uses_user_model(exp.cfg) or user.uses_user_data(exp.cfg)):
        return [], []
    import contextlib
    tf_logs = os.environ.get("LARGEBATCH_TF_LOGS") == "1"
    if not tf_logs:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TensorFlow's C++ start-up lines are written to fd 2 directly
    with contextlib.nullcontext() if tf_logs else _without_tf_noise():
        builder = importlib.import_module(f"largebatch.runner.{exp.cfg['framework']}_train").build_model
        return user.check(exp, builder)


class _without_tf_noise:
    """Standard error (the file descriptor: C++ writes there directly) into a temporary file for
    the block, then passed on without TensorFlow's info and warning lines (TF_NOISE)."""

    def __enter__(self):
        import tempfile
        sys.stderr.flush()
        self.saved, self.tmp = os.dup(2), tempfile.TemporaryFile(mode="w+b")
        os.dup2(self.tmp.fileno(), 2)

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.tmp.seek(0)
        for line in self.tmp.read().decode(errors="replace").splitlines(keepends=True):
            if not TF_NOISE.fullmatch(line):
                sys.stderr.write(line)
        self.tmp.close()
        return False


def cmd_validate(args):
    from largebatch.config import ConfigError, describe, dump_yaml
    try:
        exp = _load(args)
    except ConfigError as err:
        return _fail(err.problems)
    problems, _ = user_code(exp)
    if problems:
        return _fail(problems)
    if args.print:
        from largebatch.runner.params import decisions_table
        sys.stdout.write(dump_yaml(exp.resolved()))
        sys.stdout.write(decisions_table(exp))          # which tensors the optimizer adapts and decays
    else:
        print(f"ok: {describe(exp)}")
    return 0


def cmd_run(args):
    from largebatch import rundir
    from largebatch.config import ConfigError, describe
    from . import command
    data_notes = [] if args.dry_run else None        # a dry run reads no data: a missing folder is a note
    try:
        exp = _load(args, data_notes)
    except ConfigError as err:
        return _fail(err.problems)
    overrides = list(args.overrides) + _flag_overrides(args)
    run_dir, problems = run_dir_for(exp)
    problems = problems or resume_problems(exp, run_dir)
    if not problems:
        problems, user_facts = user_code(exp)
    if problems:
        return _fail(problems)
    try:
        cmd = command.launch_plan(exp, run_dir, overrides)
        # launch.sh continues this run when rerun (from its newest checkpoint, if any)
        again = cmd if exp.cfg["train"]["resume"] != "none" else \
            command.launch_plan(exp, run_dir, overrides + ["train.resume=auto"])
    except ValueError as err:          # a hostfile that changed since validation, say
        return _fail([f"launcher: {err}"])
    print(describe(exp), file=sys.stderr)
    plan = cmd.threads
    if plan is not None:
        print(f"threads per rank: {plan.threads} intra-op, {plan.interop} inter-op "
              f"({plan.cores_per_host} cores per host from {plan.cores_source}; binding {plan.binding})",
              file=sys.stderr)
    for note in cmd.notes:
        print(f"note: {note}", file=sys.stderr)
    for line in data_notes or ():
        print(f"note: {line}; --dry-run goes on (a real run stops here)", file=sys.stderr)
    if args.dry_run:
        for line in user_facts:
            print(line, file=sys.stderr)
        print(f"run dir: {run_dir} (not created: --dry-run)", file=sys.stderr)
        print(cmd.shell())
        return 0
    exe = cmd.argv[0]
    if not (os.path.isfile(exe) and os.access(exe, os.X_OK)) and shutil.which(exe) is None:
        return _fail([f"launcher.type: {os.path.basename(exe)!r} not found on PATH "
                      f"(install it, or choose another launcher.type)"])
    if hvdrun.is_launcher(cmd.argv) and importlib.util.find_spec("horovod") is None:
        return _fail(["launcher.type: 'horovodrun' needs Horovod, which is not installed here (make setup builds "
                      "it; a PyTorch run needs none with --launcher torchrun)"])
    la = exp.cfg["launcher"]
    if la["type"] == "srun" and not os.environ.get("SLURM_JOB_ID"):
        # srun outside an allocation fails with "Could not establish a configuration source"
        return _fail(["launcher.type: 'srun' runs inside a Slurm allocation (salloc, or a batch script: "
                      "largebatch sbatch); SLURM_JOB_ID is not set here"])
    remote = _remote_hosts(exp)
    if remote and la["preflight"]:
        problems = _host_problems(exp)
        if problems:
            return _fail([f"preflight: {line}" for line in problems] +
                         ["preflight: nothing launched (largebatch doctor --hosts ... rechecks; "
                          "launcher.preflight=false skips the check)"])
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, rundir.LAUNCH_SCRIPT), "w") as fh:
        fh.write("#!/bin/sh\n# written by largebatch run; rerunning it continues this run (train.resume=auto: "
                 "from its newest checkpoint)\n")
        fh.write(f"cd {_quote(os.getcwd())}\n{again.shell()}\n")
    if cmd.join is not None:          # elastic torchrun: another host joins by running this
        path = os.path.join(run_dir, rundir.JOIN_SCRIPT)
        with open(path, "w") as fh:
            fh.write("#!/bin/sh\n# written by largebatch run: run it on a host that should join this elastic job "
                     "(its torchrun meets the others at their rendezvous)\n")
            fh.write(f"cd {_quote(os.getcwd())}\nexec env {command.LaunchCommand(cmd.join, cmd.env).shell()}\n")
        os.chmod(path, 0o755)
    print(f"run dir: {run_dir}", file=sys.stderr)
    env = _without_enclosing_mpi_job(dict(os.environ)) if la_type_uses_mpirun(exp) else dict(os.environ)
    env.update(cmd.env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    tf_logs = args.tf_logs or os.environ.get("LARGEBATCH_TF_LOGS") == "1"
    if tf_logs:
        env["LARGEBATCH_TF_LOGS"] = "1"
    else:
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")      # horovodrun and the ranks import TensorFlow
    terminal = _isatty(sys.stderr)
    env.setdefault("LARGEBATCH_PROGRESS", "bar" if terminal else "lines")
    if terminal and "COLUMNS" not in env:                 # rank 0's bar, drawn through a pipe
        size = shutil.get_terminal_size()
        env.update(COLUMNS=str(size.columns), LINES=str(size.lines))
    # a watch per stream: each keeps its own unfinished line (stdout must not extend stderr's)
    from . import diagnose
    watches = [diagnose.OutputWatch(gloo_across_hosts=bool(remote) and la["controller"] == "gloo")
               for _ in range(2)]
    proc = subprocess.Popen(cmd.argv, env=env, start_new_session=True, preexec_fn=_default_signals,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stopping = []                     # non-empty once a signal made us stop the job
    relays = [_relay(proc.stdout, sys.stdout, watches[0], OutputFilter(quiet_tf=not tf_logs, stopping=stopping)),
              _relay(proc.stderr, sys.stderr, watches[1], OutputFilter(quiet_tf=not tf_logs, stopping=stopping))]
    code = supervise(proc, on_stop=stopping.append)
    for thread in relays:
        thread.join(timeout=5)
    stopped = {128 + s: signal.Signals(s).name for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}.get(code)
    if stopped:
        _record_stop(run_dir, exp, stopped)
        for line in closing_block(run_dir, stopped):
            print(f"largebatch: {line}", file=sys.stderr, flush=True)
    elif code != 0:
        for hint in dict.fromkeys(h for w in watches for h in w.findings()):
            print(f"largebatch: {hint}", file=sys.stderr, flush=True)
        if remote and not _name_lost_hosts(remote, la):
            # every host answers: check what else makes a multi-host job crash (the launchers'
            # own messages, e.g. Gloo's 'Connection reset by peer', rarely name the cause)
            for line in _host_problems(exp, with_warnings=False):
                print(f"largebatch: after the failure: {line}", file=sys.stderr, flush=True)
    return code


def _isatty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


# the tags horovodrun (MPI: mpirun --tag-output; Gloo) and mpirun put on every rank's output
_RANK0_TAG = re.compile(r"\[\d+,0\]<std(?:out|err)>:|\[0\]<std(?:out|err)>:")
_ANY_TAG = re.compile(r"\[\d+(?:,\d+)?\]<std(?:out|err)>:")
_PARTIAL_TAG = re.compile(r"\[[\d,]*(?:\][<a-z]*>?)?$")
# TensorFlow's C++ (absl) info and warning lines: oneDNN, cpu_feature_guard, XLA service,
# StreamExecutor ...; error lines (E...) are kept
TF_NOISE = re.compile(
    r"(?:WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]\d{4} \d\d:\d\d:[\d.]+\s+\d+ [\w./-]+:\d+\] .*"
    r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IW] [\w./-]+:\d+\] .*"
    r"|To enable the following instructions: .*rebuild TensorFlow with the appropriate compiler flags\.)\s*")

# torch.distributed's store server, when the peer's address has no reverse name (hosts known
# from /etc/hosts alone): a warning about a log line's host name, nothing to act on
C10D_NOISE = re.compile(r"\[W\d{4} [\d:.]+ socket\.cpp:\d+\] \[c10d\] The hostname of the client socket cannot "
                        r"be retrieved\. err=-?\d+\s*")

_AGENT_SIGNAL = re.compile(r"torch\.distributed\.elastic\.multiprocessing\.api\.SignalException: ")
# once we stopped the job ourselves: the launcher's and the ranks' own words about the stop, which
# the closing block (:func:`closing_block`) says once (the ranks learn of it as SIGUSR1, mpirun's)
_STOP_NOISE = re.compile(r"(?:mpirun: Forwarding signal \d+ to job"
                         r"|largebatch: rank \d+ on \S+: SIG\w+: stopping after this step.*"
                         r"|largebatch: rank \d+ on \S+: stopped by SIG\w+.*"
                         r"|largebatch: SIG\w+: stopped after step \d+.*"
                         r"|run dir: .* \(stopped, .*\))\s*")
_MPI_BOX = re.compile(r"-{20,}\s*")        # Open MPI frames its job-end messages with these


class OutputFilter:
    """What ``largebatch run`` shows of the launcher's output: rank 0's tags taken off (its
    progress and summary read as if it ran here; other ranks keep theirs) and, with
    ``quiet_tf``, TensorFlow's C++ info/warning lines left out. Text is passed on as soon as it
    cannot be one of those (a progress bar's frames included); ``feed`` returns what to write."""

    def __init__(self, quiet_tf=True, stopping=None):
        """``stopping``: a list that is non-empty once we stopped the job ourselves; torchrun's
        agent then prints the signal as a traceback (``SignalException``), left out here."""
        self.quiet_tf, self.pending, self.mid_line = quiet_tf, "", False
        self.stopping, self.in_agent_traceback = stopping if stopping is not None else [], False
        self.agent_line, self.in_mpi_box = "", False

    def feed(self, text):
        self.pending += text
        out = []
        while True:
            m = re.search(r"[\r\n]", self.pending)
            if m is None:
                break
            unit, self.pending = self.pending[:m.end()], self.pending[m.end():]
            out.append(self._unit(unit))
        if self.pending and not self._hold(self.pending):
            out.append(self._unit(self.pending))
            self.pending = ""
        return "".join(out)

    def flush(self):
        rest, self.pending = self.pending, ""
        return self._unit(rest) if rest else ""

    def _hold(self, tail):
        """Keep an unfinished line back: it may end as a tag or a TensorFlow line."""
        if _PARTIAL_TAG.search(tail):
            return True
        if not self.quiet_tf or self.mid_line:
            return False
        bare = _ANY_TAG.sub("", tail)
        return bare == "" or bare[0] in "IWT" or bare[0].isdigit()

    def _unit(self, unit):
        start_of_line = not self.mid_line
        self.mid_line = not unit.endswith(("\n", "\r"))
        if self.stopping and (self.in_agent_traceback or (start_of_line and unit.startswith("Traceback ("))):
            # our own stop, reported by torchrun's agent as an exception: not a crash (a line may
            # come in pieces: the traceback ends with the complete SignalException line)
            self.agent_line = unit if start_of_line else self.agent_line + unit
            self.in_agent_traceback = self.mid_line or not _AGENT_SIGNAL.match(self.agent_line)
            return ""
        if self.stopping and start_of_line:
            bare = _ANY_TAG.sub("", unit)
            if _MPI_BOX.fullmatch(bare):           # 'Primary job terminated normally, but ...'
                self.in_mpi_box = not self.in_mpi_box
                return ""
            if self.in_mpi_box or _STOP_NOISE.fullmatch(bare) or bare.strip() == "":
                return ""
        if self.quiet_tf and start_of_line and (TF_NOISE.fullmatch(_ANY_TAG.sub("", unit)) or
                                                C10D_NOISE.fullmatch(unit)):
            return ""
        return _RANK0_TAG.sub("", unit)


def _relay(pipe, target, watch, output_filter=None):
    """Copy the launcher's output to ``target`` as it comes (progress bars' carriage returns
    included; through ``output_filter``, an :class:`OutputFilter`) and feed a copy to ``watch``."""
    import threading
    out = getattr(target, "buffer", None)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(text):
        if not text:
            return
        try:
            if out is not None:
                out.write(text.encode("utf-8", errors="replace"))
                out.flush()
            else:
                target.write(text)
                target.flush()
        except (OSError, ValueError):
            pass

    def copy():
        fd = pipe.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            text = decoder.decode(chunk)
            write(output_filter.feed(text) if output_filter is not None else text)
            watch.feed(text)
        text = decoder.decode(b"", final=True)
        if output_filter is not None:
            write(output_filter.feed(text) + output_filter.flush())
        else:
            write(text)
        pipe.close()

    thread = threading.Thread(target=copy, daemon=True, name="largebatch-relay")
    thread.start()
    return thread


# Variables an MPI process (an in-process hvd.init(), a rank) leaves in its environment: a
# horovodrun or mpirun started from there would join that job instead of starting its own
_ENCLOSING_MPI = ("PMIX_", "OMPI_MCA_ess", "OMPI_MCA_orte_", "OMPI_MCA_pmix", "OMPI_APP_CTX_", "OMPI_COMM_WORLD_",
                  "ORTE_SCHIZO_DETECTION")


def la_type_uses_mpirun(exp):
    return exp.cfg["launcher"]["type"] in ("horovodrun", "mpirun")


def _without_enclosing_mpi_job(env):
    dropped = sorted(k for k in env if k.startswith(_ENCLOSING_MPI))
    if dropped:
        print(f"note: not passing on {len(dropped)} variables of an enclosing MPI job ({', '.join(dropped[:3])}"
              f"{', ...' if len(dropped) > 3 else ''}); this launch starts a job of its own", file=sys.stderr)
    return {k: v for k, v in env.items() if k not in dropped}


def _record_stop(run_dir, exp, name):
    """The launcher's word in summary.json: the job was stopped by ``name``. Ranks that got the
    signal wrote their summary already; ranks that only saw their launcher go (Gloo's remote
    ranks) say 'launcher-gone', and none may have written one at all."""
    from largebatch import rundir
    summary = rundir.read_summary(run_dir) or {"name": exp.cfg["name"], "framework": exp.cfg["framework"]}
    summary.update(status="stopped", stopped_by=name)
    try:
        rundir.write_summary(run_dir, summary)
    except OSError:
        pass


def closing_block(run_dir, name):
    """What ``largebatch run`` says once a signal stopped the job: after which step, the
    checkpoint, and the command that continues the run (or that nothing was trained yet)."""
    from largebatch import rundir
    summary = rundir.read_summary(run_dir) or {}
    steps, total = summary.get("steps_done"), summary.get("total_steps")
    checkpoint = summary.get("checkpoint")
    if not steps:
        return [f"stopped by {name} before the first step; nothing was trained (the same command starts again)"]
    lines = [f"stopped by {name} after step {steps}" + (f" of {total}" if total else "")
             + (f"; checkpoint {checkpoint}" if checkpoint else "; no checkpoint was written")]
    if checkpoint:
        given = [a for a in sys.argv[1:] if not a.startswith(("train.resume=", "output.run_dir="))]
        again = " ".join(_quote(a) for a in ["largebatch", *given, f"output.run_dir={run_dir}", "train.resume=auto"])
        lines.append(f"continue with: {again}")
        lines.append(f"           or: sh {_quote(os.path.join(run_dir, rundir.LAUNCH_SCRIPT))}")
    return lines


def _host_problems(exp, with_warnings=True):
    """The multi-host preflight (largebatch doctor --hosts) for the experiment's hosts and ssh
    settings and what its launcher will use; its warnings printed (``with_warnings``)."""
    from .doctor import check_hosts
    la = exp.cfg["launcher"]
    torchrun = la["type"] == "torchrun"
    problems, warnings, _ = check_hosts(
        [h for h, n in exp.derived["placement"] if n > 0], ssh_port=la["ssh_port"], ssh_identity=la["ssh_identity"],
        network_interface=la["network_interface"], files=user_files(exp.cfg),
        engine="torchrun" if torchrun else "horovod", rendezvous_port=la["rendezvous_port"] if torchrun else None)
    for line in warnings if with_warnings else ():
        print(f"preflight: {line}", file=sys.stderr)
    return problems


def user_files(cfg):
    """{absolute path: YAML key} of the user's model and data files every host must have."""
    out = {}
    for key in ("model.factory", "data.factory"):
        section, name = key.split(".")
        ref = cfg[section][name]
        where = ref.rpartition(":")[0] if ref else ""
        if where.endswith(".py"):
            out[os.path.abspath(where)] = key
    if cfg["data"]["kind"] == "arrays" and cfg["data"]["path"]:
        out[os.path.abspath(cfg["data"]["path"])] = "data.path"
    return out


def _remote_hosts(exp):
    if exp.cfg["launcher"]["type"] == "srun":
        return []
    from . import command
    return command.remote_hosts([tuple(p) for p in exp.derived["placement"]])


def _name_lost_hosts(hosts, la):
    """After a failed multi-host job: which hosts no longer answer (the launchers' own messages
    rarely say; Open MPI blames 'unable to reliably start one or more daemons')."""
    from . import preflight
    lost = preflight.unreachable(hosts, preflight.SSH(port=la["ssh_port"], identity=la["ssh_identity"]))
    for host, reason in lost:
        print(f"largebatch: host {host} stopped answering ({reason}): it lost its network or went down; "
              f"the job ended because of it", file=sys.stderr, flush=True)
    return lost


def _default_signals():
    """In the launcher's child: the stop signals at their defaults (a background shell job starts
    with SIGINT ignored, and horovodrun would then ignore our SIGINT too)."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)


STOP_GRACE_S = 25
HARD_STOP_S = 5
# How each launcher stops its job in order. mpirun forwards SIGUSR1 to every rank on every host
# (its SIGTERM would kill them 1 s later, before a checkpoint); the ranks take it as "finish
# this step, checkpoint, exit" (runner/lifeline.py). With MPI, horovodrun has exec'd
# `sh -c mpirun ...` (sh ignores SIGINT while it waits), so mpirun is signalled directly.
# horovodrun with Gloo asks its task shells to end on SIGINT; srun forwards SIGTERM to the tasks.
_MPI_LAUNCHERS = ("mpirun", "mpiexec", "orterun", "prterun")
_SRUN = ("srun",)


def supervise(proc, grace=STOP_GRACE_S, on_stop=None):
    """Wait for the launcher process ``proc`` and return its exit code.

    SIGTERM, SIGINT or SIGHUP to this process stops the whole job: mpirun gets SIGUSR1, which it
    forwards to the ranks on every host (srun SIGTERM, horovodrun SIGINT); each rank finishes its
    step, rank 0 writes a checkpoint and the summary, and they exit. ``HARD_STOP_S`` before the
    ``grace`` seconds are up mpirun gets SIGTERM; after them, or at once on a second signal,
    every process the launcher started on this machine is killed. Returns 128 + the signal
    number then."""
    received, tree = [], {}

    def on_signal(signum, _frame):
        received.append(signum)
        name = signal.Signals(signum).name
        tree.update({pid: cmd for pid, cmd in proctree.descendants(proc.pid)})
        if on_stop is not None:
            on_stop(name)
        if len(received) == 1:
            print(f"largebatch: {name}: stopping the job (up to {grace} s; send it again to kill at once)",
                  file=sys.stderr, flush=True)
            _stop_in_order(proc, tree)
        else:
            print(f"largebatch: {name} again: killing the job", file=sys.stderr, flush=True)
            _kill_all(proc, tree)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    deadline = hard = None
    try:
        while True:
            try:
                code = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            if received and deadline is None:
                deadline = time.monotonic() + grace
                hard = deadline - HARD_STOP_S
            if deadline is not None and hard is not None and time.monotonic() > hard:
                for pid, name in list(tree.items()):
                    if name in _MPI_LAUNCHERS:
                        proctree.send(pid, signal.SIGTERM)
                hard = None
            if deadline is not None and time.monotonic() > deadline:
                print(f"largebatch: the job did not stop within {grace} s; killing it", file=sys.stderr, flush=True)
                _kill_all(proc, tree)
        if received:
            # the launcher is gone; what it started (mpirun, local ranks) gets the rest of the grace
            deadline = deadline or time.monotonic() + grace
            while time.monotonic() < deadline and any(proctree.alive(pid) for pid in tree):
                time.sleep(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        _kill_all(proc, tree)
        return 128 + received[0]
    return code


def _stop_in_order(proc, tree):
    mpi = [pid for pid, name in tree.items() if name in _MPI_LAUNCHERS]
    srun = [pid for pid, name in tree.items() if name in _SRUN]
    for pid in mpi:
        proctree.send(pid, signal.SIGUSR1)
    for pid in srun:
        proctree.send(pid, signal.SIGTERM)
    if mpi or srun:
        return
    if hvdrun.is_launcher(proc.args):
        proctree.send(proc.pid, signal.SIGINT)
    else:
        proctree.send(proc.pid, signal.SIGTERM)


def _kill_all(proc, tree):
    tree.update({pid: cmd for pid, cmd in proctree.descendants(proc.pid)})
    for pid in [proc.pid, *tree]:
        proctree.send(pid, signal.SIGKILL)


def _quote(s):
    import shlex
    return shlex.quote(s)


def cmd_sbatch(args):
    """Write (``--submit``: and submit; ``--dry-run``: only print) a Slurm batch script."""
    from largebatch.config import ConfigError
    try:
        exp = _load(args)
    except ConfigError as err:
        # the script starts the ranks with srun whatever launcher.type says: an engine that srun
        # can start (launcher.engine=torch.distributed in a horovodrun YAML) is taken as such
        args.overrides = list(args.overrides) + ["launcher.type=srun"]
        try:
            exp = _load(args)
        except ConfigError:
            return _fail(err.problems)
    if exp.derived["engine"] == "torch.distributed":
        # every rank re-reads the YAML: tell it that srun, not torchrun, started it
        args.overrides = [o for o in args.overrides if o.split("=", 1)[0].strip() not in
                          ("launcher.type", "launcher.engine")] + ["launcher.type=srun", "launcher.engine=torch.distributed"]
        exp = _load(args)
    from . import sbatch
    run_dir, problems = run_dir_for(exp, requeue=args.requeue)
    problems = problems or resume_problems(exp, run_dir)
    if problems:
        return _fail(problems)
    try:
        if args.time is not None:
            sbatch.parse_time(args.time)
        text = sbatch.batch_script(exp, run_dir, list(args.overrides) + _flag_overrides(args), nodes=args.nodes,
                                   time=args.time, partition=args.partition, account=args.account,
                                   requeue=args.requeue)
    except ValueError as err:
        return _fail([f"largebatch sbatch: {err}"])
    if args.dry_run:
        sys.stdout.write(text)
        print(f"run dir: {run_dir} (not created: --dry-run)", file=sys.stderr)
        return 0
    os.makedirs(run_dir, exist_ok=True)          # sbatch does not create the --output folder
    path = os.path.join(run_dir, "job.sbatch")
    with open(path, "w") as fh:
        fh.write(text)
    print(f"batch script: {path}", file=sys.stderr)
    if not args.submit:
        print(f"submit it with: sbatch {_quote(path)}", file=sys.stderr)
        return 0
    if shutil.which("sbatch") is None:
        return _fail(["largebatch sbatch --submit: 'sbatch' not found on PATH (run it where Slurm's clients are)"])
    proc = subprocess.run(["sbatch", path], capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    return proc.returncode


def cmd_doctor(argv):
    try:
        from . import doctor
    except ImportError as err:
        return _fail([f"largebatch doctor: not available in this installation ({err})"])
    return doctor.main(argv)


def cmd_bench(argv):
    from . import bench            # lazy: the dispatcher finds bench/ scripts next to the package
    return bench.main(argv)


def _experiment_parser(command):
    p = _Parser(prog=f"largebatch {command}", usage="%(prog)s EXP.yaml [options] [key.sub=value ...]")
    p.add_argument("experiment", metavar="EXP.yaml", help="experiment file")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="override a YAML key, e.g. optimizer.trust_coefficient=0.02")
    p.add_argument("--np", type=int, metavar="N", help="number of ranks (launcher.np)")
    if command in ("run", "validate"):
        p.add_argument("--launcher", choices=("horovodrun", "mpirun", "srun", "torchrun"), help="launcher.type")
        p.add_argument("-H", "--hosts", metavar="H1:N,H2:N", help="launcher.hosts")
        p.add_argument("--hostfile", metavar="FILE", help="launcher.hostfile ('host slots=N' lines)")
    if command == "run":
        p.description = "Launch an experiment with horovodrun, mpirun or srun."
        p.add_argument("--dry-run", action="store_true", help="print the launch command, run nothing")
        p.add_argument("--tf-logs", action="store_true",
                       help="show TensorFlow's C++ log lines (oneDNN, cpu_feature_guard, XLA ...); "
                            "also LARGEBATCH_TF_LOGS=1")
    elif command == "sbatch":
        p.description = "Write a Slurm batch script for an experiment (--submit: and submit it)."
        p.add_argument("--nodes", type=int, metavar="N", help="nodes to spread launcher.np over")
        p.add_argument("--time", metavar="T", help="time limit (Slurm formats: MM, HH:MM:SS, D-HH)")
        p.add_argument("--partition", metavar="P")
        p.add_argument("--account", metavar="A")
        p.add_argument("--requeue", action="store_true", help="requeue on preemption; resume from the run dir")
        p.add_argument("--submit", action="store_true", help="submit the script with sbatch")
        p.add_argument("--dry-run", action="store_true", help="print the script, write nothing")
    else:
        p.description = "Check an experiment file and print what would run."
        p.add_argument("--print", action="store_true",
                       help="print the resolved experiment as YAML, then each model tensor's adaptation and decay")
    return p


USAGE = """usage: largebatch {run,validate,sbatch,doctor,bench,report,plan} ...

  run EXP.yaml [--np N] [--launcher horovodrun|mpirun|srun|torchrun] [-H HOSTS | --hostfile F]
               [--dry-run] [--tf-logs] [key.sub=value ...]
                                                   launch an experiment
  validate EXP.yaml [--np N] [--launcher L] [-H HOSTS | --hostfile F] [--print] [key.sub=value ...]
                                                   check it, print what would run
  sbatch EXP.yaml [--nodes N] [--time T] [--requeue] [--submit | --dry-run]
                                                   a Slurm batch script for it
  doctor [-H HOSTS | --hostfile F]                 check the installation (or the hosts)
  bench ...                                        benchmarks
  report RUN_DIR [RUN_DIR ...] [--out DIR]         plots and a summary of runs
  plan RUN_DIR [--allreduce JSON] [--per-worker B ...]
                                                   batch size and node count from a run's noise scale

`largebatch <command> --help` for details. Exit code 2 on bad input.
"""


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        (sys.stdout if argv else sys.stderr).write(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "doctor":
        return cmd_doctor(rest)
    if command == "bench":
        return cmd_bench(rest)
    if command == "report":
        from . import report
        return report.main(rest)
    if command == "plan":
        from . import plan
        return plan.main(rest)
    if command in ("run", "validate", "sbatch"):
        horovod_np = next((i for i, a in enumerate(rest) if a == "-np" or a.startswith("-np=")), None)
        if horovod_np is not None:           # horovodrun's and mpirun's spelling
            given = rest[horovod_np][4:] if "=" in rest[horovod_np] else \
                (rest[horovod_np + 1] if horovod_np + 1 < len(rest) else "N")
            return _fail([f"largebatch {command}: unrecognized argument -np (Horovod's spelling); use --np {given}"])
        args = _experiment_parser(command).parse_intermixed_args(rest)
        if args.np is not None and args.np < 1:
            return _fail([f"--np: expected an integer > 0, got {args.np}"])
        return {"run": cmd_run, "validate": cmd_validate, "sbatch": cmd_sbatch}[command](args)
    return _fail([f"largebatch: unknown command {command!r}; expected one of run, validate, sbatch, doctor, bench, report, plan"])


if __name__ == "__main__":
    sys.exit(main())
