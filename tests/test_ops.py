"""Every sparseticket op against its pure-PyTorch reference (``sparseticket.ops.reference``).

The op under test runs on whatever backend serves the CPU (C++ or reference); the
expected value always comes from calling the reference function directly, and each op's
ticket structure is built by the references too, so a failure points at one op.
Inputs cover odd shapes, sparsity 0-100%, empty rows/columns, an empty batch, both float
dtypes and non-contiguous layouts whose gaps hold NaN (see ``helpers.strided``).
"""
import os
import subprocess
import sys

import pytest
import torch
from helpers import (
    FLOATS,
    LAYOUTS,
    SPARSITIES,
    ST,
    assert_close,
    lay,
    make_active,
    make_case,
    make_mask,
    make_ticket,
    randn,
    ref,
    ref_ticket,
)

# (batch, in_features, out_features): every batch in {0, 1, 3, 17, 33, 130} and every
# feature size in {1, 5, 31, 64, 257} appears, on both sides.
SHAPES = [(1, 1, 1), (3, 5, 31), (17, 31, 5), (33, 64, 257), (130, 257, 64), (0, 31, 5), (17, 257, 1),
          (130, 1, 257), (33, 5, 64), (0, 1, 1)]
# (sparsity, holes): every sparsity on a random mask, plus masks with empty rows/columns
MASKS = [(s, False) for s in SPARSITIES] + [(0.0, True), (0.5, True)]
MASK_IDS = [f"s{s}" + ("-holes" if h else "") for s, h in MASKS]
# non-contiguous layouts are checked on fewer shapes (they multiply the count)
LAYOUT_SHAPES = [(1, 1, 1), (3, 5, 31), (17, 31, 5), (33, 64, 257), (0, 31, 5)]
NONCONTIG = [lay_ for lay_ in LAYOUTS if lay_ != "contiguous"]
ACTIVE_KINDS = [None, "random", "all", "none"]
OI_SHAPES = [(1, 1), (5, 31), (31, 5), (64, 257), (257, 64), (1, 257), (257, 1)]
# fewer masks where an op's sparse path is already covered by another test
FEW_MASKS = [(0.0, False), (0.9, False), (1.0, False), (0.5, True)]
FEW_MASK_IDS = ["s0.0", "s0.9", "s1.0", "s0.5-holes"]


SHAPE_IDS = ["B{}-I{}-O{}".format(*s) for s in SHAPES]
LAYOUT_SHAPE_IDS = ["B{}-I{}-O{}".format(*s) for s in LAYOUT_SHAPES]


def active_of(kind, O, gen):
    return None if kind is None else make_active(O, gen, kind)


# ----------------------------------------------------------------------------- ticket structure


