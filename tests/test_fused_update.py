"""MLPStep.step(x, y, optimizer): the MaskedSGD update of each layer applied inside the
gradient call, right after the layer's backward. Everything it leaves behind (weights,
gradients, momentum buffers, loss) must be bit-identical to ``fast(x, y);
optimizer.step()``, and whenever the optimizer's step would do anything else the two
calls must run instead."""
import copy

import pytest
import torch
from helpers import FLOATS, make_mask, randn
from torch import nn

import sparseticket.nn as stnn
from sparseticket import ops
from sparseticket.optim import MaskedSGD

pytestmark = pytest.mark.skipif(ops._C is None, reason="compiled extension not loaded")


def _model(gen, paths, density, dtype=torch.float32, bias=True, sizes=(33, 65, 17, 3)):
    """Per layer: 'd' a SparseLinear on its dense path, 's' on its sparse path, 'L' a plain nn.Linear."""
    torch.manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=gen)))
    layers = [nn.Flatten()]
    for i in range(len(sizes) - 1):
        layers += [nn.Linear(sizes[i], sizes[i + 1], bias=bias, dtype=dtype), nn.ReLU()]
    m = nn.Sequential(*layers[:-1])
    lin = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)]
    masks = {n: make_mask(*m.get_submodule(n).weight.shape, 1.0 - density, gen)
             for n, c in zip(lin, paths) if c != "L"}
    if masks:
        m = stnn.sparsify(m, masks=masks, mode="sparse", fuse_relu=True)
    for n, c in zip(lin, paths):
        if c == "d":
            m.get_submodule(n).mode = "dense"
    return m


def _twins(model, **hyper):
    """The model and a copy of it, each with its own MaskedSGD(**hyper) and MLPStep."""
    a, b = model, copy.deepcopy(model)
    oa, ob = (MaskedSGD(m.parameters(), **hyper) for m in (a, b))
    return a, b, oa, ob, stnn.MLPStep(a), stnn.MLPStep(b)


def _batch(gen, n, sizes, dtype):
    return randn(n, 1, sizes[0], dtype=dtype, gen=gen), torch.randint(0, sizes[-1], (n,), generator=gen)


def _assert_same_state(a, b, oa, ob, what):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{what}: {n} differs"
        assert torch.equal(p.grad, q.grad), f"{what}: gradient of {n} differs"
        sa, sb = oa.state[p], ob.state[q]
        assert sa.keys() == sb.keys(), f"{what}: state of {n}"
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{what}: {k} of {n} differs"


def _spy(monkeypatch):
    """Records whether each mlp_grads call carried an SGD plan."""
    real = ops._C.mlp_grads
    calls = []
    monkeypatch.setattr(ops._C, "mlp_grads", lambda *args: calls.append(len(args) > 4) or real(*args), raising=False)
    return calls


