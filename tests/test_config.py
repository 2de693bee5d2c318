"""The experiment schema: defaults, overrides, derived values and every class of validation
error, each with its exact one-line message."""
import pytest
import yaml

from largebatch.config import ConfigError, apply_overrides, dump_yaml, load, load_dict, parse_override


def problems(doc, *overrides):
    with pytest.raises(ConfigError) as err:
        load_dict(doc, list(overrides))
    return err.value.problems


def one(doc, *overrides):
    found = problems(doc, *overrides)
    assert len(found) == 1, found
    return found[0]


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "imgs"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
    return root


# ------------------------------------------------------------------------------ defaults
def test_minimal_file_resolves_to_the_documented_defaults(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("framework: torch\noptimizer: lars\n")
    exp = load(path)
    c, d = exp.cfg, exp.derived
    assert c["name"] == "exp"
    assert c["model"]["name"] == "small_cnn" and c["data"]["kind"] == "synthetic"
    assert c["optimizer"] == {"name": "lars", "momentum": 0.9, "weight_decay": 0.0, "trust_coefficient": 0.001,
                              "eps": 0.0, "trust_denominator": "sum_of_norms", "nesterov": False,
                              "betas": [0.9, 0.999], "exclude": None}
    assert c["schedule"]["scaling"] == "linear" and c["schedule"]["decay"] == "poly"
    assert c["schedule"]["power"] == 2.0
    assert c["launcher"]["type"] == "horovodrun" and c["launcher"]["controller"] == "mpi"
    assert d["np"] == 1 and d["per_worker_batch"] == 32 and d["global_batch"] == 32
    assert d["peak_lr"] == pytest.approx(0.1 * 32 / 256)
    assert d["steps_per_epoch"] == 1024 // 32 and d["total_steps"] == 32
    assert exp.source == {"file": str(path.resolve()), "overrides": []}


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_an_empty_file_is_refused_with_one_line(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load(path)
    assert err.value.problems == [f"{path}: the file is empty"]


def test_lamb_eps_default_and_shorthand_sections():
    exp = load_dict({"optimizer": "lamb", "model": "resnet18", "data": "synthetic", "launcher": "mpirun"})
    assert exp.cfg["optimizer"]["eps"] == 1e-6
    assert exp.cfg["model"]["name"] == "resnet18" and exp.cfg["launcher"]["type"] == "mpirun"


def test_goyal_recipe_derived_values():
    exp = load_dict({"optimizer": "sgd", "batch": {"per_worker": 32, "global": 8192},
                     "schedule": {"base_lr": 0.1, "base_batch": 256, "warmup_epochs": 5, "decay": "multistep",
                                  "milestones": [30, 60, 80]},
                     "data": {"samples": 8192 * 10}, "train": {"epochs": 90}}, "launcher.np=256")
    d = exp.derived
    assert d["global_batch"] == 8192 and d["per_worker_batch"] == 32
    assert d["peak_lr"] == pytest.approx(3.2)
    assert d["warmup_start_lr"] == 0.1            # gradual warmup from η to kη (Goyal et al. §2.2)


def test_global_batch_declared_alone_gives_per_worker():
    exp = load_dict({"batch": {"global": 32768, "accumulation_steps": 2}, "data": {"samples": 32768}},
                    "launcher.np=64")
    assert exp.derived["per_worker_batch"] == 256


def test_sqrt_and_none_scaling():
    exp = load_dict({"schedule": {"scaling": "sqrt", "base_lr": 0.1, "base_batch": 256}, "batch": {"per_worker": 1024}},
                    "data.samples=4096")
    assert exp.derived["peak_lr"] == pytest.approx(0.2)
    exp = load_dict({"schedule": {"scaling": "none", "base_lr": 2.0}})
    assert exp.derived["peak_lr"] == 2.0


def test_numeric_strings_that_yaml_reads_as_text_are_numbers():
    # PyYAML reads 5e-4 (no dot) as the string '5e-4'
    doc = yaml.safe_load("optimizer: {weight_decay: 5e-4}")
    assert doc["optimizer"]["weight_decay"] == "5e-4"
    assert load_dict(doc).cfg["optimizer"]["weight_decay"] == 5e-4


def test_steps_replace_epochs():
    exp = load_dict({"train": {"steps": 8}})
    assert exp.derived["total_steps"] == 8 and exp.derived["epochs"] == 8 / 32


def test_null_means_default():
    exp = load_dict({"optimizer": {"momentum": None}, "train": {"epochs": None, "steps": 4}})
    assert exp.cfg["optimizer"]["momentum"] == 0.9 and exp.derived["total_steps"] == 4


def test_resolved_config_loads_back_to_the_same_experiment(tmp_path, image_root):
    for doc in ({"optimizer": "lamb", "schedule": {"decay": "cosine"}, "train": {"steps": 5}},
                {"framework": "keras", "data": {"kind": "folder", "path": str(image_root)}, "model": "resnet50",
                 "schedule": {"decay": "multistep", "milestones": [0.5]}},
                {"model": {"name": "resnet50", "zero_init_residual": True}, "launcher": {"hosts": "a:2,b:2"}}):
        exp = load_dict(doc)
        path = tmp_path / "resolved.yaml"
        path.write_text(dump_yaml(exp.resolved()))
        again = load(path)
        assert again.cfg == exp.cfg and again.derived == exp.derived


def test_resolved_lists_only_what_applies():
    r = load_dict({"optimizer": "lamb", "schedule": {"decay": "cosine"}}).resolved()
    assert set(r["optimizer"]) == {"name", "weight_decay", "betas", "eps", "exclude"}
    assert "milestones" not in r["schedule"] and "power" not in r["schedule"]
    assert r["launcher"]["threads_per_rank"] == "auto"
    assert r["derived"]["global_batch"] == 32


# ------------------------------------------------------------------------------ overrides
@pytest.mark.parametrize("text, path, value", [
    ("optimizer.trust_coefficient=0.02", ["optimizer", "trust_coefficient"], 0.02),
    ("schedule.milestones=[30, 60]", ["schedule", "milestones"], [30, 60]),
    ("optimizer.nesterov=true", ["optimizer", "nesterov"], True),
    ("output.run_dir=/tmp/x:y", ["output", "run_dir"], "/tmp/x:y"),
    ("launcher.hosts=a:2,b:2", ["launcher", "hosts"], "a:2,b:2"),
    ("data.val_path=", ["data", "val_path"], None),
    ("name=[unclosed", ["name"], "[unclosed"),       # not YAML: kept as text
])
def test_parse_override_reads_values_as_yaml(text, path, value):
    assert parse_override(text) == (path, value)


@pytest.mark.parametrize("text", ["optimizer", "=3", "a..b=1", ".a=1"])
def test_parse_override_errors(text):
    with pytest.raises(ConfigError) as err:
        parse_override(text)
    assert err.value.problems == [f"override {text!r}: expected key.sub=value"]


def test_overrides_apply_and_shorthand_keeps_the_section():
    doc = {"optimizer": {"name": "lars", "weight_decay": 1e-4}}
    out = apply_overrides(doc, ["optimizer=lamb", "batch.per_worker=8"])
    assert out == {"optimizer": {"name": "lamb", "weight_decay": 1e-4}, "batch": {"per_worker": 8}}
    assert doc == {"optimizer": {"name": "lars", "weight_decay": 1e-4}}        # not modified
    out = apply_overrides({"model": "resnet50"}, ["model.num_classes=10"])
    assert out == {"model": {"name": "resnet50", "num_classes": 10}}


def test_steps_on_the_command_line_replace_epochs_in_the_file():
    exp = load_dict({"train": {"epochs": 3}}, ["train.steps=4"])
    assert exp.derived["total_steps"] == 4 and exp.cfg["train"]["steps"] == 4
    exp = load_dict({"train": {"steps": 4}}, ["train.epochs=2"])
    assert exp.cfg["train"]["steps"] is None and exp.derived["total_steps"] == 64


def test_override_into_a_scalar_is_an_error():
    assert one({"name": "x"}, "name.sub=1") == "name: cannot set name.sub, name is 'x', not a mapping"


def test_override_errors_and_schema_errors_are_reported_together():
    assert problems({}, "oops", "optimizer.momentum=2") == [
        "override 'oops': expected key.sub=value",
        "optimizer.momentum: expected a number in [0, 1), got 2.0"]


# ------------------------------------------------------------------------------ file errors
def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as err:
        load(tmp_path / "nope.yaml")
    assert err.value.problems == [f"{tmp_path / 'nope.yaml'}: no such file"]


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(ConfigError) as err:
        load(tmp_path)
    assert err.value.problems == [f"{tmp_path}: expected a YAML file, got a folder"]


def test_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("framework: torch\noptimizer: {name: lars\n")
    with pytest.raises(ConfigError) as err:
        load(path)
    assert err.value.problems == [f"{path}: not valid YAML: line 3, column 1: expected ',' or '}}', but got "
                                  "'<stream end>'"]


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- framework\n- torch\n")
    with pytest.raises(ConfigError) as err:
        load(path)
    assert err.value.problems == [f"{path}: expected a mapping of sections (framework, model, data, ...), "
                                  "got list ['framework', 'torch']"]


# ------------------------------------------------------------------------------ unknown keys
@pytest.mark.parametrize("doc, message", [
    ({"optimizer": {"trust_coeficient": 0.01}},
     "optimizer.trust_coeficient: unknown key (did you mean 'optimizer.trust_coefficient'?)"),
    ({"framwork": "torch"}, "framwork: unknown key (did you mean 'framework'?)"),
    ({"schedule": {"warmup_epoch": 5}}, "schedule.warmup_epoch: unknown key (did you mean 'schedule.warmup_epochs'?)"),
    ({"optimizer": {"lr": 0.1}}, "optimizer.lr: unknown key (did you mean 'schedule.base_lr'?)"),
    ({"optimizer": {"seed": 3}}, "optimizer.seed: unknown key (did you mean 'train.seed'?)"),
    ({"train": {"per_worker": 3}}, "train.per_worker: unknown key (did you mean 'batch.per_worker'?)"),
    ({"bogus": 1}, "bogus: unknown key; expected one of: name, description, framework, model, data, batch, "
                   "optimizer, schedule, train, output, launcher"),
    ({"model": {"xyz": 1}}, "model.xyz: unknown key; expected one of: name, factory, args, num_classes, "
                            "batch_norm, zero_init_residual"),
])
def test_unknown_keys_with_did_you_mean(doc, message):
    assert one(doc) == message


def test_unknown_key_from_an_override():
    assert one({}, "launcher.thread_per_rank=4") == \
        "launcher.thread_per_rank: unknown key (did you mean 'launcher.threads_per_rank'?)"


# ------------------------------------------------------------------------------ wrong types
@pytest.mark.parametrize("doc, message", [
    ({"optimizer": {"trust_coefficient": "abc"}}, "optimizer.trust_coefficient: expected a number > 0, got 'abc'"),
    ({"schedule": {"base_lr": True}}, "schedule.base_lr: expected a number > 0, got True"),
    ({"batch": {"per_worker": 3.5}}, "batch.per_worker: expected an integer > 0, got 3.5"),
    ({"batch": {"per_worker": "32"}}, "batch.per_worker: expected an integer > 0, got '32'"),
    ({"optimizer": {"nesterov": "yes please"}}, "optimizer.nesterov: expected true or false, got 'yes please'"),
    ({"name": 3}, "name: expected a non-empty string, got 3"),
    ({"framework": "pytorch"}, "framework: expected one of 'torch', 'keras', got 'pytorch' (did you mean 'torch'?)"),
    ({"optimizer": "lasr"}, "optimizer.name: expected one of 'sgd', 'lars', 'larc', 'lamb', 'clars', got 'lasr' "
                            "(did you mean 'lars'?)"),
    ({"schedule": {"decay": "linear"}}, "schedule.decay: expected one of 'poly', 'cosine', 'multistep', 'none', "
                                        "got 'linear'"),
    ({"schedule": {"decay": "multistep", "milestones": 30}},
     "schedule.milestones: expected a list of epochs (numbers > 0), got 30"),
    ({"schedule": {"decay": "multistep", "milestones": [60, 30]}},
     "schedule.milestones: expected increasing epochs, got [60, 30]"),
    ({"optimizer": {"name": "lamb", "betas": [0.9]}},
     "optimizer.betas: expected a pair [beta_1, beta_2] of numbers in [0, 1), got [0.9]"),
    ({"optimizer": {"exclude": "bias("}},
     "optimizer.exclude: expected a regular expression, got 'bias(' (missing ), unterminated subpattern at "
     "position 4)"),
    ({"optimizer": {"exclude": {"adapt": True}}},
     "optimizer.exclude: unknown key 'adapt' in the mapping, expected 'adaptation', 'decay' and/or 'rate'"),
    ({"optimizer": {"exclude": 3}},
     "optimizer.exclude: expected null (ndim <= 1 excluded), true, false, a regular expression or a list of "
     "those, or a mapping with 'adaptation', 'decay' and/or 'rate', got 3"),
    ({"schedule": 0.1}, "schedule: expected a mapping of learning-rate schedule settings, got 0.1"),
    ({"optimizer": [1]}, "optimizer: expected a mapping of optimizer settings or a name, got [1]"),
    ({"launcher": {"env": ["A=1"]}},
     "launcher.env: expected a mapping of environment variables (NAME: value), got ['A=1']"),
    ({"launcher": {"env": {"1A": 1}}}, "launcher.env: expected environment variable names, got '1A'"),
    ({"launcher": {"threads_per_rank": "many"}},
     "launcher.threads_per_rank: expected an integer > 0 or 'auto', got 'many'"),
    ({"launcher": {"args": {"a": 1}}}, "launcher.args: expected a string or a list of arguments, got {'a': 1}"),
    ({"launcher": {"hosts": "a:x"}}, "launcher.hosts: host 'a': expected slots to be an integer > 0, got 'x'"),
])
def test_wrong_types(doc, message):
    assert one(doc) == message


# ------------------------------------------------------------------------------ out of range
@pytest.mark.parametrize("doc, message", [
    ({"optimizer": {"momentum": 1.5}}, "optimizer.momentum: expected a number in [0, 1), got 1.5"),
    ({"optimizer": {"trust_coefficient": 0}}, "optimizer.trust_coefficient: expected a number > 0, got 0.0"),
    ({"optimizer": {"weight_decay": -1e-4}}, "optimizer.weight_decay: expected a number >= 0, got -0.0001"),
    ({"schedule": {"base_lr": ".inf"}}, "schedule.base_lr: expected a number > 0, got '.inf'"),
    ({"schedule": {"base_lr": float("nan")}}, "schedule.base_lr: expected a number > 0, got nan"),
    ({"schedule": {"factor": 2}}, "schedule.factor: expected a number in (0, 1], got 2.0"),
    ({"batch": {"per_worker": 0}}, "batch.per_worker: expected an integer > 0, got 0"),
    ({"batch": {"accumulation_steps": -2}}, "batch.accumulation_steps: expected an integer > 0, got -2"),
    ({"data": {"channels": 2}}, "data.channels: expected one of 1, 3, got 2"),
    ({"data": {"loader_workers": -1}}, "data.loader_workers: expected an integer >= 0, got -1"),
    ({"train": {"epochs": 0}}, "train.epochs: expected a number > 0, got 0.0"),
    ({"launcher": {"np": 0}}, "launcher.np: expected an integer > 0, got 0"),
    ({"output": {"checkpoint_every": -1}}, "output.checkpoint_every: expected an integer >= 0, got -1"),
])
def test_out_of_range(doc, message):
    assert one(doc) == message


# ------------------------------------------------------------------------------ batch arithmetic
def test_global_batch_not_divisible():
    assert one({"batch": {"global": 1000, "accumulation_steps": 3}}, "launcher.np=4") == \
        "batch.global: expected a multiple of launcher.np × batch.accumulation_steps = 4 × 3 = 12, got 1000"


def test_data_problems_are_still_reported_after_a_batch_problem(tmp_path):
    assert problems({"batch": {"global": 100}, "data": {"kind": "folder", "path": str(tmp_path / "x")}},
                    "launcher.np=3") == [
        "batch.global: expected a multiple of launcher.np × batch.accumulation_steps = 3 × 1 = 3, got 100",
        f"data.path: expected a folder with one subfolder of images per class, got '{tmp_path / 'x'}' "
        "(no such folder)"]


def test_global_batch_inconsistent_with_per_worker():
    assert one({"batch": {"global": 8192, "per_worker": 32}}, "launcher.np=64") == \
        ("batch.global: expected batch.per_worker × launcher.np × batch.accumulation_steps = 32 × 64 × 1 = 2048, "
         "got 8192")


def test_synthetic_data_smaller_than_one_global_batch():
    assert one({"data": {"samples": 100}, "batch": {"per_worker": 64}}, "launcher.np=2") == \
        "data.samples: expected at least the global batch (128) for one step, got 100"


# ------------------------------------------------------------------------------ data paths
def test_folder_needs_a_path():
    assert one({"data": {"kind": "folder"}}) == \
        "data.path: required when data.kind is 'folder' (a folder with one subfolder of images per class)"


def test_missing_data_folders(tmp_path):
    assert problems({"data": {"kind": "folder", "path": str(tmp_path / "train"),
                              "val_path": str(tmp_path / "val")}}) == [
        f"data.path: expected a folder with one subfolder of images per class, got '{tmp_path / 'train'}' "
        "(no such folder)",
        f"data.val_path: expected a folder with one subfolder of images per class, got '{tmp_path / 'val'}' "
        "(no such folder)"]


def test_data_path_is_a_file_or_has_no_class_folders(tmp_path):
    (tmp_path / "f.jpg").write_bytes(b"")
    assert one({"data": {"kind": "folder", "path": str(tmp_path / "f.jpg")}}) == \
        f"data.path: expected a folder with one subfolder of images per class, got '{tmp_path / 'f.jpg'}' (a file)"
    assert one({"data": {"kind": "folder", "path": str(tmp_path)}}) == \
        f"data.path: expected a folder with one subfolder of images per class, got '{tmp_path}' (no subfolders)"


def test_folder_classes_and_num_classes(image_root):
    exp = load_dict({"data": {"kind": "folder", "path": str(image_root)}})
    assert exp.derived["num_classes"] == 2 and exp.derived["image_size"] == 224 and exp.derived["resize"] == 256
    assert one({"data": {"kind": "folder", "path": str(image_root), "num_classes": 3}}) == \
        "data.num_classes: expected 2 (the class subfolders of data.path), got 3"
    assert one({"data": {"kind": "folder", "path": str(image_root)}, "model": {"num_classes": 1000}}) == \
        "model.num_classes: expected 2 (the classes in the data), got 1000"


def test_data_keys_for_the_other_kind(image_root):
    assert one({"data": {"path": "/x"}}) == "data.path: not used with data.kind 'synthetic' (set data.kind: folder)"
    assert one({"data": {"kind": "folder", "path": str(image_root), "samples": 10}}) == \
        "data.samples: only used with data.kind 'synthetic'"


def test_missing_hostfile(tmp_path):
    assert one({"launcher": {"hostfile": str(tmp_path / "hosts")}}) == \
        f"launcher.hostfile: expected an existing hostfile, got '{tmp_path / 'hosts'}' (no such file)"


def test_bad_hostfile_line(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("node1 slots=4\nnode2:4\n")
    assert one({"launcher": {"hostfile": str(path)}}) == \
        "launcher.hostfile: line 2: expected 'hostname slots=N', got 'node2:4'"


def test_hostfile_gives_np(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("node1 slots=4\nnode2 slots=4\n")
    exp = load_dict({"launcher": {"hostfile": str(path)}})
    assert exp.derived["np"] == 8 and exp.derived["placement"] == [("node1", 4), ("node2", 4)]


# ------------------------------------------------------------------------------ cross-field rules
@pytest.mark.parametrize("doc, overrides, message", [
    ({"optimizer": {"name": "lars", "betas": [0.9, 0.99]}}, [],
     "optimizer.betas: not used by optimizer 'lars' (used by: lamb)"),
    ({"optimizer": {"name": "sgd", "trust_coefficient": 0.02}}, [],
     "optimizer.trust_coefficient: not used by optimizer 'sgd' (used by: lars, larc, clars)"),
    ({"optimizer": {"name": "lamb", "momentum": 0.9}}, [],
     "optimizer.momentum: not used by optimizer 'lamb' (used by: sgd, lars, larc, clars)"),
    ({"optimizer": {"name": "sgd", "momentum": 0, "nesterov": True}}, [],
     "optimizer.nesterov: needs optimizer.momentum > 0, got momentum 0"),
    ({"optimizer": {"name": "clars", "trust_denominator": "norm_of_sum"}}, [],
     "optimizer.trust_denominator: CLARS uses the mean per-example gradient norm; expected 'sum_of_norms', "
     "got 'norm_of_sum'"),
    ({"framework": "keras", "model": "resnet18"}, [],
     "model.name: 'resnet18' is not available for framework 'keras' (available: 'small_cnn', 'small_resnet', "
     "'resnet50')"),
    ({"model": "alexnet_bn"}, [], "data.image_size: model 'alexnet_bn' needs images of at least 64 pixels, got 32"),
    ({"model": {"name": "resnet50", "batch_norm": False}}, [],
     "model.batch_norm: only used with model.name 'small_cnn', got 'resnet50'"),
    ({"model": {"zero_init_residual": True}}, [],
     "model.zero_init_residual: only used with torch models 'resnet18' and 'resnet50', got torch 'small_cnn'"),
    ({"train": {"epochs": 2, "steps": 10}}, [], "train.steps: set either train.epochs or train.steps, not both"),
    ({"schedule": {"warmup_epochs": 5}, "train": {"epochs": 5}}, [],
     "schedule.warmup_epochs: expected fewer than the training epochs (5), got 5"),
    ({"schedule": {"decay": "multistep"}}, [],
     "schedule.milestones: expected a non-empty list of epochs when schedule.decay is 'multistep'"),
    ({"schedule": {"decay": "multistep", "milestones": [30, 60]}, "train": {"epochs": 40}}, [],
     "schedule.milestones: expected epochs between schedule.warmup_epochs (0) and the training epochs (40), got 60"),
    ({"schedule": {"decay": "cosine", "power": 2}}, [],
     "schedule.power: only used with schedule.decay 'poly', got decay 'cosine'"),
    ({"schedule": {"milestones": [30]}}, [],
     "schedule.milestones: only used with schedule.decay 'multistep', got decay 'poly'"),
    ({"schedule": {"warmup_start_lr": 0.01}}, [],
     "schedule.warmup_start_lr: not used without warmup (set schedule.warmup_epochs > 0 and schedule.warmup to "
     "gradual or constant)"),
    ({"schedule": {"end_lr": 1.0}}, [], "schedule.end_lr: expected at most the peak lr (0.0125), got 1"),
    ({"data": {"resize": 16}}, [], "data.resize: expected at least data.image_size (32), got 16"),
    ({"launcher": {"hosts": "a:2,b:2", "np": 5}}, [], "launcher.np: expected at most 4 (the slots in launcher.hosts), "
                                                       "got 5"),
    ({"launcher": {"hosts": "a:2", "hostfile": "h"}}, [],
     "launcher.hostfile: set either launcher.hosts or launcher.hostfile, not both"),
    ({"launcher": {"type": "mpirun", "controller": "gloo"}}, [],
     "launcher.controller: 'gloo' needs launcher.type 'horovodrun', got 'mpirun'"),
    ({"launcher": {"controller": "gloo", "binding": "core"}}, [],
     "launcher.binding: 'core' needs the MPI controller (gloo ranks are not bound); expected 'none' with "
     "launcher.controller 'gloo'"),
    ({"launcher": {"ranks_per_host": 4}}, [],
     "launcher.ranks_per_host: only used with launcher.type 'srun' (horovodrun takes the slots from launcher.hosts)"),
    ({"launcher": {"type": "srun", "ranks_per_host": 4, "np": 6}}, [],
     "launcher.np: expected a multiple of launcher.ranks_per_host (4), got 6"),
    ({"launcher": {"type": "srun", "hosts": "a:4,b:2"}}, [],
     "launcher.hosts: srun needs the same ranks on every host, got a:4,b:2"),
    ({"launcher": {"type": "srun", "network_interface": "ib0"}}, [],
     "launcher.network_interface: not used with launcher.type 'srun' (set it in your Slurm/MPI configuration)"),
    ({"launcher": {"python": "/no/such/python"}}, [],
     "launcher.python: expected an existing interpreter, got '/no/such/python' (no such file)"),
])
def test_cross_field_rules(doc, overrides, message):
    assert one(doc, *overrides) == message


def test_every_problem_is_reported_once_and_follow_ups_of_bad_keys_are_not():
    found = problems({"optimizer": {"trust_coefficient": "abc", "betas": [0.9, 0.99], "nesterov": 1},
                      "batch": {"per_worker": "x", "global": 63}, "bogus": 1}, "launcher.np=2")
    assert found == [
        "bogus: unknown key; expected one of: name, description, framework, model, data, batch, optimizer, schedule, "
        "train, output, launcher",
        "batch.per_worker: expected an integer > 0, got 'x'",
        "optimizer.trust_coefficient: expected a number > 0, got 'abc'",
        "optimizer.nesterov: expected true or false, got 1",
        "optimizer.betas: not used by optimizer 'lars' (used by: lamb)",
        "batch.global: expected a multiple of launcher.np × batch.accumulation_steps = 2 × 1 = 2, got 63",
    ]


# ------------------------------------------------------------------------------ models per framework
@pytest.mark.parametrize("framework, name, message", [
    ("torch", "resnet34", "model.name: expected one of 'small_cnn', 'resnet18', 'resnet50', 'alexnet_bn' "
                          "(framework 'torch'), got 'resnet34' (did you mean 'resnet50'?)"),
    ("keras", "resnet34", "model.name: expected one of 'small_cnn', 'small_resnet', 'resnet50' (framework 'keras'), "
                          "got 'resnet34' (did you mean 'resnet50'?)"),
    ("torch", "small_resnet", "model.name: 'small_resnet' is not available for framework 'torch' "
                              "(available: 'small_cnn', 'resnet18', 'resnet50', 'alexnet_bn')"),
])
def test_model_choices_are_those_of_the_framework(framework, name, message):
    assert one({"framework": framework, "model": name}) == message


def test_every_listed_model_is_accepted_for_its_framework():
    from largebatch.config import MODELS
    for framework, names in MODELS.items():
        for name in names:
            doc = {"framework": framework, "model": name, "optimizer": "lars"}
            if name == "alexnet_bn":
                doc["data"] = {"image_size": 64}
            assert load_dict(doc).cfg["model"]["name"] == name


# ------------------------------------------------------------------------------ label smoothing
def test_label_smoothing_default_and_value():
    assert load_dict({}).cfg["train"]["label_smoothing"] == 0.0
    exp = load_dict({"train": {"label_smoothing": 0.1}})
    assert exp.cfg["train"]["label_smoothing"] == 0.1
    assert exp.resolved()["train"]["label_smoothing"] == 0.1
    from largebatch.checkpoint import config_hash
    assert config_hash(exp.cfg) != config_hash(load_dict({}).cfg)        # it changes the trajectory


@pytest.mark.parametrize("value, shown", [(1, "1.0"), (1.5, "1.5"), (-0.1, "-0.1"), ("much", "'much'")])
def test_label_smoothing_out_of_range_is_one_line(value, shown):
    assert one({"train": {"label_smoothing": value}}) == \
        f"train.label_smoothing: expected a number in [0, 1), got {shown}"


def test_a_relative_discovery_script_is_the_yamls_neighbour(tmp_path, monkeypatch):
    import yaml
    from largebatch.config import load
    folder = tmp_path / "exp"
    folder.mkdir()
    script = folder / "discover.sh"
    script.write_text("#!/bin/sh\necho localhost:2\n")
    script.chmod(0o755)
    (folder / "e.yaml").write_text(yaml.safe_dump({
        "framework": "torch", "data": {"kind": "synthetic", "samples": 256}, "batch": {"per_worker": 16},
        "launcher": {"controller": "gloo", "elastic": True, "np": 2, "min_np": 1, "max_np": 2,
                     "host_discovery_script": "discover.sh"}}))
    monkeypatch.chdir(tmp_path)                      # not the YAML's folder
    exp = load(str(folder / "e.yaml"))
    assert exp.cfg["launcher"]["host_discovery_script"] == str(script)


def test_a_dry_run_notes_missing_data_folders_and_goes_on(tmp_path, capsys):
    from largebatch.launchers import cli
    exp = tmp_path / "e.yaml"
    exp.write_text("framework: torch\nmodel: resnet18\ndata: {kind: folder, path: /no/such/imagenet}\n")
    assert cli.main(["run", str(exp), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert ("note: data.path: expected a folder with one subfolder of images per class, got '/no/such/imagenet' "
            "(no such folder); --dry-run goes on (a real run stops here)") in err
    assert cli.main(["run", str(exp)]) == 2                                   # a real run stops
    assert cli.main(["validate", str(exp)]) == 2


def test_a_name_in_other_letters_gets_its_did_you_mean_and_a_bad_model_name_is_reported_alone():
    """Issue 27 item 7: `optimizer: LARS` suggests 'lars'; after a bad model.name, the keys that
    depend on the name (model.batch_norm) are not reported too."""
    with pytest.raises(ConfigError) as err:
        load_dict({"framework": "torch", "model": {"name": "resnt50", "batch_norm": False}, "optimizer": "LARS"})
    assert err.value.problems == [
        "optimizer.name: expected one of 'sgd', 'lars', 'larc', 'lamb', 'clars', got 'LARS' (did you mean 'lars'?)",
        "model.name: expected one of 'small_cnn', 'resnet18', 'resnet50', 'alexnet_bn' (framework 'torch'), "
        "got 'resnt50' (did you mean 'resnet50'?)"]


@pytest.mark.parametrize("doc,line", [
    ({"framework": "keras", "launcher": {"type": "torchrun"}},
     "launcher.type: 'torchrun' runs framework 'torch' (torch.distributed), got framework 'keras'; use horovodrun, "
     "mpirun or srun"),
    ({"launcher": {"rendezvous_port": 29500}},
     "launcher.rendezvous_port: only used with torch.distributed (launcher.type 'torchrun', or launcher.engine "
     "'torch.distributed')"),
    ({"launcher": {"type": "mpirun", "engine": "torch.distributed"}},
     "launcher.engine: 'torch.distributed' is started by launcher.type 'torchrun' or 'srun', got 'mpirun'"),
    ({"launcher": {"type": "torchrun", "engine": "horovod"}},
     "launcher.engine: launcher.type 'torchrun' starts torch.distributed; expected 'torch.distributed' or no "
     "launcher.engine, got 'horovod'"),
    ({"framework": "keras", "launcher": {"type": "srun", "engine": "torch.distributed"}},
     "launcher.engine: 'torch.distributed' runs framework 'torch', got framework 'keras'; expected 'horovod'"),
    ({"launcher": {"type": "torchrun", "binding": "core"}},
     "launcher.binding: torchrun does not bind ranks to cores; expected 'none', got 'core'"),
], ids=["keras", "rendezvous-port", "engine-mpirun", "torchrun-horovod", "engine-keras", "binding"])
def test_torchrun_refuses_what_it_cannot_run_yet(doc, line):
    with pytest.raises(ConfigError) as err:
        load_dict({"framework": "torch", **doc})
    assert line in err.value.problems


def test_bf16_compression_needs_torchrun():
    with pytest.raises(ConfigError) as err:
        load_dict({"framework": "torch", "launcher": {"compression": "bf16"}})
    assert err.value.problems == ["launcher.compression: 'bf16' needs torch.distributed (launcher.type 'torchrun'; "
                                  "Horovod compresses to fp16 only), got launcher.type 'horovodrun'"]
    assert load_dict({"framework": "torch", "launcher": {"type": "torchrun", "compression": "bf16"}}).cfg[
        "launcher"]["compression"] == "bf16"
    srun = load_dict({"framework": "torch", "launcher": {"type": "srun", "engine": "torch.distributed",
                                                         "compression": "bf16", "rendezvous_port": 29600}})
    assert srun.derived["engine"] == "torch.distributed" and srun.cfg["launcher"]["rendezvous_port"] == 29600
    assert load_dict({"framework": "torch", "launcher": {"type": "torchrun"}}).derived["engine"] == "torch.distributed"
    assert load_dict({"framework": "torch", "launcher": {"type": "srun"}}).derived["engine"] == "horovod"
