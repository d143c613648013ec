"""masked_adamw_: against its reference and side by side with torch.optim.AdamW."""
import pytest
import torch

from helpers import pruned_and_empty_params
from sparseticket.ops import reference as R

ST = torch.ops.sparseticket


def _state(p):
    return torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_matches_torch_adamw_on_kept_weights(dtype, amsgrad, maximize, weight_decay):
    g = torch.Generator().manual_seed(0)
    shape = (37, 19)
    p0 = torch.randn(shape, generator=g, dtype=dtype)
    keep = torch.rand(shape, generator=g) > 0.6
    ref = (p0 * keep).clone().requires_grad_()
    opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.8, 0.95), eps=1e-7, weight_decay=weight_decay,
                            amsgrad=amsgrad, maximize=maximize)
    p = (p0 * keep).clone()
    m, v, vmax = _state(p)
    for step in range(1, 21):
        grad = torch.randn(shape, generator=g, dtype=dtype)
        ref.grad = grad * keep  # the dense masked pipeline: masked grads, then re-mask
        opt.step()
        with torch.no_grad():
            ref.mul_(keep)
        ST.masked_adamw_([p], [grad], [m], [v], [vmax], [keep], [None], [None], [float(step)], 1e-2, 0.8, 0.95,
                         1e-7, weight_decay, amsgrad, maximize)
        assert torch.equal(p[~keep], torch.zeros_like(p[~keep])), "pruned weights must stay exactly 0"
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(p, ref.detach(), **tol)
    torch.testing.assert_close(m, opt.state[ref]["exp_avg"] * keep, **tol)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("mask_kind", ["rows", "elements", "csr_rows"])
def test_frozen_entries_and_state_bit_identical(amsgrad, mask_kind):
    g = torch.Generator().manual_seed(1)
    if mask_kind == "csr_rows":
        crow = torch.tensor([0, 3, 3, 7, 12, 20], dtype=torch.int32)
        shape = (20,)
        active = torch.tensor([True, False, False, True, False])
        row_ptr = crow
    else:
        shape = (9, 13)
        active = torch.rand(9 if mask_kind == "rows" else shape, generator=g) > 0.5
        row_ptr = None
    p = torch.randn(shape, generator=g)
    m, v, vmax = (torch.randn(shape, generator=g).abs() for _ in range(3))
    before = [t.clone() for t in (p, m, v, vmax)]
    grad = torch.randn(shape, generator=g)
    exp = [t.clone() for t in before]
    R.reference_masked_adamw_([exp[0]], [grad], [exp[1]], [exp[2]], [exp[3]], [None], [active], [row_ptr], [3.0],
                              1e-2, 0.9, 0.999, 1e-8, 1e-2, amsgrad, False)
    ST.masked_adamw_([p], [grad], [m], [v], [vmax], [None], [active], [row_ptr], [3.0], 1e-2, 0.9, 0.999, 1e-8,
                     1e-2, amsgrad, False)
    act = R._active_elements(p, active, row_ptr)
    for new, old, e in zip((p, m, v, vmax if amsgrad else None), before, exp):
        if new is None:
            continue
        assert torch.equal(new[~act], old[~act]), "frozen entries must keep their bits"
        torch.testing.assert_close(new, e, rtol=1e-6, atol=1e-7)
    assert not torch.equal(p[act], before[0][act])


def test_opcheck():
    p = [torch.randn(5, 4), torch.randn(7)]
    args = (p, [torch.randn_like(t) for t in p], [torch.zeros_like(t) for t in p], [torch.zeros_like(t) for t in p],
            [torch.zeros_like(t) for t in p], [torch.rand(5, 4) > 0.5, None], [None, torch.tensor([True, False])],
            [None, torch.tensor([0, 3, 7], dtype=torch.int32)], [1.0, 2.0], 1e-3, 0.9, 0.999, 1e-8, 0.01, True, False)
    torch.library.opcheck(ST.masked_adamw_.default, args)


def test_bad_input_names_argument():
    p = torch.randn(4, 3)
    z = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match="exp_avg_sqs"):
        ST.masked_adamw_([p], [z], [z.clone()], [torch.zeros(3)], [], [None], [None], [None], [1.0], 1e-3, 0.9,
                         0.999, 1e-8, 0.0, False, False)
    with pytest.raises(RuntimeError, match="steps"):
        ST.masked_adamw_([p], [z], [z.clone()], [z.clone()], [], [None], [None], [None], [], 1e-3, 0.9, 0.999, 1e-8,
                         0.0, False, False)
    with pytest.raises(RuntimeError, match="keep_masks"):
        ST.masked_adamw_([p], [z], [z.clone()], [z.clone()], [], [torch.ones(4, 3)], [None], [None], [1.0], 1e-3,
                         0.9, 0.999, 1e-8, 0.0, False, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_all_pruned_and_empty_params(dtype, amsgrad):
    """100% sparsity (a keep mask with nothing kept) and zero-size parameters, beside a normal
    one, against the reference (review 50: neither was tested)."""
    keeps, draw = pruned_and_empty_params(7)
    p, grads = draw(dtype), draw(dtype)
    state = [draw(dtype, torch.rand) for _ in range(3)]
    exp_p, exp_state = [t.clone() for t in p], [[t.clone() for t in st] for st in state]
    args = ([None] * 3, [None] * 3, [2.0, 1.0, 5.0], 1e-2, 0.9, 0.999, 1e-8, 1e-2, amsgrad, False)
    R.reference_masked_adamw_(exp_p, grads, *exp_state[:2], exp_state[2] if amsgrad else [], keeps, *args)
    ST.masked_adamw_(p, grads, *state[:2], state[2] if amsgrad else [], keeps, *args)
    for new, want in zip(p + state[0] + state[1], exp_p + exp_state[0] + exp_state[1]):
        torch.testing.assert_close(new, want, rtol=0, atol=0)
    assert bool((p[0] == 0).all())  # nothing kept: exactly 0, whatever the update would be
