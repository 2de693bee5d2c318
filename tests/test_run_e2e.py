"""The per-rank runner: data (synthetic, image folders of real PNG/JPEG files), sharding,
the TensorBoard writer, and `largebatch run` end to end with 2 ranks for torch and Keras."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from largebatch.runner import data as lbdata
from largebatch.runner.comm import first_host, torch_distributed_env
from largebatch.runner.entry import world_rank_from_env, world_size_from_env
from largebatch.runner.tbevents import EventWriter

ROOT = Path(__file__).resolve().parents[1]
PIL = pytest.importorskip("PIL.Image")


def make_images(root, classes=("ant", "bee", "cat"), per_class=4, size=(20, 28), mode="RGB"):
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        folder = root / name / "nested"        # images may sit deeper than the class folder
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (size[0] + i, size[1]) + ((3,) if mode == "RGB" else ())
            arr = (rng.random(shape) * 60 + 60 * c).astype(np.uint8)
            PIL.fromarray(arr, mode).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    (root / classes[0] / "notes.txt").write_text("not an image")
    return root


# ------------------------------------------------------------------------------ data
def test_synthetic_images_are_deterministic_and_labelled():
    a = lbdata.SyntheticImages(64, 8, 3, 5, seed=1)
    b = lbdata.SyntheticImages(64, 8, 3, 5, seed=1)
    x, y = a.batch([0, 5, 9])
    x2, y2 = b.batch([0, 5, 9])
    assert x.shape == (3, 8, 8, 3) and x.dtype == np.float32 and y.dtype == np.int64
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert set(a.labels) <= set(range(5))
    val = lbdata.SyntheticImages(16, 8, 3, 5, seed=1, split="val")
    assert np.array_equal(val.patterns, a.patterns)          # same classes, other images


def test_image_folder_decodes_png_and_jpeg(tmp_path):
    root = make_images(tmp_path / "train")
    ds = lbdata.ImageFolder(str(root), image_size=16, resize=18, channels=3, seed=3)
    assert ds.classes == ["ant", "bee", "cat"] and len(ds) == 12
    assert list(ds.labels) == [0] * 4 + [1] * 4 + [2] * 4
    x, y = ds.batch([0, 5, 11], epoch=0, train=True)
    assert x.shape == (3, 16, 16, 3) and x.dtype == np.float32 and list(y) == [0, 1, 2]
    again, _ = ds.batch([0, 5, 11], epoch=0, train=True)
    assert np.array_equal(x, again)                                   # seeded augmentation
    other, _ = ds.batch([0, 5, 11], epoch=1, train=True)
    assert not np.array_equal(x, other)                               # a new epoch, new crops
    e1, _ = ds.batch([1], train=False)
    e2, _ = ds.batch([1], epoch=7, train=False)
    assert np.array_equal(e1, e2)                                     # eval: centre crop
    # class colour survives normalisation: class 2 is brighter than class 0
    assert x[2].mean() > x[0].mean()


def test_image_folder_grayscale(tmp_path):
    root = make_images(tmp_path / "g", mode="L")
    ds = lbdata.ImageFolder(str(root), image_size=8, resize=10, channels=1)
    x, _ = ds.batch([0, 1])
    assert x.shape == (2, 8, 8, 1)


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(lbdata.DataError) as err:
        lbdata.ImageFolder(str(tmp_path / "empty"), 8, 10, 3)
    assert str(err.value) == (f"data.path: no images (.jpg, .jpeg, .png, .bmp, .ppm, .pgm, .webp, .tif, .tiff) "
                              f"under '{tmp_path / 'empty'}'")
    train = make_images(tmp_path / "train", classes=("a", "b"))
    val = make_images(tmp_path / "val", classes=("a", "zebra"))
    with pytest.raises(lbdata.DataError) as err:
        lbdata.ImageFolder(str(val), 8, 10, 3, classes=["a", "b"], key="data.val_path")
    assert str(err.value) == "data.val_path: class folder 'zebra' is not a class of data.path"
    (train / "a" / "nested" / "0.jpg").write_bytes(b"not a jpeg")
    ds = lbdata.ImageFolder(str(train), 8, 10, 3)
    with pytest.raises(lbdata.DataError, match="cannot read image"):
        ds.batch([0])


def test_epoch_batches_shard_disjointly_and_reshuffle():
    kw = dict(seed=0, size=4, per_worker=3, accumulation=2, steps=5)
    shards = [lbdata.epoch_batches(200, 0, rank=r, **kw) for r in range(4)]
    assert all(s.shape == (10, 3) for s in shards)
    seen = np.concatenate([s.ravel() for s in shards])
    assert len(set(seen)) == len(seen) == 5 * 3 * 2 * 4            # disjoint, one epoch's worth
    assert not np.array_equal(shards[0], lbdata.epoch_batches(200, 1, rank=0, **kw))
    assert np.array_equal(lbdata.epoch_batches(10, 0, seed=0, rank=1, size=2, per_worker=2, accumulation=1, steps=2,
                                               shuffle=False), [[1, 3], [5, 7]])


def test_eval_batches_cover_every_image_once():
    parts = [lbdata.eval_batches(11, rank=r, size=3, batch=2) for r in range(3)]
    flat = sorted(int(i) for p in parts for b in p for i in b)
    assert flat == list(range(11))


def test_prefetcher_keeps_order(tmp_path):
    ds = lbdata.ImageFolder(str(make_images(tmp_path / "t")), 8, 10, 3)
    batches = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    got = list(lbdata.Prefetcher(ds, batches, workers=3))
    for (x, y), b in zip(got, batches):
        ex, ey = ds.batch(b)
        assert np.array_equal(x, ex) and np.array_equal(y, ey)


# ------------------------------------------------------------------------------ tensorboard, env
def tensorboard_scalars(log_dir):
    """{tag: [(step, value)]} as TensorBoard's own reader sees the event files of ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_event_writer_is_read_by_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    w = EventWriter(tmp_path)
    w.scalars(3, {"train/loss": 1.5, "trust_ratio/conv1.weight": 0.25})
    w.scalars(4, {"train/loss": 1.25})
    w.scalars(2 ** 40, {"x": -2.0})
    w.close()
    assert Path(w.path).name.startswith("events.out.tfevents.")
    assert tensorboard_scalars(tmp_path) == {"train/loss": [(3, 1.5), (4, 1.25)], "trust_ratio/conv1.weight": [(3, 0.25)],
                                             "x": [(2 ** 40, -2.0)]}


