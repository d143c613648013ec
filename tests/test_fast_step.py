"""MLPStep: a sparse MLP's cross-entropy gradients without autograd, bit-identical to
F.cross_entropy(model(x), y).backward(), and the autograd path whenever it cannot be."""
import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import FLOATS, make_mask, make_mlp, randn
from torch import nn

import sparseticket.nn as stnn
from sparseticket.flops import FlopCounter
from sparseticket.nn.fast_step import remove_chains
from sparseticket.optim import MaskedSGD


def _pair(gen, sizes, density, fuse, mode="sparse", **kw):
    m = make_mlp(gen, sizes, **kw)
    masks = {n: make_mask(*mod.weight.shape, 1.0 - density, gen) for n, mod in m.named_modules()
             if isinstance(mod, nn.Linear)}
    a = stnn.sparsify(copy.deepcopy(m), masks=masks, mode=mode, fuse_relu=fuse)
    remove_chains(a)  # the reference: module by module (the chain node has tests/test_chain.py)
    b = stnn.sparsify(copy.deepcopy(m), masks=masks, mode=mode, fuse_relu=fuse)
    return a, b


def _autograd_grads(model, x, y):
    loss = F.cross_entropy(model(x), y)
    for p in model.parameters():
        p.grad = None
    loss.backward()
    return loss.detach()


def _assert_same(a, b, la, lb, what):
    assert torch.equal(la, lb), f"{what}: loss {la} != {lb}"
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p.grad is None) == (q.grad is None), f"{what}: {n}"
        assert p.grad is None or torch.equal(p.grad, q.grad), f"{what}: gradient of {n} differs"


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("fuse", [False, True], ids=["relu-modules", "fused"])
@pytest.mark.parametrize("density", [1.0, 0.5, 0.05, 0.0])
@pytest.mark.parametrize("sizes,batch,flatten", [((784, 300, 100, 10), 60, True), ((13, 7, 5), 1, False),
                                                 ((9, 4), 17, False), ((33, 65, 17, 3), 130, True)],
                         ids=["lenet", "B1", "one-layer", "odd"])
def test_bit_identical_to_autograd_over_steps(sizes, batch, flatten, density, fuse, dtype, native, gen):
    a, b = _pair(gen, sizes, density, fuse, flatten=flatten, dtype=dtype)
    fast = stnn.MLPStep(b, native=native)
    assert fast.check() is None
    oa = MaskedSGD(a.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)
    ob = MaskedSGD(b.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)
    shape = (batch, 1, sizes[0]) if flatten else (batch, sizes[0])
    for step in range(4):
        x = randn(*shape, dtype=dtype, gen=gen)
        y = torch.randint(0, sizes[-1], (batch,), generator=gen)
        la = _autograd_grads(a, x, y)
        lb = fast(x, y)
        _assert_same(a, b, la, lb, f"step {step}")
        oa.step()
        ob.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert all(m.last_path == "sparse" for m in b.modules() if isinstance(m, stnn.SparseLinear))


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_no_bias_and_relu_on_every_layer(native, gen):
    a, b = _pair(gen, (20, 12, 6), 0.4, False, bias=False)
    a.append(nn.ReLU())
    b.append(nn.ReLU())  # a ReLU on the logits too
    fast = stnn.MLPStep(b, native=native)
    assert fast.check() is None and fast.layers[-1][1]
    x, y = randn(8, 20, gen=gen), torch.randint(0, 6, (8,), generator=gen)
    _assert_same(a, b, _autograd_grads(a, x, y), fast(x, y), "no bias")


