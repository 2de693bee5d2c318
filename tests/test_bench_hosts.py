"""Smoke test of the across-host allreduce benchmark on a 2-host namespace cluster
(launchers/testcluster.py): `largebatch bench allreduce -H lbh1:1,lbh2:1 ...` launched from the
launch node, Horovod's two controllers and torch.distributed (torchrun across the hosts), tiny
messages, a 1-second link probe. Needs root; skips otherwise."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from largebatch.launchers import testcluster

pytestmark = [pytest.mark.multirank, pytest.mark.multihost]

ROOT = Path(__file__).resolve().parent.parent
LARGEBATCH = str(Path(sys.executable).with_name("largebatch"))


def test_allreduce_across_two_namespace_hosts(tmp_path):
    reason = testcluster.unavailable()
    if reason:
        pytest.skip(f"across-host benchmark skipped: {reason}")
    with testcluster.Cluster(hosts=2) as c:
        proc = c.run("lblaunch", [LARGEBATCH, "bench", "allreduce", "--quick", "-H", c.hosts_arg(),
                                  "--ssh-port", str(c.ssh_port), "--ssh-identity", c.identity,
                                  "--network-interface", "eth0", "--message-bytes", "4096", "65536",
                                  "--link-seconds", "1", "--timeout", "40", "--out", str(tmp_path)],
                     capture_output=True, text=True, timeout=100, cwd=str(ROOT))
        left = {n.name: c.processes(n) for n in c.nodes if c.processes(n)}
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert not left, left
    assert "model a network, not a cluster" in proc.stdout          # said plainly, in the output
    with open(tmp_path / "allreduce_hosts.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["bytes"]) for r in rows] == [4096, 65536]
    for r in rows:
        assert r["hosts"] == "lbh1:1,lbh2:1" and r["np"] == "2"
        link = float(r["link_GBps"])
        assert link > 0 and math.isfinite(link)
        for k in ("horovod_mpi", "horovod_gloo", "torch_gloo", "mpi4py"):
            assert float(r[f"{k}_s"]) > 0 and float(r[f"{k}_busbw_GBps"]) > 0
            ratio = float(r[f"{k}_bus_over_link"])
            assert ratio > 0 and math.isfinite(ratio)
    meta = json.loads((tmp_path / "allreduce_hosts.json").read_text())["meta"]
    assert meta["same_machine"] is True and "not a cluster" in meta["note"]
    assert meta["link"]["tool"] in ("iperf3", "socket") and meta["link"]["link_GBps"] > 0
    for k in ("horovod_mpi", "horovod_gloo", "torch_gloo"):
        assert meta["fits"][k]["alpha_s"] >= 0 and meta["fits"][k]["beta_s_per_byte"] > 0
    with open(tmp_path / "allreduce_hosts_projection.csv") as f:
        proj = list(csv.DictReader(f))
    assert any(r["scenario"].startswith("measured fit (horovod_gloo") for r in proj)
    assert any(r["scenario"].startswith("measured fit (torch_gloo") for r in proj)
    assert all(0 < float(r["efficiency"]) <= 1 for r in proj)
    assert (tmp_path / "allreduce_hosts.png").read_bytes()[:4] == b"\x89PNG"
    assert not any(ns.startswith(f"{testcluster.PREFIX}{c.id}-") for ns in subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout.split())
