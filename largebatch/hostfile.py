"""Hosts and slots: parse ``-H host:slots,...`` strings and Open MPI hostfiles, and place ranks.

Placement follows what ``horovodrun`` and ``mpirun -map-by slot`` do: ranks fill the hosts in
the order given, each host up to its slot count. The thread rule (:mod:`.threads`) needs the
resulting ranks-per-host.

Every parse error is a ``ValueError`` with a one-line message that says what was expected.
"""
import os
import re
from dataclasses import dataclass
from typing import List, Tuple

__all__ = ["Host", "parse_hosts", "parse_hostfile", "total_slots", "place_ranks", "hosts_arg",
           "LOCAL_NAMES", "is_local"]

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")

_HOST_RE = re.compile(r"^[A-Za-z0-9_.\-\[\]]+$")


@dataclass(frozen=True)
class Host:
    name: str
    slots: int

    def __str__(self):
        return f"{self.name}:{self.slots}"


def _parse_slots(text, what):
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{what}: expected slots to be an integer > 0, got {text!r}")
    return int(text)


def parse_hosts(spec) -> List[Host]:
    """``"h1:4,h2:4"`` or ``["h1:4", "h2"]`` -> [Host]; a host without ``:slots`` has 1 slot,
    as in horovodrun's ``-H``. A host listed twice is an error."""
    if isinstance(spec, str):
        items = [s.strip() for s in spec.split(",")]
    elif isinstance(spec, (list, tuple)) and all(isinstance(s, str) for s in spec):
        items = [s.strip() for part in spec for s in part.split(",")]
    else:
        raise ValueError(f"expected 'host:slots[,host:slots...]' or a list of 'host:slots', got {spec!r}")
    hosts = []
    for item in items:
        if not item:
            raise ValueError(f"expected 'host:slots[,host:slots...]', got {spec!r} (empty host name)")
        name, sep, slots = item.rpartition(":") if ":" in item else (item, "", "1")
        if not _HOST_RE.match(name or ""):
            raise ValueError(f"expected 'host:slots[,host:slots...]', got {item!r}")
        hosts.append(Host(name, _parse_slots(slots, f"host {name!r}")))
    _no_duplicates(hosts)
    return hosts


def parse_hostfile(path) -> List[Host]:
    """Read an Open MPI / horovodrun hostfile: one ``hostname [slots=N]`` per line, ``#``
    comments and blank lines ignored (the format both ``mpirun -hostfile`` and
    ``horovodrun --hostfile`` accept)."""
    hosts = []
    with open(path) as fh:
        for lineno, raw in enumerate(fh, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            fields = line.split()
            name, slots = fields[0], 1
            if not _HOST_RE.match(name):
                raise ValueError(f"line {lineno}: expected 'hostname slots=N', got {line!r}")
            for field in fields[1:]:
                key, _, value = field.partition("=")
                if key in ("slots", "max_slots", "max-slots"):
                    if key == "slots":
                        slots = _parse_slots(value, f"line {lineno}")
                else:
                    raise ValueError(f"line {lineno}: expected 'hostname slots=N', got {line!r}")
            hosts.append(Host(name, slots))
    if not hosts:
        raise ValueError("expected at least one 'hostname slots=N' line, got none")
    _no_duplicates(hosts)
    return hosts


def _no_duplicates(hosts):
    seen = set()
    for h in hosts:
        if h.name in seen:
            raise ValueError(f"host {h.name!r} is listed twice; give it once with all its slots")
        seen.add(h.name)


def total_slots(hosts) -> int:
    return sum(h.slots for h in hosts)


def place_ranks(np_, hosts) -> List[Tuple[str, int]]:
    """[(host, ranks on it)] for ``np_`` ranks filled host by host (horovodrun's order);
    hosts that get no rank are left out. Raises if ``np_`` exceeds the slots."""
    if np_ > total_slots(hosts):
        raise ValueError(f"expected at most {total_slots(hosts)} ranks (the slots given), got {np_}")
    placed, left = [], np_
    for h in hosts:
        if left <= 0:
            break
        n = min(h.slots, left)
        placed.append((h.name, n))
        left -= n
    return placed


def hosts_arg(placed) -> str:
    """The ``-H`` value for the placed ranks: ``h1:4,h2:2``."""
    return ",".join(f"{name}:{n}" for name, n in placed)


def is_local(name) -> bool:
    """True for localhost and this machine's own host name."""
    if name in LOCAL_NAMES:
        return True
    try:
        node = os.uname().nodename
    except AttributeError:  # pragma: no cover - non-POSIX
        return False
    return name == node or name == node.split(".")[0]
