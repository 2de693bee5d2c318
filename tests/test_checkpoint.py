"""Checkpoints: atomic format and integrity checks (core), torch save/load round trip, exact resume
through the runner (single process and horovodrun -np 2), bad checkpoints refused with exit 2."""
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from largebatch import checkpoint as core

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from multirank import horovodrun_path  # noqa: E402

EXP = """
framework: torch
model: small_cnn
data: {kind: synthetic, samples: 128, val_samples: 32, image_size: 8}
batch: {per_worker: 16, accumulation_steps: 2}
optimizer: {name: OPT, momentum: 0.9, weight_decay: 5.0e-4, trust_coefficient: 0.02}
schedule: {base_lr: 0.5, base_batch: 32, warmup: gradual, warmup_epochs: 0.5, decay: poly, power: 2}
train: {epochs: 3, log_every: 1, eval: false}
output: {dir: runs, progress: false, tensorboard: false}
launcher: {threads_per_rank: 1}
"""
LAMB_EXP = EXP.replace("{name: OPT, momentum: 0.9, weight_decay: 5.0e-4, trust_coefficient: 0.02}",
                       "{name: lamb, weight_decay: 0.01}").replace("base_lr: 0.5", "base_lr: 0.01")


def _env():
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
                "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))})
    env.pop("LARGEBATCH_FAULT", None)
    return env


def run_runner(tmp_path, exp_text, *overrides, np_=1, fault=None, timeout=180):
    """The runner on ``exp_text`` in ``tmp_path`` (under horovodrun for np_ > 1), optionally with
    ``LARGEBATCH_FAULT=fault``."""
    exp = Path(tmp_path) / "exp.yaml"
    exp.write_text(exp_text)
    cmd = [sys.executable, "-m", "largebatch.runner", str(exp), *overrides]
    if np_ > 1:
        cmd = [horovodrun_path(), "-np", str(np_), "-H", f"localhost:{np_}"] + cmd
    env = _env()
    if fault:
        env["LARGEBATCH_FAULT"] = fault
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def load_payload(path):
    import torch
    _, payload = core.read(path)
    return torch.load(io.BytesIO(payload), weights_only=True)


def max_diff(a, b):
    import torch
    if isinstance(a, torch.Tensor):
        return float((a.double() - b.double()).abs().max()) if a.numel() and a.is_floating_point() else \
            float(not torch.equal(a, b))
    if isinstance(a, dict):
        assert set(a) == set(b)
        return max([max_diff(a[k], b[k]) for k in a] + [0.0])
    return 0.0


# ------------------------------------------------------------------------------ core format
def test_write_read_round_trip_and_manifest(tmp_path):
    p = tmp_path / "c" / "epoch-0001.pt"
    core.write(str(p), b"hello payload", {"framework": "torch", "step": 3})
    manifest, payload = core.read(str(p))
    assert payload == b"hello payload" and manifest["step"] == 3 and manifest["payload_bytes"] == 13
    assert [n for n in os.listdir(p.parent)] == ["epoch-0001.pt"]         # no temp file left behind


@pytest.mark.parametrize("damage, expected", [
    (lambda b: b[:len(b) - 5], "truncated (payload has"),
    (lambda b: b[:6], "truncated (6 bytes"),
    (lambda b: b[:20], "truncated (manifest cut short)"),
    (lambda b: b[:-3] + b"xyz", "corrupted (payload SHA-256 does not match the manifest)"),
    (lambda b: b"PK\x03\x04" + b[4:], "not a largebatch checkpoint (bad header)"),
    (lambda b: b + b"junk", "corrupted (4 bytes after the payload)"),
])
def test_damaged_files_are_refused_with_one_line(tmp_path, damage, expected):
    p = tmp_path / "epoch-0001.pt"
    core.write(str(p), b"x" * 100, {"framework": "torch"})
    p.write_bytes(damage(p.read_bytes()))
    with pytest.raises(core.CheckpointError) as err:
        core.read(str(p))
    assert expected in str(err.value) and str(p) in str(err.value) and "\n" not in str(err.value)


def test_missing_and_folder(tmp_path):
    with pytest.raises(core.CheckpointError, match="no such file"):
        core.read(str(tmp_path / "nope.pt"))
    with pytest.raises(core.CheckpointError, match="expected a file, got a folder"):
        core.read(str(tmp_path))


