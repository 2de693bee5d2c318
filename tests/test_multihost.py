"""Multi-host runs on a real (namespace) cluster: two hosts, each with its own hostname, /etc/hosts
and sshd, plus a launch node; see launchers/testcluster.py. Everything is launched as a user
would: `largebatch run EXP.yaml -H lbh1:1,lbh2:1 ...` on one of the nodes.

The hosts share this machine's two cores, so runs are small. Tear-down removes every namespace,
sshd and file the cluster made, also when a test fails. Needs root (CI runs as root).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from multirank import environ_copy, wait_or_kill

from largebatch.launchers import testcluster

pytestmark = [pytest.mark.multirank, pytest.mark.multihost]

ROOT = Path(__file__).resolve().parent.parent
LARGEBATCH = str(Path(sys.executable).with_name("largebatch"))
# one thread per rank everywhere: the same float reduction order on one host and on two
SMALL = ["data.samples=256", "data.val_samples=64", "output.progress=false", "launcher.threads_per_rank=1"]


@pytest.fixture(scope="module")
def cluster():
    reason = testcluster.unavailable()
    if reason:
        pytest.skip(f"multi-host tests skipped: {reason}")
    with testcluster.Cluster(hosts=2) as c:
        yield c
    assert not any(ns.startswith(f"{testcluster.PREFIX}{c.id}-") for ns in _namespaces()), "namespaces left"


def _namespaces():
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout.split()


def _summary(run_dir):
    return json.loads((Path(run_dir) / "summary.json").read_text())


def _run(cluster, node, args, timeout=150):
    proc = cluster.run(node, [LARGEBATCH, "run", *args, *cluster.launcher_overrides()], capture_output=True,
                       text=True, timeout=timeout, cwd=str(ROOT))
    return proc


def _left_on_hosts(cluster):
    """Processes other than the test sshd still on any node."""
    return {n.name: cluster.processes(n) for n in cluster.nodes if cluster.processes(n)}


def _wait_empty(cluster, limit):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if not _left_on_hosts(cluster):
            return True
        time.sleep(0.5)
    return False


@pytest.fixture(scope="module")
def one_host(tmp_path_factory):
    """The same experiments on this machine alone (np=2, localhost): the reference."""
    out = {}
    for framework in ("torch", "keras"):
        run_dir = tmp_path_factory.mktemp("one-host") / framework
        proc = subprocess.run([LARGEBATCH, "run", f"examples/synthetic_{framework}.yaml", "--np", "2", *SMALL,
                               f"output.run_dir={run_dir}"], capture_output=True, text=True, timeout=150,
                              cwd=str(ROOT), env=environ_copy())
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[framework] = _summary(run_dir)
    return out


# how each engine is chosen on the command line: Horovod's two controllers, and torch.distributed
ENGINE = {"mpi": ["launcher.controller=mpi"], "gloo": ["launcher.controller=gloo"],
          "torchrun": ["--launcher", "torchrun"]}


@pytest.mark.parametrize("framework,engine,hosts_as,node", [
    ("torch", "mpi", "-H", "lblaunch"),
    ("torch", "gloo", "hostfile", "lbh1"),
    ("keras", "gloo", "-H", "lblaunch"),
    ("keras", "mpi", "hostfile", "lbh1"),
    ("torch", "torchrun", "-H", "lblaunch"),
    ("torch", "torchrun", "hostfile", "lbh2"),
], ids=["torch-mpi-H-launchnode", "torch-gloo-hostfile-onhost", "keras-gloo-H-launchnode",
        "keras-mpi-hostfile-onhost", "torch-torchrun-H-launchnode", "torch-torchrun-hostfile-onhost"])
def test_two_hosts_end_with_the_one_host_weights(cluster, one_host, tmp_path, framework, engine, hosts_as, node):
    """The one-host reference ran under horovodrun: torchrun across hosts ends with its weights too."""
    run_dir = tmp_path / "run"
    hosts = ["-H", cluster.hosts_arg()] if hosts_as == "-H" else \
        ["--hostfile", cluster.write_hostfile(str(tmp_path / "hostfile"))]
    proc = _run(cluster, node, [f"examples/synthetic_{framework}.yaml", *hosts, *SMALL, *ENGINE[engine],
                                "launcher.network_interface=eth0", f"output.run_dir={run_dir}"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = _summary(run_dir)
    assert summary["hosts"] == ["lbh1", "lbh2"]                  # one rank on each host, by its own name
    assert summary["ranks_agree"] is True                        # identical weights on both hosts
    assert summary["weights_sha1"] == one_host[framework]["weights_sha1"]     # = the one-host run, bit for bit
    assert summary["final_train_loss"] == one_host[framework]["final_train_loss"]
    assert "hostname of the client socket" not in proc.stderr    # torch.distributed's harmless warning left out
    assert not _left_on_hosts(cluster)


def test_doctor_checks_every_host_and_names_the_broken_one(cluster):
    args = [LARGEBATCH, "doctor", "-H", f"{cluster.hosts_arg()},lbh9", "--ssh-port", str(cluster.ssh_port),
            "--ssh-identity", cluster.identity]
    started = time.monotonic()
    proc = cluster.run("lblaunch", args, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - started
    assert proc.returncode == 1 and took < 30
    lines = proc.stdout.splitlines()
    assert any(line.startswith("lbh1 ") and " ok " in line and "hostname lbh1" in line for line in lines)
    assert "PROBLEM: host lbh1: the name 'lbh9' does not resolve there (Gloo then crashes" in proc.stdout
    assert any(line.startswith("PROBLEM: host lbh9: ssh failed") for line in lines)
    good = cluster.run("lblaunch", args[:3] + [cluster.hosts_arg()] + args[4:], capture_output=True, text=True,
                       timeout=60)
    assert good.returncode == 0 and good.stdout.strip().endswith("s)") and "hosts OK (2 checked" in good.stdout


def test_run_refuses_hosts_that_fail_the_preflight(cluster, tmp_path):
    run_dir = tmp_path / "run"
    cluster.link("lbh2", up=False)
    try:
        started = time.monotonic()
        proc = _run(cluster, "lblaunch", ["examples/synthetic_torch.yaml", "-H", cluster.hosts_arg(), *SMALL,
                                          f"output.run_dir={run_dir}"], timeout=60)
        took = time.monotonic() - started
    finally:
        cluster.link("lbh2", up=True)
    assert proc.returncode == 2 and took < 30, proc.stderr[-2000:]
    assert "preflight: host lbh2: ssh failed: ssh: connect to host lbh2 port 2222: Connection timed out" in proc.stderr
    assert not run_dir.exists()                                   # nothing launched, nothing written


def _start(cluster, node, args, log):
    fh = open(log, "w")
    return cluster.popen(node, [LARGEBATCH, "run", *args, *cluster.launcher_overrides()], stdout=fh,
                         stderr=subprocess.STDOUT, cwd=str(ROOT)), fh


def _wait_for(path, limit):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if Path(path).exists():
            return True
        time.sleep(0.2)
    return False


FAULT_RUN = [*SMALL, "train.epochs=6", "output.checkpoint_every=1"]


@pytest.mark.parametrize("engine", ["mpi", "torchrun"])
def test_a_host_that_loses_its_network_ends_the_job_and_the_rest_resume(cluster, tmp_path, engine):
    run_dir = tmp_path / "run"
    # a shorter launcher.host_timeout (Open MPI's keepalives; the process group's timeout) keeps
    # the test short: the same code path as the default 30 s
    quick = ["launcher.host_timeout=10"]
    proc, log = _start(cluster, "lblaunch", ["examples/synthetic_torch.yaml", "-H", cluster.hosts_arg(), *FAULT_RUN,
                                             *ENGINE[engine], *quick, f"output.run_dir={run_dir}"], tmp_path / "log")
    try:
        assert _wait_for(run_dir / "checkpoints" / "epoch-0002.pt", 120), (tmp_path / "log").read_text()[-3000:]
        cluster.link("lbh2", up=False)
        cut = time.monotonic()
        code = wait_or_kill(proc, 90)
        took = time.monotonic() - cut
        cluster.link("lbh2", up=True)
        text = (tmp_path / "log").read_text()
        assert code not in (None, 0), text[-3000:]
        assert "largebatch: host lbh2 stopped answering" in text
        assert _wait_empty(cluster, 60), _left_on_hosts(cluster)
    finally:
        log.close()
        cluster.link("lbh2", up=True)
    print(f"{engine}: link down -> exit {code} after {took:.1f} s")
    assert took < 90
    if engine == "torchrun":        # the resume below is the engine's own business, shown once
        return
    # what was written before the cut is intact, and the remaining host goes on from it
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.endswith(".pt"))
    assert ckpts and "epoch-0002.pt" in ckpts
    resumed = _run(cluster, "lbh1", ["examples/synthetic_torch.yaml", "-H", "lbh1:2", *FAULT_RUN,
                                     f"output.run_dir={run_dir}", "train.resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref_dir = tmp_path / "uninterrupted"
    ref = subprocess.run([LARGEBATCH, "run", "examples/synthetic_torch.yaml", "--np", "2", *FAULT_RUN,
                          f"output.run_dir={ref_dir}"], capture_output=True, text=True, timeout=150, cwd=str(ROOT),
                         env=environ_copy())
    assert ref.returncode == 0, ref.stderr[-3000:]
    got, want = _summary(run_dir), _summary(ref_dir)
    assert got["resumed_from"] and got["steps_done"] == want["steps_done"]
    assert got["weights_sha1"] == want["weights_sha1"]


@pytest.mark.parametrize("engine", ["mpi", "torchrun"])
def test_a_host_whose_ranks_are_killed_ends_the_job(cluster, tmp_path, engine):
    run_dir = tmp_path / "run"
    proc, log = _start(cluster, "lblaunch", ["examples/synthetic_torch.yaml", "-H", cluster.hosts_arg(), *FAULT_RUN,
                                             *ENGINE[engine], "train.epochs=40", f"output.run_dir={run_dir}"],
                       tmp_path / "log")
    try:
        assert _wait_for(run_dir / "metrics.csv", 120)
        time.sleep(2)
        # the ranks themselves (torchrun's and the tether's command lines name the program too)
        ranks = [pid for pid, cmd in cluster.processes("lbh2") if cmd.split()[1:3] == ["-m", "largebatch.runner"]]
        assert ranks
        for pid in ranks:
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        code = wait_or_kill(proc, 90)
        took = time.monotonic() - killed
        text = (tmp_path / "log").read_text()
        assert code not in (None, 0), text[-3000:]
        assert "lbh2" in text and took < 90
        assert _wait_empty(cluster, 30), _left_on_hosts(cluster)
    finally:
        log.close()
    print(f"{engine}: ranks on lbh2 killed -> exit {code} after {took:.1f} s")


@pytest.mark.parametrize("engine", ["gloo", "mpi", "torchrun"])
def test_sigterm_to_largebatch_run_stops_every_host(cluster, tmp_path, engine):
    run_dir = tmp_path / "run"
    proc, log = _start(cluster, "lblaunch", ["examples/synthetic_torch.yaml", "-H", cluster.hosts_arg(), *SMALL,
                                             "train.epochs=40", *ENGINE[engine], f"output.run_dir={run_dir}"],
                       tmp_path / "log")
    try:
        assert _wait_for(run_dir / "metrics.csv", 120), (tmp_path / "log").read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        code = wait_or_kill(proc, 40)
        took = time.monotonic() - sent
        assert code == 128 + signal.SIGTERM and took < 30, (tmp_path / "log").read_text()[-3000:]
        assert _wait_empty(cluster, 10), _left_on_hosts(cluster)
    finally:
        log.close()
    summary = _summary(run_dir)
    assert summary["status"] == "stopped" and summary["stopped_by"] == "SIGTERM"
    print(f"{engine}: SIGTERM -> exit {code} after {took:.1f} s")


# ------------------------------------------------------------------ Horovod Elastic across hosts
def _elastic_doc(**sections):
    from test_elastic import _doc
    return _doc(**sections)


def _elastic_run(cluster, tmp_path, doc, name, env_extra=None, timeout=240):
    import yaml
    exp = tmp_path / f"{name}.yaml"
    exp.write_text(yaml.safe_dump(doc))
    run_dir = tmp_path / name
    env = cluster.env()
    env.pop("LARGEBATCH_FAULT", None)
    env.update(env_extra or {})
    proc = cluster.run("lblaunch", [LARGEBATCH, "run", str(exp), f"output.run_dir={run_dir}",
                                    *cluster.launcher_overrides()], capture_output=True, text=True,
                       timeout=timeout, cwd=str(tmp_path), env=env)
    return proc, run_dir


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_elastic_job_drops_a_host_whose_rank_died_and_keeps_the_trajectory(cluster, tmp_path, framework):
    import test_elastic as te
    doc = _elastic_doc(framework=framework, launcher={"hosts": cluster.hosts_arg(), "network_interface": "eth0"},
                       train={"commit_every": 2})
    # rank 1 dies at step 5 on its host (as a host whose processes are all killed); Horovod Elastic
    # places ranks on hosts in an order of its own, so either host may be the one lost
    proc, run_dir = _elastic_run(cluster, tmp_path, doc, "elastic", {"LARGEBATCH_FAULT": "kill:1:5"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "world size is now 1; global batch 64 kept as 16 per rank × 1 ranks × 4 accumulation steps" in out
    summary = _summary(run_dir)
    assert summary["status"] == "completed" and summary["ranks"] == 1 and summary["hosts"] in (["lbh1"], ["lbh2"])
    if framework == "torch":
        params, momentum = te._max_diff(te._final(run_dir), te._fixed_size_reference(tmp_path, 2, 2))
    else:
        params, momentum = te._max_diff_keras(te._final_keras(run_dir), te.fixed_two_rank_keras(tmp_path))
    assert params < 1e-6 and momentum < 1e-6, (params, momentum)
    print(f"\n{framework} elastic across hosts, {summary['hosts'][0]} kept: vs fixed np=2: params {params:.2e}, "
          f"momentum {momentum:.2e}")
    assert _wait_empty(cluster, 10), _left_on_hosts(cluster)


def test_elastic_job_gains_a_host_from_the_discovery_script(cluster, tmp_path):
    from test_elastic import _final, _fixed_size_reference_join, _max_diff, discovery_script, grow_hosts_when_training
    script, hosts = discovery_script(tmp_path, "lbh1:1\n")
    doc = _elastic_doc(launcher={"np": 1, "hosts": None, "host_discovery_script": str(script),
                                 "network_interface": "eth0"}, data={"samples": 1024}, train={"commit_every": 1})
    grow_hosts_when_training(hosts, tmp_path / "join", "lbh1:1\nlbh2:1\n")
    proc, run_dir = _elastic_run(cluster, tmp_path, doc, "join", {"LARGEBATCH_FAULT": "slow:0:1:0.05"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    summary = _summary(run_dir)
    resets = summary["elastic"]["resets"]
    assert summary["status"] == "completed" and len(resets) == 1 and resets[0]["world_size"] == 2, out[-3000:]
    assert sorted(summary["hosts"]) == ["lbh1", "lbh2"]
    params, momentum = _max_diff(_final(run_dir), _fixed_size_reference_join(tmp_path))
    assert params < 1e-4 and momentum < 1e-6, (params, momentum)       # the tolerance of test_elastic


def _hosts_file(cluster, node):
    return f"/etc/netns/{cluster.node(node).namespace}/hosts"


def test_a_hostname_that_does_not_resolve_on_another_host_is_named(cluster, tmp_path):
    """Hosts given by address; lbh1 cannot resolve its own hostname, which Gloo uses."""
    path = _hosts_file(cluster, "lbh1")
    original = open(path).read()
    addresses = [n.address for n in cluster.host_nodes]
    try:
        with open(path, "r+") as fh:         # in place: the file is bind-mounted over lbh2's /etc/hosts
            fh.write("".join(line for line in original.splitlines(True) if not line.rstrip().endswith("\tlbh1")))
            fh.truncate()
        doctor = cluster.run("lblaunch", [LARGEBATCH, "doctor", "-H", ",".join(addresses), "--ssh-port",
                                          str(cluster.ssh_port), "--ssh-identity", cluster.identity],
                             capture_output=True, text=True, timeout=60)
        assert doctor.returncode == 1
        assert (f"PROBLEM: host {addresses[0]}: the name 'lbh1' (the hostname of {addresses[0]}, which Gloo uses) "
                f"does not resolve there") in doctor.stdout, doctor.stdout
        run_dir = tmp_path / "run"
        proc = _run(cluster, "lblaunch", ["examples/synthetic_torch.yaml", "-H", ",".join(f"{a}:1" for a in addresses),
                                          *SMALL, "launcher.controller=gloo", "launcher.network_interface=eth0",
                                          "launcher.preflight=false", f"output.run_dir={run_dir}"], timeout=120)
        assert proc.returncode != 0
        # Gloo's own words, when rank 0's message wins the race ('Unable to find address for: lbh1'), and
        # always the check run after the failure
        assert (f"largebatch: after the failure: host {addresses[0]}: the name 'lbh1' (the hostname of "
                f"{addresses[0]}, which Gloo uses) does not resolve there") in proc.stderr, proc.stderr[-3000:]
        refused = _run(cluster, "lblaunch", ["examples/synthetic_torch.yaml", "-H",
                                             ",".join(f"{a}:1" for a in addresses), *SMALL,
                                             "launcher.controller=gloo", f"output.run_dir={tmp_path / 'run2'}"],
                       timeout=60)
        assert refused.returncode == 2 and "preflight: host" in refused.stderr and "'lbh1'" in refused.stderr
    finally:
        with open(path, "r+") as fh:
            fh.write(original)
            fh.truncate()
    assert _wait_empty(cluster, 30), _left_on_hosts(cluster)


def test_the_preflight_finds_the_users_files_missing_on_a_host(cluster, tmp_path):
    """Issue 22: the user's model/data files must be at the same path on every host; the hosts
    share this machine's filesystem, so a file present here is present there and a missing one is
    missing on both, each named with its YAML key."""
    present = tmp_path / "my_model.py"
    present.write_text("def mlp(): pass\n")
    code = ("import json, sys; from largebatch.launchers.doctor import check_hosts; "
            f"problems, _, _ = check_hosts(sys.argv[1].split(','), ssh_port={cluster.ssh_port}, "
            f"ssh_identity={cluster.identity!r}, files={{{str(present)!r}: 'model.factory', "
            f"'/nonexistent/arrays.npz': 'data.path'}}); print(json.dumps(problems))")
    proc = cluster.run("lblaunch", [sys.executable, "-c", code, "lbh1,lbh2"], capture_output=True, text=True,
                       timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    problems = json.loads(proc.stdout.strip().splitlines()[-1])
    assert problems == [f"host {h}: data.path: /nonexistent/arrays.npz is not there; copy it to the same path on "
                        f"every host (or keep it on a shared filesystem)" for h in ("lbh1", "lbh2")]


def test_the_preflight_probes_what_the_launch_uses(cluster, tmp_path):
    """Issue 23 item 6. Hosts whose /etc/hosts maps the launch node's name to a loopback address:
    mpirun and Horovod advertise the launch node's addresses, not its name, so the launch goes on
    with a warning. torchrun: nothing connects back to the launch node; the rendezvous port on
    the first host must be free."""
    paths = [_hosts_file(cluster, n.name) for n in cluster.host_nodes]
    originals = [open(p).read() for p in paths]
    try:
        for path, text in zip(paths, originals):
            with open(path, "r+") as fh:       # in place: the file is bind-mounted over the host's /etc/hosts
                fh.write("".join(line for line in text.splitlines(True) if not line.rstrip().endswith("\tlblaunch"))
                         + "127.0.1.1\tlblaunch\n")
                fh.truncate()
        run_dir = tmp_path / "run"
        proc = _run(cluster, "lblaunch", ["examples/synthetic_torch.yaml", "-H", cluster.hosts_arg(), *SMALL,
                                          "data.samples=64", "train.epochs=1", f"output.run_dir={run_dir}"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        for host in ("lbh1", "lbh2"):
            assert (f"preflight: warning: host {host}: this launch node's name 'lblaunch' resolves to 127.0.1.1 "
                    f"there; this launch does not use it (the launchers advertise addresses)") in proc.stderr
        assert _summary(run_dir)["status"] == "completed"
    finally:
        for path, text in zip(paths, originals):
            with open(path, "r+") as fh:
                fh.write(text)
                fh.truncate()
    # (SO_REUSEADDR: the port may still hold an earlier torchrun test's closed connections; a
    # listening socket keeps it taken all the same)
    holder = cluster.popen("lbh1", [sys.executable, "-c", "import socket, time; s = socket.socket(); "
                                    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
                                    "s.bind(('', 29400)); s.listen(); print('listening', flush=True); time.sleep(60)"],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "listening"
        proc = _run(cluster, "lblaunch", ["examples/synthetic_torch.yaml", "-H", cluster.hosts_arg(), *SMALL,
                                          "--launcher", "torchrun", f"output.run_dir={tmp_path / 'taken'}"], timeout=60)
    finally:
        holder.kill()
        holder.wait(timeout=10)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert ("preflight: host lbh1: port 29400 (launcher.rendezvous_port) is taken there ([Errno 98] Address already "
            "in use); torchrun's c10d rendezvous listens on it: choose a free one") in proc.stderr
    assert not (tmp_path / "taken").exists()
    assert _wait_empty(cluster, 10), _left_on_hosts(cluster)


def test_the_command_line_clusters_hint_works_from_any_directory(tmp_path):
    """Issue 27 item 10: `testcluster up` prints a `largebatch run` line with absolute paths."""
    reason = testcluster.unavailable()
    if reason:
        pytest.skip(reason)
    me = [sys.executable, "-m", "largebatch.launchers.testcluster"]
    up = subprocess.run([*me, "up", "--hosts", "1"], capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    cluster_id = up.stdout.split()[2] if up.stdout.startswith("test cluster ") else None
    try:
        assert up.returncode == 0, up.stderr[-2000:]
        hint = next(line for line in up.stdout.splitlines() if "then, in it:" in line).split()
        assert hint[3] == LARGEBATCH and hint[4] == "run"
        assert os.path.isabs(hint[5]) and os.path.isfile(hint[5]) and hint[5].endswith("synthetic_torch.yaml")
    finally:
        if cluster_id:
            down = subprocess.run([*me, "down", "--id", cluster_id], capture_output=True, text=True, timeout=60)
            assert down.returncode == 0, down.stderr
    assert not any(ns.startswith(f"{testcluster.PREFIX}{cluster_id}-") for ns in _namespaces())
