"""Rank-consistency check for torch training loops: the twin of
``largebatch.keras.callbacks.RankConsistencyCheck``.

    check = largebatch.torch.RankConsistencyCheck(model, optimizer, every_n_steps=100)
    for step in ...:
        ...; optimizer.step()
        check.step(step)          # every N steps: one small allgather; raises when ranks differ

The per-tensor checksum (Σx, Σx² in float64) is computed on the device, one row per rank is
gathered, and the core's :func:`largebatch.consistency.first_divergence` names the first
parameter (or its optimizer state) that differs and the step. Buffers such as BatchNorm's
running statistics come from each rank's own batches and are not compared.
"""
import torch

from largebatch.consistency import RankDivergenceError, first_divergence
from largebatch.horovod_support import import_horovod
from largebatch.validation import check_positive_int

__all__ = ["RankConsistencyCheck", "RankDivergenceError"]

_STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq")
HINT = ("is the optimizer wrapped with largebatch.torch.distributed_optimizer (or hvd.DistributedOptimizer) "
        "and the state broadcast from rank 0?")


class RankConsistencyCheck:
    def __init__(self, model, optimizer=None, every_n_steps=100, include_optimizer=True, rtol=0.0, hvd=None):
        self.model, self.optimizer = model, optimizer
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        self.include_optimizer = bool(include_optimizer) and optimizer is not None
        self.rtol = float(rtol)
        self.hvd = hvd
        self.checks = 0

    def _tensors(self):
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        out = list(named)
        if self.include_optimizer:
            state = self.optimizer.state
            for name, p in named:
                for key in _STATE_KEYS:
                    t = state.get(p, {}).get(key)
                    if torch.is_tensor(t):
                        out.append((f"{name} ({key})", t))
        return out

    def step(self, step):
        """Check after optimizer step ``step`` (1-based) when it is a multiple of every_n_steps."""
        if step % self.every_n_steps == 0:
            self.check(f"step {step}")

    @torch.no_grad()
    def check(self, where="now"):
        hvd = self.hvd or import_horovod("torch")
        tensors = self._tensors()
        parts = []
        for _, t in tensors:
            x = t.detach().to(torch.float64)
            parts += [x.sum(), (x * x).sum()]
        local = torch.stack(parts).cpu() if parts else torch.zeros(0, dtype=torch.float64)
        gathered = hvd.allgather(local[None, :], name="largebatch.rank_consistency").numpy()
        self.checks += 1
        message = first_divergence(gathered, [n for n, _ in tensors], where, rtol=self.rtol, hint=HINT)
        if message:
            raise RankDivergenceError(message)
