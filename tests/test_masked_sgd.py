"""masked_sgd_: against its reference, and stepped side by side with torch.optim.SGD.

The torch.optim.SGD side ("the oracle") runs on dense copies of the same values:
* pruned positions (keep == False): its gradient is zeroed there and the param and
  momentum buffer are re-masked after each step (with masked grads, weight decay and
  momentum keep a zero at zero anyway; re-masking is the definition);
* frozen positions (active == False): param and buffer are restored to their values
  before the step, i.e. the oracle is "torch.optim.SGD on the entries that move".
Our side must then match the oracle on moving entries (allclose), hold pruned entries at
exactly 0, and leave frozen entries (param and buffer) bit-identical.
"""
import itertools

import pytest
import torch
from helpers import (ST, assert_bits_equal, assert_close, bits, make_mask, pruned_and_empty_params, randn, ref, strided,
                     transposed)

LR = 0.05
STEPS = 20
CONFIGS = [
    dict(momentum=0.0),
    dict(momentum=0.0, weight_decay=5e-4),
    dict(momentum=0.0, maximize=True),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.1),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.9, weight_decay=5e-4),
    dict(momentum=0.9, dampening=0.1, weight_decay=5e-4, maximize=True),
    dict(momentum=0.9, nesterov=True, weight_decay=5e-4, maximize=True),
]
CONFIG_IDS = ["-".join(f"{k[:4]}{v}" for k, v in c.items()) for c in CONFIGS]
# Comparing after up to 20 steps: a kernel may round differently (FMA) from torch.optim
STEP_TOL = {torch.float32: 2e-6, torch.float64: 1e-13}


def full(cfg):
    c = dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)
    c.update(cfg)
    return c


def call_op(params, grads, bufs, keeps, actives, row_ptrs, fresh, lr, cfg, op=None):
    c = full(cfg)
    (op or ST.masked_sgd_)(params, grads, bufs, keeps, actives, row_ptrs, fresh, lr, c["momentum"], c["dampening"],
                           c["weight_decay"], c["nesterov"], c["maximize"])


# ----------------------------------------------------------------------------- parameter specs


class Param:
    """One parameter as the op sees it, plus how to draw its masks each step.

    kind: "plain" (no masks), "keep" ([O, I] keep mask), "rows" (per-row active mask),
    "elems" (element active mask), "keep+rows", "csr" (compact ticket values [nnz] with
    row_ptrs = crow and a per-row active mask), "bias" (1-D with a same-shape active mask).
    """

    def __init__(self, kind, shape, dtype, gen):
        self.kind, self.dtype, self.gen = kind, dtype, gen
        self.keep = self.row_ptr = None
        if kind == "csr":
            O, I = shape
            mask = make_mask(O, I, 0.6, gen, holes=True)
            counts = mask.sum(1)
            self.row_ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32)
            self.n_rows, shape = O, (int(mask.sum()),)
        elif "keep" in kind:
            self.keep = make_mask(*shape, 0.7, gen, holes=True)
        self.shape = shape
        p0 = randn(*shape, dtype=dtype, gen=gen)
        if self.keep is not None and kind != "keep":
            p0 = p0 * self.keep  # a pruned weight that is also frozen keeps its (zero) bits
        self.p0 = p0

    def active(self, step):
        """This step's active mask as the op takes it, and expanded to the param's shape."""
        if self.kind in ("plain", "keep"):
            return None, None
        # NEq re-evaluates every epoch: random masks, with an all-frozen and an all-active step
        n = {"rows": self.shape[0], "keep+rows": self.shape[0], "csr": getattr(self, "n_rows", None)}.get(self.kind)
        shape = (n,) if n is not None else self.shape
        a = torch.rand(shape, generator=self.gen) < 0.5
        if step == 3:
            a[:] = False
        elif step == 4:
            a[:] = True
        if self.kind == "csr":
            return a, torch.repeat_interleave(a, (self.row_ptr[1:] - self.row_ptr[:-1]).long())
        if a.shape == self.shape:
            return a, a
        return a, a.reshape((-1,) + (1,) * (len(self.shape) - 1)).expand(self.shape)

    def grad(self):
        return randn(*self.shape, dtype=self.dtype, gen=self.gen)  # nonzero at pruned positions too


