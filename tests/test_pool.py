"""The 2x2, stride-2 max-pool (``max_pool2x2`` / ``max_pool2x2_backward``) and
``sparseticket.nn.MaxPool2d``.

* the op returns what ``F.max_pool2d(x, 2)`` does bit for bit (values; on ties, -inf and
  NaNs the same element kept) and what the reference says ``where`` is, over odd and
  minimal sizes, empty batches and channels, both float dtypes, non-contiguous inputs;
* its backward is aten's gradient bit for bit (a -0 gradient lands as +0, the odd last
  row and column get 0); opcheck, float64 gradcheck, torch.compile;
* the module equals nn.MaxPool2d, forward and backward, and falls back to it for every
  configuration the kernel does not cover; bad input gets a clear error.
"""
import pytest
import torch
import torch.nn.functional as F
from helpers import FLOATS, ST, run_under_isa
from torch import nn

import sparseticket.nn as stnn
from sparseticket import ops
from sparseticket.ops import reference as ref

SHAPES = [(2, 3, 7, 9), (1, 1, 2, 2), (3, 5, 28, 28), (2, 2, 33, 65), (1, 2, 5, 3), (2, 4, 14, 14), (1, 3, 2, 40),
          (0, 3, 6, 6), (2, 0, 6, 6), (1, 1, 3, 35)]


def _input(shape, dtype, seed=0):
    """Random values with ties (many exact 0.25s and 0s), -0.0, -inf and NaNs in some windows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype)
    u = torch.rand(shape, generator=g)
    x[u < 0.2] = 0.25
    x[(u >= 0.2) & (u < 0.3)] = 0.0
    x[(u >= 0.3) & (u < 0.35)] = -0.0
    x[(u >= 0.35) & (u < 0.38)] = float("-inf")
    x[(u >= 0.38) & (u < 0.41)] = float("nan")
    return x


def _same(a, b):
    """bitwise equal, NaNs included (torch.equal fails on NaN == NaN), -0.0 != 0.0; any dtype
    (helpers.bits takes float32/64 only; the fallback cases compare bf16 and int64 too)"""
    def raw(t):
        return t.contiguous().view(-1).view(torch.uint8) if t.numel() else t
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(raw(a), raw(b))


def _aten_grad(x, gy):
    xa = x.clone().requires_grad_()
    F.max_pool2d(xa, 2).backward(gy)
    return xa.grad


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_aten_bitwise(shape, dtype):
    x = _input(shape, dtype)
    y, where = ST.max_pool2x2(x)
    aten = shape[1] > 0  # (aten refuses C = 0)
    assert not aten or _same(y, F.max_pool2d(x, 2))
    y_ref, where_ref = ref.reference_max_pool2x2(x)
    assert _same(y, y_ref) and torch.equal(where, where_ref)
    assert where.dtype == torch.uint8 and (where.numel() == 0 or int(where.max()) <= 3)
    gy = torch.randn(y.shape, dtype=dtype)
    gy[gy > 1.0] = -0.0
    gx = ST.max_pool2x2_backward(gy, where, list(x.shape))
    assert not aten or _same(gx, _aten_grad(x, gy))
    assert _same(gx, ref.reference_max_pool2x2_backward(gy, where_ref, list(x.shape)))


def test_every_window_position_and_rule():
    """Each of the four positions wins somewhere; ties keep the first in (0,0),(0,1),(1,0),(1,1)
    order; a NaN anywhere wins, the last NaN of a window is the one kept (aten's rule)."""
    x = torch.tensor([[[[1., 0., 0., 2., 0., 0., 0., 0., 5., 5., float("nan"), 1., 1., float("nan")],
                        [0., 0., 0., 0., 3., 0., 0., 4., 5., 5., float("nan"), 9., float("nan"), 1.]]]])
    y, where = ST.max_pool2x2(x)
    assert where.flatten().tolist() == [0, 1, 2, 3, 0, 2, 2]
    assert _same(y, F.max_pool2d(x, 2))
    assert torch.isnan(y[0, 0, 0, 5:]).all()


def test_non_contiguous_inputs():
    x = _input((3, 6, 16, 18), torch.float32)
    for view in (x.transpose(2, 3), x[:, ::2], x.contiguous(memory_format=torch.channels_last), x[..., 1:]):
        # (the op's outputs are NCHW-contiguous whatever x is; the module keeps nn's format)
        y, where = ST.max_pool2x2(view)
        assert _same(y, F.max_pool2d(view, 2).contiguous())
        gy = torch.randn(y.shape).transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous gy too
        gx = ST.max_pool2x2_backward(gy, where, list(view.shape))
        assert _same(gx, _aten_grad(view.contiguous(), gy.contiguous()))


def test_opcheck_and_gradcheck():
    # distinct values: the argmax is stable under gradcheck's perturbations
    xd = (torch.randperm(2 * 3 * 7 * 10).double().view(2, 3, 7, 10) / 10).requires_grad_()
    # inputs that require grad, so opcheck also checks the autograd registration and the
    # compiled (AOTAutograd) backward, of the op and of its backward
    torch.library.opcheck(ST.max_pool2x2.default, (xd,))
    torch.library.opcheck(ST.max_pool2x2.default, (torch.randn(2, 3, 7, 10),))
    y, where = ST.max_pool2x2(xd.detach())
    gy = torch.randn_like(y).requires_grad_()
    torch.library.opcheck(ST.max_pool2x2_backward.default, (gy, where, list(xd.shape)))
    assert torch.autograd.gradcheck(lambda t: ST.max_pool2x2(t)[0], (xd,))
    assert torch.autograd.gradgradcheck(lambda t: ST.max_pool2x2(t)[0], (xd,))


@pytest.mark.parametrize("dtype", FLOATS)
def test_module_matches_nn(dtype):
    x = _input((4, 5, 13, 12), dtype, seed=1)
    gy = torch.randn(4, 5, 6, 6, dtype=dtype)
    ours, theirs = stnn.MaxPool2d(2), nn.MaxPool2d(2)
    assert isinstance(ours, nn.MaxPool2d) and repr(ours) == repr(theirs)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    assert _same(ya, yb)
    ya.backward(gy)
    yb.backward(gy)
    assert _same(xa.grad, xb.grad)


def test_module_keeps_the_memory_format():
    """A channels-last input stays channels-last, as nn.MaxPool2d returns it (aten's own
    channels-last pool is vectorised; the kernel is for NCHW only)."""
    x = _input((2, 8, 10, 12), torch.float32).contiguous(memory_format=torch.channels_last)
    gy = torch.randn(2, 8, 5, 6)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = stnn.MaxPool2d(2)(xa), nn.MaxPool2d(2)(xb)
    assert ya.is_contiguous(memory_format=torch.channels_last) and ya.stride() == yb.stride()
    assert _same(ya, yb)
    ya.backward(gy)
    yb.backward(gy)
    assert _same(xa.grad, xb.grad) and xa.grad.stride() == xb.grad.stride()


@pytest.mark.skipif(ops.BACKENDS.get("cpu") != "c++", reason="compiled kernels not built")
def test_module_uses_the_kernel_only_where_it_applies(monkeypatch):
    calls = []
    real = torch.ops.sparseticket.max_pool2x2

    class Spy:
        def __call__(self, x):
            calls.append(tuple(x.shape))
            return real(x)

    import sparseticket.nn.pool as pool
    monkeypatch.setattr(pool.torch.ops.sparseticket, "max_pool2x2", Spy(), raising=False)
    x = _input((2, 3, 9, 8), torch.float32)
    stnn.MaxPool2d(2)(x)
    stnn.MaxPool2d((2, 2), stride=(2, 2))(x)
    assert len(calls) == 2
    for kw in (dict(kernel_size=3), dict(kernel_size=2, stride=1), dict(kernel_size=2, padding=1),
               dict(kernel_size=2, dilation=2), dict(kernel_size=2, ceil_mode=True),
               dict(kernel_size=2, return_indices=True)):
        a, b = stnn.MaxPool2d(**kw)(x), nn.MaxPool2d(**kw)(x)
        if isinstance(a, tuple):
            assert all(_same(p, q) for p, q in zip(a, b))
        else:
            assert _same(a, b), kw
    for other in (x[0], x.to(torch.bfloat16), x[:, :, :1], x.contiguous(memory_format=torch.channels_last),
                  x.transpose(2, 3)):
        if other.shape[-2] >= 2:
            assert _same(stnn.MaxPool2d(2)(other), nn.MaxPool2d(2)(other))
        else:
            with pytest.raises(RuntimeError):
                stnn.MaxPool2d(2)(other)
    assert len(calls) == 2


def test_compile_matches_eager():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), stnn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 16, 5))
    x = torch.randn(6, 3, 8, 8)
    compiled = torch.compile(model, fullgraph=True)
    ya, yb = model(x), compiled(x)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    ya.sum().backward()
    ga = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    yb.sum().backward()
    for a, p in zip(ga, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-6)


