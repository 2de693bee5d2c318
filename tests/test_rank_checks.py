"""The runner's rank-consistency check (train.check_ranks_every), both frameworks, under
horovodrun -np 2: a rank whose weights drift (LARGEBATCH_FAULT=drift) stops the run non-zero,
naming the first tensor that differs and the step; healthy ranks pass the same checks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multirank

ROOT = Path(__file__).resolve().parent.parent
LARGEBATCH = str(Path(sys.executable).with_name("largebatch"))


def _run(tmp_path, framework, fault=None):
    env = dict(os.environ)
    env.pop("LARGEBATCH_FAULT", None)
    if fault:
        env["LARGEBATCH_FAULT"] = fault
    run_dir = tmp_path / "run"
    proc = subprocess.run([LARGEBATCH, "run", f"examples/synthetic_{framework}.yaml", "--np", "2",
                           "data.samples=256", "data.val_samples=64", "train.epochs=1", "output.progress=false",
                           "launcher.threads_per_rank=1", "train.check_ranks_every=2", f"output.run_dir={run_dir}"],
                          cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=180)
    return proc, json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_a_drifting_rank_stops_the_run_naming_the_tensor_and_the_step(tmp_path, framework):
    proc, summary = _run(tmp_path, framework, fault="drift:1:3")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert summary["status"] == "ranks_diverged" and summary["steps_done"] == 4
    lines = [l for l in (proc.stdout + proc.stderr).splitlines() if "ranks' weights differ" in l]
    assert lines and "ranks' weights differ at step 4: sum of '" in lines[0], lines
    assert "on rank 1; the ranks are training different models" in lines[0]


def test_healthy_ranks_pass_the_checks(tmp_path):
    proc, summary = _run(tmp_path, "torch")
    assert proc.returncode == 0 and summary["status"] == "completed" and summary["ranks_agree"] is True
