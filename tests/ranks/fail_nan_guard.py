"""Rank script: the non-finite guard under Horovod. Rank 1 alone gets a NaN gradient in
'1.weight' at step 2; both ranks must see one agreed flag, skip that step, name the layer, and
end with identical, finite weights."""
import horovod.torch as hvd
import torch

from largebatch.torch import LARS, NonFiniteGuard, distributed_optimizer
from multirank import report

hvd.init()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
opt = distributed_optimizer(LARS(model.parameters(), lr=0.1, momentum=0.9), model)
guard = NonFiniteGuard(model, opt, hvd=hvd)
bad_steps, layers = [], []
for step in range(1, 5):
    opt.zero_grad()
    torch.manual_seed(100 + 10 * step + hvd.rank())
    handle = None
    if step == 2 and hvd.rank() == 1:
        handle = model[1].weight.register_hook(lambda g: g * float("nan"))
    model(torch.randn(8, 4)).square().mean().backward()
    if handle is not None:
        handle.remove()
    opt.synchronize()
    bad = guard.check(step)
    if bad is None:
        with opt.skip_synchronize():
            opt.step()
    else:
        bad_steps.append(step)
        layers.append(bad.layer)
        print(f"rank {hvd.rank()}: {bad.message}", flush=True)
w = torch.cat([p.detach().flatten() for p in model.parameters()])
report(hvd.rank(), w=w.numpy(), bad_steps=bad_steps, layer_is_named=[layer == "1.weight" for layer in layers])
