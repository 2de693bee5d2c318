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


_OP_NAMES = {"average": "Average", "sum": "Sum", "adasum": "Adasum"}


def _op(hvd, op):
    """Horovod's reduction op from ``op``: None (Average), hvd.Average / hvd.Sum / hvd.Adasum, or
    their names ('average', 'sum', 'adasum')."""
    if op is None:
        return hvd.Average
    if isinstance(op, str) and op.lower() in _OP_NAMES:
        return getattr(hvd, _OP_NAMES[op.lower()])
    for name in _OP_NAMES.values():
        if not isinstance(op, str) and op == getattr(hvd, name):
            return op
    raise ValueError(f"op: expected hvd.Average, hvd.Sum or hvd.Adasum (or 'average', 'sum', 'adasum'), got {op!r}")


def _op_name(hvd, op):
    return next(name for name in _OP_NAMES.values() if op == getattr(hvd, name))


def distributed_optimizer(optimizer, model=None, *, named_parameters=None, compression=None,
                          backward_passes_per_step=1, op=None, gradient_predivide_factor=1.0, broadcast=True,
                          root_rank=0):
    """Wrap ``optimizer`` in ``hvd.DistributedOptimizer`` and (by default) broadcast the model's
    parameters and the optimizer state from ``root_rank``.

    - ``backward_passes_per_step=k`` accumulates k backward passes locally before one
      allreduce: a global batch of per-rank batch × ranks × k. Horovod *sums* the k passes, so
      divide each pass's loss by k (the loss is then normalised by the global batch, as Goyal
      et al. prescribe).
    - ``op``: Horovod's reduction, passed through: ``hvd.Average`` (default, also ``None`` or
      ``'average'``), ``hvd.Sum`` (``'sum'``) or ``hvd.Adasum`` (``'adasum'``; a Horovod script's
      ``--use-adasum``). With Average and Sum the optimizer steps once on the reduced gradient, so
      trust ratios are the same on every rank. With Adasum Horovod steps each rank's optimizer on
      its *local* gradient and combines the resulting parameter deltas with Adasum: trust ratios
      are each rank's own; the optimizer is given one param group per parameter for this (see
      :func:`_one_group_per_parameter`).
    - ``gradient_predivide_factor=f`` (op Average only, Horovod's meaning): gradients are scaled
      by 1/f before the sum and f/size after it; the result is the average.
    - ``compression='fp16'`` halves allreduce traffic.
    - AMP: see :func:`amp_step` (Average and Sum).
    """
    hvd = import_horovod("torch")
    op = _op(hvd, op)
    try:
        factor = float(gradient_predivide_factor)
    except (TypeError, ValueError):
        factor = None
    if factor is None or not factor > 0 or factor != factor or factor == float("inf"):
        raise ValueError(f"gradient_predivide_factor: expected a number > 0, got {gradient_predivide_factor!r}")
    if factor != 1.0 and op != hvd.Average:
        raise ValueError(f"gradient_predivide_factor: only used with op=hvd.Average, got op=hvd.{_op_name(hvd, op)} "
                         f"and gradient_predivide_factor={gradient_predivide_factor!r}")
    if named_parameters is None and model is not None:
        named_parameters = model.named_parameters()
    wrapped = hvd.DistributedOptimizer(
        optimizer, named_parameters=named_parameters, compression=_compression(hvd, compression),
        backward_passes_per_step=backward_passes_per_step, op=op,
        gradient_predivide_factor=factor)
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

