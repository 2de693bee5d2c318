"""Do all ranks still train one model? The comparison behind both frameworks' rank-consistency
checks: every N steps each rank computes (Σx, Σx²) in float64 for each of its parameters and
optimizer-state tensors, one allgather collects the rows, and :func:`first_divergence` names
the first tensor whose numbers differ between rank 0 and another rank.

With averaged gradients and state broadcast from rank 0 the ranks agree bit for bit, so the
default tolerance is 0; a rank whose gradients are not averaged (an optimizer not wrapped by
Horovod) or that skipped a broadcast drifts at once.
"""
import numpy as np

__all__ = ["RankDivergenceError", "first_divergence"]


class RankDivergenceError(RuntimeError):
    """Ranks hold different weights: they are no longer training one model."""


def first_divergence(gathered, names, where, *, rtol=0.0, hint=""):
    """``gathered``: (ranks, 2 × tensors) array of (Σx, Σx²) rows; ``names``: one per tensor.
    Returns the one-line message for the first tensor that differs from rank 0's, or None."""
    gathered = np.asarray(gathered, dtype=np.float64)
    reference = gathered[0]
    for rank in range(1, gathered.shape[0]):
        row = gathered[rank]
        bad = ~np.isclose(row, reference, rtol=rtol, atol=0.0, equal_nan=True)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            what = "sum" if i % 2 == 0 else "sum of squares"
            return (f"ranks' weights differ at {where}: {what} of {names[i // 2]!r} is {float(reference[i]):.17g} on "
                    f"rank 0 but {float(row[i]):.17g} on rank {rank}; the ranks are training different models"
                    + (f" ({hint})" if hint else ""))
    return None
