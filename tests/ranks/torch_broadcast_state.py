"""Rank script: hvd.broadcast_optimizer_state on fresh largebatch optimizers (zero-gradient step)."""
import torch
import horovod.torch as hvd

import largebatch.torch as lbt
from multirank import report

torch.set_num_threads(1)
hvd.init()
torch.manual_seed(hvd.rank())
results = {}
for name, cls, kwargs in [("lars", lbt.LARS, dict(lr=5.0, weight_decay=1e-4)), ("larc", lbt.LARS, dict(clip=True)),
                          ("lamb", lbt.LAMB, dict(weight_decay=1e-2)), ("clars", lbt.CLARS, dict(lr=5.0))]:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    torch.nn.init.zeros_(model[2].weight)                 # a zero-norm layer
    opt = cls(model.parameters(), **kwargs)
    hvd.broadcast_optimizer_state(opt, root_rank=0)      # Horovod's own path: steps on zero gradients
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    results[name] = flat.numpy()
    results[name + "_finite"] = bool(torch.isfinite(flat).all())
report(hvd.rank(), **results)
