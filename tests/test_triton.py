"""Triton kernels against the references: on CPU tensors through Triton's interpreter, or
natively on CUDA tensors when a GPU is visible.

Without a GPU, ``TRITON_INTERPRET=1`` is set before triton is imported (if another test module
imported the kernels without it, they are reloaded). With a GPU nothing is interpreted: the same
tests then run the compiled kernels on the device, and ``test_dispatched_ops_on_gpu`` checks the
ops as dispatched for CUDA tensors (compiled CUDA kernels or Triton, see ``CUDA_IMPLS``).

The launch wrappers are called directly. Shapes are small and odd (the interpreter runs each
program in Python): several blocks per dimension, partial blocks everywhere, empty rows and
columns, 0% and 100% sparsity, frozen rows, fp32 and fp64, strided and column-major inputs.
Inputs are built on the CPU, moved to the device, then laid out (so strides survive the move);
references run on the CPU.

The kernels are also compiled for sm_80/sm_90 (without running) by
``test_kernels_compile_for_sm80_sm90``, through ``python -m sparseticket.triton.aot``.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import importlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

import sparseticket  # noqa: E402
import sparseticket.triton as st_triton  # noqa: E402
from sparseticket.ops import reference as ref  # noqa: E402
from sparseticket.triton import adamw_reference, grad_weight, optim, sddmm, spmm  # noqa: E402

from helpers import (FLOATS, TOL, assert_bits_equal, assert_close, lay, make_active, make_mask, randn,  # noqa: E402
                     ref_ticket)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cpu" if INTERPRET else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 and no GPU: nothing can run the Triton kernels", allow_module_level=True)


def _interpreted(kernel) -> bool:
    if type(kernel).__name__ == "Autotuner":
        kernel = kernel.fn
    return type(kernel).__name__ == "InterpretedFunction"


# If triton was imported before TRITON_INTERPRET was set (another test module reached it, e.g.
# through torch._dynamo), triton.language itself is in compiled mode and cannot be interpreted in
# this process: the kernel tests then run in a fresh interpreter (test_kernel_tests_in_subprocess).
IN_PROCESS = not INTERPRET or _interpreted(__import__("triton").language.zeros)
CHILD = os.environ.get("SPARSETICKET_TRITON_TEST_CHILD") == "1"
DELEGATED = "triton was imported before TRITON_INTERPRET was set: run by test_kernel_tests_in_subprocess"

if INTERPRET and IN_PROCESS:
    for _mod, _kernel in ((spmm, "_csr_dense_rowsplit_kernel"), (sddmm, "_sddmm_kernel"),
                          (grad_weight, "_row_masked_grad_weight_kernel"), (optim, "_masked_sgd_kernel")):
        # kernels decorated before TRITON_INTERPRET was set would need a GPU: rebuild them
        if not _interpreted(getattr(_mod, _kernel)):
            importlib.reload(_mod)

from sparseticket.triton import (triton_masked_adamw_, triton_masked_sgd_, triton_row_masked_grad_weight,  # noqa: E402
                                 triton_sddmm, triton_sparse_linear, triton_spmm, triton_spmm_t)


_NO_KERNELS = {"test_kernel_tests_in_subprocess", "test_cuda_backend_choice", "test_kernels_compile_for_sm80_sm90"}


@pytest.fixture(autouse=True)
def _kernels_runnable_here(request):
    if not IN_PROCESS and request.node.originalname not in _NO_KERNELS:
        pytest.skip(DELEGATED)


def test_kernel_tests_in_subprocess():
    """Runs this module's kernel tests in a fresh Python when this process cannot interpret them."""
    if IN_PROCESS:
        pytest.skip("the kernel tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1", SPARSETICKET_TRITON_TEST_CHILD="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)],
                          env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]


def dev(t):
    """t on the device under test (None stays None)."""
    return None if t is None else t.to(DEVICE)


def on(t, layout="contiguous", dense_only=False):
    """t moved to the device, then given ``layout`` there (helpers.lay)."""
    return lay(dev(t), layout, dense_only=dense_only)


def host(t):
    return t.cpu()