def _fallback_case(gen):
    a, b = _pair(gen, (20, 12, 6), 0.5, True)
    x, y = randn(8, 20, gen=gen), torch.randint(0, 6, (8,), generator=gen)
    return a, b, x, y


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("fuse", [False, True], ids=["relu-modules", "fused"])
@pytest.mark.parametrize("density", [1.0, 0.6, 0.0])
@pytest.mark.parametrize("paths", ["ddd", "dsd", "sdd", "LLL", "LsL", "sLd"])
def test_dense_paths_and_plain_linears_bit_identical(paths, density, fuse, dtype, native, gen):
    """Per layer: 'd' a SparseLinear on its dense path (bitmap expand / compress, or the
    values viewed as W when nothing is pruned), 's' on its sparse path, 'L' a plain nn.Linear."""
    sizes, batch = (33, 65, 17, 3), 19
    m = make_mlp(gen, sizes, flatten=True, dtype=dtype)
    lin = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)]
    masks = {n: make_mask(*m.get_submodule(n).weight.shape, 1.0 - density, gen)
             for n, c in zip(lin, paths) if c != "L"}
    a = stnn.sparsify(copy.deepcopy(m), masks=masks, mode="sparse", fuse_relu=fuse) if masks else copy.deepcopy(m)
    for n, c in zip(lin, paths):
        if c == "d":
            a.get_submodule(n).mode = "dense"
    b = copy.deepcopy(a)
    fast = stnn.MLPStep(b, native=native)
    assert fast.check() is None, fast.check()
    oa = MaskedSGD(a.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    ob = MaskedSGD(b.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    for step in range(3):
        x = randn(batch, 1, sizes[0], dtype=dtype, gen=gen)
        y = torch.randint(0, sizes[-1], (batch,), generator=gen)
        _assert_same(a, b, _autograd_grads(a, x, y), fast(x, y), f"{paths} step {step}")
        oa.step()
        ob.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    for n, c in zip(lin, paths):
        if c != "L":
            assert b.get_submodule(n).last_path == {"d": "dense", "s": "sparse"}[c]
            assert b.get_submodule(n).dense_weight().eq(0).logical_or(masks[n]).all()  # pruned stays 0


@pytest.mark.parametrize("change,reason", [
    (lambda m: setattr(m[0], "mode", "auto"), "not pinned"),
    (lambda m: m[0].set_active(torch.arange(12) % 2 == 0), "frozen neurons"),
    (lambda m: m[2].bias.requires_grad_(False), "does not require grad"),
    (lambda m: m[2].register_forward_hook(lambda *a: None), "has hooks"),
    (lambda m: m.register_forward_pre_hook(lambda *a: None), "has hooks"),
    (lambda m: m[0].weight_values.register_hook(lambda g: g), "parameter has hooks"),
], ids=["auto-mode", "neq", "frozen-param", "layer-hook", "model-hook", "param-hook"])
def test_falls_back_to_autograd(change, reason, gen):
    a, b, x, y = _fallback_case(gen)
    change(a)
    change(b)
    fast = stnn.MLPStep(b)
    assert reason in fast.check(x)
    la = _autograd_grads(a, x, y)
    lb = fast(x, y)
    assert torch.equal(la, lb)
    for p, q in zip(a.parameters(), b.parameters()):
        assert (p.grad is None and q.grad is None) or torch.allclose(p.grad, q.grad)


def test_cpu_autocast_takes_the_autograd_path(gen):
    a, b, x, y = _fallback_case(gen)
    fast = stnn.MLPStep(b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "autocast" in fast.check(x)
        _assert_same(a, b, _autograd_grads(a, x, y), fast(x, y), "cpu autocast")
    assert fast.check(x) is None


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_non_contiguous_linear_weight_takes_the_autograd_path(native, gen):
    """autograd's gradient of a transposed-storage weight keeps its strides (and its
    summation order): the fast path would not be bit-identical, so it is not taken."""
    a = nn.Sequential(nn.Linear(20, 12), nn.ReLU(), nn.Linear(12, 6))
    a[0].weight = nn.Parameter(randn(20, 12, gen=gen).t())
    b = copy.deepcopy(a)
    assert not b[0].weight.is_contiguous()
    x, y = randn(9, 20, gen=gen), torch.randint(0, 6, (9,), generator=gen)
    fast = stnn.MLPStep(b, native=native)
    assert "not contiguous" in fast.check(x)
    _assert_same(a, b, _autograd_grads(a, x, y), fast(x, y), "transposed weight")
    assert b[0].weight.grad.stride() == a[0].weight.grad.stride()


def test_children_replaced_after_construction(gen):
    a, b, x, y = _fallback_case(gen)
    fast = stnn.MLPStep(b)
    assert fast.check(x) is None
    torch.manual_seed(0)
    a[2] = nn.Linear(12, 6)
    torch.manual_seed(0)
    b[2] = nn.Linear(12, 6)
    assert "children changed" in fast.check(x)
    _assert_same(a, b, _autograd_grads(a, x, y), fast(x, y), "replaced child")
    b.append(nn.Identity())
    assert "children changed" in fast.check(x)
    assert stnn.MLPStep(b).check(x) is None


def test_activation_changed_after_construction(gen):
    """set_activation(None) with the FusedReLU left in place: the model no longer applies
    that ReLU, and neither may the step."""
    a, b, x, y = _fallback_case(gen)
    fast = stnn.MLPStep(b)
    assert b[0].activation == "relu" and fast.check(x) is None
    a[0].set_activation(None)
    b[0].set_activation(None)
    assert "activation changed" in fast.check(x)
    _assert_same(a, b, _autograd_grads(a, x, y), fast(x, y), "activation removed")


def test_unsupported_models_and_inputs(gen):
    conv = stnn.sparsify(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)), amount=0.5, mode="sparse")
    assert "Conv" in stnn.MLPStep(conv).reason

    class Custom(nn.Sequential):
        def forward(self, x):
            return super().forward(x) * 2

    custom = stnn.sparsify(Custom(nn.Linear(4, 3)), amount=0.5, mode="sparse")
    assert "overridden" in stnn.MLPStep(custom).reason
    shared = nn.Linear(4, 4)
    assert "twice" in stnn.MLPStep(stnn.sparsify(nn.Sequential(shared, shared), amount=0.5, mode="sparse")).reason
    a, b, x, y = _fallback_case(gen)
    fast = stnn.MLPStep(b)
    assert "requires grad" in fast.check(x.clone().requires_grad_())
    assert "dtype" in fast.check(x.double())
    assert "[batch, features]" in fast.check(x[None])
    with torch.no_grad():
        assert "grad mode" in fast.check(x)
    # class-probability targets take the autograd path, with its result
    yp = torch.softmax(randn(8, 6, gen=gen), 1)
    _assert_same(a, b, _autograd_grads(a, x, yp), fast(x, yp), "soft targets")


def test_counted_steps_take_the_autograd_path(gen):
    """A live FlopCounter (module hooks) sees every layer; afterwards the fast path resumes."""
    a, b, x, y = _fallback_case(gen)
    fast = stnn.MLPStep(b)
    with FlopCounter(b) as fc:
        assert fast.check(x) is not None
        fast(x, y)
    assert fc.totals()["all"]["executed"] > 0
    assert set(fc.layers()) == {"0", "2"}
    assert fast.check(x) is None


def test_native_path_is_taken_and_checks_its_arguments(gen, monkeypatch):
    """The compiled path really runs when available (not silently the Python one), and a
    malformed call to it raises instead of reading past its arguments."""
    from sparseticket import ops
    if ops._C is None:
        pytest.skip("compiled extension not loaded")
    a, b, x, y = _fallback_case(gen)
    fast = stnn.MLPStep(b)
    called = []
    real = ops._C.mlp_grads
    monkeypatch.setattr(ops._C, "mlp_grads", lambda *args: called.append(1) or real(*args), raising=False)
    _assert_same(a, b, _autograd_grads(a, x, y), fast(x, y), "native")
    assert called == [1]
    with pytest.raises(RuntimeError, match="do not describe layers"):
        real(x, y, [None] * 7, [0, 0, 1, 1])
    with pytest.raises(RuntimeError, match="has no weight"):
        real(x, y, [None] * 8, [0, 0, 1, 1])
    w = torch.zeros(3, 20)
    with pytest.raises(RuntimeError, match="unknown kind"):
        real(x, y, [w] + [None] * 7, [7, 0, 3, 20])