@pytest.mark.parametrize("early", ["all", "none", "default"])
@pytest.mark.parametrize("hyper", [dict(momentum=0.9, weight_decay=1e-3), dict(momentum=0.0),
                                   dict(momentum=0.9, nesterov=True), dict(momentum=0.5, dampening=0.3, maximize=True)],
                         ids=["momentum-wd", "plain", "nesterov", "dampening-maximize"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("density", [1.0, 0.6, 0.05, 0.0])
@pytest.mark.parametrize("paths", ["sss", "ddd", "dsd", "LsL", "LLL"])
def test_bit_identical_to_gradients_then_step(paths, density, dtype, hyper, early, gen, monkeypatch):
    if early != "default":  # every layer right after its backward, or every layer after the whole backward
        monkeypatch.setattr(MaskedSGD, "_EARLY_UPDATE_MIN", 0 if early == "all" else 1 << 62)
    a = _model(gen, paths, density, dtype)
    b = copy.deepcopy(a)
    oa = MaskedSGD(a.parameters(), lr=0.05, **hyper)
    ob = MaskedSGD(b.parameters(), lr=0.05, **hyper)
    fa, fb = stnn.MLPStep(a), stnn.MLPStep(b)
    calls = _spy(monkeypatch)
    for step in range(4):
        x, y = _batch(gen, 19, (33, 3), dtype)
        la = fa(x, y)
        oa.step()
        lb = fb.step(x, y, ob)
        assert torch.equal(la, lb), f"step {step}: loss"
        _assert_same_state(a, b, oa, ob, f"{paths} step {step}")
    # per step: a's gradient call, then b's; b's first step creates the optimizer's
    # state (the two calls), the others are fused
    assert calls == [False, False] + [False, True] * 3
    for mod in b.modules():
        if isinstance(mod, stnn.SparseLinear):
            assert mod.dense_weight().eq(0).logical_or(mod.mask()).all()  # pruned entries stay 0


def test_big_layer_updated_early_small_ones_after(gen, monkeypatch):
    """LeNet-300-100 at 90% kept: fc1 (211k entries) is updated in its own call right after
    its backward, fc2 and fc3 together after the backward; still bit-identical."""
    a, b, oa, ob, fa, fb = _twins(_model(gen, "sss", 0.9, sizes=(784, 300, 100, 10)), lr=0.05, momentum=0.9)
    x, y = _batch(gen, 60, (784, 10), torch.float32)
    fa(x, y)
    oa.step()
    fb.step(x, y, ob)
    layers = [(m.weight_values, m.bias) for m, _ in fb.layers]
    plan = ob._fused_plan(layers)
    assert plan is not None
    when = plan[1][6::7]
    assert when == [1.0, 0.0, 0.0]
    for _ in range(3):
        x, y = _batch(gen, 60, (784, 10), torch.float32)
        fa(x, y)
        oa.step()
        fb.step(x, y, ob)
    _assert_same_state(a, b, oa, ob, "lenet")


def test_fused_update_bumps_version_counters(gen):
    b = _model(gen, "sdL", 0.5)
    ob = MaskedSGD(b.parameters(), lr=0.05, momentum=0.9)
    fb = stnn.MLPStep(b)
    for _ in range(2):
        x, y = _batch(gen, 7, (33, 3), torch.float32)
        fb.step(x, y, ob)
    before = [p._version for p in b.parameters()]
    real = ops._C.mlp_grads
    seen = []
    try:
        ops._C.mlp_grads = lambda *args: seen.append(len(args) > 4) or real(*args)
        fb.step(x, y, ob)
    finally:
        ops._C.mlp_grads = real
    assert seen == [True]  # the fused path ran
    assert all(p._version > v for p, v in zip(b.parameters(), before))


def test_mask_change_between_steps_is_followed(gen, monkeypatch):
    """A new ticket between steps: the optimizer's step no longer repeats, so that step
    runs unfused (and moves the state); the next one is fused again."""
    a, b, oa, ob, fa, fb = _twins(_model(gen, "sss", 0.6), lr=0.05, momentum=0.9)
    calls = _spy(monkeypatch)
    g2 = torch.Generator().manual_seed(5)
    for step in range(5):
        if step == 2:
            new = make_mask(65, 33, 0.7, g2)
            for m in (a, b):
                m[1].set_mask(new)
        x, y = _batch(gen, 11, (33, 3), torch.float32)
        fa(x, y)
        oa.step()
        fb.step(x, y, ob)
        _assert_same_state(a, b, oa, ob, f"step {step}")
    assert calls[2 * 2 + 1] is False and calls[2 * 4 + 1] is True


def _two_calls_expected(gen, monkeypatch, tweak):
    """After `tweak(optimizer)`, MLPStep.step must take the two calls, with the same result."""
    a, b, oa, ob, fa, fb = _twins(_model(gen, "sds", 0.6), lr=0.05, momentum=0.9)
    for _ in range(2):
        x, y = _batch(gen, 9, (33, 3), torch.float32)
        fa(x, y)
        oa.step()
        fb.step(x, y, ob)
    tweak(ob)
    calls = _spy(monkeypatch)
    x, y = _batch(gen, 9, (33, 3), torch.float32)
    fa(x, y)
    oa.step()
    fb.step(x, y, ob)
    assert calls == [False, False]  # a's call, then b's
    _assert_same_state(a, b, oa, ob, "unfused")
    return ob


def test_step_hooks_see_the_step(gen, monkeypatch):
    seen = []
    _two_calls_expected(gen, monkeypatch, lambda o: o.register_step_post_hook(lambda *_: seen.append(1)))
    assert seen == [1]


def test_lr_scheduler_sees_the_step(gen, monkeypatch):
    sched = []

    def attach(o):
        sched.append(torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5))

    o = _two_calls_expected(gen, monkeypatch, attach)
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")  # "lr_scheduler.step() before optimizer.step()" must not fire
        sched[0].step()
    assert o.param_groups[0]["lr"] == pytest.approx(0.025)


def test_optimizer_with_other_parameters_is_not_fused(gen, monkeypatch):
    extra = nn.Parameter(torch.ones(3))

    def add(o):
        o.add_param_group(dict(params=[extra]))
        extra.grad = torch.ones(3)

    _two_calls_expected(gen, monkeypatch, add)
    assert torch.equal(extra.detach(), torch.full((3,), 1 - 0.05))  # its own step ran (the defaults: lr 0.05)


def test_changed_hyperparameters_take_effect(gen, monkeypatch):
    """lr / momentum read at every step, as step() reads them: a cached plan must not keep
    the old ones."""
    a, b, oa, ob, fa, fb = _twins(_model(gen, "sLd", 0.6), lr=0.05, momentum=0.9)
    calls = _spy(monkeypatch)
    for step in range(5):
        if step == 3:
            for o in (oa, ob):
                o.param_groups[0]["lr"] = 0.01
                o.param_groups[0]["weight_decay"] = 0.1
        x, y = _batch(gen, 9, (33, 3), torch.float32)
        fa(x, y)
        oa.step()
        fb.step(x, y, ob)
        _assert_same_state(a, b, oa, ob, f"step {step}")
    assert calls[-1] is True


def test_autograd_fallback_still_steps(gen):
    """A model MLPStep cannot take (a SparseLinear left on 'auto'): step() is still applied."""
    a = _model(gen, "sss", 0.6)
    a[1].mode = "auto"
    b = copy.deepcopy(a)
    oa, ob = (MaskedSGD(m.parameters(), lr=0.05, momentum=0.9) for m in (a, b))
    fb = stnn.MLPStep(b)
    assert fb.check() is not None
    for _ in range(3):
        x, y = _batch(gen, 9, (33, 3), torch.float32)
        loss = torch.nn.functional.cross_entropy(a(x), y)
        for p in a.parameters():
            p.grad = None
        loss.backward()
        oa.step()
        assert torch.equal(fb.step(x, y, ob), loss.detach())
    _assert_same_state(a, b, oa, ob, "fallback")


def test_torch_sgd_takes_the_two_calls(gen):
    a = _model(gen, "LLL", 1.0)
    b = copy.deepcopy(a)
    oa, ob = (torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (a, b))
    fa, fb = stnn.MLPStep(a), stnn.MLPStep(b)
    for _ in range(3):
        x, y = _batch(gen, 9, (33, 3), torch.float32)
        fa(x, y)
        oa.step()
        fb.step(x, y, ob)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_malformed_plans_raise(gen):
    b = _model(gen, "sLd", 0.6)
    fb = stnn.MLPStep(b)
    x, y = _batch(gen, 9, (33, 3), torch.float32)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="SGD plan needs 8 tensors and 7 scalars"):
            fb._step_native(x, y, ([None] * 8, [0.1] * 7))
        plan = ([None] * 24, [0.05, 0.9, 0, 0, 0, 0, 1] * 3)
        with pytest.raises(RuntimeError, match="momentum but no momentum buffer"):
            fb._step_native(x, y, plan)
        plan = ([None] * 24, [0.05, 0, 0, 0, 0, 0, 0] + [0.05, 0, 0, 0.1, 0, 0, 0] + [0.05, 0, 0, 0, 0, 0, 1])
        with pytest.raises(RuntimeError, match="different SGD settings"):
            fb._step_native(x, y, plan)
    with pytest.raises(RuntimeError, match="grad mode off"):
        fb._step_native(x, y, ([None] * 24, [0.05, 0, 0, 0, 0, 0, 1] * 3))


