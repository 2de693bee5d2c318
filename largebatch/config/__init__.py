"""The experiment file: YAML schema, command-line overrides, validation, derived values.

The package's modules, one job each: :mod:`.fields` (a small schema library), :mod:`.schema`
(the largebatch schema; the optimizer section comes from :mod:`largebatch.registry`),
:mod:`.loading` (files, overrides, the walk), :mod:`.rules` (one check function per section),
:mod:`.derive` (pure derived values, also used by the runners) and :mod:`.output` (YAML, summary).

One YAML file describes an experiment for PyTorch or Keras. Every key has a default, so a
minimal file is two lines (``framework: torch`` and ``optimizer: lars``); ``largebatch
validate`` prints the fully resolved file. Sections and keys (see docs/experiments.md):

    name, description
    framework      torch | keras
    model          name, num_classes, batch_norm, zero_init_residual
    data           kind (synthetic | folder), path, val_path, image_size, resize, channels,
                   num_classes, samples, val_samples, augment, loader_workers
    batch          per_worker, global, accumulation_steps
    optimizer      name (sgd | lars | larc | lamb | clars), momentum, weight_decay,
                   trust_coefficient, eps, trust_denominator, nesterov, betas, exclude
    schedule       base_lr, base_batch, scaling, warmup, warmup_epochs, warmup_start_lr,
                   decay, power, end_lr, milestones, factor, momentum_correction
    train          epochs | steps, seed, log_every, eval, label_smoothing, resume, on_nonfinite
    output         dir, run_dir, checkpoint_every, checkpoint_keep, tensorboard, trust_ratios, progress
    launcher       type, np, hosts | hostfile, ranks_per_host, controller, cores_per_host,
                   threads_per_rank, interop_threads, binding, network_interface, env, args, python

A section may be written as its main key alone: ``model: resnet50``, ``optimizer: lamb``,
``data: synthetic``, ``launcher: mpirun``.

Validation collects every problem, one line each, naming the YAML key and what was expected:
``optimizer.trust_coefficient: expected a number > 0, got 'abc'``. :func:`load` raises
:class:`ConfigError` holding the lines; nothing is written and nothing runs.
"""
from .derive import derive, elastic_accumulation, run_length, training_length
from .fields import ConfigError
from .loading import Experiment, apply_overrides, load, load_dict, parse_override
from .output import describe, dump_yaml
from .schema import (BINDINGS, CONTROLLERS, ELASTIC_KEYS, FRAMEWORK_OPTIMIZERS, FRAMEWORKS, IMAGE_EXTENSIONS,
                     LAUNCHERS, MODELS, OPTIMIZER_KEYS, OPTIMIZERS, SCHEMA)

__all__ = ["ConfigError", "Experiment", "load", "load_dict", "parse_override", "apply_overrides",
           "SCHEMA", "FRAMEWORKS", "MODELS", "OPTIMIZERS", "OPTIMIZER_KEYS", "FRAMEWORK_OPTIMIZERS", "LAUNCHERS",
           "CONTROLLERS", "BINDINGS", "IMAGE_EXTENSIONS", "ELASTIC_KEYS", "dump_yaml", "describe", "derive",
           "training_length", "run_length", "elastic_accumulation"]
