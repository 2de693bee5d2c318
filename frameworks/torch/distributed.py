"""Horovod integration: one call wraps a largebatch optimizer for data-parallel training.

Trust ratios are computed in ``step()``, after Horovod has averaged the gradients, so every
rank computes identical ratios and identical updates.
"""
from largebatch.horovod_support import import_horovod


def _compression(hvd, compression):
    if compression is None or compression == "none":
        return hvd.Compression.none
    if compression == "fp16":
        return hvd.Compression.fp16
    if isinstance(compression, str):
        raise ValueError(f"compression: expected None, 'none' or 'fp16', got {compression!r}")
    return compression


def distributed_optimizer(optimizer, model=None, *, named_parameters=None, compression=None,
                          backward_passes_per_step=1, gradient_predivide_factor=1.0, broadcast=True, root_rank=0):
    """Wrap ``optimizer`` in ``hvd.DistributedOptimizer`` and (by default) broadcast the model's
    parameters and the optimizer state from ``root_rank``.

    - ``backward_passes_per_step=k`` accumulates k backward passes locally before one
      allreduce: a global batch of per-rank batch × ranks × k. Horovod *sums* the k passes, so
      divide each pass's loss by k (the loss is then normalised by the global batch, as Goyal
      et al. prescribe).
    - ``compression='fp16'`` halves allreduce traffic; ``gradient_predivide_factor`` splits the
      averaging before/after the sum (Horovod's meaning).
    - AMP: see :func:`amp_step`.
    """
    hvd = import_horovod("torch")
    if named_parameters is None and model is not None:
        named_parameters = model.named_parameters()
    wrapped = hvd.DistributedOptimizer(
        optimizer, named_parameters=named_parameters, compression=_compression(hvd, compression),
        backward_passes_per_step=backward_passes_per_step, op=hvd.Average,
        gradient_predivide_factor=gradient_predivide_factor)
    if broadcast:
        if model is None:
            raise ValueError("model: broadcast=True needs the model whose parameters to broadcast")
        broadcast_state(model, wrapped, root_rank)
    return wrapped


def broadcast_state(model, optimizer, root_rank=0):
    """Make every rank start from ``root_rank``'s parameters and optimizer state.

    largebatch optimizers create their state up front, so Horovod does not need its
    zero-gradient initialisation step (which would apply one step of weight decay).
    """
    hvd = import_horovod("torch")
    init = getattr(optimizer, "init_state", None)
    if init is not None:
        init()
    hvd.broadcast_optimizer_state(optimizer, root_rank=root_rank)
    hvd.broadcast_parameters(model.state_dict(), root_rank=root_rank)


def amp_step(optimizer, scaler, clip_grad_norm=None, parameters=None):
    """One AMP step under Horovod: synchronize (allreduce), unscale, optionally clip, then step
    without a second synchronisation, and update the scale. Returns what ``scaler.step`` returns."""
    optimizer.synchronize()
    scaler.unscale_(optimizer)
    if clip_grad_norm is not None:
        import torch
        torch.nn.utils.clip_grad_norm_(parameters, clip_grad_norm)
    with optimizer.skip_synchronize():
        result = scaler.step(optimizer)
    scaler.update()
    return result

