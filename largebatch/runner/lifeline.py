"""A rank's lifeline: stop promptly on a signal, and never outlive the launcher.

Two daemon threads, started by :func:`install` before torch or TensorFlow are imported:

- **signals**: SIGTERM, SIGINT and SIGHUP are blocked in every thread but one, which waits
  for them with ``sigwait``. A rank blocked inside a collective (its peer already gone) cannot
  run a Python signal handler on its main thread; this thread still can. On a signal it runs
  the runner's ``on_signal`` callback (rank 0 writes the summary: stopped by the signal, at
  which step), says so in one line, and ends the process with 128 + the signal number, the
  shell's convention for "killed by a signal".
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

__all__ = ["install", "set_on_signal", "STOP_SIGNALS"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_state = {"on_signal": None, "rank": None, "installed": False}


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
    callback = _state["on_signal"]
    done = threading.Event()

    def run_callback():
        try:
            if callback is not None:
                callback(name)
        finally:
            done.set()

    # the callback writes a small file; if the file system hangs, leave anyway after a few seconds
    threading.Thread(target=run_callback, daemon=True, name="largebatch-on-signal").start()
    done.wait(5.0)
    _say(f"stopped by {name}")
    _exit(128 + signum)


def _watch_parent(parent, interval):
    while True:
        time.sleep(interval)
        if os.getppid() != parent:
            _say(f"its launcher (parent process {parent}) is gone; stopping")
            callback = _state["on_signal"]
            if callback is not None:
                done = threading.Event()

                def run_callback():
                    try:
                        callback("launcher-gone")
                    finally:
                        done.set()
                threading.Thread(target=run_callback, daemon=True).start()
                done.wait(5.0)
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
