"""Issue 22 §2-3: the user's own model and data from YAML (model.factory, data.kind arrays | python).

A user-style module (not a built-in): MLPs with named layers for torch and Keras, NumPy data.
- bad input: each case is one line naming the key, exit 2, nothing written (``largebatch run``);
- 2 ranks (horovodrun, each its own half of every global batch) end with the weights of one
  process on the concatenated batch, for torch and Keras;
- SIGTERM, then ``train.resume=auto``: the same weights as an uninterrupted run (torch);
- ``--dry-run`` builds model and data once and prints the parameter count and batch shapes.
"""
import json
import os
import signal
import subprocess
import sys
import re
import time
from pathlib import Path

import numpy as np
import pytest

from multirank import environ_copy, horovodrun_path, wait_or_kill

ROOT = Path(__file__).resolve().parent.parent
LARGEBATCH = str(Path(sys.executable).with_name("largebatch"))

MODULE = '''
import numpy as np

NOT_CALLABLE = 3


def blobs(samples=256, features=6, classes=3, seed=0, val=True):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, features))
    y = rng.integers(0, classes, samples)
    x = (centres[y] + rng.standard_normal((samples, features))).astype(np.float32)
    return (x[:192], y[:192]), ((x[192:], y[192:]) if val else None)


class Pairs:
    """A map-style dataset: len and [i] -> (x, y)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def map_style():
    (x, y), val = blobs()
    return Pairs(x, y), val


def float_labels():
    (x, y), _ = blobs()
    return (x, y + 0.5), None


def mismatched():
    (x, y), _ = blobs()
    return (x, y[:-1]), None


def raises(**kwargs):
    raise ValueError("width must be even")


def not_a_model(input_shape, num_classes):
    return {"layers": 2}


def not_a_pair():
    return [1, 2, 3]


def torch_mlp(input_shape, num_classes, hidden=8):
    import torch
    torch.manual_seed(0)

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Linear(input_shape[0], hidden)
            self.head = torch.nn.Linear(hidden, num_classes)

        def forward(self, x):
            return self.head(torch.tanh(self.encoder(x)))
    return MLP()


def keras_mlp(input_shape, num_classes, hidden=8):
    import keras
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape=input_shape)
    h = keras.layers.Dense(hidden, activation="tanh", name="encoder")(inputs)
    return keras.Model(inputs, keras.layers.Dense(num_classes, name="head")(h))
'''


def experiment(framework="torch", model="models.py:torch_mlp", data="kind: python\n  factory: models.py:blobs"):
    """A user's exp.yaml; ``data``: the data section's lines (later ones indented by two spaces)."""
    return "\n".join([
        f"framework: {framework}",
        "model:",
        f"  factory: {model}",
        "data:",
        f"  {data}",
        "batch: {per_worker: 32}",
        "optimizer: {name: lars, momentum: 0.9, weight_decay: 1.0e-4, trust_coefficient: 0.02}",
        "schedule: {base_lr: 1.0, base_batch: 64, warmup_epochs: 0}",
        "train: {epochs: 2}",
        "output: {dir: runs, progress: false}",
        "launcher: {threads_per_rank: 1}",
    ]) + "\n"


@pytest.fixture
def project(tmp_path):
    """A user's folder: models.py, arrays.npz and a writer for exp.yaml."""
    (tmp_path / "models.py").write_text(MODULE)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((128, 5)).astype(np.float32)
    y = rng.integers(0, 3, 128)
    np.savez(tmp_path / "arrays.npz", x_train=x[:96], y_train=y[:96], x_val=x[96:], y_val=y[96:])
    np.savez(tmp_path / "short.npz", x_train=x[:96], y_train=y[:90])
    np.savez(tmp_path / "no_y.npz", x_train=x)

    def write(text, name="exp.yaml"):
        (tmp_path / name).write_text(text)
        return tmp_path / name
    return tmp_path, write


