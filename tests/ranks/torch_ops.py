"""Rank script: largebatch.torch.distributed_optimizer(op=..., gradient_predivide_factor=...).

Each rank has its own batch. For every case, a model starting from the same weights on every
rank takes one step; the rank reports its local gradients (from a separate copy of the model)
and the weights after the step. The test computes what Average, Sum and Adasum must give.
"""
import copy

import horovod.torch as hvd
import torch

import largebatch.torch as lbt
from multirank import error_of, report

torch.set_num_threads(1)
hvd.init()
rank = hvd.rank()

torch.manual_seed(0)
base = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
gen = torch.Generator().manual_seed(100 + rank)                 # a different batch on each rank
x = torch.randn(8, 5, generator=gen)
y = torch.randint(0, 3, (8,), generator=gen)


def loss_of(model):
    return torch.nn.functional.cross_entropy(model(x), y)


local = copy.deepcopy(base)
loss_of(local).backward()
out = {f"grad{i}": p.grad.detach().numpy().copy() for i, p in enumerate(local.parameters())}
out.update({f"w0_{i}": p.detach().numpy().copy() for i, p in enumerate(base.parameters())})

CASES = {
    "sgd_average": ("sgd", hvd.Average, 1.0),
    "sgd_sum": ("sgd", "sum", 1.0),
    "sgd_adasum": ("sgd", hvd.Adasum, 1.0),
    "sgd_predivide": ("sgd", None, 2.0),                        # op Average, split 1/2 before, 2/size after
    "lars_sum": ("lars", hvd.Sum, 1.0),
    "lars_adasum": ("lars", "adasum", 1.0),
}
for name, (kind, op, factor) in CASES.items():
    model = copy.deepcopy(base)
    if kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
    else:
        opt = lbt.LARS(lbt.param_groups(model), lr=2.0, momentum=0.0, weight_decay=0.0, trust_coefficient=0.01)
    opt = lbt.distributed_optimizer(opt, model, op=op, gradient_predivide_factor=factor)
    opt.zero_grad()
    loss_of(model).backward()
    opt.step()
    for i, p in enumerate(model.parameters()):
        out[f"{name}.w{i}"] = p.detach().numpy().copy()


model = copy.deepcopy(base)
out["bad_op"] = error_of(lambda: lbt.distributed_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                                           op=hvd.Max, broadcast=False))
out["bad_predivide"] = error_of(lambda: lbt.distributed_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                                                  op=hvd.Sum, gradient_predivide_factor=2.0,
                                                                  broadcast=False))
report(rank, **out)
