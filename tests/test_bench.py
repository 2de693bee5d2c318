"""Smoke tests of the benchmarks' --quick modes: each writes CSV, JSON and a PNG with sane numbers."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


def _run(args, out, timeout=180):
    proc = subprocess.run([sys.executable, "-m", "largebatch.launchers.cli", "bench", *args, "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _check_files(out, stem):
    for ext in ("csv", "json"):
        assert (out / f"{stem}.{ext}").stat().st_size > 0
    png = out / f"{stem}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / f"{stem}.json").read_text())["meta"]
    assert meta["cpus"] >= 1 and "torch" in meta and "settings" in meta
    return meta


def test_bench_dispatcher_rejects_unknown():
    proc = subprocess.run([sys.executable, "-m", "largebatch.launchers.cli", "bench", "nope"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown benchmark" in proc.stderr


def test_convergence_quick(tmp_path):
    stdout = _run(["convergence"], tmp_path)
    assert "machine:" in stdout and "settings:" in stdout
    _check_files(tmp_path, "convergence")
    rows = _rows(tmp_path / "convergence.csv")
    assert {r["method"] for r in rows} >= {"sgd", "lars"}
    for r in rows:
        acc = float(r["test_acc_mean"])
        assert 0.0 <= acc <= 1.0
        assert int(r["steps"]) > 0 and float(r["best_lr"]) > 0 and r["lr_at_grid_edge"] in ("True", "False")
    base = [r for r in rows if r["method"] == "sgd" and float(r["gap_pts"]) == 0.0]
    assert base and float(base[0]["test_acc_mean"]) > 0.15      # learns: above 10-class chance
    runs = _rows(tmp_path / "convergence_runs.csv")              # every grid point is recorded
    assert len(runs) >= len(rows) and all(0.0 <= float(r["val_acc"]) <= 1.0 for r in runs)


@pytest.mark.multirank
def test_allreduce_quick(tmp_path):
    out = _run(["allreduce"], tmp_path, timeout=240)
    assert out.splitlines()[0] == f"largebatch bench allreduce: results in {tmp_path}"      # said first
    meta = _check_files(tmp_path, "allreduce")
    rows = _rows(tmp_path / "allreduce.csv")
    assert len(rows) >= 3
    for r in rows:
        assert float(r["mpi4py_s"]) > 0 and float(r["horovod_s"]) > 0 and float(r["torch_gloo_s"]) > 0
    assert set(meta["fits"]) == {"mpi4py", "horovod", "torch_gloo"}       # the engines, measured in one run
    for f in meta["fits"].values():
        assert f["alpha_s"] >= 0 and f["beta_s_per_byte"] > 0
    proj = _rows(tmp_path / "allreduce_projection.csv")
    assert {int(r["workers"]) for r in proj} >= {8, 1024}
    for r in proj:
        assert 0 < float(r["efficiency"]) <= 1 and math.isfinite(float(r["epoch_s"]))


@pytest.mark.multirank
def test_scaling_quick(tmp_path):
    _run(["scaling"], tmp_path, timeout=240)
    _check_files(tmp_path, "scaling")
    rows = _rows(tmp_path / "scaling.csv")
    assert {r["framework"] for r in rows} == {"torch"}
    assert {int(r["np"]) for r in rows} == {1, 2}
    assert {r["optimizer"] for r in rows} == {"sgd", "lars"}
    for r in rows:
        assert float(r["total_images_s"]) > 0
        assert 0 < float(r["efficiency"]) < 3
        if r["np"] == "1":
            assert float(r["efficiency"]) == pytest.approx(1.0)


@pytest.mark.multirank
def test_scaling_quick_keras(tmp_path):
    stdout = _run(["scaling", "--frameworks", "keras", "--np", "2", "--split-added"], tmp_path, timeout=240)
    rows = _rows(tmp_path / "scaling.csv")
    assert {r["framework"] for r in rows} == {"keras"}
    assert {r["optimizer"] for r in rows} == {"sgd", "lars"}         # the runs without averaging are no rows
    assert {(int(r["np"]), int(r["threads_per_rank"])) for r in rows} == {(1, 1), (2, 1)}   # N ranks vs one
    for r in rows:
        assert float(r["total_images_s"]) > 0 and 0 < float(r["efficiency"]) < 3
        assert 0 <= float(r["horovod_thread_cpu"]) < 2 * 1.05       # hvd.init()'s threads, 2 cores at most
        if r["np"] == "1":
            assert r["shared_ms"] == r["averaging_ms"] == ""
        else:   # added_ms = shared_ms + averaging_ms, each from its own timing of the same rounds
            local, step = float(r["local_step_ms"]), float(r["step_ms"])
            assert local > 0 and float(r["averaging_ms"]) == pytest.approx(step - local)
            assert float(r["shared_ms"]) + float(r["averaging_ms"]) == pytest.approx(float(r["added_ms"]))
    assert "averaging_ms" in stdout and "shared_ms" in stdout


def test_optimizer_cost_quick(tmp_path):
    _run(["optimizer-cost"], tmp_path, timeout=300)
    torch_rows = {r["method"]: r for r in _rows(tmp_path / "torch_optimizer_cost.csv")}
    assert set(torch_rows) == {"sgd_foreach", "lars_foreach"}
    for row in torch_rows.values():
        # nothing beats memory traffic; the triad that sets the bound is timed separately, so on a
        # busy machine the two can drift apart by tens of percent, not by 2x
        assert float(row["median_ms"]) > 0 and float(row["vs_7pass_bound"]) > 0.5
        assert float(row["state_mb"]) == pytest.approx(25_557_032 * 4 / 2**20, rel=0.01)   # one buffer
    assert (tmp_path / "torch_optimizer_cost.png").stat().st_size > 0
    assert (tmp_path / "keras_optimizer_cost.csv").exists()
    assert (tmp_path / "keras_optimizer_cost.png").read_bytes()[:4] == b"\x89PNG"


def test_a_busy_machine_is_said_to_give_unreliable_timings():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import _common
    assert _common.load_warning([0.4, 0.3, 0.2], 2) is None
    assert _common.load_warning([2.0, 1.0, 1.0], 2) == (
        "WARNING: load average 2.00 on 2 cores before the benchmark started: other processes compete for the CPUs "
        "and these timings are unreliable; rerun on a quiet machine")
    assert _common.load_warning(None, 2) is None
    info = _common.machine_info()
    assert ("warning" in info) == (_common.load_warning(info.get("loadavg_1_5_15"), info["cpus"]) is not None)


def test_the_noise_benchmarks_arithmetic():
    """bench/noise.py (`largebatch bench noise`, minutes long, run by hand): its trailing mean,
    first crossing of the target and rank correlation."""
    sys.path.insert(0, str(BENCH))
    try:
        import noise
    finally:
        sys.path.remove(str(BENCH))
    assert noise.smoothed([4.0, 2.0, 0.0, 2.0], 2) == [4.0, 3.0, 1.0, 1.0]
    assert noise.first_below([3.0, 2.0, 1.0, 0.5], 1.0) == 2 and noise.first_below([3.0], 1.0) is None
    assert noise.spearman([1, 2, 3, 4], [10, 5, 2, 1]) == pytest.approx(-1.0)
    assert noise.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)


def test_adascale_quick(tmp_path):
    """bench/adascale.py --quick at S = 4: S = 1, linear scaling + warm-up and AdaScale rows; AdaScale
    takes between the linear run's updates and the base run's, with a gain between 1 and S."""
    _run(["adascale", "--scales", "4"], tmp_path, timeout=120)
    _check_files(tmp_path, "adascale")
    rows = {r["method"]: r for r in _rows(tmp_path / "adascale.csv")}
    assert set(rows) == {"S=1 (base)", "linear + warm-up", "AdaScale"}
    base, linear, ada = (int(rows[m]["updates"]) for m in ("S=1 (base)", "linear + warm-up", "AdaScale"))
    assert linear == base // 4 and linear < ada < base
    assert 1 < float(rows["AdaScale"]["mean_gain"]) <= 4
    assert all(0.1 < float(r["test_acc"]) <= 1 for r in rows.values())
