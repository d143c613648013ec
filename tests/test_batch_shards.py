"""Batch shards (csrc/cpu/ops_cpu.cpp): with at least one packed panel of the batch per
thread and a ticket that fits a core's L2, each thread packs and multiplies its own rows
of the batch. Per output element the forward and the input gradient do the same
arithmetic either way (bit-identical to the unsharded path, so these tests check their
results but cannot see whether they sharded); the kept-weight gradient is the sum of one
partial result per shard, so with two threads it must equal, bit for bit, the sum of the
two half-batch gradients computed unsharded, which the row split does not give."""
import pytest
import torch
from helpers import ST, assert_bits_equal, assert_close, make_active, make_mask, randn, ref, ref_ticket

from sparseticket import ops, runtime

pytestmark = pytest.mark.skipif(ops._C is None, reason="compiled kernels not built")

# (B, I, O, sparsity, dtype, half): `half` is the first shard's batch rows. They are
# chosen so that the forward, the input gradient and the kept-weight gradient all shard
# with two threads: two panels of 128 rows (float32, AVX-512: 8 vectors of 16), a ragged
# second panel, four float64 panels of 64 (two per shard), and two panels of 32 where a
# 4096-wide operand limits the panel width to 2 vectors (512 KB per panel).
CASES = [
    (256, 1024, 1024, 0.95, torch.float32, 128),
    (250, 300, 200, 0.5, torch.float32, 128),
    (256, 300, 200, 0.9, torch.float64, 128),
    (48, 4096, 4096, 0.9995, torch.float32, 32),
    (256, 64, 64, 0.0, torch.float32, 128),
]
IDS = ["B{}-I{}-O{}-s{}-{}".format(B, I, O, s, str(d)[6:]) for B, I, O, s, d, _ in CASES]


