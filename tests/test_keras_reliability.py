"""Keras reliability: checkpoints (save/load round trip, exact resume through the runner in one
process and under horovodrun -np 2), the in-graph non-finite guard (skip leaves the state
untouched; the runner stops or skips and names the layer) and bad checkpoints refused with exit 2.

Runner runs are small (8x8 synthetic images, 12 updates); the uninterrupted LARS run is shared
by the resume and the bad-checkpoint tests (module fixture).
"""
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("keras")
pytest.importorskip("horovod.tensorflow")

from largebatch import checkpoint as core  # noqa: E402
from largebatch.runner.faults import inject_keras_nan  # noqa: E402

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from multirank import horovodrun_path  # noqa: E402
from ranks import keras_common as kc  # noqa: E402
from test_checkpoint import EXP as CKPT_EXP  # noqa: E402
from test_checkpoint import run_runner as _run_runner  # noqa: E402

# the torch checkpoint tests' experiment, on Keras with LARS
EXP = CKPT_EXP.replace("framework: torch", "framework: keras").replace("OPT", "lars")
# LAMB, constant lr after warm-up (the schedule does not depend on the length of training, so a
# run cut at step 10 can be resumed to step 12 and compared with a 12-step run)
LAMB_EXP = (EXP.replace("{name: lars, momentum: 0.9, weight_decay: 5.0e-4, trust_coefficient: 0.02}",
                        "{name: lamb, weight_decay: 0.01}")
            .replace("base_lr: 0.5", "base_lr: 0.01").replace("decay: poly, power: 2", "decay: none")
            .replace("epochs: 3", "steps: 12"))


def run_runner(cwd, exp_text, *overrides, timeout=240, **options):
    """test_checkpoint.run_runner with the longer timeout TensorFlow's start-up needs."""
    return _run_runner(cwd, exp_text, *overrides, timeout=timeout, **options)


def load_payload(path):
    manifest, payload = core.read(str(path))
    with np.load(io.BytesIO(payload), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return manifest, json.loads(bytes(arrays.pop("meta")).decode()), arrays


def max_diffs(a, b):
    """(max |Δ| over model variables, over optimizer variables) of two payloads' arrays."""
    assert sorted(a) == sorted(b)

    def diff(prefix):
        out = 0.0
        for k in a:
            if k.startswith(prefix) and a[k].size:
                out = max(out, float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))))
        return out
    return diff("model/"), diff("optimizer/")


def _ok(proc):
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc


@pytest.fixture(scope="module")
def lars_full(tmp_path_factory):
    """The uninterrupted 3-epoch LARS run (checkpoints epoch-0001..0003.ckpt)."""
    root = tmp_path_factory.mktemp("keras_full")
    _ok(run_runner(root, EXP, "output.run_dir=full"))
    return root / "full"


# ------------------------------------------------------------------------------ in-process API
@pytest.fixture(scope="module")
def hvd():
    import horovod.tensorflow as hvd
    kc.single_thread()
    hvd.init()
    return hvd


def _fit(model, optimizer, epochs=1):
    x, y = kc.data()
    kc.compile_model(model, optimizer)
    model.fit(x, y, batch_size=kc.GLOBAL_BATCH, epochs=epochs, shuffle=False, verbose=0)


def test_save_load_round_trip_restores_variables_optimizer_and_rng(tmp_path, hvd):
    import random
    import largebatch.keras as lbk
    model, opt = kc.tiny_model(), lbk.DistributedOptimizer(kc.lamb(), nonfinite_guard=True)
    _fit(model, opt)
    path = tmp_path / core.checkpoint_name(1, "keras")
    assert path.name == "epoch-0001.ckpt"
    lbk.save_checkpoint(str(path), model, opt, step=3, epoch=1, extra={"last_lr": 0.5}, config={"a": [1, 2]},
                        model_name="tiny")
    expect = (np.random.rand(), random.random())
    model2, opt2 = kc.tiny_model(weights_seed=5), lbk.DistributedOptimizer(kc.lamb(), nonfinite_guard=True)
    info = lbk.load_checkpoint(str(path), model2, opt2)              # builds opt2 first
    assert info["step"] == 3 and info["epoch"] == 1 and info["extra"] == {"last_lr": 0.5}
    assert info["config"] == {"a": [1, 2]} and info["manifest"]["framework"] == "keras"
    for a, b in zip(model.variables, model2.variables):
        assert np.array_equal(a.numpy(), b.numpy())
    assert len(opt.variables) == len(opt2.variables)
    for a, b in zip(opt.variables, opt2.variables):                  # iterations, LAMB moments, ...
        assert a.path == b.path and np.array_equal(a.numpy(), b.numpy())
    assert int(opt2.iterations.numpy()) == 3
    assert (np.random.rand(), random.random()) == expect
    assert core.latest(str(tmp_path)) == str(path)


