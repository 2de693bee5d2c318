"""The largebatch experiment schema: sections, keys, defaults, checks, and where each key applies.

The optimizer section is built from :mod:`largebatch.registry` (its hyper-parameters, bounds and
defaults, and which optimizer uses which key).
"""
from .. import registry
from ..schedules import DECAYS, SCALING_RULES, WARMUPS
from .fields import (F, When, args_list, auto_integer, betas, boolean, choice, env_mapping, exclude, factory_ref,
                     hosts, integer, keyword_args, milestones, number, string, text)

FRAMEWORKS = ("torch", "keras")
MODELS = {"torch": ("small_cnn", "resnet18", "resnet50", "alexnet_bn"),
          "keras": ("small_cnn", "small_resnet", "resnet50")}
OPTIMIZERS = registry.names()
FRAMEWORK_OPTIMIZERS = {fw: registry.for_framework(fw) for fw in FRAMEWORKS}
OPTIMIZER_KEYS = {name: info.keys for name, info in registry.OPTIMIZERS.items()}
LAUNCHERS = ("horovodrun", "mpirun", "srun", "torchrun")
CONTROLLERS = ("mpi", "gloo")
BINDINGS = ("none", "core", "socket", "numa")
COMPRESSIONS = ("none", "fp16", "bf16")
ENGINES = ("horovod", "torch.distributed")
DATA_KINDS = ("synthetic", "folder", "arrays", "python")
USER_DATA_KINDS = ("arrays", "python")         # the user's own data: reaches the model as given
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff")
RECOMPUTED = ("derived", "source")      # sections of a resolved config.yaml, ignored on load
SHORTHAND = {"model": "name", "optimizer": "name", "data": "kind", "launcher": "type"}
ELASTIC_KEYS = ("min_np", "max_np", "host_discovery_script", "elastic_timeout", "reset_limit")
ZERO_INIT_MODELS = ("resnet18", "resnet50")


def _optimizer_field(key):
    """optimizer.<key> from the registry: its check, default and the optimizers that use it."""
    hp = registry.HYPERPARAMETERS[key]
    check = {"number": lambda: number(**hp.bounds), "bool": lambda: boolean, "betas": lambda: betas(**hp.bounds),
             "choice": lambda: choice(hp.choices), "exclude": lambda: exclude}[hp.kind]()
    users = [n for n in OPTIMIZERS if key in OPTIMIZER_KEYS[n]]
    when = When(lambda c: key in OPTIMIZER_KEYS[c["optimizer"]["name"]],
                lambda c: f"not used by optimizer {c['optimizer']['name']!r} (used by: {', '.join(users)})")
    nullable = hp.default is None
    return F(check, hp.default, nullable=nullable, doc=hp.doc, when=when)


def _multistep(c):
    return c["schedule"]["decay"] == "multistep"


def _elastic(c):
    return c["launcher"]["elastic"]


_ONLY_MULTISTEP = When(_multistep, lambda c: f"only used with schedule.decay 'multistep', got decay "
                                             f"{c['schedule']['decay']!r}")
_ONLY_ELASTIC = When(_elastic, lambda c: "only used with launcher.elastic: true")
_ONLY_SYNTHETIC = When(lambda c: c["data"]["kind"] == "synthetic", lambda c: "only used with data.kind 'synthetic'")
_PATH_MESSAGE = {"synthetic": "not used with data.kind 'synthetic' (set data.kind: folder)",
                 "python": "not used with data.kind 'python' (data.factory returns the data)",
                 "arrays": "not used with data.kind 'arrays' (put x_val, y_val in data.path's .npz)"}
_FILE_DATA = When(lambda c: c["data"]["kind"] in ("folder", "arrays"), lambda c: _PATH_MESSAGE[c["data"]["kind"]],
                  drop=False)
_ONLY_FOLDER_DATA = When(lambda c: c["data"]["kind"] == "folder", lambda c: _PATH_MESSAGE[c["data"]["kind"]],
                         drop=False)
_ONLY_PYTHON_DATA = When(lambda c: c["data"]["kind"] == "python",
                         lambda c: f"only used with data.kind 'python', got {c['data']['kind']!r}")
_ONLY_IMAGE_DATA = When(lambda c: c["data"]["kind"] not in USER_DATA_KINDS,
                        lambda c: f"not used with data.kind {c['data']['kind']!r} (your data reaches the model "
                                  f"as given)", drop=False)
