"""Trust-ratio formulas: hand-checked vectors and properties (hypothesis)."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from largebatch import trust

finite = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)


def test_lars_local_lr_hand_checked():
    # ‖w‖=1.234, ‖g‖=5.678, β=1e-4, η=1e-3, eps=1e-8: 0.001234 / 5.6781234 = 0.000217325
    got = trust.lars_local_lr(np, 1.234, 5.678, trust_coefficient=1e-3, weight_decay=1e-4, eps=1e-8)
    assert round(float(got), 9) == 0.000217325            # the figure is given to 9 decimals


def test_norm_of_sum_uses_the_given_update_norm():
    got = trust.lars_local_lr(np, 2.0, 3.0, trust_coefficient=0.01, weight_decay=0.5, update_norm=4.0)
    assert got == pytest.approx(0.01 * 2.0 / 4.0)


@pytest.mark.parametrize("w_norm,g_norm", [(0.0, 3.0), (2.0, 0.0), (0.0, 0.0)])
@pytest.mark.parametrize("clip", [False, True])
def test_zero_norms_give_ratio_one_and_global_lr(w_norm, g_norm, clip):
    with np.errstate(divide="raise", invalid="raise"):   # no division by zero anywhere
        local = trust.lars_local_lr(np, w_norm, g_norm, trust_coefficient=1e-3, weight_decay=1e-4)
        lr = trust.lars_layer_lr(np, w_norm, g_norm, 7.5, trust_coefficient=1e-3, weight_decay=1e-4, clip=clip)
    assert local == 1.0 and lr == 7.5


def test_layer_lr_modes_on_vectors():
    w = np.array([1.0, 1.0, 0.0, 10.0])
    g = np.array([1.0, 1e-6, 1.0, 1.0])
    lr = 2.0
    scale = trust.lars_layer_lr(np, w, g, lr, trust_coefficient=0.1)
    np.testing.assert_allclose(scale, [0.2, 2.0 * 0.1 / 1e-6, 2.0, 2.0])
    clipped = trust.lars_layer_lr(np, w, g, lr, trust_coefficient=0.1, clip=True)
    np.testing.assert_allclose(clipped, [0.1, 2.0, 2.0, 1.0])   # min(λ, γ); zero norm -> γ
    adapt = np.array([True, False, True, True])
    # excluded, default rate "global": γ itself (timm / optax / MLPerf), in both modes
    mixed = trust.lars_layer_lr(np, w, g, lr, trust_coefficient=0.1, adapt=adapt)
    np.testing.assert_allclose(mixed, [0.2, 2.0, 2.0, 2.0])
    assert np.all(trust.lars_layer_lr(np, w, g, lr, trust_coefficient=0.1, adapt=False) == lr)
    assert np.all(trust.lars_layer_lr(np, w, g, lr, trust_coefficient=0.1, adapt=False, clip=True) == lr)
    # rate "trust": as a layer with ‖w‖/(‖g‖+β‖w‖) = 1, γ·η in scale mode, min(η, γ) in clip mode
    np.testing.assert_allclose(trust.lars_layer_lr(np, w, g, lr, trust_coefficient=0.1, adapt=adapt,
                                                   excluded_rate="trust"), [0.2, 2.0 * 0.1, 2.0, 2.0])
    np.testing.assert_allclose(trust.lars_layer_lr(np, w, g, lr, trust_coefficient=0.1, adapt=adapt, clip=True,
                                                   excluded_rate="trust"), [0.1, 0.1, 2.0, 1.0])
    np.testing.assert_allclose(trust.lars_layer_lr(np, w, g, 0.05, trust_coefficient=0.1, adapt=False, clip=True,
                                                   excluded_rate="trust"), 0.05)    # min(η, γ) = γ when γ < η


def test_lars_update_two_steps_by_hand():
    # Algorithm 1 written out: w0=[3,4] (‖w‖=5), g=[0.6,0.8] (‖g‖=1), η=0.1, β=0.01, m=0.9, γ=0.5
    w = np.array([3.0, 4.0]); g = np.array([0.6, 0.8]); v = np.zeros(2)
    lam = 0.1 * 5 / (1 + 0.01 * 5)                      # 0.476190...
    rate = trust.lars_layer_lr(np, 5.0, 1.0, 0.5, trust_coefficient=0.1, weight_decay=0.01)
    assert rate == pytest.approx(0.5 * lam)
    w1, v1 = trust.lars_momentum_update(w, g, v, rate, momentum=0.9, weight_decay=0.01)
    d0 = np.array([0.63, 0.84])                           # g + βw
    np.testing.assert_allclose(v1, 0.5 * lam * d0)
    np.testing.assert_allclose(w1, w - 0.5 * lam * d0)
    # step 2 with the same gradient: ‖w1‖ changes, v carries momentum
    n1 = math.hypot(*w1)
    lam1 = 0.1 * n1 / (1 + 0.01 * n1)
    rate1 = trust.lars_layer_lr(np, n1, 1.0, 0.5, trust_coefficient=0.1, weight_decay=0.01)
    w2, v2 = trust.lars_momentum_update(w1, g, v1, rate1, momentum=0.9, weight_decay=0.01)
    v2_hand = 0.9 * v1 + 0.5 * lam1 * (g + 0.01 * w1)
    np.testing.assert_allclose(v2, v2_hand)
    np.testing.assert_allclose(w2, w1 - v2_hand)
    # expanded: w2 = w0 − v1 − (0.9·v1 + r1·(g + βw1)) = w0 − 1.9·r0·d0 − r1·(g + βw1)
    np.testing.assert_allclose(w2, w - 1.9 * (0.5 * lam) * d0 - (0.5 * lam1) * (g + 0.01 * w1))


def test_nesterov_step_adds_the_lookahead():
    w = np.array([1.0]); g = np.array([2.0]); v = np.array([0.5])
    w1, v1 = trust.lars_momentum_update(w, g, v, 0.1, momentum=0.9, weight_decay=0.0, nesterov=True)
    assert v1[0] == pytest.approx(0.9 * 0.5 + 0.2)
    assert w1[0] == pytest.approx(1.0 - (0.9 * v1[0] + 0.2))


def test_lamb_pieces_by_hand():
    w = np.array([3.0, 4.0]); g = np.array([1.0, -1.0])
    m, v = trust.adam_moments(np.zeros(2), np.zeros(2), g, 0.9, 0.999)
    np.testing.assert_allclose(m, [0.1, -0.1]); np.testing.assert_allclose(v, [0.001, 0.001])
    u = trust.lamb_direction(np, w, m, v, step=1, beta1=0.9, beta2=0.999, eps=0.0, weight_decay=0.01)
    np.testing.assert_allclose(u, [1.03, -0.96])           # m̂/√v̂ = ±1, + βw
    ratio = trust.lamb_trust_ratio(np, 5.0, float(np.linalg.norm(u)))
    assert ratio == pytest.approx(5.0 / math.hypot(1.03, 0.96))
    np.testing.assert_allclose(trust.lamb_update(w, u, 0.1, ratio), w - 0.1 * ratio * u)
    assert trust.lamb_trust_ratio(np, 0.0, 3.0) == 1.0 and trust.lamb_trust_ratio(np, 3.0, 0.0) == 1.0


def test_clars_uses_mean_per_example_norm():
    assert trust.clars_mean_example_norm(12.0, 4) == 3.0
    # the mean per-example norm is at least the norm of the mean: CLARS's λ <= LARS's λ
    rng = np.random.default_rng(0)
    per_example = rng.normal(size=(8, 5))
    mean_pe = trust.clars_mean_example_norm(np.linalg.norm(per_example, axis=1).sum(), 8)
    assert mean_pe >= np.linalg.norm(per_example.mean(axis=0))


@settings(max_examples=200, deadline=None)
@given(w=finite, g=finite, scale=st.floats(min_value=1e-3, max_value=1e3), beta=st.floats(0, 1e-2))
def test_ratio_is_scale_invariant(w, g, scale, beta):
    a = trust.lars_local_lr(np, w, g, trust_coefficient=1e-3, weight_decay=beta)
    b = trust.lars_local_lr(np, w * scale, g * scale, trust_coefficient=1e-3, weight_decay=beta)
    assert b == pytest.approx(a, rel=1e-9)


@settings(max_examples=200, deadline=None)
@given(w=st.one_of(st.just(0.0), finite), g=st.one_of(st.just(0.0), finite), lr=st.floats(0, 100),
       beta=st.floats(0, 1), eps=st.floats(0, 1e-3), clip=st.booleans())
def test_layer_lr_always_finite_and_clip_never_exceeds_global(w, g, lr, beta, eps, clip):
    with np.errstate(divide="raise", invalid="raise"):
        rate = trust.lars_layer_lr(np, w, g, lr, trust_coefficient=1e-3, weight_decay=beta, eps=eps, clip=clip)
    assert np.isfinite(rate) and rate >= 0
    if clip:
        assert rate <= lr


def test_formulas_run_on_torch_and_tf_tensors():
    torch = pytest.importorskip("torch")
    w = torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64)
    g = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    expect = trust.lars_layer_lr(np, w.numpy(), g.numpy(), 0.5, trust_coefficient=0.1, clip=True)
    got = trust.lars_layer_lr(torch, w, g, 0.5, trust_coefficient=0.1, clip=True)
    np.testing.assert_allclose(got.numpy(), expect)
    tf = pytest.importorskip("tensorflow")
    got_tf = trust.lars_layer_lr(tf, tf.constant(w.numpy()), tf.constant(g.numpy()), 0.5, trust_coefficient=0.1,
                                 clip=True, adapt=tf.constant([True, True, False]), excluded_rate="trust")
    np.testing.assert_allclose(got_tf.numpy(), [0.05, 0.5, 0.1])      # excluded at rate "trust": min(η, γ)
