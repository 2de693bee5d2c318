"""The PyTorch training loop each rank runs (Horovod, largebatch.torch optimizers)."""
import importlib
import os
import types

import numpy as np

from largebatch import registry
from largebatch.horovod_support import import_horovod
from largebatch.schedules import momentum_correction
from . import faults
from .common import read_resume
from .data import Prefetcher, epoch_batches, eval_batches
from .loop import Hooks, TrainingLoop, accumulation_for, prepare
from .params import announce_exclusion

__all__ = ["run", "build_model", "build_optimizer"]


def build_model(cfg, derived):
    import torch  # noqa: F401
    name, classes, channels = cfg["model"]["name"], derived["num_classes"], cfg["data"]["channels"]
    small = derived["image_size"] <= 64
    models = importlib.import_module("largebatch.torch.models")
    if name == "alexnet_bn":
        return models.alexnet_bn(num_classes=classes, in_channels=channels)
    if name == "small_cnn":
        return models.SmallCNN(num_classes=classes, in_channels=channels, batchnorm=cfg["model"]["batch_norm"])
    fn = getattr(models, name)
    return fn(num_classes=classes, in_channels=channels, small_input=small,
              zero_init_residual=cfg["model"]["zero_init_residual"])


def build_optimizer(cfg, model, lr, track_trust_ratios):
    """The configured optimizer (not yet wrapped for Horovod): ``largebatch.torch.create_optimizer``
    with the YAML's hyper-parameters (the registry's keys for the name)."""
    o = cfg["optimizer"]
    info = registry.get(o["name"])
    extra = {"track_trust_ratios": track_trust_ratios} if info.layerwise else {}
    create = importlib.import_module("largebatch.torch").create_optimizer
    return create(o["name"], model, lr=lr, **{k: o[k] for k in info.keys}, **extra)


def _to_torch(batch, torch):
    x, y = batch
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.from_numpy(y)


def _evaluate(model, val, cfg, derived, hvd, torch, rank, size):
    model.eval()
    loss_sum = correct = count = 0.0
    batches = eval_batches(len(val), rank=rank, size=size, batch=derived["per_worker_batch"])
    with torch.no_grad():
        for batch in Prefetcher(val, batches, train=False, workers=cfg["data"]["loader_workers"]):
            x, y = _to_torch(batch, torch)
            out = model(x)
            loss_sum += float(torch.nn.functional.cross_entropy(out, y, reduction="sum"))
            correct += float((out.argmax(1) == y).sum())
            count += len(y)
    totals = hvd.allreduce(torch.tensor([loss_sum, correct, count], dtype=torch.float64), op=hvd.Sum,
                           name="largebatch.eval")
    model.train()
    loss_sum, correct, count = totals.tolist()
    return {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1)}


def _load_resume(cfg, run_dir, model, optimizer, hvd, rank):
    """Rank 0 reads and checks the checkpoint into model and optimizer (before the Horovod
    broadcast); every rank gets step, epoch, extra and RNG (see common.read_resume)."""
    lbt_ckpt = importlib.import_module("largebatch.torch.checkpoint")
    info = read_resume(cfg, run_dir, hvd, rank, rng_state=lbt_ckpt.rng_state,
                       load=lambda path, cfg_hash: lbt_ckpt.load_checkpoint(path, model, optimizer, cfg_hash=cfg_hash))
    if info is not None and hvd.size() > 1:
        # hvd.broadcast_optimizer_state needs the same state layout on every rank (rank 0's
        # loaded state may hold slots, e.g. trust ratios, that the others create lazily):
        # send the layout (shapes, dtypes, scalars), not the values, which the broadcast sends
        layout = _state_layout(optimizer.state_dict()) if rank == 0 else None
        layout = hvd.broadcast_object(layout, root_rank=0, name="largebatch.resume_layout")
        if rank != 0:
            optimizer.load_state_dict(_from_layout(layout))
            lbt_ckpt.set_rng_state(info["rng"])
    return info


