"""MaskedSGD / MaskedAdamW stepped side by side with torch.optim.SGD / AdamW.

The reference model is dense with the masked weights, pruned through torch.nn.utils.prune
(weight = weight_orig * mask, weight_orig zero where pruned), so torch.optim sees exactly
the gradients of the kept weights and its pruned entries stay zero. Kept weights must
agree (float64, tight tolerance); pruned weights must be exactly zero; frozen neurons
(NEq) must keep their weights and optimizer state bit for bit.
"""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune
from torch.optim.optimizer import register_optimizer_step_post_hook

import sparseticket.nn as stnn
from sparseticket.optim import MaskedAdamW, MaskedSGD, python_masked_adamw_
from sparseticket.optim import adamw as adamw_module

F64 = torch.float64
STEPS = 20
TOL = dict(rtol=1e-9, atol=1e-11)

SGD_CONFIGS = {
    "plain": dict(lr=0.05),
    "momentum_wd": dict(lr=0.05, momentum=0.9, weight_decay=1e-2),
    "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "dampening_maximize": dict(lr=0.02, momentum=0.5, dampening=0.3, maximize=True),
}
ADAMW_CONFIGS = {
    "default": dict(lr=1e-2),
    "amsgrad_wd": dict(lr=1e-2, weight_decay=0.1, amsgrad=True),
    "maximize": dict(lr=5e-3, betas=(0.8, 0.99), eps=1e-6, maximize=True),
}


def make_mask(shape, sparsity, gen):
    n = 1
    for s in shape:
        n *= s
    m = torch.zeros(n, dtype=torch.bool)
    m[torch.randperm(n, generator=gen)[:int(round((1 - sparsity) * n))]] = True
    return m.view(shape)


def net():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 10), nn.ReLU(),
                         nn.Linear(10, 3)).double()


SPARSE = ("0", "3")  # conv and first linear become sparse; the last linear stays plain


def pair(gen, sparsity=0.6):
    """(sparse model, reference dense model pruned with torch.nn.utils.prune, masks)."""
    torch.manual_seed(0)
    base = net()
    masks = {n: make_mask(tuple(base.get_submodule(n).weight.shape), sparsity, gen) for n in SPARSE}
    sparse = stnn.sparsify(copy.deepcopy(base), masks=masks, mode="sparse")
    return sparse, pruned_copy(base, masks), masks


def pruned_copy(base, masks, offset=0.0):
    """``base`` pruned by torch.nn.utils.prune; weight_orig = (weight + offset) * mask."""
    ref = copy.deepcopy(base)
    for n, m in masks.items():
        layer = ref.get_submodule(n)
        with torch.no_grad():
            layer.weight.add_(offset).mul_(m)
        prune.custom_from_mask(layer, "weight", m)
    return ref


def batches(gen, n=STEPS):
    return [(torch.randn(6, 2, 5, 5, dtype=F64, generator=gen), torch.randn(6, 3, dtype=F64, generator=gen))
            for _ in range(n)]


def train(model, opt, data):
    for x, t in data:
        opt.zero_grad()
        ((model(x) - t) ** 2).mean().backward()
        opt.step()


def assert_same_weights(sparse, ref, masks):
    for n, m in masks.items():
        w = sparse.get_submodule(n).dense_weight()
        # weight_orig, not weight: prune recomputes weight only in the next forward
        torch.testing.assert_close(w, ref.get_submodule(n).weight_orig.detach(), **TOL, msg=n)
        assert torch.all(w[~m] == 0)
    ref_params = dict(ref.named_parameters())
    for n, p in sparse.named_parameters():
        if "weight_values" not in n:
            torch.testing.assert_close(p, ref_params[n], **TOL, msg=n)


@pytest.mark.parametrize("config", sorted(SGD_CONFIGS))
def test_masked_sgd_matches_torch_sgd(config, gen):
    sparse, ref, masks = pair(gen)
    kw = SGD_CONFIGS[config]
    data = batches(gen)
    train(sparse, MaskedSGD(sparse.parameters(), **kw), data)
    train(ref, torch.optim.SGD(ref.parameters(), **kw), data)
    assert_same_weights(sparse, ref, masks)