# O, I, B: prime-ish, so every block of the interpreter configs (8/16 wide) is partial somewhere
SHAPE = (37, 29, 13)


def _ticket(O, I, sparsity, dtype, gen, holes=True):
    w = randn(O, I, dtype=dtype, gen=gen)
    mask = make_mask(O, I, sparsity, gen, holes=holes and 0 < sparsity < 1)
    return w, mask, ref_ticket(w, mask)


# ----------------------------------------------------------------------------- spmm


@pytest.mark.parametrize("dtype", FLOATS, ids=["fp32", "fp64"])
@pytest.mark.parametrize("sparsity", [0.0, 0.65, 1.0], ids=["0%", "65%", "100%"])
def test_spmm(dtype, sparsity, gen):
    O, I, B = SHAPE
    w, mask, t = _ticket(O, I, sparsity, dtype, gen)
    x = randn(B, I, dtype=dtype, gen=gen)
    bias = randn(O, dtype=dtype, gen=gen)
    for layout, b in (("contiguous", bias), ("strided", None), ("transposed", bias)):
        y = triton_spmm(on(x, layout, True), on(t.values, layout), on(t.crow, layout), on(t.col, layout),
                        on(b, layout))
        expected = ref.reference_spmm(x, t.values, t.crow, t.col, b)
        assert y.is_contiguous() and y.device.type == DEVICE
        magnitude = x.abs() @ (w.abs() * mask).t() + (0 if b is None else b.abs())
        assert_close(host(y), expected, magnitude, what=f"spmm {layout}")


@pytest.mark.parametrize("dtype", FLOATS, ids=["fp32", "fp64"])
@pytest.mark.parametrize("sparsity", [0.0, 0.65, 1.0], ids=["0%", "65%", "100%"])
def test_spmm_t(dtype, sparsity, gen):
    O, I, B = SHAPE
    w, mask, t = _ticket(O, I, sparsity, dtype, gen)
    gy = randn(B, O, dtype=dtype, gen=gen)
    expected = ref.reference_spmm_t(gy, t.values, t.ccol, t.row, t.perm)
    for layout in ("contiguous", "strided"):
        gx = triton_spmm_t(on(gy, layout), on(t.values, layout), on(t.ccol, layout), on(t.row, layout),
                           on(t.perm, layout))
        assert gx.is_contiguous()
        assert_close(host(gx), expected, gy.abs() @ (w.abs() * mask), what=f"spmm_t {layout}")


def test_sparse_linear_forward_is_spmm(gen):
    O, I, B = 11, 7, 5
    w, mask, t = _ticket(O, I, 0.5, torch.float64, gen)
    x, bias = randn(B, I, dtype=torch.float64, gen=gen), randn(O, dtype=torch.float64, gen=gen)
    active = make_active(O, gen)
    y = triton_sparse_linear(*map(dev, (x, t.values, t.crow, t.col, t.ccol, t.row, t.perm, bias, active)))
    assert_close(host(y), ref.reference_spmm(x, t.values, t.crow, t.col, bias), what="sparse_linear")


def test_empty_batch_and_empty_matrix(gen):
    _, _, t = _ticket(9, 6, 0.5, torch.float32, gen)
    t = t.__class__(*map(dev, (t.values, t.crow, t.col, t.ccol, t.row, t.perm)), t.shape)
    bias, z = dev(randn(9, gen=gen)), dev(torch.zeros(0, 6))
    assert triton_spmm(z, t.values, t.crow, t.col, bias).shape == (0, 9)
    assert triton_spmm_t(dev(torch.zeros(0, 9)), t.values, t.ccol, t.row, t.perm).shape == (0, 6)
    assert triton_sddmm(dev(torch.zeros(0, 9)), z, t.crow, t.col, None).abs().sum() == 0
    assert triton_row_masked_grad_weight(dev(torch.zeros(0, 9)), z, None).abs().sum() == 0
    # a weight with no rows
    e = ref_ticket(torch.zeros(0, 6), torch.zeros(0, 6, dtype=torch.bool))
    assert triton_spmm(dev(randn(4, 6, gen=gen)), dev(e.values), dev(e.crow), dev(e.col), None).shape == (4, 0)


# ----------------------------------------------------------------------------- sddmm


