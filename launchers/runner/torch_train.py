"""PyTorch's part of a run (:class:`TorchPart`, the driver's :class:`~.driver.Framework`): the
largebatch.torch optimizers and a Python loop over micro-batches, on one of two engines:

- Horovod (horovodrun, mpirun, srun): ``largebatch.torch.distributed_optimizer`` averages the
  gradients when the optimizer steps (``backward_passes_per_step`` = accumulation steps);
- torch.distributed (torchrun): ``DistributedDataParallel`` averages them during the last
  micro-batch's backward (bucketed, overlapped; the others run under ``no_sync()``), gloo on CPU.

Everything else (schedule, trust ratios from the averaged gradients, guard, rank check, agreed
stop, checkpoints, resume) is the same code on both; the small collectives go through Horovod's
call names (``largebatch.torch.TorchDistributed`` gives torch.distributed those names).
"""
import contextlib
import datetime
import importlib
import os
import types
import warnings

import numpy as np

from largebatch import registry
from largebatch.horovod_support import import_horovod
from largebatch.schedules import momentum_correction
from . import faults, user
from .comm import COLLECTIVE_TIMEOUT_ENV, HorovodComm, TorchDistributedComm, started_by_torchrun, torch_distributed_env
from .common import read_resume
from .data import Prefetcher, epoch_batches, eval_batches
from .driver import Framework
from .loop import Hooks

__all__ = ["TorchPart", "FRAMEWORK", "build_model", "build_optimizer"]


def build_model(cfg, derived):
    """The built-in model ``model.name``, or the user's ``model.factory`` (offered ``input_shape``
    as the model sees it: (channels, size, size) for the built-in images, NCHW)."""
    if user.uses_user_model(cfg):
        if "input_shape" not in derived:
            derived = dict(derived, input_shape=(cfg["data"]["channels"], derived["image_size"], derived["image_size"]))
        return user.build_model(cfg, derived, "torch")
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


def _to_torch(batch, torch, nhwc_images=True):
    """A batch as tensors: the built-in images NHWC -> NCHW, the user's data as given."""
    x, y = batch
    x = np.ascontiguousarray(x.transpose(0, 3, 1, 2) if nhwc_images else x)
    return torch.from_numpy(x), torch.from_numpy(y)


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