@pytest.fixture(params=["fused", "python"])
def adamw_impl(request, monkeypatch):
    """MaskedAdamW through the kernel layer's masked_adamw_ op, and through the Python path."""
    if request.param == "python":
        monkeypatch.setattr(adamw_module, "masked_adamw_", python_masked_adamw_)
    elif adamw_module.masked_adamw_ is python_masked_adamw_:
        pytest.skip("torch.ops.sparseticket.masked_adamw_ is not defined")
    return request.param


@pytest.mark.parametrize("config", sorted(ADAMW_CONFIGS))
def test_masked_adamw_matches_torch_adamw(config, adamw_impl, gen):
    sparse, ref, masks = pair(gen)
    kw = ADAMW_CONFIGS[config]
    data = batches(gen)
    opt = MaskedAdamW(sparse.parameters(), **kw)
    train(sparse, opt, data)
    topt = torch.optim.AdamW(ref.parameters(), **kw)
    train(ref, topt, data)
    assert_same_weights(sparse, ref, masks)
    # state_dict in torch.optim.AdamW's format
    assert set(opt.state_dict()["state"][0]) == set(topt.state_dict()["state"][0])
    assert opt.state_dict()["param_groups"][0].keys() <= topt.state_dict()["param_groups"][0].keys()


@pytest.mark.parametrize("opt_cls,kw", [(MaskedSGD, dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
                                        (MaskedAdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True))])
def test_dense_pruned_layer_keeps_zeros(opt_cls, kw, gen):
    """torch.nn.utils.prune layers: weight_orig's pruned entries become and stay exactly 0
    (torch.optim would let weight decay and momentum move them), kept ones match torch.optim."""
    torch.manual_seed(0)
    base = net()
    masks = {n: make_mask(tuple(base.get_submodule(n).weight.shape), 0.6, gen) for n in SPARSE}
    ref = pruned_copy(base, masks, offset=1.0)
    mine = pruned_copy(base, {}, offset=0.0)
    for n, m in masks.items():
        with torch.no_grad():
            mine.get_submodule(n).weight.add_(1.0)  # pruned entries of weight_orig start non-zero here
        prune.custom_from_mask(mine.get_submodule(n), "weight", m)
    stnn.attach_masks(mine)
    data = batches(gen)
    train(mine, opt_cls(mine.parameters(), **kw), data)
    train(ref, getattr(torch.optim, opt_cls.__name__[6:])(ref.parameters(), **kw), data)
    for n, m in masks.items():
        w = mine.get_submodule(n).weight_orig.detach()
        assert torch.all(w[~m] == 0)
        torch.testing.assert_close(w, ref.get_submodule(n).weight_orig.detach(), **TOL)


def _state_tensors(opt, p):
    return {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v) and v.dim() > 0}


@pytest.mark.parametrize("opt_cls,kw", [(MaskedSGD, dict(lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True)),
                                        (MaskedAdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True))])
