"""Foundation: the Horovod stack works across 2 real ranks (MPI and Gloo), and doctor reports it."""
import subprocess
import sys

import numpy as np
import pytest

from multirank import horovodrun_path, run_ranks

pytestmark = pytest.mark.multirank

EXPECTED_AVG = np.arange(6) * 1.5       # mean of (r+1)·[0..5] over r = 0, 1


@pytest.mark.parametrize("controller", ["mpi", "gloo"])
def test_torch_allreduce_and_broadcast(controller):
    r0, r1 = run_ranks("ranks/stack_torch.py", controller=controller)
    assert int(r0["size"]) == 2 and int(r1["size"]) == 2
    for r in (r0, r1):
        np.testing.assert_array_equal(r["averaged"], EXPECTED_AVG)
        np.testing.assert_array_equal(r["summed"], np.arange(6) * 3.0)
    assert not np.array_equal(r0["before"], r1["before"])          # different initial weights...
    np.testing.assert_array_equal(r0["after"], r1["after"])        # ...identical after the broadcast
    np.testing.assert_array_equal(r1["after"], r0["before"])       # and equal to rank 0's


def test_tf_allreduce_inside_tf_function():
    r0, r1 = run_ranks("ranks/stack_tf.py")
    for r in (r0, r1):
        np.testing.assert_array_equal(r["averaged"], EXPECTED_AVG.astype(np.float32))
        np.testing.assert_array_equal(r["var"], [7.0, 7.0, 7.0])


def test_check_build_lists_everything():
    out = subprocess.run([horovodrun_path(), "--check-build"], capture_output=True, text=True, timeout=120).stdout
    for item in ("TensorFlow", "PyTorch", "MPI", "Gloo"):
        assert f"[X] {item}" in out, out


def test_doctor_reports_stack_and_keras3_trap():
    proc = subprocess.run([sys.executable, "-m", "largebatch.launchers.doctor"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "stack OK" in proc.stdout
    assert "torch [MPI, Gloo]" in proc.stdout and "tensorflow [MPI, Gloo]" in proc.stdout
    assert "does NOT average gradients" in proc.stdout
    assert "engines usable  torch + torchrun, torch + horovod, keras + horovod" in proc.stdout
    assert "oneDNN" not in proc.stderr and "cpu_feature_guard" not in proc.stderr, proc.stderr  # TF's banners


def test_doctor_fails_with_one_line_fix_when_horovod_missing(tmp_path):
    # a Python that cannot see Horovod: hide it behind a module that raises on import
    (tmp_path / "horovod").mkdir()
    (tmp_path / "horovod" / "__init__.py").write_text("raise ImportError('hidden by test')\n")
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "largebatch.launchers.doctor"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 1
    assert "PROBLEM: horovod is installed but does not import (ImportError: hidden by test); run `make setup`" in proc.stdout
    assert "stack BROKEN" in proc.stdout
    assert "engines usable  torch + torchrun\n" in proc.stdout       # torch.distributed needs no Horovod
