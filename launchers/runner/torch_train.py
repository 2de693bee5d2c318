"""The PyTorch training loop each rank runs (Horovod, largebatch.torch optimizers)."""
import importlib
import math
import os
import signal
import sys
import time
import types

import numpy as np

from largebatch.config import ConfigError
from largebatch.horovod_support import import_horovod
from largebatch.policy import ParamPolicy
from largebatch.schedules import momentum_correction
from . import faults, lifeline
from .common import (Progress, RunLog, Throughput, announce_resume, claim_run_dir, datasets_and_steps,
                     make_schedule, read_resume, save_run_checkpoint, summary_dict, versions, weights_digest,
                     world_record)
from .data import Prefetcher, epoch_batches, eval_batches
from .entry import run_dir_of

__all__ = ["run", "build_model", "build_optimizer"]

LR_IN_BUFFER = ("lars", "larc", "clars")   # v ← m·v + γ·λ·g: momentum correction applies


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
    """The configured optimizer (not yet wrapped for Horovod)."""
    import torch
    o = cfg["optimizer"]
    if o["name"] == "sgd":
        policy = ParamPolicy.from_spec(o["exclude"])
        decay, no_decay = [], []
        for n, p in model.named_parameters():
            if p.requires_grad:
                (decay if policy.decays(n, p.shape) else no_decay).append(p)
        groups = [g for g in ({"params": decay, "weight_decay": o["weight_decay"]},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        return torch.optim.SGD(groups, lr=lr, momentum=o["momentum"], nesterov=o["nesterov"])
    lbt = importlib.import_module("largebatch.torch")
    groups = lbt.param_groups(model, exclude=o["exclude"])
    if o["name"] == "lamb":
        return lbt.LAMB(groups, lr=lr, betas=tuple(o["betas"]), eps=o["eps"], weight_decay=o["weight_decay"],
                        exclude=o["exclude"], track_trust_ratios=track_trust_ratios)
    cls = lbt.CLARS if o["name"] == "clars" else lbt.LARS
    return cls(groups, lr=lr, momentum=o["momentum"], weight_decay=o["weight_decay"],
               trust_coefficient=o["trust_coefficient"], eps=o["eps"], trust_denominator=o["trust_denominator"],
               clip=o["name"] == "larc", nesterov=o["nesterov"], exclude=o["exclude"],
               track_trust_ratios=track_trust_ratios)


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
    rank, size = hvd.rank(), hvd.size()
    # elastic only when horovodrun started an elastic job (a plain launch of the YAML trains as usual)
    elastic = exp.cfg["launcher"]["elastic"] and os.environ.get("HOROVOD_ELASTIC") == "1"
    if not elastic and exp.derived["np"] != size:
        exp = loader(size)
    cfg, derived = exp.cfg, exp.derived
    torch.manual_seed(cfg["train"]["seed"])
    train_set, val_set = datasets_and_steps(exp)
    gb, pw = derived["global_batch"], derived["per_worker_batch"]
    spe = derived["steps_per_epoch"]
    schedule = make_schedule(exp)
    total = derived["total_steps"]
    acc = _accumulation(derived, size, elastic)

    run_dir = claim_run_dir(exp, run_dir_of(exp), hvd, rank, elastic)    # never over another run's files
    model = build_model(cfg, derived)
    model.train()
    o = cfg["optimizer"]
    track = cfg["output"]["trust_ratios"] and o["name"] != "sgd"
    optimizer = build_optimizer(cfg, model, schedule(0), track)
    lbt = importlib.import_module("largebatch.torch")
    # Horovod re-creates the optimizer (its state is not carried over): load into the wrapped one
    optimizer = lbt.distributed_optimizer(optimizer, model, backward_passes_per_step=acc, broadcast=False)
    resumed = _load_resume(cfg, run_dir, model, optimizer, hvd, rank)   # before anything is written
    if not elastic:
        lbt.broadcast_state(model, optimizer)                           # rank 0's parameters and state
    log = RunLog(run_dir, exp, rank, append=resumed is not None)
    log.write_config()
    guard = importlib.import_module("largebatch.torch.guard").NonFiniteGuard(model, optimizer, hvd=hvd)
    on_nonfinite = cfg["train"]["on_nonfinite"]
    fault = faults.from_env(rank)
    smoothing = cfg["train"]["label_smoothing"]
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=smoothing) if smoothing else torch.nn.CrossEntropyLoss()
    clars = o["name"] == "clars"
    if clars:
        per_example = lbt.per_example_norm_sums
    correct_momentum = cfg["schedule"]["momentum_correction"] and o["name"] in LR_IN_BUFFER
    check_every = cfg["train"]["check_ranks_every"] if size > 1 or elastic else 0
    autocast, scaler = _precision(cfg["train"]["precision"], torch, next(model.parameters()).device.type)
    if scaler is not None and resumed is not None and resumed["extra"].get("grad_scaler"):
        scaler.load_state_dict(resumed["extra"]["grad_scaler"])          # the fp16 loss scale goes on

    def _extra(state):
        extra = {"last_lr": state.last_lr, "skipped_steps": state.skipped}
        if scaler is not None:
            extra["grad_scaler"] = {k: (float(v) if isinstance(v, float) else v)
                                    for k, v in scaler.state_dict().items()}
        return extra
    rank_check = lbt.RankConsistencyCheck(model, optimizer, hvd=hvd)

    log_every, workers = cfg["train"]["log_every"], cfg["data"]["loader_workers"]
    commit_every = cfg["train"]["commit_every"]
    progress = Progress(total, cfg["output"]["progress"], cfg["name"], rank)
    rate = Throughput()
    started = time.perf_counter()
    ckpt_every = cfg["output"]["checkpoint_every"]
    out = types.SimpleNamespace(status="completed", final_loss=float("nan"), eval_result=None, rank=rank,
                                size=size, acc=acc, resets=[], stopped_by=None, checkpoint=None,
                                scaler_skips=0)
    start = dict(step=0, last_lr=schedule(0), skipped=0)
    if resumed is not None:
        start.update(step=int(resumed["step"]), skipped=int(resumed["extra"].get("skipped_steps", 0)),
                     last_lr=resumed["extra"].get("last_lr", schedule(max(int(resumed["step"]) - 1, 0))))
        announce_resume(resumed, rank, spe)
        progress.update(start["step"])

    def train(state):
        """Steps from ``state.step`` to the end; an elastic restart calls it again after a reset
        (``on_reset`` has set the new rank, world size and accumulation steps; model, optimizer
        and counters are restored)."""
        rank, size, acc = out.rank, out.size, out.acc
        progress.seek(state.step)
        window_loss, window_n = 0.0, 0
        while state.step < total:
            epoch, first_in_epoch = divmod(state.step, spe)
            batches = epoch_batches(len(train_set), epoch, seed=cfg["train"]["seed"], rank=rank, size=size,
                                    per_worker=pw, accumulation=acc, steps=spe)[first_in_epoch * acc:]
            micro = iter(Prefetcher(train_set, batches, epoch=epoch, train=True, workers=workers))
            for _ in range(spe - first_in_epoch):
                if state.step >= total:
                    break
                lr = schedule(state.step)
                factor = momentum_correction(lr, state.last_lr) if correct_momentum else 1.0
                for group in optimizer.param_groups:
                    group["lr"] = lr
                    if factor != 1.0:
                        for p in group["params"]:
                            buf = optimizer.state.get(p, {}).get("momentum_buffer")
                            if buf is not None:
                                buf.mul_(factor)
                state.last_lr = lr
                optimizer.zero_grad()
                norm_sums, seen = None, 0
                if fault is not None:
                    fault.before_step(state.step + 1, model)
                for _ in range(acc):
                    x, y = _to_torch(next(micro), torch)
                    with autocast():
                        loss = loss_fn(model(x), y)
                    (scaler.scale(loss / acc) if scaler else loss / acc).backward()
                    window_loss += float(loss.detach())
                    window_n += 1
                    if clars:
                        sums, n = per_example(model, loss_fn, x, y, allreduce=True)
                        norm_sums = sums if norm_sums is None else {p: norm_sums[p] + s for p, s in sums.items()}
                        seen += n
                if clars:
                    optimizer.set_per_example_norms(norm_sums, seen)
                optimizer.synchronize()                      # gradients averaged over ranks
                if scaler is not None:
                    # fp16: unscale the averaged gradients; an inf from the loss scale skips the step
                    # (the same on every rank: the gradients are already averaged) and lowers the scale
                    scaler.unscale_(optimizer)
                    bad = None
                else:
                    bad = guard.check(state.step + 1, include_ratios=track)   # one reduced flag, one host read
                state.step += 1
                step = live.step = state.step
                if scaler is not None:
                    scale = scaler.get_scale()
                    with optimizer.skip_synchronize():
                        scaler.step(optimizer)
                    scaler.update()
                    if scaler.get_scale() < scale:
                        out.scaler_skips += 1
                elif bad is not None:
                    if on_nonfinite == "stop":
                        out.status = "nonfinite"
                        progress.write(f"largebatch: {bad.message}; stopping (train.on_nonfinite=stop)")
                        return
                    state.skipped += 1
                    progress.write(f"largebatch: {bad.message}; step skipped (train.on_nonfinite=skip, "
                                   f"{state.skipped} skipped so far)")
                else:
                    with optimizer.skip_synchronize():
                        optimizer.step()
                if step % log_every == 0 or step == total:
                    avg = hvd.allreduce(torch.tensor(window_loss / max(window_n, 1)), op=hvd.Average,
                                        name="largebatch.loss")
                    out.final_loss = float(avg)
                    ips = rate.tick(gb * (window_n // acc))
                    window_loss, window_n = 0.0, 0
                    log.metrics("train", step, step / spe, lr=lr, loss=out.final_loss, images_per_sec=ips)
                    if track:
                        ratios = {k: float(v) for k, v in optimizer.trust_ratios().items()}
                        log.trust_ratios(step, ratios)
                    progress.update(0, step=step, loss=out.final_loss, lr=lr, img_s=round(ips, 1))
                    if not math.isfinite(out.final_loss):
                        out.status = "diverged"
                        progress.write(f"step {step}: loss is {out.final_loss}; stopping (diverged)")
                        return
                progress.update(1)
                if check_every and step % check_every == 0:
                    try:
                        rank_check.check(f"step {step}")
                    except lbt.RankDivergenceError as err:
                        out.status = "ranks_diverged"
                        progress.write(f"largebatch: {err}; stopping")
                        return
                # a stop signal on any rank: every rank stops after this same step (one small allreduce)
                stop = int(hvd.allreduce(torch.tensor(float(lifeline.stop_requested())), op=hvd.Max,
                                         name="largebatch.stop"))
                if stop:
                    out.status, out.stopped_by = "stopped", signal.Signals(stop).name
                    if rank == 0 and step < total:
                        out.checkpoint = save_run_checkpoint(
                            log, exp, importlib.import_module("largebatch.torch.checkpoint").save_checkpoint, model,
                            optimizer, step=step, epoch=epoch + 1,
                            extra=_extra(state))
                    progress.write(f"largebatch: {out.stopped_by}: stopped after step {step}"
                                   + (f", checkpoint {out.checkpoint}" if out.checkpoint else ""))
                    return
                if elastic and step % commit_every == 0 and step % spe and step < total:
                    state.commit()        # epoch ends commit after their evaluation and checkpoint
            epoch += 1
            if val_set is not None and cfg["train"]["eval"]:
                out.eval_result = _evaluate(model, val_set, cfg, derived, hvd, torch, rank, size)
                log.metrics("eval", state.step, state.step / spe, loss=out.eval_result["loss"],
                            accuracy=out.eval_result["accuracy"])
                progress.write(f"epoch {epoch}: eval loss {out.eval_result['loss']:.4f}, "
                               f"accuracy {out.eval_result['accuracy']:.4f}")
            if ckpt_every and (epoch % ckpt_every == 0 or state.step >= total) and rank == 0:
                save_run_checkpoint(log, exp, importlib.import_module("largebatch.torch.checkpoint").save_checkpoint, model,
                                    optimizer, step=state.step, epoch=epoch,
                                    extra=_extra(state))
            if elastic:
                state.commit()

    live = types.SimpleNamespace(step=start["step"])

    def on_signal(name):
        """Rank 0's summary when a signal stops the run (called on the signal thread)."""
        if log.active:
            summary = summary_dict(exp, status="stopped", steps=live.step, epochs_done=live.step / spe,
                                   final_loss=out.final_loss, eval_result=out.eval_result,
                                   throughput=rate.steady(), wall=time.perf_counter() - started, threads=threads,
                                   framework_versions=versions("torch"), size=out.size)
            summary["stopped_by"] = name
            log.summary(summary)

    lifeline.set_on_signal(on_signal)
    lifeline.set_graceful()
    try:
        if elastic:
            state = lbt.elastic_state(model, optimizer, **start)

            def on_reset():
                """After Horovod re-formed the ring: new rank, world size and accumulation steps."""
                nonlocal log, progress
                out.rank, out.size = hvd.rank(), hvd.size()
                out.acc = _accumulation(derived, out.size, elastic)
                optimizer.set_backward_passes_per_step(out.acc)
                if (out.rank == 0) != log.active:          # the former rank 0 left: this process logs now
                    log.close()
                    log = RunLog(run_dir, exp, out.rank, append=True)
                    progress.close()
                    progress = Progress(total, cfg["output"]["progress"], cfg["name"], out.rank)
                out.resets.append({"step": state.step, "world_size": out.size})
                if out.rank == 0:
                    print(f"largebatch: world size is now {out.size}; global batch {gb} kept as {pw} per rank "
                          f"× {out.size} ranks × {out.acc} accumulation steps; continuing from step "
                          f"{state.step}", file=sys.stderr, flush=True)

            state.register_reset_callbacks([on_reset])
            hvd.elastic.run(train)(state)
        else:
            state = types.SimpleNamespace(**start)
            train(state)
    finally:
        progress.close()
    step, rank, size = state.step, out.rank, out.size
    summary = summary_dict(exp, status=out.status, steps=step, epochs_done=step / spe, final_loss=out.final_loss,
                           eval_result=out.eval_result, throughput=rate.steady(),
                           wall=time.perf_counter() - started, threads=threads,
                           framework_versions=versions("torch"), size=size)
    summary["skipped_steps"] = state.skipped
    if scaler is not None:
        summary["loss_scale_skips"] = out.scaler_skips        # fp16 steps skipped for an inf from the scale
    summary["resumed_from"] = resumed["path"] if resumed else None
    if out.status == "stopped":
        summary.update(stopped_by=out.stopped_by, checkpoint=out.checkpoint)
    if out.status == "completed":
        summary.update(world_record(hvd.allgather_object,
                                    weights_digest(p.detach().cpu().numpy() for p in model.parameters())))
    if elastic:
        summary["accumulation_steps"] = out.acc
        summary["elastic"] = {"min_np": derived["min_np"], "max_np": derived["max_np"], "resets": out.resets}
    log.summary(summary)
    log.close()
    if rank == 0:
        ev = out.eval_result
        print(f"run dir: {run_dir} ({out.status}, {step} steps, loss {out.final_loss:.4g}"
              + (f", eval accuracy {ev['accuracy']:.4f}" if ev else "") + ")", flush=True)
    if out.status == "stopped":
        return lifeline.stop_exit_code(signal.Signals[out.stopped_by])
    return 0 if out.status == "completed" else 1


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


def _accumulation(derived, size, elastic):
    """Accumulation steps on ``size`` ranks: the configured ones, or (elastic) those that keep the
    global batch with the launch's per-worker batch."""
    if not elastic:
        return derived["accumulation_steps"]
    from largebatch.config import elastic_accumulation
    acc = elastic_accumulation(derived["global_batch"], derived["per_worker_batch"], size)
    if acc is None:
        raise ConfigError([f"launcher.elastic: world size {size} cannot keep the global batch "
                           f"{derived['global_batch']} with {derived['per_worker_batch']} samples per rank"])
    return acc

