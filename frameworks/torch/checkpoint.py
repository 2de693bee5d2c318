"""Torch checkpoints in the core's format (:mod:`largebatch.checkpoint`): model, optimizer state
(LARS momentum, LAMB moments, trust-ratio slots), step/epoch, RNG states (torch, NumPy, Python)
and the resolved configuration, written atomically by rank 0; loaded on rank 0 and broadcast.

    from largebatch.torch import save_checkpoint, load_checkpoint
    save_checkpoint(path, model, optimizer, step=s, epoch=e, config=cfg_dict, keep=3)   # rank 0
    state = load_checkpoint(path, model, optimizer)                                     # rank 0
    broadcast_state(model, optimizer)                                                   # all ranks

The payload is loaded with ``torch.load(weights_only=True)``: RNG states are stored as tensors
and plain numbers, not pickled NumPy objects.
"""
import io
import os
import random

import numpy as np
import torch

from largebatch import checkpoint as core

__all__ = ["save_checkpoint", "load_checkpoint", "signature_of", "rng_state", "set_rng_state",
           "broadcast_resume_state"]


def signature_of(model):
    shapes = [(n, tuple(p.shape)) for n, p in model.state_dict().items()]
    return core.model_signature(shapes)


def rng_state():
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": int(py_version), "state": list(py_state),
                       "gauss": None if py_gauss is None else float(py_gauss)}}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def _unwrap_state_dict(optimizer):
    return optimizer.state_dict() if optimizer is not None else None


def save_checkpoint(path, model, optimizer=None, *, step, epoch, config=None, cfg_hash=None, model_name=None,
                    extra=None, keep=None):
    """Write a checkpoint atomically (call on rank 0 only); prune to the newest ``keep`` in its folder."""
    payload = {"model": model.state_dict(), "optimizer": _unwrap_state_dict(optimizer), "step": int(step),
               "epoch": int(epoch), "rng": rng_state(), "extra": dict(extra or {}),
               "config": config}
    buf = io.BytesIO()
    torch.save(payload, buf)
    manifest = {"framework": "torch", "step": int(step), "epoch": int(epoch), "model": model_name,
                "model_signature": signature_of(model), "config_hash": cfg_hash,
                "torch": torch.__version__}
    core.write(path, buf.getvalue(), manifest)
    if keep:
        core.prune(os.path.dirname(os.path.abspath(path)), keep)
    return path


def load_checkpoint(path, model, optimizer=None, *, cfg_hash=None, restore_rng=True):
    """Check and load ``path`` into ``model`` (and ``optimizer``). Returns a dict with step, epoch,
    extra, config, manifest and ``warning`` (a config-hash mismatch line, or None).
    Raises :class:`largebatch.checkpoint.CheckpointError` (one line) for a damaged file or a
    checkpoint of another model; the model is not touched in that case."""
    manifest, payload = core.read(path)
    warning = core.check_compatible(path, manifest, framework="torch", signature=signature_of(model),
                                    cfg_hash=cfg_hash)
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:       # noqa: BLE001  (any unpickling failure: one line)
        raise core.CheckpointError(f"checkpoint {path}: cannot load the payload "
                                   f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    try:
        model.load_state_dict(state["model"])
        if optimizer is not None:
            if state.get("optimizer") is None:
                raise core.CheckpointError(f"checkpoint {path}: holds no optimizer state")
            optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        if isinstance(err, core.CheckpointError):
            raise
        raise core.CheckpointError(f"checkpoint {path}: does not fit this model/optimizer "
                                   f"({str(err).splitlines()[0][:200]})") from None
    if restore_rng and state.get("rng") is not None:
        set_rng_state(state["rng"])
    return {"step": state["step"], "epoch": state["epoch"], "extra": state.get("extra", {}),
            "config": state.get("config"), "manifest": manifest, "warning": warning}


def broadcast_resume_state(info, hvd, root_rank=0):
    """Send rank 0's resume info (step, epoch, extra, RNG) to every rank (a pickled object)."""
    if hvd is None or hvd.size() == 1:
        return info
    return hvd.broadcast_object(info, root_rank=root_rank, name="largebatch.resume")