def test_checkpoint_of_another_model_or_optimizer_is_refused_untouched(tmp_path, hvd):
    import keras
    import largebatch.keras as lbk
    path = str(tmp_path / "epoch-0001.ckpt")
    model, opt = kc.tiny_model(), lbk.DistributedOptimizer(kc.lars())
    lbk.save_checkpoint(path, model, opt, step=0, epoch=1, model_name="tiny")
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
    before = [v.numpy() for v in other.variables]
    with pytest.raises(core.CheckpointError, match="from another model") as err:
        lbk.load_checkpoint(path, other)
    assert "\n" not in str(err.value)
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, other.variables))
    same_model = kc.tiny_model(weights_seed=5)
    before = [v.numpy() for v in same_model.variables]
    with pytest.raises(core.CheckpointError, match="optimizer 'LARS', this run uses 'LAMB'"):
        lbk.load_checkpoint(path, same_model, lbk.DistributedOptimizer(kc.lamb()))
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, same_model.variables))


def test_guard_skips_the_update_and_leaves_the_state_untouched(hvd):
    """One NaN in the averaged gradients: weights, momentum, per-layer rates untouched, iterations
    advance (the schedule does), the skip is counted and the variable named; LAMB's bias
    correction then counts applied updates only."""
    import tensorflow as tf
    import largebatch.keras as lbk
    from largebatch.keras.callbacks import NonFiniteGuard
    model = kc.tiny_model()
    opt = lbk.DistributedOptimizer(kc.lamb(), nonfinite_guard=True)
    variables = model.trainable_variables
    grads = [tf.ones_like(v) * 0.1 for v in variables]
    opt.apply(grads, variables)
    state = [v.numpy().copy() for v in list(model.variables) + list(opt.variables)
             if "iteration" not in v.path and "lb_" not in v.path]
    bad = list(grads)
    bad[2] = tf.tensor_scatter_nd_update(grads[2], [[1, 1]], [float("inf")])
    bad[3] = tf.fill(grads[3].shape, float("nan"))
    opt.apply(bad, variables)
    after = [v.numpy() for v in list(model.variables) + list(opt.variables)
             if "iteration" not in v.path and "lb_" not in v.path]
    assert all(np.array_equal(a, b) for a, b in zip(state, after))
    assert int(opt.iterations.numpy()) == 2 and int(opt.skipped_updates().numpy()) == 1
    assert int(opt.applied_updates().numpy()) == 1
    found = NonFiniteGuard.describe(opt)
    assert found.message == "step 2: non-finite gradient (inf) in layer 'fc/kernel'"
    assert list(opt.nonfinite_codes().numpy()) == [0, 0, 2, 1]
    opt.apply(grads, variables)                                     # finite again: applied
    assert int(opt.applied_updates().numpy()) == 2 and list(opt.nonfinite_codes().numpy()) == [0, 0, 0, 0]
    assert not np.array_equal(model.variables[0].numpy(), state[0])


