"""The two squared gradient norms the gradient noise scale needs, taken from a PyTorch model.

See :mod:`largebatch.noise_scale` (McCandlish et al. 2018) for the estimators. A rank's own
gradient must be read before the engine averages it: Horovod's DistributedOptimizer and DDP
both start their allreduce from hooks that run once a parameter's gradient is accumulated, and
average in place. :class:`GradientNormTap` registers ``register_post_accumulate_grad_hook`` on
every trainable parameter, which runs inside the accumulation, before those hooks, and sums
``‖grad‖²`` there: after the first backward pass of an update (one micro-batch) and after each
later one (the rank's whole gradient, accumulated). No extra pass over the gradients and no
communication; :func:`squared_norm` reads the averaged gradient afterwards.
"""
from typing import Iterable, List, Optional

import torch

__all__ = ["GradientNormTap", "squared_norm"]


def squared_norm(params: Iterable[torch.nn.Parameter]) -> float:
    """Σ ‖p.grad‖² over the parameters that have a gradient (one host read)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norms = torch._foreach_norm(grads)
    return float(torch.stack(norms).double().square().sum())


class GradientNormTap:
    """Σ ‖grad‖² of ``params`` as each backward pass accumulates it, before any engine averages it.

    Call :meth:`begin_update` before an update's first backward pass and :meth:`end_pass` after
    each; then :meth:`first_pass` is the sum after the first pass (one micro-batch) and
    :meth:`last_pass` after the latest one (with accumulation, the update's whole local gradient). ``scale``: a loss scale to divide out
    (fp16). :meth:`remove` takes the hooks off."""

    def __init__(self, params: Iterable[torch.nn.Parameter]):
        self.params: List[torch.nn.Parameter] = [p for p in params if p.requires_grad]
        self._index = {p: i for i, p in enumerate(self.params)}
        self._sq: List[Optional[torch.Tensor]] = [None] * len(self.params)
        self._first: Optional[List[Optional[torch.Tensor]]] = None
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]

    def _hook(self, param: torch.nn.Parameter) -> None:
        # the norm, squared when summed: no temporary the size of the gradient
        self._sq[self._index[param]] = torch.linalg.vector_norm(param.grad.detach(), dtype=torch.float32)

    def begin_update(self) -> None:
        self._first = None
        self._sq = [None] * len(self.params)

    def end_pass(self) -> None:
        """After each backward pass: the first one's sums are kept apart."""
        if self._first is None:
            self._first = list(self._sq)

    @staticmethod
    def _total(values, scale: float) -> float:
        present = [v for v in values if v is not None]
        if not present:
            return float("nan")
        return float(torch.stack(present).double().square().sum()) / (scale * scale)

    def first_pass(self, scale: float = 1.0) -> float:
        return self._total(self._first or self._sq, scale)

    def last_pass(self, scale: float = 1.0) -> float:
        return self._total(self._sq, scale)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