def test_bad_input():
    with pytest.raises(RuntimeError, match="smaller than the 2x2 window"):
        ST.max_pool2x2(torch.randn(1, 2, 1, 5))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ST.max_pool2x2(torch.ones(1, 1, 4, 4, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="4-D"):
        ST.max_pool2x2(torch.randn(4, 4))
    y, where = ST.max_pool2x2(torch.randn(1, 2, 4, 6))
    with pytest.raises(RuntimeError, match="uint8"):
        ST.max_pool2x2_backward(y, where.long(), [1, 2, 4, 6])
    with pytest.raises(RuntimeError, match="gives"):
        ST.max_pool2x2_backward(y, where, [1, 2, 8, 6])


def test_models_use_it():
    from sparseticket.lottery.models import get_model
    net = get_model("conv4", input_shape=(1, 28, 28), num_classes=10)
    pools = [m for m in net.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 2 and all(isinstance(m, stnn.MaxPool2d) for m in pools)


@pytest.mark.parametrize("isa", ["avx2", "base"])
def test_other_isas(isa):
    """The kernel is compiled per ISA like the convolution's (conv.inl): the AVX2 and
    portable builds keep aten's values, kept elements and gradients too."""
    code = r"""
import torch, torch.nn.functional as F, sys
sys.path.insert(0, sys.argv[1])
from sparseticket import _C
assert _C.cpu_isa() == sys.argv[2], _C.cpu_isa()
from test_pool import SHAPES, _input, _same, _aten_grad
ST = torch.ops.sparseticket
for dtype in (torch.float32, torch.float64):
    for shape in SHAPES:
        if shape[1] == 0:
            continue
        x = _input(shape, dtype)
        y, where = ST.max_pool2x2(x)
        assert _same(y, F.max_pool2d(x, 2)), shape
        gy = torch.randn(y.shape, dtype=dtype)
        assert _same(ST.max_pool2x2_backward(gy, where, list(x.shape)), _aten_grad(x, gy)), shape
print("ok")
"""
    run_under_isa(code, isa)
