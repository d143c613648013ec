"""ticket_bitmap / ticket_expand / ticket_compress: the dense path's materialisation."""
import pytest
import torch

from helpers import ERRORS, FLOATS, LAYOUTS, SPARSITIES, ST, lay, make_mask, randn, ref_ticket
from sparseticket.ops import reference as ref

SHAPES = [(1, 1), (3, 63), (5, 64), (7, 65), (4, 130), (2, 200), (9, 17)]


def _case(O, I, sparsity, dtype, seed=0, holes=False):
    g = torch.Generator().manual_seed(seed)
    w = randn(O, I, dtype=dtype, gen=g)
    m = make_mask(O, I, sparsity, g, holes=holes)
    return w, m, ref_ticket(w, m)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("O,I", SHAPES)
@pytest.mark.parametrize("holes", [False, True])
def test_matches_reference(O, I, sparsity, dtype, holes):
    w, m, t = _case(O, I, sparsity, dtype, holes=holes)
    bits = ST.ticket_bitmap(t.crow, t.col, I)
    assert torch.equal(bits, ref.reference_ticket_bitmap(t.crow, t.col, I))
    assert torch.equal(ref.unpack_bits(bits, I), m)
    dense = ST.ticket_expand(t.values, t.crow, bits, I)
    assert dense.shape == (O, I) and torch.equal(dense, w * m)  # a copy: bit-exact, zeros where pruned
    g = randn(O, I, dtype=dtype, gen=torch.Generator().manual_seed(1))
    assert torch.equal(ST.ticket_compress(g, t.crow, bits, t.values.numel()), g[m])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_compress_strided_dense(layout):
    w, m, t = _case(6, 70, 0.5, torch.float32)
    bits = ST.ticket_bitmap(t.crow, t.col, 70)
    g = randn(6, 70, gen=torch.Generator().manual_seed(2))
    assert torch.equal(ST.ticket_compress(lay(g, layout), t.crow, bits, t.values.numel()), g[m])


def test_opcheck_and_gradcheck():
    w, m, t = _case(5, 67, 0.6, torch.float64)
    bits = ST.ticket_bitmap(t.crow, t.col, 67)
    v = t.values.clone().requires_grad_()
    torch.library.opcheck(ST.ticket_bitmap, (t.crow, t.col, 67))
    torch.library.opcheck(ST.ticket_expand, (v, t.crow, bits, 67))
    torch.library.opcheck(ST.ticket_compress, (randn(5, 67, dtype=torch.float64), t.crow, bits, t.values.numel()))
    assert torch.autograd.gradcheck(lambda vv: ST.ticket_expand(vv, t.crow, bits, 67), (v,))


def test_bad_input():
    w, m, t = _case(4, 70, 0.5, torch.float32)
    bits = ST.ticket_bitmap(t.crow, t.col, 70)
    with pytest.raises(ERRORS, match="bits"):
        ST.ticket_expand(t.values, t.crow, bits[:, :1].contiguous(), 70)          # wrong shape
    wrong = bits.clone()
    wrong[0, 0] ^= 1                                                              # one bit too many/few
    with pytest.raises(ERRORS, match="bits"):
        ST.ticket_expand(t.values, t.crow, wrong, 70)
    past = bits.clone()
    past[0, 1] |= 1 << 10                                                         # a bit at column 74 >= 70
    past[0, 0] &= ~(past[0, 0] & -past[0, 0])                                    # keep the count right
    with pytest.raises(ERRORS, match="bits"):
        ST.ticket_expand(t.values, t.crow, past, 70)
    with pytest.raises(ERRORS, match="bits"):
        ST.ticket_expand(t.values, t.crow, bits.int(), 70)                       # dtype
    with pytest.raises(ERRORS, match="crow"):
        ST.ticket_compress(torch.zeros(3, 70), t.crow, bits, t.values.numel())   # rows
    unsorted = t.col.clone()
    r0 = int(t.crow[1])
    if r0 >= 2:
        unsorted[0], unsorted[1] = t.col[1], t.col[0]
        with pytest.raises(ERRORS, match="increasing"):
            ST.ticket_bitmap(t.crow, unsorted, 70)
    with pytest.raises(ERRORS, match="col"):
        ST.ticket_bitmap(t.crow, t.col, 10)                                      # columns out of range
