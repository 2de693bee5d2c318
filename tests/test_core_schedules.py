"""Schedules and scaling rules (Goyal et al. 2017; LARS paper's poly-2 decay)."""
import math
import pickle

import pytest
from hypothesis import given, settings, strategies as st

from largebatch import schedules as S


def test_scaling_rules():
    assert S.scaled_lr(0.1, 8192, 256) == pytest.approx(3.2)              # Goyal et al.: kn=8k, η=3.2
    assert S.scaled_lr(0.1, 8192, 256, "sqrt") == pytest.approx(0.1 * math.sqrt(32))
    assert S.scaled_lr(0.1, 8192, 256, "none") == 0.1
    assert S.global_batch_size(32, 256) == 8192
    assert S.global_batch_size(64, 8, accumulation_steps=4) == 2048


def test_momentum_correction():
    assert S.momentum_correction(0.2, 0.1) == pytest.approx(2.0)
    assert S.momentum_correction(0.2, 0.0) == 1.0


def test_gradual_warmup_goyal_recipe():
    # 5 epochs from η=0.1 to kη=3.2, 100 steps per epoch, then ÷10 at 30/60/80 over 90 epochs
    sched = S.build_schedule(peak_lr=3.2, steps_per_epoch=100, epochs=90, warmup="gradual", warmup_epochs=5,
                             warmup_start_lr=0.1, decay="multistep", milestones=(30, 60, 80))
    assert sched(0) == pytest.approx(0.1)
    assert sched(250) == pytest.approx(0.1 + 3.1 * 0.5)
    assert sched(500) == 3.2                                  # warmup ends exactly at the scaled lr
    assert sched(2999) == 3.2 and sched(3000) == pytest.approx(0.32) and sched(6000) == pytest.approx(0.032)
    assert sched(8000) == pytest.approx(0.0032)


def test_constant_warmup_jumps():
    sched = S.build_schedule(peak_lr=3.2, steps_per_epoch=10, epochs=20, warmup="constant", warmup_epochs=5,
                             warmup_start_lr=0.1, decay="none")
    assert [sched(s) for s in (0, 49, 50, 199)] == [0.1, 0.1, 3.2, 3.2]


def test_poly2_decay_lars_paper():
    sched = S.build_schedule(peak_lr=2.0, steps_per_epoch=10, epochs=10, warmup="none", decay="poly")
    assert sched(0) == 2.0 and sched(50) == pytest.approx(2.0 * 0.25) and sched(100) == 0.0
    assert sched(1000) == 0.0


def test_cosine_decay():
    sched = S.build_schedule(peak_lr=1.0, steps_per_epoch=10, epochs=10, warmup="none", decay="cosine", end_lr=0.1)
    assert sched(0) == pytest.approx(1.0) and sched(50) == pytest.approx(0.55) and sched(100) == pytest.approx(0.1)


def test_schedules_pickle_and_compare():
    sched = S.build_schedule(peak_lr=1.0, steps_per_epoch=10, epochs=10, warmup_epochs=1)
    assert pickle.loads(pickle.dumps(sched)) == sched


@settings(max_examples=100, deadline=None)
@given(peak=st.floats(0.01, 50), spe=st.integers(1, 50), epochs=st.integers(2, 30),
       warm=st.floats(0.1, 0.9), decay=st.sampled_from(["poly", "cosine", "none"]), power=st.floats(0.5, 3))
def test_warmup_continuous_and_monotone(peak, spe, epochs, warm, decay, power):
    warmup_epochs = max(1, round(warm * epochs)) if epochs > 1 else 0
    sched = S.build_schedule(peak_lr=peak, steps_per_epoch=spe, epochs=epochs, warmup="gradual",
                             warmup_epochs=min(warmup_epochs, epochs - 1) or 0.5, decay=decay, power=power)
    wsteps = sched.warmup_steps
    values = [sched(s) for s in range(epochs * spe + 1)]
    assert values[wsteps] == peak                                           # ends exactly at the peak
    assert all(a <= b + 1e-12 for a, b in zip(values[:wsteps + 1], values[1:wsteps + 1]))   # warmup rises
    assert all(a + 1e-12 >= b for a, b in zip(values[wsteps:], values[wsteps + 1:]))         # decay falls
    if wsteps > 0:   # continuity: the last warmup step is one warmup increment below the peak
        assert abs(values[wsteps] - values[wsteps - 1]) <= (peak - values[0]) / wsteps + 1e-9


@pytest.mark.parametrize("call,message", [
    (lambda: S.scaled_lr(-0.1, 512, 256), "base_lr: expected a number >= 0, got -0.1"),
    (lambda: S.scaled_lr(0.1, 512, 256, "cubic"),
     "scaling rule: expected one of 'linear', 'sqrt', 'none', got 'cubic'"),
    (lambda: S.build_schedule(peak_lr=1, steps_per_epoch=10, epochs=5, decay="step"),
     "decay: expected one of 'poly', 'cosine', 'multistep', 'none', got 'step'"),
    (lambda: S.build_schedule(peak_lr=1, steps_per_epoch=10, epochs=5, warmup="linear"),
     "warmup: expected one of 'gradual', 'constant', 'none', got 'linear'"),
    (lambda: S.build_schedule(peak_lr=1, steps_per_epoch=10, epochs=5, warmup_epochs=5),
     "warmup_epochs: expected fewer than epochs (5), got 5"),
    (lambda: S.global_batch_size(32, 0), "workers: expected an integer > 0, got 0"),
])
def test_bad_input_names_the_argument(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert str(err.value) == message