def test_frozen_neurons_bit_identical(opt_cls, kw, adamw_impl, gen):
    if opt_cls is MaskedSGD and adamw_impl == "python":
        pytest.skip("AdamW-only variant")
    """Frozen rows (weights, bias, every state tensor) keep their bits; active rows of a
    one-layer model (rows independent of each other) follow torch.optim exactly."""
    torch.manual_seed(0)
    lin = nn.Linear(12, 8, dtype=F64)
    conv = nn.Conv2d(3, 4, 3, dtype=F64)
    mask = make_mask((8, 12), 0.5, gen)
    mine = nn.ModuleDict(dict(lin=stnn.SparseLinear.from_dense(lin, mask, mode="sparse"),
                              neq=stnn.enable_neq(nn.Sequential(copy.deepcopy(conv)))[0],
                              sconv=stnn.SparseConv2d.from_dense(conv, make_mask((4, 3, 3, 3), 0.5, gen))))
    ref = nn.ModuleDict(dict(lin=copy.deepcopy(lin), neq=copy.deepcopy(conv)))
    with torch.no_grad():
        ref["lin"].weight.mul_(mask)
    prune.custom_from_mask(ref["lin"], "weight", mask)
    opt = opt_cls(mine.parameters(), **kw)
    topt = getattr(torch.optim, opt_cls.__name__[6:])(ref.parameters(), **kw)

    def step(model, o, x, xc, update=True):
        o.zero_grad()
        loss = (model["lin"](x) ** 2).sum() + (model["neq"](xc) ** 2).sum()
        if "sconv" in model:
            loss = loss + (model["sconv"](xc) ** 2).sum()
        loss.backward()
        o.step()

    data = [(torch.randn(5, 12, dtype=F64, generator=gen), torch.randn(2, 3, 5, 5, dtype=F64, generator=gen))
            for _ in range(8)]
    for x, xc in data[:3]:  # build up state first
        step(mine, opt, x, xc)
        step(ref, topt, x, xc)
    actives = {k: make_mask((n,), 0.5, gen) for k, n in (("lin", 8), ("neq", 4), ("sconv", 4))}
    for k, a in actives.items():
        mine[k].set_active(a)
    before = {n: (p.detach().clone(), _state_tensors(opt, p)) for n, p in mine.named_parameters()}
    for x, xc in data[3:]:
        step(mine, opt, x, xc)
    for n, p in mine.named_parameters():
        layer = n.split(".")[0]
        a = actives[layer]
        rows = (mine[layer].ticket.crow[1:] - mine[layer].ticket.crow[:-1]).long() if "weight_values" in n else None
        frozen = ~(torch.repeat_interleave(a, rows) if rows is not None else a)
        old, old_state = before[n]
        new_state = _state_tensors(opt, p)
        for what, t_old, t_new in [("param", old, p.detach())] + [(k, old_state[k], new_state[k]) for k in old_state]:
            assert torch.equal(t_old[frozen].view(torch.int64), t_new[frozen].view(torch.int64)), (n, what)
            assert not torch.equal(t_old[~frozen], t_new[~frozen]), (n, what)
    # active rows equal torch.optim's (torch sees no gradient for the frozen rows it also keeps)
    for x, xc in data[3:]:
        step(ref, topt, x, xc)
    a = actives["lin"]
    torch.testing.assert_close(mine["lin"].dense_weight()[a], ref["lin"].weight_orig.detach()[a], **TOL)
    torch.testing.assert_close(mine["lin"].bias[a], ref["lin"].bias[a], **TOL)
    a = actives["neq"]
    torch.testing.assert_close(mine["neq"].weight[a], ref["neq"].weight[a], **TOL)


@pytest.mark.parametrize("opt_cls,kw", [(MaskedSGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-2)),
                                        (MaskedAdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True))])
