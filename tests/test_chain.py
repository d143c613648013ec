"""The MLP chain node: ``sparsify(..., fuse_relu=True)`` gives an nn.Sequential MLP a
forward that runs all its layers as one autograd node (``ChainForward`` / the compiled
``mlp_chain``). Its output and gradients must be bit-identical to the module-by-module
forward, and every call it cannot take must go through the modules unchanged."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from helpers import FLOATS, make_mask, make_mlp, randn
from torch import nn

import sparseticket.nn as stnn
from sparseticket import ops
from sparseticket.flops import FlopCounter
from sparseticket.nn.fast_step import ChainForward, remove_chains
from sparseticket.optim import MaskedSGD

pytestmark = pytest.mark.skipif(ops._C is None, reason="the chain node is compiled C++")


def _pair(gen, sizes, density, mode="sparse", masks_for=None, **kw):
    """(chained, modules): the same sparsified MLP, with and without the chain node."""
    m = make_mlp(gen, sizes, **kw)
    masks = {n: make_mask(*mod.weight.shape, 1.0 - density, gen) for n, mod in m.named_modules()
             if isinstance(mod, nn.Linear) and (masks_for is None or n in masks_for)}
    a = stnn.sparsify(copy.deepcopy(m), masks=masks, mode=mode, fuse_relu=True)
    b = stnn.sparsify(copy.deepcopy(m), masks=masks, mode=mode, fuse_relu=True)
    remove_chains(b)
    assert isinstance(a.__dict__.get("forward"), ChainForward) and "forward" not in b.__dict__
    return a, b


def _run(model, x, y, gy=None):
    out = model(x)
    loss = F.cross_entropy(out, y) if gy is None else (out * gy).sum()
    for p in model.parameters():
        p.grad = None
    loss.backward()
    return out, loss.detach()


def _assert_same(a, b, ra, rb, what):
    assert torch.equal(ra[0], rb[0]), f"{what}: outputs differ"
    assert torch.equal(ra[1], rb[1]), f"{what}: losses differ"
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p.grad is None) == (q.grad is None), f"{what}: {n}"
        assert p.grad is None or torch.equal(p.grad, q.grad), f"{what}: gradient of {n} differs"


def _chained(model, x) -> bool:
    """Whether this call takes the chain node (the output's grad_fn is its node)."""
    with torch.enable_grad():
        fn = model(x).grad_fn
    return fn is not None and "MLPChainFunction" in fn.name()


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("mode", ["sparse", "dense"])
@pytest.mark.parametrize("density", [1.0, 0.5, 0.05, 0.0])
@pytest.mark.parametrize("sizes,batch,flatten", [((784, 300, 100, 10), 60, True), ((13, 7, 5), 1, False),
                                                 ((9, 4), 17, False), ((33, 65, 17, 3), 130, True)],
                         ids=["lenet", "B1", "one-layer", "odd"])
def test_bit_identical_to_the_modules_over_steps(sizes, batch, flatten, density, mode, dtype, gen):
    a, b = _pair(gen, sizes, density, mode=mode, flatten=flatten, dtype=dtype)
    _train_both(a, b, sizes, batch, flatten, dtype, gen, nesterov=True)


def _train_both(a, b, sizes, batch, flatten, dtype, gen, after_backward=lambda: None, **hyper):
    """Three MaskedSGD steps of the chained model ``a`` and its module-by-module twin ``b``
    on the same batches: every call chains, and outputs, losses, gradients and finally the
    parameters are bit-identical."""
    oa = MaskedSGD(a.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, **hyper)
    ob = MaskedSGD(b.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, **hyper)
    shape = (batch, 1, sizes[0]) if flatten else (batch, sizes[0])
    for step in range(3):
        x = randn(*shape, dtype=dtype, gen=gen)
        y = torch.randint(0, sizes[-1], (batch,), generator=gen)
        assert _chained(a, x)
        _assert_same(a, b, _run(a, x, y), _run(b, x, y), f"step {step}")
        after_backward()
        oa.step()
        ob.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_mixed_layers_input_grad_no_bias_and_a_relu_on_the_logits(gen):
    # a plain nn.Linear left in the chain (no mask given), a full ticket (view kind), an
    # expanded dense path, a sparse one; no biases; the input requires grad
    m = make_mlp(gen, (21, 16, 12, 8, 5), bias=False, last_relu=True)
    masks = {"2": make_mask(12, 16, 0.0, gen), "4": make_mask(8, 12, 0.6, gen), "6": make_mask(5, 8, 0.3, gen)}
    a = stnn.sparsify(copy.deepcopy(m), masks=masks, mode="sparse", fuse_relu=True)
    b = stnn.sparsify(copy.deepcopy(m), masks=masks, mode="sparse", fuse_relu=True)
    remove_chains(b)
    for mod in (a, b):
        mod[2].mode = "dense"  # full ticket: the values viewed as W
        mod[4].mode = "dense"  # the bitmap expand
    assert type(a[0]) is nn.Linear
    x = randn(7, 21, gen=gen)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    gy = randn(7, 5, gen=gen)
    assert _chained(a, xa)
    _assert_same(a, b, _run(a, xa, None, gy), _run(b, xb, None, gy), "mixed")
    assert torch.equal(xa.grad, xb.grad)


def test_gradcheck_float64(gen):
    a, _ = _pair(gen, (6, 5, 4, 3), 0.5, dtype=torch.float64)
    names = [n for n, _ in a.named_parameters()]
    for mode in ("sparse", "dense"):
        for layer in a.modules():
            if isinstance(layer, stnn.SparseLinear):
                layer.mode = mode
        x = randn(4, 6, dtype=torch.float64, gen=gen).requires_grad_()
        ps = tuple(p.detach().clone().requires_grad_() for p in a.parameters())

        def f(x, *ps):
            return torch.func.functional_call(a, dict(zip(names, ps)), (x,))

        assert "MLPChainFunction" in f(x, *ps).grad_fn.name()
        assert torch.autograd.gradcheck(f, (x, *ps))


def test_auto_mode_measures_through_the_modules_then_chains(gen):
    a, b = _pair(gen, (40, 30, 10), 0.1, mode="auto")
    x = randn(8, 40, gen=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    # first call: the layers have not measured their path yet (the modules run and measure)
    assert not _chained(a, x)
    assert _chained(a, x)
    b.load_state_dict(a.state_dict())
    for la, lb in zip(a.modules(), b.modules()):
        if isinstance(la, stnn.SparseLinear):
            lb.mode = la._choice  # the same paths as a's measurement chose
    _assert_same(a, b, _run(a, x, y), _run(b, x, y), "auto")
    # another batch size: measured again through the modules first
    x2 = randn(300, 40, gen=gen)
    assert not _chained(a, x2)


def test_calls_it_cannot_take_go_through_the_modules(gen):
    a, b = _pair(gen, (12, 9, 4), 0.5)
    x = randn(5, 12, gen=gen)
    assert _chained(a, x)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    # a forward hook on a child is called
    seen = []
    h = a[0].register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    assert not _chained(a, x) and seen
    h.remove()
    assert _chained(a, x)
    # a global module hook
    h = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert not _chained(a, x)
    finally:
        h.remove()
    # a frozen parameter
    a[0].bias.requires_grad_(False)
    assert not _chained(a, x)
    a[0].bias.requires_grad_(True)
    # frozen neurons (NEq)
    stnn.enable_neq(a)
    a[2].set_active(torch.tensor([True, False, True, True]))
    assert not _chained(a, x)
    a[2].set_active(None)
    assert _chained(a, x)
    # autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _chained(a, x)
    # a wrong width still raises the layer's own error
    with pytest.raises(ValueError, match="input has shape"):
        a(randn(5, 11, gen=gen))


def test_output_changed_in_place_before_the_backward(gen):
    # as with the layers' own nodes: allowed when the last layer has no ReLU (its output
    # is not needed by the backward), an error when it has one
    for last_relu in (False, True):
        a, b = _pair(gen, (12, 9, 4), 0.5, last_relu=last_relu)
        x = randn(5, 12, gen=gen)
        outs = []
        for m in (a, b):
            out = m(x)
            out.mul_(2)
            if last_relu:
                with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                    out.sum().backward()
            else:
                out.sum().backward()
                outs.append([p.grad for p in m.parameters()])
        if not last_relu:
            assert all(torch.equal(g, h) for g, h in zip(*outs))


def test_traced_models_take_the_modules(gen):
    a, b = _pair(gen, (12, 9, 4), 0.5)
    x = randn(5, 12, gen=gen)
    traced = torch.jit.trace(a, (x,), check_trace=False)
    with torch.no_grad():
        assert torch.equal(traced(x), b(x))


def test_flop_counter_sees_every_layer(gen):
    a, b = _pair(gen, (12, 9, 4), 0.5)
    x = randn(5, 12, gen=gen)
    y = torch.randint(0, 4, (5,), generator=gen)
    totals = []
    for model in (a, b):
        with FlopCounter(model) as c:
            _run(model, x, y)
        totals.append(c.totals())
    assert totals[0] == totals[1] and totals[0]["all"]["executed"] > 0


def test_children_replaced_or_relu_unfused_rebuilds_the_plan(gen):
    a, b = _pair(gen, (12, 9, 4), 0.5)
    x = randn(5, 12, gen=gen)
    y = torch.randint(0, 4, (5,), generator=gen)
    assert _chained(a, x)
    for m in (a, b):
        m[2] = copy.deepcopy(m[2])
        m[0].set_activation(None)
        m[1] = nn.ReLU()
    assert _chained(a, x)
    _assert_same(a, b, _run(a, x, y), _run(b, x, y), "rebuilt")
    a.insert(1, nn.Dropout(0.0))
    assert not _chained(a, x)


def test_copy_pickle_state_dict_and_densify(gen, tmp_path):
    a, b = _pair(gen, (12, 9, 4), 0.5)
    x = randn(5, 12, gen=gen)
    y = torch.randint(0, 4, (5,), generator=gen)
    assert set(a.state_dict()) == set(b.state_dict())
    c = copy.deepcopy(a)
    assert c.__dict__["forward"].module is c
    assert _chained(c, x)
    _assert_same(c, b, _run(c, x, y), _run(b, x, y), "deepcopy")
    d = pickle.loads(pickle.dumps(a))
    assert d.__dict__["forward"].module is d
    assert _chained(d, x)
    _assert_same(d, b, _run(d, x, y), _run(b, x, y), "pickle")
    torch.save(a, tmp_path / "m.pt")
    e = torch.load(tmp_path / "m.pt", weights_only=False)
    _assert_same(e, b, _run(e, x, y), _run(b, x, y), "torch.save")
    stnn.densify(a)
    assert "forward" not in a.__dict__ and type(a[1]) is nn.ReLU
    with torch.no_grad():
        assert torch.allclose(a(x), b(x), atol=1e-6)


def test_only_mlps_holding_a_ticket_get_the_chain(gen):
    m = make_mlp(gen, (12, 9, 4))
    stnn.sparsify(m, masks={}, fuse_relu=True)  # nothing converted: nothing to chain
    assert "forward" not in m.__dict__
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5))
    stnn.sparsify(conv, amount=0.5, fuse_relu=True)
    assert "forward" not in conv.__dict__
    stnn.sparsify(m, amount=0.5)  # without fuse_relu: no chain
    assert "forward" not in m.__dict__


