"""Autograd of sparse_linear and neq_linear.

* gradcheck in float64 w.r.t. every differentiable input, with and without frozen rows;
* the sparse gradients against a plain dense layer with the masked weight (autograd,
  then the weight gradient gathered at kept positions), in both float dtypes;
* frozen rows (``active == False``) get value/bias gradients that are exactly 0, while
  the input gradient still flows through them.
"""
import pytest
import torch
import torch.nn.functional as F
from helpers import FLOATS, ST, assert_close, lay, make_active, make_mask, make_ticket, masked_dense_grads, randn

import sparseticket

D = torch.float64
MASKS = [(0.0, False), (0.5, True), (0.9, False), (1.0, False)]
MASK_IDS = ["s0.0", "s0.5-holes", "s0.9", "s1.0"]


def _some_frozen(O, gen):
    """An active mask with at least one active and one frozen row when O >= 2."""
    a = make_active(O, gen)
    if O >= 2:
        a[0], a[-1] = True, False
    return a


def _sl(x, values, t, bias, active):
    return ST.sparse_linear(x, values, t.crow, t.col, t.ccol, t.row, t.perm, bias, active)


# ----------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("sparsity,holes", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("B,I,O", [(3, 5, 4), (1, 1, 1), (0, 3, 2), (4, 7, 1), (2, 1, 6)])
def test_gradcheck_sparse_linear(B, I, O, sparsity, holes, with_bias, gen):
    w, mask = randn(O, I, dtype=D, gen=gen), make_mask(O, I, sparsity, gen, holes=holes)
    t = make_ticket(w, mask)
    x = randn(B, I, dtype=D, gen=gen).requires_grad_()
    v = t.values.clone().requires_grad_()
    b = randn(O, dtype=D, gen=gen).requires_grad_() if with_bias else None
    inputs = (x, v, b) if with_bias else (x, v)
    assert torch.autograd.gradcheck(lambda x, v, b=None: _sl(x, v, t, b, None), inputs)


