"""Keras checkpoints in the core's format (:mod:`largebatch.checkpoint`, framework ``"keras"``):
model variables (weights, BatchNorm statistics, seed-generator states), optimizer variables
(iterations, learning rate, LARS momentum, LAMB moments, per-layer rates, the non-finite guard's
counters), step/epoch, RNG states (NumPy, Python, Keras' global seed generator) and the resolved
configuration, written atomically by rank 0; loaded on rank 0, then broadcast.

    from largebatch.keras import save_checkpoint, load_checkpoint
    save_checkpoint(path, model, optimizer, step=s, epoch=e, config=cfg_dict, keep=3)   # rank 0
    info = load_checkpoint(path, model, optimizer)                                      # rank 0
    # then lbk.callbacks.BroadcastGlobalVariables(0) sends rank 0's variables to every rank

The payload is ``np.savez`` bytes (no pickle: read with ``allow_pickle=False``): one array per
variable (``model/NNNN``, ``optimizer/NNNN``), the RNG arrays, and ``meta``, a UTF-8 JSON
document (step, epoch, extra, configuration, variable paths, optimizer class, RNG scalars).
Model variables are matched by position after the model signature (every variable's path and
shape) has been checked; optimizer variables by path. The optimizer is built first if Keras has
not built it yet (``optimizer.build(model.trainable_variables)``).
"""
import io
import json
import os
import random

import keras
import numpy as np

from largebatch import checkpoint as core

from ._checks import innermost

__all__ = ["save_checkpoint", "load_checkpoint", "signature_of", "rng_state", "set_rng_state",
           "CHECKPOINT_SUFFIX"]

FRAMEWORK = "keras"
CHECKPOINT_SUFFIX = ".ckpt"
# optimizer variables that a checkpoint may lack (or hold for an optimizer without them): the
# gradient accumulators and CLARS's norm-sum accumulator (zero at a checkpoint) and the non-finite
# guard's counters
_OPTIONAL = ("lb_gradient_accumulator", "lb_micro_step", "lb_skipped_steps", "lb_nonfinite_codes",
             "lb_norm_sum_accumulator")


def _path(variable):
    return getattr(variable, "path", None) or variable.name




def signature_of(model):
    """Hash of every model variable's path and shape (weights, statistics, seed states)."""
    return core.model_signature([(_path(v), tuple(v.shape)) for v in model.variables])


def _global_seed_generator():
    try:
        from keras.src.backend.common import global_state
        return global_state.get_global_attribute("global_seed_generator")
    except Exception:                                   # pragma: no cover - private API moved
        return None