@pytest.fixture
def sharding():
    """Two threads, every op on the pool; yields set(on) to switch shards; restores all.
    (The cases shard the same way with AVX2's and SSE's panel widths.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    prev_work = runtime.set_serial_work(0)
    prev = runtime.set_batch_shards(True)
    try:
        yield runtime.set_batch_shards
    finally:
        runtime.set_batch_shards(prev)
        runtime.set_serial_work(prev_work)
        torch.set_num_threads(threads)


def _case(B, I, O, sparsity, dtype, gen, layout="contiguous"):
    w = randn(O, I, dtype=dtype, gen=gen)
    mask = make_mask(O, I, sparsity, gen, holes=sparsity < 0.99)
    t = ref_ticket(w, mask)
    x, gy = randn(B, I, dtype=dtype, gen=gen), randn(B, O, dtype=dtype, gen=gen)
    if layout == "transposed":  # column-major: the packs read with stride(1) != 1
        x, gy = x.t().contiguous().t(), gy.t().contiguous().t()
    return t, x, gy, randn(O, dtype=dtype, gen=gen)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("B,I,O,sparsity,dtype,half", CASES, ids=IDS)
def test_forward_and_input_grad_bit_identical(B, I, O, sparsity, dtype, half, layout, sharding, gen):
    t, x, gy, bias = _case(B, I, O, sparsity, dtype, gen, layout)
    out = {}
    for on in (True, False):
        sharding(on)
        out[on] = (ST.spmm(x, t.values, t.crow, t.col, bias), ST.spmm_t(gy, t.values, t.ccol, t.row, t.perm),
                   ST.sparse_linear_relu(x, t.values, t.crow, t.col, t.ccol, t.row, t.perm, bias, None))
    for a, b, what in zip(out[True], out[False], ("spmm", "spmm_t", "sparse_linear_relu")):
        assert_bits_equal(a, b, what)
    assert_close(out[True][0], ref.reference_spmm(x, t.values, t.crow, t.col, bias),
                 ref.reference_spmm(x.abs(), t.values.abs(), t.crow, t.col, bias.abs()), what="spmm")
    assert_close(out[True][1], ref.reference_spmm_t(gy, t.values, t.ccol, t.row, t.perm),
                 ref.reference_spmm_t(gy.abs(), t.values.abs(), t.ccol, t.row, t.perm), what="spmm_t")


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("B,I,O,sparsity,dtype,half", CASES, ids=IDS)
def test_kept_weight_grad_is_sum_of_shards(B, I, O, sparsity, dtype, half, frozen, sharding, gen):
    t, x, gy, _ = _case(B, I, O, sparsity, dtype, gen)
    active = make_active(O, gen) if frozen else None
    sharding(True)
    got = ST.sddmm(gy, x, t.crow, t.col, active)
    sharding(False)
    halves = [ST.sddmm(gy[s], x[s], t.crow, t.col, active) for s in (slice(0, half), slice(half, B))]
    assert_bits_equal(got, halves[0] + halves[1], "sddmm against the sum of its half batches")
    assert_close(got, ref.reference_sddmm(gy, x, t.crow, t.col, active),
                 ref.reference_sddmm(gy.abs(), x.abs(), t.crow, t.col, None), what="sddmm")


@pytest.mark.parametrize("layout", ["row-slice", "expanded"])
def test_kept_weight_grad_strided_operands(layout, sharding, gen):
    """x and gy with stride(0) != their width (rows of a wider buffer) or 0 (one row
    expanded over the batch): each shard packs its rows from the right place."""
    B, I, O, half = 256, 300, 200, 128
    t, x, gy, _ = _case(B, I, O, 0.9, torch.float32, gen)
    if layout == "row-slice":
        x, gy = torch.cat([x, x[:, :7]], 1)[:, :I], torch.cat([gy, gy[:, :5]], 1)[:, :O]
    else:
        x, gy = x[:1].expand(B, I), gy[:1].expand(B, O)
    sharding(True)
    got = ST.sddmm(gy, x, t.crow, t.col, None)
    gx = ST.spmm_t(gy, t.values, t.ccol, t.row, t.perm)
    sharding(False)
    halves = [ST.sddmm(gy[s].contiguous(), x[s].contiguous(), t.crow, t.col, None) for s in (slice(0, half), slice(half, B))]
    assert_bits_equal(got, halves[0] + halves[1], "sddmm against the sum of its half batches")
    assert_bits_equal(gx, ST.spmm_t(gy.contiguous(), t.values, t.ccol, t.row, t.perm), "spmm_t")


def test_three_shards(sharding, gen):
    """Three threads, three panels: the partial results are added in shard order."""
    torch.set_num_threads(3)  # the fixture restores the caller's count
    B, I, O = 384, 300, 200
    t, x, gy, _ = _case(B, I, O, 0.9, torch.float32, gen)
    tl = (t.values, t.crow, t.col, t.ccol, t.row, t.perm)
    sharding(True)
    got = ST.sddmm(gy, x, t.crow, t.col, None)
    gx, gv, _ = ST.sparse_linear_backward(gy, None, x, *tl, None, True)
    sharding(False)
    parts = [ST.sddmm(gy[b:b + 128], x[b:b + 128], t.crow, t.col, None) for b in (0, 128, 256)]
    assert_bits_equal(got, parts[0] + parts[1] + parts[2], "sddmm against its three shards")
    assert_bits_equal(gv, got, "fused backward's kept-weight gradient")
    assert_bits_equal(gx, ST.spmm_t(gy, t.values, t.ccol, t.row, t.perm), "gx")


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("B,I,O,sparsity,dtype,half", CASES, ids=IDS)
def test_fused_backward(B, I, O, sparsity, dtype, half, relu, input_grad, sharding, gen):
    """sparse_linear_backward: gx bit-identical to the unsharded op, the kept-weight gradient
    the sum of the two half batches' (ReLU mask, bias gradient and frozen rows included)."""
    t, x, gy, bias = _case(B, I, O, sparsity, dtype, gen)
    tl = (t.values, t.crow, t.col, t.ccol, t.row, t.perm)
    y = ref.reference_spmm(x, t.values, t.crow, t.col, bias).relu() if relu else None
    active = make_active(O, gen)
    sharding(True)
    gx, gv, gb = ST.sparse_linear_backward(gy, y, x, *tl, active, input_grad)
    sharding(False)
    ux, uv, ub = ST.sparse_linear_backward(gy, y, x, *tl, active, input_grad)
    assert_bits_equal(gx, ux, "gx")
    assert_bits_equal(gb, ub, "bias gradient")
    halves = [ST.sparse_linear_backward(gy[s], None if y is None else y[s], x[s], *tl, active, False)[1]
              for s in (slice(0, half), slice(half, B))]
    assert_bits_equal(gv, halves[0] + halves[1], "kept-weight gradient against its half batches")
    ex, ev, eb = ref.reference_sparse_linear_backward(gy, y, x, *tl, active, input_grad)
    assert_close(gv, ev, ref.reference_sddmm(gy.abs(), x.abs(), t.crow, t.col, None), what="kept-weight gradient")


