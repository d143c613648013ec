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

import sparseticket
from helpers import BACKEND, ERRORS, ST, make_mask, randn, ref_ticket
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


def sparse_linear(x=X, values=T.values, crow=T.crow, col=T.col, ccol=T.ccol, row=T.row, perm=T.perm, bias=BIAS,
                  active=ACT):
    return ST.sparse_linear(x, values, crow, col, ccol, row, perm, bias, active)


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
    # row_masked_grad_weight
    "rmgw-gy-float16": (lambda: rmgw(gy=GY.half()), names("gy")),
    "rmgw-x-int": (lambda: rmgw(x=X.int()), names("x")),
    "rmgw-x-dtype-mismatch": (lambda: rmgw(x=X.double()), names("x")),
    "rmgw-batch-mismatch": (lambda: rmgw(x=X[:-1]), names("batch")),
    "rmgw-active-float": (lambda: rmgw(active=ACT.float()), names("active")),
    "rmgw-active-length": (lambda: rmgw(active=torch.ones(O + 1, dtype=torch.bool)), names("active")),
    "rmgw-x-meta": (lambda: rmgw(x=meta(X)), names("x", "meta")),
    "rmgw-active-meta": (lambda: rmgw(active=meta(ACT)), names("active", "meta")),
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
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_names_argument(case):
    fn, match = CASES[case]
    with pytest.raises(ERRORS, match=match):
        fn()


# Checks that the fake kernels make but the reference CPU path skips, and device checks
# that the fake kernels of ticket_transpose / ticket_to_dense do not make at all.
# Bugs in sparseticket/ops (not tests/): see the report; strict, so a fix shows up as XPASS.
_REF_ONLY = pytest.mark.xfail(BACKEND == "reference", strict=True,
                              reason="reference CPU impls of ticket_transpose/ticket_to_dense skip input checks")
_NO_DEVICE_CHECK = pytest.mark.xfail(strict=True, reason="fake kernels of ticket_transpose/ticket_to_dense have "
                                                         "no device check: a meta operand returns uninitialised "
                                                         "memory on the CPU")
UNCHECKED = [
    pytest.param(lambda: transpose(col=T.col.float()), names("col"), id="transpose-col-float", marks=_REF_ONLY),
    pytest.param(lambda: to_dense(crow=T.crow[None]), names("crow"), id="to_dense-crow-2d", marks=_REF_ONLY),
    pytest.param(lambda: transpose(crow=T.crow.long()), names("crow"), id="transpose-crow-int64", marks=_REF_ONLY),
    pytest.param(lambda: transpose(col=T.col.long()), names("col"), id="transpose-col-int64", marks=_REF_ONLY),
    pytest.param(lambda: to_dense(crow=T.crow.long()), names("crow"), id="to_dense-crow-int64", marks=_REF_ONLY),
    pytest.param(lambda: to_dense(col=T.col.long()), names("col"), id="to_dense-col-int64", marks=_REF_ONLY),
    pytest.param(lambda: transpose(col=meta(T.col)), names("col", "meta"), id="transpose-col-meta",
                 marks=_NO_DEVICE_CHECK),
    pytest.param(lambda: to_dense(crow=meta(T.crow)), names("crow", "meta"), id="to_dense-crow-meta",
                 marks=_NO_DEVICE_CHECK),
    pytest.param(lambda: to_dense(values=meta(T.values)), names("values", "meta"), id="to_dense-values-meta",
                 marks=_NO_DEVICE_CHECK),
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


# ----------------------------------------------------------------------------- no crash


_CRASH_SCRIPT = textwrap.dedent("""
    import torch, sparseticket
    from sparseticket import Ticket
    ST = torch.ops.sparseticket
    w = torch.randn(4, 6)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, 5] = True   # every row keeps column 5
    t = Ticket.from_dense(w, mask)
    cases = {
        "spmm x narrower than the ticket": lambda: ST.spmm(torch.randn(3, 2), t.values, t.crow, t.col, None),
        "sparse_linear x narrower": lambda: ST.sparse_linear(torch.randn(3, 2), t.values, t.crow, t.col, t.ccol,
                                                             t.row, t.perm, None, None),
        "sddmm x narrower": lambda: ST.sddmm(torch.randn(3, 4), torch.randn(3, 2), t.crow, t.col, None),
        "spmm_t gy narrower than the rows": lambda: ST.spmm_t(torch.randn(3, 2), t.values, t.ccol, t.row, t.perm),
        "ticket_to_dense n_cols too small": lambda: ST.ticket_to_dense(t.values, t.crow, t.col, 3),
        "ticket_transpose n_cols too small": lambda: ST.ticket_transpose(t.crow, t.col, 3),
    }
    for name, fn in cases.items():
        try:
            fn()
            print("NO ERROR:", name, flush=True)
        except Exception as e:
            print("raised:", name, type(e).__name__, str(e).splitlines()[0][:200], flush=True)
""")


def test_out_of_range_indices_raise_not_crash():
    """Column/row indices beyond the dense operand must raise, not read out of bounds.
    Run in a subprocess so a segfault fails this test instead of killing the suite."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"crashed (exit {r.returncode}):\n{r.stdout}\n{r.stderr[-2000:]}"
    assert "NO ERROR" not in r.stdout, r.stdout
    assert r.stdout.count("raised:") == 6, r.stdout
