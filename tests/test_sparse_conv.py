"""The direct sparse convolution ops (sparse_conv2d, sparse_conv2d_grad_input,
sparse_conv2d_grad_weight) against their references, and SparseConv2d on top of them."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import sparseticket.nn as stnn
from sparseticket.ops import reference as ref

from helpers import ERRORS, FLOATS, ST, TOL, make_active, randn, ref_ticket, run_under_isa

# (N, C, O, H, W, kernel, stride, padding, dilation)
GEOMS = [
    (2, 5, 7, 9, 7, 3, 1, 1, 1),
    (2, 8, 6, 9, 7, 3, 2, 1, 1),
    (3, 4, 5, 7, 7, 3, 1, 1, 1),
    (2, 3, 4, 5, 9, 3, 2, 0, 1),
    (1, 6, 9, 13, 40, 5, 1, 2, 2),
    (2, 4, 3, 7, 7, 1, 1, 0, 1),
    (2, 4, 6, 8, 11, (3, 2), (2, 1), (0, 2), 1),
    (2, 3, 5, 70, 9, 3, 2, 1, 1),   # tall: several row tiles
    (1, 2, 3, 6, 130, 3, 1, 1, 1),  # wide: several column tiles
    (5, 17, 33, 28, 28, 3, 1, 1, 1),  # Conv-4-like widths (two vectors per row)
    (3, 9, 10, 14, 14, 3, 1, 1, 1),
    (2, 3, 4, 4, 4, 3, 1, 3, 1),   # padding wider than the kernel reach
    (2, 3, 4, 6, 20, 3, 1, 1, 1),  # 2.5 vectors of 8 per row (AVX2's half-vector tail)
    (2, 3, 4, 9, 23, 3, 2, 1, 1),  # output 12 wide (1.5 vectors); input-gradient phases 12 and 11 wide
]
SPARSITIES = (0.0, 0.5, 0.9, 1.0)


def _geom_id(g):
    return "N{}C{}O{}_{}x{}_k{}s{}p{}d{}".format(*g)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def make_conv(geom, sparsity, dtype, gen, holes=False):
    """Masked dense weight [O, C, kh, kw], its ticket (columns (tap, channel)), x, bias, options."""
    N, C, O, H, W, k, s, p, d = geom
    kh, kw = _pair(k)
    n = O * C * kh * kw
    keep = n - int(round(sparsity * n))
    flat = torch.zeros(n, dtype=torch.bool)
    flat[torch.randperm(n, generator=gen)[:keep]] = True
    mask = flat.view(O, C, kh, kw).clone()
    if holes:  # output channels and input channels with no kept weight
        mask[torch.randperm(O, generator=gen)[: max(1, O // 3)]] = False
        mask[:, torch.randperm(C, generator=gen)[: max(1, C // 3)]] = False
    w = randn(O, C, kh, kw, dtype=dtype, gen=gen) * mask
    K = kh * kw * C
    t = ref_ticket(w.permute(0, 2, 3, 1).reshape(O, K).contiguous(), mask.permute(0, 2, 3, 1).reshape(O, K).contiguous())
    x = randn(N, C, H, W, dtype=dtype, gen=gen)
    bias = randn(O, dtype=dtype, gen=gen)
    conf = ((kh, kw), _pair(s), _pair(p), _pair(d))
    return w, mask, t, x, bias, conf


def close(a, b, dtype, what):
    a, b = a.detach(), b.detach()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert a.dtype == b.dtype
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    err = float((a - b).abs().max()) if a.numel() else 0.0
    assert err <= 10 * TOL[dtype] * scale, f"{what}: max abs err {err:.3g} (scale {scale:.3g})"


def _kept(gw, mask):
    O, K = gw.shape[0], gw[0].numel() if gw.shape[0] else 0
    return gw.permute(0, 2, 3, 1).reshape(O, K)[mask.permute(0, 2, 3, 1).reshape(O, K)]


# ----------------------------------------------------------------------------- ops vs references


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("geom", GEOMS, ids=_geom_id)
def test_ops_match_reference(geom, sparsity, dtype, gen):
    w, mask, t, x, bias, conf = make_conv(geom, sparsity, dtype, gen)
    O = w.shape[0]
    active = make_active(O, gen)
    tl = (t.crow, t.col, t.ccol, t.row, t.perm)
    y = ST.sparse_conv2d(x, t.values, *tl, bias, active, *conf)
    close(y, ref.reference_sparse_conv2d(x, t.values, *tl, bias, active, *conf), dtype, "forward")
    close(y, F.conv2d(x, w, bias, *conf[1:]), dtype, "forward vs F.conv2d")
    assert y.is_contiguous()
    gy = randn(y.shape, dtype=dtype, gen=gen)
    gx = ST.sparse_conv2d_grad_input(gy, t.values, t.crow, t.col, list(x.shape), *conf)
    close(gx, ref.reference_sparse_conv2d_grad_input(gy, t.values, t.crow, t.col, list(x.shape), *conf), dtype,
          "grad_input")
    gv = ST.sparse_conv2d_grad_weight(gy, x, t.ccol, t.row, t.perm, active, *conf)
    close(gv, ref.reference_sparse_conv2d_grad_weight(gy, x, t.ccol, t.row, t.perm, active, *conf), dtype,
          "grad_weight")
    full = _kept(torch.nn.grad.conv2d_weight(x, w.shape, gy, *conf[1:]), mask)
    rows = torch.repeat_interleave(torch.arange(O), (t.crow[1:] - t.crow[:-1]).long())
    close(gv, torch.where(active[rows], full, torch.zeros_like(full)), dtype, "grad_weight vs torch.nn.grad")
    assert bool((gv[~active[rows]] == 0).all()), "frozen channels must get exactly 0"


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
@pytest.mark.parametrize("geom", [(1, 16, 24, 150, 150, 3, 1, 1, 1), (2, 16, 24, 150, 147, 3, 2, 1, 1),
                                  (1, 8, 24, 120, 100, 5, 1, 2, 2)], ids=_geom_id)
def test_large_images_run_in_row_bands(geom, sparsity, dtype, gen):
    """Planes whose packed copy exceeds the per-thread L2 budget run in several bands of rows."""
    w, mask, t, x, bias, conf = make_conv(geom, sparsity, dtype, gen)
    tl = (t.crow, t.col, t.ccol, t.row, t.perm)
    y = ST.sparse_conv2d(x, t.values, *tl, bias, None, *conf)
    close(y, F.conv2d(x, w, bias, *conf[1:]), dtype, "forward")
    gy = randn(y.shape, dtype=dtype, gen=gen)
    close(ST.sparse_conv2d_grad_input(gy, t.values, t.crow, t.col, list(x.shape), *conf),
          torch.nn.grad.conv2d_input(x.shape, w, gy, *conf[1:]), dtype, "grad_input")
    close(ST.sparse_conv2d_grad_weight(gy, x, t.ccol, t.row, t.perm, None, *conf),
          _kept(torch.nn.grad.conv2d_weight(x, w.shape, gy, *conf[1:]), mask), dtype, "grad_weight")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("geom", [GEOMS[0], GEOMS[1], GEOMS[9]], ids=_geom_id)
def test_empty_channels(geom, dtype, gen):
    """Output channels with no kept weight give the bias; input channels with none get zero gradient."""
    w, mask, t, x, bias, conf = make_conv(geom, 0.5, dtype, gen, holes=True)
    tl = (t.crow, t.col, t.ccol, t.row, t.perm)
    y = ST.sparse_conv2d(x, t.values, *tl, bias, None, *conf)
    close(y, F.conv2d(x, w, bias, *conf[1:]), dtype, "forward")
    gy = randn(y.shape, dtype=dtype, gen=gen)
    gx = ST.sparse_conv2d_grad_input(gy, t.values, t.crow, t.col, list(x.shape), *conf)
    close(gx, torch.nn.grad.conv2d_input(x.shape, w, gy, *conf[1:]), dtype, "grad_input")
    empty_in = ~mask.any(dim=(0, 2, 3))
    assert bool((gx[:, empty_in] == 0).all())
    gv = ST.sparse_conv2d_grad_weight(gy, x, t.ccol, t.row, t.perm, None, *conf)
    close(gv, _kept(torch.nn.grad.conv2d_weight(x, w.shape, gy, *conf[1:]), mask), dtype, "grad_weight")


@pytest.mark.parametrize("kind", ["all", "none"])
def test_all_or_no_channels_active(kind, gen):
    w, mask, t, x, bias, conf = make_conv(GEOMS[0], 0.5, torch.float64, gen)
    active = make_active(w.shape[0], gen, kind)
    gy = randn(F.conv2d(x, w, None, *conf[1:]).shape, dtype=torch.float64, gen=gen)
    gv = ST.sparse_conv2d_grad_weight(gy, x, t.ccol, t.row, t.perm, active, *conf)
    close(gv, ref.reference_sparse_conv2d_grad_weight(gy, x, t.ccol, t.row, t.perm, active, *conf), torch.float64,
          "grad_weight")


def test_frozen_channels_ignore_nonfinite_gradients(gen):
    """A frozen channel's weight gradient is never computed, so NaN/inf in its gy do not leak."""
    w, mask, t, x, bias, conf = make_conv(GEOMS[0], 0.3, torch.float32, gen)
    O = w.shape[0]
    active = torch.ones(O, dtype=torch.bool)
    active[[1, 4]] = False
    gy = randn(F.conv2d(x, w, None, *conf[1:]).shape, gen=gen)
    gy[:, 1] = float("nan")
    gy[:, 4] = float("inf")
    gv = ST.sparse_conv2d_grad_weight(gy, x, t.ccol, t.row, t.perm, active, *conf)
    assert torch.isfinite(gv).all()
    # an Inf in x makes some active entries non-finite, so the exact re-summation runs: the
    # frozen channels' entries still stay exactly 0
    x[:, 0, 2, 3] = float("inf")
    gv = ST.sparse_conv2d_grad_weight(gy, x, t.ccol, t.row, t.perm, active, *conf)
    frozen = ~active[t.row.long()][torch.argsort(t.perm.long())]
    assert not gv[~frozen].isfinite().all()
    assert torch.equal(gv[frozen], torch.zeros_like(gv[frozen]))