@pytest.mark.parametrize("sparsity,holes", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("B,I,O", [(3, 5, 4), (4, 7, 6), (2, 3, 2)])
def test_gradcheck_sparse_linear_frozen_rows(B, I, O, sparsity, holes, gen):
    """Frozen rows' values and bias are constants of the function gradchecked; only the
    active ones (and x, through every row) are inputs."""
    w, mask = randn(O, I, dtype=D, gen=gen), make_mask(O, I, sparsity, gen, holes=holes)
    t = make_ticket(w, mask)
    active = _some_frozen(O, gen)
    act_v = active[mask.nonzero()[:, 0]]  # per kept value, row-major like values
    vi, bi = act_v.nonzero()[:, 0], active.nonzero()[:, 0]
    v0, b0 = t.values.clone(), randn(O, dtype=D, gen=gen)

    def f(x, v_act, b_act):
        v = v0.index_put((vi,), v_act)
        b = b0.index_put((bi,), b_act)
        return _sl(x, v, t, b, active)

    x = randn(B, I, dtype=D, gen=gen).requires_grad_()
    assert torch.autograd.gradcheck(f, (x, v0[vi].clone().requires_grad_(), b0[bi].clone().requires_grad_()))

    # and the frozen entries' gradients are exactly zero, not merely small
    v, b = v0.clone().requires_grad_(), b0.clone().requires_grad_()
    _sl(x, v, t, b, active).pow(2).sum().backward()
    assert torch.equal(v.grad[~act_v], torch.zeros_like(v.grad[~act_v]))
    assert torch.equal(b.grad[~active], torch.zeros_like(b.grad[~active]))
    assert b.grad[active].abs().sum() > 0 or B == 0


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("B,I,O", [(3, 5, 4), (1, 1, 1), (0, 3, 2), (4, 7, 1)])
def test_gradcheck_neq_linear(B, I, O, with_bias, gen):
    x = randn(B, I, dtype=D, gen=gen).requires_grad_()
    w = randn(O, I, dtype=D, gen=gen).requires_grad_()
    b = randn(O, dtype=D, gen=gen).requires_grad_() if with_bias else None
    inputs = (x, w, b) if with_bias else (x, w)
    assert torch.autograd.gradcheck(lambda x, w, b=None: ST.neq_linear(x, w, b, None), inputs)


@pytest.mark.parametrize("B,I,O", [(3, 5, 4), (4, 7, 6), (1, 2, 2)])
def test_gradcheck_neq_linear_frozen_rows(B, I, O, gen):
    active = _some_frozen(O, gen)
    ri = active.nonzero()[:, 0]
    w0, b0 = randn(O, I, dtype=D, gen=gen), randn(O, dtype=D, gen=gen)

    def f(x, w_act, b_act):
        return ST.neq_linear(x, w0.index_put((ri,), w_act), b0.index_put((ri,), b_act), active)

    x = randn(B, I, dtype=D, gen=gen).requires_grad_()
    assert torch.autograd.gradcheck(f, (x, w0[ri].clone().requires_grad_(), b0[ri].clone().requires_grad_()))

    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    ST.neq_linear(x, w, b, active).pow(2).sum().backward()
    assert torch.equal(w.grad[~active], torch.zeros_like(w.grad[~active]))
    assert torch.equal(b.grad[~active], torch.zeros_like(b.grad[~active]))


# ----------------------------------------------------------------------------- vs masked dense


@pytest.mark.parametrize("layout", ["contiguous"])
@pytest.mark.parametrize("active_kind", [None, "random"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("sparsity,holes", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("B,I,O", [(1, 1, 1), (3, 5, 31), (17, 31, 5), (33, 64, 257), (0, 5, 4), (130, 257, 64)])
def test_sparse_linear_grads_match_masked_dense(B, I, O, sparsity, holes, dtype, active_kind, layout, gen):
    w, mask = randn(O, I, dtype=dtype, gen=gen), make_mask(O, I, sparsity, gen, holes=holes)
    t = make_ticket(w, mask)
    active = None if active_kind is None else make_active(O, gen, active_kind)
    x = lay(randn(B, I, dtype=dtype, gen=gen), layout).requires_grad_()
    v = t.values.clone().requires_grad_()
    b = randn(O, dtype=dtype, gen=gen).requires_grad_()
    gy = lay(randn(B, O, dtype=dtype, gen=gen), layout)

    y = sparseticket.sparse_linear(x, t, b, active, values=v)
    y.backward(gy)
    gx_d, gw_d, gb_d = masked_dense_grads(x, w, mask, b, gy)

    wm = w * mask.to(dtype)
    assert_close(y, F.linear(x, wm, b), F.linear(x.abs(), wm.abs(), b.abs()), what="forward")
    assert_close(x.grad, gx_d, gy.abs() @ wm.abs(), what="grad x")  # frozen rows still pass gradient
    rows = mask.nonzero()[:, 0]
    gv_d, mag_v = gw_d[mask], (gy.abs().t() @ x.abs())[mask]
    gb_mag = gy.abs().sum(0)
    if active is not None:
        gv_d = torch.where(active[rows], gv_d, torch.zeros_like(gv_d))
        gb_d = torch.where(active, gb_d, torch.zeros_like(gb_d))
        assert (v.grad[~active[rows]] == 0).all() and (b.grad[~active] == 0).all()
    assert_close(v.grad, gv_d, mag_v, what="grad values")
    assert_close(b.grad, gb_d, gb_mag, what="grad bias")


@pytest.mark.parametrize("layout,active_kind", [("transposed", "random"), ("strided", "random"),
                                                ("contiguous", "none"), ("contiguous", "all")])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("B,I,O", [(3, 5, 31), (33, 64, 17)])
def test_sparse_linear_grads_layouts_and_extreme_active(B, I, O, dtype, layout, active_kind, gen):
    """Non-contiguous x / grad_output, and layers with every neuron frozen or active."""
    test_sparse_linear_grads_match_masked_dense(B, I, O, 0.5, True, dtype, active_kind, layout, gen)


@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("wrt", ["x", "values", "bias", "x+bias", "values+bias", "x+values"])
@pytest.mark.parametrize("dtype", FLOATS)
def test_sparse_linear_partial_grads(wrt, dtype, relu, gen):
    """Only the requested gradients are computed, and they are still right: with the kept
    values among them the backward is one sparse_linear_backward call, without them the
    separate ops; the ReLU-fused op masks gy by its output either way."""
    B, I, O = 9, 31, 17
    w, mask = randn(O, I, dtype=dtype, gen=gen), make_mask(O, I, 0.7, gen)
    t = make_ticket(w, mask)
    active = make_active(O, gen)
    x, v, b = randn(B, I, dtype=dtype, gen=gen), t.values.clone(), randn(O, dtype=dtype, gen=gen)
    inputs = {"x": x, "values": v, "bias": b}
    wanted = wrt.split("+")
    for k in wanted:
        inputs[k].requires_grad_()
    gy = randn(B, O, dtype=dtype, gen=gen)
    op = ST.sparse_linear_relu if relu else ST.sparse_linear
    y = op(x, v, t.crow, t.col, t.ccol, t.row, t.perm, b, active)
    y.backward(gy)
    if relu:
        gy = torch.where(y.detach() > 0, gy, torch.zeros_like(gy))
    gx_d, gw_d, gb_d = masked_dense_grads(x, w, mask, b, gy)
    got = {"x": x.grad, "values": v.grad, "bias": b.grad}
    rows = mask.nonzero()[:, 0]
    expected = {"x": gx_d, "values": torch.where(active[rows], gw_d[mask], torch.zeros(()).to(dtype)),
                "bias": torch.where(active, gb_d, torch.zeros(()).to(dtype))}
    for k, g in got.items():
        assert (g is None) == (k not in wanted), k
        if k in wanted:
            assert_close(g, expected[k], expected[k].abs() + 1, what=k)


@pytest.mark.parametrize("dtype", FLOATS)
def test_sparse_linear_leading_dims(dtype, gen):
    """functional.sparse_linear flattens leading dims: x [2, 3, I] -> [2, 3, O]."""
    I, O = 7, 5
    w, mask = randn(O, I, dtype=dtype, gen=gen), make_mask(O, I, 0.5, gen)
    t = make_ticket(w, mask)
    x = randn(2, 3, I, dtype=dtype, gen=gen).requires_grad_()
    v = t.values.clone().requires_grad_()
    y = sparseticket.sparse_linear(x, t, None, None, values=v)
    assert y.shape == (2, 3, O)
    gy = randn(2, 3, O, dtype=dtype, gen=gen)
    y.backward(gy)
    gx_d, gw_d, _ = masked_dense_grads(x.reshape(6, I), w, mask, None, gy.reshape(6, O))
    assert_close(x.grad, gx_d.reshape(2, 3, I), what="grad x")
    assert_close(v.grad, gw_d[mask], what="grad values")


@pytest.mark.parametrize("active_kind", [None, "random", "none"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("B,I,O", [(1, 1, 1), (3, 5, 31), (17, 31, 5), (33, 64, 257), (0, 5, 4)])
def test_neq_linear_grads_match_dense(B, I, O, dtype, active_kind, gen):
    active = None if active_kind is None else make_active(O, gen, active_kind)
    x = randn(B, I, dtype=dtype, gen=gen).requires_grad_()
    w = randn(O, I, dtype=dtype, gen=gen).requires_grad_()
    b = randn(O, dtype=dtype, gen=gen).requires_grad_()
    gy = randn(B, O, dtype=dtype, gen=gen)
    y = sparseticket.neq_linear(x, w, b, active)
    y.backward(gy)
    gx_d, gw_d, gb_d = masked_dense_grads(x, w, torch.ones(O, I, dtype=torch.bool), b, gy)
    assert_close(y, F.linear(x, w, b), F.linear(x.abs(), w.abs(), b.abs()), what="forward")
    assert_close(x.grad, gx_d, gy.abs() @ w.abs(), what="grad x")
    if active is not None:
        gw_d = gw_d * active[:, None].to(dtype)
        gb_d = torch.where(active, gb_d, torch.zeros_like(gb_d))
        assert (w.grad[~active] == 0).all() and (b.grad[~active] == 0).all()
    assert_close(w.grad, gw_d, gy.abs().t() @ x.abs(), what="grad weight")
    assert_close(b.grad, gb_d, gy.abs().sum(0), what="grad bias")


@pytest.mark.parametrize("dtype", FLOATS)
def test_neq_linear_bias_grad_frozen_exactly_zero(dtype, gen):
    """The bias gradient is the batch sum at active neurons, bit for bit, and exactly 0 at
    frozen ones even where that sum is NaN or inf (the CPU path zeroes them in place)."""
    B, I, O = 7, 5, 9
    active = torch.tensor([True, False, False, True, True, False, True, False, True])
    x = randn(B, I, dtype=dtype, gen=gen).requires_grad_()
    w = randn(O, I, dtype=dtype, gen=gen).requires_grad_()
    b = randn(O, dtype=dtype, gen=gen).requires_grad_()
    gy = randn(B, O, dtype=dtype, gen=gen)
    frozen = (~active).nonzero().flatten()
    gy[0, frozen[0]] = float("nan")
    gy[1, frozen[-1]] = float("inf")
    sparseticket.neq_linear(x, w, b, active).backward(gy)
    assert torch.equal(b.grad[active], gy.sum(0)[active])
    assert (b.grad[~active] == 0).all() and not b.grad[~active].signbit().any()


def _neq_bias_case():
    active = torch.tensor([True, False, False, True, True, False, True, False, True])
    g = torch.Generator().manual_seed(5)
    x, w, b = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((7, 5), (9, 5), (9,)))
    gy = torch.randn(7, 9, generator=g, dtype=torch.float64)
    gy[0, 1] = float("nan")
    gy[1, 7] = float("inf")
    return x, w.requires_grad_(), b.requires_grad_(), gy, active


def test_neq_linear_bias_grad_cpu_path_runs_no_where():
    """In eager CPU autograd the bias gradient is the masked_bias_grad op, whose CPU
    kernel zeroes the frozen entries by a loop: the backward runs no aten::where."""
    from sparseticket.ops import _C
    if _C is None:
        pytest.skip("compiled kernels not built")
    x, w, b, gy, active = _neq_bias_case()
    y = sparseticket.neq_linear(x, w, b, active)
    with torch.profiler.profile() as prof:
        y.backward(gy)
    names = {e.key for e in prof.key_averages()}
    assert "sparseticket::masked_bias_grad" in names and "aten::where" not in names, sorted(names)
    assert torch.equal(b.grad, torch.where(active, gy.sum(0), 0.0))


def test_neq_linear_bias_grad_traced_by_make_fx():
    """make_fx (a dispatch mode over real tensors) records the bias gradient as the
    masked_bias_grad op, so replaying the graph on other values gives 0 at frozen neurons
    (NaN and inf included), not an unmasked sum."""
    from torch.fx.experimental.proxy_tensor import make_fx
    x, w, b, gy, active = _neq_bias_case()

    def bias_grad(x, w, b, gy):
        return torch.autograd.grad(sparseticket.neq_linear(x, w, b, active), b, gy)[0]

    gm = make_fx(bias_grad)(x, w, b, torch.randn_like(gy))
    assert any(n.target is torch.ops.sparseticket.masked_bias_grad.default for n in gm.graph.nodes), gm.code
    got = gm(x, w, b, gy)
    assert torch.equal(got[active], gy.sum(0)[active])
    assert (got[~active] == 0).all() and not got[~active].signbit().any()
