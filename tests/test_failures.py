"""No hangs: a 2-rank runner job where one rank dies (SIGKILL), raises, or gets stuck ends
non-zero, in bounded time, with a message naming the failed rank, under horovodrun (MPI and
Gloo), plain mpirun and torchrun (torch.distributed). Faults are injected with LARGEBATCH_FAULT (largebatch.runner.faults)."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multirank import horovodrun_path  # noqa: E402
from test_checkpoint import EXP, _env  # noqa: E402

pytestmark = [pytest.mark.multirank, pytest.mark.slow,
              pytest.mark.skipif(horovodrun_path() is None or shutil.which("mpirun") is None,
                                 reason="horovodrun / mpirun not installed")]


def _launch(tmp_path, launcher, fault, timeout=150, framework="torch", stall=None):
    exp = tmp_path / "exp.yaml"
    exp.write_text(EXP.replace("OPT", "lars").replace("epochs: 3", "epochs: 30")
                   .replace("framework: torch", f"framework: {framework}"))
    runner = [sys.executable, "-m", "largebatch.runner", str(exp), "output.run_dir=r"]
    env = _env()
    env["LARGEBATCH_FAULT"] = fault
    if stall is not None:        # Horovod's stall check and shutdown, in seconds
        env["HOROVOD_STALL_CHECK_TIME_SECONDS"], env["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] = stall
    if launcher == "torchrun":
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node=2", "--no-python",
               *runner]
    elif launcher == "mpirun":
        cmd = ["mpirun", "--allow-run-as-root", "--tag-output", "-np", "2", "-H", "localhost:2",
               "-bind-to", "none", "-map-by", "slot", "-x", "LARGEBATCH_FAULT", "-x", "OMP_NUM_THREADS",
               "-x", "PYTHONPATH", "-x", "PYTHONUNBUFFERED"] + runner
    else:
        cmd = [horovodrun_path(), "-np", "2", "-H", "localhost:2", f"--{launcher}"] + runner
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


@pytest.mark.parametrize("launcher, fault, rank_line", [
    ("mpi", "kill", "process rank 1 with PID"),
    ("mpi", "raise", "largebatch: rank 1 failed: RuntimeError: injected fault at step 3"),
    ("gloo", "kill", "Process 1 exit with status code 137"),
    ("mpirun", "kill", "process rank 1 with PID"),
    ("mpirun", "raise", "largebatch: rank 1 failed: RuntimeError: injected fault at step 3"),
    ("torchrun", "kill", "rank      : 1 (local_rank: 1)"),
    ("torchrun", "raise", "largebatch: rank 1 failed: RuntimeError: injected fault at step 3"),
])
def test_dead_rank_ends_the_job_within_60s(tmp_path, launcher, fault, rank_line):
    proc, elapsed = _launch(tmp_path, launcher, f"{fault}:1:3")
    out = proc.stdout + proc.stderr
    print(f"{launcher} {fault}: exit {proc.returncode} after {elapsed:.1f} s (start-up included)")
    assert proc.returncode != 0, out[-3000:]
    assert f"injected fault '{fault}' on rank 1 at step 3" in out
    assert rank_line in out, out[-3000:]
    assert elapsed < 60, f"took {elapsed:.1f} s"
    assert not (tmp_path / "r" / "summary.json").exists()


@pytest.mark.parametrize("fault, rank_line", [
    ("kill", "process rank 1 with PID"),
    ("raise", "largebatch: rank 1 failed: RuntimeError: injected fault at step 3"),
])
def test_dead_keras_rank_ends_the_job_within_60s(tmp_path, fault, rank_line):
    proc, elapsed = _launch(tmp_path, "mpi", f"{fault}:1:3", framework="keras")
    out = proc.stdout + proc.stderr
    print(f"keras {fault}: exit {proc.returncode} after {elapsed:.1f} s (start-up included)")
    assert proc.returncode != 0, out[-3000:]
    assert f"injected fault '{fault}' on rank 1 at step 3" in out, out[-3000:]
    assert rank_line in out, out[-3000:]
    assert elapsed < 60, f"took {elapsed:.1f} s"
    assert not (tmp_path / "r" / "summary.json").exists()


def test_stall_defaults_are_set_unless_the_user_set_them():
    from largebatch.runner.faults import horovod_timeouts
    env = {"HOROVOD_STALL_CHECK_TIME_SECONDS": "5"}
    horovod_timeouts(env)
    assert env == {"HOROVOD_STALL_CHECK_TIME_SECONDS": "5", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "30"}
    horovod_timeouts(env := {})
    assert env == {"HOROVOD_STALL_CHECK_TIME_SECONDS": "10", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "30"}


def test_stuck_rank_is_shut_down_by_the_stall_timeout(tmp_path):
    # the shutdown after 10 s instead of the default 30 (set above): the same path, 20 s sooner
    proc, elapsed = _launch(tmp_path, "mpi", "hang:1:3", stall=("4", "10"))
    out = proc.stdout + proc.stderr
    print(f"hang: exit {proc.returncode} after {elapsed:.1f} s (start-up included)")
    assert proc.returncode != 0
    assert "is stalled for longer than 10 seconds" in out and "1!: [" in out.replace("[1,0]<stderr>:", "")
    assert elapsed < 70
