"""Rank script: largebatch.torch.RankConsistencyCheck under Horovod.

argv: wrapped | unwrapped. Each rank trains LARS on its own data for 6 steps with a check every
2 steps. 'wrapped': gradients averaged by distributed_optimizer, the checks pass. 'unwrapped':
the optimizer is not wrapped, each rank follows its own gradients, and the first check raises."""
import sys

import torch
import horovod.torch as hvd

import largebatch.torch as lbt
from multirank import report

torch.set_num_threads(1)
hvd.init()
rank = hvd.rank()
torch.manual_seed(0)                    # the same start on every rank
model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
optimizer = lbt.LARS(lbt.param_groups(model), lr=1.0, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02)
if sys.argv[1] == "wrapped":
    optimizer = lbt.distributed_optimizer(optimizer, model)
check = lbt.RankConsistencyCheck(model, optimizer, every_n_steps=2)
gen = torch.Generator().manual_seed(100 + rank)     # different data on each rank
message, failed_at = "", 0
for step in range(1, 7):
    x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    try:
        check.step(step)
    except lbt.RankDivergenceError as err:
        message, failed_at = str(err), step
        break
report(rank, message=message, failed_at=failed_at, checks=check.checks)