SCENARIOS = {
    "keep": [("keep", (17, 31))],
    "rows": [("rows", (31, 5)), ("bias", (31,))],
    "elems": [("elems", (5, 33))],
    "keep+rows": [("keep+rows", (33, 17)), ("bias", (33,))],
    "csr": [("csr", (31, 17)), ("bias", (31,))],
}


class SideBySide:
    def __init__(self, specs, cfg, buf_init="zeros"):
        self.specs, self.cfg = specs, full(cfg)
        self.mom = self.cfg["momentum"] != 0
        self.ps = [s.p0.clone() for s in specs]
        fill = {"zeros": 0.0, "nan": float("nan")}[buf_init]
        self.bufs = [torch.full_like(s.p0, fill) for s in specs]
        self.buf_init = [b.clone() for b in self.bufs]
        self.ts = [(s.p0 * s.keep if s.keep is not None else s.p0).clone() for s in specs]
        self.opt = torch.optim.SGD(self.ts, lr=LR, foreach=False, **cfg)
        self.step_no = 0

    def torch_buf(self, j):
        st = self.opt.state.get(self.ts[j], {})
        return st.get("momentum_buffer")

    def step(self):
        k = self.step_no
        grads, act_args, act_elems = [], [], []
        for s in self.specs:
            grads.append(s.grad())
            a, ae = s.active(k)
            act_args.append(a)
            act_elems.append(ae)
        old_p = [p.clone() for p in self.ps]
        old_b = [b.clone() for b in self.bufs]

        call_op(self.ps, grads, self.bufs if self.mom else [], [s.keep for s in self.specs], act_args,
                [s.row_ptr for s in self.specs], [k == 0] * len(self.ps), LR, self.cfg)

        # the oracle
        saved_t = [t.clone() for t in self.ts]
        saved_tb = [self.torch_buf(j).clone() if self.torch_buf(j) is not None else self.buf_init[j]
                    for j in range(len(self.ts))]
        for t, g, s in zip(self.ts, grads, self.specs):
            t.grad = g * s.keep if s.keep is not None else g.clone()
        self.opt.step()
        with torch.no_grad():
            for j, (t, s) in enumerate(zip(self.ts, self.specs)):
                tb = self.torch_buf(j)
                if s.keep is not None:
                    t.mul_(s.keep)
                    if tb is not None:
                        tb.mul_(s.keep)
                if act_elems[j] is not None:
                    t.copy_(torch.where(act_elems[j], t, saved_t[j]))
                    if tb is not None:
                        tb.copy_(torch.where(act_elems[j], tb, saved_tb[j]))

        # the checks
        for j, s in enumerate(self.specs):
            p, t, what = self.ps[j], self.ts[j], f"step {k} param {j} ({s.kind})"
            moving = torch.ones(s.shape, dtype=torch.bool)
            if act_elems[j] is not None:
                frozen = ~act_elems[j]
                assert torch.equal(bits(p)[frozen], bits(old_p[j])[frozen]), f"{what}: frozen param changed"
                if self.mom:
                    assert torch.equal(bits(self.bufs[j])[frozen], bits(old_b[j])[frozen]), \
                        f"{what}: frozen momentum changed"
                moving &= ~frozen
            if s.keep is not None:
                assert (p[~s.keep] == 0).all(), f"{what}: pruned param not exactly 0"
                if self.mom:
                    assert (self.bufs[j][~s.keep] == 0).all(), f"{what}: pruned momentum not exactly 0"
                moving &= s.keep
            assert_close(p[moving], t[moving], t.abs(), tol=STEP_TOL[s.dtype], what=what)
            if self.mom:
                tb = self.torch_buf(j)
                assert_close(self.bufs[j][moving], tb[moving], tb.abs(), tol=STEP_TOL[s.dtype], what=what + " buf")
        self.step_no += 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_side_by_side_with_torch_sgd(cfg, scenario, dtype, gen):
    run = SideBySide([Param(kind, shape, dtype, gen) for kind, shape in SCENARIOS[scenario]], cfg)
    for _ in range(STEPS):
        run.step()
    # the run actually moved the parameters (the comparison above is not vacuous)
    for p, s in zip(run.ps, run.specs):
        assert not torch.equal(p, s.p0)


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c["momentum"] != 0], ids=[
    i for c, i in zip(CONFIGS, CONFIG_IDS) if c["momentum"] != 0])
