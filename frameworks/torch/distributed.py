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


def init_optimizer_state(optimizer):
    """Create the optimizer's state now (largebatch optimizers: ``init_state()``; torch SGD with
    momentum: zero buffers, which give the same first step as torch's lazily cloned ones).

    With state present, ``hvd.broadcast_optimizer_state`` sends it as is instead of running
    Horovod's zero-gradient initialisation step, which would apply one step of weight decay.
    """
    import torch
    init = getattr(optimizer, "init_state", None)
    if init is not None:
        init()
    elif isinstance(optimizer, torch.optim.SGD):
        for group in optimizer.param_groups:
            if group["momentum"] and group.get("dampening", 0) == 0:
                for p in group["params"]:
                    if p.requires_grad and optimizer.state[p].get("momentum_buffer") is None:
                        optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)


def broadcast_state(model, optimizer, root_rank=0):
    """Make every rank start from ``root_rank``'s parameters and optimizer state."""
    hvd = import_horovod("torch")
    init_optimizer_state(optimizer)
    if optimizer.state:
        hvd.broadcast_optimizer_state(optimizer, root_rank=root_rank)
    hvd.broadcast_parameters(model.state_dict(), root_rank=root_rank)


def elastic_state(model, optimizer, **attrs):
    """``hvd.elastic.TorchState`` for Horovod Elastic with a largebatch (or torch SGD) optimizer.

    ``attrs`` (step counters, last lr, ...) are committed, restored and broadcast with the model
    and optimizer. Each sync first creates the optimizer state (:func:`init_optimizer_state`),
    so a worker that joins holds the same layout as rank 0 and no rank runs Horovod's
    weight-decaying initialisation step; a stateless optimizer (SGD without momentum) sends
    only the parameters. Use with ``hvd.elastic.run`` and ``state.commit()``.
    """
    hvd = import_horovod("torch")

    class LargeBatchTorchState(hvd.elastic.TorchState):
        def sync(self):
            broadcast_state(self.model, self.optimizer)            # instead of TorchState's handlers
            super(hvd.elastic.TorchState, self).sync()             # the plain attributes (ObjectState)

    return LargeBatchTorchState(model, optimizer, **attrs)


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