@pytest.mark.parametrize("dtype", FLOATS, ids=["fp32", "fp64"])
@pytest.mark.parametrize("sparsity", [0.0, 0.65, 1.0], ids=["0%", "65%", "100%"])
def test_sddmm(dtype, sparsity, gen):
    O, I, B = 23, 19, 11
    w, mask, t = _ticket(O, I, sparsity, dtype, gen)
    gy = randn(B, O, dtype=dtype, gen=gen)
    x = randn(B, I, dtype=dtype, gen=gen)
    rows = torch.repeat_interleave(torch.arange(O), (t.crow[1:] - t.crow[:-1]).long())
    magnitude = (gy.abs()[:, rows] * x.abs()[:, t.col.long()]).sum(0) if t.values.numel() else None
    for kind in ("none-given", "random", "none"):
        active = None if kind == "none-given" else make_active(O, gen, kind)
        gy_k = gy.clone()
        if active is not None:
            gy_k[:, ~active] = float("nan")  # a frozen row's gradient must never be read
        layout = "strided" if kind == "random" else "contiguous"
        g = host(triton_sddmm(on(gy_k, layout, True), on(x, layout, True), on(t.crow, layout), on(t.col, layout),
                              on(active, layout)))
        expected = ref.reference_sddmm(gy, x, t.crow, t.col, active)
        assert_close(g, expected, magnitude, what=f"sddmm active={kind}")
        if active is not None:
            assert_bits_equal(g[~active[rows]], torch.zeros_like(g[~active[rows]]), what="frozen entries")


# ----------------------------------------------------------------------------- row-masked grad weight


@pytest.mark.parametrize("dtype", FLOATS, ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", ["none-given", "random", "all", "none"])
def test_row_masked_grad_weight(dtype, kind, gen):
    B, O, I = 19, 37, 45  # 3 x 3 output tiles and 2 batch steps with the 16-wide interpreter config
    gy = randn(B, O, dtype=dtype, gen=gen)
    x = randn(B, I, dtype=dtype, gen=gen)
    active = None if kind == "none-given" else make_active(O, gen, kind)
    gy_k = gy.clone()
    if active is not None:
        gy_k[:, ~active] = float("inf")  # never computed: no inf/NaN can reach the result
    layout = "transposed" if kind == "random" else "contiguous"
    gw = triton_row_masked_grad_weight(on(gy_k, layout), on(x, "strided"), on(active, layout))
    assert gw.is_contiguous()
    gw = host(gw)
    expected = ref.reference_row_masked_grad_weight(gy, x, active)
    assert_close(gw, expected, gy.abs().t() @ x.abs(), what=f"row_masked_grad_weight active={kind}")
    if active is not None:
        assert_bits_equal(gw[~active], torch.zeros_like(gw[~active]), what="frozen rows")


# ----------------------------------------------------------------------------- optimizers


def _optimizer_problem(dtype, gen):
    """Parameters of every layout masked_sgd_ accepts, with their masks.

    0: dense weight with a keep mask and per-row active flags; 1: its bias (per-row active);
    2: compact ticket values with per-CSR-row active flags; 3: a strided weight with an
    element-wise active mask; 4: a 0-d parameter; 5: an empty parameter.
    """
    O, I = 23, 17
    w = randn(O, I, dtype=dtype, gen=gen)
    keep = make_mask(O, I, 0.5, gen, holes=True)
    w = w * keep
    active = make_active(O, gen)
    t = ref_ticket(randn(O, I, dtype=dtype, gen=gen), keep)
    strided_w = randn(9, 5, dtype=dtype, gen=gen).t()  # [5, 9], not contiguous
    params = [w, randn(O, dtype=dtype, gen=gen), t.values.clone(), strided_w, randn((), dtype=dtype, gen=gen),
              torch.zeros(0, 3, dtype=dtype)]
    keeps = [keep, None, None, None, None, None]
    actives = [active, active, active, torch.rand(5, 9, generator=gen) < 0.5, None, None]
    row_ptrs = [None, None, t.crow, None, None, None]
    return params, keeps, actives, row_ptrs


def _on_device(params):
    """Copies on the device under test, with the same strides (clone keeps a dense layout)."""
    return [p.clone().to(DEVICE) for p in params]


def _randn_like(p, gen):
    return torch.randn(tuple(p.shape), generator=gen, dtype=torch.float64).to(p.dtype)


def _frozen_elements(p, active, row_ptr):
    act = ref._active_elements(p, active, row_ptr)
    return None if act is None else ~act


SGD_SETTINGS = {
    "nesterov": dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True, maximize=False),
    "dampening+maximize": dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.02, nesterov=False,
                               maximize=True),
    "plain": dict(lr=0.2, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
}


