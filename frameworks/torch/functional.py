"""Functional LARS / LARC / CLARS and LAMB for PyTorch: the kernels behind the optimizers.

Laid out like ``torch.optim.sgd``: one public function per algorithm (:func:`lars`,
:func:`lamb`) takes lists of tensors and the hyper-parameters, chooses the implementation
once (:func:`_implementation`) and runs it (:func:`_run`):

- ``foreach=False``: ``_single_tensor_*`` — a plain loop over tensors calling the core's
  functional update (:mod:`largebatch.trust`) per tensor. The readable path.
- ``foreach=True`` (default): ``_multi_tensor_*`` — all layer norms in one ``_foreach_norm``,
  the trust ratios for all layers in one vectorised call of the core formula, the update
  with ``torch._foreach_*`` in-place ops.
- ``fused=True``: the single-tensor loop compiled with ``torch.compile`` (inductor), which
  fuses each layer's update into one pass over w, g and v. Compiles once per parameter-shape
  set (tens of seconds on CPU for ResNet-50), then is the fastest path. The hyper-parameters
  reach the compiled graph as 0-d tensors, so a sweep over lr, momentum, eps, weight decay or
  trust coefficient reuses one graph; each shape set has its own compiled region
  (``isolate_recompiles``), so several models in one process do not share torch.compile's
  recompile limit. Where a region still hits a limit, the step runs the loop uncompiled and
  says so once (a ``UserWarning``).

The tensors may mix devices and dtypes: the foreach and fused paths run once per
(device, dtype) part (:class:`TensorGroups`), as ``torch.optim`` does.

No path synchronises with the host (no ``.item()``, no Python branch on a tensor value, no
blocking host-to-device copy), so steps queue asynchronously on GPUs: the small per-part tensors
the kernels take (per-layer decay and adapt flags, the fused path's 0-d lr) are copied from
pinned memory without waiting on first use and then kept, and the lr is written into its tensor
in place with ``fill_``. The optimizers keep one TensorGroups per param group; a call without
one makes it anew. ``fused=True`` may synchronise while it compiles (its first steps per shape
set).
"""
import inspect
import types
import warnings

import torch

from largebatch import trust
from largebatch.policy import EXCLUDED_RATES
from largebatch.registry import (BETAS, LAMB_EPS, LARS_EPS, MOMENTUM, NORM_OF_SUM, SUM_OF_NORMS, TRUST_COEFFICIENT,
                                 TRUST_DENOMINATORS)
from largebatch.validation import check_choice, check_one_element

__all__ = ["lars", "lamb", "TensorGroups"]


class _Part:
    """The tensors of one (device, dtype) within a :class:`TensorGroups`, with the small tensors the
    kernels take, created on first use and then kept: no host-to-device copy in later steps."""

    __slots__ = ("device", "dtype", "index", "decays", "adapts", "_decay_t", "_adapt_t", "_decay_s", "_scalars")

    def __init__(self, device, dtype, index, decays, adapts):
        self.device, self.dtype = device, dtype
        self.index = index                  # positions in the groups' lists; None: all of them
        self.decays, self.adapts = decays, adapts
        self._decay_t = self._adapt_t = self._decay_s = None
        self._scalars = {}

    def pick(self, values):
        """The part's entries of a list aligned with the groups' tensors."""
        if values is None or self.index is None:
            return values
        return [values[i] for i in self.index]

    def decay_tensor(self):
        if self._decay_t is None:
            self._decay_t = _to_device(self.decays, self.device, self.dtype)
        return self._decay_t

    def adapt_tensor(self):
        if self._adapt_t is None:
            self._adapt_t = _to_device(self.adapts, self.device, torch.bool)
        return self._adapt_t

    def scalar(self, name, value):
        """A hyper-parameter as a 0-d tensor on the part's device, written in place (``fill_``
        with a Python number or 0-d tensor queues a kernel and does not wait for the device), so
        that the compiled kernel sees a tensor, not a constant to specialise on. float64, as a
        Python number is (elementwise with the tensors it rounds to their dtype as a number does;
        LAMB's 1 − β2^t needs β2 unrounded), except where a device may lack float64."""
        t = self._scalars.get(name)
        if t is None:
            t = self._scalars[name] = torch.empty((), device=self.device, dtype=self._scalar_dtype())
        return t.fill_(value)

    def decay_scalars(self):
        """The per-tensor weight decays as one tensor in the scalars' dtype (the kernels' loop takes
        its entries as it takes a list's; one guarded input, not one per tensor), made once: a
        TensorGroups is remade when the weight decay changes."""
        if self._decay_s is None:
            self._decay_s = _to_device(self.decays, self.device, self._scalar_dtype())
        return self._decay_s

    def _scalar_dtype(self):
        return torch.float32 if self.device.type == "xpu" else torch.float64


