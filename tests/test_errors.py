"""Bad input gets a clear error that names the offending argument, never a crash or a
silently wrong answer.

Mismatched devices use "meta" as the second device: a meta operand makes the dispatcher
pick the Meta (fake) kernel, so the op must reject the mix there too instead of returning
an uninitialised tensor.
"""
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import BACKEND, ERRORS, ST, make_mask, randn, ref_ticket

import sparseticket
from sparseticket import Ticket

O, I, B = 4, 5, 3
_g = torch.Generator().manual_seed(7)
W = randn(O, I, gen=_g)
MASK = make_mask(O, I, 0.5, _g)
T = ref_ticket(W, MASK)
X, GY, BIAS = randn(B, I, gen=_g), randn(B, O, gen=_g), randn(O, gen=_g)
ACT = torch.tensor([True, False, True, False])


def names(*words):
    """A regex that matches only if every word appears as a whole word (any order)."""
    return "(?s)" + "".join(rf"(?=.*(?<![\w\[]){re.escape(w)}(?![\w]))" for w in words)


def meta(t):
    return t.to("meta")


def spmm(x=X, values=T.values, crow=T.crow, col=T.col, bias=BIAS):
    return ST.spmm(x, values, crow, col, bias)


def spmm_t(gy=GY, values=T.values, ccol=T.ccol, row=T.row, perm=T.perm):
    return ST.spmm_t(gy, values, ccol, row, perm)


def sddmm(gy=GY, x=X, crow=T.crow, col=T.col, active=ACT):
    return ST.sddmm(gy, x, crow, col, active)


def rmgw(gy=GY, x=X, active=ACT):
    return ST.row_masked_grad_weight(gy, x, active)


def mbg(gy=GY, active=ACT):
    return ST.masked_bias_grad(gy, active)


def sparse_linear(x=X, values=T.values, crow=T.crow, col=T.col, ccol=T.ccol, row=T.row, perm=T.perm, bias=BIAS,
                  active=ACT):
    return ST.sparse_linear(x, values, crow, col, ccol, row, perm, bias, active)


def slb(gy=GY, y=GY.flip(0), x=X, values=T.values, crow=T.crow, col=T.col, ccol=T.ccol, row=T.row, perm=T.perm,
        active=ACT):
    return ST.sparse_linear_backward(gy, y, x, values, crow, col, ccol, row, perm, active, True)


def neq_linear(x=X, weight=W, bias=BIAS, active=ACT):
    return ST.neq_linear(x, weight, bias, active)


def d2t(weight=W, mask=MASK):
    return ST.dense_to_ticket(weight, mask)


def transpose(crow=T.crow, col=T.col, n_cols=I):
    return ST.ticket_transpose(crow, col, n_cols)


def to_dense(values=T.values, crow=T.crow, col=T.col, n_cols=I):
    return ST.ticket_to_dense(values, crow, col, n_cols)