@pytest.mark.parametrize("layout", ["contiguous"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("sparsity,holes", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("O,I", OI_SHAPES)
def test_dense_to_ticket(O, I, sparsity, holes, dtype, layout, gen):
    w = randn(O, I, dtype=dtype, gen=gen)
    mask = make_mask(O, I, sparsity, gen, holes=holes)
    w[~mask] = float("nan")  # pruned weights must never be read into values
    w, mask = lay(w, layout), lay(mask, layout)
    values, crow, col = ST.dense_to_ticket(w, mask)
    ev, ecrow, ecol = ref.reference_dense_to_ticket(w, mask)
    assert crow.dtype == torch.int32 and col.dtype == torch.int32 and values.dtype == dtype
    assert torch.equal(crow, ecrow), "crow"
    assert torch.equal(col, ecol), "col"
    assert torch.equal(values, ev), "values"  # a copy, so bit-exact
    assert values.numel() == int(mask.sum())


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("sparsity,holes", [(0.5, True), (0.9, False)], ids=["s0.5-holes", "s0.9"])
@pytest.mark.parametrize("O,I", [(1, 1), (5, 31), (257, 64)])
def test_dense_to_ticket_noncontiguous(O, I, sparsity, holes, dtype, layout, gen):
    test_dense_to_ticket(O, I, sparsity, holes, dtype, layout, gen)


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("sparsity,holes", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("O,I", OI_SHAPES)
def test_ticket_transpose(O, I, sparsity, holes, layout, gen):
    mask = make_mask(O, I, sparsity, gen, holes=holes)
    _, crow, col = ref.reference_dense_to_ticket(torch.zeros(O, I), mask)
    crow, col = lay(crow, layout), lay(col, layout)
    ccol, row, perm = ST.ticket_transpose(crow, col, I)
    eccol, erow, eperm = ref.reference_ticket_transpose(crow, col, I)
    assert ccol.dtype == row.dtype == perm.dtype == torch.int32
    assert torch.equal(ccol, eccol), "ccol"
    assert torch.equal(row, erow), "row"
    assert torch.equal(perm, eperm), "perm"


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("sparsity,holes", FEW_MASKS, ids=FEW_MASK_IDS)
@pytest.mark.parametrize("O,I", OI_SHAPES)
def test_ticket_to_dense(O, I, sparsity, holes, dtype, layout, gen):
    w = randn(O, I, dtype=dtype, gen=gen)
    mask = make_mask(O, I, sparsity, gen, holes=holes)
    t = ref_ticket(w, mask)
    values, crow, col = lay(t.values, layout), lay(t.crow, layout), lay(t.col, layout)
    out = ST.ticket_to_dense(values, crow, col, I)
    expected = ref.reference_ticket_to_dense(values, crow, col, I)
    assert torch.equal(out, expected)
    # and the reference agrees with the obvious definition, so the two are not both off
    assert torch.equal(expected, torch.where(mask, w, torch.zeros_like(w)))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("sparsity,holes", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("O,I", [(1, 1), (5, 31), (64, 257), (257, 1)])
def test_ticket_round_trip(O, I, sparsity, holes, dtype, gen):
    """Ticket.from_dense -> to_dense / mask() gives back the masked weight and the mask."""
    w = randn(O, I, dtype=dtype, gen=gen)
    mask = make_mask(O, I, sparsity, gen, holes=holes)
    t = make_ticket(w, mask)
    assert t.shape == (O, I) and t.nnz == int(mask.sum())
    assert t.density == pytest.approx(mask.sum().item() / (O * I))
    assert torch.equal(t.to_dense(), torch.where(mask, w, torch.zeros_like(w)))
    assert torch.equal(t.mask(), mask)
    eccol, erow, eperm = ref.reference_ticket_transpose(t.crow, t.col, I)
    assert torch.equal(t.ccol, eccol) and torch.equal(t.row, erow) and torch.equal(t.perm, eperm)
    # the CSC view lists the same weights: values[perm] in column-major order
    assert torch.equal(t.values[t.perm.long()], w.t()[mask.t()])


def test_ticket_from_dense_accepts_binary_float_mask(gen):
    w = randn(4, 6, gen=gen)
    mask = make_mask(4, 6, 0.5, gen)
    t = make_ticket(w, mask.to(torch.float32))
    assert torch.equal(t.mask(), mask)


# ----------------------------------------------------------------------------- matmuls


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("sparsity,holes", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("B,I,O", SHAPES, ids=SHAPE_IDS)
def test_spmm(B, I, O, sparsity, holes, dtype, with_bias, gen):
    c = make_case(B, I, O, sparsity, holes, dtype, gen)
    t, x, bias = c["t"], c["x"], c["bias"] if with_bias else None
    out = ST.spmm(x, t.values, t.crow, t.col, bias)
    expected = ref.reference_spmm(x, t.values, t.crow, t.col, bias)
    mag = ref.reference_spmm(x.abs(), t.values.abs(), t.crow, t.col, None if bias is None else bias.abs())
    assert_close(out, expected, mag, what="spmm")


@pytest.mark.parametrize("layout", NONCONTIG)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("B,I,O", LAYOUT_SHAPES, ids=LAYOUT_SHAPE_IDS)
def test_spmm_noncontiguous(B, I, O, dtype, layout, gen):
    c = make_case(B, I, O, 0.5, True, dtype, gen)
    t = c["t"]
    x, bias = lay(c["x"], layout, dense_only=True), lay(c["bias"], layout, dense_only=True)
    values, crow, col = lay(t.values, layout), lay(t.crow, layout), lay(t.col, layout)
    out = ST.spmm(x, values, crow, col, bias)
    expected = ref.reference_spmm(x, values, crow, col, bias)
    mag = ref.reference_spmm(x.abs(), values.abs(), crow, col, bias.abs())
    assert_close(out, expected, mag, what=f"spmm {layout}")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("sparsity,holes", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("B,I,O", SHAPES, ids=SHAPE_IDS)
def test_spmm_t(B, I, O, sparsity, holes, dtype, gen):
    c = make_case(B, I, O, sparsity, holes, dtype, gen)
    t, gy = c["t"], c["gy"]
    out = ST.spmm_t(gy, t.values, t.ccol, t.row, t.perm)
    expected = ref.reference_spmm_t(gy, t.values, t.ccol, t.row, t.perm)
    mag = ref.reference_spmm_t(gy.abs(), t.values.abs(), t.ccol, t.row, t.perm)
    assert_close(out, expected, mag, what="spmm_t")
    # gx = gy W for the dense masked W: ties the CSC reference to the CSR one
    assert_close(expected, gy @ torch.where(c["mask"], c["w"], torch.zeros_like(c["w"])), mag)


@pytest.mark.parametrize("layout", NONCONTIG)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("B,I,O", LAYOUT_SHAPES, ids=LAYOUT_SHAPE_IDS)
def test_spmm_t_noncontiguous(B, I, O, dtype, layout, gen):
    c = make_case(B, I, O, 0.5, True, dtype, gen)
    t = c["t"]
    gy = lay(c["gy"], layout, dense_only=True)
    values, ccol, row, perm = (lay(a, layout) for a in (t.values, t.ccol, t.row, t.perm))
    out = ST.spmm_t(gy, values, ccol, row, perm)
    expected = ref.reference_spmm_t(gy, values, ccol, row, perm)
    mag = ref.reference_spmm_t(gy.abs(), values.abs(), ccol, row, perm)
    assert_close(out, expected, mag, what=f"spmm_t {layout}")


# Shapes on the column-blocked SpMM path of the C++ kernels (ops_cpu.cpp spmm_k_block:
# panels of >= 4 vectors, more panel rows than one ~32 KB block, >= 10 entries per row
# and block): several 64-row blocks, a partial last column block, empty rows, more than
# one panel (B=70 in float64), for spmm and for spmm_t (where I and O swap roles).
BLOCKED_SHAPES = [(70, 300, 150), (40, 700, 97), (130, 257, 200)]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("sparsity,holes", [(0.0, False), (0.5, True), (0.8, False)], ids=["s0.0", "s0.5-holes", "s0.8"])
@pytest.mark.parametrize("B,I,O", BLOCKED_SHAPES, ids=["B{}-I{}-O{}".format(*s) for s in BLOCKED_SHAPES])
def test_spmm_column_blocked(B, I, O, sparsity, holes, dtype, gen):
    c = make_case(B, I, O, sparsity, holes, dtype, gen)
    t, x, gy, bias = c["t"], c["x"], c["gy"], c["bias"]
    out = ST.spmm(x, t.values, t.crow, t.col, bias)
    expected = ref.reference_spmm(x, t.values, t.crow, t.col, bias)
    mag = ref.reference_spmm(x.abs(), t.values.abs(), t.crow, t.col, bias.abs())
    assert_close(out, expected, mag, what="spmm blocked")
    out = ST.spmm_t(gy, t.values, t.ccol, t.row, t.perm)
    expected = ref.reference_spmm_t(gy, t.values, t.ccol, t.row, t.perm)
    mag = ref.reference_spmm_t(gy.abs(), t.values.abs(), t.ccol, t.row, t.perm)
    assert_close(out, expected, mag, what="spmm_t blocked")


@pytest.mark.parametrize("active_kind", [None, "random"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("sparsity,holes", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("B,I,O", SHAPES, ids=SHAPE_IDS)
def test_sddmm(B, I, O, sparsity, holes, dtype, active_kind, gen):
    c = make_case(B, I, O, sparsity, holes, dtype, gen)
    t, gy, x = c["t"], c["gy"], c["x"]
    active = active_of(active_kind, O, gen)
    out = ST.sddmm(gy, x, t.crow, t.col, active)
    expected = ref.reference_sddmm(gy, x, t.crow, t.col, active)
    mag = ref.reference_sddmm(gy.abs(), x.abs(), t.crow, t.col, None)
    assert_close(out, expected, mag, what="sddmm")
    if active is not None:
        frozen = ~active[c["mask"].nonzero()[:, 0]]  # per kept entry, row-major like values
        assert (out[frozen] == 0).all(), "frozen rows of sddmm must be exactly 0"


# Shapes on the L1-blocked SDDMM path of the C++ kernels (ops_cpu.cpp sddmm_blocking: X
# of at most 1 MB and more than one 32 KB block of X rows, density >= 30%): 64-row groups
# plus a partial one, a partial last block, the gradient row held in registers (B=60:
# 4 vectors; B=130 float32: 9) and not (B=300: 19 vectors > 16).
BLOCKED_SDDMM_SHAPES = [(60, 300, 150), (130, 257, 200), (300, 100, 80)]


@pytest.mark.parametrize("active_kind", [None, "random"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("sparsity,holes", [(0.0, False), (0.5, True), (0.65, False)], ids=["s0.0", "s0.5-holes", "s0.65"])
@pytest.mark.parametrize("B,I,O", BLOCKED_SDDMM_SHAPES, ids=["B{}-I{}-O{}".format(*s) for s in BLOCKED_SDDMM_SHAPES])
def test_sddmm_blocked(B, I, O, sparsity, holes, dtype, active_kind, gen):
    test_sddmm(B, I, O, sparsity, holes, dtype, active_kind, gen)


@pytest.mark.parametrize("active_kind", ["all", "none"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("sparsity,holes", FEW_MASKS, ids=FEW_MASK_IDS)
@pytest.mark.parametrize("B,I,O", LAYOUT_SHAPES, ids=LAYOUT_SHAPE_IDS)
def test_sddmm_all_or_none_active(B, I, O, sparsity, holes, dtype, active_kind, gen):
    test_sddmm(B, I, O, sparsity, holes, dtype, active_kind, gen)


@pytest.mark.parametrize("layout", NONCONTIG)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("B,I,O", LAYOUT_SHAPES, ids=LAYOUT_SHAPE_IDS)
def test_sddmm_noncontiguous(B, I, O, dtype, layout, gen):
    c = make_case(B, I, O, 0.5, True, dtype, gen)
    t = c["t"]
    gy, x = lay(c["gy"], layout, dense_only=True), lay(c["x"], layout, dense_only=True)
    crow, col, active = lay(t.crow, layout), lay(t.col, layout), lay(make_active(O, gen), layout)
    out = ST.sddmm(gy, x, crow, col, active)
    expected = ref.reference_sddmm(gy, x, crow, col, active)
    mag = ref.reference_sddmm(gy.abs(), x.abs(), crow, col, None)
    assert_close(out, expected, mag, what=f"sddmm {layout}")


def check_sparse_linear_backward(gy, y, x, t, active, input_grad, what):
    """sparse_linear_backward against its reference, and the reference against the separate
    ops' references (threshold, spmm_t, sddmm, batch sum) it must equal."""
    args = (gy, y, x, t.values, t.crow, t.col, t.ccol, t.row, t.perm, active, input_grad)
    gx, gv, gb = ST.sparse_linear_backward(*args)
    ex, ev, eb = ref.reference_sparse_linear_backward(*args)
    g = gy if y is None else torch.ops.aten.threshold_backward(gy, y, 0)
    assert_close(gx, ex, ref.reference_spmm_t(g.abs(), t.values.abs(), t.ccol, t.row, t.perm) if input_grad else None,
                 what=f"{what} gx")
    assert_close(gv, ev, ref.reference_sddmm(g.abs(), x.abs(), t.crow, t.col, None), what=f"{what} gvalues")
    assert_close(gb, eb, g.abs().sum(0), what=f"{what} gbias")
    I = t.ccol.numel() - 1
    assert gx.shape == ((g.shape[0], I) if input_grad else (0, I))
    if input_grad:
        assert_close(ex, ref.reference_spmm_t(g, t.values, t.ccol, t.row, t.perm), what=f"{what} reference gx")
    assert_close(ev, ref.reference_sddmm(g, x, t.crow, t.col, active), what=f"{what} reference gvalues")
    sums = g.sum(0)
    assert_close(eb, sums if active is None else torch.where(active, sums, torch.zeros_like(sums)),
                 what=f"{what} reference gbias")
    if active is not None:
        rows = t.crow.diff().long()
        frozen = ~active.repeat_interleave(rows)  # per kept entry, in values order
        assert (gv[frozen] == 0).all() and (gb[~active] == 0).all(), f"{what}: frozen rows must be exactly 0"


@pytest.mark.parametrize("input_grad", [True, False], ids=["gx", "nogx"])
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("active_kind", [None, "random"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("sparsity,holes", FEW_MASKS + [(0.5, False), (0.99, False)],
                         ids=FEW_MASK_IDS + ["s0.5", "s0.99"])
@pytest.mark.parametrize("B,I,O", SHAPES + [(60, 300, 150), (70, 300, 150)],
                         ids=SHAPE_IDS + ["B60-I300-O150", "B70-I300-O150"])
def test_sparse_linear_backward(B, I, O, sparsity, holes, dtype, active_kind, relu, input_grad, gen):
    """The fused backward of sparse_linear(_relu); B=60 shares one packing of gy between
    the input and the weight gradient (one panel of whole vectors), B=70 does not."""
    c = make_case(B, I, O, sparsity, holes, dtype, gen)
    x, t, gy = c["x"], c["t"], c["gy"]
    y = ref.reference_spmm(x, t.values, t.crow, t.col, c["bias"]).relu() if relu else None
    if y is not None and y.numel():
        y.view(-1)[::7] = float("nan")  # a NaN output passes gy, as threshold_backward does
    check_sparse_linear_backward(gy, y, x, t, active_of(active_kind, O, gen), input_grad, "sparse_linear_backward")


def test_sparse_linear_backward_after_two_forwards_with_data_write(gen):
    """Two forwards of the same x with a write through .data between them (no version
    bump, as an adversarial-training loop does): the backward uses the latest forward's x,
    not the first one's packing (ops_cpu.cpp: one memo entry per tensor)."""
    B, I, O = 60, 300, 150
    c = make_case(B, I, O, 0.5, False, torch.float32, gen)
    t, gy = c["t"], c["gy"]
    tl = (t.values, t.crow, t.col, t.ccol, t.row, t.perm)
    x = c["x"].clone()
    ST.sparse_linear(x, *tl, None, None)
    x.data.add_(0.5)
    y = ST.sparse_linear(x, *tl, None, None)
    _, gv, _ = ST.sparse_linear_backward(gy, y, x, *tl, None, True)
    _, ev, _ = ref.reference_sparse_linear_backward(gy, y, x, *tl, None, True)
    assert_close(gv, ev, ref.reference_sddmm(gy.abs(), x.abs(), t.crow, t.col, None), what="after .data write")


@pytest.mark.parametrize("change", ["in-place", "same-values-other-tensor", "other-view"])
def test_sparse_linear_backward_after_forward(change, gen):
    """The CPU backward may reuse its forward's packing of x (ops_cpu.cpp pack_reusing): it
    must not once x changed in place, and must give the same answer for an equal tensor or
    another view of the same memory."""
    B, I, O = 60, 300, 150  # one panel of whole vectors: the forward's packing fits the backward's
    c = make_case(B, I, O, 0.5, False, torch.float32, gen)
    t, gy = c["t"], c["gy"]
    base = torch.cat([c["x"], c["x"]], 1)
    x = base[:, :I] if change == "other-view" else c["x"].clone()
    tl = (t.values, t.crow, t.col, t.ccol, t.row, t.perm)
    y = ST.sparse_linear(x, *tl, None, None)
    if change == "in-place":
        x.mul_(-2.0)
        x_bwd = x
    elif change == "same-values-other-tensor":
        x_bwd = x.clone()
    else:
        x_bwd = base[:, I:]  # equal values, other memory
    for _ in range(2):  # the second call may hit the memo again
        gx, gv, gb = ST.sparse_linear_backward(gy, y, x_bwd, *tl, None, True)
        ex, ev, eb = ref.reference_sparse_linear_backward(gy, y, x_bwd, *tl, None, True)
        assert_close(gv, ev, ref.reference_sddmm(gy.abs(), x_bwd.abs(), t.crow, t.col, None), what=change)
        assert_close(gx, ex, what=change)


@pytest.mark.parametrize("layout", NONCONTIG)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("B,I,O", LAYOUT_SHAPES, ids=LAYOUT_SHAPE_IDS)
def test_sparse_linear_backward_noncontiguous(B, I, O, dtype, layout, gen):
    c = make_case(B, I, O, 0.5, True, dtype, gen)
    t = c["t"]
    x = lay(c["x"], layout, dense_only=True)
    y = lay(ref.reference_spmm(c["x"], t.values, t.crow, t.col, None).relu(), layout, dense_only=True)
    gy = lay(c["gy"], layout, dense_only=True)
    lt = type(t)(*(lay(a, layout) for a in (t.values, t.crow, t.col, t.ccol, t.row, t.perm)), t.shape)
    check_sparse_linear_backward(gy, y, x, lt, lay(make_active(O, gen), layout), True, f"sparse_linear_backward {layout}")


@pytest.mark.parametrize("active_kind", ACTIVE_KINDS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("B,I,O", SHAPES, ids=SHAPE_IDS)
def test_row_masked_grad_weight(B, I, O, dtype, active_kind, gen):
    gy, x = randn(B, O, dtype=dtype, gen=gen), randn(B, I, dtype=dtype, gen=gen)
    active = active_of(active_kind, O, gen)
    out = ST.row_masked_grad_weight(gy, x, active)
    expected = ref.reference_row_masked_grad_weight(gy, x, active)
    assert_close(out, expected, ref.reference_row_masked_grad_weight(gy.abs(), x.abs(), None), what="gW")
    if active is not None:
        assert (out[~active] == 0).all(), "frozen rows of the weight gradient must be exactly 0"


@pytest.mark.parametrize("layout", NONCONTIG)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("B,I,O", LAYOUT_SHAPES, ids=LAYOUT_SHAPE_IDS)
def test_row_masked_grad_weight_noncontiguous(B, I, O, dtype, layout, gen):
    gy = lay(randn(B, O, dtype=dtype, gen=gen), layout, dense_only=True)
    x = lay(randn(B, I, dtype=dtype, gen=gen), layout, dense_only=True)
    active = lay(make_active(O, gen), layout)
    out = ST.row_masked_grad_weight(gy, x, active)
    expected = ref.reference_row_masked_grad_weight(gy, x, active)
    assert_close(out, expected, ref.reference_row_masked_grad_weight(gy.abs(), x.abs(), None), what=layout)


# Column counts around the row-subset kernel's tiles (64 float / 32 double columns per
# tile with AVX-512, a vector of 16 / 8, a partial last vector) and row counts around its
# 6-row tile (5 rows with AVX2), first/last rows frozen or active; rows of x 512 bytes
# apart or a multiple of that (I = 64 in float64, 128 and 256) take the copied-block path.
ROWGEMM_I = [1, 7, 15, 16, 17, 31, 33, 63, 64, 65, 100, 128, 129, 256, 300]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("I", ROWGEMM_I)
def test_row_masked_grad_weight_tiles(I, dtype, gen):
    for B, O in ((1, 2), (3, 7), (60, 13), (17, 64)):
        gy, x = randn(B, O, dtype=dtype, gen=gen), randn(B, I, dtype=dtype, gen=gen)
        for active in (make_active(O, gen), torch.arange(O) % 2 == 0, torch.arange(O) % 2 == 1,
                       torch.arange(O) < O - 1, torch.arange(O) > 0):
            if bool(active.all()) or not bool(active.any()):
                continue
            out = ST.row_masked_grad_weight(gy, x, active)
            expected = ref.reference_row_masked_grad_weight(gy, x, active)
            assert_close(out, expected, ref.reference_row_masked_grad_weight(gy.abs(), x.abs(), None),
                         what=f"gW B={B} I={I} O={O}")
            assert (out[~active] == 0).all()


def test_row_masked_grad_weight_gemm_path():
    """The other path (MKL on the gathered rows, SPARSETICKET_ROWGEMM=0) still computes the
    same; the switch is read once per process, so in a subprocess."""
    code = (
        "import torch, sparseticket\n"
        "from sparseticket.ops import reference as ref\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for B, I, O, dt in ((3, 17, 7, torch.float32), (60, 100, 13, torch.float64), (17, 64, 64, torch.float32)):\n"
        "    gy, x = torch.randn(B, O, generator=g, dtype=dt), torch.randn(B, I, generator=g, dtype=dt)\n"
        "    a = torch.rand(O, generator=g) < 0.5\n"
        "    a[0], a[-1] = True, False\n"
        "    torch.testing.assert_close(torch.ops.sparseticket.row_masked_grad_weight(gy, x, a),\n"
        "                               ref.reference_row_masked_grad_weight(gy, x, a))\n"
        "print('ok')\n")
    env = dict(os.environ, SPARSETICKET_ROWGEMM="0")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


# gy shapes for masked_bias_grad: [B, O] from SHAPES (empty batch and single neuron
# included) and conv-shaped [N, O, H, W] (an empty batch, 1x1 and odd planes)
BIAS_SHAPES = sorted({(B, O) for B, _, O in SHAPES}) + [(0, 3, 2, 2), (2, 5, 3, 1), (3, 64, 7, 7), (1, 1, 1, 1)]


@pytest.mark.parametrize("active_kind", ACTIVE_KINDS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", BIAS_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_masked_bias_grad(shape, dtype, active_kind, gen):
    gy = randn(*shape, dtype=dtype, gen=gen)
    active = active_of(active_kind, shape[1], gen)
    out = ST.masked_bias_grad(gy, active)
    expected = ref.reference_masked_bias_grad(gy, active)
    assert out.shape == (shape[1],) and out.is_contiguous()
    assert_close(out, expected, ref.reference_masked_bias_grad(gy.abs(), None), what="bias grad")
    if active is not None:
        assert (out[~active] == 0).all() and not out[~active].signbit().any()


@pytest.mark.parametrize("layout", NONCONTIG)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(3, 5), (17, 64), (0, 5), (2, 5, 3, 4)], ids=lambda s: "x".join(map(str, s)))
def test_masked_bias_grad_noncontiguous(shape, dtype, layout, gen):
    gy = lay(randn(*shape, dtype=dtype, gen=gen), layout, dense_only=True)
    active = lay(make_active(shape[1], gen), layout)
    out = ST.masked_bias_grad(gy, active)
    expected = ref.reference_masked_bias_grad(gy, active)
    assert_close(out, expected, ref.reference_masked_bias_grad(gy.abs(), None), what=layout)
    assert (out[~active] == 0).all()


@pytest.mark.parametrize("shape", [(4, 6), (3, 6, 2, 3)], ids=["linear", "conv"])
def test_masked_bias_grad_gradcheck(shape, gen):
    """The op is linear in gy: its registered backward spreads gg over the batch (and the
    plane), 0 at frozen neurons; checked once and twice differentiated."""
    gy = randn(*shape, dtype=torch.float64, gen=gen).requires_grad_()
    for active in (None, torch.tensor([True, False, True, True, False, False])):
        assert torch.autograd.gradcheck(lambda g: ST.masked_bias_grad(g, active), (gy,))
        assert torch.autograd.gradgradcheck(lambda g: ST.masked_bias_grad(g, active), (gy,))


@pytest.mark.parametrize("dtype", FLOATS)
def test_frozen_rows_ignore_nonfinite_gradients(dtype, gen):
    """Frozen neurons are never computed, so inf/NaN in their output gradient cannot leak
    into the weight gradient (the references define those entries as exactly 0)."""
    B, I, O = 17, 31, 64
    c = make_case(B, I, O, 0.5, False, dtype, gen)
    t, gy, x = c["t"], c["gy"], c["x"]
    active = make_active(O, gen)
    frozen_cols = (~active).nonzero()[:, 0]
    assert frozen_cols.numel() >= 2
    gy_clean = torch.where(active, gy, torch.zeros_like(gy))
    gy[:, frozen_cols[::2]] = float("inf")
    gy[:, frozen_cols[1::2]] = float("nan")

    gv = ST.sddmm(gy, x, t.crow, t.col, active)
    expected = ref.reference_sddmm(gy, x, t.crow, t.col, active)
    assert torch.isfinite(expected).all()  # the reference's definition
    assert_close(gv, expected, ref.reference_sddmm(gy_clean.abs(), x.abs(), t.crow, t.col, None), what="sddmm")

    gw = ST.row_masked_grad_weight(gy, x, active)
    expected = ref.reference_row_masked_grad_weight(gy, x, active)
    assert torch.isfinite(expected).all()
    assert_close(gw, expected, ref.reference_row_masked_grad_weight(gy_clean.abs(), x.abs(), None), what="gW")

    gb = ST.masked_bias_grad(gy, active)
    assert torch.isfinite(gb).all() and (gb[~active] == 0).all()
    assert torch.equal(gb[active], gy.sum(0)[active])


@pytest.mark.parametrize("with_bias,active_kind", [(False, None), (True, "random")], ids=["plain", "bias-active"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("sparsity,holes", FEW_MASKS, ids=FEW_MASK_IDS)
@pytest.mark.parametrize("B,I,O", SHAPES, ids=SHAPE_IDS)
def test_sparse_linear_forward(B, I, O, sparsity, holes, dtype, with_bias, active_kind, gen):
    c = make_case(B, I, O, sparsity, holes, dtype, gen)
    t, x, bias = c["t"], c["x"], c["bias"] if with_bias else None
    active = active_of(active_kind, O, gen)
    args = (x, t.values, t.crow, t.col, t.ccol, t.row, t.perm, bias, active)
    out = ST.sparse_linear(*args)
    expected = ref.reference_sparse_linear(*args)
    mag = ref.reference_spmm(x.abs(), t.values.abs(), t.crow, t.col, None if bias is None else bias.abs())
    assert_close(out, expected, mag, what="sparse_linear")


@pytest.mark.parametrize("layout", NONCONTIG)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("B,I,O", LAYOUT_SHAPES, ids=LAYOUT_SHAPE_IDS)
def test_sparse_linear_forward_noncontiguous(B, I, O, dtype, layout, gen):
    c = make_case(B, I, O, 0.9, False, dtype, gen)
    t = c["t"]
    args = (lay(c["x"], layout, True), *(lay(a, layout) for a in (t.values, t.crow, t.col, t.ccol, t.row, t.perm)),
            lay(c["bias"], layout, True), lay(make_active(O, gen), layout))
    out = ST.sparse_linear(*args)
    expected = ref.reference_sparse_linear(*args)
    mag = ref.reference_spmm(args[0].abs(), args[1].abs(), args[2], args[3], args[7].abs())
    assert_close(out, expected, mag, what=f"sparse_linear {layout}")


@pytest.mark.parametrize("with_bias,active_kind", [(False, None), (True, "random"), (True, "none")],
                         ids=["plain", "bias-active", "bias-allfrozen"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("B,I,O", SHAPES, ids=SHAPE_IDS)
def test_neq_linear_forward(B, I, O, dtype, with_bias, active_kind, gen):
    x, w = randn(B, I, dtype=dtype, gen=gen), randn(O, I, dtype=dtype, gen=gen)
    bias = randn(O, dtype=dtype, gen=gen) if with_bias else None
    active = active_of(active_kind, O, gen)
    out = ST.neq_linear(x, w, bias, active)
    expected = ref.reference_neq_linear(x, w, bias, active)
    mag = ref.reference_neq_linear(x.abs(), w.abs(), None if bias is None else bias.abs(), None)
    assert_close(out, expected, mag, what="neq_linear")


@pytest.mark.parametrize("layout", NONCONTIG)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("B,I,O", LAYOUT_SHAPES, ids=LAYOUT_SHAPE_IDS)
def test_neq_linear_forward_noncontiguous(B, I, O, dtype, layout, gen):
    x = lay(randn(B, I, dtype=dtype, gen=gen), layout, True)
    w = lay(randn(O, I, dtype=dtype, gen=gen), layout, True)
    bias = lay(randn(O, dtype=dtype, gen=gen), layout, True)
    active = lay(make_active(O, gen), layout)
    out = ST.neq_linear(x, w, bias, active)
    expected = ref.reference_neq_linear(x, w, bias, active)
    mag = ref.reference_neq_linear(x.abs(), w.abs(), bias.abs(), None)
    assert_close(out, expected, mag, what=f"neq_linear {layout}")


# ----------------------------------------------------------------------------- opcheck
# torch.library.opcheck runs test_schema, test_autograd_registration, test_faketensor and
# test_aot_dispatch_dynamic. All four apply to every op, dense_to_ticket included: its fake
# kernel allocates nnz with ctx.new_dynamic_size(), which the dynamic AOT test handles.


def _opcheck_cases():
    D = torch.float64
    g = torch.Generator().manual_seed(1234)

    def ticket(O, I, s):
        w, m = randn(O, I, dtype=D, gen=g), make_mask(O, I, s, g)
        return w, m, ref_ticket(w, m)

    w, mask, t = ticket(6, 5, 0.5)
    _, _, t_empty = ticket(6, 5, 1.0)
    x, gy, b = randn(3, 5, dtype=D, gen=g), randn(3, 6, dtype=D, gen=g), randn(6, dtype=D, gen=g)
    x0, gy0 = randn(0, 5, dtype=D, gen=g), randn(0, 6, dtype=D, gen=g)
    act = torch.tensor([True, False, True, True, False, False])

    def rg(a):
        return a.detach().clone().requires_grad_()

    S = ST
    P = [w.clone(), t.values.clone(), b.clone()]
    G = [randn(6, 5, dtype=D, gen=g), randn(t.nnz, dtype=D, gen=g), randn(6, dtype=D, gen=g)]
    BUF = [randn(6, 5, dtype=D, gen=g), randn(t.nnz, dtype=D, gen=g), randn(6, dtype=D, gen=g)]
    tl = (t.values, t.crow, t.col, t.ccol, t.row, t.perm)
    te = (t_empty.values, t_empty.crow, t_empty.col, t_empty.ccol, t_empty.row, t_empty.perm)
    return {
        "spmm-nobias": (S.spmm, (x, t.values, t.crow, t.col, None)),
        "spmm-bias": (S.spmm, (x, t.values, t.crow, t.col, b)),
        "spmm-B0-empty": (S.spmm, (x0, t_empty.values, t_empty.crow, t_empty.col, b)),
        "spmm_t": (S.spmm_t, (gy, t.values, t.ccol, t.row, t.perm)),
        "spmm_t-B0": (S.spmm_t, (gy0, t.values, t.ccol, t.row, t.perm)),
        "sddmm-noactive": (S.sddmm, (gy, x, t.crow, t.col, None)),
        "sddmm-active": (S.sddmm, (gy, x, t.crow, t.col, act)),
        "sddmm-empty": (S.sddmm, (gy, x, t_empty.crow, t_empty.col, act)),
        "rmgw-noactive": (S.row_masked_grad_weight, (gy, x, None)),
        "rmgw-active": (S.row_masked_grad_weight, (gy, x, act)),
        "masked_bias_grad-noactive": (S.masked_bias_grad, (gy, None)),
        "masked_bias_grad-active": (S.masked_bias_grad, (gy, act)),
        "masked_bias_grad-B0": (S.masked_bias_grad, (gy0, act)),
        "masked_bias_grad-conv": (S.masked_bias_grad, (randn(2, 6, 3, 2, dtype=D, gen=g), act)),
        "masked_bias_grad-grad": (S.masked_bias_grad, (rg(gy), act)),
        "sparse_linear-none": (S.sparse_linear, (x, *tl, None, None)),
        "sparse_linear-bias-active": (S.sparse_linear, (x, *tl, b, act)),
        "sparse_linear-grad": (S.sparse_linear, (rg(x), rg(t.values), *tl[1:], rg(b), act)),
        "sparse_linear-grad-noact": (S.sparse_linear, (rg(x), rg(t.values), *tl[1:], None, None)),
        "sparse_linear-grad-empty": (S.sparse_linear, (rg(x), rg(t_empty.values), *te[1:], rg(b), None)),
        "sparse_linear_backward": (S.sparse_linear_backward, (gy, None, x, *tl, act, True)),
        "sparse_linear_backward-relu-nogx": (S.sparse_linear_backward, (gy, gy.flip(0), x, *tl, None, False)),
        "sparse_linear_backward-B0": (S.sparse_linear_backward, (gy0, None, x0, *tl, act, True)),
        "sparse_linear_backward-empty": (S.sparse_linear_backward, (gy, gy.flip(1), x, *te, None, True)),
        "neq_linear-none": (S.neq_linear, (x, w, None, None)),
        "neq_linear-bias-active": (S.neq_linear, (x, w, b, act)),
        "neq_linear-grad": (S.neq_linear, (rg(x), rg(w), rg(b), act)),
        "neq_linear-grad-noact": (S.neq_linear, (rg(x), rg(w), None, None)),
        "dense_to_ticket": (S.dense_to_ticket, (w, mask)),
        "dense_to_ticket-empty": (S.dense_to_ticket, (w, torch.zeros_like(mask))),
        "ticket_transpose": (S.ticket_transpose, (t.crow, t.col, 5)),
        "ticket_to_dense": (S.ticket_to_dense, (t.values, t.crow, t.col, 5)),
        "masked_sgd_-nomomentum-nomasks": (S.masked_sgd_, (
            [p.clone() for p in P], G, [], [None] * 3, [None] * 3, [None] * 3, [False] * 3,
            0.1, 0.0, 0.0, 0.0, False, False)),
        "masked_sgd_-all-masks": (S.masked_sgd_, (
            [p.clone() for p in P], G, [bb.clone() for bb in BUF], [mask, None, None], [act, act, act],
            [None, t.crow, None], [True, False, False], 0.1, 0.9, 0.1, 5e-4, False, True)),
        "masked_sgd_-nesterov-elementactive": (S.masked_sgd_, (
            [p.clone() for p in P], G, [bb.clone() for bb in BUF], [mask, None, None],
            [mask, None, act], [None, None, None], [False, True, False], 0.1, 0.9, 0.0, 5e-4, True, False)),
    }


OPCHECK_CASES = _opcheck_cases()


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck(case):
    op, args = OPCHECK_CASES[case]
    torch.library.opcheck(op, args)


# ----------------------------------------------------------------------------- edge sizes


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("B,I,O", [(3, 0, 5), (3, 5, 0), (0, 0, 0), (3, 0, 0)],
                         ids=["no-inputs", "no-outputs", "all-empty", "no-features"])
def test_zero_size_features(B, I, O, dtype, gen):
    """A layer with no input or no output features: every op still agrees with its reference."""
    c = make_case(B, I, O, 0.5, False, dtype, gen)
    t, x, gy, w, bias = c["t"], c["x"], c["gy"], c["w"], c["bias"]
    active = make_active(O, gen)
    pairs = [
        (ST.spmm(x, t.values, t.crow, t.col, bias), ref.reference_spmm(x, t.values, t.crow, t.col, bias)),
        (ST.spmm_t(gy, t.values, t.ccol, t.row, t.perm), ref.reference_spmm_t(gy, t.values, t.ccol, t.row, t.perm)),
        (ST.sddmm(gy, x, t.crow, t.col, active), ref.reference_sddmm(gy, x, t.crow, t.col, active)),
        (ST.row_masked_grad_weight(gy, x, active), ref.reference_row_masked_grad_weight(gy, x, active)),
        (ST.neq_linear(x, w, bias, active), ref.reference_neq_linear(x, w, bias, active)),
        (ST.sparse_linear(x, t.values, t.crow, t.col, t.ccol, t.row, t.perm, bias, active),
         ref.reference_spmm(x, t.values, t.crow, t.col, bias)),
        (ST.ticket_to_dense(t.values, t.crow, t.col, I), ref.reference_ticket_to_dense(t.values, t.crow, t.col, I)),
    ]
    pairs += list(zip(ST.dense_to_ticket(w, c["mask"]), ref.reference_dense_to_ticket(w, c["mask"])))
    pairs += list(zip(ST.ticket_transpose(t.crow, t.col, I), ref.reference_ticket_transpose(t.crow, t.col, I)))
    for k, (got, expected) in enumerate(pairs):
        assert got.shape == expected.shape and got.dtype == expected.dtype, k
        assert torch.allclose(got, expected) if got.is_floating_point() else torch.equal(got, expected), k


# Shapes big enough to reach the code paths small shapes never do: an SDDMM operand
# larger than 1 MB (visited in blocks of rows), several batch panels (B=300), and a
# long reduction dimension. Few cases: they are the slowest in this file.
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("B,I,O", [(130, 2100, 37), (300, 1100, 9)], ids=["B130-I2100-O37", "B300-I1100-O9"])
def test_large_operands(B, I, O, dtype, gen):
    c = make_case(B, I, O, 0.9, True, dtype, gen)
    t, x, gy, bias = c["t"], c["x"], c["gy"], c["bias"]
    active = make_active(O, gen)
    out = ST.spmm(lay(x, "transposed"), t.values, t.crow, t.col, bias)
    assert_close(out, ref.reference_spmm(x, t.values, t.crow, t.col, bias),
                 ref.reference_spmm(x.abs(), t.values.abs(), t.crow, t.col, bias.abs()), what="spmm")
    out = ST.spmm_t(gy, t.values, t.ccol, t.row, t.perm)
    assert_close(out, ref.reference_spmm_t(gy, t.values, t.ccol, t.row, t.perm),
                 ref.reference_spmm_t(gy.abs(), t.values.abs(), t.ccol, t.row, t.perm), what="spmm_t")
    for act in (None, active):
        out = ST.sddmm(gy, x, t.crow, t.col, act)
        assert_close(out, ref.reference_sddmm(gy, x, t.crow, t.col, act),
                     ref.reference_sddmm(gy.abs(), x.abs(), t.crow, t.col, None),
                     what=f"sddmm active={act is not None}")
