"""largebatch.torch under horovodrun -np 2 with different data on each rank."""
import numpy as np
import pytest

from multirank import run_ranks

pytestmark = pytest.mark.multirank


@pytest.mark.parametrize("algorithm,passes,controller", [
    ("lars", 1, "mpi"), ("lars", 2, "mpi"), ("lars-nesterov", 1, "gloo"), ("lamb", 1, "mpi"), ("clars", 2, "mpi"),
])
def test_ranks_agree_and_match_single_process(algorithm, passes, controller):
    r0, r1 = run_ranks("ranks/torch_train.py", algorithm, passes, controller=controller)
    np.testing.assert_array_equal(r0["distributed"], r1["distributed"])             # bitwise identical
    assert not np.array_equal(r0["distributed"], r0["single"] * 0)
    np.testing.assert_allclose(r0["distributed"], r0["single"], rtol=1e-5, atol=1e-7)  # = concatenated batch


def test_broadcast_optimizer_state_on_fresh_optimizers_gives_no_nan():
    r0, r1 = run_ranks("ranks/torch_broadcast_state.py")
    for name in ("lars", "larc", "lamb", "clars"):
        assert bool(r0[name + "_finite"]) and bool(r1[name + "_finite"]), name
        np.testing.assert_array_equal(r0[name], r1[name])


def test_amp_grad_scaler_path_keeps_ranks_identical():
    r0, r1 = run_ranks("ranks/torch_amp.py")
    assert bool(r0["finite"]) and bool(r1["finite"])
    np.testing.assert_array_equal(r0["weights"], r1["weights"])
    np.testing.assert_array_equal(r0["scales"], r1["scales"])


# --- distributed_optimizer(op=..., gradient_predivide_factor=...) (tests/ranks/torch_ops.py) ---
N_PARAMS = 4          # Linear(5, 4) weight and bias, Linear(4, 3) weight and bias


@pytest.fixture(scope="module")
def ops():
    return run_ranks("ranks/torch_ops.py")


def _adasum(a, b):
    """Horovod's Adasum of two tensors (Maleki et al. 2021): each vector less half its projection
    on the other, summed."""
    dot = float(np.dot(a.ravel().astype(np.float64), b.ravel().astype(np.float64)))
    na, nb = float(np.sum(a.astype(np.float64) ** 2)), float(np.sum(b.astype(np.float64) ** 2))
    return (1 - dot / (2 * na)) * a + (1 - dot / (2 * nb)) * b


def _lars_step(w0, grads):
    """One largebatch.torch.LARS step (the rank script's settings) in this process."""
    torch = pytest.importorskip("torch")
    import largebatch.torch as lbt
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    with torch.no_grad():
        for p, w, g in zip(model.parameters(), w0, grads):
            p.copy_(torch.from_numpy(w))
            p.grad = torch.from_numpy(np.ascontiguousarray(g))
    opt = lbt.LARS(lbt.param_groups(model), lr=2.0, momentum=0.0, weight_decay=0.0, trust_coefficient=0.01)
    opt.step()
    return [p.detach().numpy().copy() for p in model.parameters()]


@pytest.mark.parametrize("case", ["sgd_average", "sgd_sum", "sgd_adasum", "sgd_predivide", "lars_sum", "lars_adasum"])
def test_distributed_optimizer_op(ops, case):
    r0, r1 = ops
    w0 = [r0[f"w0_{i}"] for i in range(N_PARAMS)]
    g0 = [r0[f"grad{i}"] for i in range(N_PARAMS)]
    g1 = [r1[f"grad{i}"] for i in range(N_PARAMS)]
    assert not np.allclose(g0[0], g1[0])                        # different data on the two ranks
    if case in ("sgd_average", "sgd_predivide"):
        expected = [w - 0.5 * (a + b) / 2 for w, a, b in zip(w0, g0, g1)]
    elif case == "sgd_sum":
        expected = [w - 0.5 * (a + b) for w, a, b in zip(w0, g0, g1)]
    elif case == "sgd_adasum":                                  # Adasum of the two ranks' deltas
        expected = [w + _adasum(-0.5 * a, -0.5 * b) for w, a, b in zip(w0, g0, g1)]
    elif case == "lars_sum":
        expected = _lars_step(w0, [a + b for a, b in zip(g0, g1)])
    else:                                                       # lars_adasum: each rank's LARS delta
        d0 = [w - v for w, v in zip(_lars_step(w0, g0), w0)]
        d1 = [w - v for w, v in zip(_lars_step(w0, g1), w0)]
        expected = [w + _adasum(a, b) for w, a, b in zip(w0, d0, d1)]
    for i in range(N_PARAMS):
        np.testing.assert_array_equal(r0[f"{case}.w{i}"], r1[f"{case}.w{i}"])      # the ranks agree
        np.testing.assert_allclose(r0[f"{case}.w{i}"], expected[i], rtol=1e-5, atol=1e-6, err_msg=f"{case} w{i}")
        assert not np.allclose(r0[f"{case}.w{i}"], w0[i])                          # it stepped


def test_distributed_optimizer_op_errors(ops):
    assert str(ops[0]["bad_op"]).startswith("ValueError: op: expected hvd.Average, hvd.Sum or hvd.Adasum"), ops[0]["bad_op"]
    assert str(ops[0]["bad_predivide"]) == ("ValueError: gradient_predivide_factor: only used with op=hvd.Average, "
                                            "got op=hvd.Sum and gradient_predivide_factor=2.0")