# ----------------------------------------------------------------------------- review 33


def _full_dense(gen, sizes=(20, 16, 5), dtype=torch.float32):
    """Full tickets on their dense path: every op differentiable twice, as a plain MLP."""
    m = make_mlp(gen, sizes, dtype=dtype)
    masks = {n: torch.ones_like(mod.weight, dtype=torch.bool) for n, mod in m.named_modules()
             if isinstance(mod, nn.Linear)}
    a = stnn.sparsify(copy.deepcopy(m), masks=masks, mode="dense", fuse_relu=True)
    b = stnn.sparsify(copy.deepcopy(m), masks=masks, mode="dense", fuse_relu=True)
    remove_chains(b)
    return a, b


def test_second_derivatives_as_the_modules_give_them(gen):
    a, b = _full_dense(gen, dtype=torch.float64)
    x0 = randn(8, 20, dtype=torch.float64, gen=gen)
    y = torch.randint(0, 5, (8,), generator=gen)
    results = []
    for m in (a, b):
        # a penalty on the parameter gradients, and one on the input gradient (WGAN-GP style)
        out = m(x0)
        gs = torch.autograd.grad(F.cross_entropy(out, y), list(m.parameters()), create_graph=True)
        g1 = torch.autograd.grad(sum((g * g).sum() for g in gs), list(m.parameters()))
        x = x0.clone().requires_grad_()
        gx, = torch.autograd.grad(m(x).sum(), x, create_graph=True)
        g2 = torch.autograd.grad((gx * gx).sum(), list(m.parameters()), allow_unused=True, materialize_grads=True)
        results.append((out, g1, g2))
    assert "MLPChainFunction" in results[0][0].grad_fn.name()
    for u, v in zip(results[0][1] + results[0][2], results[1][1] + results[1][2]):
        # (the same terms, summed in another order: the chain's first derivatives come
        # from its node, the modules' from theirs)
        assert torch.allclose(u, v, rtol=1e-12, atol=1e-12)