def _state_layout(sd):
    import torch
    state = {pid: {k: (("tensor", tuple(v.shape), v.dtype) if torch.is_tensor(v) else ("value", v))
                   for k, v in st.items()} for pid, st in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def _from_layout(layout):
    import torch
    state = {pid: {k: (torch.zeros(v[1], dtype=v[2]) if v[0] == "tensor" else v[1]) for k, v in st.items()}
             for pid, st in layout["state"].items()}
    return {"state": state, "param_groups": layout["param_groups"]}


def run(exp, loader, threads):
    import torch
    faults.horovod_timeouts()
    hvd = import_horovod("torch")
    hvd.init()
    t, i, _ = threads
    torch.set_num_threads(t)
    try:
        torch.set_num_interop_threads(i)
    except RuntimeError:       # already set (a parallel region ran), keep going
        pass
    # elastic only when horovodrun started an elastic job (a plain launch of the YAML trains as usual)
    elastic = exp.cfg["launcher"]["elastic"] and os.environ.get("HOROVOD_ELASTIC") == "1"
    torch.manual_seed(exp.cfg["train"]["seed"])
    exp, train_set, val_set, schedule, run_dir = prepare(exp, loader, hvd, elastic=elastic)
    cfg, derived = exp.cfg, exp.derived
    rank, size = hvd.rank(), hvd.size()
    pw, spe, total = derived["per_worker_batch"], derived["steps_per_epoch"], derived["total_steps"]

    model = build_model(cfg, derived)
    model.train()
    announce_exclusion(exp, model, rank)
    o = cfg["optimizer"]
    info = registry.get(o["name"])
    track = cfg["output"]["trust_ratios"] and info.layerwise
    optimizer = build_optimizer(cfg, model, schedule(0), track)
    lbt = importlib.import_module("largebatch.torch")
    lbt_ckpt = importlib.import_module("largebatch.torch.checkpoint")
    acc = accumulation_for(derived, size, elastic)
    # Horovod re-creates the optimizer (its state is not carried over): load into the wrapped one
    optimizer = lbt.distributed_optimizer(optimizer, model, backward_passes_per_step=acc, broadcast=False)
    resumed = _load_resume(cfg, run_dir, model, optimizer, hvd, rank)   # before anything is written
    if not elastic:
        lbt.broadcast_state(model, optimizer)                           # rank 0's parameters and state
    rank_check = lbt.RankConsistencyCheck(model, optimizer, hvd=hvd)
    loop = TrainingLoop(
        exp, Hooks(mean=lambda x: float(hvd.allreduce(torch.tensor(x), op=hvd.Average, name="largebatch.loss")),
                   maximum=lambda x: float(hvd.allreduce(torch.tensor(x), op=hvd.Max, name="largebatch.stop")),
                   allgather_object=hvd.allgather_object, save=lbt_ckpt.save_checkpoint, model=model,
                   optimizer=lambda: optimizer, weights=lambda: (p.detach().cpu().numpy() for p in model.parameters()),
                   evaluate=(lambda: _evaluate(model, val_set, cfg, derived, hvd, torch, loop.rank, loop.size))
                   if val_set is not None else None,
                   check_ranks=rank_check.check, trust_ratios=optimizer.trust_ratios if track else None),
        run_dir=run_dir, rank=rank, size=size, accumulation=acc, threads=threads, resumed=resumed,
        schedule=schedule, track_trust_ratios=track, check_ranks=size > 1 or elastic, elastic=elastic)

    guard = importlib.import_module("largebatch.torch.guard").NonFiniteGuard(model, optimizer, hvd=hvd)
    on_nonfinite = cfg["train"]["on_nonfinite"]
    fault = faults.from_env(rank)
    smoothing = cfg["train"]["label_smoothing"]
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=smoothing) if smoothing else torch.nn.CrossEntropyLoss()
    clars = info.per_example_norms
    correct_momentum = cfg["schedule"]["momentum_correction"] and info.holds_lr("torch")
    autocast, scaler = _precision(cfg["train"]["precision"], torch, next(model.parameters()).device.type)
    if scaler is not None and resumed is not None and resumed["extra"].get("grad_scaler"):
        scaler.load_state_dict(resumed["extra"]["grad_scaler"])          # the fp16 loss scale goes on
    workers = cfg["data"]["loader_workers"]
    world = {"scaler_skips": 0}

    def extra(state):
        out = {"last_lr": state.last_lr, "skipped_steps": state.skipped}
        if scaler is not None:
            out["grad_scaler"] = {k: (float(v) if isinstance(v, float) else v) for k, v in scaler.state_dict().items()}
        return out

    def set_lr(state, lr):
        factor = momentum_correction(lr, state.last_lr) if correct_momentum else 1.0
        for group in optimizer.param_groups:
            group["lr"] = lr
            if factor != 1.0:
                for p in group["params"]:
                    buf = optimizer.state.get(p, {}).get("momentum_buffer")
                    if buf is not None:
                        buf.mul_(factor)
        state.last_lr = lr

    def apply_update(state, step):
        """Average, check and apply this step's gradients; False stops the run."""
        optimizer.synchronize()                      # gradients averaged over ranks
        if scaler is not None:
            # fp16: unscale the averaged gradients; an inf from the loss scale skips the step (the
            # same on every rank: the gradients are already averaged) and lowers the scale
            scaler.unscale_(optimizer)
            scale = scaler.get_scale()
            with optimizer.skip_synchronize():
                scaler.step(optimizer)
            scaler.update()
            world["scaler_skips"] += scaler.get_scale() < scale
            return True
        bad = guard.check(step, include_ratios=track)   # one reduced flag, one host read
        if bad is None:
            with optimizer.skip_synchronize():
                optimizer.step()
            return True
        if on_nonfinite == "stop":
            return loop.stop_nonfinite(f"largebatch: {bad.message}; stopping (train.on_nonfinite=stop)")
        state.skipped += 1
        loop.say(f"largebatch: {bad.message}; step skipped (train.on_nonfinite=skip, {state.skipped} skipped so far)")
        return True

    def train(state):
        """Steps from ``state.step`` to the end; an elastic restart calls it again after a reset
        (``on_reset`` has set the new rank, world size and accumulation steps; model, optimizer
        and counters are restored)."""
        rank, size, acc = loop.rank, loop.size, loop.accumulation
        loop.seek(state.step)
        window = [0.0, 0]                            # this rank's loss sum and micro-batches since the last log

        def local_loss():
            mean = window[0] / max(window[1], 1)
            window[:] = [0.0, 0]
            return mean
        while state.step < total:
            epoch, first_in_epoch = divmod(state.step, spe)
            batches = epoch_batches(len(train_set), epoch, seed=cfg["train"]["seed"], rank=rank, size=size,
                                    per_worker=pw, accumulation=acc, steps=spe)[first_in_epoch * acc:]
            micro = iter(Prefetcher(train_set, batches, epoch=epoch, train=True, workers=workers))
            for _ in range(spe - first_in_epoch):
                if state.step >= total:
                    break
                set_lr(state, schedule(state.step))
                optimizer.zero_grad()
                norm_sums, seen = None, 0
                if fault is not None:
                    fault.before_step(state.step + 1, model)
                for _ in range(acc):
                    x, y = _to_torch(next(micro), torch)
                    with autocast():
                        loss = loss_fn(model(x), y)
                    (scaler.scale(loss / acc) if scaler else loss / acc).backward()
                    window[0] += float(loss.detach())
                    window[1] += 1
                    if clars:
                        sums, n = lbt.per_example_norm_sums(model, loss_fn, x, y, allreduce=True)
                        norm_sums = sums if norm_sums is None else {p: norm_sums[p] + s for p, s in sums.items()}
                        seen += n
                if clars:
                    optimizer.set_per_example_norms(norm_sums, seen)
                state.step += 1
                loop.step = state.step
                if not apply_update(state, state.step):
                    return
                if not loop.after_step(state.step, epoch, local_loss, lambda: extra(state)):
                    return
                if loop.commit_due(state.step):
                    state.commit()
            loop.end_epoch(epoch + 1, lambda: extra(state))
            if elastic:
                state.commit()

    start = dict(step=loop.step, skipped=0, last_lr=schedule(0))
    if resumed is not None:
        start.update(skipped=int(resumed["extra"].get("skipped_steps", 0)),
                     last_lr=resumed["extra"].get("last_lr", schedule(max(loop.step - 1, 0))))
    try:
        if elastic:
            state = lbt.elastic_state(model, optimizer, **start)

            def on_reset():
                """After Horovod re-formed the ring: new rank, world size and accumulation steps."""
                loop.rebind(hvd.rank(), hvd.size(), state.step)
                optimizer.set_backward_passes_per_step(loop.accumulation)

            state.register_reset_callbacks([on_reset])
            hvd.elastic.run(train)(state)
        else:
            state = types.SimpleNamespace(**start)       # the counters an elastic state would carry
            train(state)
    finally:
        loop.progress.close()
    loop.step = state.step
    fields = {}
    if scaler is not None:
        fields["loss_scale_skips"] = world["scaler_skips"]     # fp16 steps skipped for an inf from the scale
    return loop.finish(state.skipped, **fields)


def _precision(precision, torch, device):
    """(autocast context factory, GradScaler or None) for train.precision: the forward pass in
    bfloat16 or float16; weights, gradients, optimizer state and trust ratios stay float32."""
    import contextlib
    if precision == "fp32":
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16

    def autocast():
        return torch.autocast(device, dtype=dtype)
    return autocast, (torch.amp.GradScaler(device) if precision == "fp16" else None)