def _to_device(values, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Python numbers as a tensor on ``device`` without waiting for it: on CUDA through pinned
    host memory and an asynchronous copy (``torch.tensor(x, device="cuda")`` blocks the host
    until the copy is done; the caching host allocator keeps the pinned block until it is)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


class TensorGroups:
    """One step's tensors split by (device, dtype), order kept within each part, with their
    per-tensor weight decay (β, or 0 where ``decay`` is false) and adapt flags.

    Keep one while the same tensors, flags and weight decay step and pass it as ``groups=`` to
    :func:`lars` / :func:`lamb`: its device tensors are then made once. ``decay``/``adapt``:
    one boolean per tensor; None: every tensor is decayed / adapted."""

    __slots__ = ("decays", "adapts", "parts")

    def __init__(self, params, weight_decay=0.0, decay=None, adapt=None):
        count = len(params)
        decay = [True] * count if decay is None else list(decay)
        adapt = [True] * count if adapt is None else list(adapt)
        if len(decay) != count or len(adapt) != count:
            raise ValueError(f"decay, adapt: expected one flag per tensor ({count}), "
                             f"got {len(decay)} and {len(adapt)}")
        self.decays = [weight_decay if d else 0.0 for d in decay]
        self.adapts = [bool(a) for a in adapt]
        index = {}
        for i, p in enumerate(params):
            index.setdefault((p.device, p.dtype), []).append(i)
        if len(index) == 1:
            (device, dtype), = index
            self.parts = [_Part(device, dtype, None, self.decays, self.adapts)]
        else:
            self.parts = [_Part(device, dtype, ix, [self.decays[i] for i in ix], [self.adapts[i] for i in ix])
                          for (device, dtype), ix in index.items()]


def _implementation(foreach, fused, *, per_tensor=False):
    """'single', 'foreach' or 'fused', for every algorithm: foreach unless told otherwise (as
    ``torch.optim`` on CPU and CUDA). ``per_tensor``: the inputs only the loop takes (CLARS's
    per-tensor gradient norms)."""
    if fused and foreach:
        raise ValueError("fused: expected fused=True or foreach=True, not both")
    if per_tensor:
        return "single"
    if fused:
        return "fused"
    return "single" if foreach is False else "foreach"


# torch.compile'd kernels: the devices inductor generates code for (its C++ and Triton back-ends)
FUSED_DEVICES = ("cpu", "cuda", "xpu")
_compiled = {}                  # (kernel, device, dtype, shapes) -> its compiled region
_fell_back = set()              # kernels that ran uncompiled at least once (warned once each)


def check_fused_support(device, dtype):
    """Raise as ``torch.optim`` does for ``fused=True`` on what the compiled kernels cannot run:
    a tensor that is not floating point, or a device inductor has no code generator for."""
    if device.type not in FUSED_DEVICES or not dtype.is_floating_point:
        raise RuntimeError(f"fused=True requires all the params to be floating point Tensors of supported devices: "
                           f"{list(FUSED_DEVICES)}, got {dtype} on {device.type!r}")


def _fused(fn, part, params):
    """``fn`` compiled for one part's shapes, a compiled region of its own (``isolate_recompiles``):
    a new model in the same process compiles its own region instead of counting against the
    regions of the models before it. The fused path is thus the core's formulas themselves,
    compiled, not a second spelling of them."""
    key = (fn, part.device, part.dtype, tuple(p.shape for p in params))
    if key not in _compiled:
        if _ISOLATES_RECOMPILES:
            _compiled[key] = torch.compile(fn, fullgraph=True, dynamic=False, isolate_recompiles=True)
        else:
            _compiled[key] = torch.compile(_fresh_code(fn), fullgraph=True, dynamic=False)
    return _compiled[key]


# torch.compile(isolate_recompiles=) is newer than torch 2.11 (seen missing there, on a CUDA machine)
_ISOLATES_RECOMPILES = "isolate_recompiles" in inspect.signature(torch.compile).parameters


def _fresh_code(fn):
    """``fn`` with a code object of its own: where torch.compile cannot isolate a region, dynamo
    still keeps its cache and recompile count per code object, so each copy is a region apart."""
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def _run_fused(single, part, picked, ratios, extra, lr, options):
    """One part through the compiled kernel, its float hyper-parameters as 0-d tensors (a sweep or
    a schedule reuses the graph). If torch.compile refuses to compile once more (its recompile
    limits), the loop runs uncompiled and a warning says so, once per kernel."""
    scalars = {k: part.scalar(k, v) if _is_float(v) else v for k, v in options.items()}
    try:
        _fused(single, part, picked[0])(*map(_no_0d, picked), part.scalar("lr", lr), part.decay_scalars(),
                                        part.adapts, ratios=_no_0d(ratios), **extra, **scalars)
        return
    except torch._dynamo.exc.FailOnRecompileLimitHit:       # raised before the graph runs: nothing applied
        if single not in _fell_back:
            _fell_back.add(single)
            warnings.warn(f"largebatch: fused=True: torch.compile hit its recompile limit for {single.__name__}; "
                          f"these steps run uncompiled (raise torch._dynamo.config.recompile_limit or "
                          f"accumulated_recompile_limit to compile them)", stacklevel=4)
    single(*picked, lr, part.decays, part.adapts, ratios=ratios, **extra, **options)


def _is_float(value):
    return isinstance(value, (float, int, torch.Tensor)) and not isinstance(value, bool)


def _no_0d(tensors):
    """0-d tensors as 1-element views of the same storage, for the compiled kernels: torch 2.13's
    compiled functions drop in-place writes into 0-d CPU tensor arguments (seen with float64
    parameters' momentum and Adam moments), while writes through a view of shape (1,) land."""
    if tensors is None:
        return None
    return [t.view(1) if t.dim() == 0 else t for t in tensors]


def _run(impl, kernels, groups, tensors, lr, ratios, extra, **options):
    """Run one algorithm's ``kernels`` = (single-tensor loop, foreach kernel) as ``impl`` says: the
    loop once over every tensor, or per (device, dtype) part the compiled loop or the foreach kernel.

    ``tensors``: the lists aligned with ``groups``' tensors; ``ratios``: 0-d slots for the trust
    ratios, or None; ``extra``: keyword lists passed on unchanged, never as 1-element views
    (LAMB's 0-d float64 counters: a (1,) float64 view would promote float32 tensors to float64)."""
    single, multi = kernels
    if impl == "single":
        single(*tensors, lr, groups.decays, groups.adapts, ratios=ratios, **extra, **options)
        return
    for part in groups.parts:             # _foreach ops and compiled graphs: one device and dtype each
        picked = [part.pick(t) for t in tensors]
        part_extra = {k: part.pick(v) for k, v in extra.items()}
        if impl == "fused":
            check_fused_support(part.device, part.dtype)
            _run_fused(single, part, picked, part.pick(ratios), part_extra, lr, options)
        else:
            multi(*picked, lr, part, ratios=part.pick(ratios), **part_extra, **options)


def _scalar_lr(lr):
    """A tensor lr as a 0-d tensor, before anything is written: ``torch.optim`` takes any 1-element
    tensor (shape (1,) or (1, 1) too), and the kernels' 0-d slots take only 0-d results."""
    if isinstance(lr, torch.Tensor) and lr.dim() != 0:
        check_one_element("lr", tuple(lr.shape))
        return lr.reshape(())
    return lr


# --------------------------------------------------------------------------------------- LARS

def _single_tensor_lars(params, grads, bufs, lr, decays, adapts, *, momentum, trust_coefficient, eps,
                        norm_of_sum, clip, nesterov, excluded_rate, ratios=None, grad_norms=None):
    """Reference-shaped loop: per layer, norms -> core layer lr -> core momentum update.

    ``grad_norms`` replaces ‖g‖ per layer (CLARS: the mean per-example gradient norm)."""
    for i, (w, g, v, beta, adapt) in enumerate(zip(params, grads, bufs, decays, adapts)):
        w_norm = torch.linalg.vector_norm(w)
        g_norm = torch.linalg.vector_norm(g) if grad_norms is None else grad_norms[i].to(w.dtype)
        update_norm = torch.linalg.vector_norm(g + beta * w) if norm_of_sum else None
        rate = trust.lars_layer_lr(torch, w_norm, g_norm, lr, trust_coefficient=trust_coefficient,
                                   weight_decay=beta, eps=eps, update_norm=update_norm, clip=clip, adapt=adapt,
                                   excluded_rate=excluded_rate)
        new_w, new_v = trust.lars_momentum_update(w, g, v, rate, momentum=momentum, weight_decay=beta,
                                                  nesterov=nesterov)
        w.copy_(new_w)
        v.copy_(new_v)
        if ratios is not None:
            ratios[i].copy_(rate / lr)


def _multi_tensor_lars(params, grads, bufs, lr, part, *, momentum, trust_coefficient, eps, norm_of_sum, clip,
                       nesterov, excluded_rate, ratios=None):
    """A second spelling of :func:`largebatch.trust.lars_momentum_update` (with the core's
    :func:`~largebatch.trust.lars_layer_lr` called once on per-layer vectors): one norm call
    per list, then ``_foreach`` in-place ops. Pinned to the single-tensor loop and the NumPy
    reference by tests/test_torch_optim.py, for every option.

    All tensors on one device, in one dtype: ``part`` (a :class:`_Part`) holds their flags."""
    decays = part.decays
    beta = max(decays)                      # a group's decays are its weight_decay or 0
    decayed = [i for i, b in enumerate(decays) if b]
    w_norms = torch.stack(torch._foreach_norm(params))
    g_norms = torch.stack(torch._foreach_norm(grads))
    # d = g + β·w as new tensors for decayed layers (grads stay untouched, as in torch.optim.SGD)
    d_decayed = torch._foreach_add([grads[i] for i in decayed], [params[i] for i in decayed], alpha=beta) \
        if decayed else []
    d = list(grads)                                           # g for undecayed layers: no copy
    for i, t in zip(decayed, d_decayed):
        d[i] = t
    update_norms = torch.stack(torch._foreach_norm(d)) if norm_of_sum else None
    rates = trust.lars_layer_lr(torch, w_norms, g_norms, lr, trust_coefficient=trust_coefficient,
                                weight_decay=part.decay_tensor(), eps=eps, update_norm=update_norms, clip=clip,
                                adapt=part.adapt_tensor(), excluded_rate=excluded_rate)
    rate_list = rates.unbind()
    # v ← m·v + rate·d, with rate·d fused into one addcmul pass (13 tensor passes a step in all,
    # torch.optim.SGD's foreach step makes 11)
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_addcmul_(bufs, d, rate_list)
    if nesterov:
        torch._foreach_add_(params, bufs, alpha=-momentum)   # w ← w − (m·v + rate·d)
        torch._foreach_addcmul_(params, d, (-rates).unbind())
    else:
        torch._foreach_sub_(params, bufs)                     # w ← w − v
    if ratios is not None:
        torch._foreach_copy_(ratios, (rates / lr).unbind())


def lars(params, grads, momentum_buffers, *, lr, momentum=MOMENTUM, weight_decay=0.0,
         trust_coefficient=TRUST_COEFFICIENT, eps=LARS_EPS, trust_denominator=SUM_OF_NORMS, clip=False,
         nesterov=False, decay=None, adapt=None, excluded_rate="trust", grad_norms=None, trust_ratios=None,
         foreach=None, fused=None, groups=None):
    r"""One LARS step (You, Gitman, Ginsburg 2017, Algorithm 1) on lists of tensors, in place:
    what :class:`largebatch.torch.LARS` does for one param group.

        λ = η‖w‖ / (‖g‖ + β‖w‖ + eps)         (1 if ‖w‖ = 0 or ‖g‖ = 0)
        v ← m·v + γ_t·λ·(g + β·w);   w ← w − v

    ``momentum_buffers`` hold v (zeros before the first step). The hyper-parameters are the
    optimizer's; ``decay``/``adapt`` give one flag per tensor (None: all decayed / adapted;
    the optimizer derives them from its ``exclude`` policy); ``excluded_rate``: how the tensors not
    adapted step ("trust": γ_t·η, or min(η, γ_t) with ``clip``; "global": γ_t; see
    :func:`largebatch.trust.lars_layer_lr`). ``grad_norms``: per-tensor 0-d
    tensors that replace ‖g‖ (CLARS's mean per-example norms; the loop runs then).
    ``trust_ratios``: per-tensor 0-d tensors that receive layer lr / γ_t. ``groups``: a kept
    :class:`TensorGroups` of these tensors (then ``weight_decay``, ``decay`` and ``adapt`` are
    read from it); made here if None.
    """
    check_choice("trust_denominator", trust_denominator, TRUST_DENOMINATORS)
    lr = _scalar_lr(lr)
    impl = _implementation(foreach, fused, per_tensor=grad_norms is not None)
    if groups is None:
        groups = TensorGroups(params, weight_decay, decay, adapt)
    extra = {} if grad_norms is None else {"grad_norms": grad_norms}
    _run(impl, (_single_tensor_lars, _multi_tensor_lars), groups, (params, grads, momentum_buffers), lr,
         trust_ratios, extra, momentum=momentum, trust_coefficient=trust_coefficient, eps=eps,
         norm_of_sum=trust_denominator == NORM_OF_SUM, clip=bool(clip), nesterov=bool(nesterov),
         excluded_rate=check_choice("excluded_rate", excluded_rate, EXCLUDED_RATES))


# --------------------------------------------------------------------------------------- LAMB

def _single_tensor_lamb(params, grads, exp_avgs, exp_avg_sqs, lr, decays, adapts, *, steps, beta1, beta2, eps,
                        ratios=None):
    """Reference-shaped loop: per layer, the core's moments, direction, ratio and update."""
    for i, (w, g, m, v, t, beta, adapt) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps, decays,
                                                         adapts)):
        new_m, new_v = trust.adam_moments(m, v, g, beta1, beta2)
        m.copy_(new_m)
        v.copy_(new_v)
        u = trust.lamb_direction(torch, w, new_m, new_v, step=t, beta1=beta1, beta2=beta2, eps=eps,
                                 weight_decay=beta)
        if adapt:
            ratio = trust.lamb_trust_ratio(torch, torch.linalg.vector_norm(w), torch.linalg.vector_norm(u))
        else:
            ratio = torch.ones((), device=w.device, dtype=w.dtype)
        w.copy_(trust.lamb_update(w, u, lr, ratio))
        if ratios is not None:
            ratios[i].copy_(ratio)