@pytest.mark.parametrize("dtype", FLOATS, ids=["fp32", "fp64"])
@pytest.mark.parametrize("setting", list(SGD_SETTINGS))
def test_masked_sgd(dtype, setting, gen):
    hp = SGD_SETTINGS[setting]
    params, keeps, actives, row_ptrs = _optimizer_problem(dtype, gen)
    mine = _on_device(params)
    theirs = [p.clone() for p in params]
    bufs_mine = [torch.zeros_like(p) for p in mine]
    bufs_theirs = [torch.zeros_like(p) for p in params]
    masks = [list(map(dev, m)) for m in (keeps, actives, row_ptrs)]
    for step in range(3):
        grads = [_randn_like(p, gen) for p in params]
        fresh = [step == 0] * len(params)
        before = [(host(p).clone(), host(b).clone()) for p, b in zip(mine, bufs_mine)]
        triton_masked_sgd_(mine, list(map(dev, grads)), bufs_mine if hp["momentum"] else [], *masks, fresh, **hp)
        ref.reference_masked_sgd_(theirs, grads, bufs_theirs, keeps, actives, row_ptrs, fresh, **hp)
        for j, (p, q) in enumerate(zip(mine, theirs)):
            p, buf = host(p), host(bufs_mine[j])
            assert_close(p, q, q.abs() + 1, what=f"sgd step {step} params[{j}]")
            if hp["momentum"]:
                assert_close(buf, bufs_theirs[j], bufs_theirs[j].abs() + 1, what=f"sgd buf[{j}]")
            if keeps[j] is not None:
                assert (p[~keeps[j]] == 0).all(), f"pruned params[{j}] not zero"
                assert (buf[~keeps[j]] == 0).all(), f"pruned momentum_buffers[{j}] not zero"
            frozen = _frozen_elements(p, actives[j], row_ptrs[j])
            if frozen is not None:
                assert_bits_equal(p[frozen], before[j][0][frozen], what=f"frozen params[{j}]")
                assert_bits_equal(buf[frozen], before[j][1][frozen], what=f"frozen buf[{j}]")


@pytest.mark.parametrize("dtype", FLOATS, ids=["fp32", "fp64"])
def test_masked_sgd_matches_torch_optim(dtype, gen):
    """Without masks the fused step is torch.optim.SGD (single-tensor path) on the same values."""
    params = [randn(13, 7, dtype=dtype, gen=gen), randn(13, dtype=dtype, gen=gen)]
    torch_params = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.SGD(torch_params, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, foreach=False)
    params = _on_device(params)
    bufs = [torch.zeros_like(p) for p in params]
    n = len(params)
    for step in range(3):
        grads = [_randn_like(p, gen) for p in params]
        for tp, g in zip(torch_params, grads):
            tp.grad = g.clone()
        opt.step()
        triton_masked_sgd_(params, list(map(dev, grads)), bufs, [None] * n, [None] * n, [None] * n,
                           [step == 0] * n, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False,
                           maximize=False)
        for p, tp in zip(params, torch_params):
            assert_close(host(p), tp.detach(), tp.detach().abs() + 1, tol=TOL[dtype] / 100, what=f"step {step}")


ADAMW_SETTINGS = {
    "default": dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, amsgrad=False, maximize=False),
    "amsgrad+maximize": dict(lr=3e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1, amsgrad=True,
                             maximize=True),
    "no-decay+big-lerp": dict(lr=1e-3, beta1=0.3, beta2=0.9, eps=1e-8, weight_decay=0.0, amsgrad=False,
                              maximize=False),
}