NONFINITE_GEOMS = [GEOMS[0], GEOMS[1], GEOMS[4], GEOMS[6], (2, 4, 5, 28, 28, 3, 1, 1, 1), (2, 4, 5, 14, 14, 3, 1, 1, 1)]


def _ticket_conv_float64(x, w, mask, bias, conf, gy):
    """The ticket's conv and its gradients in float64 from the kept weights' products only
    (a pruned weight is absent, not a zero: Inf * 0 is NaN, so the dense masked conv is not
    the reference once inputs are non-finite). Padding is zeros, as in aten."""
    (kh, kw), stride, padding, dilation = conf
    N, O = x.shape[0], w.shape[0]
    xd = x.double().requires_grad_()
    patches = F.unfold(xd, (kh, kw), dilation, padding, stride)  # [N, C*kh*kw, L], columns (c, i, j)
    wk, cols, out = [], [], []
    for o in range(O):
        k = mask[o].flatten().nonzero().flatten()
        cols.append(k)
        wk.append(w[o].flatten()[k].double().requires_grad_())
        out.append(torch.einsum("k,nkl->nl", wk[-1], patches[:, k, :]))
    OH, OW = gy.shape[2:]
    y = torch.stack(out, 1).view(N, O, OH, OW) + bias.double().view(1, O, 1, 1)
    grads = torch.autograd.grad(y, [xd] + wk, gy.double(), allow_unused=True)
    gw = torch.zeros(w.shape, dtype=torch.float64)
    for o in range(O):
        if grads[1 + o] is not None:
            gw[o].view(-1)[cols[o]] = grads[1 + o]
    gx = grads[0] if grads[0] is not None else torch.zeros_like(xd)
    return y.detach(), gx, _kept(gw, mask)