def test_fresh_buffer_ignores_old_content(cfg, gen):
    """fresh=True on the first step: the buffer's old content (NaN here) is never read,
    exactly as torch.optim.SGD creates its buffer as a clone of d_p."""
    run = SideBySide([Param("keep", (17, 31), torch.float32, gen), Param("plain", (5,), torch.float64, gen)],
                     cfg, buf_init="nan")
    for _ in range(3):
        run.step()
        for p, b in zip(run.ps, run.bufs):
            assert torch.isfinite(p).all() and torch.isfinite(b).all()


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c["momentum"] != 0][:3], ids=[
    i for c, i in zip(CONFIGS, CONFIG_IDS) if c["momentum"] != 0][:3])
def test_not_fresh_uses_existing_buffer(cfg, gen):
    """fresh=False continues from the buffer given: same as torch.optim.SGD with that
    buffer loaded into its state."""
    p0, g, b0 = randn(7, 9, gen=gen), randn(7, 9, gen=gen), randn(7, 9, gen=gen)
    p, b = p0.clone(), b0.clone()
    call_op([p], [g], [b], [None], [None], [None], [False], LR, cfg)
    t = p0.clone()
    opt = torch.optim.SGD([t], lr=LR, foreach=False, **cfg)
    opt.state[t]["momentum_buffer"] = b0.clone()
    t.grad = g.clone()
    opt.step()
    assert_close(p, t, tol=STEP_TOL[torch.float32])
    assert_close(b, opt.state[t]["momentum_buffer"], tol=STEP_TOL[torch.float32])


@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[6], CONFIGS[8]], ids=[CONFIG_IDS[1], CONFIG_IDS[6],
                                                                           CONFIG_IDS[8]])
def test_fused_mixed_dtypes_and_late_param(cfg, gen):
    """One fused call over float32 and float64 params of every mask kind; a param that
    joins at step 5 (new mask level) gets fresh=True then, like torch.optim's
    add_param_group."""
    specs = [Param("keep", (17, 31), torch.float32, gen), Param("csr", (31, 17), torch.float64, gen),
             Param("bias", (31,), torch.float32, gen), Param("elems", (5, 33), torch.float64, gen),
             Param("plain", (64,), torch.float32, gen)]
    run = SideBySide(specs, cfg)
    for _ in range(5):
        run.step()
    # a late parameter: its own optimizer-side group, its own fresh flag
    late = Param("keep+rows", (9, 5), torch.float64, gen)
    p_late, b_late = late.p0.clone(), torch.zeros_like(late.p0)
    t_late = late.p0.clone()
    run.opt.add_param_group({"params": [t_late]})
    c = full(cfg)
    for k in range(5, 10):
        grads = [s.grad() for s in specs] + [late.grad()]
        acts = [s.active(k) for s in specs] + [late.active(k)]
        ps, bufs = run.ps + [p_late], run.bufs + [b_late]
        keeps = [s.keep for s in specs] + [late.keep]
        row_ptrs = [s.row_ptr for s in specs] + [None]
        fresh = [False] * len(specs) + [k == 5]
        old_late = p_late.clone()
        call_op(ps, grads, bufs if c["momentum"] else [], keeps, [a for a, _ in acts], row_ptrs, fresh, LR, cfg)
        # oracle for everything at once
        saved = [t.clone() for t in run.ts + [t_late]]
        saved_b = [(run.opt.state.get(t, {}).get("momentum_buffer")) for t in run.ts + [t_late]]
        saved_b = [torch.zeros_like(s) if b is None else b.clone() for s, b in zip(saved, saved_b)]
        for t, g, kp in zip(run.ts + [t_late], grads, keeps):
            t.grad = g * kp if kp is not None else g.clone()
        run.opt.step()
        with torch.no_grad():
            for j, t in enumerate(run.ts + [t_late]):
                tb = run.opt.state[t].get("momentum_buffer")
                if keeps[j] is not None:
                    t.mul_(keeps[j])
                    if tb is not None:
                        tb.mul_(keeps[j])
                ae = acts[j][1]
                if ae is not None:
                    t.copy_(torch.where(ae, t, saved[j]))
                    if tb is not None:
                        tb.copy_(torch.where(ae, tb, saved_b[j]))
        for j, (p, t) in enumerate(zip(ps, run.ts + [t_late])):
            assert p.dtype == t.dtype
            assert_close(p, t, t.abs(), tol=STEP_TOL[p.dtype], what=f"step {k} param {j}")
            if c["momentum"]:
                tb = run.opt.state[t]["momentum_buffer"]
                assert_close(bufs[j], tb, tb.abs(), tol=STEP_TOL[p.dtype], what=f"step {k} buf {j}")
        assert not torch.equal(p_late, old_late) or not acts[-1][1].any()