@pytest.mark.parametrize("dtype", FLOATS, ids=["fp32", "fp64"])
@pytest.mark.parametrize("setting", list(ADAMW_SETTINGS))
def test_masked_adamw(dtype, setting, gen):
    hp = ADAMW_SETTINGS[setting]
    params, keeps, actives, row_ptrs = _optimizer_problem(dtype, gen)
    mine = _on_device(params)
    theirs = [p.clone() for p in params]
    state_mine = [[torch.zeros_like(p) for p in mine] for _ in range(3)]
    state_theirs = [[torch.zeros_like(p) for p in params] for _ in range(3)]
    masks = [list(map(dev, m)) for m in (keeps, actives, row_ptrs)]
    for step in range(1, 4):
        grads = [_randn_like(p, gen) for p in params]
        before = [[host(s[j]).clone() for s in [mine] + state_mine] for j in range(len(params))]
        steps = [float(step)] * len(params)
        triton_masked_adamw_(mine, list(map(dev, grads)), *state_mine, *masks, steps, **hp)
        adamw_reference.reference_masked_adamw_(theirs, grads, *state_theirs, keeps, actives, row_ptrs, steps, **hp)
        for j in range(len(params)):
            for name, a, b in zip(("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
                                  [list(map(host, x)) for x in [mine] + state_mine], [theirs] + state_theirs):
                assert_close(a[j], b[j], b[j].abs() + 1, what=f"adamw step {step} {name}[{j}]")
                if keeps[j] is not None:
                    assert (a[j][~keeps[j]] == 0).all(), f"pruned {name}[{j}] not zero"
                frozen = _frozen_elements(params[j], actives[j], row_ptrs[j])
                if frozen is not None:
                    k = ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq").index(name)
                    assert_bits_equal(a[j][frozen], before[j][k][frozen], what=f"frozen {name}[{j}]")


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype", FLOATS, ids=["fp32", "fp64"])
def test_adamw_reference_is_torch_optim(dtype, amsgrad, gen):
    """The masked AdamW reference, without masks, is torch.optim.AdamW bit for bit; the Triton
    kernel matches it to rounding (it divides as ATen's CUDA kernels do, not as the CPU ones)."""
    params = [randn(13, 7, dtype=dtype, gen=gen), randn(13, dtype=dtype, gen=gen)]
    torch_params = [p.clone().requires_grad_() for p in params]
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, amsgrad=amsgrad)
    opt = torch.optim.AdamW(torch_params, foreach=False, **hp)
    n = len(params)
    ref_params = [p.clone() for p in params]
    ref_state = [[torch.zeros_like(p) for p in params] for _ in range(3)]
    params = _on_device(params)
    tri_state = [[torch.zeros_like(p) for p in params] for _ in range(3)]
    none = [None] * n
    flat = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05, amsgrad=amsgrad, maximize=False)
    for step in range(1, 4):
        grads = [_randn_like(p, gen) for p in params]
        for tp, g in zip(torch_params, grads):
            tp.grad = g.clone()
        opt.step()
        adamw_reference.reference_masked_adamw_(ref_params, grads, *ref_state, none, none, none, [step] * n, **flat)
        triton_masked_adamw_(params, list(map(dev, grads)), *tri_state, none, none, none, [step] * n, **flat)
        for p, r, tp in zip(params, ref_params, torch_params):
            assert_bits_equal(r, tp.detach(), what=f"reference vs torch.optim.AdamW step {step}")
            assert_close(host(p), r, r.abs() + 1, tol=TOL[dtype] / 100, what=f"triton vs reference step {step}")


# ----------------------------------------------------------------------------- errors, registration, configs


