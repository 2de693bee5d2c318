"""Horovod Elastic (torch and Keras): configuration checks, the horovodrun line, optimizer state
that a joining worker can receive, and real elastic jobs under horovodrun --gloo that lose a worker
(kill -9) or gain one, finish, and follow the trajectory of a fixed-size run (the global batch is
kept by accumulation, so the steps see the same samples)."""
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from largebatch import checkpoint as core
from largebatch.config import ConfigError, elastic_accumulation, load_dict
from largebatch.launchers import proctree

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from multirank import horovodrun_path  # noqa: E402

BASE = {
    "framework": "torch",
    "model": {"name": "small_cnn", "batch_norm": False},
    "data": {"kind": "synthetic", "samples": 256, "val_samples": 32, "image_size": 8},
    "batch": {"per_worker": 16, "accumulation_steps": 2},
    # the former default exclusion (biases not adapted): the tolerances below are set against this
    # job's rounding floor, fixed np=1 vs np=2 differing by 1.5e-6; with every tensor adapted (the
    # default) that floor is 2.6e-4 (measured), too near the 1e-3 of a step that lost its state
    "optimizer": {"name": "lars", "momentum": 0.9, "weight_decay": 5.0e-4, "trust_coefficient": 0.02,
                  "exclude": {"adaptation": None, "decay": None}},
    "schedule": {"base_lr": 0.5, "base_batch": 32, "warmup": "gradual", "warmup_epochs": 0.5, "decay": "poly",
                 "power": 2},
    "train": {"epochs": 4, "log_every": 1, "eval": False},
    "output": {"progress": False, "tensorboard": False, "checkpoint_every": 1, "trust_ratios": True},
    "launcher": {"threads_per_rank": 1, "controller": "gloo", "np": 2, "elastic": True, "min_np": 1, "max_np": 2,
                 "hosts": "localhost:1,127.0.0.1:1"},
}


def _doc(**sections):
    doc = json.loads(json.dumps(BASE))
    for section, values in sections.items():
        if values is None:
            doc.pop(section, None)
        elif isinstance(values, dict):
            doc.setdefault(section, {}).update(values)
        else:
            doc[section] = values
    return doc


def _problems(doc, *overrides):
    with pytest.raises(ConfigError) as err:
        load_dict(doc, list(overrides))
    return err.value.problems


# ---------------------------------------------------------------------------------------------
# configuration and launch line
# ---------------------------------------------------------------------------------------------
def test_elastic_accumulation_keeps_the_global_batch():
    assert elastic_accumulation(64, 16, 1) == 4
    assert elastic_accumulation(64, 16, 2) == 2
    assert elastic_accumulation(64, 16, 4) == 1
    assert elastic_accumulation(64, 16, 3) is None
    assert elastic_accumulation(64, 16, 8) is None


def test_valid_elastic_experiment_derives_the_world_size_range():
    exp = load_dict(_doc())
    assert exp.derived["min_np"] == 1 and exp.derived["max_np"] == 2
    assert exp.derived["global_batch"] == 64
    assert "min_np" in exp.resolved()["launcher"] and "commit_every" in exp.resolved()["train"]
    plain = load_dict(_doc(launcher={"elastic": False, "min_np": None, "max_np": None, "hosts": None}))
    assert "min_np" not in plain.resolved()["launcher"] and "commit_every" not in plain.resolved()["train"]


