"""train.precision under horovodrun -np 2, torch and Keras: bfloat16 or float16 compute (float16
with dynamic loss scaling whose inf-skips are not divergence: torch's GradScaler after the
allreduce, Keras's LossScaleOptimizer inside largebatch.keras.DistributedOptimizer); weights
stay float32 and agree across ranks; 2 ranks equal one process on the concatenated batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from largebatch.config import ConfigError, load
from multirank import run_ranks

ROOT = Path(__file__).resolve().parent.parent
LARGEBATCH = str(Path(sys.executable).with_name("largebatch"))


def _run(tmp_path, precision, framework="torch"):
    run_dir = tmp_path / f"{framework}-{precision}"
    proc = subprocess.run([LARGEBATCH, "run", f"examples/synthetic_{framework}.yaml", "--np", "2", "data.samples=256",
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


@pytest.mark.multirank
def test_keras_bf16_and_fp16_runs_on_two_ranks_with_float32_weights(tmp_path):
    fp32, bf16, fp16 = (_run(tmp_path, p, "keras") for p in ("fp32", "bf16", "fp16"))
    for s in (bf16, fp16):
        assert s["status"] == "completed" and s["ranks_agree"] is True
        assert s["weights_sha1"] != fp32["weights_sha1"]
        assert abs(s["final_train_loss"] - fp32["final_train_loss"]) < 0.3, (s["final_train_loss"], fp32["final_train_loss"])
    assert fp16["loss_scale_skips"] >= 0 and "loss_scale_skips" not in bf16


def _rel(a, b):
    return max(float(np.max(np.abs(a[f"w{i}"] - b[f"w{i}"])) / np.max(np.abs(b[f"w{i}"]))) for i in range(4))


@pytest.mark.multirank
def test_keras_mixed_precision_two_ranks_equal_one_process_and_skip_together():
    """DistributedOptimizer(LossScaleOptimizer(LARS)) under mixed_float16 and LARS under
    mixed_bfloat16, with different data on each rank, against one process on the concatenated
    batches and against float32. A NaN in rank 1's gradient alone at update 2: both ranks skip
    it, halve the scale and still count the update."""
    fp32 = run_ranks("ranks/keras_mixed.py", "float32", np=1)[0]
    for policy, tol_one, tol_fp32 in (("mixed_float16", 5e-3, 1e-2), ("mixed_bfloat16", 5e-2, 5e-2)):
        two, one = run_ranks("ranks/keras_mixed.py", policy, np=2), run_ranks("ranks/keras_mixed.py", policy, np=1)[0]
        assert all(np.array_equal(two[0][f"w{i}"], two[1][f"w{i}"]) for i in range(4)), policy
        assert list(two[0]["dtypes"]) == ["float32"] * 4 and str(two[0]["compute_dtype"]) == policy.split("_")[1]
        assert 0 < _rel(two[0], one) < tol_one, (policy, _rel(two[0], one))
        assert 0 < _rel(two[0], fp32) < tol_fp32, (policy, _rel(two[0], fp32))
        # trust ratios from float32 weights and unscaled gradients: those of float32
        np.testing.assert_allclose(two[0]["ratios"], fp32["ratios"], rtol=1e-2)
        assert two[0]["iterations"] == fp32["iterations"] == 6 and two[0]["skips"] == 0
    nan = run_ranks("ranks/keras_mixed.py", "mixed_float16", "2", np=2)
    for r in nan:
        assert (r["iterations"], r["skips"], r["scale"]) == (6, 1, 2.0 ** 9)     # 2^10 halved once
        assert all(np.isfinite(r[f"w{i}"]).all() for i in range(4))
    assert all(np.array_equal(nan[0][f"w{i}"], nan[1][f"w{i}"]) for i in range(4))
    assert [r["applied"] for r in nan] == [5, 5]


@pytest.mark.multirank
def test_keras_lamb_bias_correction_counts_only_applied_updates_under_loss_scaling():
    """A loss-scale skip advances iterations (the schedule's step) but applies nothing: LAMB's
    bias correction then counts 5 of the 6 updates, as torch's LAMB does under a GradScaler."""
    for r in run_ranks("ranks/keras_mixed.py", "mixed_float16", "2", np=2, env={"LB_TEST_OPTIMIZER": "lamb"}):
        assert (r["iterations"], r["skips"], r["applied"]) == (6, 1, 5)
        assert all(np.isfinite(r[f"w{i}"]).all() for i in range(4))


@pytest.mark.multirank
def test_keras_loss_scale_outside_the_distributed_optimizer_is_refused_in_one_line():
    out = run_ranks("ranks/keras_mixed.py", "refuse", np=1)[0]
    assert str(out["outer_type"]) == "LossScaleOptimizer"
    assert str(out["outer"]) == (
        "ValueError: optimizer: a LossScaleOptimizer around largebatch.keras.DistributedOptimizer checks each "
        "rank's gradients for inf before the allreduce (ranks could disagree and hang); put it inside: "
        "DistributedOptimizer(keras.optimizers.LossScaleOptimizer(opt))")
    assert str(out["clars"]).startswith("ValueError: optimizer: CLARS inside a LossScaleOptimizer under "
                                        "DistributedOptimizer is not supported")


def test_keras_fp16_clars_is_one_line():
    with pytest.raises(ConfigError) as err:
        load(str(ROOT / "examples" / "synthetic_keras.yaml"), ["train.precision=fp16", "optimizer.name=clars"])
    assert err.value.problems == ["train.precision: 'fp16' is not supported with optimizer 'clars' for framework "
                                  "'keras' (its per-example norms would not be added over ranks under a loss-scale "
                                  "optimizer); expected 'fp32' or 'bf16'"]
    for precision in ("bf16", "fp16"):
        assert load(str(ROOT / "examples" / "synthetic_keras.yaml"), [f"train.precision={precision}"])


def test_an_unknown_precision_is_one_line():
    with pytest.raises(ConfigError) as err:
        load(str(ROOT / "examples" / "synthetic_torch.yaml"), ["train.precision=fp8"])
    assert err.value.problems[0].startswith("train.precision: expected one of 'fp32', 'bf16', 'fp16', got 'fp8'")