def test_guard_callback_in_fit_stops_with_the_layer_name(hvd):
    """Inside model.fit (the compiled train function): the injected NaN trips the flag at update 2."""
    import largebatch.keras as lbk
    from largebatch.keras.callbacks import NonFiniteGuard
    model, opt = kc.tiny_model(), lbk.DistributedOptimizer(kc.lars(), nonfinite_guard=True)
    inject_keras_nan(opt, 2, "conv/bias")
    lines = []
    guard = NonFiniteGuard("stop", log=lines.append)
    x, y = kc.data()
    kc.compile_model(model, opt)
    model.fit(x, y, batch_size=kc.GLOBAL_BATCH, epochs=2, shuffle=False, verbose=0, callbacks=[guard])
    assert lines == ["step 2: non-finite gradient (nan) in layer 'conv/bias'; stopping (train.on_nonfinite=stop)"]
    assert guard.stopped.layer == "conv/bias" and int(opt.iterations.numpy()) == 2
    with pytest.raises(ValueError, match="nonfinite_guard=True"):
        m2 = kc.tiny_model()
        kc.compile_model(m2, lbk.DistributedOptimizer(kc.lars()))
        m2.fit(x, y, batch_size=kc.GLOBAL_BATCH, epochs=1, verbose=0, callbacks=[NonFiniteGuard()])


# ------------------------------------------------------------------------------ exact resume (runner)
def _resume_and_compare(tmp_path, exp_text, full_dir, from_name, final_name, np_=1, *overrides):
    ck = tmp_path / "resumed" / "checkpoints"
    ck.mkdir(parents=True)
    shutil.copy(full_dir / "checkpoints" / from_name, ck)
    res = _ok(run_runner(tmp_path, exp_text, "output.run_dir=resumed", "train.resume=auto", *overrides, np_=np_))
    assert "resumed from" in res.stderr
    ma, meta_a, a = load_payload(full_dir / "checkpoints" / final_name)
    mb, meta_b, b = load_payload(tmp_path / "resumed" / "checkpoints" / final_name)
    assert ma["step"] == mb["step"] > 0 and ma["framework"] == "keras"
    diff_model, diff_opt = max_diffs(a, b)
    print(f"keras resume np={np_}: max abs diff params {diff_model:.3g}, optimizer state {diff_opt:.3g}")
    assert diff_model <= 1e-6 and diff_opt <= 1e-6
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from"].endswith(from_name)
    return res


def test_resumed_lars_run_follows_the_uninterrupted_one(tmp_path, lars_full):
    _resume_and_compare(tmp_path, EXP, lars_full, "epoch-0001.ckpt", "epoch-0003.ckpt")
    rows = (tmp_path / "resumed" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[1] for r in rows if r.startswith("train,")] == [str(s) for s in range(5, 13)]


def test_resumed_lamb_run_from_inside_an_epoch(tmp_path):
    """LAMB (moments, bias correction) and a checkpoint that ends inside an epoch (step 10 of 12,
    4 steps per epoch): the resumed run finishes that epoch, then the last one; metrics appended."""
    _ok(run_runner(tmp_path, LAMB_EXP, "output.run_dir=full"))
    _ok(run_runner(tmp_path, LAMB_EXP, "output.run_dir=part", "train.steps=10"))
    assert load_payload(tmp_path / "part" / "checkpoints" / "epoch-0003.ckpt")[0]["step"] == 10
    res = _ok(run_runner(tmp_path, LAMB_EXP, "output.run_dir=part", "train.resume=auto"))
    assert "at step 10 (epoch 3, 2 of its 4 steps done)" in res.stderr, res.stderr[-2000:]
    _, _, a = load_payload(tmp_path / "full" / "checkpoints" / "epoch-0003.ckpt")
    mb, _, b = load_payload(tmp_path / "part" / "checkpoints" / "epoch-0003.ckpt")
    diff_model, diff_opt = max_diffs(a, b)
    print(f"keras LAMB mid-epoch resume: max abs diff params {diff_model:.3g}, optimizer state {diff_opt:.3g}")
    assert mb["step"] == 12 and diff_model <= 1e-6 and diff_opt <= 1e-6
    rows = (tmp_path / "part" / "metrics.csv").read_text().splitlines()
    assert sum(r.startswith("kind,") for r in rows) == 1
    assert [r.split(",")[1] for r in rows if r.startswith("train,")] == [str(s) for s in range(1, 13)]


@pytest.mark.multirank
@pytest.mark.skipif(horovodrun_path() is None, reason="horovodrun not installed")
def test_resumed_lars_run_on_two_ranks(tmp_path):
    exp_text = EXP.replace("per_worker: 16", "per_worker: 8")          # same global batch (32)
    _ok(run_runner(tmp_path, exp_text, "output.run_dir=full", np_=2))
    _resume_and_compare(tmp_path, exp_text, tmp_path / "full", "epoch-0001.ckpt", "epoch-0003.ckpt", 2)