def test_strided_upstream_gradient(gen):
    for mode in ("dense", "sparse"):
        a, b = _pair(gen, (12, 9, 4), 0.5, mode=mode)
        x = randn(6, 12, gen=gen)
        gy = randn(4, 6, gen=gen).t()  # a transposed upstream gradient
        assert _chained(a, x)
        _assert_same(a, b, _run(a, x, None, gy), _run(b, x, None, gy), f"strided gy, {mode}")


def test_in_place_changes_the_modules_allow_between_forward_and_backward(gen):
    # neither the layers' nodes nor the chain save a bias, or a partial ticket's values on
    # its dense path (the expanded W is saved): changing them before the backward is allowed
    a, b = _pair(gen, (12, 9, 4), 0.5, mode="dense")
    x = randn(6, 12, gen=gen)
    grads = []
    for m in (a, b):
        out = m(x)
        with torch.no_grad():
            m[0].bias.add_(1)
            m[2].weight_values.mul_(2)
        out.sum().backward()
        grads.append([p.grad for p in m.parameters()])
    assert all(torch.equal(g, h) for g, h in zip(*grads))
    # the sparse path saves the values (as its node does): changing them is an error
    a, _ = _pair(gen, (12, 9, 4), 0.5, mode="sparse")
    out = a(x)
    with torch.no_grad():
        a[2].weight_values.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_changes_made_in_place_after_the_first_call(gen):
    a, b = _pair(gen, (12, 9, 4), 0.5, flatten=True)
    x = randn(6, 1, 12, gen=gen)
    assert _chained(a, x)
    # another flatten: the modules' output shape
    for m in (a, b):
        m[0].start_dim = 2
    with torch.no_grad():
        assert a(x).shape == b(x).shape == (6, 1, 4)
    for m in (a, b):
        m[0].start_dim = 1
    assert _chained(a, x)
    # a parametrized plain layer (its class changes, the child object stays)
    c = make_mlp(gen, (12, 9, 4, 3))
    stnn.sparsify(c, masks={"2": make_mask(4, 9, 0.5, gen)}, mode="sparse", fuse_relu=True)
    x2 = randn(6, 12, gen=gen)
    assert _chained(c, x2)
    torch.nn.utils.parametrizations.weight_norm(c[0])
    assert not _chained(c, x2)
    # weights tied after the first call
    d, _ = _pair(gen, (8, 8, 8), 1.0, mode="dense")
    x3 = randn(6, 8, gen=gen)
    assert _chained(d, x3)
    d[2].weight_values = d[0].weight_values
    assert not _chained(d, x3)


