"""A real Slurm (largebatch.launchers.slurm_testbed): munged, slurmctld and two slurmd in a temp dir.

srun, salloc and sbatch against it; Horovod over MPI through Slurm's PMIx plugin (the plugin that
works with Debian's Open MPI 4.1.4: it has no Slurm PMI-1/PMI-2 support). Skipped with one line
where the testbed cannot start (not root, or Slurm/munge not installed).
"""
import json
import os
import socket
import sys
import time

import pytest

from largebatch.config import launchers_module

testbed = launchers_module("slurm_testbed")
sbatch = launchers_module("sbatch")
srun_gloo = launchers_module("srun_gloo")

pytestmark = pytest.mark.timeout(180)

PY = sys.executable
HVD_ALLREDUCE = (
    "import horovod.torch as hvd, torch; hvd.init(); "
    "r = hvd.allreduce(torch.tensor([float(hvd.rank() + 1)]), op=hvd.Sum); "
    "print('rank', hvd.rank(), 'of', hvd.size(), 'local', hvd.local_rank(), hvd.local_size(), "
    "'sum', r.item(), 'gloo' if hvd.gloo_enabled() else 'mpi', flush=True)")
MPI_HELLO = ("from mpi4py import MPI; c = MPI.COMM_WORLD; "
             "print('rank', c.Get_rank(), 'of', c.Get_size(), flush=True)")


# ------------------------------------------------------------------ srun_gloo's arithmetic (no Slurm needed)
@pytest.mark.parametrize("text, expected", [("2", [2]), ("2(x3)", [2, 2, 2]), ("2(x2),1", [2, 2, 1]),
                                            ("1,4(x2),3", [1, 4, 4, 3])])
def test_tasks_per_node(text, expected):
    assert srun_gloo.tasks_per_node(text) == expected


def test_slot_env_matches_horovods_host_alloc_plan():
    layout = [("a", 2), ("b", 2), ("c", 1)]
    plan = srun_gloo.host_alloc_plan(layout)
    from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts
    assert plan == get_host_assignments(parse_hosts("a:2,b:2,c:1"), 5)      # what horovodrun --gloo uses
    rank = 0
    for node, (host, n) in enumerate(layout):
        for local in range(n):
            env = srun_gloo.slot_env({"SLURM_PROCID": str(rank), "SLURM_NTASKS": "5", "SLURM_NODEID": str(node),
                                      "SLURM_LOCALID": str(local), "SLURM_STEP_TASKS_PER_NODE": "2(x2),1",
                                      "SLURMD_NODENAME": host})
            slot = plan[rank]
            assert env == {"HOROVOD_RANK": str(slot.rank), "HOROVOD_SIZE": "5",
                           "HOROVOD_LOCAL_RANK": str(slot.local_rank), "HOROVOD_LOCAL_SIZE": str(slot.local_size),
                           "HOROVOD_CROSS_RANK": str(slot.cross_rank), "HOROVOD_CROSS_SIZE": str(slot.cross_size),
                           "HOROVOD_HOSTNAME": host}
            rank += 1


def test_layout_from_probe():
    out = "lbprobe 2 1 b 2,1\nlbprobe 0 0 a 2,1\nlbprobe 1 0 a 2,1\n"
    assert srun_gloo.layout_from_probe(out) == [("a", 2), ("b", 1)]
    with pytest.raises(RuntimeError, match="did not report every node"):
        srun_gloo.layout_from_probe("lbprobe 0 0 a 2,1\n")


def _etc_snapshot():
    out = {}
    for d in ("/etc/slurm", "/etc/munge"):
        for root, _, files in os.walk(d):
            for f in files:
                p = os.path.join(root, f)
                out[p] = os.stat(p).st_mtime_ns
    return out


@pytest.fixture(scope="module")
def slurm():
    why = testbed.missing_requirements()
    if why:
        pytest.skip(why)
    me = socket.gethostname().split(".")[0]
    # two nodes on this machine (two slurmd, distinct node names and ports)
    hosts = [testbed.Host(name=me), testbed.Host(name=f"{me}-b")]
    before = _etc_snapshot()
    tb = testbed.SlurmTestbed(hosts, start_timeout=45)
    t0 = time.monotonic()
    tb.start()
    tb.started_in = time.monotonic() - t0
    root = tb.root
    try:
        yield tb
    finally:
        tb.stop()
        assert not os.path.exists(root), "the testbed's temp dir is left"
        assert testbed.marked_processes(root) == [], "testbed processes left running"
        assert _etc_snapshot() == before, "/etc/slurm or /etc/munge changed"


def test_nodes_are_idle_with_the_hosts_cpus(slurm):
    assert slurm.started_in < 30
    states = slurm.node_states()
    assert sorted(states) == sorted(h.name for h in slurm.hosts)
    assert set(states.values()) == {"idle"}
    out = slurm.run(["sinfo", "-h", "-N", "-o", "%N %c"]).stdout.split()
    assert out[1::2] == [str(testbed._node_cpus(slurm.hosts[0])["CPUs"])] * 2


