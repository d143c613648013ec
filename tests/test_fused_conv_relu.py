"""relu(sparse_conv2d(...)) as one op and one autograd node: ``sparse_conv2d_relu`` and
``sparsify(..., fuse_relu=True)`` on SparseConv2d.

* the op equals torch.relu of sparse_conv2d bit for bit (the same tiles, clipped as they
  are written) and the reference within tolerance, over the conv geometries of
  test_sparse_conv, sparsity 0-100%, both float dtypes, frozen channels and a
  channels-last input; NaN pre-activations stay NaN;
* opcheck and float64 gradcheck; every gradient bit-identical to the unfused pair's;
* the module level: a fused Conv-4-like model computes exactly what the unfused one does
  on the sparse and the dense path, densify puts the nn.ReLU back, NEq refuses it.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import FLOATS, ST, make_active, make_mask, randn
from test_sparse_conv import GEOMS, SPARSITIES, _geom_id, close, make_conv
from torch import nn

import sparseticket.nn as stnn
from sparseticket.neq import NEqConfig, NEqTracker
from sparseticket.ops import reference as ref


def _args(t, x, bias, active, conf):
    return (x, t.values, t.crow, t.col, t.ccol, t.row, t.perm, bias, active, *conf)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("geom", GEOMS, ids=_geom_id)
def test_forward_equals_relu_of_the_plain_op(geom, sparsity, dtype, gen):
    w, mask, t, x, bias, conf = make_conv(geom, sparsity, dtype, gen)
    args = _args(t, x, bias, make_active(w.shape[0], gen), conf)
    out = ST.sparse_conv2d_relu(*args)
    pre = ST.sparse_conv2d(*args)
    assert torch.equal(out, torch.relu(pre))
    close(out, torch.relu(ref.reference_sparse_conv2d(*args)), dtype, "sparse_conv2d_relu vs reference")
    assert out.is_contiguous() and bool((out >= 0).all())
    if sparsity < 1.0:  # the ReLU really clipped something here
        assert bool((pre < 0).any())


@pytest.mark.parametrize("dtype", FLOATS)
def test_channels_last_input_and_no_bias(dtype, gen):
    w, mask, t, x, bias, conf = make_conv(GEOMS[9], 0.7, dtype, gen)
    xc = x.contiguous(memory_format=torch.channels_last)
    assert not xc.is_contiguous()
    out = ST.sparse_conv2d_relu(*_args(t, xc, None, None, conf))
    assert torch.equal(out, ST.sparse_conv2d_relu(*_args(t, x, None, None, conf)))
    close(out, torch.relu(F.conv2d(x, w, None, *conf[1:])), dtype, "channels-last input")


@pytest.mark.parametrize("dtype", FLOATS)
def test_nan_stays_nan(dtype, gen):
    """torch.relu(NaN) is NaN: the fused ReLU must not turn a NaN pre-activation into 0."""
    w, mask, t, x, bias, conf = make_conv(GEOMS[0], 0.5, dtype, gen)
    bias[3] = float("nan")
    out = ST.sparse_conv2d_relu(*_args(t, x, bias, None, conf))
    assert bool(out[:, 3].isnan().all())
    others = torch.cat([out[:, :3], out[:, 4:]], 1)
    assert not bool(others.isnan().any()) and bool((others >= 0).all())


def _rg(a):
    return a.detach().clone().requires_grad_()


def test_opcheck(gen):
    D = torch.float64
    w, mask, t, x, bias, conf = make_conv((2, 3, 4, 5, 6, 3, 1, 1, 1), 0.5, D, gen)
    _, _, t2, x2, _, conf2 = make_conv((2, 3, 4, 7, 5, 3, 2, 0, 1), 0.5, D, gen)
    _, _, te, _, _, _ = make_conv((2, 3, 4, 5, 6, 3, 1, 1, 1), 1.0, D, gen)
    act = torch.tensor([True, False, True, False])
    for args in [_args(t, x, bias, act, conf), _args(t, _rg(x), _rg(bias), act, conf),
                 (_rg(x), _rg(t.values), t.crow, t.col, t.ccol, t.row, t.perm, _rg(bias), act, *conf),
                 (_rg(x2), _rg(t2.values), t2.crow, t2.col, t2.ccol, t2.row, t2.perm, None, None, *conf2),
                 (_rg(x), _rg(te.values), te.crow, te.col, te.ccol, te.row, te.perm, _rg(bias), None, *conf)]:
        torch.library.opcheck(ST.sparse_conv2d_relu.default, args)


@pytest.mark.parametrize("geom", [(2, 3, 4, 5, 6, 3, 1, 1, 1), (2, 3, 4, 7, 5, 3, 2, 1, 1),
                                  (1, 2, 3, 6, 7, (2, 3), (1, 2), (1, 0), 2)], ids=_geom_id)
def test_gradcheck(geom, gen):
    w, mask, t, x, bias, conf = make_conv(geom, 0.5, torch.float64, gen)
    tl = (t.crow, t.col, t.ccol, t.row, t.perm)
    pre = ST.sparse_conv2d(x, t.values, *tl, bias, None, *conf)
    if bool((pre.abs() < 1e-3).any()):  # finite differences across the kink would be meaningless
        pytest.skip("a pre-activation lies at the ReLU's kink")

    def f(x, v, b):
        return ST.sparse_conv2d_relu(x, v, *tl, b, None, *conf)

    assert torch.autograd.gradcheck(f, (_rg(x), _rg(t.values), _rg(bias)))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("geom", [GEOMS[1], GEOMS[6], GEOMS[9]], ids=_geom_id)
def test_grads_equal_unfused(geom, sparsity, dtype, gen):
    """Output and every gradient equal, bit for bit, those through sparse_conv2d then torch.relu."""
    w, mask, t, x, bias, conf = make_conv(geom, sparsity, dtype, gen)
    active = make_active(w.shape[0], gen)
    gy = None
    got = []
    for fused in (True, False):
        xi, vi, bi = _rg(x), _rg(t.values), _rg(bias)
        args = (xi, vi, t.crow, t.col, t.ccol, t.row, t.perm, bi, active, *conf)
        y = ST.sparse_conv2d_relu(*args) if fused else torch.relu(ST.sparse_conv2d(*args))
        gy = randn(y.shape, dtype=dtype, gen=gen) if gy is None else gy
        got.append((y.detach(),) + torch.autograd.grad(y, (xi, vi, bi), gy))
    for k, (a, e) in enumerate(zip(*got)):
        assert torch.equal(a, e), ("y", "gx", "gvalues", "gbias")[k]


# ----------------------------------------------------------------------------- modules


def _convnet(gen):
    torch.manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=gen)))
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, stride=2), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(20, 7), nn.ReLU(), nn.Linear(7, 3))


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_fused_model_equals_unfused(mode, gen):
    m = _convnet(gen)
    masks = {n: make_mask(mod.weight.shape[0], mod.weight[0].numel(), 0.6, gen).view(mod.weight.shape)
             for n, mod in m.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))}
    a = stnn.sparsify(copy.deepcopy(m), masks=masks, mode=mode)
    b = stnn.sparsify(copy.deepcopy(m), masks=masks, mode=mode, fuse_relu=True)
    assert [type(c).__name__ for c in b][:4] == ["SparseConv2d", "FusedReLU", "SparseConv2d", "FusedReLU"]
    assert b[0].activation == "relu" and b[2].activation == "relu" and b[8].activation is None
    assert "activation=relu" in repr(b[0])
    assert a.state_dict().keys() == b.state_dict().keys()
    x, y = randn(4, 2, 10, 10, gen=gen), torch.randint(0, 3, (4,), generator=gen)
    la, lb = F.cross_entropy(a(x), y), F.cross_entropy(b(x), y)
    ga = torch.autograd.grad(la, list(a.parameters()))
    gb = torch.autograd.grad(lb, list(b.parameters()))
    assert torch.equal(la, lb)
    assert all(torch.equal(u, v) for u, v in zip(ga, gb))
    assert [b[i].last_path for i in (0, 2)] == [mode] * 2


def _poolnet(gen):
    """A conv, its ReLU and sparseticket's MaxPool2d in a row (the model registry's Conv
    nets), then a conv whose ReLU is followed by torch's nn.MaxPool2d."""
    torch.manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=gen)))
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), stnn.MaxPool2d(2), nn.Conv2d(6, 5, 3), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(5, 3))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_relu_moved_after_the_pool_is_exact(mode, dtype, channels_last, gen):
    """conv -> ReLU -> MaxPool2d: the pool applies the ReLU (relu_after); outputs, losses
    and every gradient bit-identical to the unfused model over optimizer steps."""
    m = _poolnet(gen).to(dtype)
    masks = {n: make_mask(mod.weight.shape[0], mod.weight[0].numel(), 0.5, gen).view(mod.weight.shape)
             for n, mod in m.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))}
    a = stnn.sparsify(copy.deepcopy(m), masks=masks, mode=mode)
    b = stnn.sparsify(copy.deepcopy(m), masks=masks, mode=mode, fuse_relu=True)
    assert type(b[1]) is stnn.FusedReLU and b[0].activation is None and b[2].relu_after
    assert b[3].activation == "relu" and type(b[4]) is stnn.FusedReLU  # (torch's pool: the conv applies it)
    assert "relu_after=True" in repr(b[2]) and a.state_dict().keys() == b.state_dict().keys()
    oa = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    ob = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        x = randn(4, 2, 8, 8, dtype=dtype, gen=gen)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 3, (4,), generator=gen)
        la, lb = F.cross_entropy(a(x), y), F.cross_entropy(b(x), y)
        assert torch.equal(la, lb)
        oa.zero_grad()
        ob.zero_grad()
        la.backward()
        lb.backward()
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(a.parameters(), b.parameters()))
        oa.step()
        ob.step()
    stnn.densify(b)
    assert type(b[1]) is nn.ReLU and not b[2].relu_after and type(b[4]) is nn.ReLU
    x = randn(4, 2, 8, 8, dtype=dtype, gen=gen)
    with torch.no_grad():
        assert torch.equal(b(x), stnn.densify(a)(x))


