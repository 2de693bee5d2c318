"""train.precision for torch runs under horovodrun -np 2: autocast to bfloat16 or float16 (with a
GradScaler whose inf-skips are not divergence); weights stay float32 and agree across ranks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from largebatch.config import ConfigError, load

ROOT = Path(__file__).resolve().parent.parent
LARGEBATCH = str(Path(sys.executable).with_name("largebatch"))


def _run(tmp_path, precision):
    run_dir = tmp_path / precision
    proc = subprocess.run([LARGEBATCH, "run", "examples/synthetic_torch.yaml", "--np", "2", "data.samples=256",
                           "data.val_samples=64", "train.epochs=2", "output.progress=false",
                           "launcher.threads_per_rank=1", f"train.precision={precision}",
                           f"output.run_dir={run_dir}"], cwd=str(ROOT), env=dict(os.environ), capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.multirank
def test_bf16_and_fp16_train_on_two_ranks_with_float32_weights(tmp_path):
    fp32, bf16, fp16 = (_run(tmp_path, p) for p in ("fp32", "bf16", "fp16"))
    for s in (bf16, fp16):
        assert s["status"] == "completed" and s["ranks_agree"] is True
        assert s["weights_sha1"] != fp32["weights_sha1"]             # it trained, in low precision
        assert abs(s["final_train_loss"] - fp32["final_train_loss"]) < 0.3, (s["final_train_loss"], fp32["final_train_loss"])
    assert fp16["loss_scale_skips"] >= 0 and "loss_scale_skips" not in bf16


def test_low_precision_for_keras_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        load(str(ROOT / "examples" / "synthetic_keras.yaml"), ["train.precision=fp16"])
    assert err.value.problems == ["train.precision: 'fp16' is not supported for framework 'keras' yet (Keras's "
                                  "loss-scale optimizer checks for inf before our allreduce); expected 'fp32'"]
    with pytest.raises(ConfigError) as err:
        load(str(ROOT / "examples" / "synthetic_torch.yaml"), ["train.precision=fp8"])
    assert err.value.problems[0].startswith("train.precision: expected one of 'fp32', 'bf16', 'fp16', got 'fp8'")