def test_functorch_forward_ad_and_torch_function_modes_take_the_modules(gen):
    a, b = _full_dense(gen)
    x = randn(5, 20, gen=gen)
    with torch.no_grad():
        ref = b(x)
    with torch.enable_grad():
        assert torch.equal(torch.func.vmap(a)(x), torch.func.vmap(b)(x))
    import torch.autograd.forward_ad as fwAD
    t = randn(5, 20, gen=gen)
    tangents = []
    for m in (a, b):
        with fwAD.dual_level():
            tangents.append(fwAD.unpack_dual(m(fwAD.make_dual(x, t))).tangent)
    assert torch.equal(tangents[0], tangents[1])

    seen = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    with Spy():
        out = a(x)
    assert "linear" in seen and torch.equal(out.detach(), ref)


def test_inconsistent_widths_are_left_to_the_modules(gen):
    m = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(4, 3))
    stnn.sparsify(m, amount=0.5, fuse_relu=True)
    assert "forward" not in m.__dict__  # the plan refuses it: the modules raise their own error
    with pytest.raises(ValueError, match="input has shape"):
        m(randn(2, 6, gen=gen))


# ----------------------------------------------------------------------------- NEq layers
# enable_neq gives an MLP of DenseNEqLinear layers the chain too: a layer with frozen
# neurons runs neq_linear in the forward and, in the backward, the ops of its own node
# (row_masked_grad_weight, masked_bias_grad, the whole input gradient); one with none
# frozen runs as a plain nn.Linear.


