"""model.fit under horovodrun -np 2 with DIFFERENT data on each rank (tests/ranks/keras_fit.py).

With largebatch.keras.DistributedOptimizer the ranks must end with identical weights, equal
(atol 1e-5) to a single-process fit on the concatenated batches (same init; shuffle=False;
rank batch i of both ranks = single-process batch i; mean loss, so the average of the ranks'
gradients is the concatenated batch's gradient). Rank 1 starts from other weights, so
BroadcastGlobalVariables is tested too. Horovod's own Keras DistributedOptimizer must be
refused, and is shown to fail silently without largebatch.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("keras")
pytest.importorskip("horovod.tensorflow")

from multirank import horovodrun_path, run_ranks  # noqa: E402
from ranks import keras_common as kc  # noqa: E402

pytestmark = pytest.mark.multirank

N_VARS = 4          # conv kernel, conv bias, fc kernel, fc bias


@pytest.fixture(scope="module")
def trained():
    return run_ranks("ranks/keras_fit.py", "train", np=2, timeout=600)


@pytest.fixture(scope="module")
def refused():
    return run_ranks("ranks/keras_fit.py", "refuse", np=2, timeout=600)


@pytest.fixture(scope="module")
def single():
    kc.single_thread()
    return {scenario: kc.fit_single(scenario) for scenario in kc.SCENARIOS}


def weights(result, scenario):
    return [result[f"{scenario}.w{i}"] for i in range(N_VARS)]


@pytest.mark.parametrize("scenario", ["lars", "lars_accum", "lamb", "lars_fp16"])
def test_ranks_end_identical(trained, scenario):
    for a, b in zip(weights(trained[0], scenario), weights(trained[1], scenario)):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("scenario,atol", [("lars", 1e-5), ("lars_accum", 1e-5), ("lamb", 1e-5),
                                           ("lars_fp16", 5e-4)])
def test_fit_equals_single_process_on_concatenated_batches(trained, single, scenario, atol):
    """lars: with a warmup+poly LearningRateSchedule (momentum correction every step);
    lars_accum: 2 accumulation steps of half the batch; lars_fp16: fp16 allreduce (looser)."""
    expected, history = single[scenario]
    got = weights(trained[0], scenario)
    initial = kc.initial_weights()
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=0, atol=atol)
    # training moved every tensor, the biases least (the default adapts them: γ·η·‖b‖/‖g‖)
    moved = [float(np.max(np.abs(e - w0))) for e, w0 in zip(expected, initial)]
    assert min(moved) > 1e-3 and max(moved) > 1e-2, moved
    # MetricAverage: the ranks' epoch losses averaged = the global batch's
    np.testing.assert_allclose(trained[0][f"{scenario}.loss"], history["loss"], rtol=1e-5 if atol < 1e-4 else 1e-3)
    np.testing.assert_array_equal(trained[0][f"{scenario}.loss"], trained[1][f"{scenario}.loss"])


def test_updates_checks_and_trust_logging(trained):
    for scenario in kc.SCENARIOS:
        batches = kc.STEPS_PER_EPOCH * kc.EPOCHS * (2 if scenario == "lars_accum" else 1)
        for rank in (0, 1):
            assert int(trained[rank][f"{scenario}.iterations"]) == kc.STEPS_PER_EPOCH * kc.EPOCHS
            assert int(trained[rank][f"{scenario}.checks"]) == batches     # RankConsistencyCheck passed
        # TrustRatioLogger: rank 0 only, one row per variable per update, plus the header
        assert int(trained[0][f"{scenario}.csv_rows"]) == 1 + N_VARS * kc.STEPS_PER_EPOCH * kc.EPOCHS
        assert int(trained[1][f"{scenario}.csv_rows"]) == 0


def _message(results, key):
    messages = {str(r[key]) for r in results}
    assert len(messages) == 1, messages                     # every rank says the same
    return messages.pop()


@pytest.mark.parametrize("key", ["hvd_lars", "hvd_sgd_callback", "hvd_sgd_check", "hvd_sgd_wrap"])
def test_horovod_keras_optimizer_is_refused(refused, key):
    message = _message(refused, key)
    assert message.startswith("HorovodKerasError: horovod.tensorflow.keras.DistributedOptimizer does not "
                              "average gradients under Keras 3"), message
    assert "largebatch.keras.DistributedOptimizer" in message and "\n" not in message


def test_horovod_keras_callbacks_are_refused(refused):
    message = _message(refused, "hvd_callbacks")
    assert message.startswith("HorovodKerasError: BroadcastGlobalVariablesCallback from horovod"), message
    assert "largebatch.keras.callbacks" in message


def test_horovod_keras_callback_in_fit_is_refused_at_once():
    """hvd.callbacks.BroadcastGlobalVariablesCallback kept next to lbk.DistributedOptimizer, without
    check_callbacks (tests/ranks/keras_hvd_callbacks.py): every rank stops when fit starts, naming
    the replacement, before any batch."""
    results = run_ranks("ranks/keras_hvd_callbacks.py", np=2, timeout=300)
    message = _message(results, "message")
    assert message.startswith("HorovodKerasError: BroadcastGlobalVariablesCallback from "
                              "horovod.tensorflow.keras.callbacks does not work under Keras 3"), message
    assert "use largebatch.keras.callbacks.BroadcastGlobalVariables(root_rank) instead" in message
    assert [int(r["batches"]) for r in results] == [0, 0]


def test_horovod_keras_optimizer_alone_fails_silently(refused):
    """What the refusal prevents (STACK.md): no error, and the ranks' weights differ."""
    assert _message(refused, "hvd_sgd_silent") == "no error"
    differ = [not np.array_equal(refused[0][f"hvd_sgd_silent.w{i}"], refused[1][f"hvd_sgd_silent.w{i}"])
              for i in range(N_VARS)]
    assert all(differ)


def test_unwrapped_optimizer_is_refused_by_broadcast(refused):
    message = _message(refused, "unwrapped_broadcast")
    assert message.startswith("HorovodKerasError: model.optimizer (LARS) does not average gradients over the 2 ranks")


def test_rank_consistency_check_stops_divergence(refused):
    message = _message(refused, "unwrapped_check")
    assert message.startswith("RankDivergenceError: ranks' weights differ at batch 2:"), message
    assert "'conv/kernel'" in message and "DistributedOptimizer" in message


def test_example_runs_under_horovodrun(tmp_path):
    """frameworks/keras/example_fit.py: synthetic data, LARS + the callbacks, 2 ranks."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
               OMPI_MCA_btl_vader_single_copy_mechanism="none")
    cmd = [horovodrun_path(), "-np", "2", "-H", "localhost:2", sys.executable, "-m", "largebatch.keras.example_fit", "--epochs", "2",
           "--examples-per-rank", "64", "--batch-size", "16", "--image-size", "16", "--width", "8",
           "--log-dir", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "ranks consistent" in out and "global batch 32" in out, out[-4000:]
    assert (tmp_path / "trust_ratios.csv").exists()
