"""Non-finite guard: one reduced flag per step for NaN/Inf in gradients (and trust ratios).

    guard = NonFiniteGuard(model, hvd=hvd)            # hvd optional
    optimizer.synchronize()                           # Horovod: gradients averaged first
    bad = guard.check(step)                           # one host read per step
    if bad is None:
        with optimizer.skip_synchronize():
            optimizer.step()
    else:
        print(bad.message)                            # names the first offending layer and the step

The flag is computed on the device: ``torch._foreach_norm`` over all gradients, stacked, one
``isfinite().all()``; under Horovod the flag is allreduced (max) so every rank takes the same
decision. Only after the flag trips are the layers scanned (host reads) to name the first
offending one.
"""
import torch

from largebatch.nonfinite import NonFinite

__all__ = ["NonFiniteGuard", "NonFinite", "nonfinite_flag", "first_nonfinite"]


def _norms(tensors):
    if not tensors:
        return torch.zeros(0)
    try:
        norms = torch._foreach_norm(tensors)
    except (RuntimeError, AttributeError, TypeError):
        norms = [t.norm() for t in tensors]
    return torch.stack([n.float() for n in norms])


def nonfinite_flag(tensors):
    """A 0-dim float tensor: 1.0 if any tensor holds NaN/Inf, else 0.0 (no host sync)."""
    norms = _norms(list(tensors))
    if norms.numel() == 0:
        return torch.zeros(())
    return (~torch.isfinite(norms).all()).float()


def first_nonfinite(named_tensors):
    """(name, 'nan' | 'inf') of the first tensor holding a NaN/Inf, or None (host reads: slow path)."""
    for name, t in named_tensors:
        if t is None:
            continue
        if torch.isnan(t).any():
            return name, "nan"
        if torch.isinf(t).any():
            return name, "inf"
    return None


class NonFiniteGuard:
    """Checks a model's gradients (and an optimizer's ``trust_ratio`` state, if tracked)."""

    def __init__(self, model, optimizer=None, hvd=None):
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.optimizer, self.hvd = optimizer, hvd
        self.skipped = 0

    def _grads(self):
        return [(n, p.grad) for n, p in self.named if p.grad is not None]

    def _ratios(self):
        if self.optimizer is None:
            return []
        out = []
        for n, p in self.named:
            r = self.optimizer.state.get(p, {}).get("trust_ratio")
            if isinstance(r, torch.Tensor):
                out.append((n, r))
        return out

    def flag(self, include_ratios=False):
        tensors = [g for _, g in self._grads()]
        if include_ratios:
            tensors += [r for _, r in self._ratios()]
        f = nonfinite_flag(tensors)
        if self.hvd is not None and self.hvd.size() > 1:
            f = self.hvd.allreduce(f, op=self.hvd.Max, name="largebatch.nonfinite")
        return f

    def check(self, step, include_ratios=False):
        """None when every gradient is finite on every rank, else a :class:`NonFinite`."""
        if float(self.flag(include_ratios)) == 0.0:
            return None
        hit = first_nonfinite(self._grads())
        kind = "gradient"
        if hit is None and include_ratios:
            hit, kind = first_nonfinite(self._ratios()), "trust ratio"
        if hit is None:      # only another rank saw it (unreduced gradients)
            return NonFinite(step, "<on another rank>", "gradient", "nan/inf")
        return NonFinite(step, hit[0], kind, hit[1])
