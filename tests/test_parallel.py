"""The CPU ops run small jobs on the calling thread and large ones on the thread pool
(csrc/cpu/parallel.h). Most shapes in test_ops are small, so they cover the inline path;
here every op runs both ways on the same inputs: the results must be bit-identical (each
output row or entry is computed by one thread either way) and match the reference."""
import pytest
import torch
from helpers import FLOATS, ST, assert_close, make_active, make_mask, randn, ref, ref_ticket

from sparseticket import ops, runtime

pytestmark = pytest.mark.skipif(ops._C is None, reason="compiled kernels not built")

INLINE, POOL = 1 << 62, 0
# LeNet-sized and odd shapes, a ragged batch, an empty batch
SHAPES = [(60, 784, 300), (60, 300, 100), (17, 257, 31), (1, 5, 3), (0, 31, 5)]


@pytest.fixture
def both_ways():
    """Runs fn() once inline and once on the pool, batch shards off (their kept-weight
    gradient sums per-thread partials: tests/test_batch_shards.py); returns the two results."""
    prev = runtime.set_serial_work(POOL)
    runtime.set_serial_work(prev)
    prev_shards = runtime.set_batch_shards(False)

    def run(fn):
        out = []
        for w in (INLINE, POOL):
            runtime.set_serial_work(w)
            out.append(fn())
        runtime.set_serial_work(prev)
        return out

    yield run
    runtime.set_serial_work(prev)
    runtime.set_batch_shards(prev_shards)


def test_set_serial_work_returns_previous():
    prev = runtime.set_serial_work(123)
    try:
        assert runtime.set_serial_work(456) == 123
        assert runtime.set_serial_work(-5) == 456  # negative clamps to 0
        assert runtime.set_serial_work(prev) == 0
    finally:
        runtime.set_serial_work(prev)


def _identical(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(a, b), f"{what}: inline and pool results differ (max {(a - b).abs().max().item()})"


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95, 1.0])
@pytest.mark.parametrize("B,I,O", SHAPES, ids=["B{}-I{}-O{}".format(*s) for s in SHAPES])
def test_ticket_ops_inline_equals_pool(B, I, O, sparsity, dtype, both_ways, gen):
    w, mask = randn(O, I, dtype=dtype, gen=gen), make_mask(O, I, sparsity, gen, holes=True)
    t = ref_ticket(w, mask)
    x, gy, bias = randn(B, I, dtype=dtype, gen=gen), randn(B, O, dtype=dtype, gen=gen), randn(O, dtype=dtype, gen=gen)
    active = make_active(O, gen)

    a, b = both_ways(lambda: ST.spmm(x, t.values, t.crow, t.col, bias))
    _identical(a, b, "spmm")
    assert_close(a, ref.reference_spmm(x, t.values, t.crow, t.col, bias),
                 ref.reference_spmm(x.abs(), t.values.abs(), t.crow, t.col, bias.abs()), what="spmm")

    a, b = both_ways(lambda: ST.spmm_t(gy, t.values, t.ccol, t.row, t.perm))
    _identical(a, b, "spmm_t")
    assert_close(a, ref.reference_spmm_t(gy, t.values, t.ccol, t.row, t.perm),
                 ref.reference_spmm_t(gy.abs(), t.values.abs(), t.ccol, t.row, t.perm), what="spmm_t")

    for act in (None, active):
        a, b = both_ways(lambda: ST.sddmm(gy, x, t.crow, t.col, act))
        _identical(a, b, "sddmm")
        assert_close(a, ref.reference_sddmm(gy, x, t.crow, t.col, act),
                     ref.reference_sddmm(gy.abs(), x.abs(), t.crow, t.col, None), what="sddmm")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("B,I,O", SHAPES, ids=["B{}-I{}-O{}".format(*s) for s in SHAPES])
def test_row_masked_grad_weight_inline_equals_pool(B, I, O, dtype, both_ways, gen):
    gy, x = randn(B, O, dtype=dtype, gen=gen), randn(B, I, dtype=dtype, gen=gen)
    active = make_active(O, gen)
    a, b = both_ways(lambda: ST.row_masked_grad_weight(gy, x, active))
    _identical(a, b, "row_masked_grad_weight")
    assert_close(a, ref.reference_row_masked_grad_weight(gy, x, active),
                 ref.reference_row_masked_grad_weight(gy.abs(), x.abs(), None), what="gW")


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("n_active", [1, 2, 5, 6, 7, 13, 149])
def test_row_masked_grad_weight_row_shares(threads, n_active, both_ways, gen):
    """On the pool the threads split the rows (shares of whole 6-row tiles, and of the
    frozen rows): fewer active rows than threads, shares ending mid-tile (every share
    with AVX2's 5-row tile), one frozen row. (0 or all active never reach the kernel.)"""
    B, I, O = 37, 70, 150
    gy, x = randn(B, O, gen=gen), randn(B, I, gen=gen)
    active = torch.zeros(O, dtype=torch.bool)
    active[torch.randperm(O, generator=gen)[:n_active]] = True
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = both_ways(lambda: ST.row_masked_grad_weight(gy, x, active))
    finally:
        torch.set_num_threads(prev)
    _identical(a, b, "row_masked_grad_weight")
    assert_close(a, ref.reference_row_masked_grad_weight(gy, x, active),
                 ref.reference_row_masked_grad_weight(gy.abs(), x.abs(), None), what="gW")
    assert not a[~active].any()


@pytest.mark.parametrize("dtype", FLOATS)
def test_masked_sgd_inline_equals_pool(dtype, both_ways, gen):
    # a LeNet-sized parameter list: 2 x 32K-element jobs for the largest, one each for the rest
    shapes = [(300, 784), (300,), (100, 300), (10, 100)]
    params0 = [randn(*s, dtype=dtype, gen=gen) for s in shapes]
    grads = [randn(*s, dtype=dtype, gen=gen) for s in shapes]
    bufs0 = [randn(*s, dtype=dtype, gen=gen) for s in shapes]
    keeps = [make_mask(*shapes[0], 0.5, gen), None, None, make_mask(10, 100, 0.9, gen)]
    actives = [make_active(300, gen), None, make_active(100, gen), None]
    hp = dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=True, maximize=False)

    def step(fn):
        ps, bs = [p.clone() for p in params0], [b.clone() for b in bufs0]
        fn(ps, grads, bs, keeps, actives, [None] * 4, [False] * 4, **hp)
        return ps + bs

    inline, pool = both_ways(lambda: step(ST.masked_sgd_))
    for k, (a, b) in enumerate(zip(inline, pool)):
        _identical(a, b, f"masked_sgd_ tensor {k}")
    expected = step(ref.reference_masked_sgd_)
    for a, e in zip(inline, expected):
        assert_close(a, e, e.abs() + 1, what="masked_sgd_")


def test_set_serial_work_without_kernels_raises(monkeypatch):
    monkeypatch.setattr(ops, "_C", None)
    with pytest.raises(RuntimeError, match="compiled kernels are not loaded"):
        runtime.set_serial_work(0)