_ONLY_FACTORY = When(lambda c: c["model"]["factory"] is not None, lambda c: "only used with model.factory")
_NOT_SRUN = {
    "network_interface": "not used with launcher.type 'srun' (set it in your Slurm/MPI configuration)",
    "ssh_identity": "not used with launcher.type 'srun' (Slurm starts the ranks, not ssh)",
    "ssh_port": "not used with launcher.type 'srun' (Slurm starts the ranks, not ssh)",
}


def engine(launcher) -> str:
    """The distributed engine a launcher section runs: launcher.engine, else torch.distributed
    under torchrun and Horovod under the other launchers."""
    return launcher.get("engine") or ("torch.distributed" if launcher["type"] == "torchrun" else "horovod")


def torch_distributed(launcher) -> bool:
    return engine(launcher) == "torch.distributed"


def _not_srun(key):
    return When(lambda c: c["launcher"]["type"] != "srun", lambda c: _NOT_SRUN[key], drop=False)


SCHEMA = {
    "name": F(string, None, nullable=True, doc="run name (default: the YAML file's stem)"),
    "description": F(text, ""),
    "framework": F(choice(FRAMEWORKS), "torch"),
    "model": {
        "name": F(string, "small_cnn", doc="checked against the framework's models (MODELS)"),
        "factory": F(factory_ref, None, nullable=True,
                     doc="your model: 'pkg.module:callable' or 'file.py:callable' (relative to the YAML's folder)"),
        "args": F(keyword_args, {}, doc="keyword arguments for model.factory", when=_ONLY_FACTORY),
        "num_classes": F(integer(1), None, nullable=True, doc="default: from data"),
        "batch_norm": F(boolean, True, doc="small_cnn: BatchNorm after each convolution",
                        when=When(lambda c: c["model"]["name"] == "small_cnn",
                                  lambda c: f"only used with model.name 'small_cnn', got {c['model']['name']!r}")),
        "zero_init_residual": F(boolean, False, doc="torch ResNets: γ = 0 in each block's last BN (Goyal et al.)",
                                when=When(lambda c: c["framework"] == "torch" and c["model"]["name"] in ZERO_INIT_MODELS,
                                          lambda c: f"only used with torch models 'resnet18' and 'resnet50', got "
                                                    f"{c['framework']} {c['model']['name']!r}")),
    },
    "data": {
        "kind": F(choice(DATA_KINDS), "synthetic"),
        "path": F(string, None, nullable=True, doc="folder: root with one subfolder of images per class; "
                  "arrays: an .npz file with x_train, y_train (and x_val, y_val)", when=_FILE_DATA),
        "val_path": F(string, None, nullable=True, when=_ONLY_FOLDER_DATA),
        "factory": F(factory_ref, None, nullable=True, doc="python: 'module:callable' returning (train, val)",
                     when=_ONLY_PYTHON_DATA),
        "args": F(keyword_args, {}, doc="keyword arguments for data.factory", when=_ONLY_PYTHON_DATA),
        "image_size": F(integer(1), None, nullable=True, doc="default 32 (synthetic), 224 (folder)",
                        when=_ONLY_IMAGE_DATA),
        "resize": F(integer(1), None, nullable=True, doc="shorter side before cropping; default size×256/224",
                    when=_ONLY_IMAGE_DATA),
        "channels": F(choice((1, 3)), 3, when=_ONLY_IMAGE_DATA),
        "num_classes": F(integer(1), None, nullable=True, doc="default 10 (synthetic), subfolders (folder)"),
        "samples": F(integer(1), 1024, doc="synthetic training images (all ranks together)", when=_ONLY_SYNTHETIC),
        "val_samples": F(integer(0), 256, doc="synthetic validation images; 0 = none", when=_ONLY_SYNTHETIC),
        "augment": F(boolean, True, when=_ONLY_IMAGE_DATA),
        "loader_workers": F(integer(0), 2),
    },
    "batch": {
        "per_worker": F(integer(1), None, nullable=True, doc="default 32, or global ÷ (np × accumulation)"),
        "global": F(integer(1), None, nullable=True, doc="declared global batch; must divide exactly"),
        "accumulation_steps": F(integer(1), 1),
    },
    "optimizer": {
        "name": F(choice(OPTIMIZERS), "lars"),
        **{key: _optimizer_field(key) for key in registry.HYPERPARAMETERS},
    },
    "schedule": {
        "base_lr": F(number(0, low_open=True), 0.1),
        "base_batch": F(integer(1), 256),
        "scaling": F(choice(SCALING_RULES), "linear"),
        "warmup": F(choice(WARMUPS), "gradual"),
        "warmup_epochs": F(number(0), 0.0),
        "warmup_start_lr": F(number(0), None, nullable=True, doc="default base_lr (Goyal et al.)",
                             when=When(lambda c: c["schedule"]["warmup"] != "none" and c["schedule"]["warmup_epochs"] > 0,
                                       lambda c: "not used without warmup (set schedule.warmup_epochs > 0 and "
                                                 "schedule.warmup to gradual or constant)", drop=False)),
        "decay": F(choice(DECAYS), "poly"),
        "power": F(number(0, low_open=True), 2.0,
                   when=When(lambda c: c["schedule"]["decay"] == "poly",
                             lambda c: f"only used with schedule.decay 'poly', got decay {c['schedule']['decay']!r}")),
        "end_lr": F(number(0), 0.0),
        "milestones": F(milestones, [], when=_ONLY_MULTISTEP),
        "factor": F(number(0, 1, low_open=True), 0.1, when=_ONLY_MULTISTEP),
        "momentum_correction": F(boolean, True, doc="scale momentum buffers by new/old lr (Goyal et al. eq. 10)"),
        "adascale": F(boolean, False, doc="AdaScale SGD (Johnson et al. 2020): instead of the scaling rule, the "
                                          "base schedule (base_lr at base_batch) times the gain r from the "
                                          "measured noise, advanced r base iterations per update (sgd, lars)"),
    },
    "train": {
        "epochs": F(number(0, low_open=True), 1.0),
        "steps": F(integer(1), None, nullable=True, doc="total optimizer steps; replaces epochs"),
        "seed": F(integer(0), 0),
        "log_every": F(integer(1), 10),
        "eval": F(boolean, True),
        "label_smoothing": F(number(0, 1, high_open=True), 0.0,
                             doc="ε of label smoothing in the training loss (Szegedy et al.); 0 = none"),
        "resume": F(string, "none", doc="auto (newest checkpoint in the run dir, if any) | PATH | none"),
        "on_nonfinite": F(choice(("stop", "skip")), "stop",
                          doc="NaN/Inf gradient: stop the run (exit 1) or skip the step; always reported"),
        "precision": F(choice(("fp32", "bf16", "fp16")), "fp32",
                       doc="compute in bfloat16 or float16 (torch autocast, Keras mixed_* policies); fp16 with "
                           "dynamic loss scaling (GradScaler, LossScaleOptimizer); weights, optimizer state and "
                           "trust ratios stay float32"),
        "noise_scale": F(boolean, True, doc="measure the gradient noise scale B_simple (McCandlish et al. 2018) "
                                           "from each rank's gradient and the averaged one (several ranks) or a "
                                           "micro-batch's (accumulation): one scalar reduction per update"),
        "check_ranks_every": F(integer(0), 100, doc="steps between rank-consistency checks (one allgather of two "
                                                   "float64 numbers per tensor); ranks whose weights differ stop the "
                                                   "run, naming the tensor and the step; 0 = never"),
        "commit_every": F(integer(1), 10, doc="launcher.elastic: steps between commits (in memory under Horovod, "
                                             "a file per host under torchrun; work lost on a failure is at most "
                                             "this many steps)", when=_ONLY_ELASTIC),
    },
    "output": {
        "dir": F(string, "runs"),
        "run_dir": F(string, None, nullable=True, doc="default: <dir>/<name>, made unique by `largebatch run`"),
        "checkpoint_every": F(integer(0), 1, doc="epochs between checkpoints; 0 = none"),
        "checkpoint_keep": F(integer(0), 5, doc="keep the newest K checkpoints; 0 = all"),
        "tensorboard": F(boolean, True),
        "trust_ratios": F(boolean, True),
        "progress": F(boolean, True),
    },
    "launcher": {
        "type": F(choice(LAUNCHERS), "horovodrun"),
        "np": F(integer(1), None, nullable=True, doc="default: the slots in hosts, else 1"),
        "hosts": F(hosts, None, nullable=True),
        "hostfile": F(string, None, nullable=True),
        "ranks_per_host": F(integer(1), None, nullable=True, doc="srun only",
                            when=When(lambda c: c["launcher"]["type"] == "srun",
                                      lambda c: f"only used with launcher.type 'srun' ({c['launcher']['type']} takes "
                                                f"the slots from launcher.hosts)", drop=False)),
        "engine": F(choice(ENGINES), None, nullable=True,
                    doc="the distributed engine: horovod (horovodrun, mpirun, srun) or torch.distributed "
                        "(torchrun, srun; framework torch); default: torch.distributed under torchrun, else horovod"),
        "controller": F(choice(CONTROLLERS), "mpi"),
        "cores_per_host": F(auto_integer, None, nullable=True),
        "threads_per_rank": F(auto_integer, None, nullable=True),
        "interop_threads": F(auto_integer, None, nullable=True),
        "binding": F(choice(BINDINGS), "none"),
        "compression": F(choice(COMPRESSIONS), "none",
                         doc="gradients sent in half precision, averaged, cast back: fp16 (Horovod's "
                             "Compression.fp16; DDP's fp16 hook under torchrun) or bf16 (torchrun only)"),
        "network_interface": F(string, None, nullable=True,
                               doc="NIC for rank traffic: horovodrun --network-interfaces, Open MPI's "
                                   "btl/oob_tcp_if_include, Gloo's HOROVOD_GLOO_IFACE", when=_not_srun("network_interface")),
        "ssh_identity": F(string, None, nullable=True,
                          doc="private key for ssh to the hosts (horovodrun --ssh-identity-file, mpirun's rsh agent)",
                          when=_not_srun("ssh_identity")),
        "ssh_port": F(integer(1, 65535), None, nullable=True, doc="sshd port on the hosts (default 22)",
                      when=_not_srun("ssh_port")),
        "rendezvous_port": F(integer(1, 65535), 29400,
                             doc="torchrun across hosts: the port of the c10d rendezvous on the first host",
                             when=When(lambda c: torch_distributed(c["launcher"]),
                                       lambda c: "only used with torch.distributed (launcher.type 'torchrun', or "
                                                 "launcher.engine 'torch.distributed')")),
        "host_timeout": F(integer(5), 30, doc="seconds after which a host that stopped answering ends the job"),
        "preflight": F(boolean, True, doc="multi-host runs: check ssh, names, ports and versions on every "
                                          "host before launching (largebatch doctor --hosts)"),
        "env": F(env_mapping, {}),
        "args": F(args_list, []),
        "python": F(string, None, nullable=True),
        "elastic": F(boolean, False, doc="Horovod Elastic (horovodrun --gloo) or torchrun's elastic agents: "
                                         "ranks (torchrun: hosts) may leave and join; the global batch is kept "
                                         "by changing accumulation steps"),
        "min_np": F(integer(1), None, nullable=True, doc="elastic: fewest ranks to keep training (default 1)", when=_ONLY_ELASTIC),
        "max_np": F(integer(1), None, nullable=True, doc="elastic: most ranks (default launcher.np)", when=_ONLY_ELASTIC),
        "host_discovery_script": F(string, None, nullable=True,
                                   doc="elastic: executable printing host:slots lines (default: launcher.hosts)", when=_ONLY_ELASTIC),
        "elastic_timeout": F(integer(1), None, nullable=True, doc="elastic: seconds to wait for min_np (600)", when=_ONLY_ELASTIC),
        "reset_limit": F(integer(1), None, nullable=True, doc="elastic: most world-size resets before failing (torchrun: "
                                                                     "restarts after a failure, default 3)", when=_ONLY_ELASTIC),
    },
}

SECTION_DOC = {"model": "model settings", "data": "data settings", "batch": "batch settings",
               "optimizer": "optimizer settings", "schedule": "learning-rate schedule settings",
               "train": "training settings", "output": "output settings", "launcher": "launcher settings"}

# keys users put in the wrong section, and where they live
ELSEWHERE = {"lr": "schedule.base_lr", "learning_rate": "schedule.base_lr", "batch_size": "batch.per_worker",
              "np": "launcher.np", "epochs": "train.epochs", "seed": "train.seed", "warmup": "schedule.warmup"}