def test_keep_last_k_and_latest(tmp_path):
    for e in range(1, 6):
        core.write(str(tmp_path / core.checkpoint_name(e)), b"p", {"framework": "torch"})
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    removed = core.prune(str(tmp_path), 2)
    assert len(removed) == 3
    assert sorted(os.listdir(tmp_path)) == ["epoch-0004.pt", "epoch-0005.pt", "notes.txt"]
    assert core.latest(str(tmp_path)).endswith("epoch-0005.pt")
    assert core.prune(str(tmp_path), 0) == [] and core.latest(str(tmp_path / "none")) is None


def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "epoch-0001.pt"
    core.write(str(p), b"old", {"framework": "torch"})

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        core.write(str(p), b"new", {"framework": "torch"})
    assert core.read(str(p))[1] == b"old" and os.listdir(tmp_path) == ["epoch-0001.pt"]


def test_config_hash_ignores_output_and_launcher():
    a = {"model": {"name": "m"}, "train": {"seed": 0, "epochs": 1, "resume": "none"}, "output": {"dir": "a"}}
    b = {"model": {"name": "m"}, "train": {"seed": 0, "epochs": 5, "resume": "auto"}, "output": {"dir": "b"}}
    c = {"model": {"name": "m"}, "train": {"seed": 1, "epochs": 1}, "output": {"dir": "a"}}
    assert core.config_hash(a) == core.config_hash(b) != core.config_hash(c)


# ------------------------------------------------------------------------------ torch
def test_torch_save_load_restores_model_optimizer_and_rng(tmp_path):
    import random
    import torch
    from largebatch.torch import LAMB, load_checkpoint, save_checkpoint
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = LAMB(model.parameters(), lr=0.01, weight_decay=0.01)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step()
    path = str(tmp_path / "epoch-0001.pt")
    save_checkpoint(path, model, opt, step=2, epoch=1, extra={"last_lr": 0.5}, config={"a": 1})
    expect = (torch.rand(3), np.random.rand(), random.random())
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt2 = LAMB(model2.parameters(), lr=0.01, weight_decay=0.01)
    info = load_checkpoint(path, model2, opt2)
    assert info["step"] == 2 and info["extra"] == {"last_lr": 0.5} and info["config"] == {"a": 1}
    assert max_diff(model.state_dict(), model2.state_dict()) == 0.0
    assert max_diff(opt.state_dict()["state"], opt2.state_dict()["state"]) == 0.0   # LAMB moments, step
    got = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(expect[0], got[0]) and expect[1] == got[1] and expect[2] == got[2]


def test_torch_checkpoint_of_another_model_is_refused(tmp_path):
    import torch
    from largebatch.torch import load_checkpoint, save_checkpoint
    path = str(tmp_path / "epoch-0001.pt")
    save_checkpoint(path, torch.nn.Linear(4, 3), None, step=1, epoch=1, model_name="a")
    other = torch.nn.Linear(4, 5)
    before = other.weight.detach().clone()
    with pytest.raises(core.CheckpointError, match="from another model"):
        load_checkpoint(path, other)
    assert torch.equal(other.weight, before)


# ------------------------------------------------------------------------------ exact resume (runner)
def _resume_case(tmp_path, exp_text, np_):
    full = run_runner(tmp_path, exp_text, "output.run_dir=full", np_=np_)
    assert full.returncode == 0, (full.stdout + full.stderr)[-3000:]
    ck = tmp_path / "resumed" / "checkpoints"
    ck.mkdir(parents=True)
    shutil.copy(tmp_path / "full" / "checkpoints" / "epoch-0001.pt", ck)
    res = run_runner(tmp_path, exp_text, "output.run_dir=resumed", "train.resume=auto", np_=np_)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "resumed from" in res.stderr
    a = load_payload(tmp_path / "full" / "checkpoints" / "epoch-0003.pt")
    b = load_payload(tmp_path / "resumed" / "checkpoints" / "epoch-0003.pt")
    assert a["step"] == b["step"] > 0
    diff_model, diff_opt = max_diff(a["model"], b["model"]), max_diff(a["optimizer"]["state"], b["optimizer"]["state"])
    print(f"resume np={np_}: max abs diff params {diff_model:.3g}, optimizer state {diff_opt:.3g}")
    assert diff_model <= 1e-6 and diff_opt <= 1e-6


