"""Slurm batch scripts for an experiment: ``#SBATCH`` lines from the experiment, then the srun line.

:func:`batch_script` is a pure function of a validated experiment (:func:`largebatch.config.load`)
and the run directory; it returns the script text::

    #!/bin/bash
    #SBATCH --job-name=<experiment name>
    #SBATCH --nodes=N
    #SBATCH --ntasks-per-node=K
    #SBATCH --cpus-per-task=T                 (the thread plan: cores per host / ranks per host)
    #SBATCH --time=...                         (when given)
    #SBATCH --output=<run dir>/slurm-%j.out
    #SBATCH --open-mode=append                 (a requeued job appends to the same file)
    #SBATCH --signal=TERM@<grace>              (SIGTERM to every rank <grace> s before the time limit)
    #SBATCH --requeue | --no-requeue
    srun --ntasks=... --mpi=pmix ... python -m largebatch.runner /abs/EXP.yaml [overrides] output.run_dir=<run dir>

The ranks are spread over ``nodes`` (default: the experiment's hosts, or ``np /
launcher.ranks_per_host``, else 1 node); the experiment's ``launcher.np`` is kept, so the
global batch does not depend on how the job is laid out. ``--signal=TERM@grace`` (without
``B:``) signals the job steps, i.e. the ranks, not the batch shell: each rank gets SIGTERM
``grace`` seconds before Slurm kills the job at its time limit. With ``requeue=True`` the
ranks resume from the run directory's newest checkpoint (``train.resume=auto`` is added unless
the overrides set ``train.resume``), and a job whose srun ends with :data:`REQUEUE_EXIT_CODE`
(the runner's "checkpointed on SIGTERM, run me again") requeues itself with ``scontrol
requeue`` — Slurm requeues on preemption by itself, but never after a time limit.

The MPI plugin defaults to ``--mpi=pmix``: with Debian 12's Open MPI 4.1.4 (built with
external PMIx 4.2.2, no Slurm PMI-1/PMI-2 support) and Slurm 22.05 it is the one that
works; ``launcher.args`` with its own ``--mpi=...`` wins.
"""
import copy
import re
import shlex

__all__ = ["batch_script", "REQUEUE_EXIT_CODE", "DEFAULT_SIGNAL_GRACE", "DEFAULT_MPI", "parse_time", "job_name"]

from largebatch.runner.lifeline import REQUEUE_EXIT_CODE   # a rank that checkpointed on SIGTERM: run again
DEFAULT_SIGNAL_GRACE = 120      # seconds between SIGTERM and the time limit
DEFAULT_MPI = "pmix"

_TIME_FORMATS = (r"\d+", r"\d+:\d{1,2}", r"\d+:\d{1,2}:\d{1,2}", r"\d+-\d+", r"\d+-\d+:\d{1,2}",
                 r"\d+-\d+:\d{1,2}:\d{1,2}")


def parse_time(value):
    """A Slurm ``--time`` value, checked: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
    (an int is minutes). Returns the string; raises ValueError for anything else."""
    text = str(value).strip()
    if isinstance(value, bool) or not any(re.fullmatch(f, text) for f in _TIME_FORMATS):
        raise ValueError(f"time: expected minutes, HH:MM:SS or D-HH:MM:SS, got {value!r}")
    return text


def _time_seconds(text):
    days, _, rest = text.rpartition("-") if "-" in text else ("0", "", text)
    parts = [int(p) for p in rest.split(":")]
    if "-" in text:                                   # D-HH[:MM[:SS]]
        parts += [0] * (3 - len(parts))
        h, m, s = parts
    elif len(parts) == 1:                              # minutes
        h, m, s = 0, parts[0], 0
    elif len(parts) == 2:                              # MM:SS
        h, (m, s) = 0, parts
    else:
        h, m, s = parts
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


