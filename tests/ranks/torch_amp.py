"""Rank script: GradScaler + Horovod through largebatch.torch.amp_step (synchronize, unscale, step)."""
import torch
import horovod.torch as hvd

import largebatch.torch as lbt
from multirank import report

torch.set_num_threads(1)
hvd.init()
torch.manual_seed(hvd.rank())
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
opt = lbt.distributed_optimizer(lbt.LARS(model.parameters(), lr=1.0, weight_decay=1e-4, trust_coefficient=0.01),
                                model)
scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
stepped = []
for step in range(4):
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))          # different data per rank
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    lbt.amp_step(opt, scaler, clip_grad_norm=1.0, parameters=model.parameters())
    stepped.append(scaler.get_scale())
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
report(hvd.rank(), weights=flat.numpy(), finite=bool(torch.isfinite(flat).all()), scales=stepped)