def _multi_tensor_lamb(params, grads, exp_avgs, exp_avg_sqs, lr, part, *, steps, beta1, beta2, eps, ratios=None):
    """A second spelling of :func:`largebatch.trust.adam_moments`,
    :func:`~largebatch.trust.lamb_direction` and :func:`~largebatch.trust.lamb_update` in
    ``_foreach`` ops (the core's bias corrections and ratio formula called once on per-layer
    vectors). Pinned to the single-tensor loop and the NumPy reference by
    tests/test_torch_optim.py, for every option.

    All tensors on one device, in one dtype (the counters: float64); ``part`` holds their flags."""
    decays, dtype = part.decays, params[0].dtype
    # per-layer 1 − β^t from the float64 counters, then rounded to the tensors' dtype
    c1, c2 = trust.lamb_bias_corrections(torch.stack(steps), beta1, beta2)
    c1, c2 = c1.to(dtype).unbind(), c2.to(dtype).unbind()
    torch._foreach_mul_(exp_avgs, beta1)                               # m ← β1·m + (1−β1)·g
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)                            # v ← β2·v + (1−β2)·g²
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    denom = torch._foreach_div(exp_avg_sqs, c2)                        # √v̂ + ε
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    u = torch._foreach_div(exp_avgs, c1)                               # u = m̂ / (√v̂ + ε) + β·w
    torch._foreach_div_(u, denom)
    del denom
    decayed = [i for i, b in enumerate(decays) if b]
    if decayed:
        torch._foreach_add_([u[i] for i in decayed], [params[i] for i in decayed], alpha=max(decays))
    ratio = trust.lamb_trust_ratio(torch, torch.stack(torch._foreach_norm(params)),
                                   torch.stack(torch._foreach_norm(u)))
    ratio = torch.where(part.adapt_tensor(), ratio, torch.ones_like(ratio))
    torch._foreach_addcmul_(params, u, (-lr * ratio).unbind())          # w ← w − γ·ratio·u
    if ratios is not None:
        torch._foreach_copy_(ratios, ratio.unbind())