@pytest.mark.parametrize("opt", ["lars", "lamb"])
def test_resumed_run_follows_the_uninterrupted_one_single_process(tmp_path, opt):
    _resume_case(tmp_path, EXP.replace("OPT", "lars") if opt == "lars" else LAMB_EXP, 1)


@pytest.mark.multirank
@pytest.mark.skipif(horovodrun_path() is None, reason="horovodrun not installed")
def test_resumed_run_follows_the_uninterrupted_one_on_two_ranks(tmp_path):
    _resume_case(tmp_path, EXP.replace("OPT", "lars"), 2)


def test_keep_last_k_in_the_runner(tmp_path):
    proc = run_runner(tmp_path, EXP.replace("OPT", "lars"), "output.run_dir=r", "output.checkpoint_keep=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "r" / "checkpoints")) == ["epoch-0002.pt", "epoch-0003.pt"]


# ------------------------------------------------------------------------------ bad checkpoints (runner)
def _bad_resume(tmp_path, make_bad, expected):
    exp_text = EXP.replace("OPT", "lars").replace("epochs: 3", "epochs: 1")
    ok = run_runner(tmp_path, exp_text, "output.run_dir=r")
    assert ok.returncode == 0, ok.stderr[-2000:]
    ck = tmp_path / "r" / "checkpoints" / "epoch-0001.pt"
    make_bad(ck, tmp_path)
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file()}
    proc = run_runner(tmp_path, exp_text, "output.run_dir=r", f"train.resume={ck}")
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("train.resume: checkpoint ") and expected in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    after = {p.name: p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file()}
    assert after == before                                  # nothing overwritten


def test_truncated_checkpoint_exit_2(tmp_path):
    _bad_resume(tmp_path, lambda ck, _: ck.write_bytes(ck.read_bytes()[:-100]), "truncated")


def test_corrupted_checkpoint_exit_2(tmp_path):
    def flip(ck, _):
        b = bytearray(ck.read_bytes())
        b[-50] ^= 0xFF
        ck.write_bytes(bytes(b))
    _bad_resume(tmp_path, flip, "corrupted")


def test_checkpoint_of_another_model_exit_2(tmp_path):
    def other(ck, tmp):
        import torch
        from largebatch.torch import save_checkpoint
        save_checkpoint(str(ck), torch.nn.Linear(3, 3), None, step=1, epoch=1, model_name="linear")
    _bad_resume(tmp_path, other, "from another model")


def test_unreadable_resume_path_is_a_config_error(tmp_path):
    proc = run_runner(tmp_path, EXP.replace("OPT", "lars"), f"train.resume={tmp_path / 'missing.pt'}")
    assert proc.returncode == 2 and "train.resume:" in proc.stderr and "no such file" in proc.stderr


def test_resume_from_a_checkpoint_that_ends_mid_epoch(tmp_path):
    """train.steps ending inside an epoch writes a final checkpoint there; resuming it with more
    steps continues inside that epoch (constant lr, so the schedule does not depend on the total)."""
    exp_text = (EXP.replace("OPT", "lars").replace("decay: poly, power: 2", "decay: none")
                .replace("epochs: 3", "steps: 12"))
    full = run_runner(tmp_path, exp_text, "output.run_dir=full")
    assert full.returncode == 0, full.stderr[-2000:]
    part = run_runner(tmp_path, exp_text, "output.run_dir=part", "train.steps=10")
    assert part.returncode == 0, part.stderr[-2000:]
    assert load_payload(tmp_path / "part" / "checkpoints" / "epoch-0003.pt")["step"] == 10
    res = run_runner(tmp_path, exp_text, "output.run_dir=part", "train.resume=auto")
    assert res.returncode == 0 and "at step 10 (epoch 3, 2 of its 4 steps done)" in res.stderr, res.stderr[-2000:]
    a = load_payload(tmp_path / "full" / "checkpoints" / "epoch-0003.pt")
    b = load_payload(tmp_path / "part" / "checkpoints" / "epoch-0003.pt")
    assert a["step"] == b["step"] == 12
    assert max_diff(a["model"], b["model"]) <= 1e-6 and max_diff(a["optimizer"]["state"], b["optimizer"]["state"]) <= 1e-6
    rows = (tmp_path / "part" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("kind,") and sum(r.startswith("kind,") for r in rows) == 1   # appended
    assert len([r for r in rows if r.startswith("train,")]) == 12
