"""`largebatch run` under SIGTERM / SIGINT on one host, with real horovodrun ranks: the job stops
within seconds, every rank finishes the same step, rank 0 writes a checkpoint and the summary,
and `train.resume=auto` continues the same trajectory; a second signal kills at once."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from multirank import environ_copy, wait_or_kill

pytestmark = pytest.mark.multirank

ROOT = Path(__file__).resolve().parent.parent
LARGEBATCH = str(Path(sys.executable).with_name("largebatch"))
RUN = ["examples/synthetic_torch.yaml", "--np", "2", "data.samples=256", "data.val_samples=64", "train.epochs=8",
       "output.progress=false", "launcher.threads_per_rank=1", "output.checkpoint_every=0"]


def _ours(run_dir):
    """Processes still running for this run (their command line names its unique run dir)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as fh:
                zombie = fh.read().rsplit(") ", 1)[1].startswith("Z")
        except OSError:
            continue
        if str(run_dir) in cmd and not zombie:
            out.append((int(pid), cmd[:120]))
    return out


def _start(run_dir, log, extra=()):
    fh = open(log, "w")
    proc = subprocess.Popen([LARGEBATCH, "run", *RUN, *extra, f"output.run_dir={run_dir}"], cwd=str(ROOT),
                            stdout=fh, stderr=subprocess.STDOUT, env=environ_copy())
    return proc, fh


def _wait_training(run_dir, proc, limit=120):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        metrics = run_dir / "metrics.csv"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("sig,launcher", [(signal.SIGTERM, "horovodrun"), (signal.SIGINT, "horovodrun"),
                                          (signal.SIGTERM, "torchrun")],
                         ids=["SIGTERM", "SIGINT", "SIGTERM-torchrun"])
def test_a_signal_stops_with_a_checkpoint_and_resume_continues(tmp_path, sig, launcher):
    """The same promises under both engines: Horovod (horovodrun) and torch.distributed (torchrun)."""
    run_dir = tmp_path / "run"
    engine = ["--launcher", launcher]
    proc, log = _start(run_dir, tmp_path / "log", engine)
    try:
        assert _wait_training(run_dir, proc), (tmp_path / "log").read_text()[-3000:]
        proc.send_signal(sig)
        sent = time.monotonic()
        code = wait_or_kill(proc, 40)
        took = time.monotonic() - sent
    finally:
        log.close()
    text = (tmp_path / "log").read_text()
    assert code == 128 + sig and took < 30, text[-3000:]
    assert not _ours(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["stopped_by"] == signal.Signals(sig).name
    assert summary["checkpoint"] and Path(summary["checkpoint"]).exists()      # written before exiting
    print(f"{signal.Signals(sig).name}: exit {code} after {took:.1f} s, stopped after step {summary['steps_done']}")
    # one closing block, and none of the launcher's or the ranks' own words about the stop
    name = signal.Signals(sig).name
    assert (f"largebatch: stopped by {name} after step {summary['steps_done']} of {summary['total_steps']}; "
            f"checkpoint {summary['checkpoint']}\n") in text, text[-3000:]
    assert f"largebatch:            or: sh {run_dir}/launch.sh\n" in text
    for noise in ("SIGUSR1", "Primary job", "Forwarding signal", "Traceback", "exited with non-zero status"):
        assert noise not in text, (noise, text[-3000:])
    (again,) = [line.split("continue with: ", 1)[1] for line in text.splitlines() if "continue with: " in line]
    assert again.endswith(f"output.run_dir={run_dir} train.resume=auto"), again
    if sig != signal.SIGTERM:
        return
    # the command it printed, as typed
    resumed = subprocess.run(again.replace("largebatch ", f"{LARGEBATCH} ", 1), shell=True,
                             cwd=str(ROOT), capture_output=True, text=True, timeout=150, env=environ_copy())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = tmp_path / "straight"
    ref = subprocess.run([LARGEBATCH, "run", *RUN, *engine, f"output.run_dir={straight}"], cwd=str(ROOT),
                         capture_output=True, text=True, timeout=150, env=environ_copy())
    assert ref.returncode == 0, ref.stderr[-3000:]
    got, want = (json.loads((d / "summary.json").read_text()) for d in (run_dir, straight))
    assert got["resumed_from"] == summary["checkpoint"] and got["steps_done"] == want["steps_done"]
    assert got["weights_sha1"] == want["weights_sha1"]            # the same trajectory, bit for bit
    # wall_time_s is the resumed launch's training; the total adds the first launch's, to its checkpoint
    assert got["training_time_total_s"] > got["wall_time_s"] > 0, got
    assert want["training_time_total_s"] == want["wall_time_s"]


def test_a_second_signal_kills_at_once(tmp_path):
    run_dir = tmp_path / "run"
    proc, log = _start(run_dir, tmp_path / "log", ["train.epochs=40"])
    try:
        assert _wait_training(run_dir, proc)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        code = wait_or_kill(proc, 40)
        took = time.monotonic() - sent
    finally:
        log.close()
    assert code == 128 + signal.SIGTERM and took < 5, (tmp_path / "log").read_text()[-2000:]
    deadline = time.monotonic() + 5
    while _ours(run_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _ours(run_dir)
    assert "SIGTERM again: killing the job" in (tmp_path / "log").read_text()
