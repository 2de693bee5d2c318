"""The torch.optim contracts every largebatch torch optimizer keeps, for every class and every
implementation (single-tensor loop, foreach, fused): copies and pickles that step, tensor
learning rates of any 1-element shape, step hooks that run once, fused's device check, and
fused's compiled graphs reused across hyper-parameter values.

Written for this project (torch's own ``test_optim.py`` drives ``torch.testing._internal``,
which is not a stable API); each test names the contract it pins.
"""
import copy
import io
import pickle
import warnings

import pytest
import torch

from largebatch.torch import CLARS, LAMB, LARS, functional

OPTIMIZERS = {
    "lars": (LARS, dict(lr=0.5, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02, nesterov=True)),
    "larc": (LARS, dict(lr=0.5, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02, clip=True)),
    "lamb": (LAMB, dict(lr=0.01, weight_decay=1e-2)),
    "clars": (CLARS, dict(lr=0.5, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02)),
}
IMPLEMENTATIONS = {"single": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


def make_model():
    """Two layers and a 0-d parameter (its own code path in the compiled kernels)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    model.register_parameter("scale", torch.nn.Parameter(torch.tensor(1.5)))
    return model


def params_of(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


def step_with(optimizer, step):
    """One step with gradients fixed by ``step`` alone (the same for an optimizer and its copy);
    CLARS gets per-example norm sums derived from them."""
    params = params_of(optimizer)
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    if isinstance(optimizer, CLARS):
        optimizer.set_per_example_norms({p: 1.7 * torch.linalg.vector_norm(p.grad) * 8 for p in params}, 8)
    optimizer.step()


def copies(optimizer, model):
    """(name, copied optimizer) for each way a tool copies one: alone, and with its model."""
    saved = io.BytesIO()
    torch.save(optimizer, saved)
    saved.seek(0)
    both = io.BytesIO()
    torch.save((model, optimizer), both)
    both.seek(0)
    return [
        ("deepcopy", copy.deepcopy(optimizer)),
        ("pickle", pickle.loads(pickle.dumps(optimizer))),
        ("torch.save", torch.load(saved, weights_only=False)),
        ("deepcopy with model", copy.deepcopy((model, optimizer))[1]),
        ("torch.save with model", torch.load(both, weights_only=False)[1]),
    ]


def trained(name, impl, steps):
    """(model, optimizer) after ``steps`` steps; LARS takes named parameters (names must survive a copy)."""
    cls, options = OPTIMIZERS[name]
    model = make_model()
    opt = cls(model.named_parameters() if name == "lars" else model.parameters(), **options,
              **IMPLEMENTATIONS[impl])
    for step in range(steps):
        step_with(opt, step)
    return model, opt


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_copies_and_pickles_step_as_the_original(name, impl):
    """Issue 25.1: an optimizer copied, pickled or torch.save'd (alone or with its model) after two
    steps makes steps 3 and 4 exactly as one that was never copied."""
    _, uninterrupted = trained(name, impl, 4)
    model, opt = trained(name, impl, 2)
    for how, twin in copies(opt, model):
        assert type(twin) is type(opt), how
        assert all(a is not b for a, b in zip(params_of(opt), params_of(twin))), how
        for step in range(2, 4):
            step_with(twin, step)
        for a, b in zip(params_of(uninterrupted), params_of(twin)):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=how)
        assert twin.state_dict()["param_groups"] == uninterrupted.state_dict()["param_groups"], how


def test_copy_with_its_model_keeps_them_tied():
    """The copy of (model, optimizer) steps the copied model's own parameters."""
    model = make_model()
    opt = LARS(model.parameters(), lr=0.5)
    model2, opt2 = copy.deepcopy((model, opt))
    assert [id(p) for p in params_of(opt2)] == [id(p) for p in model2.parameters()]


@pytest.mark.parametrize("track", [False, True], ids=["untracked", "tracked"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=str)
def test_tensor_lr_of_any_one_element_shape_equals_a_float_lr(shape, name, impl, track):
    """Issue 25.3-4: lr as a tensor of shape (), (1,) or (1, 1) steps like the same float lr, for
    every implementation, with and without trust-ratio tracking (a 0-d parameter included)."""
    cls, options = OPTIMIZERS[name]
    runs = []
    for lr in (options["lr"], torch.full(shape, options["lr"])):
        opt = cls(make_model().parameters(), **dict(options, lr=lr), track_trust_ratios=track,
                  **IMPLEMENTATIONS[impl])
        for step in range(3):
            step_with(opt, step)
        runs.append(opt)
    for a, b in zip(params_of(runs[0]), params_of(runs[1])):
        torch.testing.assert_close(a, b)
    if track:
        ratios = [runs[i].trust_ratios() for i in (0, 1)]
        assert ratios[0].keys() == ratios[1].keys() and len(ratios[0]) == 5
        for key in ratios[0]:
            torch.testing.assert_close(ratios[0][key], ratios[1][key], msg=key)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_multi_element_lr_is_refused_before_anything_changes(impl):
    """torch's wording, named by the argument; a group's lr set to one later fails the step
    before any parameter moves (no half-applied step)."""
    model = make_model()
    with pytest.raises(ValueError, match=r"^lr: Tensor lr must be 1-element, got shape \(2,\)$"):
        LARS(model.parameters(), lr=torch.tensor([0.1, 0.2]), **IMPLEMENTATIONS[impl])
    opt = LARS(model.parameters(), lr=0.1, track_trust_ratios=True, **IMPLEMENTATIONS[impl])
    opt.param_groups[0]["lr"] = torch.ones(2, 1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"^lr: Tensor lr must be 1-element, got shape \(2, 1\)$"):
        step_with(opt, 0)
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step_hooks_run_once_per_step_for_every_class(name):
    """Issue 25.2: pre and post step hooks run once per step, also with every other class alive
    in the process (CLARS once ran them twice after any LARS existed)."""
    for other_cls, other_options in OPTIMIZERS.values():       # every class's step gets torch's wrapper
        other_cls([torch.nn.Parameter(torch.ones(2))], **other_options)
    cls, options = OPTIMIZERS[name]
    opt = cls(make_model().parameters(), **options)
    calls = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    for step in range(2):
        step_with(opt, step)
    assert calls == ["pre", "post", "pre", "post"]


def test_fused_refuses_what_it_cannot_compile():
    """Issue 25.5: fused=True needs floating-point tensors on a device inductor compiles for,
    checked when the optimizer is made (as torch.optim does) and by the functional call."""
    message = r"^fused=True requires all the params to be floating point Tensors of supported devices: " \
              r"\['cpu', 'cuda', 'xpu'\], got torch\.float32 on 'meta'$"
    meta = torch.nn.Parameter(torch.ones(3, device="meta"))
    for cls, options in OPTIMIZERS.values():
        with pytest.raises(RuntimeError, match=message):
            cls([meta], **options, fused=True)
        cls([meta], **options, foreach=True)                    # the uncompiled paths take it, as torch's do
    w = torch.ones(3, device="meta")
    with pytest.raises(RuntimeError, match=message):
        functional.lars([w], [w], [w], lr=0.1, fused=True)
    counts = torch.nn.Parameter(torch.ones(3, dtype=torch.int64), requires_grad=False)
    with pytest.raises(RuntimeError, match=r"got torch\.int64 on 'cpu'$"):
        LARS([counts], fused=True)
    opt = LARS([torch.nn.Parameter(torch.ones(3))], fused=True)
    with pytest.raises(RuntimeError, match=r"on 'meta'$"):
        opt.add_param_group(dict(params=[meta]))
    assert len(opt.param_groups) == 1                          # the refused group is not kept


def compiled_graphs():
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("cls,sweep", [
    (LARS, [dict(lr=lr, eps=eps, momentum=m, weight_decay=wd, trust_coefficient=tc)
            for lr, eps, m, wd, tc in [(0.5, 0.0, 0.9, 0.0, 1e-3), (1.0, 1e-8, 0.95, 1e-4, 2e-3),
                                       (2.0, 1e-6, 0.8, 5e-4, 1e-2), (0.25, 0.0, 0.0, 5e-5, 1e-3),
                                       (4.0, 1e-9, 0.5, 1e-3, 5e-3), (3.0, 0.0, 0.99, 2e-4, 1e-3),
                                       (0.1, 1e-7, 0.9, 3e-4, 3e-3), (8.0, 0.0, 0.7, 0.0, 1e-3),
                                       (6.0, 1e-5, 0.6, 1e-2, 4e-3)]]),
    (LAMB, [dict(lr=lr, eps=eps, betas=(b1, b2), weight_decay=wd)
            for lr, eps, b1, b2, wd in [(1e-3, 1e-6, 0.9, 0.999, 0.0), (2e-3, 1e-8, 0.8, 0.99, 1e-2),
                                        (5e-3, 1e-7, 0.95, 0.98, 1e-3), (1e-2, 1e-5, 0.85, 0.995, 0.0),
                                        (3e-3, 1e-6, 0.7, 0.9, 5e-2), (4e-3, 1e-9, 0.6, 0.97, 1e-4),
                                        (6e-3, 1e-4, 0.5, 0.95, 2e-2), (7e-3, 1e-6, 0.75, 0.96, 3e-3),
                                        (8e-3, 1e-3, 0.65, 0.93, 4e-3)]]),
], ids=["lars", "lamb"])
def test_fused_compiles_once_for_a_hyper_parameter_sweep(cls, sweep):
    """Issue 25.6: nine hyper-parameter settings (more than torch.compile's recompile limit of 8)
    on one model shape make one compiled graph, and every setting runs compiled and equals the loop."""
    before = compiled_graphs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for options in sweep:
            fused = cls(make_model().parameters(), **options, fused=True)
            loop = cls(make_model().parameters(), **options, foreach=False)
            for step in range(2):
                step_with(fused, step)
                step_with(loop, step)
            for a, b in zip(params_of(fused), params_of(loop)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert compiled_graphs() - before <= 1        # 0 when an earlier test compiled this shape set already
    assert not [w for w in caught if "recompile limit" in str(w.message)]     # no fallback to the loop


def test_fused_past_the_recompile_limit_runs_the_loop_and_says_so_once():
    """Issue 25.6: where torch.compile refuses to compile again (its recompile limit; here set to
    1 and hit by changing the flags of one shape set), the step runs the loop uncompiled, equal
    to it, and a warning says so once."""
    import torch._dynamo
    functional._fell_back.discard(functional._single_tensor_lars)
    options = dict(lr=0.5, momentum=0.9, weight_decay=1e-3)
    shape_set = lambda: [torch.nn.Parameter(torch.randn(5, 7, generator=torch.Generator().manual_seed(1)))]  # noqa: E731
    with torch._dynamo.config.patch(recompile_limit=1), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for clip, nesterov in [(False, False), (True, False), (False, True)]:
            fused = LARS(shape_set(), **options, clip=clip, nesterov=nesterov, fused=True)
            loop = LARS(shape_set(), **options, clip=clip, nesterov=nesterov, foreach=False)
            for step in range(2):
                step_with(fused, step)
                step_with(loop, step)
            torch.testing.assert_close(params_of(fused)[0], params_of(loop)[0], rtol=1e-6, atol=1e-7)
    fallbacks = [str(w.message) for w in caught if "recompile limit" in str(w.message)]
    assert fallbacks == ["largebatch: fused=True: torch.compile hit its recompile limit for _single_tensor_lars; "
                         "these steps run uncompiled (raise torch._dynamo.config.recompile_limit or "
                         "accumulated_recompile_limit to compile them)"]


def test_fused_regions_stay_apart_on_a_torch_without_isolate_recompiles(monkeypatch):
    """torch 2.11 (seen on a CUDA machine) has no torch.compile(isolate_recompiles=): each region
    then compiles a copy of the kernel with a code object of its own. Three shape sets under a
    recompile limit of 1 each compile (one shared code object would fall back to the loop from
    the second on), and each equals the loop."""
    import torch._dynamo
    monkeypatch.setattr(functional, "_ISOLATES_RECOMPILES", False)
    monkeypatch.setattr(functional, "_compiled", {})
    monkeypatch.setattr(functional, "_fell_back", set())
    options = dict(lr=0.5, momentum=0.9, weight_decay=1e-3)
    with torch._dynamo.config.patch(recompile_limit=1), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for rows in (3, 4, 5):
            shape_set = lambda: [torch.nn.Parameter(torch.randn(rows, 2, generator=torch.Generator().manual_seed(rows)))]  # noqa: E731,B023
            fused = LARS(shape_set(), **options, fused=True)
            loop = LARS(shape_set(), **options, foreach=False)
            for step in range(2):
                step_with(fused, step)
                step_with(loop, step)
            torch.testing.assert_close(params_of(fused)[0], params_of(loop)[0], rtol=1e-6, atol=1e-7)
    assert not [w for w in caught if "recompile limit" in str(w.message)]
    assert len({id(region) for region in functional._compiled.values()}) == 3
