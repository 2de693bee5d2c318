"""How large a batch and how many nodes: the gradient noise scale's model of training joined to
a ring-allreduce model of a step.

Statistics (McCandlish et al. 2018, eq. 2.11, with B_crit ≈ B_simple =: B_noise): to reach the
same loss, a run at global batch B takes

    S(B) = S_min (1 + B_noise / B) steps,     E(B) = E_min (1 + B / B_noise) examples,

and one measured run (``reference_steps`` at ``reference_batch``) fixes S_min = S / (1 + B_noise/B).

Systems: a data-parallel step on N nodes with per-node batch b (no overlap of compute and
communication, an upper bound on the step):

    t_step = b · t_example + t_ring(4·params bytes, N),
    t_ring(n, p) = 2 (p - 1) α + 2 (p - 1)/p · n β          (Patarasuk & Yuan 2009; Thakur et al. 2005)

Time to the loss = S(N·b) · t_step. The recommendation is the global batch nearest B_noise
(twice the fewest steps and twice the fewest examples: the paper's balance of time and compute)
on the fewest nodes that reach it; the fastest configuration is reported beside it.
Pure Python.
"""
from dataclasses import asdict, dataclass
from typing import Dict, List, Sequence, Tuple

__all__ = ["ring_allreduce_time", "PlanRow", "plan", "recommend", "NODE_COUNTS", "BYTES_PER_PARAMETER"]

NODE_COUNTS = tuple(2 ** k for k in range(11))          # 1 ... 1024
BYTES_PER_PARAMETER = 4                                  # float32 gradients


def ring_allreduce_time(nbytes: float, workers: int, alpha: float, beta: float) -> float:
    """Seconds for a ring allreduce of ``nbytes`` over ``workers`` (α: per message, β: per byte)."""
    if workers <= 1:
        return 0.0
    return 2 * (workers - 1) * alpha + 2 * (workers - 1) / workers * nbytes * beta


@dataclass
class PlanRow:
    nodes: int
    per_worker_batch: int
    global_batch: int
    steps: float                  # to the reference run's loss
    steps_over_min: float
    examples_over_min: float
    compute_s: float
    allreduce_s: float
    step_s: float
    time_s: float                 # to the reference run's loss
    hardware_efficiency: float    # compute / step

    def as_dict(self) -> Dict:
        return asdict(self)


def plan(noise_scale: float, reference_batch: float, reference_steps: float, seconds_per_example: float,
         params: float, alpha: float, beta: float, per_worker_batches: Sequence[int],
         nodes: Sequence[int] = NODE_COUNTS) -> List[PlanRow]:
    """One :class:`PlanRow` per (node count, per-node batch); see the module docstring."""
    for name, value in (("noise_scale", noise_scale), ("reference_batch", reference_batch),
                        ("reference_steps", reference_steps), ("seconds_per_example", seconds_per_example),
                        ("params", params)):
        if not value > 0:
            raise ValueError(f"{name}: expected a number > 0, got {value!r}")
    s_min = reference_steps / (1.0 + noise_scale / reference_batch)
    rows = []
    for b in per_worker_batches:
        for n in nodes:
            batch = n * b
            steps = s_min * (1.0 + noise_scale / batch)
            compute = b * seconds_per_example
            comm = ring_allreduce_time(BYTES_PER_PARAMETER * params, n, alpha, beta)
            step = compute + comm
            rows.append(PlanRow(nodes=n, per_worker_batch=b, global_batch=batch, steps=steps,
                                steps_over_min=1.0 + noise_scale / batch, examples_over_min=1.0 + batch / noise_scale,
                                compute_s=compute, allreduce_s=comm, step_s=step, time_s=steps * step,
                                hardware_efficiency=compute / step))
    return rows


def recommend(rows: Sequence[PlanRow], noise_scale: float) -> Tuple[PlanRow, PlanRow]:
    """(balanced, fastest): the global batch nearest B_noise (fewest nodes, then the faster), and
    the configuration with the least time to the loss."""
    import math
    balanced = min(rows, key=lambda r: (abs(math.log(r.global_batch / noise_scale)), r.nodes, r.time_s))
    fastest = min(rows, key=lambda r: (r.time_s, r.nodes))
    return balanced, fastest