CASES = {
    # spmm
    "spmm-x-int": (lambda: spmm(x=X.long()), names("x")),
    "spmm-x-float16": (lambda: spmm(x=X.half()), names("x")),
    "spmm-x-1d": (lambda: spmm(x=X[0]), names("x")),
    "spmm-x-3d": (lambda: spmm(x=X[None]), names("x")),
    "spmm-values-dtype": (lambda: spmm(values=T.values.double()), names("values")),
    "spmm-values-2d": (lambda: spmm(values=T.values[None]), names("values")),
    "spmm-crow-int64": (lambda: spmm(crow=T.crow.long()), names("crow")),
    "spmm-col-int64": (lambda: spmm(col=T.col.long()), names("col")),
    "spmm-col-length": (lambda: spmm(col=T.col[:-1]), names("col")),
    "spmm-bias-length": (lambda: spmm(bias=torch.zeros(O + 1)), names("bias")),
    "spmm-bias-dtype": (lambda: spmm(bias=BIAS.double()), names("bias")),
    "spmm-bias-2d": (lambda: spmm(bias=BIAS[None]), names("bias")),
    "spmm-x-meta": (lambda: spmm(x=meta(X)), names("x", "meta")),
    "spmm-values-meta": (lambda: spmm(values=meta(T.values)), names("values", "meta")),
    "spmm-crow-meta": (lambda: spmm(crow=meta(T.crow)), names("crow", "meta")),
    "spmm-col-meta": (lambda: spmm(col=meta(T.col)), names("col", "meta")),
    "spmm-bias-meta": (lambda: spmm(bias=meta(BIAS)), names("bias", "meta")),
    # spmm_t
    "spmm_t-gy-int": (lambda: spmm_t(gy=GY.int()), names("gy")),
    "spmm_t-gy-float16": (lambda: spmm_t(gy=GY.half()), names("gy")),
    "spmm_t-gy-1d": (lambda: spmm_t(gy=GY[0]), names("gy")),
    "spmm_t-values-dtype": (lambda: spmm_t(values=T.values.double()), names("values")),
    "spmm_t-ccol-int64": (lambda: spmm_t(ccol=T.ccol.long()), names("ccol")),
    "spmm_t-row-int64": (lambda: spmm_t(row=T.row.long()), names("row")),
    "spmm_t-perm-int64": (lambda: spmm_t(perm=T.perm.long()), names("perm")),
    "spmm_t-row-length": (lambda: spmm_t(row=T.row[:-1]), names("row")),
    "spmm_t-perm-length": (lambda: spmm_t(perm=T.perm[:-1]), names("perm")),
    "spmm_t-gy-meta": (lambda: spmm_t(gy=meta(GY)), names("gy", "meta")),
    "spmm_t-perm-meta": (lambda: spmm_t(perm=meta(T.perm)), names("perm", "meta")),
    # sddmm
    "sddmm-gy-int": (lambda: sddmm(gy=GY.long()), names("gy")),
    "sddmm-x-float16": (lambda: sddmm(x=X.half()), names("x")),
    "sddmm-x-dtype-mismatch": (lambda: sddmm(x=X.double()), names("x")),
    "sddmm-batch-mismatch": (lambda: sddmm(x=X[:-1]), names("batch")),
    "sddmm-gy-columns": (lambda: sddmm(gy=torch.zeros(B, O + 1)), names("gy")),
    "sddmm-crow-int64": (lambda: sddmm(crow=T.crow.long()), names("crow")),
    "sddmm-active-float": (lambda: sddmm(active=ACT.float()), names("active")),
    "sddmm-active-uint8": (lambda: sddmm(active=ACT.to(torch.uint8)), names("active")),
    "sddmm-active-length": (lambda: sddmm(active=ACT[:-1]), names("active")),
    "sddmm-active-2d": (lambda: sddmm(active=ACT[None]), names("active")),
    "sddmm-x-meta": (lambda: sddmm(x=meta(X)), names("x", "meta")),
    "sddmm-active-meta": (lambda: sddmm(active=meta(ACT)), names("active", "meta")),
    # sparse_linear_backward: its own arguments, and those it shares with spmm_t and sddmm
    "slb-y-shape": (lambda: slb(y=GY[:-1]), names("y", "shape")),
    "slb-y-dtype": (lambda: slb(y=GY.double()), names("y")),
    "slb-y-meta": (lambda: slb(y=meta(GY)), names("y", "meta")),
    "slb-x-features": (lambda: slb(x=torch.zeros(B, I + 1)), names("x", "in_features")),
    "slb-gy-float16": (lambda: slb(gy=GY.half(), y=None), names("gy")),
    "slb-batch-mismatch": (lambda: slb(x=X[:-1]), names("batch")),
    "slb-values-length": (lambda: slb(values=T.values[:-1]), names("values")),
    "slb-perm-length": (lambda: slb(perm=T.perm[:-1]), names("perm")),
    "slb-active-length": (lambda: slb(active=ACT[:-1]), names("active")),
    "slb-col-range": (lambda: slb(col=T.col + I), names("col")),
    "slb-row-range": (lambda: slb(row=T.row + O), names("row")),
    # row_masked_grad_weight
    "rmgw-gy-float16": (lambda: rmgw(gy=GY.half()), names("gy")),
    "rmgw-x-int": (lambda: rmgw(x=X.int()), names("x")),
    "rmgw-x-dtype-mismatch": (lambda: rmgw(x=X.double()), names("x")),
    "rmgw-batch-mismatch": (lambda: rmgw(x=X[:-1]), names("batch")),
    "rmgw-active-float": (lambda: rmgw(active=ACT.float()), names("active")),
    "rmgw-active-length": (lambda: rmgw(active=torch.ones(O + 1, dtype=torch.bool)), names("active")),
    "rmgw-x-meta": (lambda: rmgw(x=meta(X)), names("x", "meta")),
    "rmgw-active-meta": (lambda: rmgw(active=meta(ACT)), names("active", "meta")),
    # masked_bias_grad
    "mbg-gy-float16": (lambda: mbg(gy=GY.half()), names("gy")),
    "mbg-gy-int": (lambda: mbg(gy=GY.long()), names("gy")),
    "mbg-gy-1d": (lambda: mbg(gy=GY[0]), names("gy")),
    "mbg-active-float": (lambda: mbg(active=ACT.float()), names("active")),
    "mbg-active-length": (lambda: mbg(active=ACT[:-1]), names("active")),
    "mbg-active-2d": (lambda: mbg(active=ACT[None]), names("active")),
    "mbg-active-meta": (lambda: mbg(active=meta(ACT)), names("active", "meta")),
    # sparse_linear
    "sparse_linear-x-int": (lambda: sparse_linear(x=X.long()), names("x")),
    "sparse_linear-x-float16": (lambda: sparse_linear(x=X.half()), names("x")),
    "sparse_linear-x-1d": (lambda: sparse_linear(x=X[0]), names("x")),
    "sparse_linear-values-dtype": (lambda: sparse_linear(values=T.values.double()), names("values")),
    "sparse_linear-crow-int64": (lambda: sparse_linear(crow=T.crow.long()), names("crow")),
    "sparse_linear-bias-length": (lambda: sparse_linear(bias=torch.zeros(O - 1)), names("bias")),
    "sparse_linear-active-float": (lambda: sparse_linear(active=ACT.float()), names("active")),
    "sparse_linear-active-length": (lambda: sparse_linear(active=ACT[:-1]), names("active")),
    "sparse_linear-x-meta": (lambda: sparse_linear(x=meta(X)), names("x", "meta")),
    "sparse_linear-bias-meta": (lambda: sparse_linear(bias=meta(BIAS)), names("bias", "meta")),
    "sparse_linear-active-meta": (lambda: sparse_linear(active=meta(ACT)), names("active", "meta")),
    # neq_linear
    "neq_linear-x-int": (lambda: neq_linear(x=X.long()), names("x")),
    "neq_linear-x-float16": (lambda: neq_linear(x=X.half()), names("x")),
    "neq_linear-weight-dtype": (lambda: neq_linear(weight=W.double()), names("weight")),
    "neq_linear-weight-int": (lambda: neq_linear(weight=W.long()), names("weight")),
    "neq_linear-weight-in-features": (lambda: neq_linear(weight=W[:, :-1]), names("weight")),
    "neq_linear-weight-1d": (lambda: neq_linear(weight=W[0]), names("weight")),
    "neq_linear-bias-length": (lambda: neq_linear(bias=torch.zeros(O + 1)), names("bias")),
    "neq_linear-bias-dtype": (lambda: neq_linear(bias=BIAS.double()), names("bias")),
    "neq_linear-active-float": (lambda: neq_linear(active=ACT.double()), names("active")),
    "neq_linear-active-length": (lambda: neq_linear(active=ACT[:-1]), names("active")),
    "neq_linear-weight-meta": (lambda: neq_linear(weight=meta(W)), names("weight", "meta")),
    "neq_linear-active-meta": (lambda: neq_linear(active=meta(ACT)), names("active", "meta")),
    "sparse_linear-x-narrower": (lambda: sparse_linear(x=X[:, :-1]), names("x")),
    "sparse_linear-x-wider": (lambda: sparse_linear(x=torch.zeros(B, I + 1)), names("x")),
    "sparse_linear-ccol-int64": (lambda: sparse_linear(ccol=T.ccol.long()), names("ccol")),
    # dense_to_ticket
    "d2t-weight-int": (lambda: d2t(weight=W.long()), names("weight")),
    "d2t-weight-float16": (lambda: d2t(weight=W.half()), names("weight")),
    "d2t-weight-1d": (lambda: d2t(weight=W[0], mask=MASK[0]), names("weight")),
    "d2t-mask-float": (lambda: d2t(mask=MASK.float()), names("mask")),
    "d2t-mask-int": (lambda: d2t(mask=MASK.long()), names("mask")),
    "d2t-mask-shape": (lambda: d2t(mask=MASK[:, :-1]), names("mask")),
    "d2t-mask-transposed-shape": (lambda: d2t(mask=MASK.t()), names("mask")),
    "d2t-mask-meta": (lambda: d2t(mask=meta(MASK)), names("mask", "meta")),
    "d2t-weight-meta": (lambda: d2t(weight=meta(W)), names("weight", "meta")),
    # ticket_transpose / ticket_to_dense: a meta operand sends the call to the Meta (fake)
    # kernel, which must refuse rather than hand back uninitialised CPU memory
    "transpose-col-meta": (lambda: transpose(col=meta(T.col)), names("col", "meta")),
    "transpose-crow-meta": (lambda: transpose(crow=meta(T.crow)), names("crow", "meta")),
    "to_dense-crow-meta": (lambda: to_dense(crow=meta(T.crow)), names("crow", "meta")),
    "to_dense-col-meta": (lambda: to_dense(col=meta(T.col)), names("col", "meta")),
    "to_dense-values-meta": (lambda: to_dense(values=meta(T.values)), names("values", "meta")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_names_argument(case):
    fn, match = CASES[case]
    with pytest.raises(ERRORS, match=match):
        fn()


@pytest.mark.skipif(BACKEND != "c++", reason="the reference indexes values with torch, whose error names no argument")
def test_spmm_t_perm_out_of_range_cpp():
    # the kernel reads values through perm (or gathers them by it): a bad index must raise
    with pytest.raises(ERRORS, match=names("perm")):
        spmm_t(perm=torch.full_like(T.perm, T.values.numel()))


# Index-array checks of the conversion ops, on every backend.
UNCHECKED = [
    pytest.param(lambda: transpose(col=T.col.float()), names("col"), id="transpose-col-float"),
    pytest.param(lambda: to_dense(crow=T.crow[None]), names("crow"), id="to_dense-crow-2d"),
    pytest.param(lambda: transpose(crow=T.crow.long()), names("crow"), id="transpose-crow-int64"),
    pytest.param(lambda: transpose(col=T.col.long()), names("col"), id="transpose-col-int64"),
    pytest.param(lambda: to_dense(crow=T.crow.long()), names("crow"), id="to_dense-crow-int64"),
    pytest.param(lambda: to_dense(col=T.col.long()), names("col"), id="to_dense-col-int64"),
]


@pytest.mark.parametrize("fn,match", UNCHECKED)
def test_bad_input_names_argument_structure_ops(fn, match):
    with pytest.raises(ERRORS, match=match):
        fn()


# ----------------------------------------------------------------------------- masked_sgd_


def _sgd_args():
    p = [randn(O, I, gen=_g), randn(T.nnz, dtype=torch.float64, gen=_g)]
    return dict(params=p, grads=[torch.zeros_like(t) for t in p], bufs=[torch.zeros_like(t) for t in p],
                keeps=[MASK, None], actives=[ACT, ACT], row_ptrs=[None, T.crow], fresh=[False, False], momentum=0.9)


def sgd(**over):
    a = _sgd_args()
    a.update(over)
    return ST.masked_sgd_(a["params"], a["grads"], a["bufs"], a["keeps"], a["actives"], a["row_ptrs"], a["fresh"],
                          0.1, a["momentum"], 0.0, 0.0, False, False)


def _p():
    return _sgd_args()["params"]


SGD_CASES = {
    "grads-length": (lambda: sgd(grads=[torch.zeros(O, I)]), names("grads")),
    "keep_masks-length": (lambda: sgd(keeps=[MASK]), names("keep_masks")),
    "active_masks-length": (lambda: sgd(actives=[ACT, ACT, ACT]), names("active_masks")),
    "row_ptrs-length": (lambda: sgd(row_ptrs=[None]), names("row_ptrs")),
    "fresh-length": (lambda: sgd(fresh=[True]), names("fresh")),
    "momentum_buffers-length": (lambda: sgd(bufs=[torch.zeros(O, I)]), names("momentum_buffers")),
    "momentum_buffers-empty": (lambda: sgd(bufs=[]), names("momentum_buffers")),
    "params-int": (lambda: sgd(params=[torch.zeros(O, I, dtype=torch.long), _p()[1]],
                               grads=[torch.zeros(O, I, dtype=torch.long), torch.zeros(T.nnz, dtype=torch.float64)],
                               bufs=[torch.zeros(O, I, dtype=torch.long), torch.zeros(T.nnz, dtype=torch.float64)]),
                   names("params[0]")),
    "params-float16": (lambda: sgd(params=[torch.zeros(O, I, dtype=torch.half), _p()[1]],
                                   grads=[torch.zeros(O, I, dtype=torch.half), torch.zeros(T.nnz, dtype=torch.float64)],
                                   bufs=[torch.zeros(O, I, dtype=torch.half), torch.zeros(T.nnz, dtype=torch.float64)]),
                       names("params[0]")),
    "grads-shape": (lambda: sgd(grads=[torch.zeros(O, I + 1), torch.zeros(T.nnz, dtype=torch.float64)]),
                    names("grads[0]")),
    "grads-dtype": (lambda: sgd(grads=[torch.zeros(O, I), torch.zeros(T.nnz)]), names("grads[1]")),
    "momentum_buffers-shape": (lambda: sgd(bufs=[torch.zeros(O, I), torch.zeros(T.nnz + 1, dtype=torch.float64)]),
                               names("momentum_buffers[1]")),
    "momentum_buffers-dtype": (lambda: sgd(bufs=[torch.zeros(O, I, dtype=torch.float64),
                                                 torch.zeros(T.nnz, dtype=torch.float64)]),
                               names("momentum_buffers[0]")),
    "keep_masks-float": (lambda: sgd(keeps=[MASK.float(), None]), names("keep_masks[0]")),
    "keep_masks-shape": (lambda: sgd(keeps=[MASK.t(), None]), names("keep_masks[0]")),
    "active_masks-float": (lambda: sgd(actives=[ACT.float(), ACT]), names("active_masks[0]")),
    "active_masks-shape": (lambda: sgd(actives=[ACT[:-1], ACT]), names("active_masks[0]")),
    "active_masks-vs-row_ptrs": (lambda: sgd(actives=[ACT, torch.ones(O + 2, dtype=torch.bool)]),
                                 names("active_masks[1]")),
    "row_ptrs-int64": (lambda: sgd(row_ptrs=[None, T.crow.long()]), names("row_ptrs[1]")),
    "row_ptrs-on-2d-param": (lambda: sgd(row_ptrs=[T.crow, T.crow]), names("params[0]")),
    "grads-meta": (lambda: sgd(grads=[meta(torch.zeros(O, I)), torch.zeros(T.nnz, dtype=torch.float64)]),
                   names("grads[0]", "meta")),
    "momentum_buffers-meta": (lambda: sgd(bufs=[torch.zeros(O, I), meta(torch.zeros(T.nnz, dtype=torch.float64))]),
                              names("momentum_buffers[1]", "meta")),
    "keep_masks-meta": (lambda: sgd(keeps=[meta(MASK), None]), names("keep_masks[0]", "meta")),
    "active_masks-meta": (lambda: sgd(actives=[ACT, meta(ACT)]), names("active_masks[1]", "meta")),
    "row_ptrs-meta": (lambda: sgd(row_ptrs=[None, meta(T.crow)]), names("row_ptrs[1]", "meta")),
}


@pytest.mark.parametrize("case", list(SGD_CASES))
def test_masked_sgd_bad_input_names_argument(case):
    fn, match = SGD_CASES[case]
    with pytest.raises(ERRORS, match=match):
        fn()


def test_masked_sgd_rejects_before_updating_anything():
    """A bad params[1] must not leave params[0] half-stepped."""
    a = _sgd_args()
    a["grads"] = [torch.ones(O, I), torch.ones(T.nnz)]  # grads[1] has the wrong dtype
    p0, b0 = a["params"][0].clone(), a["bufs"][0].clone()
    with pytest.raises(ERRORS, match=names("grads[1]")):
        ST.masked_sgd_(a["params"], a["grads"], a["bufs"], a["keeps"], a["actives"], a["row_ptrs"], a["fresh"],
                       0.1, 0.9, 0.0, 0.0, False, False)
    assert torch.equal(a["params"][0], p0) and torch.equal(a["bufs"][0], b0)


# ----------------------------------------------------------------------------- python layer


def test_from_dense_rejects_non_binary_mask():
    mask = MASK.float()
    mask[0, 0] = 2.0
    with pytest.raises(ValueError, match="binary"):
        Ticket.from_dense(W, mask)


def test_from_dense_rejects_wrong_shape_mask():
    with pytest.raises(ERRORS, match=names("mask")):
        Ticket.from_dense(W, MASK[:-1])


def test_functional_sparse_linear_rejects_wrong_in_features():
    with pytest.raises(ERRORS, match=names("in_features")):
        sparseticket.sparse_linear(torch.zeros(B, I + 1), T)


@pytest.mark.parametrize("fn", ["sparse_linear", "neq_linear"])
def test_functional_layers_with_no_input_features(fn):
    """The ops handle in_features=0 (see test_ops.test_zero_size_features); the functional
    wrappers must too: y = bias broadcast over the batch."""
    w, mask, bias = torch.zeros(O, 0), torch.zeros(O, 0, dtype=torch.bool), BIAS
    x = torch.zeros(B, 0)
    if fn == "sparse_linear":
        y = sparseticket.sparse_linear(x, Ticket.from_dense(w, mask), bias)
    else:
        y = sparseticket.neq_linear(x, w, bias)
    assert torch.equal(y, bias.expand(B, O))


# ----------------------------------------------------------------------------- no crash
# Malformed index structures (what a hand-built or corrupted ticket looks like, rather
# than one from Ticket.from_dense) must raise, never read or write out of bounds and
# never return a silently wrong answer. Each case runs in a forked child of a fresh
# interpreter, so a segfault or a hang fails that case instead of killing the suite.

_MALFORMED_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    import torch, sparseticket
    ST = torch.ops.sparseticket
    I32 = lambda l: torch.tensor(l, dtype=torch.int32)

    def sgd(row_ptr, active):
        n = 3
        ST.masked_sgd_([torch.zeros(n)], [torch.ones(n)], [], [None], [torch.tensor(active)], [I32(row_ptr)],
                       [False], 0.1, 0.0, 0.0, 0.0, False, False)

    def ticket(w, mask):
        t = sparseticket.Ticket.from_dense(w, mask)
        return t

    def narrow(op):
        mask = torch.zeros(4, 6, dtype=torch.bool)
        mask[:, 5] = True  # every row keeps column 5
        t = ticket(torch.randn(4, 6), mask)
        if op == "spmm":
            return ST.spmm(torch.randn(3, 2), t.values, t.crow, t.col, None)
        if op == "sparse_linear":
            return ST.sparse_linear(torch.randn(3, 2), t.values, t.crow, t.col, t.ccol, t.row, t.perm, None, None)
        if op == "sddmm":
            return ST.sddmm(torch.randn(3, 4), torch.randn(3, 2), t.crow, t.col, None)
        if op == "spmm_t":
            return ST.spmm_t(torch.randn(3, 2), t.values, t.ccol, t.row, t.perm)
        if op == "ticket_to_dense":
            return ST.ticket_to_dense(t.values, t.crow, t.col, 3)
        if op == "ticket_transpose":
            return ST.ticket_transpose(t.crow, t.col, 3)

    one_row = [0, 3]

    def spmm(crow, col):  # x: [3, 5], three kept weights
        return ST.spmm(torch.randn(3, 5), torch.ones(3), I32(crow), I32(col), None)

    def sddmm(crow, col):  # x: [3, 5]
        return ST.sddmm(torch.randn(3, len(crow) - 1), torch.randn(3, 5), I32(crow), I32(col), None)

    def spmm_t(ccol, row, perm):  # gy: [3, 2]
        return ST.spmm_t(torch.randn(3, 2), torch.ones(3), I32(ccol), I32(row), I32(perm))

    def to_dense(crow, col):  # n_cols = 5
        return ST.ticket_to_dense(torch.ones(3), I32(crow), I32(col), 5)
    CASES = {
        # a ticket used with an operand narrower than the one it was built for
        **{f"{op}-operand-too-narrow": (lambda op=op: narrow(op)) for op in
           ["spmm", "sparse_linear", "sddmm", "spmm_t", "ticket_to_dense", "ticket_transpose"]},
        # a column index out of range in the middle of a row (columns not sorted)
        "spmm-col-out-of-range-mid-row": lambda: spmm(one_row, [0, 10**8, 1]),
        "spmm-col-negative-mid-row": lambda: spmm(one_row, [0, -7, 1]),
        "spmm-col-equal-width-mid-row": lambda: spmm(one_row, [0, 5, 1]),
        "sddmm-col-out-of-range-mid-row": lambda: sddmm([0, 3], [0, 10**8, 1]),
        "sddmm-col-equal-width-mid-row": lambda: sddmm([0, 3], [0, 5, 1]),
        "spmm_t-row-out-of-range-mid-col": lambda: spmm_t([0, 3], [0, 10**8, 1], [0, 1, 2]),
        "spmm_t-perm-out-of-range": lambda: spmm_t([0, 3], [0, 1, 1], [0, 10**8, 2]),
        "ticket_to_dense-col-out-of-range-mid-row": lambda: to_dense([0, 3], [0, 10**8, 1]),
        # row pointers that start at 0 and end at nnz but are not monotone in between
        "spmm-crow-interior-beyond-nnz": lambda: spmm([0, 10**8, 3], [0, 1, 2]),
        "spmm-crow-decreasing": lambda: spmm([0, 3, 1, 3], [0, 1, 2]),
        "sddmm-crow-interior-beyond-nnz": lambda: sddmm([0, 10**8, 3], [0, 1, 2]),
        "spmm_t-ccol-interior-beyond-nnz": lambda: spmm_t([0, 10**8, 3], [0, 1, 1], [0, 1, 2]),
        "ticket_to_dense-crow-decreasing": lambda: to_dense([0, 3, 1, 3], [0, 1, 2]),
        "masked_sgd_-row_ptrs-interior-beyond-numel": lambda: sgd([0, 2**20, 3], [True, False]),
        "masked_sgd_-row_ptrs-decreasing": lambda: sgd([0, 3, 1, 3], [True, False, True]),
    }

    results = {}
    for name in json.loads(sys.argv[1]):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            signal.alarm(30)
            try:
                CASES[name]()
                msg = "no error"
            except Exception as e:
                msg = "raised " + type(e).__name__ + ": " + (str(e).splitlines() or [""])[0][:200]
            os.write(w, msg.encode())
            os._exit(0)
        os.close(w)
        chunks = []
        while True:
            b = os.read(r, 4096)
            if not b:
                break
            chunks.append(b)
        os.close(r)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            results[name] = "crashed with signal %d" % os.WTERMSIG(status)
        else:
            results[name] = b"".join(chunks).decode() or "child exited without a result"
    print(json.dumps(results))
""")

MALFORMED = [f"{op}-operand-too-narrow" for op in
             ["spmm", "sparse_linear", "sddmm", "spmm_t", "ticket_to_dense", "ticket_transpose"]] + [
    "spmm-col-out-of-range-mid-row", "spmm-col-negative-mid-row", "spmm-col-equal-width-mid-row",
    "sddmm-col-out-of-range-mid-row", "sddmm-col-equal-width-mid-row", "spmm_t-row-out-of-range-mid-col",
    "spmm_t-perm-out-of-range", "ticket_to_dense-col-out-of-range-mid-row", "spmm-crow-interior-beyond-nnz",
    "spmm-crow-decreasing", "sddmm-crow-interior-beyond-nnz", "spmm_t-ccol-interior-beyond-nnz",
    "ticket_to_dense-crow-decreasing", "masked_sgd_-row_ptrs-interior-beyond-numel",
    "masked_sgd_-row_ptrs-decreasing",
]


@pytest.fixture(scope="module")
def malformed_results():
    import json
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _MALFORMED_SCRIPT, json.dumps(MALFORMED)], env=env,
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, f"driver failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_structure_raises_not_crash(case, malformed_results):
    result = malformed_results[case]
    assert result.startswith("raised"), f"{case}: {result}"


@pytest.mark.parametrize("pos", [0, 70_001, 199_999])
def test_out_of_range_index_found_in_a_long_ticket(pos):
    """The index-range check splits long index arrays across threads: a bad index at the
    start, in a middle chunk or at the very end of a 200k-entry ticket still raises."""
    if BACKEND != "c++":
        pytest.skip("the compiled kernels' check")
    I, O = 1000, 400
    mask = torch.zeros(O, I, dtype=torch.bool)
    mask.view(-1)[torch.randperm(O * I, generator=torch.Generator().manual_seed(0))[:200_000]] = True
    t = Ticket.from_dense(torch.randn(O, I) * mask, mask)
    col = t.col.clone()
    col[pos] = I  # one past the last feature
    x = torch.randn(3, I)
    with pytest.raises(RuntimeError, match="col has index 1000 but x's feature dimension"):
        torch.ops.sparseticket.spmm(x, t.values, t.crow, col, None)
    col[pos] = -2
    with pytest.raises(RuntimeError, match="col has index -2 but x's feature dimension"):
        torch.ops.sparseticket.spmm(x, t.values, t.crow, col, None)


@pytest.mark.parametrize("where", ["first", "middle", "last", "ends"])
def test_decreasing_row_pointers_raise(where):
    """The row-pointer check (vectorised per ISA: it counts the decreases, then finds the
    first) names the first decrease wherever it is in a long crow, and the ends."""
    if BACKEND != "c++":
        pytest.skip("the compiled kernels' check")
    I, O = 50, 1000
    mask = torch.rand(O, I, generator=torch.Generator().manual_seed(1)) < 0.1
    t = Ticket.from_dense(torch.randn(O, I) * mask, mask)
    x = torch.randn(3, I)
    crow = t.crow.clone()
    if where == "ends":
        crow[-1] += 1
        with pytest.raises(RuntimeError, match=r"crow must start at 0 and end at nnz="):
            torch.ops.sparseticket.spmm(x, t.values, crow, t.col, None)
        return
    r = {"first": 1, "middle": 517, "last": O - 1}[where]  # crow[r] made larger than crow[r + 1]
    crow[r] = crow[r + 1] + 1
    with pytest.raises(RuntimeError, match=rf"crow must be non-decreasing, but crow\[{r + 1}\]=\d+ < crow\[{r}\]="):
        torch.ops.sparseticket.spmm(x, t.values, crow, t.col, None)
