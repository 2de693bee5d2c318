"""A real Slurm (largebatch.launchers.slurm_testbed): munged, slurmctld and two slurmd in a temp dir.

srun, salloc and sbatch against it; Horovod over MPI through Slurm's PMIx plugin (the plugin that
works with Debian's Open MPI 4.1.4: it has no Slurm PMI-1/PMI-2 support). Skipped with one line
where the testbed cannot start (not root, or Slurm/munge not installed).
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest


from largebatch.launchers import slurm_testbed as testbed
from largebatch.launchers import sbatch
from largebatch.launchers import srun_gloo

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
        from largebatch.launchers import testcluster
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


# ------------------------------------------------------------------ largebatch itself under Slurm, two hosts
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LARGEBATCH = os.path.join(os.path.dirname(PY), "largebatch")
# one thread per rank everywhere: the same float reduction order as the horovodrun reference
SMALL = ["data.samples=256", "data.val_samples=64", "output.progress=false", "launcher.threads_per_rank=1",
         "output.tensorboard=false"]


def _example(framework):
    return os.path.join(ROOT, "examples", f"synthetic_{framework}.yaml")


def _summary(run_dir):
    with open(os.path.join(run_dir, "summary.json")) as fh:
        return json.load(fh)


def _horovodrun_reference(tmp_path, framework, *extra):
    """The same experiment under horovodrun -np 2 on this machine."""
    run_dir = str(tmp_path / f"horovodrun-{framework}")
    proc = subprocess.run([LARGEBATCH, "run", _example(framework), "--np", "2", *SMALL, *extra,
                           f"output.run_dir={run_dir}"], capture_output=True, text=True, timeout=150, cwd=ROOT,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _summary(run_dir)


def _runner_pids(ns_slurm):
    """Rank processes still running on any namespace host (found through the hosts' namespaces)."""
    out = []
    for host in ns_slurm.hosts:
        ns = next(a for a in host.exec_prefix if a.startswith("--target="))[len("--target="):]
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.readlink(f"/proc/{pid}/ns/net") != os.readlink(f"/proc/{ns}/ns/net"):
                    continue
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    if b"largebatch.runner" in fh.read():
                        out.append(int(pid))
            except OSError:
                continue
    return out


@pytest.mark.parametrize("framework,engine", [("torch", "horovod"), ("keras", "horovod"),
                                              ("torch", "torch.distributed")])
def test_largebatch_run_srun_in_salloc_across_two_hosts(ns_slurm, tmp_path, framework, engine):
    """srun starts the ranks; Horovod (over MPI, PMIx) or torch.distributed (env:// from the
    Slurm step: rank 0's host is the step's first node) averages the gradients."""
    run_dir = str(tmp_path / "run")
    r = ns_slurm.run(["salloc", "-N2", "-n2", "--ntasks-per-node=1", LARGEBATCH, "run", _example(framework),
                      "--launcher", "srun", "--np", "2", "launcher.ranks_per_host=1", f"launcher.engine={engine}",
                      *SMALL, f"output.run_dir={run_dir}"], timeout=150, check=False)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    got = _summary(run_dir)
    assert sorted(got["hosts"]) == sorted(h.name for h in ns_slurm.hosts) and got["ranks_agree"] is True
    assert got["threads_per_rank"] == 1
    want = _horovodrun_reference(tmp_path, framework)
    assert got["weights_sha1"] == want["weights_sha1"]          # = horovodrun on the same global batch
    if engine == "torch.distributed":
        assert "horovod" not in got["versions"]                 # never imported


@pytest.mark.timeout(300)
def test_a_preempted_job_checkpoints_requeues_and_continues(ns_slurm, tmp_path):
    """scancel --signal=TERM: what Slurm sends on preemption or before a time limit (--signal).
    The ranks agree on a step, checkpoint, exit 85; the batch script requeues the job; the
    requeued job resumes and ends on the uninterrupted trajectory."""
    run_dir = str(tmp_path / "run")
    extra = ["train.epochs=8", "output.checkpoint_every=0"]
    r = ns_slurm.run([LARGEBATCH, "sbatch", _example("torch"), "--nodes", "2", "--time", "10", "--requeue",
                      "--submit", *SMALL, *extra, f"output.run_dir={run_dir}"], timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    job = r.stdout.strip().split()[-1]
    metrics = os.path.join(run_dir, "metrics.csv")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= 3):
        time.sleep(0.3)
    assert os.path.exists(metrics), ns_slurm.scontrol("show", "job", job).stdout
    ns_slurm.run(["scancel", "--signal=TERM", job], timeout=15)
    signalled = time.monotonic()
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    while time.monotonic() < signalled + 60 and not (os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir)):
        time.sleep(0.1)
    to_checkpoint = time.monotonic() - signalled
    assert os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir), "no checkpoint after the signal"
    deadline = time.monotonic() + 200
    info = ""
    while time.monotonic() < deadline:
        info = ns_slurm.scontrol("show", "job", job, check=False).stdout
        if "JobState=COMPLETED" in info or "JobState=FAILED" in info or "JobState=CANCELLED" in info:
            break
        time.sleep(1)
    log = open(os.path.join(run_dir, f"slurm-{job}.out")).read()
    assert "JobState=COMPLETED" in info and "Restarts=1" in info, info + log[-3000:]
    got = _summary(run_dir)
    assert got["status"] == "completed" and got["resumed_from"]
    want = _horovodrun_reference(tmp_path, "torch", *extra)
    assert got["steps_done"] == want["steps_done"] and got["weights_sha1"] == want["weights_sha1"]
    print(f"SIGTERM -> checkpoint in {to_checkpoint:.1f} s; requeued and resumed bit-identically")


def test_scancel_leaves_nothing_running_on_any_host(ns_slurm, tmp_path):
    run_dir = str(tmp_path / "run")
    r = ns_slurm.run([LARGEBATCH, "sbatch", _example("torch"), "--nodes", "2", "--time", "10", "--submit", *SMALL,
                      "train.epochs=100", f"output.run_dir={run_dir}"], timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    job = r.stdout.strip().split()[-1]
    metrics = os.path.join(run_dir, "metrics.csv")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not os.path.exists(metrics):
        time.sleep(0.3)
    assert _runner_pids(ns_slurm), "the job's ranks are not running"
    ns_slurm.run(["scancel", job], timeout=15)
    cancelled = time.monotonic()
    while time.monotonic() < cancelled + 45 and _runner_pids(ns_slurm):
        time.sleep(0.3)
    assert not _runner_pids(ns_slurm), "ranks left after scancel"
    print(f"scancel -> no rank left after {time.monotonic() - cancelled:.1f} s")