def test_bad_input_names_the_argument(gen):
    w, _, t = _ticket(5, 4, 0.5, torch.float32, gen)
    w, x, values, crow, col = map(dev, (w, randn(3, 4, gen=gen), t.values, t.crow, t.col))
    with pytest.raises(RuntimeError, match="crow must be int32"):
        triton_spmm(x, values, crow.long(), col, None)
    with pytest.raises(RuntimeError, match="values has dtype"):
        triton_spmm(x, values.double(), crow, col, None)
    with pytest.raises(RuntimeError, match="x has 3 features but the ticket expects in_features=4"):
        triton_sparse_linear(x[:, :3], values, crow, col, *map(dev, (t.ccol, t.row, t.perm)), None, None)
    with pytest.raises(RuntimeError, match="active must be a torch.bool mask"):
        triton_sddmm(dev(randn(3, 5, gen=gen)), x, crow, col, dev(torch.ones(5)))
    with pytest.raises(RuntimeError, match="gy has batch 2 but x has batch 3"):
        triton_row_masked_grad_weight(dev(randn(2, 5, gen=gen)), x, None)
    with pytest.raises(RuntimeError, match=r"grads\[0\] has shape"):
        triton_masked_sgd_([w], [x], [], [None], [None], [None], [True], 0.1, 0.0, 0.0, 0.0, False, False)
    with pytest.raises(RuntimeError, match=r"steps\[0\] is 0"):
        triton_masked_adamw_([w], [w], [w.clone()], [w.clone()], [], [None], [None], [None], [0], 1e-3, 0.9, 0.999,
                             1e-8, 0.0, False, False)


def test_ticket_for_a_wider_operand(gen):
    """A ticket used with fewer features than it was built for: the same error as the CPU
    kernels (on CUDA tensors only with SPARSETICKET_CHECK_INDICES=1, since it needs the host),
    and in any case the kernels read nothing out of bounds: out-of-range entries are skipped."""
    O, I, B = 9, 12, 5
    w, mask, t = _ticket(O, I, 0.3, torch.float32, gen, holes=False)
    x_narrow = randn(B, I - 4, gen=gen)
    if DEVICE == "cpu":
        with pytest.raises(RuntimeError, match="col has index .* but x's feature dimension"):
            triton_spmm(x_narrow, t.values, t.crow, t.col, None)
        with pytest.raises(RuntimeError, match="col has index .* but x's feature dimension"):
            triton_sddmm(randn(B, O, gen=gen), x_narrow, t.crow, t.col, None)
        with pytest.raises(RuntimeError, match="row has index .* but gy's feature dimension"):
            triton_spmm_t(randn(B, O - 3, gen=gen), t.values, t.ccol, t.row, t.perm)
    # the kernels alone (below the check): entries with col >= I - 4 contribute nothing
    keep = t.col < I - 4
    y = spmm._rowsplit(spmm.feature_major(dev(x_narrow)), dev(t.values), dev(t.crow), dev(t.col), None, B, O)
    expected = x_narrow @ (w * mask)[:, : I - 4].t()
    assert_close(host(y), expected, x_narrow.abs() @ (w.abs() * mask)[:, : I - 4].t(), what="out-of-range skipped")
    assert keep.any() and not keep.all()


def test_cuda_backend_choice():
    """Every op has a CUDA implementation; without a GPU it is the reference."""
    impls = st_triton.CUDA_IMPLS
    assert set(impls) == set(sparseticket.ops._library.SCHEMAS)
    assert set(st_triton.OP_TO_WRAPPER) <= set(sparseticket.ops._library.SCHEMAS)
    assert all(callable(f) for f in st_triton.impls().values())
    if not torch.cuda.is_available():
        assert sparseticket.BACKENDS["cuda"] == "reference"
        assert set(impls.values()) == {"reference"}
        assert st_triton.TRITON_ERROR == "no CUDA device"
    elif st_triton.TRITON_ERROR is None:
        for op in st_triton.OP_TO_WRAPPER:
            assert impls[op] in ("cuda", "triton"), (op, impls[op])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: checks the ops as dispatched for CUDA")