@pytest.mark.parametrize("overrides, expected", [
    (["launcher.controller=mpi"],
     "launcher.elastic: needs launcher.controller 'gloo' (Horovod Elastic runs on Gloo), got 'mpi'"),
    (["launcher.type=mpirun", "launcher.controller=mpi"],
     "launcher.elastic: needs launcher.type 'horovodrun' (Horovod Elastic) or 'torchrun' (framework torch), got 'mpirun'"),
    (["launcher.max_np=3"],
     "launcher.min_np: the global batch 64 is kept by accumulation when ranks leave or join, so it must be a "
     "multiple of batch.per_worker (16) × every world size from 1 to 3; not for 3"),
    (["launcher.min_np=2", "launcher.np=1", "batch.accumulation_steps=4"],
     "launcher.np: expected launcher.min_np <= np <= launcher.max_np = 2 <= np <= 2, got 1"),
    (["launcher.hosts=localhost:2"],
     "launcher.hosts: Horovod Elastic with a fixed host list needs at least 2 hosts (a failed host is dropped), "
     "got 1; list more hosts or set launcher.host_discovery_script"),
    (["launcher.hosts=null", "launcher.host_discovery_script=/no/such/script.sh"],
     "launcher.host_discovery_script: expected an executable file, got '/no/such/script.sh' (no such file)"),
    (["launcher.host_discovery_script=/etc/hostname"],
     "launcher.host_discovery_script: set either it or launcher.hosts, not both"),
])
def test_elastic_configuration_errors(overrides, expected):
    problems = _problems(_doc(), *overrides)
    assert expected in problems, problems


def test_keras_elastic_experiment_validates():
    exp = load_dict(_doc(framework="keras"))
    assert exp.cfg["launcher"]["elastic"] and exp.derived["min_np"] == 1 and exp.derived["max_np"] == 2


def test_elastic_keys_need_elastic_true():
    doc = _doc(launcher={"elastic": False, "hosts": None}, train={"commit_every": 5})
    problems = _problems(doc)
    assert "launcher.min_np: only used with launcher.elastic: true" in problems
    assert "launcher.max_np: only used with launcher.elastic: true" in problems
    assert "train.commit_every: only used with launcher.elastic: true" in problems


def test_discovery_script_not_executable(tmp_path):
    script = tmp_path / "hosts.sh"
    script.write_text("#!/bin/sh\necho localhost:2\n")
    problems = _problems(_doc(launcher={"hosts": None, "host_discovery_script": str(script)}))
    assert problems == [f"launcher.host_discovery_script: expected an executable file, got {str(script)!r} "
                        f"(not executable)"]


def test_horovodrun_line_has_the_elastic_flags(tmp_path):
    from largebatch.launchers.command import build_command
    script = tmp_path / "hosts.sh"
    script.write_text("#!/bin/sh\necho localhost:2\n")
    script.chmod(0o755)
    exp = load_dict(_doc(launcher={"hosts": None, "host_discovery_script": str(script), "elastic_timeout": 60,
                                   "reset_limit": 3, "max_np": 4}, batch={"per_worker": 4, "accumulation_steps": 6}))
    cmd = build_command(exp.cfg["launcher"], exp.derived, ["prog"])
    argv = cmd.argv
    assert argv[3:5] == ["-np", "2"] and "--gloo" in argv and "-H" not in argv
    i = argv.index("--min-np")
    assert argv[i:i + 10] == ["--min-np", "1", "--max-np", "4", "--host-discovery-script", str(script),
                              "--elastic-timeout", "60", "--reset-limit", "3"]
    fixed = build_command(load_dict(_doc()).cfg["launcher"], load_dict(_doc()).derived, ["prog"]).argv
    assert fixed[fixed.index("-H") + 1] == "localhost:1,127.0.0.1:1"
    assert "--host-discovery-script" not in fixed and fixed[fixed.index("--min-np") + 1] == "1"


