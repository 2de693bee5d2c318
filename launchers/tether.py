"""``python -m largebatch.launchers.tether COMMAND ...``: run COMMAND for as long as our stdin lasts.

What the torchrun fan-out (:mod:`largebatch.launchers.fanout`) runs over ssh on every other host.
An ssh session without a terminal sends no signal to its remote command when it ends: a
torchrun started by a launcher that was killed, or whose host was cut off, would keep its
ranks training. The tether ties the command to the session instead, through stdin:

- a line ``stop``: SIGTERM to the command (torchrun passes it to its ranks, which agree on a
  step, checkpoint and exit);
- a line ``kill``, or the end of stdin after a ``stop``: SIGKILL to the command and everything
  below it (a second signal to ``largebatch run``);
- the end of stdin without a ``stop`` (the launcher or its session is gone): SIGTERM, and
  SIGKILL to everything left after :data:`GRACE_S` seconds.

SIGTERM, SIGINT or SIGHUP to the tether itself count as ``stop``. Exits with the command's code.
"""
import signal
import subprocess
import sys
import threading
import time
from typing import List, Optional

from . import proctree

__all__ = ["main", "GRACE_S"]

GRACE_S = 30          # a stop may take this long (the ranks' own grace is 15 s, torchrun's 30 s)


class _Tether:
    def __init__(self, proc: subprocess.Popen):
        self.proc, self.stopped, self.lock = proc, False, threading.Lock()

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
        proctree.send(self.proc.pid, signal.SIGTERM)

    def kill(self) -> None:
        # below the command first: once torchrun is gone its ranks would be re-parented
        for pid, _ in reversed(proctree.descendants(self.proc.pid)):
            proctree.send(pid, signal.SIGKILL)
        proctree.send(self.proc.pid, signal.SIGKILL)

    def watch_stdin(self) -> None:
        for line in sys.stdin:
            word = line.strip()
            if word == "stop":
                self.stop()
            elif word == "kill":
                self.kill()
        if self.stopped:
            self.kill()
            return
        self.stop()
        deadline = time.monotonic() + GRACE_S
        while self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.proc.poll() is None:
            self.kill()


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m largebatch.launchers.tether COMMAND [ARG ...]", file=sys.stderr)
        return 2
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    tether = _Tether(proc)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, lambda *_: tether.stop())
    threading.Thread(target=tether.watch_stdin, daemon=True).start()
    code = proc.wait()
    return 128 - code if code < 0 else code          # killed by a signal: the shell's 128 + N


if __name__ == "__main__":
    sys.exit(main())