def rng_state():
    """NumPy's and Python's global RNG states and Keras' global seed generator (if created),
    as arrays and JSON-able scalars."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    gen = _global_seed_generator()
    return {"numpy_keys": np.asarray(keys, dtype=np.uint32),
            "python_state": np.asarray(py_state, dtype=np.int64),
            "keras_seed": None if gen is None else np.asarray(gen.state.numpy()),
            "scalars": {"numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(gauss),
                        "python_version": int(py_version),
                        "python_gauss": None if py_gauss is None else float(py_gauss)}}


def set_rng_state(state):
    s = state["scalars"]
    np.random.set_state(("MT19937", np.asarray(state["numpy_keys"], dtype=np.uint32), s["numpy_pos"],
                         s["numpy_has_gauss"], s["numpy_gauss"]))
    random.setstate((s["python_version"], tuple(int(x) for x in state["python_state"]), s["python_gauss"]))
    if state.get("keras_seed") is not None:
        try:
            from keras.src.random.seed_generator import global_seed_generator
        except ImportError:                             # pragma: no cover - private API moved
            return
        gen = global_seed_generator()
        gen.state.assign(np.asarray(state["keras_seed"]).astype(gen.state.dtype))


def _ensure_built(optimizer, model):
    if optimizer is not None and not optimizer.built:
        optimizer.build(model.trainable_variables)


def save_checkpoint(path, model, optimizer=None, *, step, epoch, config=None, cfg_hash=None, model_name=None,
                    extra=None, keep=None):
    """Write a checkpoint atomically (call on rank 0 only); prune to the newest ``keep`` in its folder.

    ``path`` conventionally ends in ``.ckpt`` (``largebatch.checkpoint.checkpoint_name(epoch, "keras")``).
    """
    if optimizer is not None:
        _ensure_built(optimizer, model)
    arrays = {}
    model_vars = list(model.variables)
    for i, v in enumerate(model_vars):
        arrays[f"model/{i:04d}"] = np.asarray(v.numpy())
    opt_vars = list(optimizer.variables) if optimizer is not None else []
    for i, v in enumerate(opt_vars):
        arrays[f"optimizer/{i:04d}"] = np.asarray(v.numpy())
    rng = rng_state()
    arrays["rng/numpy_keys"] = rng["numpy_keys"]
    arrays["rng/python_state"] = rng["python_state"]
    if rng["keras_seed"] is not None:
        arrays["rng/keras_seed"] = rng["keras_seed"]
    meta = {"step": int(step), "epoch": int(epoch), "extra": dict(extra or {}), "config": config,
            "model_paths": [_path(v) for v in model_vars],
            "optimizer": None if optimizer is None else {
                "class": type(innermost(optimizer)).__name__, "paths": [_path(v) for v in opt_vars]},
            "rng": rng["scalars"]}
    arrays["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True, default=str).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    manifest = {"framework": FRAMEWORK, "step": int(step), "epoch": int(epoch), "model": model_name,
                "model_signature": signature_of(model), "config_hash": cfg_hash, "keras": keras.__version__}
    core.write(path, buf.getvalue(), manifest)
    if keep:
        core.prune(os.path.dirname(os.path.abspath(path)), keep)
    return path


def _bad(path, what):
    return core.CheckpointError(f"checkpoint {path}: {what}")


def _decode(path, payload):
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        meta = json.loads(bytes(arrays.pop("meta")).decode())
    except Exception as err:           # noqa: BLE001  (any decoding failure: one line)
        raise _bad(path, f"cannot load the payload ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None
    if not isinstance(meta, dict) or "step" not in meta or "model_paths" not in meta:
        raise _bad(path, "cannot load the payload (no Keras checkpoint metadata)")
    return arrays, meta


def _check_value(path, what, variable, value):
    if tuple(value.shape) != tuple(variable.shape):
        raise _bad(path, f"does not fit this model/optimizer ({what} {_path(variable)!r} has shape "
                         f"{tuple(variable.shape)}, the checkpoint {tuple(value.shape)})")


def _plan_optimizer(path, optimizer, arrays, meta):
    """[(variable, value)] for the optimizer, or CheckpointError (nothing assigned yet)."""
    saved = meta.get("optimizer")
    if saved is None:
        raise _bad(path, "holds no optimizer state")
    cls = type(innermost(optimizer)).__name__
    if saved.get("class") != cls:
        raise _bad(path, f"holds the state of optimizer {saved.get('class')!r}, this run uses {cls!r}")
    theirs = {}
    for i, p in enumerate(saved.get("paths", [])):
        key = f"optimizer/{i:04d}"
        if key not in arrays:
            raise _bad(path, f"corrupted (optimizer variable {p!r} missing from the payload)")
        theirs[p] = arrays[key]
    ours = list(optimizer.variables)
    if len({_path(v) for v in ours}) != len(ours) or len(theirs) != len(saved.get("paths", [])):
        raise _bad(path, "optimizer variables do not have distinct paths; cannot match them")
    plan = []
    for v in ours:
        p = _path(v)
        if p in theirs:
            _check_value(path, "optimizer variable", v, theirs.pop(p))
            plan.append((v, arrays[f"optimizer/{saved['paths'].index(p):04d}"]))
        elif not any(tag in p for tag in _OPTIONAL):
            raise _bad(path, f"does not fit this optimizer (no value for {p!r})")
    left = [p for p in theirs if not any(tag in p for tag in _OPTIONAL)]
    if left:
        raise _bad(path, f"does not fit this optimizer (it has no variable {left[0]!r})")
    return plan


def load_checkpoint(path, model, optimizer=None, *, cfg_hash=None, restore_rng=True):
    """Check and load ``path`` into ``model`` (and ``optimizer``, built first if needed).

    Returns a dict with step, epoch, extra, config, manifest and ``warning`` (a config-hash
    mismatch line, or None). Raises :class:`largebatch.checkpoint.CheckpointError` (one line) for
    a damaged file, a checkpoint of another framework, model or optimizer; nothing is assigned
    in that case.
    """
    manifest, payload = core.read(path)
    warning = core.check_compatible(path, manifest, framework=FRAMEWORK, signature=signature_of(model),
                                    cfg_hash=cfg_hash)
    arrays, meta = _decode(path, payload)
    model_vars = list(model.variables)
    if len(meta["model_paths"]) != len(model_vars):
        raise _bad(path, f"from another model ({len(meta['model_paths'])} variables, this model {len(model_vars)})")
    plan = []
    for i, v in enumerate(model_vars):
        key = f"model/{i:04d}"
        if key not in arrays:
            raise _bad(path, f"corrupted (model variable {_path(v)!r} missing from the payload)")
        _check_value(path, "model variable", v, arrays[key])
        plan.append((v, arrays[key]))
    if optimizer is not None:
        _ensure_built(optimizer, model)
        plan += _plan_optimizer(path, optimizer, arrays, meta)
    for v, value in plan:                         # everything checked: now assign
        v.assign(value.astype(v.dtype) if str(value.dtype) != str(v.dtype) else value)
    rng = {"numpy_keys": arrays.get("rng/numpy_keys"), "python_state": arrays.get("rng/python_state"),
           "keras_seed": arrays.get("rng/keras_seed"), "scalars": meta.get("rng")}
    if restore_rng and rng["numpy_keys"] is not None and rng["scalars"]:
        set_rng_state(rng)
    return {"step": int(meta["step"]), "epoch": int(meta["epoch"]), "extra": meta.get("extra") or {},
            "config": meta.get("config"), "manifest": manifest, "warning": warning}