# ------------------------------------------------------------------ MLPStep.fixed


@pytest.mark.parametrize("paths,density", [("sss", 0.05), ("dsL", 0.6), ("LLL", 1.0)])
def test_fixed_block_is_bit_identical_and_checks_once(paths, density, gen, monkeypatch):
    a, b, oa, ob, fa, fb = _twins(_model(gen, paths, density), lr=0.05, momentum=0.9, weight_decay=1e-3)
    checks = []
    real_check = stnn.MLPStep.check
    monkeypatch.setattr(stnn.MLPStep, "check", lambda self, *a: checks.append(self is fb) or real_check(self, *a))
    with fb.fixed(ob) as step:
        for k in range(6):
            x, y = _batch(gen, 13, (33, 3), torch.float32)
            la = fa.step(x, y, oa)
            assert torch.equal(la, step(x, y)), f"step {k}"
            _assert_same_state(a, b, oa, ob, f"step {k}")
    # b: checked by its first step (step() and, unfused as the optimizer has no state yet,
    # __call__) and once more when the block prepared its fused call; never after
    assert checks.count(True) == 3


def test_fixed_block_checks_again_after_another_call(gen):
    """A call of the MLPStep itself inside the block (here: after a new ticket for the
    second layer, which the block's contract excludes otherwise) makes the block's next
    step check and plan again."""
    a, b, oa, ob, fa, fb = _twins(_model(gen, "sss", 0.6), lr=0.05, momentum=0.9)
    g2 = torch.Generator().manual_seed(3)
    with fb.fixed(ob) as step:
        for k in range(6):
            x, y = _batch(gen, 11, (33, 3), torch.float32)
            if k == 3:
                new = make_mask(17, 65, 0.5, g2)
                a[3].set_mask(new)
                b[3].set_mask(new)
                assert torch.equal(fa.step(x, y, oa), fb.step(x, y, ob))
                _assert_same_state(a, b, oa, ob, "new ticket")
                continue
            assert torch.equal(fa.step(x, y, oa), step(x, y)), f"step {k}"
            _assert_same_state(a, b, oa, ob, f"step {k}")