class TorchPart(Framework):
    """A run with PyTorch over Horovod: ``largebatch.torch.distributed_optimizer`` averages the
    gradients, ``broadcast_state`` sends rank 0's parameters and state, the loop below steps."""

    ddp = None                          # the DistributedDataParallel wrapper (torchrun), once made

    def start_engine(self, exp, threads):
        import torch
        self.torch = torch
        self.lbt = importlib.import_module("largebatch.torch")
        # torch.distributed when the experiment says so, or when torchrun started this rank anyway
        self.distributed = exp.derived["engine"] == "torch.distributed" or started_by_torchrun()
        if self.distributed:
            import torch.distributed as dist
            # a rank torchrun did not start (srun, or by hand) finds its peers from the environment
            os.environ.update(torch_distributed_env(exp.cfg["launcher"].get("rendezvous_port")))
            timeout = os.environ.get(COLLECTIVE_TIMEOUT_ENV, "")
            # the runner's models stay on the CPU: Gloo
            dist.init_process_group("gloo", **({"timeout": datetime.timedelta(seconds=int(timeout))}
                                               if timeout.isdigit() else {}))
            self.hvd = hvd = self.lbt.TorchDistributed()
        else:
            faults.horovod_timeouts()
            self.hvd = hvd = import_horovod("torch")
            hvd.init()
        torch.set_num_threads(threads[0])
        try:
            torch.set_num_interop_threads(threads[1])
        except RuntimeError:       # already set (a parallel region ran), keep going
            pass
        comm = TorchDistributedComm if self.distributed else HorovodComm
        self.comm = comm(hvd, lambda v: torch.tensor(v, dtype=torch.float64), lambda t: t.tolist())
        return self.comm

    def seed(self, seed):
        self.torch.manual_seed(seed)

    def build_model(self, exp):
        self.exp = exp
        self.model = build_model(exp.cfg, exp.derived)
        self.model.train()
        return self.model

    def build_optimizer(self, exp, model, schedule, accumulation, elastic):
        cfg = exp.cfg
        self.info = registry.get(cfg["optimizer"]["name"])
        self.track = cfg["output"]["trust_ratios"] and self.info.layerwise
        optimizer = build_optimizer(cfg, model, schedule(0), self.track)
        if self.distributed:                  # DDP wraps the model instead (broadcast_initial)
            self.optimizer = optimizer
            return
        # Horovod re-creates the optimizer (its state is not carried over): load into the wrapped one
        compression = cfg["launcher"]["compression"]
        self.optimizer = self.lbt.distributed_optimizer(optimizer, model, backward_passes_per_step=accumulation,
                                                        broadcast=False,
                                                        compression=None if compression == "none" else compression)

    def load_resume(self, exp, run_dir, commit=None):
        """Rank 0 reads and checks the checkpoint (or torchrun elastic's freshest commit) into
        model and optimizer (before the broadcast); every rank gets step, epoch, extra and RNG (see
        common.read_resume)."""
        ckpt = importlib.import_module("largebatch.torch.checkpoint")
        model, optimizer, comm = self.model, self.optimizer, self.comm
        info = read_resume(exp.cfg, run_dir, comm, rng_state=ckpt.rng_state, commit=commit,
                           load=lambda path, cfg_hash: ckpt.load_checkpoint(path, model, optimizer, cfg_hash=cfg_hash))
        if info is not None and comm.size() > 1 and self.distributed:
            # DDP sends the parameters when it wraps the model; the optimizer state goes here
            state = comm.broadcast_object(optimizer.state_dict() if comm.rank() == 0 else None,
                                          name="largebatch.resume_state")
            if comm.rank() != 0:
                optimizer.load_state_dict(state)
                ckpt.set_rng_state(info["rng"])
        elif info is not None and comm.size() > 1:
            # the optimizer-state broadcast needs the same state layout on every rank (rank 0's
            # loaded state may hold slots, e.g. trust ratios, that the others create lazily):
            # send the layout (shapes, dtypes, scalars), not the values, which the broadcast sends
            layout = _state_layout(optimizer.state_dict()) if comm.rank() == 0 else None
            layout = comm.broadcast_object(layout, name="largebatch.resume_layout")
            if comm.rank() != 0:
                optimizer.load_state_dict(_from_layout(layout))
                ckpt.set_rng_state(info["rng"])
        self.resumed = info
        return info

    def broadcast_initial(self):
        if not self.distributed:
            self.lbt.broadcast_state(self.model, self.optimizer)
            return
        # DDP broadcasts rank 0's parameters and buffers when it wraps the model; after that each
        # rank keeps its own BatchNorm statistics, as under Horovod (DDP's default would overwrite
        # them with rank 0's before every forward: the same weights, but another evaluation)
        with warnings.catch_warnings():      # torch 2.13 deprecates the name; its replacement syncs at init
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            self.ddp = self.torch.nn.parallel.DistributedDataParallel(self.model, broadcast_buffers=False)
        compression = self.exp.cfg["launcher"]["compression"]
        if compression != "none":         # each bucket sent in half precision, averaged, cast back
            self.ddp.register_comm_hook(None, self.lbt.compression_hook(compression))

    def _synchronize(self):
        """Horovod: the gradients averaged now (the optimizer's allreduce); DDP did it in backward."""
        if self.ddp is None:
            self.optimizer.synchronize()

    def _synchronized(self):
        """The step itself, without a second allreduce."""
        return contextlib.nullcontext() if self.ddp is not None else self.optimizer.skip_synchronize()

    def hooks(self, val_set):
        self.val_set = val_set
        ckpt = importlib.import_module("largebatch.torch.checkpoint")
        model, optimizer = self.model, self.optimizer
        return Hooks(save=ckpt.save_checkpoint, model=model, optimizer=lambda: optimizer,
                     weights=lambda: (p.detach().cpu().numpy() for p in model.parameters()),
                     evaluate=self.evaluate if val_set is not None else None,
                     check_ranks=self.lbt.RankConsistencyCheck(model, optimizer, hvd=self.hvd).check,
                     trust_ratios=optimizer.trust_ratios if self.track else None)

    def attach(self, loop, train_set, schedule, resumed):
        torch, cfg = self.torch, self.exp.cfg
        self.loop, self.train_set, self.schedule = loop, train_set, schedule
        self.guard = importlib.import_module("largebatch.torch.guard").NonFiniteGuard(self.model, self.optimizer,
                                                                                     hvd=self.hvd)
        self.fault = faults.from_env(loop.rank)
        smoothing = cfg["train"]["label_smoothing"]
        self.loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=smoothing)
        self.correct_momentum = cfg["schedule"]["momentum_correction"] and self.info.holds_lr("torch")
        self.autocast, self.scaler = _precision(cfg["train"]["precision"], torch,
                                                next(self.model.parameters()).device.type)
        if self.scaler is not None and resumed is not None and resumed["extra"].get("grad_scaler"):
            self.scaler.load_state_dict(resumed["extra"]["grad_scaler"])     # the fp16 loss scale goes on
        self.scaler_skips = 0
        # the gradient noise scale: each rank's squared gradient norm, read before the engine averages
        self.tap = self.lbt.GradientNormTap(self.model.parameters()) if loop.noise is not None else None
        start = dict(step=loop.step, skipped=0, last_lr=schedule(0))
        if resumed is not None:
            start.update(skipped=int(resumed["extra"].get("skipped_steps", 0)),
                         last_lr=resumed["extra"].get("last_lr", schedule(max(loop.step - 1, 0))))
        return start

    # -- training -------------------------------------------------------------------------
    def evaluate(self):
        """Loss and accuracy over the validation set, every rank its share, summed over ranks."""
        torch, model, derived, loop = self.torch, self.model, self.exp.derived, self.loop
        model.eval()
        loss_sum = correct = count = 0.0
        batches = eval_batches(len(self.val_set), rank=loop.rank, size=loop.size, batch=derived["per_worker_batch"])
        with torch.no_grad():
            for batch in Prefetcher(self.val_set, batches, train=False, workers=self.exp.cfg["data"]["loader_workers"]):
                x, y = _to_torch(batch, torch, self.val_set.nhwc_images)
                out = model(x)
                loss_sum += float(torch.nn.functional.cross_entropy(out, y, reduction="sum"))
                correct += float((out.argmax(1) == y).sum())
                count += len(y)
        loss_sum, correct, count = self.comm.sum([loss_sum, correct, count], name="largebatch.eval")
        model.train()
        return {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1)}

    def _extra(self, state):
        out = {"last_lr": state.last_lr, "skipped_steps": state.skipped}
        if self.scaler is not None:
            out["grad_scaler"] = {k: (float(v) if isinstance(v, float) else v)
                                  for k, v in self.scaler.state_dict().items()}
        return out

    def _set_lr(self, state, lr):
        factor = momentum_correction(lr, state.last_lr) if self.correct_momentum else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if factor != 1.0:
                for p in group["params"]:
                    buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
                    if buf is not None:
                        buf.mul_(factor)
        state.last_lr = lr

    def _apply_update(self, state, step):
        """Average, check and apply this step's gradients; False stops the run."""
        optimizer, scaler = self.optimizer, self.scaler
        self._synchronize()                          # gradients averaged over ranks
        if scaler is not None:
            # fp16: unscale the averaged gradients; an inf from the loss scale skips the step (the
            # same on every rank: the gradients are already averaged) and lowers the scale
            scale = scaler.get_scale()
            scaler.unscale_(optimizer)
            self._averaged(state, scale)
            with self._synchronized():
                scaler.step(optimizer)
            scaler.update()
            self.scaler_skips += scaler.get_scale() < scale
            return True
        self._averaged(state, 1.0)
        bad = self.guard.check(step, include_ratios=self.track)   # one reduced flag, one host read
        if bad is None:
            with self._synchronized():
                optimizer.step()
            return True
        if self.exp.cfg["train"]["on_nonfinite"] == "stop":
            return self.loop.stop_nonfinite(f"largebatch: {bad.message}; stopping (train.on_nonfinite=stop)")
        state.skipped += 1
        self.loop.say(f"largebatch: {bad.message}; step skipped (train.on_nonfinite=skip, "
                      f"{state.skipped} skipped so far)")
        return True

    def _averaged(self, state, loss_scale):
        """Once the gradients are averaged (and unscaled): the noise scale's two squared norms
        for this update, a rank's own gradient (or, on one rank, its first micro-batch's, whose
        loss was divided by ``acc``) and the averaged one; then AdaScale's rate for the step."""
        if self.tap is not None:
            if self.loop.noise_from_micro_batch:
                small = self.tap.first_pass(loss_scale) * self._acc ** 2
            else:
                small = self.tap.last_pass(loss_scale)
            self.loop.noise_sample(small, self.lbt.squared_norm(self.model.parameters()))
        if self.loop.adascale is not None:
            self._set_lr(state, self.loop.adascale_lr())

    def _forward_backward(self, micro, acc, window):
        """One update's micro-batches: forward, scaled backward, CLARS's per-example norms."""
        torch, model, scaler = self.torch, self.model, self.scaler
        clars = self.info.per_example_norms
        norm_sums, seen = None, 0
        forward = self.ddp if self.ddp is not None else model
        self._acc = acc
        if self.tap is not None:
            self.tap.begin_update()
        for i in range(acc):
            x, y = _to_torch(next(micro), torch, self.train_set.nhwc_images)
            # DDP: only the last micro-batch's backward communicates
            quiet = self.ddp.no_sync() if self.ddp is not None and i < acc - 1 else contextlib.nullcontext()
            with quiet:
                with self.autocast():
                    loss = self.loss_fn(forward(x), y)
                (scaler.scale(loss / acc) if scaler else loss / acc).backward()
            if self.tap is not None:
                self.tap.end_pass()
            window[0] += float(loss.detach())
            window[1] += 1
            if clars:
                sums, n = self.lbt.per_example_norm_sums(model, self.loss_fn, x, y, allreduce=True, engine=self.hvd)
                norm_sums = sums if norm_sums is None else {p: norm_sums[p] + s for p, s in sums.items()}
                seen += n
        if clars:
            self.optimizer.set_per_example_norms(norm_sums, seen)

    def train(self, state):
        """Steps from ``state.step`` to the end; an elastic restart calls it again after a reset
        (``_on_reset`` has set the new rank, world size and accumulation steps; model, optimizer
        and counters are restored)."""
        loop, d, cfg = self.loop, self.exp.derived, self.exp.cfg
        spe = d["steps_per_epoch"]
        loop.seek(state.step)
        window = [0.0, 0]                            # this rank's loss sum and micro-batches since the last log

        def local_loss():
            mean = window[0] / max(window[1], 1)
            window[:] = [0.0, 0]
            return mean
        while state.step < loop.total:             # (AdaScale ends a run early: loop.total then drops)
            epoch, first_in_epoch = divmod(state.step, spe)
            acc = loop.accumulation
            batches = epoch_batches(len(self.train_set), epoch, seed=cfg["train"]["seed"], rank=loop.rank,
                                    size=loop.size, per_worker=d["per_worker_batch"], accumulation=acc,
                                    steps=spe)[first_in_epoch * acc:]
            micro = iter(Prefetcher(self.train_set, batches, epoch=epoch, train=True,
                                    workers=cfg["data"]["loader_workers"]))
            for _ in range(spe - first_in_epoch):
                if state.step >= loop.total:
                    break
                if loop.adascale is None:            # AdaScale sets it from this update's gradients
                    self._set_lr(state, self.schedule(state.step))
                self.optimizer.zero_grad()
                if self.fault is not None:
                    self.fault.before_step(state.step + 1, self.model)
                self._forward_backward(micro, acc, window)
                state.step += 1
                loop.step = state.step
                if not self._apply_update(state, state.step):
                    return
                if not loop.after_step(state.step, epoch, local_loss, lambda: self._extra(state)):
                    return
                if loop.commit_due(state.step):
                    state.commit()
            loop.end_epoch(epoch + 1, lambda: self._extra(state))
            if loop.elastic:
                state.commit()

    def elastic_state(self, start):
        if self.distributed:          # torchrun's agents restart the ranks: a commit is the loop's file
            state = types.SimpleNamespace(**start)
            state.commit = lambda: self.loop.commit_file(state.step, self._extra(state))
            return state
        self.state = state = self.lbt.elastic_state(self.model, self.optimizer, **start)
        state.register_reset_callbacks([self._on_reset])
        return state

    def _on_reset(self):
        """After Horovod re-formed the ring: new rank, world size and accumulation steps."""
        self.loop.rebind(self.state.step)
        self.optimizer.set_backward_passes_per_step(self.loop.accumulation)

    def close(self):
        """torch.distributed: the process group torn down before the interpreter exits (left to
        exit, gloo's threads can abort the process: 'terminate called without an active exception')."""
        if self.distributed:
            import torch.distributed as dist
            self.ddp = None                # DDP's reducer holds the process group
            dist.barrier()
            dist.destroy_process_group()

    def outcome(self, state):
        # fp16 steps skipped for an inf from the loss scale
        fields = {"loss_scale_skips": self.scaler_skips} if self.scaler is not None else {}
        return state.skipped, fields


FRAMEWORK = TorchPart


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