def test_mask_change_without_rebuilding_the_optimizer(opt_cls, kw, adamw_impl, gen):
    """A sparse model and a dense model held masked by keep masks, both changing masks
    mid-training with the same optimizer object: the same trajectory. For the sparse model
    the optimizer carries state of weights kept in both masks and swaps in the new
    Parameter when nnz changed."""
    if opt_cls is MaskedSGD and adamw_impl == "python":
        pytest.skip("AdamW-only variant")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    m1 = make_mask((8, 10), 0.5, gen)
    sparse = stnn.sparsify(copy.deepcopy(base), masks={"0": m1}, mode="sparse")
    dense = copy.deepcopy(base)
    keep = {"m": m1}
    stnn.register_param(dense[0].weight, keep=lambda: keep["m"])
    with torch.no_grad():
        dense[0].weight.mul_(m1)
    opt_s, opt_d = opt_cls(sparse.parameters(), **kw), opt_cls(dense.parameters(), **kw)
    data = batches(gen, 24)
    data = [(x.flatten(1)[:, :10], t) for x, t in data]
    new_masks = [make_mask((8, 10), 0.5, gen), make_mask((8, 10), 0.75, gen), make_mask((8, 10), 0.25, gen)]
    for k, (x, t) in enumerate(data):
        if k in (6, 12, 18):  # same nnz, fewer, more
            m = new_masks[k // 6 - 1]
            old_param = sparse[0].weight_values
            sparse[0].set_mask(m)
            keep["m"] = m
            with torch.no_grad():
                dense[0].weight.mul_(m)
            assert (sparse[0].weight_values is old_param) == (k == 6)
        for model, o in ((sparse, opt_s), (dense, opt_d)):
            o.zero_grad()
            ((model(x) - t) ** 2).mean().backward()
            o.step()
        torch.testing.assert_close(sparse[0].dense_weight(), dense[0].weight.detach(), **TOL, msg=f"step {k}")
    assert any(p is sparse[0].weight_values for p in opt_s.param_groups[0]["params"])
    assert sparse[0].weight_values in opt_s.state


def test_state_dict_resume(gen):
    sparse, _, _ = pair(gen)
    data = batches(gen, 10)
    full = copy.deepcopy(sparse)
    opt_full = MaskedAdamW(full.parameters(), lr=1e-2)
    train(full, opt_full, data)
    first = copy.deepcopy(sparse)
    opt_first = MaskedAdamW(first.parameters(), lr=1e-2)
    train(first, opt_first, data[:5])
    ckpt = copy.deepcopy({"model": first.state_dict(), "opt": opt_first.state_dict()})
    fresh = stnn.sparsify(net(), amount=0.2, filter=lambda n, m: n in SPARSE, mode="sparse")  # other nnz
    opt = MaskedAdamW(fresh.parameters(), lr=1e-2)
    fresh.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    train(fresh, opt, data[5:])
    for (n, p), q in zip(fresh.named_parameters(), full.parameters()):
        assert torch.equal(p, q), n


def test_param_groups_and_plain_params(gen):
    sparse, ref, masks = pair(gen)
    data = batches(gen, 5)

    def groups(model):
        return [dict(params=list(model[0].parameters()), lr=0.2),
                dict(params=[p for n, p in model.named_parameters() if not n.startswith("0.")])]

    train(sparse, MaskedSGD(groups(sparse), lr=0.05, momentum=0.9), data)
    train(ref, torch.optim.SGD(groups(ref), lr=0.05, momentum=0.9), data)
    assert_same_weights(sparse, ref, masks)


def test_parameter_whose_shape_changes_behind_the_optimizer(gen):
    p = nn.Parameter(torch.randn(5, dtype=F64))
    stnn.register_param(p, keep=lambda: None)
    opt = MaskedSGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones_like(p)
    opt.step()
    with torch.no_grad():
        p.data = torch.randn(7, dtype=F64)
    p.grad = torch.ones_like(p)
    opt.step()  # state reset as for a new parameter, no shape error
    assert opt.state[p]["momentum_buffer"].shape == (7,)


def test_python_adamw_against_kernel_layer_reference(gen):
    """The Python masked AdamW against the kernel layer's reference (ops/reference.py),
    with keep masks, per-row and per-CSR-row active masks."""
    import sparseticket.ops.reference as ref_mod
    crow = torch.tensor([0, 2, 2, 5, 6], dtype=torch.int32)
    shapes = [(6, 4), (6,), (6,)]
    keeps = [make_mask((6, 4), 0.3, gen), None, None]
    actives = [make_mask((6,), 0.5, gen), None, make_mask((4,), 0.5, gen)]
    row_ptrs = [None, None, crow]
    args = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, amsgrad=True, maximize=False)
    mine = [[torch.randn(s, dtype=F64, generator=gen) for s in shapes] for _ in range(4)]  # p, m, v, vmax
    for t in mine[2] + mine[3]:
        t.abs_()
    theirs = [[t.clone() for t in group] for group in mine]
    grads = [torch.randn(s, dtype=F64, generator=gen) for s in shapes]
    for step in (1, 2):
        python_masked_adamw_(mine[0], grads, mine[1], mine[2], mine[3], keeps, actives, row_ptrs, [step] * 3,
                             *args.values())
        ref_mod.reference_masked_adamw_(theirs[0], grads, theirs[1], theirs[2], theirs[3], keeps, actives, row_ptrs,
                                        [step] * 3, *args.values())
    for a, b in zip([t for g in mine for t in g], [t for g in theirs for t in g]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)



def test_bad_arguments():
    p = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="learning rate"):
        MaskedSGD([p], lr=-1)
    with pytest.raises(ValueError, match="Nesterov"):
        MaskedSGD([p], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="beta"):
        MaskedAdamW([p], betas=(1.0, 0.9))


# ----------------------------------------------------------------------------- step wrapper, zero_grad
# The masked optimizers replace torch.optim's step wrapper with a lean one (optim/_base.py,
# lean_step) that hands over to torch's whenever hooks or the profiler are live.


