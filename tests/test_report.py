"""`largebatch report`: PNGs and the text summary of real run directories (the runner in one
process on a tiny experiment), several runs side by side, and bad input (exit 2, one line)."""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from largebatch.launchers import report

ROOT = Path(__file__).resolve().parents[1]
Image = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")

EXP = """
framework: torch
model: small_cnn
data: {kind: synthetic, samples: 128, val_samples: 32, image_size: 8}
batch: {per_worker: 16}
optimizer: {name: lars, momentum: 0.9, weight_decay: 5.0e-4, trust_coefficient: 0.02}
schedule: {base_lr: 0.5, base_batch: 32, warmup: gradual, warmup_epochs: 0.5, decay: poly, power: 2}
train: {epochs: 2, log_every: 2}
output: {progress: false, tensorboard: false, checkpoint_every: 0}
launcher: {threads_per_rank: 1}
"""
METRIC_PNGS = ("loss.png", "accuracy.png", "lr.png", "images_per_sec.png")


def _env():
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))})
    env.pop("LARGEBATCH_FAULT", None)
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished runs of the real runner (one process each): global batch 16 and 32."""
    base = tmp_path_factory.mktemp("report")
    exp = base / "sweep.yaml"
    exp.write_text(EXP)
    out = {}
    for batch in (16, 32):
        run_dir = base / f"b{batch}"
        proc = subprocess.run([sys.executable, "-m", "largebatch.runner", str(exp), f"batch.per_worker={batch}",
                               f"output.run_dir={run_dir}"], cwd=base, env=_env(), capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (run_dir / "summary.json").is_file() and (run_dir / "trust_ratios.csv").is_file()
        out[batch] = run_dir
    return out


def copy_run(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("report"))
    return dst


def assert_png(path, min_size=(600, 400)):
    assert path.is_file(), f"{path} not written"
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
        assert w >= min_size[0] and h >= min_size[1], (path, im.size)
        extrema = im.convert("L").getextrema()
        assert extrema[0] < 100 and extrema[1] > 200, f"{path} looks blank: {extrema}"   # ink on paper


def summary_lines(text):
    return {line[:13].strip(): line[13:] for line in text.splitlines() if line[:13].strip()}


def test_one_run_writes_pngs_and_a_summary(runs, capsys):
    run = runs[16]
    assert report.main([str(run)]) == 0
    text = capsys.readouterr().out
    for name in METRIC_PNGS + ("trust_ratios.png",):
        assert_png(run / "report" / name)
    with Image.open(run / "report" / "trust_ratios.png") as im:
        assert im.size[0] > 1000                     # the per-layer panel next to the lines
    lines = summary_lines(text)
    assert len(text.splitlines()) <= 24              # one screen
    summary = json.loads((run / "summary.json").read_text())
    assert lines["run"].startswith("sweep  (") and str(run) in lines["run"]
    assert lines["status"] == "completed"
    assert lines["framework"] == "torch · small_cnn · lars"
    assert lines["batch"].startswith("global 16 = 16 per worker × 1 rank × 1 accumulation")
    assert lines["steps"] == f"{summary['steps_done']} of {summary['total_steps']} (2 epochs)"
    assert lines["loss"] == (f"train {summary['final_train_loss']:.4f} · eval {summary['final_eval_loss']:.4f}")
    assert lines["accuracy"] == f"eval {summary['final_eval_accuracy']:.4f}"
    assert lines["images/s"].endswith("(steady mean)")
    assert lines["wall time"].endswith(" s training, this launch")       # not start-up, not earlier launches
    assert lines["hosts"] == summary["hosts"][0]
    # small_cnn: the default adapts all 8 tensors (weights, BN scale and shift, the classifier's bias)
    assert lines["trust ratio"].startswith("8 adapted layers of 8; at step ")
    low, high = re.fullmatch(r"8 adapted layers of 8; at step \d+ from \S+ \((\S+)\) to \S+ \((\S+)\)",
                             lines["trust ratio"]).groups()
    assert {low, high} <= {"features.0.weight", "features.1.weight", "features.1.bias", "features.4.weight",
                           "features.5.weight", "features.5.bias", "classifier.weight", "classifier.bias"}
    assert lines["report"].startswith(f"{run / 'report'}/: loss.png accuracy.png lr.png images_per_sec.png "
                                      f"trust_ratios.png")


def test_the_command_line_runs_report(runs, tmp_path):
    out = tmp_path / "pictures"
    proc = subprocess.run([sys.executable, "-m", "largebatch.launchers.cli", "report", str(runs[32]), "--out", str(out)],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "status       completed" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(METRIC_PNGS + ("trust_ratios.png",))
    help_text = subprocess.run([sys.executable, "-m", "largebatch.launchers.cli", "--help"], env=_env(),
                               capture_output=True, text=True, timeout=60).stdout
    assert "report RUN_DIR" in help_text


def test_several_runs_side_by_side(runs, tmp_path, capsys, monkeypatch):
    a = copy_run(runs[16], tmp_path / "sweep")           # same experiment name: the folder names tell them apart
    b = copy_run(runs[32], tmp_path / "sweep-2")
    out = tmp_path / "cmp"
    assert report.main([str(a), str(b), "--out", str(out), "--x", "epoch"]) == 0
    text = capsys.readouterr().out.splitlines()
    header = text[0].split()
    assert header[:4] == ["run", "status", "framework", "optimizer"] and "hosts" in header
    assert text[1].split()[:5] == ["sweep", "completed", "torch", "lars", "16"]
    assert text[2].split()[:5] == ["sweep-2", "completed", "torch", "lars", "32"]
    assert text[-1].startswith("report") and str(out) in text[-1]
    for name in METRIC_PNGS + ("trust_ratios-sweep.png", "trust_ratios-sweep-2.png"):
        assert_png(out / name)
    assert not (a / "report").exists()
    # the legend labels: run name and global batch
    runs_ = [report.load_run(str(a)), report.load_run(str(b))]
    report._label_runs(runs_)
    assert [r.label for r in runs_] == ["sweep (B=16)", "sweep-2 (B=32)"]
    # without --out: ./report-<timestamp>
    monkeypatch.chdir(tmp_path)
    assert report.main([str(a), str(b)]) == 0
    made = [p for p in tmp_path.iterdir() if p.name.startswith("report-")]
    assert len(made) == 1 and (made[0] / "loss.png").is_file()


def test_unfinished_sgd_and_diverged_runs(runs, tmp_path, capsys):
    running = copy_run(runs[16], tmp_path / "running")
    (running / "summary.json").unlink()                  # still running: config.yaml and metrics only
    (running / "trust_ratios.csv").unlink()              # as SGD writes none
    assert report.main([str(running)]) == 0
    out = capsys.readouterr().out
    lines = summary_lines(out)
    assert lines["status"].startswith("no summary.json")
    assert lines["framework"] == "torch · small_cnn · lars" and lines["batch"] == "global 16"
    assert lines["trust ratio"] == "none recorded"
    assert "note: trust_ratios.png: not drawn" in out
    assert not (running / "report" / "trust_ratios.png").exists()
    assert (running / "report" / "loss.png").is_file()

    diverged = copy_run(runs[32], tmp_path / "diverged")
    s = json.loads((diverged / "summary.json").read_text())
    s.update(status="diverged", final_train_loss=None)
    (diverged / "summary.json").write_text(json.dumps(s))
    with open(diverged / "metrics.csv", "a", newline="") as fh:     # NaN losses are written as empty cells
        fh.write("train,999,9.0,0.1,,,100.0,1.0,\n")
    assert report.main([str(diverged), str(running), "--out", str(tmp_path / "o")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[:2] == ["diverged", "diverged"] and table[2].split()[:2] == ["running", "running?"]
    assert_png(tmp_path / "o" / "loss.png")


def test_the_noise_scale_is_plotted_beside_the_loss_and_summarised(runs, tmp_path, capsys):
    """A run that measured the gradient noise scale (several ranks, or accumulation): its column
    is drawn (noise_scale.png) and the summary says what it means for the run's global batch."""
    run = copy_run(runs[16], tmp_path / "noisy")
    with open(run / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    for i, r in enumerate(rows):
        if r["kind"] == "train":
            r["noise_scale"] = str(8.0 * (i + 1))          # grows as the loss falls
    with open(run / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = json.loads((run / "summary.json").read_text())
    summary["noise_scale"] = 48.0
    (run / "summary.json").write_text(json.dumps(summary))
    assert report.main([str(run)]) == 0
    lines = summary_lines(capsys.readouterr().out)
    assert lines["noise scale"] == "B_simple 48 at global batch 16: 4.00× the fewest steps, 1.33× the fewest examples"
    assert_png(run / "report" / "noise_scale.png")
    assert report.main([str(runs[16]), "--out", str(tmp_path / "plain")]) == 0
    out = capsys.readouterr().out
    assert "note: noise_scale.png: not drawn, no noise scale recorded" in out
    assert "noise scale" not in summary_lines(out)


def test_many_layers_are_drawn_with_a_colormap(runs, tmp_path, capsys):
    """A ResNet-sized trust_ratios.csv: 60 layers, one line each, no legend of 60 names."""
    run = copy_run(runs[16], tmp_path / "deep")
    with open(run / "trust_ratios.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "layer", "trust_ratio"])
        for step in range(10, 110, 10):
            for i in range(60):
                w.writerow([step, f"layer{i // 4}.{i % 4}.conv.weight", f"{1e-4 * 1.15 ** i * (1 + step / 500):.6g}"])
                w.writerow([step, f"layer{i // 4}.{i % 4}.bn.bias", 1])
    assert report.main([str(run)]) == 0
    assert "60 adapted layers of 120" in capsys.readouterr().out
    assert_png(run / "report" / "trust_ratios.png", min_size=(1000, 500))


def test_resumed_rows_replace_repeated_steps(runs, tmp_path):
    run = copy_run(runs[16], tmp_path / "resumed")
    rows = (run / "metrics.csv").read_text().splitlines()
    again = [r.split(",") for r in rows[1:] if r.startswith("train,")][-2:]   # a resume re-logs the last steps
    for r in again:
        r[4] = "0.125"
    (run / "metrics.csv").write_text("\n".join(rows + [",".join(r) for r in again]) + "\n")
    loaded = report.load_run(str(run))
    steps = [r["step"] for r in loaded.train]
    assert steps == sorted(set(steps))
    assert [r["loss"] for r in loaded.train[-2:]] == [0.125, 0.125]


@pytest.mark.parametrize("case, expected", [
    ("missing", "no such folder (expected a run directory with metrics.csv"),
    ("file", "not a folder (expected a run directory"),
    ("no_metrics", "no metrics.csv (expected a run directory written by largebatch run)"),
    ("empty", "metrics.csv: empty file (expected a header line and metric rows)"),
    ("header_only", "metrics.csv: no train or eval rows yet"),
    ("foreign", "metrics.csv: expected the header kind,step,epoch,lr,loss,accuracy,images_per_sec,elapsed_s,"
                "noise_scale, got a,b"),
    ("bad_number", "metrics.csv: line 2: expected a number in column 'loss', got 'abc'"),
    ("bad_summary", "summary.json: expected the JSON object largebatch run writes"),
    ("bad_trust", "trust_ratios.csv: expected the header step,layer,trust_ratio, got x,y"),
])
def test_bad_input_is_exit_2_and_one_line(runs, tmp_path, capsys, case, expected):
    target = tmp_path / case
    header = "kind,step,epoch,lr,loss,accuracy,images_per_sec,elapsed_s\n"
    if case == "file":
        target.write_text("x")
    elif case != "missing":
        target.mkdir()
        if case in ("bad_summary", "bad_trust"):
            shutil.rmtree(target)
            copy_run(runs[16], target)
        metrics = {"empty": "", "header_only": header, "foreign": "a,b\n1,2\n",
                   "bad_number": header + "train,2,0.1,0.1,abc,,10,1\n"}.get(case)
        if metrics is not None:
            (target / "metrics.csv").write_text(metrics)
        if case == "bad_summary":
            (target / "summary.json").write_text("{truncated")
        if case == "bad_trust":
            (target / "trust_ratios.csv").write_text("x,y\n1,2\n")
    good = runs[16]
    assert report.main([str(good), str(target), "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr()
    lines = err.err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"largebatch report: {target}")
    assert expected in lines[0]
    assert err.out == ""
    assert not (tmp_path / "never").exists()              # nothing written


def test_a_run_stopped_during_start_up_is_named_so(tmp_path, capsys):
    """Only launch.sh and the launcher's summary.json (a Ctrl-C before the first step)."""
    run = tmp_path / "early"
    run.mkdir()
    (run / "launch.sh").write_text("#!/bin/sh\n")
    (run / "summary.json").write_text('{"status": "stopped", "stopped_by": "SIGINT"}')
    assert report.main([str(run)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"largebatch report: {run}: the run stopped before its first step (summary.json says status 'stopped', "
        f"by SIGINT; no metrics.csv)"]


def test_without_matplotlib_plots_are_refused_in_one_line_and_the_summary_still_works(runs, tmp_path):
    """matplotlib is not a core dependency: a torch-only install gets one line, not a traceback."""
    code = ("import sys; sys.modules['matplotlib'] = None; "
            "from largebatch.launchers import report; sys.exit(report.main(sys.argv[1:]))")
    out = tmp_path / "pngs"
    proc = subprocess.run([sys.executable, "-c", code, str(runs[16]), "--out", str(out)], env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["largebatch report: the PNGs need matplotlib, which is not installed (pip "
                                        "install matplotlib, or largebatch[report]); --no-plots prints the summary "
                                        "alone"]
    assert not out.exists()
    proc = subprocess.run([sys.executable, "-c", code, str(runs[16]), "--no-plots"], env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "trust ratio" in proc.stdout, proc.stderr


def test_out_must_be_a_folder(runs, tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert report.main([str(runs[16]), "--out", str(tmp_path / "f")]) == 2
    assert "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        report.main([])
    assert exc.value.code == 2