def test_densify_restores_relu_and_neq_refuses(gen):
    m = _convnet(gen)
    x = randn(3, 2, 10, 10, gen=gen)
    stnn.sparsify(m, amount=0.5, fuse_relu=True, mode="sparse")
    y = m(x)
    with pytest.raises(ValueError, match="fused relu"):
        NEqTracker(m, x, NEqConfig())
    stnn.densify(m)
    assert [type(c) for c in m][:4] == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU]
    close(m(x), y, torch.float32, "densified")


def test_grouped_conv_and_frozen_channels_fused(gen):
    """groups > 1 (im2col path, torch.relu after the op) and frozen channels (NEq's active)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.ReLU())
    a = stnn.sparsify(copy.deepcopy(m), amount=0.5, mode="sparse", scope="layerwise")
    b = stnn.sparsify(copy.deepcopy(m), amount=0.5, mode="sparse", scope="layerwise", fuse_relu=True)
    for net in (a, b):
        net[2].set_active(torch.tensor([True, False, True, True, False]))
    assert b[0].activation == "relu" and b[2].activation == "relu"
    x = randn(3, 4, 9, 9, gen=gen).contiguous(memory_format=torch.channels_last)
    ya, yb = a(x), b(x)
    assert torch.equal(ya, yb)
    ga = torch.autograd.grad(ya.square().sum(), list(a.parameters()))
    gb = torch.autograd.grad(yb.square().sum(), list(b.parameters()))
    assert all(torch.equal(u, v) for u, v in zip(ga, gb))


def test_saved_output_does_not_keep_itself_alive(gen):
    import gc
    import weakref
    w, mask, t, x, bias, conf = make_conv(GEOMS[0], 0.5, torch.float32, gen)
    y = ST.sparse_conv2d_relu(_rg(x), _rg(t.values), t.crow, t.col, t.ccol, t.row, t.perm, _rg(bias), None, *conf)
    ref_y = weakref.ref(y)
    del y
    gc.collect()
    assert ref_y() is None


def test_set_activation_forgets_measured_choices(gen):
    m = stnn.sparsify(_convnet(gen), amount=0.5, mode="auto")
    x = randn(2, 2, 10, 10, gen=gen)
    m(x)
    assert m[0]._choice is not None
    m[0].set_activation("relu")
    assert m[0]._choice is None and m[0].__dict__.get("_fast_choice") is None
    key = m[0]._key(x)
    m[0].set_activation(None)
    assert m[0]._key(x) != key  # fused and unfused layers are measured separately


def test_compiled_fused_conv_matches_eager(gen):
    m = stnn.sparsify(_convnet(gen), amount=0.6, mode="sparse", fuse_relu=True)
    x = randn(3, 2, 10, 10, gen=gen)
    torch._dynamo.reset()
    out = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    out.sum().backward()
    g = [p.grad.clone() for p in m.parameters()]
    m.zero_grad(set_to_none=True)
    expected = m(x)
    expected.sum().backward()
    close(out, expected, torch.float32, "compiled forward")
    for k, p in enumerate(m.parameters()):
        close(g[k], p.grad, torch.float32, f"compiled grad {k}")


def test_every_op_has_a_compiled_cpu_kernel():
    """A build older than the Python package runs the missing ops' references (and warns);
    this build must not be one."""
    from sparseticket import ops
    if ops._C is None:
        pytest.skip("compiled kernels not built")
    assert ops.STALE_OPS == []


def test_relu_after_with_indices_and_not_fused_for_them(gen):
    x = randn(2, 3, 6, 6, gen=gen)
    pool = stnn.MaxPool2d(2, return_indices=True)
    pool.relu_after = True  # (by hand: sparsify never fuses a pool that returns indices)
    x[0, 0, :2, :2] = -torch.rand(2, 2) - 0.1  # a window of negative values: its index is the first's
    y, idx = pool(x)
    ry, ridx = nn.MaxPool2d(2, return_indices=True)(torch.relu(x))
    assert torch.equal(y, ry) and torch.equal(idx, ridx)  # (review 50: the indices were not compared)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), stnn.MaxPool2d(2, return_indices=True))
    stnn.sparsify(m, amount=0.5, fuse_relu=True)
    assert m[0].activation == "relu" and not m[2].relu_after
