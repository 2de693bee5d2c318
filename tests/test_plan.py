"""`largebatch plan`: McCandlish et al.'s model of steps and examples joined to a ring-allreduce
model of a step (largebatch.planning), from a run's summary.json."""
import csv
import json

import pytest

from largebatch import planning
from largebatch.launchers import plan as plan_cli


def test_the_ring_model_and_the_papers_tradeoff():
    assert planning.ring_allreduce_time(1e6, 1, 1e-5, 1e-9) == 0.0
    assert planning.ring_allreduce_time(1e6, 4, 1e-5, 1e-9) == pytest.approx(2 * 3 * 1e-5 + 2 * 3 / 4 * 1e6 * 1e-9)
    rows = planning.plan(noise_scale=1000, reference_batch=250, reference_steps=5000, seconds_per_example=1e-3,
                         params=25e6, alpha=10e-6, beta=8 / 25e9, per_worker_batches=[250], nodes=[1, 4, 16])
    one, four, sixteen = rows
    assert one.steps == pytest.approx(5000)                       # the reference run itself
    assert four.global_batch == 1000 and four.steps == pytest.approx(5000 * 2 / 5)   # S_min = 1000, ×(1 + 1)
    assert four.steps_over_min == 2 and four.examples_over_min == 2
    assert sixteen.examples_over_min == 5 and sixteen.allreduce_s > four.allreduce_s > one.allreduce_s == 0
    assert one.hardware_efficiency == 1 and 0 < sixteen.hardware_efficiency < 1
    balanced, fastest = planning.recommend(rows, 1000)
    assert balanced is four and fastest.time_s == min(r.time_s for r in rows)
    with pytest.raises(ValueError, match="noise_scale: expected a number > 0"):
        planning.plan(0, 1, 1, 1, 1, 0, 0, [1])


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({
        "name": "exp", "model": "resnet50", "status": "completed", "noise_scale": 2048.0, "global_batch": 512,
        "per_worker_batch": 64, "ranks": 8, "steps_done": 10000, "images_per_sec": 4000.0, "parameters": 25_557_032}))
    return d


def test_plan_writes_the_table_the_json_and_the_png_and_recommends(run_dir, capsys):
    assert plan_cli.main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("noise scale B_noise ≈ 2048 (the run's, at global batch 512, 10000 steps); 2 ms per "
                          "example per node; 25.6M parameters; network: assumed link 25 Gbit/s, 10 us")
    assert "recommended: 16 node(s) × 128 = global batch 2048 (B ≈ B_noise: 2.00× the fewest steps, 2.00× the " \
           "fewest examples)" in out
    with open(run_dir / "plan" / "plan.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 * 11 and {int(r["per_worker_batch"]) for r in rows} == {32, 64, 128}
    meta = json.loads((run_dir / "plan" / "plan.json").read_text())["meta"]
    assert meta["recommended"]["global_batch"] == 2048 and meta["seconds_per_example"] == pytest.approx(8 / 4000)
    assert (run_dir / "plan" / "plan.png").read_bytes()[:4] == b"\x89PNG"


def test_plan_takes_the_network_from_an_allreduce_benchmark(run_dir, tmp_path, capsys):
    bench = tmp_path / "allreduce_hosts.json"
    bench.write_text(json.dumps({"meta": {"fits": {
        "horovod_mpi": {"alpha_s": 4.6e-4, "beta_s_per_byte": 1.26e-9},
        "torch_gloo": {"alpha_s": 3.6e-4, "beta_s_per_byte": 1.09e-9},
        "mpi4py": {"alpha_s": 1e-5, "beta_s_per_byte": 2.8e-9}}}}))
    assert plan_cli.main([str(run_dir), "--allreduce", str(bench), "--per-worker", "64", "--max-nodes", "64"]) == 0
    out = capsys.readouterr().out
    assert f"network: torch_gloo from {bench}" in out
    meta = json.loads((run_dir / "plan" / "plan.json").read_text())["meta"]
    assert meta["alpha_s"] == 3.6e-4 and len(json.loads((run_dir / "plan" / "plan.json").read_text())["rows"]) == 7


@pytest.mark.parametrize("change, args, message", [
    ("nothing", ["/nonexistent/run"], "/nonexistent/run: no summary.json (expected a finished run directory)"),
    ({"noise_scale": None}, [], "no gradient noise scale in summary.json (expected a run with several ranks or "
                                "accumulation and train.noise_scale: true)"),
    ({"parameters": None}, [], "--params: the run's summary.json has no parameter count; expected a number > 0"),
    ({}, ["--per-worker", "0"], "--per-worker / --max-nodes: expected integers > 0"),
])
def test_bad_input_is_one_line_and_exit_2(run_dir, capsys, change, args, message):
    if isinstance(change, dict):
        summary = json.loads((run_dir / "summary.json").read_text())
        summary.update(change)
        (run_dir / "summary.json").write_text(json.dumps(summary))
    argv = args if change == "nothing" else [str(run_dir), *args]
    assert plan_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("largebatch plan: ") and err.endswith(message) and "\n" not in err
    assert not (run_dir / "plan").exists()