def test_srun_two_tasks_on_one_node(slurm):
    r = slurm.run(["srun", "-N1", "-n2", "hostname"], timeout=60)
    assert r.stdout.split() == [socket.gethostname()] * 2


def test_srun_mpi_list_has_pmix(slurm):
    r = slurm.run(["srun", "--mpi=list"], timeout=30)
    assert "pmix" in r.stdout + r.stderr


def test_mpi4py_under_pmix_in_salloc(slurm):
    r = slurm.run(["salloc", "-N1", "-n2", "srun", "--mpi=pmix", PY, "-c", MPI_HELLO], timeout=60)
    assert sorted(r.stdout.split("\n")[:2]) == ["rank 0 of 2", "rank 1 of 2"], r.stdout + r.stderr


def test_horovod_allreduce_across_two_nodes_under_pmix(slurm):
    r = slurm.run(["srun", "-N2", "-n2", "--ntasks-per-node=1", "--mpi=pmix", "--kill-on-bad-exit=1",
                   PY, "-c", HVD_ALLREDUCE], timeout=90, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = sorted(l for l in r.stdout.splitlines() if l.startswith("rank"))
    assert lines == ["rank 0 of 2 local 0 1 sum 3.0 mpi", "rank 1 of 2 local 0 1 sum 3.0 mpi"]


def test_horovod_gloo_under_srun_with_the_rendezvous_wrapper(slurm):
    # 3 tasks on 2 nodes (2 + 1): local and cross communicators of different sizes
    r = slurm.run([PY, "-m", "largebatch.launchers.srun_gloo", "-N2", "-n3", "--kill-on-bad-exit=1", "--",
                   PY, "-c", HVD_ALLREDUCE], timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = sorted(l for l in r.stdout.splitlines() if l.startswith("rank"))
    assert lines == ["rank 0 of 3 local 0 2 sum 6.0 gloo", "rank 1 of 3 local 1 2 sum 6.0 gloo",
                     "rank 2 of 3 local 0 1 sum 6.0 gloo"]


def test_sbatch_script_trains_two_ranks(slurm, tmp_path):
    from largebatch.config import load
    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text(json.dumps({
        "name": "slurm-smoke", "framework": "torch", "model": "small_cnn",
        "data": {"kind": "synthetic", "samples": 256, "val_samples": 64, "image_size": 16},
        "batch": {"per_worker": 16}, "optimizer": {"name": "lars"}, "train": {"steps": 4, "log_every": 2},
        "output": {"checkpoint_every": 0, "tensorboard": False, "progress": False},
        "launcher": {"np": 2}}))
    exp = load(str(exp_file))
    run_dir = tmp_path / "run"
    run_dir.mkdir()                                  # sbatch does not create the --output folder
    script = tmp_path / "job.sh"
    script.write_text(sbatch.batch_script(exp, str(run_dir), nodes=2, time="5", signal_grace=30))
    job = slurm.run(["sbatch", "--parsable", str(script)], timeout=30).stdout.strip().split(";")[0]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and slurm.run(["squeue", "-h", "-j", job], check=False).stdout.strip():
        time.sleep(1)
    log = (run_dir / f"slurm-{job}.out").read_text()
    info = slurm.run(["scontrol", "show", "job", job]).stdout
    assert "JobState=COMPLETED" in info and "ExitCode=0:0" in info, info + log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["ranks"] == 2 and summary["steps_done"] == 4


# ------------------------------------------------------------------ across network-namespace hosts
@pytest.fixture(scope="module")
def ns_slurm():
    why = testbed.missing_requirements()
    if why:
        pytest.skip(why)
    try:
        testcluster = launchers_module("testcluster")
    except ImportError:
        pytest.skip("largebatch.launchers.testcluster (namespace hosts) is not available")
    why = testcluster.unavailable()
    if why:
        pytest.skip(f"namespace hosts: {why}")
    with testcluster.Cluster(hosts=2) as cluster:
        la = cluster.launcher                       # slurmctld and the clients run on the launch node
        hosts = [testbed.Host(n.name, n.address, n.exec_prefix("/")) for n in cluster.host_nodes]
        tb = testbed.SlurmTestbed(hosts, ctld_address=la.address, ctld_prefix=la.exec_prefix("/"),
                                  start_timeout=45)
        tb.start()
        root = tb.root
        try:
            yield tb
        finally:
            tb.stop()
            assert testbed.marked_processes(root) == [], "testbed processes left running"


def test_namespace_hosts_horovod_allreduce_under_pmix(ns_slurm):
    r = ns_slurm.run(["srun", "-N2", "-n2", "hostname"], timeout=60)
    assert sorted(r.stdout.split()) == sorted(h.name for h in ns_slurm.hosts)
    r = ns_slurm.run(["srun", "-N2", "-n2", "--mpi=pmix", "--kill-on-bad-exit=1", PY, "-c", HVD_ALLREDUCE],
                     timeout=90, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = sorted(l for l in r.stdout.splitlines() if l.startswith("rank"))
    assert lines == ["rank 0 of 2 local 0 1 sum 3.0 mpi", "rank 1 of 2 local 0 1 sum 3.0 mpi"]