def test_not_sharded_where_it_does_not_pay(sharding, gen):
    """One panel (B=128), an odd panel count (B=300: 128+128+44) and a ticket over 1 MB
    (256x1024x1024 at 50% with a third of the rows and columns emptied: ~1.9 MB) keep the
    row split: their kept-weight gradient is the unsharded one, bit for bit, with shards
    switched on."""
    if ops._C.cpu_isa() != "avx512":
        pytest.skip("the panel counts here are those of AVX-512's 128-row float32 panels")
    for B, I, O, s in ((128, 300, 200, 0.5), (300, 300, 200, 0.5), (256, 1024, 1024, 0.5)):
        t, x, gy, _ = _case(B, I, O, s, torch.float32, gen)
        sharding(True)
        a = ST.sddmm(gy, x, t.crow, t.col, None)
        sharding(False)
        assert_bits_equal(a, ST.sddmm(gy, x, t.crow, t.col, None), f"B={B} I={I} O={O} s={s}")


def test_autograd_through_shards(sharding, gen):
    """loss.backward() of sparse_linear on a sharded shape against the masked dense layer."""
    B, I, O = 256, 300, 200
    w, mask = randn(O, I, gen=gen), make_mask(O, I, 0.9, gen)
    t = ref_ticket(w, mask)
    x = randn(B, I, gen=gen).requires_grad_(True)
    vals, bias = t.values.clone().requires_grad_(True), randn(O, gen=gen).requires_grad_(True)
    gy = randn(B, O, gen=gen)
    import sparseticket
    sparseticket.sparse_linear(x, t, bias, values=vals).backward(gy)
    wd = (w * mask).requires_grad_(True)
    xd, bd = x.detach().clone().requires_grad_(True), bias.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(xd, wd, bd).backward(gy)
    assert_close(x.grad, xd.grad, gy.abs() @ (w * mask).abs(), what="gx")
    assert_close(vals.grad, wd.grad[mask], (gy.abs().t() @ x.detach().abs())[mask], what="kept-weight gradient")
    assert_close(bias.grad, bd.grad, what="bias gradient")


def test_opcheck_on_sharded_shapes(sharding, gen):
    t, x, gy, bias = _case(256, 300, 200, 0.9, torch.float32, gen)
    tl = (t.values, t.crow, t.col, t.ccol, t.row, t.perm)
    for op, args in ((ST.spmm, (x, t.values, t.crow, t.col, bias)),
                     (ST.spmm_t, (gy, t.values, t.ccol, t.row, t.perm)),
                     (ST.sddmm, (gy, x, t.crow, t.col, None)),
                     (ST.sparse_linear_backward, (gy, None, x, *tl, None, True))):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_set_batch_shards_returns_previous():
    prev = runtime.set_batch_shards(False)
    try:
        assert runtime.set_batch_shards(True) is False
        assert runtime.set_batch_shards(prev) is True
    finally:
        runtime.set_batch_shards(prev)