@pytest.mark.parametrize("geom", NONFINITE_GEOMS, ids=_geom_id)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("dtype", FLOATS)
def test_nonfinite_inputs_reach_only_the_sums_that_read_them(geom, sparsity, dtype, gen):
    """Inf and NaN in x and gy reach exactly the outputs whose sums contain them: e.g. a
    weight gradient entry that never reads an Inf column stays finite, though the kernels
    load whole vectors across it."""
    gw_ref = check_nonfinite(geom, sparsity, dtype, gen)
    if sparsity < 0.9:  # the case is not vacuous: both kinds of entries are there
        assert gw_ref.isfinite().any() and not gw_ref.isfinite().all()


def check_nonfinite(geom, sparsity, dtype, gen):
    """test_nonfinite_inputs_reach_only_the_sums_that_read_them's check (also run by the
    layout-knob and ISA subprocesses)."""
    w, mask, t, x, bias, conf = make_conv(geom, sparsity, dtype, gen)
    H, W = x.shape[2:]
    x[:, 1 % x.shape[1], H // 2, W - 1] = float("inf")
    x[:, 2 % x.shape[1], H - 1, 0] = float("-inf")
    x[0, 3 % x.shape[1], 1, W // 2] = float("nan")
    gy = randn(F.conv2d(x, w, None, *conf[1:]).shape, dtype=dtype, gen=gen)
    gy[-1, 0, -1, -1] = float("inf")
    y_ref, gx_ref, gw_ref = _ticket_conv_float64(x, w, mask, bias, conf, gy)
    tl = (t.crow, t.col, t.ccol, t.row, t.perm)
    checks = [
        (ST.sparse_conv2d(x, t.values, *tl, bias, None, *conf), y_ref, "forward"),
        (ST.sparse_conv2d_grad_input(gy, t.values, t.crow, t.col, list(x.shape), *conf), gx_ref, "grad_input"),
        (ST.sparse_conv2d_grad_weight(gy, x, t.ccol, t.row, t.perm, None, *conf), gw_ref, "grad_weight"),
    ]
    for got, want, what in checks:
        fin = want.isfinite()
        assert torch.equal(got.isfinite(), fin), f"{what}: {int((got.isfinite() != fin).sum())} entries differ in finiteness"
        assert torch.equal(got[~fin].nan_to_num(0.0), want[~fin].to(dtype).nan_to_num(0.0)), \
            f"{what}: NaN where the reference has Inf, or an Inf of the other sign"
        close(got[fin], want[fin].to(dtype), dtype, what)
    return gw_ref


@pytest.mark.parametrize("dtype", FLOATS)
def test_noncontiguous_inputs(dtype, gen):
    w, mask, t, x, bias, conf = make_conv(GEOMS[1], 0.5, dtype, gen)
    tl = (t.crow, t.col, t.ccol, t.row, t.perm)
    y_ref = F.conv2d(x, w, bias, *conf[1:])
    gy = randn(y_ref.shape, dtype=dtype, gen=gen)
    for xs, gys in ((x.to(memory_format=torch.channels_last), gy.to(memory_format=torch.channels_last)),
                    (torch.cat([x, torch.full_like(x, float("nan"))], 3)[..., : x.shape[3]],
                     torch.cat([gy, torch.full_like(gy, float("nan"))], 2)[:, :, : gy.shape[2]])):
        assert not xs.is_contiguous() and not gys.is_contiguous()
        close(ST.sparse_conv2d(xs, t.values, *tl, bias, None, *conf), y_ref, dtype, "forward")
        close(ST.sparse_conv2d_grad_input(gys, t.values, t.crow, t.col, list(x.shape), *conf),
              torch.nn.grad.conv2d_input(x.shape, w, gy, *conf[1:]), dtype, "grad_input")
        close(ST.sparse_conv2d_grad_weight(gys, xs, t.ccol, t.row, t.perm, None, *conf),
              _kept(torch.nn.grad.conv2d_weight(x, w.shape, gy, *conf[1:]), mask), dtype, "grad_weight")


def test_zero_batch_and_channels(gen):
    """Empty batch, no output channels, no input channels: the right (empty or bias-only) results."""
    D = torch.float64
    for geom in [(0, 4, 5, 7, 7, 3, 1, 1, 1), (2, 4, 0, 7, 7, 3, 1, 1, 1), (2, 0, 5, 7, 7, 3, 1, 1, 1)]:
        w, mask, t, x, bias, conf = make_conv(geom, 0.5, D, gen)
        N, C, O = geom[:3]
        tl = (t.crow, t.col, t.ccol, t.row, t.perm)
        y = ST.sparse_conv2d(x, t.values, *tl, bias, None, *conf)
        assert y.shape == (N, O, 7, 7)
        close(y, bias.view(1, O, 1, 1).expand(N, O, 7, 7) if C == 0 else F.conv2d(x, w, bias, *conf[1:])
              if O else y.new_empty(y.shape), D, f"forward {geom}")
        gy = randn(y.shape, dtype=D, gen=gen)
        gx = ST.sparse_conv2d_grad_input(gy, t.values, t.crow, t.col, list(x.shape), *conf)
        close(gx, torch.nn.grad.conv2d_input(x.shape, w, gy, *conf[1:]) if O and C and N else torch.zeros_like(x),
              D, f"grad_input {geom}")
        gv = ST.sparse_conv2d_grad_weight(gy, x, t.ccol, t.row, t.perm, None, *conf)
        close(gv, _kept(torch.nn.grad.conv2d_weight(x, w.shape, gy, *conf[1:]), mask) if O and C and N else
              torch.zeros_like(t.values), D, f"grad_weight {geom}")


# ----------------------------------------------------------------------------- bad input


def test_bad_input_raises(gen):
    w, mask, t, x, bias, conf = make_conv(GEOMS[0], 0.5, torch.float32, gen)
    tl = [t.crow, t.col, t.ccol, t.row, t.perm]
    gy = randn(F.conv2d(x, w, None, *conf[1:]).shape, gen=gen)
    bad_col = t.col.clone()
    bad_col[0] = 10_000
    bad_row = t.row.clone()
    bad_row[0] = -1
    bad_perm = t.perm.clone()
    bad_perm[-1] = t.perm.numel()
    # row pointers that pass alone (monotone, ending at nnz) but count the entries by output
    # channel otherwise than `row` does: the forward's lists were filled past their end (review 47)
    other_crow = torch.full_like(t.crow, t.values.numel())
    other_crow[0] = 0
    assert not torch.equal(other_crow, t.crow)
    cases = {
        "crow of another ticket": lambda: ST.sparse_conv2d(x, t.values, other_crow, *tl[1:], None, None, *conf),
        "crow of another ticket, relu": lambda: ST.sparse_conv2d_relu(x, t.values, other_crow, *tl[1:], None, None,
                                                                      *conf),
        "col out of range": lambda: ST.sparse_conv2d(x, t.values, t.crow, bad_col, *tl[2:], None, None, *conf),
        "perm out of range": lambda: ST.sparse_conv2d(x, t.values, *tl[:4], bad_perm, None, None, *conf),
        "wrong in channels": lambda: ST.sparse_conv2d(x[:, :-1], t.values, *tl, None, None, *conf),
        "wrong dtype": lambda: ST.sparse_conv2d(x.double(), t.values, *tl, None, None, *conf),
        "3-D x": lambda: ST.sparse_conv2d(x[0], t.values, *tl, None, None, *conf),
        "bias size": lambda: ST.sparse_conv2d(x, t.values, *tl, bias[:-1], None, *conf),
        "kernel too big": lambda: ST.sparse_conv2d(x[..., :1, :1], t.values, *tl, None, None, (3, 3), (1, 1),
                                                   (0, 0), (1, 1)),
        "gi col out of range": lambda: ST.sparse_conv2d_grad_input(gy, t.values, t.crow, bad_col, list(x.shape),
                                                                    *conf),
        "gi gy shape": lambda: ST.sparse_conv2d_grad_input(gy[:, :, 1:], t.values, t.crow, t.col, list(x.shape),
                                                            *conf),
        "gw row out of range": lambda: ST.sparse_conv2d_grad_weight(gy, x, t.ccol, bad_row, t.perm, None, *conf),
        "gw perm out of range": lambda: ST.sparse_conv2d_grad_weight(gy, x, t.ccol, t.row, bad_perm, None, *conf),
        "gw batch": lambda: ST.sparse_conv2d_grad_weight(gy[:1], x, t.ccol, t.row, t.perm, None, *conf),
        "gw active size": lambda: ST.sparse_conv2d_grad_weight(gy, x, t.ccol, t.row, t.perm,
                                                               torch.ones(3, dtype=torch.bool), *conf),
    }
    for name, fn in cases.items():
        with pytest.raises(ERRORS, match="sparseticket"):
            fn()
            pytest.fail(name)


# ----------------------------------------------------------------------------- autograd, opcheck, compile


def _opcheck_cases():
    D = torch.float64
    g = torch.Generator().manual_seed(4321)
    w, mask, t, x, bias, conf = make_conv((2, 3, 4, 5, 6, 3, 1, 1, 1), 0.5, D, g)
    w2, mask2, t2, x2, bias2, conf2 = make_conv((2, 3, 4, 7, 5, 3, 2, 0, 1), 0.5, D, g)
    _, _, te, _, _, _ = make_conv((2, 3, 4, 5, 6, 3, 1, 1, 1), 1.0, D, g)
    act = torch.tensor([True, False, True, False])
    gy = randn(2, 4, 5, 6, dtype=D, gen=g)
    gy2 = randn(2, 4, 3, 2, dtype=D, gen=g)

    def rg(a):
        return a.detach().clone().requires_grad_()

    def tl(tt):
        return (tt.crow, tt.col, tt.ccol, tt.row, tt.perm)

    S = ST
    return {
        "fwd": (S.sparse_conv2d, (x, t.values, *tl(t), bias, act, *conf)),
        "fwd-grad": (S.sparse_conv2d, (rg(x), rg(t.values), *tl(t), rg(bias), act, *conf)),
        "fwd-grad-stride2": (S.sparse_conv2d, (rg(x2), rg(t2.values), *tl(t2), None, None, *conf2)),
        "fwd-grad-empty": (S.sparse_conv2d, (rg(x), rg(te.values), *tl(te), rg(bias), None, *conf)),
        "grad_input": (S.sparse_conv2d_grad_input, (gy, t.values, t.crow, t.col, list(x.shape), *conf)),
        "grad_input-stride2": (S.sparse_conv2d_grad_input, (gy2, t2.values, t2.crow, t2.col, list(x2.shape), *conf2)),
        "grad_weight": (S.sparse_conv2d_grad_weight, (gy, x, t.ccol, t.row, t.perm, act, *conf)),
        "grad_weight-noact": (S.sparse_conv2d_grad_weight, (gy2, x2, t2.ccol, t2.row, t2.perm, None, *conf2)),
    }


OPCHECK_CASES = _opcheck_cases()


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck(case):
    op, args = OPCHECK_CASES[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("geom", [(2, 3, 4, 5, 6, 3, 1, 1, 1), (2, 3, 4, 7, 5, 3, 2, 1, 1),
                                  (1, 2, 3, 6, 7, (2, 3), (1, 2), (1, 0), 2)], ids=_geom_id)
def test_gradcheck(geom, gen):
    w, mask, t, x, bias, conf = make_conv(geom, 0.5, torch.float64, gen)
    tl = (t.crow, t.col, t.ccol, t.row, t.perm)
    active = make_active(w.shape[0], gen, "all")

    def f(x, v, b):
        return ST.sparse_conv2d(x, v, *tl, b, active, *conf)

    args = (x.clone().requires_grad_(), t.values.clone().requires_grad_(), bias.clone().requires_grad_())
    assert torch.autograd.gradcheck(f, args)


def test_frozen_channels_get_no_weight_or_bias_gradient(gen):
    w, mask, t, x, bias, conf = make_conv(GEOMS[0], 0.4, torch.float64, gen)
    tl = (t.crow, t.col, t.ccol, t.row, t.perm)
    active = make_active(w.shape[0], gen)
    v, b, xx = t.values.clone().requires_grad_(), bias.clone().requires_grad_(), x.clone().requires_grad_()
    ST.sparse_conv2d(xx, v, *tl, b, active, *conf).square().sum().backward()
    rows = torch.repeat_interleave(torch.arange(w.shape[0]), (t.crow[1:] - t.crow[:-1]).long())
    assert bool((v.grad[~active[rows]] == 0).all()) and bool((b.grad[~active] == 0).all())
    x2 = x.clone().requires_grad_()
    F.conv2d(x2, w, bias, *conf[1:]).square().sum().backward()
    close(xx.grad, x2.grad, torch.float64, "input gradient still flows through frozen channels")


def _module_cases():
    return [
        dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
        dict(in_channels=3, out_channels=5, kernel_size=3, stride=2, padding=1),
        dict(in_channels=3, out_channels=4, kernel_size=(3, 5), padding="same", dilation=2),
        dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"),
        dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, groups=2),  # im2col path
        dict(in_channels=4, out_channels=6, kernel_size=1, bias=False),
    ]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("case", range(len(_module_cases())))
def test_module_matches_masked_dense_conv(case, sparsity, dtype, gen):
    kw = _module_cases()[case]
    conv = torch.nn.Conv2d(**kw).to(dtype)
    mask = torch.rand(conv.weight.shape, generator=gen) >= sparsity
    m = stnn.SparseConv2d.from_dense(conv, mask, mode="sparse")
    d = m.to_dense()
    x = randn(3, kw["in_channels"], 9, 7, dtype=dtype, gen=gen).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y, y2 = m(x), d(x2)
    close(y, y2, dtype, "forward")
    gy = randn(y.shape, dtype=dtype, gen=gen)
    y.backward(gy)
    y2.backward(gy)
    close(x.grad, x2.grad, dtype, "input gradient")
    O = d.weight.shape[0]
    kept = d.weight.grad.permute(0, 2, 3, 1).reshape(O, -1)[m.mask().permute(0, 2, 3, 1).reshape(O, -1)]
    close(m.weight_values.grad, kept, dtype, "kept-weight gradient")
    if m.bias is not None:
        close(m.bias.grad, d.bias.grad, dtype, "bias gradient")


def test_module_uses_direct_path_for_groups_1(gen, monkeypatch):
    import sparseticket.nn.conv as conv_mod
    calls = []
    direct = conv_mod._sparse_conv2d
    monkeypatch.setattr(conv_mod, "_sparse_conv2d", lambda *a: calls.append(1) or direct(*a))
    x = randn(2, 4, 8, 8, gen=gen)
    stnn.SparseConv2d(4, 6, 3, padding=1, density=0.3, mode="sparse")(x)
    assert len(calls) == 1
    stnn.SparseConv2d(4, 6, 3, padding=1, groups=2, density=0.3, mode="sparse")(x)  # im2col
    assert len(calls) == 1


def test_compile_fullgraph(gen):
    torch._dynamo.reset()
    m = stnn.SparseConv2d(4, 6, 3, stride=2, padding=1, density=0.3, mode="sparse")
    x = randn(2, 4, 9, 9, gen=gen)

    def step(x):
        x = x.clone().requires_grad_()
        y = m(x)
        return torch.autograd.grad(y.square().sum(), [m.weight_values, m.bias, x])

    compiled = torch.compile(lambda x: m(x), fullgraph=True, backend="aot_eager")
    close(compiled(x), m(x), torch.float32, "compiled forward")
    xg = x.clone().requires_grad_()
    yc = compiled(xg)
    yc.square().sum().backward()
    gv, gb, gx = m.weight_values.grad.clone(), m.bias.grad.clone(), xg.grad.clone()
    m.zero_grad()
    eager = step(x)
    close(gv, eager[0], torch.float32, "compiled kept-weight gradient")
    close(gb, eager[1], torch.float32, "compiled bias gradient")
    close(gx, eager[2], torch.float32, "compiled input gradient")


@pytest.mark.parametrize("isa", ["avx2", "base"])
def test_other_isas(isa):
    """The AVX2 and portable instantiations (picked once per process) on a few geometries."""
    code = r"""
import torch, torch.nn.functional as F, sys
sys.path.insert(0, sys.argv[1])
import sparseticket
from sparseticket import _C
assert _C.cpu_isa() == sys.argv[2], _C.cpu_isa()
from test_sparse_conv import make_conv, GEOMS, close, _kept, check_nonfinite
ST = torch.ops.sparseticket
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.float64):
    for geom in (GEOMS[1], GEOMS[6], GEOMS[8], GEOMS[9], GEOMS[12], GEOMS[13]):
        w, mask, t, x, bias, conf = make_conv(geom, 0.5, dtype, g)
        tl = (t.crow, t.col, t.ccol, t.row, t.perm)
        y = ST.sparse_conv2d(x, t.values, *tl, bias, None, *conf)
        close(y, F.conv2d(x, w, bias, *conf[1:]), dtype, "forward")
        assert torch.equal(ST.sparse_conv2d_relu(x, t.values, *tl, bias, None, *conf), torch.relu(y))
        gy = torch.randn(y.shape, dtype=dtype)
        close(ST.sparse_conv2d_grad_input(gy, t.values, t.crow, t.col, list(x.shape), *conf),
              torch.nn.grad.conv2d_input(x.shape, w, gy, *conf[1:]), dtype, "grad_input")
        close(ST.sparse_conv2d_grad_weight(gy, x, t.ccol, t.row, t.perm, None, *conf),
              _kept(torch.nn.grad.conv2d_weight(x, w.shape, gy, *conf[1:]), mask), dtype, "grad_weight")
        check_nonfinite(geom, 0.5, dtype, g)
print("ok")
"""
    run_under_isa(code, isa)


@pytest.mark.parametrize("env", [dict(SPARSETICKET_CONV_BLOCK_ENTRIES="1", SPARSETICKET_CONV_BLOCK_BYTES="0",
                                      SPARSETICKET_CONV_SHIFTED="1"),
                                 dict(SPARSETICKET_CONV_BLOCK_ENTRIES="1", SPARSETICKET_CONV_BLOCK_BYTES="0",
                                      SPARSETICKET_CONV_SHIFTED="0"),
                                 dict(SPARSETICKET_CONV_BLOCK_ENTRIES="1", SPARSETICKET_CONV_BLOCK_BYTES="1500"),
                                 dict(SPARSETICKET_CONV_BLOCK_ENTRIES="1e9", SPARSETICKET_CONV_SHIFTED="1"),
                                 dict(SPARSETICKET_CONV_BLOCK_ENTRIES="1e9", SPARSETICKET_CONV_SHIFTED="0"),
                                 dict(SPARSETICKET_CONV_PLAN_CACHE_MB="0"),
                                 dict(SPARSETICKET_CONV_GW_SHIFTED="1"),
                                 dict(SPARSETICKET_CONV_GW_SHIFTED="0"),
                                 dict(SPARSETICKET_CONV_GW_SHIFTED="1", SPARSETICKET_CONV_BAND_BYTES="2048"),
                                 dict(SPARSETICKET_CONV_HALF="0")],
                         ids=["one_plane_blocks_shifted", "one_plane_blocks_unshifted", "byte_sized_blocks",
                              "one_block_shifted",
                              "one_block_unshifted", "no_plan_cache", "gw_gy_shifted", "gw_x_shifted",
                              "gw_gy_shifted_bands", "no_half_vectors"])
def test_layout_knobs(env):
    """Correlate's extremes (conv.h), which the default choice per density may never pick at
    test sizes: a block per plane (partial tiles through scratch between every plane), blocks of
    a few planes (the byte floor that AVX2 builds apply, set small) or one block; shifted copies (aligned loads, in the forward and the input gradient) forced on or
    off; the weight gradient's column shift on x or on gy (dots / dots_shifted, conv.h), also
    in bands of a few rows and with frozen channels. The knobs are read once per process, hence
    the subprocess. With AVX2, rows of a whole number of vectors where a half-vector tail
    would otherwise be taken (SPARSETICKET_CONV_HALF=0)."""
    code = r"""
import torch, torch.nn.functional as F, sys
sys.path.insert(0, sys.argv[1])
from test_sparse_conv import make_conv, GEOMS, close, _kept, check_nonfinite
ST = torch.ops.sparseticket
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.float64):
    for geom in (GEOMS[0], GEOMS[1], GEOMS[4], GEOMS[6], GEOMS[7], GEOMS[9], GEOMS[10], (2, 6, 5, 14, 14, 3, 1, 1, 2)):
        for sparsity in (0.0, 0.3, 0.8):
            w, mask, t, x, bias, conf = make_conv(geom, sparsity, dtype, g)
            tl = (t.crow, t.col, t.ccol, t.row, t.perm)
            y = ST.sparse_conv2d(x, t.values, *tl, bias, None, *conf)
            close(y, F.conv2d(x, w, bias, *conf[1:]), dtype, f"forward {geom} {sparsity}")
            gy = torch.randn(y.shape, dtype=dtype)
            close(ST.sparse_conv2d_grad_input(gy, t.values, t.crow, t.col, list(x.shape), *conf),
                  torch.nn.grad.conv2d_input(x.shape, w, gy, *conf[1:]), dtype, f"grad_input {geom} {sparsity}")
            gw = _kept(torch.nn.grad.conv2d_weight(x, w.shape, gy, *conf[1:]), mask)
            close(ST.sparse_conv2d_grad_weight(gy, x, t.ccol, t.row, t.perm, None, *conf), gw, dtype,
                  f"grad_weight {geom} {sparsity}")
            active = torch.rand(w.shape[0], generator=g) < 0.5
            trained = active.view(-1, 1, 1, 1).to(dtype)
            gw_active = _kept(torch.nn.grad.conv2d_weight(x, w.shape, gy, *conf[1:]) * trained, mask)
            close(ST.sparse_conv2d_grad_weight(gy, x, t.ccol, t.row, t.perm, active, *conf), gw_active, dtype,
                  f"grad_weight frozen {geom} {sparsity}")
            if sparsity == 0.3:
                check_nonfinite(geom, sparsity, dtype, g)
print("ok")
"""
    from sparseticket.ops import _C
    if _C is None:
        pytest.skip("compiled kernels not built")
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, OMP_NUM_THREADS="2", **env,
               PYTHONPATH=os.pathsep.join([os.path.dirname(here), here, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code, here], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


# ----------------------------------------------------------------------------- plan cache
# The C++ ops keep the entry lists they build per (geometry, ticket) and reuse them while the
# index arrays hold the same contents; these check that no ticket change meets a stale plan.


def _conv_ops(t, x, bias, gy, conf):
    tl = (t.crow, t.col, t.ccol, t.row, t.perm)
    ST_ = torch.ops.sparseticket
    return (ST_.sparse_conv2d(x, t.values, *tl, bias, None, *conf),
            ST_.sparse_conv2d_grad_input(gy, t.values, t.crow, t.col, list(x.shape), *conf),
            ST_.sparse_conv2d_grad_weight(gy, x, t.ccol, t.row, t.perm, None, *conf))


def _check_conv_ops(got, w, mask, x, bias, gy, conf, what):
    y, gx, gv = got
    close(y, F.conv2d(x, w, bias, *conf[1:]), x.dtype, f"{what}: forward")
    close(gx, torch.nn.grad.conv2d_input(x.shape, w, gy, *conf[1:]), x.dtype, f"{what}: grad_input")
    close(gv, _kept(torch.nn.grad.conv2d_weight(x, w.shape, gy, *conf[1:]), mask), x.dtype, f"{what}: grad_weight")


@pytest.mark.parametrize("how", ["copy_", "no_version_bump"])
@pytest.mark.parametrize("geom", [GEOMS[0], GEOMS[1], GEOMS[9]], ids=_geom_id)
def test_plan_cache_sees_index_arrays_rewritten_in_place(geom, how, gen):
    """The same index tensors (same data_ptr, same nnz) rewritten with another ticket, through
    torch (version counter bumped) or behind its back (not bumped): the next calls follow."""
    w1, m1, t1, x, bias, conf = make_conv(geom, 0.5, torch.float32, gen)
    w2, m2, t2, _, _, _ = make_conv(geom, 0.5, torch.float32, gen)
    assert t1.values.numel() == t2.values.numel() and not torch.equal(m1, m2)
    gy = randn(F.conv2d(x, w1, bias, *conf[1:]).shape, gen=gen)
    _check_conv_ops(_conv_ops(t1, x, bias, gy, conf), w1, m1, x, bias, gy, conf, "first ticket")
    ptrs = [a.data_ptr() for a in (t1.crow, t1.col, t1.ccol, t1.row, t1.perm)]
    for a, b in ((t1.values, t2.values), (t1.crow, t2.crow), (t1.col, t2.col), (t1.ccol, t2.ccol),
                 (t1.row, t2.row), (t1.perm, t2.perm)):
        if how == "copy_":
            a.copy_(b)
        else:
            a.numpy()[:] = b.numpy()
    assert ptrs == [a.data_ptr() for a in (t1.crow, t1.col, t1.ccol, t1.row, t1.perm)]
    _check_conv_ops(_conv_ops(t1, x, bias, gy, conf), w2, m2, x, bias, gy, conf, "rewritten ticket")


def test_plan_cache_two_tickets_same_shape(gen):
    """Two tickets of one geometry and nnz, called alternately: each gets its own lists."""
    geom = (3, 16, 24, 14, 14, 3, 1, 1, 1)
    cases = [make_conv(geom, 0.5, torch.float32, gen) for _ in range(2)]
    x, bias, conf = cases[0][3], cases[0][4], cases[0][5]
    gy = randn(3, 24, 14, 14, gen=gen)
    for _ in range(2):
        for k, (w, mask, t, _, _, _) in enumerate(cases):
            _check_conv_ops(_conv_ops(t, x, bias, gy, conf), w, mask, x, bias, gy, conf, f"ticket {k}")


def _module_step(m, x, gy):
    m.zero_grad()
    xx = x.clone().requires_grad_()
    y = m(xx)
    y.backward(gy)
    return y.detach(), xx.grad, m.weight_values.grad.clone()


def _check_module(m, x, gy, what):
    d = m.to_dense()
    y, gx, gv = _module_step(m, x, gy)
    x2 = x.clone().requires_grad_()
    y2 = d(x2)
    y2.backward(gy)
    close(y, y2, x.dtype, f"{what}: forward")
    close(gx, x2.grad, x.dtype, f"{what}: input gradient")
    O = d.weight.shape[0]
    kept = d.weight.grad.permute(0, 2, 3, 1).reshape(O, -1)[m.mask().permute(0, 2, 3, 1).reshape(O, -1)]
    close(gv, kept, x.dtype, f"{what}: kept-weight gradient")


def test_plan_cache_module_mask_change_and_state_dict(gen):
    """SparseConv2d: a set_mask after calls (same nnz, so the Parameter stays) gives the new
    ticket's results; two modules of one shape with different tickets; a state dict loaded
    into a fresh module (different ticket before the load) computes as the original."""
    x = randn(4, 16, 14, 14, gen=gen)
    gy = randn(4, 24, 14, 14, gen=gen)
    a = stnn.SparseConv2d(16, 24, 3, padding=1, density=0.5, mode="sparse")
    b = stnn.SparseConv2d(16, 24, 3, padding=1, density=0.5, mode="sparse")
    assert a.nnz == b.nnz and not torch.equal(a.mask(), b.mask())
    for _ in range(2):
        _check_module(a, x, gy, "module a")
        _check_module(b, x, gy, "module b")
    flat = torch.zeros(a.mask().numel(), dtype=torch.bool)
    flat[torch.randperm(flat.numel(), generator=gen)[:a.nnz]] = True
    a.set_mask(flat.view(a.mask().shape), torch.randn(a.mask().shape, generator=gen))
    _check_module(a, x, gy, "module a after set_mask")
    fresh = stnn.SparseConv2d(16, 24, 3, padding=1, density=0.5, mode="sparse")
    fresh(x)  # its own ticket's plan first
    fresh.load_state_dict(a.state_dict())
    assert torch.equal(fresh.mask(), a.mask())
    close(fresh(x), a(x), torch.float32, "loaded module")
    _check_module(fresh, x, gy, "loaded module")


def test_conv_tuning_follows_cpu_vendor():
    """The conv layout thresholds (csrc/cpu/ops_conv.cpp) are picked by CPU vendor: the
    Intel table on GenuineIntel, the Zen 4 one elsewhere; `python -m sparseticket.info`
    names the one in use."""
    from sparseticket import info
    from sparseticket.ops import _C
    if _C is None:
        pytest.skip("compiled kernels not built")
    try:
        with open("/proc/cpuinfo") as f:
            vendor = next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), None)
    except OSError:
        vendor = None
    if vendor is None:
        pytest.skip("no vendor_id in /proc/cpuinfo")
    want = "intel" if vendor == "GenuineIntel" else "zen4"
    assert _C.cpu_conv_tuning() == want
    assert f"direct conv layout thresholds: {want}" in info.report()
