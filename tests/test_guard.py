"""Non-finite guard: one reduced flag per step, the first offending layer named after it trips,
skip or stop in the runner, agreement across ranks."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from largebatch.torch import LARS, NonFiniteGuard
from largebatch.torch.guard import first_nonfinite, nonfinite_flag

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multirank import horovodrun_path, run_ranks  # noqa: E402
from test_checkpoint import EXP, run_runner  # noqa: E402


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))


def test_flag_is_one_tensor_and_finite_grads_pass():
    m = _model()
    m(torch.randn(5, 4)).sum().backward()
    f = nonfinite_flag([p.grad for p in m.parameters()])
    assert isinstance(f, torch.Tensor) and f.dim() == 0 and float(f) == 0.0
    assert NonFiniteGuard(m).check(1) is None


@pytest.mark.parametrize("value, kind", [(float("nan"), "nan"), (float("inf"), "inf")])
def test_injected_value_names_the_first_offending_layer_and_step(value, kind):
    m = _model()
    m(torch.randn(5, 4)).sum().backward()
    m[1].weight.grad[0, 1] = value
    m[2].weight.grad[0, 0] = value
    bad = NonFiniteGuard(m).check(17)
    assert bad is not None and bad.layer == "1.weight" and bad.step == 17 and bad.value == kind
    assert bad.message == f"step 17: non-finite gradient ({kind}) in layer '1.weight'"


def test_trust_ratio_included_when_tracked():
    m = _model()
    opt = LARS(m.parameters(), lr=0.1, track_trust_ratios=True)
    m(torch.randn(5, 4)).sum().backward()
    opt.step()
    opt.state[m[2].weight]["trust_ratio"].fill_(float("nan"))
    g = NonFiniteGuard(m, opt)
    assert g.check(3) is None                              # gradients only
    bad = g.check(3, include_ratios=True)
    assert bad.kind == "trust ratio" and bad.layer == "2.weight"
    assert first_nonfinite([("a", torch.ones(2))]) is None




def _run_with_fault(tmp_path, fault, *overrides):
    import subprocess
    from test_checkpoint import _env
    exp = tmp_path / "exp.yaml"
    exp.write_text(EXP.replace("OPT", "lars"))
    env = _env()
    env["LARGEBATCH_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "largebatch.runner", str(exp), *overrides], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)


def test_runner_stops_on_nan_gradient(tmp_path):
    proc = _run_with_fault(tmp_path, "nan:0:3:features.4.weight", "output.run_dir=r")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert ("largebatch: step 3: non-finite gradient (nan) in layer 'features.4.weight'; stopping "
            "(train.on_nonfinite=stop)") in proc.stderr
    import json
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "nonfinite" and summary["steps_done"] == 3


def test_runner_skips_nan_step_and_continues(tmp_path):
    proc = _run_with_fault(tmp_path, "nan:0:3:features.4.weight", "output.run_dir=r", "train.on_nonfinite=skip")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step 3: non-finite gradient (nan) in layer 'features.4.weight'; step skipped" in proc.stderr
    import json
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["skipped_steps"] == 1
    assert summary["final_train_loss"] is not None and np.isfinite(summary["final_train_loss"])


@pytest.mark.multirank
@pytest.mark.skipif(horovodrun_path() is None, reason="horovodrun not installed")
def test_guard_agrees_across_two_ranks():
    r0, r1 = run_ranks("ranks/fail_nan_guard.py", np=2, timeout=120)
    assert list(r0["bad_steps"]) == list(r1["bad_steps"]) == [2]
    assert all(r0["layer_is_named"]) and all(r1["layer_is_named"])
    assert np.array_equal(r0["w"], r1["w"]) and np.isfinite(r0["w"]).all()