def test_the_writer_does_not_import_torch_or_tensorflow():
    code = ("import sys, tempfile; from largebatch.runner.tbevents import EventWriter; "
            "w = EventWriter(tempfile.mkdtemp()); w.scalars(1, {'a': 1.0}); w.close(); "
            "print(sorted(m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "[]\n", proc.stderr[-2000:]


@pytest.mark.parametrize("env, size, rank", [
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3"}, 4, 3),
    ({"HOROVOD_SIZE": "2", "HOROVOD_RANK": "1"}, 2, 1),
    ({"PMI_SIZE": "8", "PMI_RANK": "5"}, 8, 5),
    ({"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "16", "SLURM_PROCID": "9"}, 16, 9),
    ({"SLURM_NTASKS": "16", "SLURM_PROCID": "0"}, None, 0),      # a batch script, not a step
    ({}, None, 0),
])
def test_world_size_and_rank_from_env(env, size, rank):
    assert world_size_from_env(env) == size and world_rank_from_env(env) == rank


# ------------------------------------------------------------------------------ runs
def _env():
    env = dict(os.environ)
    env.update({"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
                "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1",
                "OMPI_MCA_btl_vader_single_copy_mechanism": "none"})
    return env


def _horovodrun():
    exe = Path(sys.executable).with_name("horovodrun")
    return exe if exe.exists() else shutil.which("horovodrun")


def _check_run_dir(run_dir, framework, ranks):
    files = {p.name for p in run_dir.iterdir()}
    assert {"config.yaml", "metrics.csv", "metrics.jsonl", "summary.json", "tensorboard"} <= files, files
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["framework"] == framework and summary["ranks"] == ranks
    assert summary["steps_done"] == summary["total_steps"] > 0
    assert summary["images_per_sec"] > 0
    with open(run_dir / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    train = [r for r in rows if r["kind"] == "train"]
    assert train and all(float(r["images_per_sec"]) > 0 for r in train)
    assert float(train[-1]["loss"]) < float(train[0]["loss"])          # it learns
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(jsonl) == len(rows)
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    tags = set(scalars)
    assert {"train/loss", "train/lr", "train/images_per_sec"} <= tags
    logged = [(int(r["step"]), float(r["loss"])) for r in train]
    assert [s for s, _ in scalars["train/loss"]] == [s for s, _ in logged]      # the rows of metrics.csv
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([v for _, v in logged], rel=1e-6)
    return summary, rows, tags


@pytest.mark.parametrize("nodelist, first", [("node[03-05,9],gpu1", "node03"), ("a,b", "a"), ("lbh1", "lbh1"),
                                             ("n[1-2]-ib[3-4]", "n1-ib3"), ("x[7]", "x7")])
def test_first_host_of_a_slurm_host_list(nodelist, first):
    assert first_host(nodelist) == first


def test_torch_distributed_env_from_a_slurm_step_or_a_world_of_one():
    step = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "8",
            "SLURM_STEP_NODELIST": "cn[07-08]", "SLURM_LOCALID": "1"}
    assert torch_distributed_env(29500, step) == {"MASTER_ADDR": "cn07", "MASTER_PORT": "29500", "RANK": "3",
                                                  "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    alone = torch_distributed_env(None, {})
    assert alone["WORLD_SIZE"] == "1" and alone["RANK"] == "0" and alone["MASTER_ADDR"] == "127.0.0.1"
    assert torch_distributed_env(29500, {"TORCHELASTIC_RUN_ID": "x", "MASTER_ADDR": "h", **step}) == {}


@pytest.mark.skipif(_horovodrun() is None, reason="horovodrun not installed (make setup)")
@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_largebatch_run_synthetic_example_on_two_ranks(tmp_path, framework):
    example = ROOT / "examples" / f"synthetic_{framework}.yaml"
    cmd = [sys.executable, "-m", "largebatch.launchers.cli", "run", str(example), "--np", "2", f"output.dir={tmp_path}"]
    env = _env()
    for name in ("TF_CPP_MIN_LOG_LEVEL", "LARGEBATCH_PROGRESS", "LARGEBATCH_TF_LOGS"):   # largebatch run's defaults
        env.pop(name, None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    run_dir = tmp_path / f"synthetic_{framework}"
    summary, rows, tags = _check_run_dir(run_dir, framework, 2)
    # what a person reads (stderr is a pipe here, as a log file): rank 0's progress as plain lines
    # and its summary, without the launcher's rank tags or TensorFlow's C++ start-up lines
    for text in (proc.stdout, proc.stderr):
        assert "[1,0]<" not in text and "[0]<" not in text and "\r" not in text, text[-3000:]
    for noise in ("oneDNN custom operations", "cpu_feature_guard", "absl::InitializeLog", "XLA service"):
        assert noise not in proc.stderr, proc.stderr[-3000:]
    steps = [line for line in proc.stderr.splitlines() if line.startswith(f"synthetic_{framework}: step ")]
    assert len(steps) == len([r for r in rows if r["kind"] == "train"]), proc.stderr[-3000:]
    assert steps[-1].startswith(f"synthetic_{framework}: step {summary['total_steps']}/{summary['total_steps']}  loss ")
    assert proc.stdout.splitlines()[-1].startswith(f"run dir: {run_dir} (completed, ")
    assert summary["global_batch"] == (32 if framework == "torch" else 64)
    assert summary["final_eval_accuracy"] > 0.5
    assert any(r["kind"] == "eval" for r in rows) and "eval/accuracy" in tags
    assert (run_dir / "trust_ratios.csv").exists() and any(t.startswith("trust_ratio/") for t in tags)
    assert (run_dir / "launch.sh").read_text().count("-m largebatch.launchers.hvdrun ") == 1      # horovodrun
    assert "train.resume=auto" in (run_dir / "launch.sh").read_text()       # rerunning it continues the run
    config = (run_dir / "config.yaml").read_text()
    assert "global_batch:" in config and "steps_per_epoch:" in config


@pytest.mark.multirank
@pytest.mark.skipif(_horovodrun() is None, reason="horovodrun not installed (make setup)")
def test_clars_and_batchnorm_statistics_are_the_same_under_both_engines(tmp_path):
    """CLARS's per-example norm sums reduced by torch.distributed as by Horovod; small_cnn's
    BatchNorm statistics kept per rank under DDP as under Horovod, so the evaluations (every
    rank its share, with its own statistics) agree to the last bit too, not only the weights."""
    example = ROOT / "examples" / "synthetic_torch.yaml"
    runs = {}
    for launcher in ("horovodrun", "torchrun"):
        run_dir = tmp_path / launcher
        proc = subprocess.run([sys.executable, "-m", "largebatch.launchers.cli", "run", str(example), "--np", "2",
                               "--launcher", launcher, "optimizer.name=clars", "data.samples=128",
                               "data.val_samples=64", "output.progress=false", "launcher.threads_per_rank=1",
                               f"output.run_dir={run_dir}"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                              timeout=240)
        assert proc.returncode == 0, (launcher, proc.stderr[-3000:])
        summary = json.loads((run_dir / "summary.json").read_text())
        with open(run_dir / "metrics.csv") as fh:
            evals = [(r["step"], r["loss"], r["accuracy"]) for r in csv.DictReader(fh) if r["kind"] == "eval"]
        runs[launcher] = (summary["weights_sha1"], summary["final_train_loss"], evals)
    assert runs["torchrun"] == runs["horovodrun"] and len(runs["torchrun"][2]) == 2


def test_runner_on_an_image_folder_single_process(tmp_path):
    make_images(tmp_path / "train", per_class=6)
    make_images(tmp_path / "val", per_class=2)
    exp = tmp_path / "folder.yaml"
    exp.write_text(f"""
framework: torch
optimizer: lars
data: {{kind: folder, path: {tmp_path / 'train'}, val_path: {tmp_path / 'val'}, image_size: 16}}
batch: {{per_worker: 4, accumulation_steps: 2}}
schedule: {{base_lr: 0.5, base_batch: 8}}
train: {{epochs: 3, log_every: 1}}
output: {{dir: {tmp_path / 'runs'}, progress: false}}
""")
    proc = subprocess.run([sys.executable, "-m", "largebatch.runner", str(exp)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    run_dir = tmp_path / "runs" / "folder"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_per_epoch"] == 18 // 8 and summary["total_steps"] == 6
    assert summary["final_eval_accuracy"] is not None
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "epoch-0001.pt", "epoch-0002.pt", "epoch-0003.pt"]


def test_runner_reports_data_problems_as_one_line(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    exp = tmp_path / "bad.yaml"
    exp.write_text(f"data: {{kind: folder, path: {tmp_path / 'train'}}}\noutput: {{dir: {tmp_path / 'runs'}}}\n")
    proc = subprocess.run([sys.executable, "-m", "largebatch.runner", str(exp)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"data.path: no images (.jpg, .jpeg, .png, .bmp, .ppm, .pgm, .webp, .tif, .tiff) under "
        f"'{tmp_path / 'train'}'")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_runner_trains_with_the_frameworks_own_sgd(framework, tmp_path):
    """optimizer: sgd is the framework's SGD (registry: not layer-wise): it trains, records no
    trust ratios."""
    exp = tmp_path / "sgd.yaml"
    exp.write_text(f"""
framework: {framework}
optimizer: {{name: sgd, momentum: 0.9, weight_decay: 0.0005}}
data: {{samples: 64, val_samples: 0}}
batch: {{per_worker: 16}}
schedule: {{base_lr: 0.1, base_batch: 16, warmup_epochs: 1}}
train: {{steps: 6, log_every: 2}}
output: {{dir: {tmp_path / 'runs'}, progress: false, checkpoint_every: 0}}
""")
    proc = subprocess.run([sys.executable, "-m", "largebatch.runner", str(exp)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    run_dir = tmp_path / "runs" / "sgd"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["optimizer"] == "sgd" and summary["steps_done"] == 6 and summary["status"] == "completed"
    assert np.isfinite(summary["final_train_loss"])
    assert not (run_dir / "trust_ratios.csv").exists() or (run_dir / "trust_ratios.csv").read_text().count("\n") <= 1


def test_torch_sgd_from_the_registry_decays_only_what_the_policy_decays():
    import torch
    from largebatch.config import load_dict
    from largebatch.runner.torch_train import build_model, build_optimizer
    exp = load_dict({"optimizer": {"name": "sgd", "weight_decay": 5e-4, "nesterov": True}})
    model = build_model(exp.cfg, exp.derived)
    opt = build_optimizer(exp.cfg, model, 0.1, track_trust_ratios=False)
    assert type(opt) is torch.optim.SGD and opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 5e-4 for p in g["params"]}
    assert decayed and decayed == {id(p) for p in model.parameters() if p.ndim > 1}
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups if id(g["params"][0]) not in decayed)


@pytest.mark.parametrize("name, cls, fixed", [("larc", "LARS", {"clip": True}), ("lars", "LARS", {"clip": False}),
                                              ("clars", "CLARS", {}), ("lamb", "LAMB", {"betas": (0.8, 0.9)})])
def test_torch_runner_builds_the_registry_class_with_the_yaml_values(name, cls, fixed):
    import largebatch.torch as lbt
    from largebatch.config import load_dict
    from largebatch.runner.torch_train import build_model, build_optimizer
    extra = {"betas": [0.8, 0.9]} if name == "lamb" else {"trust_coefficient": 0.02}
    exp = load_dict({"optimizer": {"name": name, "weight_decay": 1e-4, **extra}})
    opt = build_optimizer(exp.cfg, build_model(exp.cfg, exp.derived), 0.1, track_trust_ratios=True)
    assert type(opt) is getattr(lbt, cls)
    group = opt.param_groups[0]
    assert group["weight_decay"] == 1e-4 and all(group[k] == v for k, v in fixed.items())
    if name != "lamb":
        assert group["trust_coefficient"] == 0.02


def test_a_runner_started_without_a_launcher_says_what_the_world_size_changed(tmp_path):
    """Issue 27 item 5: the YAML's 2 ranks, started as one plain process: one line says what
    changed (global batch and peak lr), and the run goes on with 1 rank."""
    exp = tmp_path / "two.yaml"
    exp.write_text(f"""
framework: torch
optimizer: lars
launcher: {{np: 2}}
data: {{samples: 64, val_samples: 0}}
batch: {{per_worker: 16}}
schedule: {{base_lr: 0.5, base_batch: 32, warmup_epochs: 0}}
train: {{epochs: 1}}
output: {{dir: {tmp_path / 'runs'}, progress: false, checkpoint_every: 0}}
""")
    proc = subprocess.run([sys.executable, "-m", "largebatch.runner", str(exp)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("largebatch: the experiment says 2 rank(s), this job has 1: global batch 32 -> 16 (16 per rank x 1 x 1 "
            "accumulation), peak lr 0.5 -> 0.25; set batch.global to keep the global batch") in proc.stderr
    assert json.loads((tmp_path / "runs" / "two" / "summary.json").read_text())["global_batch"] == 16
