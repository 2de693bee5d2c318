"""A run never writes over another run's files, whichever launcher started it: the runner's own
rule (``python -m largebatch.runner`` by hand, under horovodrun too), with rank 0 deciding for
every rank. (``largebatch run``'s side: tests/test_cli.py.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))
from multirank import horovodrun_path  # noqa: E402

EXP = """
framework: torch
data: {kind: synthetic, samples: 64, val_samples: 0, image_size: 8}
batch: {per_worker: 8}
train: {steps: 4, log_every: 2}
output: {dir: runs, progress: false, checkpoint_every: 0}
launcher: {threads_per_rank: 1}
"""


def _env():
    env = dict(os.environ)
    env.update({"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
                "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                "OMPI_MCA_btl_vader_single_copy_mechanism": "none"})
    env.pop("LARGEBATCH_FAULT", None)
    return env


def runner(tmp_path, *overrides, np_=1):
    exp = tmp_path / "exp.yaml"
    exp.write_text(EXP)
    cmd = [sys.executable, "-m", "largebatch.runner", str(exp), *overrides]
    if np_ > 1:
        cmd = [horovodrun_path(), "-np", str(np_), "-H", f"localhost:{np_}"] + cmd
    return subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=180)


def fake_run(folder):
    """A finished run's files (what must not be overwritten)."""
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text('{"status": "completed", "name": "the old run"}\n')
    (folder / "metrics.csv").write_text("kind,step\ntrain,1\n")
    (folder / "tensorboard").mkdir()
    (folder / "tensorboard" / "events.out.tfevents.1.host.1.0").write_bytes(b"old events")
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def contents(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def refusal(run_dir, found="summary.json"):
    return (f"output.run_dir: {run_dir} holds another run ({found}); give this run a fresh output.run_dir, "
            f"or set train.resume=auto (or train.resume=PATH) to continue that one")


def test_the_default_run_dir_taken_the_runner_picks_the_next(tmp_path):
    old = fake_run(tmp_path / "runs" / "exp")
    fake_run(tmp_path / "runs" / "exp-2")
    proc = runner(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"largebatch: {tmp_path / 'runs' / 'exp'} holds another run (summary.json); this run writes to "
            f"{tmp_path / 'runs' / 'exp-3'}") in proc.stderr
    assert contents(tmp_path / "runs" / "exp") == old
    summary = json.loads((tmp_path / "runs" / "exp-3" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps_done"] == 4
    assert f"run dir: {tmp_path / 'runs' / 'exp-3'} (completed" in proc.stdout


def test_an_explicit_run_dir_holding_a_run_is_refused_by_the_runner(tmp_path):
    old = fake_run(tmp_path / "r")
    proc = runner(tmp_path, "output.run_dir=r")
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == refusal(tmp_path / "r")
    assert "Traceback" not in proc.stderr
    assert contents(tmp_path / "r") == old
    # what shows a run: metrics, checkpoints or event files alone are enough
    (tmp_path / "r" / "summary.json").unlink()
    proc = runner(tmp_path, "output.run_dir=r")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == refusal(tmp_path / "r", "metrics.csv")


def test_a_folder_without_a_run_is_used(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "launch.sh").write_text("#!/bin/sh\n")          # what largebatch run leaves before launching
    (tmp_path / "r" / "slurm-12.out").write_text("")                  # and largebatch sbatch's job
    proc = runner(tmp_path, "output.run_dir=r")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["status"] == "completed"


@pytest.mark.multirank
@pytest.mark.skipif(horovodrun_path() is None, reason="horovodrun not installed")
def test_two_ranks_follow_rank_0(tmp_path):
    old = fake_run(tmp_path / "r")
    proc = runner(tmp_path, "output.run_dir=r", np_=2)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    assert proc.stderr.count(refusal(tmp_path / "r")) == 1, proc.stderr[-3000:]     # said once, by rank 0
    assert "Traceback" not in proc.stderr
    assert contents(tmp_path / "r") == old
    fake_run(tmp_path / "runs" / "exp")
    proc = runner(tmp_path, np_=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "exp-2" / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["ranks_agree"] is True
    assert not (tmp_path / "runs" / "exp-3").exists()                # one directory, chosen once
