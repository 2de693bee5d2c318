"""Rank script: data-parallel training with a largebatch optimizer under Horovod.

argv: ALGORITHM BACKWARD_PASSES_PER_STEP
Each rank trains on its own shard (different data per rank). Rank 0 also replays the same
training in-process on the concatenated global batches, without Horovod, for comparison.
"""
import copy
import sys

import torch
import horovod.torch as hvd

import largebatch.torch as lbt
from multirank import report

ALGORITHM, PASSES = sys.argv[1], int(sys.argv[2])
STEPS, MICRO = 6, 4                      # optimizer steps; examples per rank per backward pass
torch.set_num_threads(1)
hvd.init()
rank, size = hvd.rank(), hvd.size()


def make_model():
    torch.manual_seed(1234 + rank)       # different init per rank: the broadcast must fix it
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 4 * 4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def make_optimizer(model):
    params = lbt.param_groups(model)
    if ALGORITHM == "lamb":
        return lbt.LAMB(params, lr=0.01, weight_decay=1e-2)
    cls = lbt.CLARS if ALGORITHM == "clars" else lbt.LARS
    return cls(params, lr=2.0, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.01,
               nesterov=ALGORITHM == "lars-nesterov")


gen = torch.Generator().manual_seed(7)   # the same global data on every rank
global_x = torch.randn(STEPS, size * PASSES * MICRO, 3, 6, 6, generator=gen, dtype=torch.float64)
global_y = torch.randint(0, 3, (STEPS, size * PASSES * MICRO), generator=gen)
loss_fn = torch.nn.functional.cross_entropy


def shard(step, micro):                  # rank r's micro-batch: rows [r·PASSES·MICRO + micro·MICRO, ...)
    start = (rank * PASSES + micro) * MICRO
    return global_x[step, start:start + MICRO], global_y[step, start:start + MICRO]


def clars_norms(model, opt, batches):
    sums, total = None, 0
    for x, y in batches:
        s, b = lbt.per_example_norm_sums(model, loss_fn, x, y, allreduce=hvd.is_initialized() and opt is not None)
        sums = s if sums is None else {p: sums[p] + s[p] for p in s}
        total += b
    return sums, total


model = make_model().double()
initial = copy.deepcopy(model) if rank == 0 else None
opt = lbt.distributed_optimizer(make_optimizer(model), model, backward_passes_per_step=PASSES)
if rank == 0:
    initial = copy.deepcopy(model)       # after the broadcast: rank 0's own weights
for step in range(STEPS):
    opt.zero_grad()
    micro_batches = [shard(step, m) for m in range(PASSES)]
    for x, y in micro_batches:
        (loss_fn(model(x), y) / PASSES).backward()     # Horovod sums the passes
    if ALGORITHM == "clars":
        opt.synchronize()
        sums, batch = clars_norms(model, opt, micro_batches)
        opt.set_per_example_norms(sums, batch)
        with opt.skip_synchronize():
            opt.step()
    else:
        opt.step()
distributed = torch.cat([p.detach().flatten() for p in model.parameters()]).numpy()

single = distributed * 0
if rank == 0:                            # the same steps, one process, concatenated batches
    ref_model = initial
    ref_opt = make_optimizer(ref_model)
    for step in range(STEPS):
        ref_opt.zero_grad()
        x, y = global_x[step], global_y[step]
        loss_fn(ref_model(x), y).backward()
        if ALGORITHM == "clars":
            sums, batch = lbt.per_example_norm_sums(ref_model, loss_fn, x, y)
            ref_opt.set_per_example_norms(sums, batch)
        ref_opt.step()
    single = torch.cat([p.detach().flatten() for p in ref_model.parameters()]).numpy()

report(rank, distributed=distributed, single=single)