def job_name(name):
    """The experiment name as a job name: no whitespace or shell-special characters."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", str(name)).strip("_") or "largebatch"


def _layout(exp, nodes):
    """(np, nodes, ranks per node) for the experiment, spread over ``nodes`` if given."""
    la, np_ = exp.cfg["launcher"], exp.derived["np"]
    placed = [tuple(p) for p in exp.derived["placement"]]
    if nodes is None:
        if la["hosts"] is not None or la["hostfile"] is not None or la["ranks_per_host"]:
            nodes = len(placed)
        else:
            nodes = 1
    if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1:
        raise ValueError(f"nodes: expected a positive integer, got {nodes!r}")
    if nodes > np_:
        raise ValueError(f"nodes: expected at most launcher.np ({np_}) nodes, got {nodes}")
    if np_ % nodes:
        raise ValueError(f"nodes: launcher.np ({np_}) must be a multiple of the nodes ({nodes}) "
                         f"(srun starts the same number of ranks on every node)")
    return np_, nodes, np_ // nodes


def _srun_experiment(exp, nodes, per_node):
    """A copy of ``exp`` launched by srun on ``nodes`` nodes of ``per_node`` ranks (no host list:
    inside a batch job Slurm has chosen the nodes)."""
    from largebatch.config import Experiment
    cfg, derived = copy.deepcopy(exp.cfg), copy.deepcopy(exp.derived)
    la = cfg["launcher"]
    la.update(type="srun", hosts=None, hostfile=None, ranks_per_host=per_node)
    derived["placement"] = [(f"node{i}", per_node) for i in range(nodes)]
    return Experiment(cfg, derived, set(exp.explicit), copy.deepcopy(exp.source))


def _has_mpi_flag(args):
    return any(a == "--mpi" or a.startswith("--mpi=") for a in args)


def batch_script(exp, run_dir, overrides=(), *, nodes=None, time=None, partition=None, account=None,
                 requeue=False, signal_grace=DEFAULT_SIGNAL_GRACE, mpi=DEFAULT_MPI, cpus_per_task=None,
                 exclusive=False, extra_sbatch=()):
    """The text of an sbatch script running ``exp`` with its ranks writing to ``run_dir``.

    ``exp``: a validated experiment (its ``source['file']`` is the YAML every rank re-reads).
    ``overrides``: the ``key=value`` overrides given on the command line (passed to every rank).
    ``nodes``: nodes to spread the experiment's ``launcher.np`` ranks over (np must be a
    multiple); default: the hosts in the experiment, or np / ``launcher.ranks_per_host``, else 1.
    ``time``: Slurm time limit (minutes, HH:MM:SS, D-HH:MM:SS); None: the partition's default.
    ``signal_grace``: seconds before the time limit at which every rank gets SIGTERM
    (``--signal=TERM@grace``); None or 0: no signal line.
    ``requeue``: ``--requeue``, ``train.resume=auto`` for the ranks, and ``scontrol requeue``
    when srun exits with :data:`REQUEUE_EXIT_CODE`; otherwise ``--no-requeue``.
    ``mpi``: srun's ``--mpi`` plugin (``pmix``; None: Slurm's MpiDefault), unless
    ``launcher.args`` has one. ``cpus_per_task``: overrides the thread plan's threads per rank
    (set it when writing the script on a login node whose cores differ from the compute
    nodes', or set ``launcher.cores_per_host``). ``extra_sbatch``: more ``#SBATCH`` options,
    e.g. ``["--mem=0", "--constraint=knl"]``.
    Raises ValueError for a layout or value Slurm would reject.
    """
    import os
    from .command import launch_plan
    from largebatch.config import describe

    overrides = [overrides] if isinstance(overrides, str) else list(overrides)
    if exp.cfg["launcher"]["controller"] != "mpi":
        raise ValueError(f"launcher.controller: batch scripts run the ranks with srun over MPI (PMIx); "
                         f"expected 'mpi', got {exp.cfg['launcher']['controller']!r}")
    np_, nodes, per_node = _layout(exp, nodes)
    if signal_grace is not None and (isinstance(signal_grace, bool) or not isinstance(signal_grace, int)
                                     or not 0 <= signal_grace <= 65535):
        raise ValueError(f"signal_grace: expected whole seconds from 0 to 65535, got {signal_grace!r}")
    time = parse_time(time) if time is not None else None
    if time is not None and signal_grace and _time_seconds(time) <= signal_grace:
        raise ValueError(f"signal_grace: {signal_grace} s is not shorter than the time limit {time}")
    if cpus_per_task is not None and (isinstance(cpus_per_task, bool) or not isinstance(cpus_per_task, int)
                                      or cpus_per_task < 1):
        raise ValueError(f"cpus_per_task: expected a positive integer, got {cpus_per_task!r}")
    run_dir = os.path.abspath(run_dir)

    rank_overrides = list(overrides)
    if requeue and not any(o.split("=", 1)[0].strip() == "train.resume" for o in overrides):
        rank_overrides.append("train.resume=auto")
    srun_exp = _srun_experiment(exp, nodes, per_node)
    cmd = launch_plan(srun_exp, run_dir, rank_overrides)
    plan = cmd.threads
    argv = list(cmd.argv)
    argv[0] = "srun"                      # the compute nodes' srun, not the path on this machine
    if cpus_per_task is not None:
        argv = [f"--cpus-per-task={cpus_per_task}" if a.startswith("--cpus-per-task=") else a for a in argv]
    threads = cpus_per_task if cpus_per_task is not None else plan.threads
    if not _has_mpi_flag(exp.cfg["launcher"]["args"]):
        # srun_command added the default plugin; this script's ``mpi`` choice replaces it
        argv = [a for a in argv if not a.startswith("--mpi=")]
        if mpi:
            argv.insert(argv.index(next(a for a in argv if a.startswith("--cpu-bind="))) + 1, f"--mpi={mpi}")

    sb = [f"--job-name={job_name(exp.cfg['name'])}", f"--nodes={nodes}", f"--ntasks-per-node={per_node}",
          f"--cpus-per-task={threads}"]
    if time is not None:
        sb.append(f"--time={time}")
    if partition:
        sb.append(f"--partition={partition}")
    if account:
        sb.append(f"--account={account}")
    if exclusive:
        sb.append("--exclusive")
    sb += [f"--output={os.path.join(run_dir, 'slurm-%j.out')}", "--open-mode=append"]
    if signal_grace:
        sb.append(f"--signal=TERM@{signal_grace}")
    sb.append("--requeue" if requeue else "--no-requeue")
    sb += [str(a) for a in extra_sbatch]

    lines = ["#!/bin/bash"] + [f"#SBATCH {shlex.quote(o)}" for o in sb]
    lines += ["", f"# {describe(exp)}",
              f"# {np_} ranks = {nodes} node{'s' if nodes != 1 else ''} x {per_node}; "
              f"{threads} threads per rank ({plan.cores_per_host} cores per host from {plan.cores_source}); "
              f"binding {plan.binding}"]
    lines += [f"# note: {n}" for n in cmd.notes]
    lines += ['echo "largebatch: job ${SLURM_JOB_ID} on ${SLURM_JOB_NODELIST} '
              '(restart ${SLURM_RESTART_COUNT:-0}) at $(date -Is)"', ""]
    env_prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in cmd.env.items())
    n_program = 5 + len(rank_overrides)           # python -m largebatch.runner EXP overrides... run_dir
    options, program = argv[1:-n_program], argv[-n_program:]
    srun_line = " \\\n  ".join(["srun"] + [shlex.quote(a) for a in options] + [shlex.join(program)])
    lines.append(f"{env_prefix} {srun_line}" if env_prefix else srun_line)
    lines.append("rc=$?")
    if requeue:
        lines += [f'if [ "$rc" -eq {REQUEUE_EXIT_CODE} ]; then',
                  '  echo "largebatch: checkpointed before the time limit; requeueing job ${SLURM_JOB_ID}"',
                  '  scontrol requeue "${SLURM_JOB_ID}" && exit 0',
                  "fi"]
    lines.append('exit "$rc"')
    return "\n".join(lines) + "\n"