def _neq_pair(gen, sizes, dtype=torch.float32, actives=None, **kw):
    """(chained, modules): the same MLP after enable_neq, with and without the chain
    node; ``actives`` (per linear layer a mask, None or 'half') sets frozen neurons."""
    m = make_mlp(gen, sizes, dtype=dtype, **kw)
    a, b = stnn.enable_neq(copy.deepcopy(m)), stnn.enable_neq(copy.deepcopy(m))
    assert isinstance(a.__dict__.get("forward"), ChainForward)
    remove_chains(b)
    layers = [i for i, c in enumerate(a) if isinstance(c, nn.Linear)]
    for i, act in zip(layers, actives or ["half"] * len(layers)):
        if isinstance(act, str):
            act = torch.rand(a[i].out_features, generator=gen) < 0.5
        a[i].set_active(act)
        b[i].set_active(act)
    return a, b


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("sizes,batch,flatten", [((784, 300, 100, 10), 60, True), ((13, 7, 5), 1, False),
                                                 ((9, 4), 17, False), ((33, 65, 17, 3), 130, True)],
                         ids=["lenet", "B1", "one-layer", "odd"])
def test_neq_bit_identical_to_the_modules_over_steps(sizes, batch, flatten, dtype, gen):
    a, b = _neq_pair(gen, sizes, dtype=dtype, flatten=flatten)
    frozen = {n: ~m.active for n, m in stnn.neq_modules(a)}
    before = {n: (m.weight.detach()[frozen[n]].clone(), m.bias.detach()[frozen[n]].clone())
              for n, m in stnn.neq_modules(a)}

    def no_frozen_gradient():
        for n, m in stnn.neq_modules(a):
            assert (m.weight.grad[frozen[n]] == 0).all() and (m.bias.grad[frozen[n]] == 0).all()

    _train_both(a, b, sizes, batch, flatten, dtype, gen, after_backward=no_frozen_gradient)
    for n, m in stnn.neq_modules(a):  # frozen neurons untouched by the optimizer
        assert torch.equal(m.weight.detach()[frozen[n]], before[n][0])
        assert torch.equal(m.bias.detach()[frozen[n]], before[n][1])


def test_neq_mixed_masks_input_grad_no_bias_and_a_sparse_layer(gen):
    """Layers all frozen, none frozen (mask None: the plain kind), all active (a mask of
    ones) and a random half; no biases; a relu on the logits; the input requires grad;
    then the same with a SparseLinear in the chain."""
    sizes = (21, 16, 12, 8, 5)
    for sparse in (False, True):
        a, b = _neq_pair(gen, sizes, actives=[torch.zeros(16, dtype=torch.bool), None,
                                              torch.ones(8, dtype=torch.bool), "half"],
                         bias=False, last_relu=True)
        if sparse:
            masks = {"2": make_mask(12, 16, 0.6, gen)}
            for m in (a, b):
                stnn.sparsify(m, masks=masks, mode="sparse", fuse_relu=True)
            remove_chains(b)
            assert isinstance(a[2], stnn.SparseLinear)
        x = randn(7, 21, gen=gen)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        gy = randn(7, 5, gen=gen)
        assert _chained(a, xa)
        _assert_same(a, b, _run(a, xa, None, gy), _run(b, xb, None, gy), f"mixed, sparse={sparse}")
        assert torch.equal(xa.grad, xb.grad)
        assert (a[0].weight.grad == 0).all()


