"""Rank script: torch allreduce (average) and broadcast_parameters, different data per rank."""
import torch
import horovod.torch as hvd

from multirank import report

hvd.init()
rank, size = hvd.rank(), hvd.size()
torch.manual_seed(100 + rank)                       # every rank starts from different values

local = torch.arange(6, dtype=torch.float64) * (rank + 1)   # rank r holds (r+1)·[0..5]
averaged = hvd.allreduce(local, op=hvd.Average, name="avg")
summed = hvd.allreduce(local, op=hvd.Sum, name="sum")

model = torch.nn.Linear(4, 3)
before = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
after = torch.cat([p.detach().flatten() for p in model.parameters()])

report(rank, size=size, averaged=averaged.numpy(), summed=summed.numpy(),
       before=before.numpy(), after=after.numpy())