@pytest.mark.parametrize("opt_cls", [MaskedSGD, MaskedAdamW])
def test_step_hooks_and_profiler_label_still_work(opt_cls, gen):
    lin = stnn.SparseLinear(7, 5, density=0.5)
    opt = opt_cls(lin.parameters(), lr=0.1)
    calls = []
    pre = opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    post = opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    lin(torch.randn(3, 7, generator=gen)).sum().backward()
    before = lin.weight_values.detach().clone()
    opt.step()
    assert calls == ["pre", "post"]
    assert not torch.equal(before, lin.weight_values.detach()), "the step did not update the weights"
    pre.remove()
    post.remove()
    opt.step()
    assert calls == ["pre", "post"], "removed hooks must not run"
    glob = register_optimizer_step_post_hook(lambda o, a, k: calls.append("global"))
    try:
        opt.step()
    finally:
        glob.remove()
    assert calls == ["pre", "post", "global"]
    with torch.profiler.profile() as prof:
        opt.step()
        opt.zero_grad()
    names = {e.name for e in prof.events()}
    assert f"Optimizer.step#{opt_cls.__name__}.step" in names
    assert f"Optimizer.zero_grad#{opt_cls.__name__}.zero_grad" in names


def test_zero_grad_set_to_none_and_zeroing(gen):
    lin = stnn.SparseLinear(7, 5, density=0.5)
    plain = nn.Parameter(torch.randn(3, generator=gen))
    opt = MaskedSGD([{"params": lin.parameters()}, {"params": [plain]}], lr=0.1)
    (lin(torch.randn(3, 7, generator=gen)).sum() + plain.sum()).backward()
    opt.zero_grad(set_to_none=False)
    for p in (lin.weight_values, lin.bias, plain):
        assert p.grad is not None and not p.grad.any()
    opt.zero_grad()
    assert all(p.grad is None for p in (lin.weight_values, lin.bias, plain))