def test_neq_frozen_neurons_never_read_a_nonfinite_gradient(gen):
    """An inf/NaN upstream gradient at frozen output neurons leaves their weight and bias
    gradients exactly 0, in the chain as in the layer's own node."""
    a, b = _neq_pair(gen, (10, 6), actives=[torch.tensor([True, False, True, False, False, True])])
    x = randn(5, 10, gen=gen)
    gy = randn(5, 6, gen=gen)
    gy[0, 1], gy[2, 3] = float("inf"), float("nan")
    assert _chained(a, x)
    ra, rb = _run(a, x, None, gy), _run(b, x, None, gy)
    assert torch.equal(ra[0], rb[0])
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad)
    frozen = ~a[0].active
    assert (a[0].weight.grad[frozen] == 0).all() and (a[0].bias.grad[frozen] == 0).all()


def test_neq_calls_the_chain_cannot_take(gen):
    a, b = _neq_pair(gen, (12, 9, 4))
    x = randn(5, 12, gen=gen)
    assert _chained(a, x)
    # the NEq tracker's forward hooks see every layer
    seen = []
    h = a[2].register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    assert not _chained(a, x) and seen == [(5, 4)]
    h.remove()
    # a frozen prefix (freeze_prefix turns requires_grad off)
    a[0].weight.requires_grad_(False)
    assert not _chained(a, x)
    a[0].weight.requires_grad_(True)
    # reduced precision: the layer's own path (dense products in that dtype)
    a16, b16 = copy.deepcopy(a).to(torch.bfloat16), copy.deepcopy(b).to(torch.bfloat16)
    x16 = x.to(torch.bfloat16)
    assert not _chained(a16, x16)
    assert torch.equal(a16(x16), b16(x16))
    # create_graph: recorded and differentiated through the layers' own nodes
    y = torch.randint(0, 4, (5,), generator=gen)
    ga = torch.autograd.grad(F.cross_entropy(a(x), y), list(a.parameters()), create_graph=True)
    gb = torch.autograd.grad(F.cross_entropy(b(x), y), list(b.parameters()), create_graph=True)
    for u, v in zip(ga, gb):
        assert torch.allclose(u, v, rtol=1e-6, atol=1e-7)
    # MLPStep's own step computes whole gradients: it leaves frozen neurons to autograd
    assert "frozen neurons" in stnn.MLPStep(a).check(x)


def test_neq_chain_only_on_mlps_and_copies_keep_it(gen, tmp_path):
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5))
    stnn.enable_neq(conv)
    assert "forward" not in conv.__dict__
    a, b = _neq_pair(gen, (12, 9, 4))
    x, y = randn(5, 12, gen=gen), torch.randint(0, 4, (5,), generator=gen)
    for c in (copy.deepcopy(a), pickle.loads(pickle.dumps(a))):
        assert _chained(c, x)
        _assert_same(c, b, _run(c, x, y), _run(b, x, y), "copy")
    # a state dict loaded into a fresh NEq model restores the masks and the chain runs them
    fresh = stnn.enable_neq(make_mlp(gen, (12, 9, 4)))
    fresh.load_state_dict(a.state_dict())
    assert _chained(fresh, x)
    _assert_same(fresh, b, _run(fresh, x, y), _run(b, x, y), "loaded")