@pytest.mark.parametrize("dtype", FLOATS, ids=["fp32", "fp64"])
def test_dispatched_ops_on_gpu(dtype, gen):
    """torch.ops.sparseticket.* on CUDA tensors (compiled CUDA kernels or Triton, whichever
    CUDA_IMPLS says) against the references on the CPU, including the autograd of sparse_linear."""
    ST = torch.ops.sparseticket
    O, I, B = 45, 38, 70
    w, mask, t = _ticket(O, I, 0.65, dtype, gen)
    x, gy, bias = randn(B, I, dtype=dtype, gen=gen), randn(B, O, dtype=dtype, gen=gen), randn(O, dtype=dtype, gen=gen)
    active = make_active(O, gen)
    c = "cuda"
    tc = [v.to(c) for v in (t.values, t.crow, t.col, t.ccol, t.row, t.perm)]
    assert_close(host(ST.spmm(x.to(c), *tc[:3], bias.to(c))), ref.reference_spmm(x, t.values, t.crow, t.col, bias),
                 what=f"spmm via {st_triton.CUDA_IMPLS['spmm']}")
    assert_close(host(ST.spmm_t(gy.to(c), tc[0], *tc[3:])), ref.reference_spmm_t(gy, t.values, t.ccol, t.row, t.perm),
                 what=f"spmm_t via {st_triton.CUDA_IMPLS['spmm_t']}")
    assert_close(host(ST.sddmm(gy.to(c), x.to(c), tc[1], tc[2], active.to(c))),
                 ref.reference_sddmm(gy, x, t.crow, t.col, active), what=f"sddmm via {st_triton.CUDA_IMPLS['sddmm']}")
    assert_close(host(ST.row_masked_grad_weight(gy.to(c), x.to(c), active.to(c))),
                 ref.reference_row_masked_grad_weight(gy, x, active), gy.abs().t() @ x.abs(),
                 what=f"row_masked_grad_weight via {st_triton.CUDA_IMPLS['row_masked_grad_weight']}")
    xg, vg = x.to(c).requires_grad_(), tc[0].clone().requires_grad_()
    y = ST.sparse_linear(xg, vg, *tc[1:], bias.to(c), active.to(c))
    y.backward(gy.to(c))
    assert_close(host(xg.grad), ref.reference_spmm_t(gy, t.values, t.ccol, t.row, t.perm), what="sparse_linear dx")
    assert_close(host(vg.grad), ref.reference_sddmm(gy, x, t.crow, t.col, active), what="sparse_linear dvalues")
    params, keeps, actives, row_ptrs = _optimizer_problem(dtype, gen)
    mine, theirs = [p.clone().to(c) for p in params], [p.clone() for p in params]
    bufs_mine, bufs_theirs = [torch.zeros_like(p) for p in mine], [torch.zeros_like(p) for p in params]
    grads = [_randn_like(p, gen) for p in params]
    hp = SGD_SETTINGS["nesterov"]
    ST.masked_sgd_(mine, [g.to(c) for g in grads], bufs_mine, [None if k is None else k.to(c) for k in keeps],
                   [None if a is None else a.to(c) for a in actives], [None if r is None else r.to(c) for r in row_ptrs],
                   [True] * len(params), hp["lr"], hp["momentum"], hp["dampening"], hp["weight_decay"], hp["nesterov"],
                   hp["maximize"])
    ref.reference_masked_sgd_(theirs, grads, bufs_theirs, keeps, actives, row_ptrs, [True] * len(params), **hp)
    for j, (p, q) in enumerate(zip(mine, theirs)):
        assert_close(host(p), q, q.abs() + 1, what=f"masked_sgd_ via {st_triton.CUDA_IMPLS['masked_sgd_']} [{j}]")


@pytest.mark.skipif(not INTERPRET, reason="only the interpreter restricts the configs")
def test_single_config_when_interpreting():
    """Autotuning under the interpreter would time configs with no driver: one config each."""
    for kernel in (spmm._csr_dense_rowsplit_kernel, sddmm._sddmm_kernel, grad_weight._row_masked_grad_weight_kernel):
        assert len(kernel.configs) == 1
    assert len(spmm._GPU_CONFIGS) > 1 and len(sddmm._GPU_CONFIGS) > 1 and len(grad_weight._GPU_CONFIGS) > 1


@pytest.mark.skipif(CHILD, reason="run by the parent process")
def test_kernels_compile_for_sm80_sm90():
    """Every kernel lowers to a cubin for A100 and H100 (first autotune config, fp32): a
    subprocess without TRITON_INTERPRET, since interpreted kernels are not compilable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "sparseticket.triton.aot", "--quick", "--dtype", "fp32", "-q"],
                          env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
