"""A rank's lifeline: stop promptly on a signal, and never outlive the launcher.

Two daemon threads, started by :func:`install` before torch or TensorFlow are imported:

- **signals**: SIGTERM, SIGINT, SIGHUP and SIGUSR1 are blocked in every thread but one, which waits
  for them with ``sigwait``. A rank blocked inside a collective (its peer already gone) cannot
  run a Python signal handler on its main thread; this thread still can. On a signal it runs
  the runner's ``on_signal`` callback (rank 0 writes the summary: stopped by the signal, at
  which step), says so in one line, and ends the process with 128 + the signal number, the
  shell's convention for "killed by a signal".
  A runner that can stop cleanly calls :func:`set_graceful`: the signal then only sets a flag
  (:func:`stop_requested`); the training loop checks it after every step, all ranks agree on
  the step with one small allreduce, rank 0 writes a checkpoint, and the process exits on its
  own. Should that not happen within the grace period (a rank stuck in a collective), or on a
  second signal, the thread ends the process as above.
- **orphan check**: once a second, whether the rank's parent (orted, horovodrun's task shell,
  sshd's session, slurmstepd) is still its parent. When the launcher side of a job goes away
  (killed, or its host's ssh session dropped), the rank would otherwise keep training as an
  orphan; it stops with exit code 1 instead.
"""
import os
import signal
import socket
import sys
import threading
import time

__all__ = ["install", "set_on_signal", "set_graceful", "stop_requested", "stop_exit_code", "STOP_SIGNALS",
           "GRACE_ENV", "REQUEUE_EXIT_CODE"]

# SIGUSR1: what `largebatch run` sends through mpirun (which forwards it to every rank) and
# what Slurm sites use for --signal=USR1@grace
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
GRACE_ENV = "LARGEBATCH_STOP_GRACE"            # seconds a graceful stop may take (default 15)
REQUEUE_EXIT_CODE = 85       # under Slurm: "checkpointed on a signal, run me again" (the sbatch script requeues)


def stop_exit_code(signum, environ=None):
    """The exit code of a rank that stopped cleanly on ``signum``: REQUEUE_EXIT_CODE inside a Slurm
    job (its batch script requeues the job), else 128 + the signal number."""
    environ = os.environ if environ is None else environ
    return REQUEUE_EXIT_CODE if environ.get("SLURM_JOB_ID") else 128 + signum
_state = {"on_signal": None, "rank": None, "installed": False, "graceful": False, "stop": None}


def set_graceful(enabled=True):
    """The runner checks :func:`stop_requested` after every step and stops cleanly itself."""
    _state["graceful"] = bool(enabled)


def stop_requested():
    """The number of the stop signal this process received, or 0."""
    return _state["stop"] or 0


def _grace():
    try:
        return max(1.0, float(os.environ.get(GRACE_ENV, "15")))
    except ValueError:
        return 15.0


def set_on_signal(callback):
    """``callback(signal_name)`` runs once, on the signal thread, before the process exits."""
    _state["on_signal"] = callback


def _say(text):
    try:
        print(f"largebatch: rank {_state['rank']} on {socket.gethostname()}: {text}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _exit(code):
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _wait_for_signals():
    signum = signal.sigwait(set(STOP_SIGNALS))
    name = signal.Signals(signum).name
    if _state["graceful"]:
        grace = _grace()
        _state["stop"] = signum
        _say(f"{name}: stopping after this step with a checkpoint (up to {grace:.0f} s; again to stop at once)")
        again = signal.sigtimedwait(set(STOP_SIGNALS), grace)
        if again is None:
            _say(f"no clean stop within {grace:.0f} s")
    _run_on_signal(name)
    _say(f"stopped by {name}")
    _exit(128 + signum)


def _run_on_signal(name, timeout=5.0):
    """The runner's ``on_signal(name)`` (rank 0 writes its summary) on a thread of its own: if the
    file system hangs, the process leaves anyway after ``timeout`` seconds."""
    callback = _state["on_signal"]
    if callback is None:
        return
    thread = threading.Thread(target=callback, args=(name,), daemon=True, name="largebatch-on-signal")
    thread.start()
    thread.join(timeout)


def _watch_parent(parent, interval):
    while True:
        time.sleep(interval)
        if os.getppid() != parent:
            _say(f"its launcher (parent process {parent}) is gone; stopping")
            _run_on_signal("launcher-gone")
            _exit(1)


def install(rank, interval=1.0):
    """Block the stop signals in this (the main) thread, so that every thread started from now on
    inherits the mask, and start the two threads. Call before importing torch or TensorFlow."""
    if _state["installed"]:
        return
    _state.update(rank=rank, installed=True)
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    threading.Thread(target=_wait_for_signals, daemon=True, name="largebatch-signals").start()
    parent = os.getppid()
    if parent != 1:                     # started by init (a container's entry point): nothing to watch
        threading.Thread(target=_watch_parent, args=(parent, interval), daemon=True,
                         name="largebatch-orphan-check").start()