def test_fixed_block_batches_it_cannot_take(gen):
    """A batch of another dtype, or grad mode off, goes through step() (which then
    decides), not through the prepared call."""
    a, b, oa, ob, fa, fb = _twins(_model(gen, "sLs", 0.5), lr=0.05, momentum=0.9)
    with fb.fixed(ob) as step:
        for k in range(3):
            x, y = _batch(gen, 9, (33, 3), torch.float32)
            assert torch.equal(fa.step(x, y, oa), step(x, y))
        x, y = _batch(gen, 9, (33, 3), torch.float64)
        with pytest.raises((RuntimeError, ValueError)):  # the model is float32: refused as by step()
            fa.step(x, y, oa)
        with pytest.raises((RuntimeError, ValueError)):
            step(x, y)
        x, y = _batch(gen, 9, (33, 3), torch.float32)
        assert torch.equal(fa.step(x, y, oa), step(x, y))
    _assert_same_state(a, b, oa, ob, "after")


# ------------------------------------------------------------------ review 32's cases


@pytest.mark.parametrize("change", ["same-nnz mask", "momentum reset"])
def test_state_changes_that_keep_the_registry_version(change, gen, monkeypatch):
    """A new ticket with the same number of kept weights, or the optimizer's state
    cleared: the cached plan must not be reused (nor compared tensor by tensor)."""
    a, b, oa, ob, fa, fb = _twins(_model(gen, "sss", 0.4), lr=0.05, momentum=0.9)
    g2 = torch.Generator().manual_seed(11)
    calls = _spy(monkeypatch)
    for k in range(7):
        if k == 3:
            if change == "same-nnz mask":
                keep = torch.zeros(65 * 33, dtype=torch.bool)
                keep[torch.randperm(65 * 33, generator=g2)[:a[1].nnz]] = True
                assert not torch.equal(keep.view(65, 33), a[1].mask())
                for m in (a, b):
                    m[1].set_mask(keep.view(65, 33))
            else:
                oa.state.clear()
                ob.state.clear()
        x, y = _batch(gen, 11, (33, 3), torch.float32)
        fa(x, y)
        oa.step()
        fb.step(x, y, ob)
        _assert_same_state(a, b, oa, ob, f"{change} step {k}")
    assert calls[-1] is True  # fused again after the change


