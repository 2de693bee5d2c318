"""A plain PyTorch training script made large-batch and data-parallel: the lines marked
``# largebatch`` are the whole change from a single-process torch.optim.SGD script.

    horovodrun -np 2 -H localhost:2 python -m largebatch.torch.example_train
"""
import torch
import horovod.torch as hvd                                         # largebatch

import largebatch.torch as lbt                                      # largebatch
from largebatch.schedules import build_schedule, scaled_lr          # largebatch
from largebatch.torch.models import SmallCNN

hvd.init()                                                          # largebatch
torch.manual_seed(0)
torch.set_num_threads(1)
per_worker, steps_per_epoch, epochs = 64, 20, 3
global_batch = per_worker * hvd.size()                              # largebatch

# synthetic, learnable data: the label is the channel with the largest mean
x = torch.randn(steps_per_epoch * global_batch, 3, 16, 16) * 0.5 + torch.randn(steps_per_epoch * global_batch, 3, 1, 1)
y = x.mean((2, 3)).argmax(1)
shard = slice(hvd.rank(), None, hvd.size())                         # largebatch: each rank its own data
x, y = x[shard], y[shard]

model = SmallCNN(num_classes=3)
# was: optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
peak = scaled_lr(0.5, global_batch, base_batch=128)                 # largebatch: linear scaling rule
optimizer = lbt.LARS(lbt.param_groups(model), lr=peak, momentum=0.9, weight_decay=5e-4,
                     trust_coefficient=0.02)                        # largebatch
optimizer = lbt.distributed_optimizer(optimizer, model)             # largebatch: allreduce + broadcast
schedule = build_schedule(peak_lr=peak, steps_per_epoch=steps_per_epoch, epochs=epochs,
                          warmup="gradual", warmup_epochs=1, decay="poly")   # largebatch

step = 0
for epoch in range(epochs):
    for i in range(steps_per_epoch):
        for group in optimizer.param_groups:
            group["lr"] = schedule(step)                            # largebatch
        xb, yb = x[i * per_worker:(i + 1) * per_worker], y[i * per_worker:(i + 1) * per_worker]
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        optimizer.step()
        step += 1
    accuracy = (model(x).argmax(1) == y).float().mean()
    accuracy = hvd.allreduce(accuracy, name="accuracy")             # largebatch: average over ranks
    if hvd.rank() == 0:
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, train accuracy {accuracy.item():.3f}, "
              f"lr {schedule(step):.4f}")