# ---------------------------------------------------------------------------------------------
# optimizer state a joining worker can receive
# ---------------------------------------------------------------------------------------------
def test_init_optimizer_state_gives_the_same_first_sgd_step():
    import torch
    from largebatch.torch import init_optimizer_state
    torch.manual_seed(0)
    a = torch.nn.Linear(5, 3)
    b = torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)
    init_optimizer_state(opt_b)
    assert all(torch.equal(opt_b.state[p]["momentum_buffer"], torch.zeros_like(p)) for p in b.parameters())
    x = torch.randn(4, 5)
    for model, opt in ((a, opt_a), (b, opt_b)):
        for _ in range(3):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_init_state_creates_the_tracked_trust_ratio_slots():
    import torch
    from largebatch.torch import LAMB, LARS
    model = torch.nn.Linear(4, 2)
    for cls in (LARS, LAMB):
        opt = cls(model.parameters(), lr=0.1, track_trust_ratios=True, exclude=False)
        opt.init_state()
        assert all("trust_ratio" in opt.state[p] for p in model.parameters())
        untracked = cls(model.parameters(), lr=0.1)
        untracked.init_state()
        assert not any("trust_ratio" in untracked.state[p] for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# real elastic jobs
# ---------------------------------------------------------------------------------------------
def _env(**extra):
    env = dict(os.environ)
    env.update({"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
                "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    env.pop("LARGEBATCH_FAULT", None)
    env.update(extra)
    return env


def _run_command(tmp_path, doc, name):
    """(``largebatch run`` argv, run dir) for ``doc`` written to ``<name>.yaml``."""
    import yaml
    exp = tmp_path / f"{name}.yaml"
    exp.write_text(yaml.safe_dump(doc))
    run_dir = tmp_path / name
    return [sys.executable, "-m", "largebatch.launchers.cli", "run", str(exp), f"output.run_dir={run_dir}"], run_dir


def _run(tmp_path, doc, name, *, env=None, timeout=240):
    cmd, run_dir = _run_command(tmp_path, doc, name)
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    return proc, run_dir, time.monotonic() - started


def _final(run_dir):
    import torch
    _, payload = core.read(str(run_dir / "checkpoints" / "epoch-0004.pt"))
    return torch.load(io.BytesIO(payload), weights_only=True)


def _max_diff(a, b):
    params = max(float((a["model"][k] - b["model"][k]).abs().max()) for k in a["model"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    momentum = max(float((sa[i]["momentum_buffer"] - sb[i]["momentum_buffer"]).abs().max()) for i in sa)
    return params, momentum


def _fixed_size_reference(tmp_path, np_, acc):
    doc = _doc(launcher={"np": np_, "controller": "gloo", "threads_per_rank": 1, "elastic": False,
                         "min_np": None, "max_np": None, "hosts": None},
               batch={"per_worker": 16, "accumulation_steps": acc})
    doc["launcher"] = {k: v for k, v in doc["launcher"].items() if v is not None}
    proc, run_dir, _ = _run(tmp_path, doc, f"fixed{np_}")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return _final(run_dir)


def _assert_finished_alone(proc, run_dir, killed):
    """The job lost rank ``killed`` at update 5, rolled back to update 4, and finished the 16
    updates on one rank with 4 accumulation steps (the global batch kept), every update logged."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert f"injected fault 'kill' on rank {killed} at step 5" in out
    assert ("largebatch: world size is now 1; global batch 64 kept as 16 per rank × 1 ranks × 4 accumulation "
            "steps; continuing from step 4") in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps_done"] == summary["total_steps"] == 16
    assert summary["ranks"] == 1 and summary["accumulation_steps"] == 4 and summary["global_batch"] == 64
    assert summary["elastic"]["resets"] == [{"step": 4, "world_size": 1}]
    steps_logged = [line.split(",")[1] for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert sorted(set(map(int, steps_logged))) == list(range(1, 17))


needs_horovodrun = pytest.mark.skipif(horovodrun_path() is None, reason="horovodrun not installed (make setup)")


@pytest.fixture(scope="module")
def fixed_two_rank_run(tmp_path_factory):
    return _fixed_size_reference(tmp_path_factory.mktemp("fixed"), 2, 2)


@needs_horovodrun
@pytest.mark.multirank
@pytest.mark.parametrize("killed", [1, 0], ids=["rank1", "rank0"])
def test_elastic_job_loses_a_worker_and_finishes_on_the_same_trajectory(tmp_path, killed, fixed_two_rank_run):
    # two "hosts" that are both this machine: Horovod drops the failed one and goes on with the
    # other; when rank 0 dies, the survivor becomes rank 0 and takes over the run directory
    proc, run_dir, secs = _run(tmp_path, _doc(train={"commit_every": 2}), "elastic",
                               env=_env(LARGEBATCH_FAULT=f"kill:{killed}:5"))
    _assert_finished_alone(proc, run_dir, killed)
    params, momentum = _max_diff(_final(run_dir), fixed_two_rank_run)
    assert params < 1e-6 and momentum < 1e-6, (params, momentum)
    print(f"\nelastic, rank {killed} killed at step 5: finished in {secs:.1f} s; vs fixed np=2: "
          f"params {params:.2e}, momentum {momentum:.2e}")


def discovery_script(tmp_path, hosts_text):
    """A host discovery script that prints a hosts file; returns (script, hosts file)."""
    hosts = tmp_path / "hosts.txt"
    hosts.write_text(hosts_text)
    script = tmp_path / "discover.sh"
    script.write_text(f"#!/bin/sh\ncat {hosts}\n")
    script.chmod(0o755)
    return script, hosts


def _when_training(run_dir, rows, limit=120):
    """True once ``run_dir`` has logged ``rows`` training rows; False after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.csv"
        if metrics.exists() and metrics.read_text().count("\ntrain,") >= rows:
            return True
        time.sleep(0.05)
    return False


def grow_hosts_when_training(hosts, run_dir, hosts_text, limit=120):
    """Once ``run_dir`` has logged 3 training rows (training is under way), write ``hosts_text``
    to the hosts file: a host appears in the discovery script's output (a thread; bounded)."""
    def add_host():
        if _when_training(run_dir, 3, limit):
            hosts.write_text(hosts_text)

    threading.Thread(target=add_host, daemon=True).start()


def _join_run(tmp_path, framework):
    """An elastic job started on one host that gains a second from the discovery script once it
    is training; it finishes the 128 updates on 2 ranks (1 accumulation step instead of 2).
    Returns (run dir, resets, seconds)."""
    script, hosts = discovery_script(tmp_path, "localhost:1\n")
    # one host at the start: Horovod needs the interface named (else it waits for a second host)
    doc = _doc(framework=framework, launcher={"np": 1, "hosts": None, "host_discovery_script": str(script),
                                              "network_interface": "lo"},
               data={"samples": 1024}, train={"commit_every": 1})
    grow_hosts_when_training(hosts, tmp_path / "join", "localhost:1\n127.0.0.1:1\n")
    # 50 ms per update on rank 0: the job cannot finish before Horovod (polling the script every
    # second) has added the new host, however fast the machine
    proc, run_dir, secs = _run(tmp_path, doc, "join", env=_env(LARGEBATCH_FAULT="slow:0:1:0.05"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps_done"] == summary["total_steps"] == 128
    resets = summary["elastic"]["resets"]
    assert len(resets) == 1 and resets[0]["world_size"] == 2 and 3 <= resets[0]["step"] < 128, (resets, out[-3000:])
    assert summary["ranks"] == 2 and summary["accumulation_steps"] == 1 and summary["ranks_agree"] is True
    return run_dir, resets, secs


@pytest.fixture(scope="module")
def fixed_join_run(tmp_path_factory):
    """The join jobs' data at a fixed world size of 1 (2 accumulation steps)."""
    return _fixed_size_reference_join(tmp_path_factory.mktemp("fixed_join"))


@needs_horovodrun
@pytest.mark.multirank
def test_elastic_job_gains_a_worker_that_receives_the_state(tmp_path, fixed_join_run):
    run_dir, resets, secs = _join_run(tmp_path, "torch")
    reference = fixed_join_run
    params, momentum = _max_diff(_final(run_dir), reference)
    # float32 sums taken in another order (2 ranks × 1 pass vs 1 rank × 2 passes) for ~100 steps
    # at lr 0.5: fixed 2-rank vs fixed 1-rank runs of this job already differ by 1.5e-6, and the
    # elastic runs by 1e-7 to 1e-5 depending on where the join falls (|w| <= 1.3); a step that
    # saw other samples, or lost its momentum, differs by 1e-3 or more
    assert params < 1e-4 and momentum < 1e-6, (params, momentum)
    print(f"\nelastic, worker joined at step {resets[0]['step']}: finished in {secs:.1f} s; vs fixed np=1: "
          f"params {params:.2e}, momentum {momentum:.2e}")


def _fixed_size_reference_join(tmp_path):
    doc = _doc(launcher={"np": 1, "elastic": False, "controller": "gloo", "threads_per_rank": 1},
               data={"samples": 1024})
    doc["launcher"] = {k: v for k, v in doc["launcher"].items()
                       if k in ("np", "elastic", "controller", "threads_per_rank")}
    proc, run_dir, _ = _run(tmp_path, doc, "fixed_join")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return _final(run_dir)


# ---------------------------------------------------------------------------------------------
# torchrun's elastic agents (launcher.type torchrun): the same promises, where a reset is the
# agent starting every rank anew from the freshest commit file (launchers/runner/commits.py)
# ---------------------------------------------------------------------------------------------
def _torchrun_doc(**launcher):
    doc = _doc()
    doc["launcher"] = {"type": "torchrun", "threads_per_rank": 1, "np": 2, "elastic": True, "min_np": 1,
                       "max_np": 2, "hosts": "localhost:1,127.0.0.1:1", **launcher}
    doc["launcher"] = {k: v for k, v in doc["launcher"].items() if v is not None}
    return doc


def test_torchrun_elastic_configuration_errors():
    assert load_dict(_torchrun_doc()).derived["min_np"] == 1
    assert load_dict(_torchrun_doc(np=1, hosts="localhost:1")).derived["max_np"] == 2   # a host may join
    assert _problems(_torchrun_doc(hosts="localhost:2,127.0.0.1:1", np=3, max_np=3, min_np=2)) == [
        "launcher.hosts: torchrun's elastic hosts each run the same number of ranks, got 2, 1"]
    assert _problems(_torchrun_doc(hosts="localhost:2,127.0.0.1:2", np=4, max_np=4, min_np=1),
                     "batch.per_worker=8") == [
        "launcher.min_np: expected a multiple of the 2 ranks per host (torchrun adds and removes whole hosts), got 1"]
    assert "launcher.host_discovery_script: Horovod Elastic only; under torchrun a host joins by running the run " \
           "directory's join.sh" in _problems(_torchrun_doc(hosts=None, host_discovery_script="/bin/true"))
    srun = _torchrun_doc(type="srun", engine="torch.distributed", hosts=None)
    assert "launcher.elastic: torch.distributed's elastic jobs are started by launcher.type 'torchrun', got 'srun'" \
        in _problems(srun)


def test_torchrun_elastic_line_and_join_script():
    from largebatch.launchers.command import build_command
    from largebatch.launchers.fanout import host_commands
    from largebatch.launchers.preflight import SSH
    exp = load_dict(_torchrun_doc(reset_limit=5, elastic_timeout=120))
    cmd = build_command(exp.cfg["launcher"], exp.derived, ["prog"])
    assert "--elastic" in cmd.argv and cmd.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    torchrun = cmd.argv[cmd.argv.index("--") + 1:]
    for flag in ("--nnodes=1:2", "--max-restarts=5", "--rdzv-conf=join_timeout=120,last_call_timeout=5"):
        assert flag in torchrun, torchrun
    hosts = host_commands([("localhost", 1), ("127.0.0.1", 1)], torchrun, python="py", ssh=SSH(), environ={})
    confs = [[a for a in argv if a.startswith("--rdzv-conf=")] for _, argv in hosts]
    assert [c[0].rsplit(",", 1)[1] for c in confs] == ["is_host=1", "is_host=0"]   # the first host serves it
    assert "--rdzv-conf=join_timeout=120,last_call_timeout=5,is_host=0" in cmd.join
    assert "--nproc-per-node=1" in cmd.join and cmd.join[-1] == "prog"
    # one host: still the rendezvous form, so that another can join
    one = load_dict(_torchrun_doc(np=1, hosts="localhost:1"))
    single = build_command(one.cfg["launcher"], one.derived, ["prog"])
    assert "--standalone" not in single.argv and "--nnodes=1:2" in single.argv


def _argv(pid):
    try:
        return [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []


def _start(tmp_path, doc, name, env):
    """``largebatch run`` of ``doc`` started in the background (stderr with stdout): (process, run dir)."""
    cmd, run_dir = _run_command(tmp_path, doc, name)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, run_dir


def _finish(proc, timeout=180):
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return out


needs_torchrun = pytest.mark.skipif(not (Path(sys.executable).parent / "torchrun").exists(), reason="no torchrun")


@needs_torchrun
@pytest.mark.multirank
def test_torchrun_elastic_restarts_a_killed_rank_from_its_commit(tmp_path, fixed_two_rank_run):
    # torchrun replaces a failed rank: both ranks start anew, resume from the commit at update 4
    # and finish on the trajectory of the fixed 2-rank run (here Horovod's: the same engine-free math)
    proc, run_dir, secs = _run(tmp_path, _torchrun_doc(), "restart",
                               env=_env(LARGEBATCH_FAULT="kill:1:5"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "injected fault 'kill' on rank 1 at step 5" in out
    assert "world size is now 2; global batch 64 kept as 16 per rank × 2 ranks × 2 accumulation steps; " \
           "continuing from step 4" in out
    assert "Traceback" not in out, out[-3000:]           # a lost peer is one line, not a crash report
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps_done"] == 16 and summary["ranks_agree"] is True
    assert summary["elastic"]["resets"] == [{"step": 4, "world_size": 2}] and summary["resumed_from"] is None
    assert not (run_dir / "elastic").exists()            # the commits go with a completed job
    params, momentum = _max_diff(_final(run_dir), fixed_two_rank_run)
    assert params < 1e-6 and momentum < 1e-6, (params, momentum)
    print(f"\ntorchrun elastic, rank 1 killed at step 5: finished in {secs:.1f} s; vs fixed np=2: "
          f"params {params:.2e}, momentum {momentum:.2e}")


@needs_torchrun
@pytest.mark.multirank
def test_torchrun_elastic_job_loses_a_host_and_finishes_on_the_same_trajectory(tmp_path, fixed_two_rank_run):
    # the second host's agent and rank are killed (a lost host): the first host goes on alone,
    # from the last commit, with 4 accumulation steps; the job exits 0
    doc = _torchrun_doc()
    doc["train"]["commit_every"] = 2
    proc, run_dir = _start(tmp_path, doc, "lose", _env(LARGEBATCH_FAULT="slow:0:1:0.1"))
    try:
        assert _when_training(run_dir, 5), f"{run_dir}: fewer than 5 training rows"
        started = time.monotonic()
        tree = {pid: _argv(pid) for pid, _ in proctree.descendants(proc.pid)}
        agent = [pid for pid, argv in tree.items()
                 if any(a.endswith("torchrun") for a in argv[:2]) and any("is_host=0" in a for a in argv)]
        assert len(agent) == 1, tree
        for pid in [agent[0], *(pid for pid, _ in proctree.descendants(agent[0]))]:
            os.kill(pid, 9)
    finally:
        out = _finish(proc)
    secs = time.monotonic() - started
    assert proc.returncode == 0, out[-4000:]
    assert "host 127.0.0.1: its torchrun exited with 137; the elastic job goes on without it" in out, out[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps_done"] == 16 and summary["ranks"] == 1
    assert summary["accumulation_steps"] == 4 and summary["global_batch"] == 64
    (reset,) = summary["elastic"]["resets"]
    assert reset["world_size"] == 1 and reset["step"] >= 4 and reset["step"] % 2 == 0, reset
    assert f"world size is now 1; global batch 64 kept as 16 per rank × 1 ranks × 4 accumulation steps; " \
           f"continuing from step {reset['step']}" in out
    params, momentum = _max_diff(_final(run_dir), fixed_two_rank_run)
    assert params < 1e-6 and momentum < 1e-6, (params, momentum)
    print(f"\ntorchrun elastic, host lost after step {reset['step']}: {secs:.1f} s to the job's end; vs fixed np=2: "
          f"params {params:.2e}, momentum {momentum:.2e}")


@needs_torchrun
@pytest.mark.multirank
def test_torchrun_elastic_job_gains_a_host_that_runs_join_sh(tmp_path, fixed_join_run):
    doc = _torchrun_doc(np=1, hosts="localhost:1")
    doc["data"]["samples"] = 1024
    doc["train"]["commit_every"] = 1
    proc, run_dir = _start(tmp_path, doc, "grow", _env(LARGEBATCH_FAULT="slow:0:1:0.05"))
    try:
        assert _when_training(run_dir, 3), f"{run_dir}: fewer than 3 training rows"
        joined = subprocess.run(["sh", str(run_dir / "join.sh")], env=_env(), capture_output=True, text=True,
                                timeout=180)
    finally:
        out = _finish(proc)
    assert proc.returncode == 0 and joined.returncode == 0, (out[-3000:], joined.stderr[-3000:])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps_done"] == 128 and summary["ranks"] == 2
    assert summary["accumulation_steps"] == 1 and summary["ranks_agree"] is True
    (reset,) = summary["elastic"]["resets"]
    assert reset["world_size"] == 2 and 3 <= reset["step"] < 128, reset
    # the agent stops its rank to restart it: the ranks agree on the step and commit it (nothing lost)
    assert f"stopped after step {reset['step']} and committed" in out, out[-3000:]
    params, momentum = _max_diff(_final(run_dir), fixed_join_run)
    assert params < 1e-4 and momentum < 1e-6, (params, momentum)      # (see the Horovod join test)
    print(f"\ntorchrun elastic, host joined at step {reset['step']}; vs fixed np=1: params {params:.2e}, "
          f"momentum {momentum:.2e}")


# ---------------------------------------------------------------------------------------------
# Keras 3: the same jobs (largebatch.keras.elastic_state, DistributedOptimizer(elastic=True))
# ---------------------------------------------------------------------------------------------
def _final_keras(run_dir):
    """{'model': {path: array}, 'momentum': {path: array}} of the last Keras checkpoint."""
    import numpy as np
    _, payload = core.read(str(sorted((run_dir / "checkpoints").glob("*.ckpt"))[-1]))
    arrays = np.load(io.BytesIO(payload))
    meta = json.loads(bytes(arrays["meta"]).decode())
    model = {p: arrays[f"model/{i:04d}"] for i, p in enumerate(meta["model_paths"])}
    momentum = {p: arrays[f"optimizer/{i:04d}"] for i, p in enumerate(meta["optimizer"]["paths"]) if "momentum" in p}
    return {"model": model, "momentum": momentum, "step": meta["step"]}


def _max_diff_keras(a, b):
    import numpy as np
    params = max(float(np.max(np.abs(a["model"][k] - b["model"][k]))) for k in a["model"])
    momentum = max(float(np.max(np.abs(a["momentum"][k] - b["momentum"][k]))) for k in a["momentum"])
    assert a["momentum"] and a["step"] == b["step"]
    return params, momentum


@pytest.fixture(scope="module")
def fixed_two_rank_keras_run(tmp_path_factory):
    return fixed_two_rank_keras(tmp_path_factory.mktemp("fixed_keras"))


def fixed_two_rank_keras(tmp_path):
    """The Keras job at a fixed world size of 2 (the trajectory an elastic job must keep)."""
    doc = _doc(framework="keras", launcher={"np": 2, "controller": "gloo", "threads_per_rank": 1, "elastic": False,
                                            "min_np": None, "max_np": None, "hosts": None})
    doc["launcher"] = {k: v for k, v in doc["launcher"].items() if v is not None}
    proc, run_dir, _ = _run(tmp_path, doc, "fixed2")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return _final_keras(run_dir)


@needs_horovodrun
@pytest.mark.multirank
def test_keras_elastic_job_loses_a_worker_and_finishes_on_the_same_trajectory(tmp_path, fixed_two_rank_keras_run):
    proc, run_dir, secs = _run(tmp_path, _doc(framework="keras", train={"commit_every": 2}), "elastic",
                               env=_env(LARGEBATCH_FAULT="kill:1:5"))
    _assert_finished_alone(proc, run_dir, 1)
    params, momentum = _max_diff_keras(_final_keras(run_dir), fixed_two_rank_keras_run)
    assert params < 1e-6 and momentum < 1e-6, (params, momentum)
    print(f"\nkeras elastic, rank 1 killed at step 5: finished in {secs:.1f} s; vs fixed np=2: "
          f"params {params:.2e}, momentum {momentum:.2e}")


@needs_horovodrun
@pytest.mark.multirank
def test_keras_elastic_job_gains_a_worker_that_receives_the_state(tmp_path):
    run_dir, resets, secs = _join_run(tmp_path, "keras")
    fixed = {}
    for np_, acc in ((1, 2), (2, 1)):
        doc = _doc(framework="keras", launcher={"np": np_, "elastic": False, "controller": "gloo",
                                                "threads_per_rank": 1},
                   data={"samples": 1024}, batch={"per_worker": 16, "accumulation_steps": acc})
        doc["launcher"] = {k: v for k, v in doc["launcher"].items()
                           if k in ("np", "elastic", "controller", "threads_per_rank")}
        proc_fixed, fixed_dir, _ = _run(tmp_path, doc, f"fixed_join{np_}")
        assert proc_fixed.returncode == 0, (proc_fixed.stdout + proc_fixed.stderr)[-3000:]
        fixed[np_] = _final_keras(fixed_dir)
    params, momentum = _max_diff_keras(_final_keras(run_dir), fixed[1])
    # Keras's fixed runs on 1 rank (2 accumulation steps) and on 2 ranks already differ by 2e-4
    # here (|w| <= 2.9; float32 sums in another order, amplified over ~100 steps at lr 0.5): the
    # elastic run, which changes from the one to the other, must stay within that; a step that saw
    # other samples, or lost its momentum, differs by 1e-3 or more
    baseline, _ = _max_diff_keras(fixed[1], fixed[2])
    assert params <= 2 * baseline + 1e-5 and params < 1e-3 and momentum < 1e-6, (params, baseline, momentum)
    print(f"\nkeras elastic, worker joined at step {resets[0]['step']}: finished in {secs:.1f} s; vs fixed np=1: "
          f"params {params:.2e} (fixed np=1 vs np=2: {baseline:.2e}), momentum {momentum:.2e}")


@needs_horovodrun
@pytest.mark.multirank
def test_keras_elastic_state_and_changing_accumulation():
    from multirank import run_ranks
    out = run_ranks("ranks/keras_elastic_state.py", np=1)[0]
    assert float(out["diff"]) < 1e-6, float(out["diff"])       # 1 -> 2 accumulation steps = 2 throughout
    assert list(out["iterations"]) == [6, 6]
    assert out["moved"] and out["restored"] and int(out["step"]) == 6   # restore: variables and attributes
    assert str(out["refused"]) == ("ValueError: set_accumulation_steps: needs "
                                   "largebatch.keras.DistributedOptimizer(..., elastic=True)")