def lamb(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, betas=BETAS, eps=LAMB_EPS, weight_decay=0.0,
         decay=None, adapt=None, trust_ratios=None, foreach=None, fused=None, groups=None):
    r"""One LAMB step (You et al. 2019, arXiv 1904.00962, Algorithm 2) on lists of tensors, in
    place: what :class:`largebatch.torch.LAMB` does for one param group.

        m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²
        u = m̂/(√v̂ + ε) + β·w;  w ← w − γ_t·(‖w‖/‖u‖)·u     (ratio 1 on zero norms)

    ``state_steps``: one 0-d float64 counter per tensor (zeros before the first step), counted
    up by one here first, as ``torch.optim.adam`` does. ``decay``, ``adapt``, ``trust_ratios``,
    ``groups``, ``foreach`` and ``fused`` as in :func:`lars`; not adapted tensors get ratio 1.
    """
    beta1, beta2 = betas
    lr = _scalar_lr(lr)
    impl = _implementation(foreach, fused)
    if groups is None:
        groups = TensorGroups(params, weight_decay, decay, adapt)
    # counted outside the kernel: torch.compile does not write back in-place updates of these
    # 0-d counters (the fused step then saw t = 0 and divided by 1 − β⁰ = 0)
    for part in groups.parts:
        torch._foreach_add_(part.pick(state_steps), 1)
    _run(impl, (_single_tensor_lamb, _multi_tensor_lamb), groups, (params, grads, exp_avgs, exp_avg_sqs), lr,
         trust_ratios, {"steps": state_steps}, beta1=beta1, beta2=beta2, eps=eps)