def test_zero_grad_before_the_step_still_fuses(gen, monkeypatch):
    a, b, oa, ob, fa, fb = _twins(_model(gen, "sLd", 0.5), lr=0.05, momentum=0.9)
    calls = _spy(monkeypatch)
    for k in range(4):
        x, y = _batch(gen, 9, (33, 3), torch.float32)
        oa.zero_grad()
        fa(x, y)
        oa.step()
        ob.zero_grad()
        fb.step(x, y, ob)
        _assert_same_state(a, b, oa, ob, f"step {k}")
    assert calls[-1] is True


def test_tied_weights_are_refused():
    lin = nn.Linear(8, 8)
    m = nn.Sequential(lin, nn.ReLU(), lin)
    assert "used twice" in stnn.MLPStep(m).reason
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    m[2].weight = m[0].weight
    assert "share a parameter" in stnn.MLPStep(m).reason


def test_fixed_block_follows_setting_changes_inside(gen):
    """A learning-rate warm-up inside the block (or any change of a group's settings, or
    a new mask anywhere) is seen at the next step, as optimizer.step() would see it."""
    a, b, oa, ob, fa, fb = _twins(_model(gen, "sLs", 0.5), lr=0.05, momentum=0.9)
    with fb.fixed(ob) as step:
        for k in range(6):
            for o in (oa, ob):
                o.param_groups[0]["lr"] = 0.01 * (k + 1)
                o.param_groups[0]["nesterov"] = k >= 4
            x, y = _batch(gen, 9, (33, 3), torch.float32)
            assert torch.equal(fa.step(x, y, oa), step(x, y))
            _assert_same_state(a, b, oa, ob, f"step {k}")


def test_fused_bias_free_layers_and_nan_settings(gen, monkeypatch):
    monkeypatch.setattr(MaskedSGD, "_EARLY_UPDATE_MIN", 1 << 62)  # every layer in the one call after the backward
    for paths in ("sss", "dLs"):
        a, b, oa, ob, fa, fb = _twins(_model(gen, paths, 0.5, bias=False), lr=0.05, momentum=0.9, weight_decay=float("nan"))
        calls = _spy(monkeypatch)
        for k in range(3):
            x, y = _batch(gen, 9, (33, 3), torch.float32)
            fa(x, y)
            oa.step()
            fb.step(x, y, ob)  # NaN settings: one call, no "different settings" error
            for p, q in zip(a.parameters(), b.parameters()):
                assert torch.equal(p, q) or (p.isnan().all() and q.isnan().all())
        assert calls[-1] is True


@pytest.mark.parametrize("paths", ["LLL", "sLs"])
def test_fixed_block_sees_neurons_frozen_inside(paths, gen):
    """set_active inside a fixed block (the NEq tracker's decision, were it taken there)
    is a new frozen set: the next step leaves the prepared fused call, the frozen rows get
    no gradient and no update, and both runs agree bit for bit."""
    m = stnn.enable_neq(_model(gen, paths, 0.5))
    a, b, oa, ob, fa, fb = _twins(m, lr=0.05, momentum=0.9, weight_decay=1e-3)
    frozen = torch.arange(65) % 3 == 0
    with fb.fixed(ob) as step:
        for k in range(6):
            if k == 3:
                for mod in (a, b):
                    mod[1].set_active(~frozen)
                rows = b[1].dense_weight()[frozen].clone() if paths == "sLs" else b[1].weight[frozen].clone()
            x, y = _batch(gen, 9, (33, 3), torch.float32)
            assert torch.equal(fa.step(x, y, oa), step(x, y)), f"step {k}"
            _assert_same_state(a, b, oa, ob, f"step {k}")
    after = b[1].dense_weight()[frozen] if paths == "sLs" else b[1].weight[frozen]
    assert torch.equal(after, rows)