def largebatch(cwd, *args, timeout=120):
    return subprocess.run([LARGEBATCH, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=environ_copy())


BAD = [
    ("model.factory: no_such_module:fn", {"model": "no_such_module:fn"},
     "model.factory: no module named 'no_such_module' (from 'no_such_module:fn'; is it on PYTHONPATH?)"),
    ("no such file", {"model": "nowhere.py:fn"}, "model.factory: no such file '...nowhere.py' (from '...nowhere.py:fn')"),
    ("no attribute", {"model": "models.py:nope"}, "model.factory: ...models.py has no attribute 'nope'"),
    ("not callable", {"model": "models.py:NOT_CALLABLE"}, "model.factory: ...models.py:NOT_CALLABLE is not callable (got int)"),
    ("args refused", {"extra": "model_args: {depth: 3}"},
     "model.args: ...models.py:torch_mlp does not accept them (got an unexpected keyword argument 'depth')"),
    ("factory raises", {"model": "models.py:raises"},
     "model.factory: ...models.py:raises raised ValueError: width must be even"),
    ("wrong return type", {"model": "models.py:not_a_model"},
     "model.factory: ...models.py:not_a_model returned dict; expected a torch.nn.Module (framework 'torch')"),
    ("keras wants a keras.Model", {"framework": "keras"},
     "model.factory: ...models.py:torch_mlp returned MLP; expected a keras.Model (framework 'keras')"),
    ("name and factory", {"extra": "model_name: small_cnn"},
     "model.factory: set either model.name (a built-in model) or model.factory (your own), not both"),
    ("arrays: lengths", {"data": "kind: arrays\n  path: short.npz"},
     "data.path: x_train/y_train: expected one label per sample (96), got y of shape (90,)"),
    ("arrays: missing y", {"data": "kind: arrays\n  path: no_y.npz"},
     "data.path: expected arrays x_train and y_train in 'no_y.npz', missing y_train (has: x_train)"),
    ("arrays: no file", {"data": "kind: arrays\n  path: gone.npz"},
     "data.path: expected an .npz file with x_train, y_train, got 'gone.npz' (no such file)"),
    ("float labels", {"data": "kind: python\n  factory: models.py:float_labels"},
     "data.factory: train: expected integer class labels, got float64 values such as ...0.5"),
    ("mismatched", {"data": "kind: python\n  factory: models.py:mismatched"},
     "data.factory: train: expected one label per sample (192), got y of shape (191,)"),
    ("not (train, val)", {"data": "kind: python\n  factory: models.py:not_a_pair"},
     "data.factory: ...models.py:not_a_pair returned list; expected (train, val)"),
    ("num_classes", {"data": "kind: python\n  factory: models.py:blobs\n  num_classes: 2"},
     "data.num_classes: expected at least 3 (the labels go up to 2), got 2"),
    ("python data without factory", {"data": "kind: python"},
     "data.factory: required when data.kind is 'python' ('module:callable' or 'file.py:callable' returning (train, val))"),
    ("image keys on user data", {"data": "kind: python\n  factory: models.py:blobs\n  image_size: 32"},
     "data.image_size: not used with data.kind 'python' (your data reaches the model as given)"),
]


@pytest.mark.parametrize("case,change,line", BAD, ids=[c for c, _, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_nothing_written(project, case, change, line):
    folder, write = project
    text = experiment(framework=change.get("framework", "torch"), model=change.get("model", "models.py:torch_mlp"),
                      data=change.get("data", "kind: python\n  factory: models.py:blobs"))
    extra = change.get("extra", "")
    if extra.startswith("model_"):                 # a second key in the model section
        text = text.replace("model:\n", f"model:\n  {extra[len('model_'):]}\n")
    exp = write(text)
    # largebatch run for every case; validate (the same checks) for the first, to keep the suite short
    for command in (["run", exp, "--np", "1"],) + ((["validate", exp],) if case == BAD[0][0] else ()):
        proc = largebatch(folder, *command)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (command, proc.stderr[-2000:])
        pattern = ".*".join(map(re.escape, line.split("...")))
        assert re.fullmatch(pattern, lines[0]), lines[0]
    assert not (folder / "runs").exists()


def test_dry_run_builds_model_and_data_once_and_says_what_it_got(project):
    folder, write = project
    exp = write(experiment(data="kind: arrays\n  path: arrays.npz"))
    proc = largebatch(folder, "run", exp, "--np", "2", "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "data: 96 training samples, 32 validation, 3 classes; first batch x (32, 5) float32, y (32,) int64" \
        in proc.stderr
    assert "model: models.py:torch_mlp, 75 parameters" in proc.stderr         # 5·8 + 8 + 8·3 + 3
    assert not (folder / "runs").exists()


def test_a_map_style_dataset_trains_names_the_users_layers_and_excludes_by_them(project):
    folder, write = project
    exp = write(experiment(data="kind: python\n  factory: models.py:map_style"))
    proc = largebatch(folder, "run", exp, "--np", "1", "output.trust_ratios=true", "optimizer.exclude={adaptation: head}",
                      timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = folder / "runs" / "exp"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["model"] == "models.py:torch_mlp"
    assert summary["data"] == "python" and summary["steps_done"] == 12       # 192 // 32 × 2 epochs
    rows = [row.split(",") for row in (run / "trust_ratios.csv").read_text().splitlines()[1:]]
    assert {layer for _, layer, _ in rows} == {"encoder.weight", "encoder.bias", "head.weight", "head.bias"}
    # optimizer.exclude by the user's own parameter names: 'head' not adapted (trust ratio 1)
    assert {float(r) for _, layer, r in rows if layer.startswith("head")} == {1.0}
    assert {float(r) for _, layer, r in rows if layer.startswith("encoder")} != {1.0}
    report = largebatch(folder, "report", run, "--no-plots")
    assert report.returncode == 0 and "exp" in report.stdout, report.stderr[-2000:]


# ------------------------------------------------------------------------- across ranks
def _final_weights(framework, folder, run_dir):
    """The last checkpoint's parameters, loaded into the user's own model (name -> array)."""
    sys.path.insert(0, str(folder))
    try:
        import importlib
        models = importlib.import_module("models")
        importlib.reload(models)
        last = sorted((run_dir / "checkpoints").iterdir())[-1]
        if framework == "torch":
            from largebatch.torch.checkpoint import load_checkpoint
            model = models.torch_mlp((6,), 3)
            load_checkpoint(str(last), model, restore_rng=False)
            return {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
        from largebatch.keras.checkpoint import load_checkpoint
        model = models.keras_mlp((6,), 3)
        load_checkpoint(str(last), model, restore_rng=False)
        return {v.path: v.numpy().copy() for v in model.weights}
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("models", None)


@pytest.mark.multirank
@pytest.mark.skipif(horovodrun_path() is None, reason="horovodrun not installed")
@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_two_ranks_end_with_the_weights_of_one_process_on_the_concatenated_batch(project, framework):
    """2 ranks (each its half of every global batch of 64) against 1 process on all 64; torch
    also under torchrun (torch.distributed, DDP), in an environment where ``import horovod``
    fails, against the same YAML under horovodrun."""
    folder, write = project
    exp = write(experiment(framework=framework, model=f"models.py:{framework}_mlp"))
    runs = {"np2": ["--np", "2", "batch.per_worker=32"], "np1": ["--np", "1", "batch.per_worker=64"]}
    if framework == "torch":
        runs["torchrun"] = ["--np", "2", "batch.per_worker=32", "--launcher", "torchrun"]
        # launcher.compression: gradients sent in half precision (DDP's hook; Horovod's fp16)
        runs["torchrun-bf16"] = runs["torchrun"] + ["launcher.compression=bf16"]
        runs["np2-fp16"] = runs["np2"] + ["launcher.compression=fp16"]
    no_horovod = folder / "no_horovod" / "horovod"
    no_horovod.mkdir(parents=True)
    (no_horovod / "__init__.py").write_text("raise ImportError('horovod is not installed here (a test)')\n")
    for name, args in runs.items():
        env = environ_copy()
        if name.startswith("torchrun"):
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(no_horovod.parent), env.get("PYTHONPATH")]))
        proc = subprocess.run([LARGEBATCH, "run", str(exp), *args, f"output.run_dir=runs/{name}"], cwd=folder,
                              capture_output=True, text=True, timeout=240, env=env)
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
    summaries = {n: json.loads((folder / "runs" / n / "summary.json").read_text()) for n in runs}
    assert {s["global_batch"] for s in summaries.values()} == {64} and {s["steps_done"] for s in summaries.values()} == {6}
    assert all(summaries[n]["ranks_agree"] is True for n in runs if n != "np1")
    if framework == "torch":
        assert "horovod" not in summaries["torchrun"]["versions"]       # never imported there
        assert "horovod" in summaries["np2"]["versions"]
    weights = {n: _final_weights(framework, folder, folder / "runs" / n) for n in runs}
    for name in runs:
        assert set(weights[name]) == set(weights["np1"]) and len(weights[name]) == 4
    for a, b in [("np2", "np1"), ("torchrun", "np1"), ("torchrun", "np2")]:
        if a in weights:
            worst = max(float(np.max(np.abs(weights[a][k] - weights[b][k]))) for k in weights[a])
            print(f"{framework}: {a} vs {b}, max abs weight difference {worst:.3g}")
            assert worst <= 1e-5, (a, b, worst)
    for a in ("torchrun-bf16", "np2-fp16"):         # compressed: near the exact run, not equal to it
        if a in weights:
            worst = max(float(np.max(np.abs(weights[a][k] - weights["np2"][k]))) for k in weights[a])
            print(f"{framework}: {a} vs np2, max abs weight difference {worst:.3g}")
            assert 0 < worst < 2e-2, (a, worst)
    assert min(float(np.max(np.abs(w))) for w in weights["np1"].values()) > 0


@pytest.mark.multirank
@pytest.mark.skipif(horovodrun_path() is None, reason="horovodrun not installed")
def test_sigterm_then_resume_auto_gives_the_uninterrupted_weights(project):
    folder, write = project
    exp = write(experiment(data="kind: python\n  factory: models.py:blobs\n  args: {samples: 4096}"
                           ).replace("epochs: 2", "epochs: 6"))
    (folder / "models.py").write_text(MODULE.replace("x[:192], y[:192]), ((x[192:], y[192:])",
                                                     "x[:3840], y[:3840]), ((x[3840:], y[3840:])"))
    run = folder / "runs" / "cut"
    args = [LARGEBATCH, "run", str(exp), "--np", "2", "output.checkpoint_every=0"]
    log = open(folder / "log", "w")
    proc = subprocess.Popen([*args, f"output.run_dir={run}"], cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                            env=environ_copy())
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = run / "metrics.csv"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        code = wait_or_kill(proc, 40)
    finally:
        log.close()
    text = (folder / "log").read_text()
    assert code == 128 + signal.SIGTERM, text[-3000:]
    stopped = json.loads((run / "summary.json").read_text())
    assert stopped["status"] == "stopped" and stopped["steps_done"] < 360, text[-2000:]
    resumed = subprocess.run([*args, f"output.run_dir={run}", "train.resume=auto"], cwd=folder, capture_output=True,
                             text=True, timeout=240, env=environ_copy())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = subprocess.run([*args, f"output.run_dir={folder / 'runs' / 'straight'}"], cwd=folder,
                              capture_output=True, text=True, timeout=240, env=environ_copy())
    assert straight.returncode == 0, straight.stderr[-3000:]
    got, want = (json.loads((d / "summary.json").read_text()) for d in (run, folder / "runs" / "straight"))
    assert got["resumed_from"] == stopped["checkpoint"] and got["steps_done"] == want["steps_done"] == 360
    assert got["weights_sha1"] == want["weights_sha1"]           # the same trajectory, bit for bit
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _names_run(p, run)]


def _names_run(pid, run):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return str(run).encode() in fh.read()
    except OSError:
        return False


def test_the_docs_show_the_example_files_as_they_are():
    """docs/experiments.md's walk-through (run as copied by test_docs.py) is examples/own_model/."""
    doc = (ROOT / "docs" / "experiments.md").read_text()
    for name in ("my_model.py", "exp.yaml"):
        text = (ROOT / "examples" / "own_model" / name).read_text().rstrip()
        assert f"$ cat {name}\n{text}\n$ " in doc, name
