"""Per-example gradient norms for CLARS.

Two ways to the same numbers:

- ``hooks`` (Linear and Conv2d layers only, no BatchNorm in training mode, each layer called
  once): one extra forward and backward of the summed loss, with the layer inputs and output
  gradients captured; a layer's per-example weight gradient is then g_iᵀ·a_i (Linear, a rank-one
  product whose norm is ‖g_i‖·‖a_i‖) or G_i·unfold(A_i)ᵀ (Conv2d, a batched matmul). The cost is
  about one more training step.
- ``vmap``: torch.func's vmap over grad, any model; it materialises every example's full
  gradient and is an order of magnitude slower.
"""
import contextlib

import torch
import torch.nn.functional as F
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


def per_example_norm_sums(model, loss_fn, inputs, targets, *, chunk_size=None, allreduce=False, method="auto",
                          engine=None):
    """Σ_i ‖∇_l f_i(w)‖ for each trainable parameter l, over the examples of this batch.

    ``loss_fn(outputs, targets)`` is the mean loss of a batch; applied to one example it is the
    per-example loss f_i. With ``allreduce=True`` the sums are summed across Horovod ranks
    (``engine``: or another object with Horovod's ``allreduce``/``size``, such as
    :class:`largebatch.torch.TorchDistributed`; one allreduce for all layers) and the returned
    batch size is the global one.

    ``method``: ``"hooks"`` (Linear/Conv2d models, see the module docstring), ``"vmap"`` (any
    model), or ``"auto"`` (hooks where they apply, else vmap). Parameter gradients (``.grad``)
    and BatchNorm statistics are left untouched.

    Returns ``(sums, batch_size)``: ``sums`` maps each parameter tensor to a 0-d tensor; pass
    both to :meth:`largebatch.torch.CLARS.set_per_example_norms`. ``chunk_size`` bounds the
    memory of the vmap (examples per chunk).
    """
    if method not in ("auto", "hooks", "vmap"):
        raise ValueError(f"method: expected 'auto', 'hooks' or 'vmap', got {method!r}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    reason = None if method == "vmap" else _hooks_unsupported(model)
    if method == "hooks" and reason:
        raise ValueError(f"method='hooks': {reason}; use method='vmap'")
    use_hooks = method != "vmap" and reason is None
    norms = _hook_norms(model, loss_fn, inputs, targets) if use_hooks else None
    if norms is None:
        if method == "hooks":
            raise ValueError("method='hooks': a layer was called more than once in the forward pass; "
                             "use method='vmap'")
        norms = _vmap_norms(model, loss_fn, inputs, targets, named, chunk_size)
    sums = torch.stack([norms[p].sum() for _, p in named])
    batch = inputs.shape[0]
    if allreduce:
        hvd = engine or import_horovod("torch")
        sums = hvd.allreduce(sums, op=hvd.Sum, name="largebatch.clars.norm_sums")
        batch *= hvd.size()
    return {p: s for (_, p), s in zip(named, sums.unbind())}, batch


_HOOKED = (torch.nn.Linear, torch.nn.Conv2d)


def _hooks_unsupported(model):
    """Why the hook method cannot give per-example gradients of this model, or None."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.training:
            return f"BatchNorm {name!r} in training mode couples the examples"
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if not isinstance(module, _HOOKED):
            return f"layer {name!r} ({type(module).__name__}) is not Linear or Conv2d"
        if isinstance(module, torch.nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"
                                                    or isinstance(module.padding, str)):
            return f"Conv2d {name!r} has groups, a padding mode or string padding"
    return None


def _hook_norms(model, loss_fn, inputs, targets):
    """{parameter: per-example gradient norms (B,)} from captured inputs and output gradients;
    None if a hooked layer ran more than once (shared layer)."""
    captured, calls = {}, {}

    def keep(module, args, output):
        calls[module] = calls.get(module, 0) + 1
        captured[module] = (args[0].detach(), output)

    handles = [m.register_forward_hook(keep) for m in model.modules()
               if isinstance(m, _HOOKED) and any(p.requires_grad for p in m.parameters(recurse=False))]
    try:
        with torch.enable_grad():
            out = model(inputs)
            total = loss_fn(out, targets) * inputs.shape[0]          # Σ_i f_i for a mean loss
            modules = list(captured)
            grads = torch.autograd.grad(total, [captured[m][1] for m in modules])
    finally:
        for h in handles:
            h.remove()
    if any(n > 1 for n in calls.values()):
        return None
    norms = {}
    with torch.no_grad():
        for m, g in zip(modules, grads):
            a = captured[m][0]
            if isinstance(m, torch.nn.Conv2d):
                cols = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
                weight_sq = _product_norm_sq(g.flatten(2), cols)          # (B, C_out, L) · (B, C_in·k·k, L)ᵀ
                bias_sq = _sq(g.flatten(2).sum(2))
            elif a.dim() == 2:                                            # rank one: ‖g aᵀ‖ = ‖g‖‖a‖
                weight_sq = _sq(g) * _sq(a)
                bias_sq = _sq(g)
            else:                                                         # (B, ..., features)
                g3, a3 = g.flatten(1, -2), a.flatten(1, -2)
                weight_sq = _product_norm_sq(g3.transpose(1, 2), a3.transpose(1, 2))
                bias_sq = _sq(g3.sum(1))
            if m.weight.requires_grad:
                norms[m.weight] = weight_sq.sqrt()
            if m.bias is not None and m.bias.requires_grad:
                norms[m.bias] = bias_sq.sqrt()
    return norms


def _sq(x):
    """Per-example squared norm of (B, ...)."""
    return torch.linalg.vector_norm(x.flatten(1), dim=1).square()


def _product_norm_sq(g, a):
    """‖g_i a_iᵀ‖² for g (B, m, L), a (B, n, L): as the product's norm, or, when L² < m·n, as
    Σ (g_iᵀg_i) ⊙ (a_iᵀa_i) over L×L Gram matrices (same value, far fewer operations when the
    layer's output has few positions)."""
    L = g.shape[2]
    if L * L < g.shape[1] * a.shape[1]:
        return (torch.bmm(g.transpose(1, 2), g) * torch.bmm(a.transpose(1, 2), a)).sum((1, 2))
    return _sq(torch.bmm(g, a.transpose(1, 2)))


def _vmap_norms(model, loss_fn, inputs, targets, named, chunk_size):
    params = {n: p.detach() for n, p in named}
    buffers = dict(model.named_buffers())

    def example_loss(p, x, y):
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    # functional_call does not put a shared (tied) layer's parameters back after grad/vmap:
    # restore every module's own parameters by hand
    saved = [(m, k, v) for m in model.modules() for k, v in m.named_parameters(recurse=False)]
    try:
        with _batchnorm_without_running_stats(model):
            per_example = vmap(grad(example_loss), in_dims=(None, 0, 0), chunk_size=chunk_size)(params, inputs,
                                                                                                 targets)
    finally:
        for m, k, v in saved:
            setattr(m, k, v)
    return {p: per_example[n].flatten(1).norm(dim=1) for n, p in named}