def test_prepared_call_follows_every_change_after_it(gen):
    """From its second call the chain reuses the arguments its first call built
    (``_ChainCall``). Every change below is made to both models after such calls; the
    chained one must then give what the modules give, taking the chain again where it can."""
    a, b = _pair(gen, (12, 9, 7, 4), 0.5)
    plain_a, plain_b = nn.Linear(7, 4), None  # a plain layer in the chain (replaces the last one)
    plain_b = copy.deepcopy(plain_a)
    a[4], b[4] = plain_a, plain_b
    y = torch.randint(0, 4, (6,), generator=gen)
    x = randn(6, 12, gen=gen)

    last = [None]

    def same(what, xx=x, yy=y, chained=True, rebuilt=True):
        calls = []
        for _ in range(2):  # the first call (re)builds the arguments, the later ones reuse them
            assert _chained(a, xx) == chained, what
            _assert_same(a, b, _run(a, xx, yy), _run(b, xx, yy), what)
            calls.append(a.__dict__["forward"].step._chain_call)
        if chained:
            assert calls[0] is not None and calls[1] is calls[0], f"{what}: prepared once, then reused"
            assert (calls[0] is not last[0]) == rebuilt, f"{what}: rebuilt after the change: {not rebuilt}"
            last[0] = calls[0]

    same("first calls")
    same("nothing changed", rebuilt=False)
    assert [m.last_path for m in (a[0], a[2])] == ["sparse", "sparse"]
    # a new ticket (new buffers and values, a new ticket token)
    for m in (a, b):
        m[2].set_mask(make_mask(7, 9, 0.8, torch.Generator().manual_seed(5)))
    same("new ticket")
    # a ticket of the same size (new index buffers, the same values Parameter)
    for m in (a, b):
        m[2].set_mask(make_mask(7, 9, 0.8, torch.Generator().manual_seed(6)))
    same("same-size ticket")
    # a layer's mode, and the global mode
    for m in (a, b):
        m[0].mode = "dense"
    same("layer mode")
    assert a[0].last_path == "dense"
    for m in (a, b):
        m[0].mode = "auto"  # (the global mode decides for 'auto' layers)
    with stnn.use_mode("sparse"):
        same("global mode")
    assert a[0].last_path == "sparse"
    with stnn.use_mode("dense"):
        same("another global mode")
    assert a[0].last_path == "dense"
    for m in (a, b):
        m[0].mode = "sparse"
    # another batch size, another dtype (to() swaps each parameter's data in place)
    same("batch size", randn(3, 12, gen=gen), y[:3])
    for m in (a, b):
        m.double()
    same("float64", x.double())
    for m in (a, b):
        m.float()
    same("float32 again")
    # values replaced in place (.data =): the same Parameter objects, read at the call
    for m in (a, b):
        m[4].weight.data = m[4].weight.data * 2
    same("data replaced", rebuilt=False)  # (the same objects: their new values are read at the call)
    # a non-contiguous weight (same object): the modules take it
    for m in (a, b):
        m[4].weight.data = m[4].weight.data.t().contiguous().t()
    same("non-contiguous weight", chained=False)
    for m in (a, b):
        m[4].weight.data = m[4].weight.data.contiguous()
    # a parameter replaced by a new object
    w = nn.Parameter(randn(4, 7, gen=gen))
    a[4].weight, b[4].weight = w, nn.Parameter(w.detach().clone())
    same("parameter replaced")
    # a frozen bias, then trainable again
    for m in (a, b):
        m[0].bias.requires_grad_(False)
    same("frozen bias", chained=False)
    for m in (a, b):
        m[0].bias.requires_grad_(True)
    same("trainable again")
    # another thread count: an 'auto' layer's measured choice is per thread count
    for m in (a, b):
        m[0].mode = "auto"
    _run(a, x, y), _run(b, x, y)  # (its first call measures, through the modules)
    same("auto")
    n = torch.get_num_threads()
    torch.set_num_threads(1 if n > 1 else 2)
    try:
        assert not _chained(a, x)  # no choice for this count yet: the modules again
        same("other thread count")
    finally:
        torch.set_num_threads(n)
    # measured choices forgotten: the 'auto' layer measures again, through the modules
    stnn.clear_cache()
    assert not _chained(a, x)
    same("choices cleared")
    # a state dict loaded by assignment (new parameter and buffer objects)
    sd = copy.deepcopy(b.state_dict())
    a.load_state_dict(sd, assign=True)
    b.load_state_dict(copy.deepcopy(sd), assign=True)
    same("state dict assigned")


def test_prepared_call_follows_neq_freezing(gen):
    """A DenseNEqLinear's frozen set changed after the chain prepared its call (set_active
    replaces the active buffer): the next calls use the new set."""
    a, b = _neq_pair(gen, (12, 9, 4), actives=[None, None])
    x, y = randn(6, 12, gen=gen), torch.randint(0, 4, (6,), generator=gen)
    for act in (None, torch.tensor([True, False] * 4 + [True]), torch.tensor([False] * 8 + [True]), None):
        for m in (a, b):
            m[0].set_active(act)
        for _ in range(3):
            assert _chained(a, x)
            _assert_same(a, b, _run(a, x, y), _run(b, x, y), f"active {act}")
