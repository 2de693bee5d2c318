"""Known launcher failures, read from the launcher's own output, as one line naming the fix.

``largebatch run`` relays everything horovodrun / mpirun print unchanged and feeds a copy to
:class:`OutputWatch`; at the end of a failed job it prints the watch's findings. The patterns are
the messages Horovod 0.28.1, Gloo and Open MPI 4.1 print for failures whose cause is a host's
setup, which their tracebacks do not name.
"""
import re

__all__ = ["OutputWatch", "KNOWN"]

# (pattern, hint); the hint may use the pattern's groups as {0}, {1}
KNOWN = [
    (re.compile(r"HTTP GET request failed too many times"),
     "the ranks could not reach horovodrun's Gloo rendezvous server on the launch node: launch from one of "
     "the hosts, open the launch node's firewall to the hosts, or name an interface they can reach "
     "(launcher.network_interface); largebatch doctor --hosts checks this"),
    (re.compile(r"Unable to find address for: ?([^\s'\"]+)"),
     "Gloo could not resolve the host name {0!r} on a host: every host's name must resolve on every host "
     "(/etc/hosts or DNS); largebatch doctor --hosts checks this"),
    (re.compile(r"Permission denied \(publickey"),
     "ssh to a host was refused: set launcher.ssh_identity (and launcher.ssh_port) or install the key there"),
    (re.compile(r"Host key verification failed"),
     "ssh refused a host's key: add the hosts to known_hosts (ssh once by hand) on the launch node"),
    (re.compile(r"Could not resolve hostname (\S+)"),
     "the launch node cannot resolve the host name {0!r}: fix /etc/hosts or DNS, or give addresses"),
]
_GLOO_SEGV = re.compile(r"Segmentation fault|exit(?:ed)? (?:code|on signal) 139|signal 11")


class OutputWatch:
    """Feed it the launcher's output (any chunks); :meth:`findings` lists the hints, each once."""

    def __init__(self, gloo_across_hosts=False):
        self.gloo_across_hosts = gloo_across_hosts
        self._tail = ""
        self._found = []

    def feed(self, text):
        lines = (self._tail + text).split("\n")
        self._tail = lines.pop()[-2000:]
        for line in lines:
            self._line(line)

    def _line(self, line):
        for pattern, hint in KNOWN:
            m = pattern.search(line)
            if m:
                self._add(hint.format(*m.groups()))
        if self.gloo_across_hosts and _GLOO_SEGV.search(line):
            self._add("a rank crashed with a segmentation fault: with Gloo across hosts that is what a host "
                      "name that does not resolve on another host does; run largebatch doctor --hosts ...")

    def _add(self, hint):
        if hint not in self._found:
            self._found.append(hint)

    def findings(self):
        if self._tail:
            self._line(self._tail)
            self._tail = ""
        return list(self._found)
