"""docs/keras.md, "Migrating a Horovod Keras script": Horovod's Keras synthetic benchmark with the
Keras 3 changes (examples/keras3_horovod_synthetic_benchmark.py) runs under horovodrun -np 2.

Each rank draws its own synthetic batch (as in Horovod's script), so the ranks' weights only stay
equal if gradients are averaged: the script's RankConsistencyCheck stops the run otherwise.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("horovod.tensorflow")

from multirank import horovodrun_path  # noqa: E402

pytestmark = pytest.mark.multirank

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "keras3_horovod_synthetic_benchmark.py"


@pytest.mark.parametrize("flags", [[], ["--optimizer", "lars", "--fp16-allreduce"]], ids=["sgd", "lars-fp16"])
def test_migrated_horovod_benchmark_runs_on_two_ranks(flags):
    env = dict(os.environ, OMP_NUM_THREADS="1", TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1",
               TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1", OMPI_MCA_btl_vader_single_copy_mechanism="none")
    cmd = [horovodrun_path(), "-np", "2", "-H", "localhost:2", sys.executable, str(SCRIPT), "--no-cuda",
           "--image-size", "32", "--batch-size", "4", "--num-iters", "2", "--num-batches-per-iter", "2",
           "--model", "MobileNetV2", *flags]   # the migration is the point, not the model: a small one
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "Number of CPUs: 2" in out
    assert re.search(r"Total img/sec on 2 CPU\(s\): [0-9.]+ \+-[0-9.]+", out), out[-3000:]
    assert "RankDivergenceError" not in out and "Traceback" not in out
