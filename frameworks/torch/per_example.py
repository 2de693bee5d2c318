"""Per-example gradient norms for CLARS, with torch.func (vmap over grad)."""
import contextlib

import torch
from torch.func import functional_call, grad, vmap

from largebatch.horovod_support import import_horovod


@contextlib.contextmanager
def _batchnorm_without_running_stats(model):
    """Under vmap, BatchNorm must not update its running statistics in place; each example is
    normalised with its own statistics, as torch.func defines per-example gradients."""
    saved = []
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.training:
            saved.append((module, module.track_running_stats))
            module.track_running_stats = False
    try:
        yield
    finally:
        for module, flag in saved:
            module.track_running_stats = flag


def per_example_norm_sums(model, loss_fn, inputs, targets, *, chunk_size=None, allreduce=False):
    """Σ_i ‖∇_l f_i(w)‖ for each trainable parameter l, over the examples of this batch.

    ``loss_fn(outputs, targets)`` is the mean loss of a batch; applied to one example it is the
    per-example loss f_i. With ``allreduce=True`` the sums are summed across Horovod ranks
    (one allreduce for all layers) and the returned batch size is the global one.

    Returns ``(sums, batch_size)``: ``sums`` maps each parameter tensor to a 0-d tensor; pass
    both to :meth:`largebatch.torch.CLARS.set_per_example_norms`. ``chunk_size`` bounds the
    memory of the vmap (examples per chunk).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in named}
    buffers = dict(model.named_buffers())

    def example_loss(p, x, y):
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    with _batchnorm_without_running_stats(model):
        per_example = vmap(grad(example_loss), in_dims=(None, 0, 0), chunk_size=chunk_size)(params, inputs, targets)
    sums = torch.stack([per_example[n].flatten(1).norm(dim=1).sum() for n, _ in named])
    batch = inputs.shape[0]
    if allreduce:
        hvd = import_horovod("torch")
        sums = hvd.allreduce(sums, op=hvd.Sum, name="largebatch.clars.norm_sums")
        batch *= hvd.size()
    return {p: s for (_, p), s in zip(named, sums.unbind())}, batch
