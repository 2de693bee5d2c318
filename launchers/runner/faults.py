"""Failure handling shared by the runners: Horovod stall timeouts, a per-rank crash report, and
fault injection for the reliability tests.

``LARGEBATCH_FAULT=KIND:RANK:STEP[:LAYER]`` (testing only) makes rank RANK, at optimizer step
STEP (1-based):
    kill   kill itself with SIGKILL (a node or OOM-killer death)
    raise  raise RuntimeError (a bug on one rank)
    nan    turn the gradient of LAYER (default: the first parameter) into NaN
    hang   sleep forever without exiting (a stuck rank)
    slow   from STEP on, sleep LAYER seconds (default 0.1) before every step (a slow rank; lets a
           test change the world size of an elastic job while it is still training)
    drift  add 1e-3 to the first weight of LAYER (default: the first parameter / trainable
           variable), on this rank only: ranks that silently stop training one model

Under torchrun's elastic agents, which start the ranks anew after a failure, a fault other than
``slow`` happens in the first start only (``TORCHELASTIC_RESTART_COUNT`` 0).

LAYER is a torch parameter name (``features.4.weight``) or a Keras variable path
(``conv1/kernel``). Keras: the nan fault is armed in the train function (:meth:`Fault.arm_keras`,
the local gradient is multiplied by NaN at that update, before the allreduce); the others run in
a callback before the update's first batch (``before_step(step, None)``).
"""
import os
import signal
import sys
import time

__all__ = ["horovod_timeouts", "from_env", "Fault", "report_crash", "peer_lost"]

FAULT_ENV = "LARGEBATCH_FAULT"
# A rank that stops submitting collectives (dead, stuck) makes the others wait in Horovod's
# coordinator. Horovod warns after HOROVOD_STALL_CHECK_TIME_SECONDS and, if
# HOROVOD_STALL_SHUTDOWN_TIME_SECONDS > 0, shuts down; the default shutdown is 0 (never).
STALL_DEFAULTS = {"HOROVOD_STALL_CHECK_TIME_SECONDS": "10", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "30"}


def horovod_timeouts(env=None):
    """Set the stall check/shutdown defaults before ``hvd.init()`` (a user's values win)."""
    env = os.environ if env is None else env
    for key, value in STALL_DEFAULTS.items():
        env.setdefault(key, value)


# what torch.distributed's Gloo raises on a rank whose peer died, left or stopped answering
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Timed out waiting",
             "Socket Timeout", "Connection refused")


def peer_lost(err) -> bool:
    """True for a collective that failed because another rank went away (not a bug here)."""
    text = str(err)
    return isinstance(err, RuntimeError) and any(p in text for p in PEER_LOST)


def report_crash(rank, err):
    """One line naming the rank and the error, on stderr (every rank prints its own)."""
    first = str(err).splitlines()[0][:300] if str(err) else ""
    if type(err).__name__ == "HorovodInternalError" or "Horovod has been shut down" in first:
        print(f"largebatch: rank {rank} stopped: Horovod shut down because another rank failed, exited or "
              f"stalled (see that rank's message above)", file=sys.stderr, flush=True)
        return
    print(f"largebatch: rank {rank} failed: {type(err).__name__}: {first}", file=sys.stderr, flush=True)


class Fault:
    def __init__(self, kind, rank, step, layer=None):
        self.kind, self.rank, self.step, self.layer = kind, rank, step, layer
        self._handle = None

    def before_step(self, step, model):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.kind == "slow" and step >= self.step:
            if step == self.step:
                print(f"largebatch: injected fault 'slow' on rank {self.rank} from step {step}",
                      file=sys.stderr, flush=True)
            time.sleep(float(self.layer or 0.1))
            return
        if step != self.step:
            return
        print(f"largebatch: injected fault {self.kind!r} on rank {self.rank} at step {step}",
              file=sys.stderr, flush=True)
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.kind == "raise":
            raise RuntimeError(f"injected fault at step {step}")
        elif self.kind == "hang":
            while True:
                time.sleep(60)
        elif self.kind == "drift":
            _drift(model, self.layer)
        elif self.kind == "nan":
            if not hasattr(model, "named_parameters"):     # Keras: armed in the train function (arm_keras)
                return
            named = dict(model.named_parameters())
            name = self.layer or next(iter(named))
            if name not in named:
                raise ValueError(f"{FAULT_ENV}: no parameter {name!r} (have {', '.join(list(named)[:8])}, ...)")
            # a tensor hook runs before the gradient is accumulated and before Horovod's allreduce hook
            self._handle = named[name].register_hook(lambda g: g * float("nan"))


    def arm_keras(self, model, optimizer):
        """Keras ``nan``: have ``optimizer`` (a largebatch.keras.DistributedOptimizer, before its
        train function is traced) multiply the gradient of variable LAYER (default: the first
        trainable variable) by NaN at update STEP on this rank. Other kinds: nothing to arm."""
        if self.kind != "nan":
            return
        paths = [getattr(v, "path", None) or v.name for v in model.trainable_variables]
        name = self.layer or paths[0]
        if name not in paths:
            raise ValueError(f"{FAULT_ENV}: no variable {name!r} (have {', '.join(paths[:8])}, ...)")
        inject_keras_nan(optimizer, self.step, name)


def inject_keras_nan(optimizer, step, name):
    """From now on ``optimizer.apply`` (this instance only; Keras's train step calls it) gets the
    gradient of variable ``name`` times NaN at update ``step`` (in the graph: no host read)."""
    import tensorflow as tf
    apply = optimizer.apply

    def apply_with_nan(grads, trainable_variables=None):
        variables = optimizer._trainable_variables if trainable_variables is None else trainable_variables
        hit = tf.equal(optimizer.iterations + 1, step)
        grads = list(grads)
        for i, (g, v) in enumerate(zip(grads, variables)):
            if g is not None and (getattr(v, "path", None) or v.name) == name:
                g = tf.convert_to_tensor(g)
                grads[i] = g * tf.where(hit, tf.constant(float("nan"), g.dtype), tf.constant(1, g.dtype))
        return apply(grads, trainable_variables)
    optimizer.apply = apply_with_nan


def _drift(model, layer):
    """Nudge one weight of this rank's model: torch modules and Keras models alike."""
    if hasattr(model, "named_parameters"):
        import torch
        named = dict(model.named_parameters())
        with torch.no_grad():
            named[layer or next(iter(named))].view(-1)[0] += 1e-3
        return
    variables = {getattr(v, "path", None) or v.name: v for v in model.trainable_variables}
    v = variables[layer or next(iter(variables))]
    flat = v.numpy().reshape(-1)
    flat[0] += 1e-3
    v.assign(flat.reshape(v.shape))


def from_env(rank, env=None):
    """The fault for this rank from ``LARGEBATCH_FAULT``, or None."""
    env = os.environ if env is None else env
    spec = env.get(FAULT_ENV, "").strip()
    if not spec:
        return None
    parts = spec.split(":")
    if len(parts) < 3 or parts[0] not in ("kill", "raise", "nan", "hang", "slow", "drift") or \
            not parts[1].isdigit() or not parts[2].isdigit():
        raise ValueError(f"{FAULT_ENV}: expected KIND:RANK:STEP[:LAYER] with KIND kill|raise|nan|hang|slow|drift, "
                         f"got {spec!r}")
    if int(parts[1]) != rank:
        return None
    if parts[0] != "slow" and env.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0"):
        return None                  # torchrun restarted the ranks after the fault: it happened once
    return Fault(parts[0], int(parts[1]), int(parts[2]), parts[3] if len(parts) > 3 else None)