# ----------------------------------------------------------------------------- against the reference


def _ref_case(kinds, dtype, gen, k=0):
    specs = [Param(kind, shape, dtype, gen) for kind, shape in kinds]
    ps = [s.p0.clone() for s in specs]
    grads = [s.grad() for s in specs]
    bufs = [randn(*s.shape, dtype=dtype, gen=gen) for s in specs]
    acts = [s.active(k)[0] for s in specs]
    return specs, ps, grads, bufs, acts


@pytest.mark.parametrize("fresh", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_masked_sgd_matches_reference(cfg, dtype, fresh, gen):
    kinds = list(itertools.chain(*SCENARIOS.values())) + [("plain", (3, 4, 5))]
    specs, ps, grads, bufs, acts = _ref_case(kinds, dtype, gen)
    keeps, rps = [s.keep for s in specs], [s.row_ptr for s in specs]
    ps_r, bufs_r = [p.clone() for p in ps], [b.clone() for b in bufs]
    flags = [fresh if j % 2 == 0 else not fresh for j in range(len(ps))]
    call_op(ps, grads, bufs, keeps, acts, rps, flags, LR, cfg)
    call_op(ps_r, grads, bufs_r, keeps, acts, rps, flags, LR, cfg, op=ref.reference_masked_sgd_)
    for j in range(len(ps)):
        assert_close(ps[j], ps_r[j], tol=STEP_TOL[dtype], what=f"param {j}")
        assert_close(bufs[j], bufs_r[j], tol=STEP_TOL[dtype], what=f"buf {j}")


def test_momentum_zero_leaves_buffers_alone(gen):
    """With momentum 0 no buffer is read or written, and none is needed."""
    p, g = randn(6, 7, gen=gen), randn(6, 7, gen=gen)
    b = torch.full_like(p, float("nan"))
    p1 = p.clone()
    call_op([p1], [g], [b], [None], [None], [None], [True], LR, dict(momentum=0.0, weight_decay=5e-4))
    assert torch.isnan(b).all()
    p2 = p.clone()
    call_op([p2], [g], [], [None], [None], [None], [False], LR, dict(momentum=0.0, weight_decay=5e-4))
    assert_bits_equal(p1, p2)
    assert_close(p1, p - LR * (g + 5e-4 * p))


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("cfg", [CONFIGS[5], CONFIGS[7]], ids=[CONFIG_IDS[5], CONFIG_IDS[7]])
def test_noncontiguous_params_updated_in_place(cfg, layout, gen):
    """Params and buffers that are non-contiguous views are updated through the view
    (not on a hidden contiguous copy), without touching the memory between elements."""
    O, I = 13, 9
    keep = make_mask(O, I, 0.5, gen)
    active = torch.rand(O, generator=gen) < 0.5
    p_c, g_c, b_c = randn(O, I, gen=gen) * keep, randn(O, I, gen=gen), randn(O, I, gen=gen) * keep
    lay = {"transposed": transposed, "strided": strided}[layout]
    p, g, b = lay(p_c.clone()), lay(g_c.clone()), lay(b_c.clone())
    ab = active.repeat_interleave(2)  # strided active mask with poison gaps
    ab[1::2] = ~active
    act = ab[::2] if layout == "strided" else active
    base_p = p._base if p._base is not None else p
    for step in range(3):
        call_op([p], [g], [b], [keep], [act], [None], [step == 0], LR, cfg)
        call_op([p_c], [g_c], [b_c], [keep], [active], [None], [step == 0], LR, cfg, op=ref.reference_masked_sgd_)
        assert_close(p, p_c, tol=STEP_TOL[torch.float32], what=f"param step {step}")
        assert_close(b, b_c, tol=STEP_TOL[torch.float32], what=f"buf step {step}")
    if layout == "strided":
        gaps = torch.ones_like(base_p, dtype=torch.bool)
        gaps[::2, ::2] = False
        assert torch.isnan(base_p[gaps]).all(), "the op wrote between the elements of a strided param"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg", [CONFIGS[6], CONFIGS[8]], ids=[CONFIG_IDS[6], CONFIG_IDS[8]])
def test_large_and_scalar_params_match_reference(cfg, dtype, gen):
    """Params longer than one work chunk (tens of thousands of elements; frozen rows and
    CSR rows straddle chunk boundaries), and a 0-dim param."""
    O, I = 301, 257
    keep = make_mask(O, I, 0.3, gen)
    csr_mask = make_mask(O, I, 0.2, gen)
    csr_mask[::50] = False  # some empty CSR rows
    counts = csr_mask.sum(1)
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32)
    nnz = int(csr_mask.sum())
    assert nnz > 1 << 15 and O * I > 2 * (1 << 15)
    ps = [randn(O, I, dtype=dtype, gen=gen) * keep, randn(nnz, dtype=dtype, gen=gen),
          randn(O, I, dtype=dtype, gen=gen), randn(dtype=dtype, gen=gen)]
    grads = [randn(*p.shape, dtype=dtype, gen=gen) for p in ps]
    bufs = [randn(*p.shape, dtype=dtype, gen=gen) for p in ps]
    keeps = [keep, None, None, None]
    acts = [torch.rand(O, generator=gen) < 0.5, torch.rand(O, generator=gen) < 0.5,
            torch.rand(O, I, generator=gen) < 0.5, None]
    rps = [None, row_ptr, None, None]
    ps_r, bufs_r = [p.clone() for p in ps], [b.clone() for b in bufs]
    for step in range(2):
        call_op(ps, grads, bufs, keeps, acts, rps, [step == 0] * 4, LR, cfg)
        call_op(ps_r, grads, bufs_r, keeps, acts, rps, [step == 0] * 4, LR, cfg, op=ref.reference_masked_sgd_)
        for j in range(len(ps)):
            assert_close(ps[j], ps_r[j], tol=STEP_TOL[dtype], what=f"step {step} param {j}")
            assert_close(bufs[j], bufs_r[j], tol=STEP_TOL[dtype], what=f"step {step} buf {j}")
    frozen_rows = ~acts[0]
    assert torch.equal(bits(ps[0])[frozen_rows], bits(ps_r[0])[frozen_rows])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fresh", [False, True])
def test_all_pruned_and_empty_params(dtype, fresh):
    """100% sparsity (a keep mask with nothing kept) and zero-size parameters, beside a normal
    one, against the reference (review 50: neither was tested)."""
    keeps, draw = pruned_and_empty_params(8)
    p, grads, bufs = draw(dtype), draw(dtype), draw(dtype)
    exp_p, exp_bufs = [t.clone() for t in p], [t.clone() for t in bufs]
    args = ([None] * 3, [None] * 3, [fresh] * 3, 0.1, 0.9, 0.1, 5e-4, True, False)
    ref.reference_masked_sgd_(exp_p, grads, exp_bufs, keeps, *args)
    ST.masked_sgd_(p, grads, bufs, keeps, *args)
    for new, want in zip(p + bufs, exp_p + exp_bufs):
        torch.testing.assert_close(new, want, rtol=0, atol=0)
    assert bool((p[0] == 0).all())  # nothing kept: exactly 0, whatever the update would be