def test_masked_sgd_repeat_step_is_taken_and_left(gen, monkeypatch):
    """A step that changes nothing reuses the previous step's argument lists
    (MaskedSGD._st_repeat_step); every kind of change sends it down the full path. Against
    a twin optimizer that always takes the full path, the trajectories are bit-identical
    through a learning-rate change, frozen neurons, a new mask, a state reset, a parameter
    left without a gradient and a momentum switched off."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    m1 = make_mask((8, 10), 0.5, gen)
    models = [stnn.sparsify(copy.deepcopy(base), masks={"0": m1}, mode="sparse") for _ in range(2)]
    opts = [MaskedSGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3) for m in models]
    full = opts[1]
    monkeypatch.setattr(full, "_st_repeat_step", lambda group: False)
    calls = {"prepare": 0}
    prepare = opts[0]._prepare

    def counting_prepare(group):
        calls["prepare"] += 1
        return prepare(group)

    monkeypatch.setattr(opts[0], "_prepare", counting_prepare)
    data = [(x.flatten(1)[:, :10], t) for x, t in batches(gen, 16)]
    new_mask = make_mask((8, 10), 0.75, gen)
    # the first step, each step with a change, and the step after the one without a gradient
    # (not remembered: it did not cover every parameter)
    expect_full = {0, 4, 6, 8, 10, 11, 12}
    for k, (x, t) in enumerate(data):
        # changes to both models first: a (re)registration anywhere bumps the registry's
        # version, which also sends the other optimizer down the full path once
        for model, opt in zip(models, opts):
            if k == 3:  # read every step, no full path needed
                opt.param_groups[0]["lr"] = 0.02
            if k == 4:  # NEq-style freezing: a new active mask object
                model[0].set_active(torch.tensor([True, False] * 4))
            if k == 6:
                model[0].set_mask(new_mask)
            if k == 8:  # state replaced from outside
                opt.state[model[2].weight]["momentum_buffer"] = torch.zeros_like(model[2].weight)
        for model, opt in zip(models, opts):
            opt.zero_grad()
            ((model(x) - t) ** 2).mean().backward()
            if k == 10:  # a parameter without a gradient this step
                model[2].bias.grad = None
            if k == 12:
                opt.param_groups[0]["momentum"] = 0.0
            before = calls["prepare"]
            opt.step()
            if opt is opts[0]:
                assert (calls["prepare"] > before) == (k in expect_full), f"step {k}"
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            assert torch.equal(p, q), f"step {k}"


def test_masked_sgd_repeat_step_after_state_load_new_group_and_zeroed_grads(gen, monkeypatch):
    """More changes the repeated step must notice: a state_dict loaded mid-run, a param
    group added, gradients zeroed instead of set to None, a parameter's .data replaced by a
    tensor of the same shape. Bit-identical to a twin that always takes the full path."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    m1 = make_mask((8, 10), 0.5, gen)
    e0 = torch.randn(4, dtype=F64, generator=gen)
    extra = [nn.Parameter(e0.clone()) for _ in range(2)]
    models = [stnn.sparsify(copy.deepcopy(base), masks={"0": m1}, mode="sparse") for _ in range(2)]
    opts = [MaskedSGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    monkeypatch.setattr(opts[1], "_st_repeat_step", lambda group: False)
    data = [(x.flatten(1)[:, :10], t) for x, t in batches(gen, 12)]
    saved = None
    for k, (x, t) in enumerate(data):
        for i, (model, opt) in enumerate(zip(models, opts)):
            if k == 2 and i == 0:
                saved = copy.deepcopy(opt.state_dict())
            if k == 4:
                opt.load_state_dict(copy.deepcopy(saved))
            if k == 6:
                opt.add_param_group({"params": [extra[i]], "lr": 0.1})
            if k == 8:
                with torch.no_grad():
                    model[2].weight.data = model[2].weight.data.clone() * 0.5
            opt.zero_grad(set_to_none=(k % 2 == 0))
            loss = ((model(x) - t) ** 2).mean()
            if k >= 6:
                loss = loss + (extra[i] ** 2).sum() * 0.1
            loss.backward()
            opt.step()
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            assert torch.equal(p, q), f"step {k}"
        assert torch.equal(extra[0], extra[1]), f"step {k}"


@pytest.mark.parametrize("opt_cls, kw, entry", [
    (MaskedSGD, dict(lr=0.05, momentum=0.9), "fast"),
    (MaskedSGD, dict(lr=0.05, momentum=0.9), "torch.ops"),
    (MaskedAdamW, dict(lr=1e-2, amsgrad=True), "torch.ops"),
], ids=["sgd-fast", "sgd-torch.ops", "adamw"])
def test_step_bumps_version_counters_as_torch_optim(opt_cls, kw, entry, gen, monkeypatch):
    """Every parameter and state tensor the step writes has its version counter bumped, as
    torch.optim's in-place updates do, so a backward through weights the step changed
    fails as it does with torch.optim.SGD instead of silently using the new values."""
    import sparseticket.optim.sgd as sgd_module
    if entry == "torch.ops":
        monkeypatch.setattr(sgd_module, "_masked_sgd_call", None)
    sparse, ref, _ = pair(gen)
    x, t = batches(gen, 1)[0]
    results = []
    for model, opt in ((sparse, opt_cls(sparse.parameters(), **kw)),
                       (ref, (torch.optim.SGD if opt_cls is MaskedSGD else torch.optim.AdamW)(ref.parameters(), **kw))):
        ((model(x) - t) ** 2).mean().backward()
        opt.step()  # creates the state
        for _ in range(2):  # the first and a repeated step (MaskedSGD's cached path)
            ((model(x) - t) ** 2).mean().backward()
            tensors = [p for p in model.parameters()] + [s for st in opt.state.values() for s in st.values()
                                                          if torch.is_tensor(s) and s.dim() > 0]
            before = [s._version for s in tensors]
            opt.step()
            assert all(s._version > v for s, v in zip(tensors, before))
        loss = ((model(x) - t) ** 2).mean()
        opt.step()
        with pytest.raises(RuntimeError) as err:
            loss.backward()
        results.append("modified by an inplace operation" in str(err.value))
    assert results == [True, True]


@pytest.mark.parametrize("opt_cls, kw", [(MaskedSGD, dict(lr=0.05, momentum=0.9)), (MaskedAdamW, dict(lr=1e-2))],
                         ids=["sgd", "adamw"])
def test_step_after_state_made_under_inference_mode_writes_nothing(opt_cls, kw, gen):
    """State created by a step under torch.inference_mode() is made of inference tensors; a
    later step outside it is refused, as torch.optim's is, and before anything is written."""
    sparse, _, _ = pair(gen)
    opt = opt_cls(sparse.parameters(), **kw)
    x, t = batches(gen, 1)[0]
    ((sparse(x) - t) ** 2).mean().backward()
    with torch.inference_mode():
        opt.step()
    ((sparse(x) - t) ** 2).mean().backward()
    before = [p.detach().clone() for p in sparse.parameters()]
    with pytest.raises(RuntimeError, match="inference"):
        opt.step()
    for p, b in zip(sparse.parameters(), before):
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("subclassed", ["param", "grad"])
def test_masked_sgd_defers_to_torch_function(subclassed, monkeypatch):
    """With a parameter, or only the gradients of a plain parameter, whose class overrides
    __torch_function__, MaskedSGD calls torch.ops (which honours it), not its C++ entry, on
    both the full and the repeated step."""
    import sparseticket.optim.sgd as sgd_module
    calls = []

    class Sub(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            calls.append(str(func))
            return super().__torch_function__(func, types, args, kwargs or {})

    entry = []
    if sgd_module._masked_sgd_call is not None:
        real = sgd_module._masked_sgd_call
        monkeypatch.setattr(sgd_module, "_masked_sgd_call", lambda *a: (entry.append(1), real(*a))[1])
    p = torch.ones(5, dtype=F64)
    if subclassed == "param":
        p = p.as_subclass(Sub)
    p.requires_grad_(True)
    opt = MaskedSGD([p], lr=0.5, momentum=0.9)
    for _ in range(3):
        g = torch.ones(5, dtype=F64)
        p.grad = g.as_subclass(Sub) if subclassed == "grad" else g
        calls.clear()
        opt.step()
        assert any("masked_sgd_" in c for c in calls), calls
    assert entry == []
    # 1 -> 0.5 -> 0.5 - 0.5 * 1.9 -> ... : torch.optim.SGD's momentum on a constant gradient
    ref = torch.ones(5, dtype=F64, requires_grad=True)
    ropt = torch.optim.SGD([ref], lr=0.5, momentum=0.9)
    for _ in range(3):
        ref.grad = torch.ones(5, dtype=F64)
        ropt.step()
    torch.testing.assert_close(torch.Tensor(p.detach()), ref.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("opt_cls, kw", [(MaskedSGD, dict(lr=0.1, momentum=0.9)), (MaskedAdamW, dict(lr=0.05))])
@pytest.mark.parametrize("grow", [False, True])
def test_state_saved_between_a_mask_change_and_the_next_step(opt_cls, kw, grow):
    """A mask changes (IMP's prune), then the optimizer is checkpointed or copied before its
    next step. Its state moved onto the new entries only at that step, so the checkpoint and
    the copy held it laid out for the old mask: applied to the wrong weights when the counts
    matched, reset when they did not (review 49). Both must train on as the live pair does."""
    import io
    x = torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def build():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).double()
        mask = torch.rand(5, 6, generator=torch.Generator().manual_seed(1)) > 0.5
        return stnn.sparsify(m, masks={"0": mask}, mode="sparse")

    def step(m, o):
        o.zero_grad()
        ((m(x) - t) ** 2).mean().backward()
        o.step()

    m = build()
    o = opt_cls(m.parameters(), **kw)
    for _ in range(3):
        step(m, o)
    mask = m[0].mask().clone()
    on, off = mask[0].nonzero()[0, 0].item(), (~mask[0]).nonzero()[0, 0].item()
    mask[0, off] = True                      # a weight of row 0 comes back...
    if not grow:
        mask[0, on] = False                  # ...and another goes: the same count
    m[0].set_mask(mask)
    copied = copy.deepcopy((m, o))
    buf = io.BytesIO()
    torch.save({"m": m.state_dict(), "o": o.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    resumed = build()
    resumed[0].set_mask(mask)
    resumed_o = opt_cls(resumed.parameters(), **kw)
    resumed.load_state_dict(saved["m"])
    resumed_o.load_state_dict(saved["o"])
    for _ in range(2):
        for pair in ((m, o), copied, (resumed, resumed_o)):
            step(*pair)
    want = m[0].dense_weight()
    assert torch.equal(copied[0][0].dense_weight(), want)
    assert torch.equal(resumed[0].dense_weight(), want)


def test_masked_optimizers_take_torch_keywords():
    """Every keyword of torch.optim.AdamW and SGD is accepted at its default (review 49: capturable=False
    raised TypeError); the options the masked step cannot honour are refused by name."""
    import inspect
    p = [nn.Parameter(torch.randn(3))]
    defaults = {k: v.default for k, v in inspect.signature(torch.optim.AdamW).parameters.items()
                if k != "params" and v.default is not inspect.Parameter.empty}
    MaskedAdamW(p, **defaults)
    MaskedSGD(p, **{k: v.default for k, v in inspect.signature(torch.optim.SGD).parameters.items()
                    if k != "params" and v.default is not inspect.Parameter.empty})
    with pytest.raises(ValueError, match="capturable"):
        MaskedAdamW(p, capturable=True)
    with pytest.raises(ValueError, match="differentiable"):
        MaskedAdamW(p, differentiable=True)