# ------------------------------------------------------------------------------ non-finite guard (runner)
def test_runner_stops_on_injected_nan_gradient(tmp_path):
    proc = run_runner(tmp_path, EXP, "output.run_dir=r", fault="nan:0:3:conv2/kernel")
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-2000:]
    assert ("largebatch: step 3: non-finite gradient (nan) in layer 'conv2/kernel'; stopping "
            "(train.on_nonfinite=stop)") in proc.stderr + proc.stdout
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "nonfinite" and summary["steps_done"] == 3 and summary["skipped_steps"] == 0
    assert not (tmp_path / "r" / "checkpoints").exists()              # nothing saved after the trip


def test_runner_skips_injected_nan_step_and_continues(tmp_path):
    proc = _ok(run_runner(tmp_path, EXP, "output.run_dir=r", "train.on_nonfinite=skip",
                          fault="nan:0:3:fc/kernel"))
    assert ("largebatch: step 3: non-finite gradient (nan) in layer 'fc/kernel'; step skipped "
            "(train.on_nonfinite=skip, 1 skipped so far)") in proc.stderr + proc.stdout
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps_done"] == 12 and summary["skipped_steps"] == 1
    _, meta, arrays = load_payload(tmp_path / "r" / "checkpoints" / "epoch-0003.ckpt")
    assert meta["extra"]["skipped_steps"] == 1
    assert all(np.isfinite(arrays[k]).all() for k in arrays if k.startswith(("model/", "optimizer/"))
               and arrays[k].dtype.kind == "f")


@pytest.mark.multirank
@pytest.mark.skipif(horovodrun_path() is None, reason="horovodrun not installed")
def test_nan_on_one_rank_is_seen_by_both(tmp_path):
    """Rank 1 alone gets the NaN: the flag is computed after the allreduce, so rank 0 (which
    reports) skips the same update and names the layer; the run completes on both ranks."""
    exp_text = EXP.replace("per_worker: 16", "per_worker: 8").replace("epochs: 3", "epochs: 1")
    proc = _ok(run_runner(tmp_path, exp_text, "output.run_dir=r", "train.on_nonfinite=skip", np_=2,
                          fault="nan:1:2:conv1/kernel"))
    assert ("largebatch: step 2: non-finite gradient (nan) in layer 'conv1/kernel'; step skipped "
            "(train.on_nonfinite=skip, 1 skipped so far)") in proc.stderr + proc.stdout
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps_done"] == 4 and summary["skipped_steps"] == 1


# ------------------------------------------------------------------------------ bad checkpoints (runner)
def _bad_resume(tmp_path, lars_full, make_bad, expected):
    run_dir = tmp_path / "r"
    shutil.copytree(lars_full, run_dir)
    ck = run_dir / "checkpoints" / "epoch-0003.ckpt"
    make_bad(ck)
    before = {p.name: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    proc = run_runner(tmp_path, EXP, "output.run_dir=r", "train.resume=auto")
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("train.resume: checkpoint ") and expected in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    after = {p.name: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before                                  # nothing overwritten


def test_truncated_checkpoint_exit_2(tmp_path, lars_full):
    _bad_resume(tmp_path, lars_full, lambda ck: ck.write_bytes(ck.read_bytes()[:-100]), "truncated")


def test_corrupted_checkpoint_exit_2(tmp_path, lars_full):
    def flip(ck):
        b = bytearray(ck.read_bytes())
        b[-50] ^= 0xFF
        ck.write_bytes(bytes(b))
    _bad_resume(tmp_path, lars_full, flip, "corrupted")


def test_checkpoint_of_another_model_exit_2(tmp_path, lars_full, hvd):
    def other(ck):                            # a well-formed Keras checkpoint of another model
        import keras
        import largebatch.keras as lbk
        m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
        lbk.save_checkpoint(str(ck), m, None, step=1, epoch=3, model_name="dense")
    _bad_resume(tmp_path, lars_full, other, "from another model (model 'dense'")
