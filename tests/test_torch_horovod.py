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
