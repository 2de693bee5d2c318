"""train.label_smoothing in both runners: it changes training (the loss is computed against
smoothed targets), 0 leaves it as it was, and a value outside [0, 1) is one line, exit 2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

EXP = """
framework: FRAMEWORK
data: {kind: synthetic, samples: 64, val_samples: 0, image_size: 8}
batch: {per_worker: 16}
optimizer: lars
train: {steps: 4, log_every: 2}
output: {dir: runs, progress: false, checkpoint_every: 0, tensorboard: false}
launcher: {threads_per_rank: 1}
"""


def _env():
    env = dict(os.environ)
    env.update({"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
                "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    env.pop("LARGEBATCH_FAULT", None)
    return env


def run(tmp_path, framework, *overrides):
    exp = tmp_path / "exp.yaml"
    exp.write_text(EXP.replace("FRAMEWORK", framework))
    return subprocess.run([sys.executable, "-m", "largebatch.runner", str(exp), *overrides], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_label_smoothing_changes_the_run(tmp_path, framework):
    summaries = {}
    for value in (0, 0.1):
        proc = run(tmp_path, framework, f"train.label_smoothing={value}", f"output.run_dir=ls{value}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        summaries[value] = json.loads((tmp_path / f"ls{value}" / "summary.json").read_text())
    plain, smooth = summaries[0], summaries[0.1]
    assert plain["steps_done"] == smooth["steps_done"] == 4
    assert plain["weights_sha1"] != smooth["weights_sha1"]
    assert plain["final_train_loss"] != smooth["final_train_loss"]
    config = (tmp_path / "ls0.1" / "config.yaml").read_text()
    assert "label_smoothing: 0.1" in config


def test_both_frameworks_smooth_the_same_way():
    """torch's CrossEntropyLoss(label_smoothing) and the Keras runner's loss give the same number."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("keras")
    import keras
    from largebatch.runner.keras_train import training_loss
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(8, 10)).astype(np.float32), rng.integers(0, 10, size=8)
    for eps in (0.0, 0.1, 0.5):
        want = float(torch.nn.CrossEntropyLoss(label_smoothing=eps)(torch.from_numpy(logits), torch.from_numpy(labels)))
        got = float(keras.ops.mean(training_loss({"train": {"label_smoothing": eps}}, 10)(labels, logits)))
        assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("value, shown", [("1", "1.0"), ("-0.1", "-0.1"), ("lots", "'lots'")])
def test_out_of_range_is_one_line_exit_2(tmp_path, value, shown):
    proc = run(tmp_path, "torch", f"train.label_smoothing={value}")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"train.label_smoothing: expected a number in [0, 1), got {shown}"]
    assert not (tmp_path / "runs").exists()
    (tmp_path / "exp.yaml").write_text(EXP.replace("FRAMEWORK", "keras"))
    proc = subprocess.run([sys.executable, "-m", "largebatch.launchers.cli", "validate", str(tmp_path / "exp.yaml"),
                           f"train.label_smoothing={value}"], env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"train.label_smoothing: expected a number in [0, 1), got {shown}\n"
