"""sparseticket.flops: FLOPs counted from what the layers and optimizers ran.

Expected figures are written out from the shapes, the kept weights and the active rows
(2 FLOPs per multiply-add). The dense baseline of plain layers is checked against
torch.utils.flop_counter, which counts the aten ops that actually ran.
"""
import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import sparseticket
import sparseticket.nn as stnn
from sparseticket.flops import FlopCounter
from sparseticket.neq import freeze_prefix
from sparseticket.optim import MaskedAdamW, MaskedSGD

B = 8


def _mlp():
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def _convnet():
    # 3x8x8 input: conv0 -> 8x8x8, conv2 (stride 2, groups 2) -> 8x4x4
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


def _step(model, opt, x, gen):
    opt.zero_grad()
    out = model(x)
    target = torch.randint(0, out.shape[1], (out.shape[0],), generator=gen)
    nn.functional.cross_entropy(out, target).backward()
    opt.step()


def _geometry(layer, x_shape):
    """(R rows, O outputs, K inputs per output) of a Linear/Conv2d call."""
    if hasattr(layer, "in_features"):
        R = 1
        for s in x_shape[:-1]:
            R *= s
        return R, layer.out_features, layer.in_features
    N, _, H, W = x_shape
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    oh, ow = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    return N * oh * ow, layer.out_channels, layer.in_channels // layer.groups * kh * kw


def _inputs(model, x):
    """{layer index: its input's shape} for the counted layers of a Sequential."""
    shapes = {}
    for i, m in enumerate(model):
        if isinstance(m, (nn.Linear, nn.Conv2d, stnn.TicketModule)):
            shapes[i] = tuple(x.shape)
        x = m(x)
    return shapes


def _nnz_active(layer):
    counts = (layer.crow[1:] - layer.crow[:-1]).long()
    return int(counts[layer.active].sum()) if layer.active is not None else layer.nnz


def _fig(fc, name, kind):
    v = fc.layer(name)[kind]
    return v["executed"], v["dense"]


# ----------------------------------------------------------------------------- layers


@pytest.mark.parametrize("net", ["mlp", "conv"])
@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_layer_counts_follow_the_dispatched_path(net, mode, gen):
    model = _mlp() if net == "mlp" else _convnet()
    x = torch.randn((B, 784) if net == "mlp" else (B, 3, 8, 8), generator=gen)
    stnn.sparsify(model, amount=0.9, scope="layerwise", mode=mode)
    opt = MaskedSGD(model.parameters(), lr=0.1)
    shapes = _inputs(model, x)
    with FlopCounter(model) as fc:
        _step(model, opt, x, gen)
    for i, shape in shapes.items():
        layer = model[i]
        assert layer.last_path == mode and layer.density < 0.11
        R, O, K = _geometry(layer, shape)
        dense = 2 * R * O * K
        executed = 2 * R * layer.nnz if mode == "sparse" else dense
        assert _fig(fc, str(i), "forward") == (executed, dense)
        assert _fig(fc, str(i), "grad_weight") == (executed, dense)
        # the first layer's input is data: no input gradient, in either column
        assert _fig(fc, str(i), "grad_input") == ((0, 0) if i == 0 else (executed, dense))
    rows = {(r["layer"], r["kind"]): r for r in fc.summary()}
    assert rows[("0", "forward")]["path"] == mode
    assert rows[("0", "forward")]["type"] == type(model[0]).__name__
    assert fc.steps == 1


@pytest.mark.parametrize("frozen", [False, True])
def test_dense_tile_weight_gradient_counted_as_computed(frozen, gen):
    """A SparseLinear dense enough for the dense-tile kept-weight gradient (ops_cpu.cpp,
    use_sddmm_tiles) computes every column of each active row that keeps a weight; a sparse
    one only its kept entries. The counter follows the kernel, not the mask."""
    from sparseticket.ops import _C
    if _C is None:
        pytest.skip("compiled kernels not built")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 20))
    x = torch.randn(B, 40, generator=gen)
    masks = {}
    for name, density in (("0", 0.6), ("2", 0.1)):
        m = torch.rand(model.get_submodule(name).weight.shape, generator=gen) < density
        m[3] = False  # a row with no kept weight: the tiles skip it
        masks[name] = m
    stnn.sparsify(model, masks=masks, mode="sparse")
    if frozen:
        for name in ("0", "2"):
            active = torch.ones(model[int(name)].out_features, dtype=torch.bool)
            active[::3] = False
            model[int(name)].set_active(active)
    opt = MaskedSGD(model.parameters(), lr=0.1)
    with FlopCounter(model) as fc:
        _step(model, opt, x, gen)
    tiles = [bool(_C.sddmm_uses_tiles(model[i].nnz, B, model[i].out_features, model[i].in_features)) for i in (0, 2)]
    assert tiles == [True, False]
    fc1, fc2 = model[0], model[2]
    keeps = (fc1.crow[1:] > fc1.crow[:-1]) & (fc1.active if fc1.active is not None else True)
    assert _fig(fc, "0", "grad_weight")[0] == 2 * B * 40 * int(keeps.sum())
    assert _fig(fc, "2", "grad_weight")[0] == 2 * B * _nnz_active(fc2)


@pytest.mark.parametrize("k,hw", [(1, 8), (3, 10), (3, 40)])
def test_grouped_conv_dense_tile_gradient_counted(k, hw, gen):
    """A grouped SparseConv2d runs the linear ops on im2col rows (one call, or one per block
    of output positions), so its kept-weight gradient can take the dense tiles too, over
    the full in·kh·kw width; the counter follows each call. 40x40 at 3x3 is cut into blocks."""
    from sparseticket.nn.conv import _blocks
    from sparseticket.ops import _C
    if _C is None:
        pytest.skip("compiled kernels not built")
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(8, 8, k, groups=2), nn.Flatten(), nn.Linear(8 * (hw - k + 1) ** 2, 3))
    mask = torch.ones(m[0].weight.shape, dtype=torch.bool)  # every in-group weight: 50% of in·kh·kw
    mask[2, 1] = False
    stnn.sparsify(m, masks={"0": mask}, mode="sparse")
    c = m[0]
    x = torch.randn(1, 8, hw, hw, generator=gen)
    with FlopCounter(m) as fc:
        m(x).sum().backward()
    oh = hw - k + 1
    kfull = 8 * k * k
    blocks = [oh * oh] if k == 1 else [(n1 - n0) * (h1 - h0) * oh for n0, n1, h0, h1 in _blocks(1, oh, oh, kfull * 4)]
    assert sum(blocks) == oh * oh
    rows = int((c.crow[1:] > c.crow[:-1]).sum())
    want = 0
    for b in blocks:
        tiles = bool(_C.sddmm_uses_tiles(c.nnz, b, 8, kfull))
        want += 2 * b * kfull * rows if tiles else 2 * b * c.nnz
    assert _fig(fc, "0", "grad_weight")[0] == want
    if hw <= 10:  # one call of 64 positions at ~48% density: the tiles
        assert len(blocks) == 1 and _C.sddmm_uses_tiles(c.nnz, blocks[0], 8, kfull)


def _dense_models(gen):
    # no groups here: torch's counter charges a grouped conv's weight gradient as if
    # groups were 1 (2x for groups=2); test_layer_counts_follow_the_dispatched_path covers groups
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2, padding=1),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 10))
    seq = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))  # fed [B, 3, 12]: R = 3·B
    return [(conv, torch.randn(B, 3, 8, 8, generator=gen)), (seq, torch.randn(B, 3, 12, generator=gen))]


@pytest.mark.parametrize("sparsified", [False, True])
def test_dense_execution_matches_torch_flop_counter(sparsified, gen):
    """What torch's own counter sees dispatched (mm, addmm, convolution and their backward)
    is what we count as executed for plain layers and for sparse layers on the dense path."""
    for model, x in _dense_models(gen):
        if sparsified:
            stnn.sparsify(model, amount=0.5, mode="dense")
        with FlopCounter(model) as fc, FlopCounterMode(display=False) as ref:
            model(x).square().sum().backward()
        t = fc.totals()
        ours = t["forward"]["executed"] + t["grad_input"]["executed"] + t["grad_weight"]["executed"]
        assert ours == ref.get_total_flops() > 0
        assert t["all"]["executed"] == t["all"]["dense"]


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_neq_half_frozen_weight_gradient(mode, gen):
    torch.manual_seed(0)
    model = _convnet()
    x = torch.randn(B, 3, 8, 8, generator=gen)
    shapes = _inputs(model, x)
    dense_model = stnn.enable_neq(copy.deepcopy(model))
    stnn.sparsify(model, amount=0.9, scope="layerwise", mode=mode)
    for m in (model, dense_model):
        for i in shapes:
            O = m[i].out_features if hasattr(m[i], "out_features") else m[i].out_channels
            active = torch.zeros(O, dtype=torch.bool)
            active[torch.randperm(O, generator=gen)[:O // 2]] = True
            m[i].set_active(active)
    for m in (model, dense_model):
        opt = MaskedSGD(m.parameters(), lr=0.1)
        with FlopCounter(m) as fc:
            _step(m, opt, x, gen)
        for i, shape in shapes.items():
            R, O, K = _geometry(m[i], shape)
            dense = 2 * R * O * K
            gw, gw_dense = _fig(fc, str(i), "grad_weight")
            assert gw_dense == dense
            if m is dense_model or mode == "dense":
                assert gw == dense // 2           # frozen rows of the dense gradient are never computed
            else:
                assert gw == 2 * R * _nnz_active(m[i]) < 2 * R * m[i].nnz
            fwd = _fig(fc, str(i), "forward")
            assert _fig(fc, str(i), "grad_input") == ((0, 0) if i == 0 else fwd)   # unchanged by NEq


def test_first_layer_input_gradient_counted_when_required(gen):
    model = stnn.sparsify(_mlp(), amount=0.9, mode="sparse")
    x = torch.randn(B, 784, generator=gen)
    with FlopCounter(model) as fc:
        model(x).sum().backward()
        assert _fig(fc, "0", "grad_input") == (0, 0)
        model(x.requires_grad_()).sum().backward()
    assert _fig(fc, "0", "grad_input") == (2 * B * model[0].nnz, 2 * B * 784 * 300)


def test_freeze_prefix_counts_no_backward_for_the_prefix(gen):
    model = stnn.enable_neq(_mlp())
    x = torch.randn(B, 784, generator=gen)
    model[0].set_active(torch.zeros(300, dtype=torch.bool))
    model[2].set_active(torch.zeros(100, dtype=torch.bool))
    opt = MaskedSGD(model.parameters(), lr=0.1, momentum=0.9)
    dense = {0: 2 * B * 784 * 300, 2: 2 * B * 300 * 100, 4: 2 * B * 100 * 10}
    with FlopCounter(model) as fc:
        with freeze_prefix(model) as prefix:
            assert [n for n, _ in prefix] == ["0", "2"]
            _step(model, opt, x, gen)
    assert _fig(fc, "0", "grad_input") == (0, 0)
    assert _fig(fc, "0", "grad_weight") == (0, dense[0])          # the dense model would train it
    assert _fig(fc, "2", "grad_input") == (0, dense[2])
    assert _fig(fc, "2", "grad_weight") == (0, dense[2])
    assert _fig(fc, "4", "grad_input") == (0, dense[4])           # the graph starts at layer 4
    assert _fig(fc, "4", "grad_weight") == (dense[4], dense[4])
    # not updated; the dense model would have (SGD with a fresh momentum buffer: 2 FLOPs per element)
    assert _fig(fc, "0", "optimizer") == (0, (784 * 300 + 300) * 2)
    # without the cut, the frozen layers still pass the input gradient and skip every weight-gradient row
    with FlopCounter(model) as fc:
        _step(model, opt, x, gen)
    assert _fig(fc, "0", "grad_weight") == (0, dense[0])
    assert _fig(fc, "2", "grad_input") == (dense[2], dense[2])
    assert _fig(fc, "4", "grad_input") == (dense[4], dense[4])


def test_backward_recorded_only_when_it_runs(gen):
    model = stnn.sparsify(_mlp(), amount=0.9, mode="sparse")
    x = torch.randn(B, 784, generator=gen)
    fwd = 2 * B * model[2].nnz
    with FlopCounter(model) as fc:
        y = model(x)                                   # forward with grad, no backward yet
        assert _fig(fc, "2", "grad_weight") == (0, 0)
        y.sum().backward(retain_graph=True)
        assert _fig(fc, "2", "grad_weight")[0] == fwd
        y.sum().backward()                             # a second backward runs the kernels again
        assert _fig(fc, "2", "grad_weight")[0] == 2 * fwd
        model.eval()
        with torch.no_grad():
            model(x)
    assert _fig(fc, "2", "forward")[0] == 2 * fwd
    assert _fig(fc, "2", "grad_input")[0] == 2 * fwd
    assert fc.steps == 0


def test_output_written_in_place_still_records_backward(gen):
    """The sparse conv returns a permuted view and a Linear on [B, L, I] a reshaped one; an
    in-place ReLU on such a view replaces its node, so the record hangs on the base's node."""
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    stnn.sparsify(conv, amount=0.5, mode="sparse")
    # 60% pruned: below the density of the dense-tile weight gradient, whose count differs
    # from the forward's (test_dense_tile_weight_gradient_counted_as_computed)
    seq = stnn.sparsify(nn.Sequential(nn.Linear(6, 7), nn.ReLU(inplace=True), nn.Linear(7, 2)), amount=0.6,
                        mode="sparse")
    for model, x in ((conv, torch.randn(2, 3, 8, 8, generator=gen)), (seq, torch.randn(2, 3, 6, generator=gen))):
        with FlopCounter(model) as fc:
            model(x).sum().backward()
        fwd = _fig(fc, "0", "forward")[0]
        assert fwd > 0 and _fig(fc, "0", "grad_weight")[0] == fwd


# ----------------------------------------------------------------------------- optimizers


def _sgd_expected(n, fresh, momentum, wd, nesterov):
    per = 2 + (2 if wd else 0) + ((0 if fresh else 3) + (2 if nesterov else 0) if momentum else 0)
    return n * per


def test_masked_sgd_counts_updated_elements(gen):
    torch.manual_seed(0)
    model = stnn.sparsify(_mlp(), amount=0.9, scope="layerwise", mode="sparse")
    active = torch.ones(100, dtype=torch.bool)
    active[:50] = False
    model[2].set_active(active)
    opt = MaskedSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
    x = torch.randn(B, 784, generator=gen)
    with FlopCounter(model) as fc:
        for _ in range(2):
            _step(model, opt, x, gen)
    for i, (O, I) in {0: (300, 784), 2: (100, 300), 4: (10, 100)}.items():
        layer = model[i]
        n_exec = _nnz_active(layer) + (int(layer.active.sum()) if layer.active is not None else O)
        n_dense = O * I + O
        executed = sum(_sgd_expected(n_exec, fresh, 0.9, 1e-4, True) for fresh in (True, False))
        dense = sum(_sgd_expected(n_dense, fresh, 0.9, 1e-4, True) for fresh in (True, False)) + 2 * O * I  # re-mask
        assert _fig(fc, str(i), "optimizer") == (executed, dense)
    assert len(fc.history) == 2 and fc.steps == 2
    first, second = fc.history
    assert first["forward"] == second["forward"]
    assert first["optimizer"]["executed"] < second["optimizer"]["executed"]   # momentum buffers created at step 1


def test_adamw_and_torch_optim_counts(gen):
    torch.manual_seed(0)
    model = stnn.sparsify(_mlp(), amount=0.9, scope="layerwise", mode="sparse")
    opt = MaskedAdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    x = torch.randn(B, 784, generator=gen)
    with FlopCounter(model) as fc:
        _step(model, opt, x, gen)
    assert _fig(fc, "0", "optimizer") == ((model[0].nnz + 300) * 14, (784 * 300 + 300) * 14 + 784 * 300)
    # torch.optim on a plain model: executed = dense = elements × torch.optim's cost
    dense = _mlp()
    for opt, per in ((torch.optim.SGD(dense.parameters(), lr=0.1, momentum=0.9), (2, 5)),
                     (torch.optim.Adam(dense.parameters(), weight_decay=0.1, amsgrad=True), (16, 16))):
        with FlopCounter(dense) as fc:
            _step(dense, opt, x, gen)
            _step(dense, opt, x, gen)
        n = sum(p.numel() for p in dense.parameters())
        assert fc.totals()["optimizer"] == {"dense": n * sum(per), "executed": n * sum(per)}


# ----------------------------------------------------------------------------- counter behaviour


def test_nesting_reset_and_hooks_removed(gen):
    model = stnn.sparsify(_mlp(), amount=0.9, mode="sparse")
    x = torch.randn(B, 784, generator=gen)
    with torch.no_grad():
        with FlopCounter(model) as outer:
            model(x)
            with FlopCounter(model) as inner:
                model(x)
            model(x)
            with pytest.raises(RuntimeError, match="already counting"):
                outer.start()
        model(x)  # after exit: not counted
    one = 2 * B * model[0].nnz
    assert _fig(inner, "0", "forward")[0] == one
    assert _fig(outer, "0", "forward")[0] == 3 * one
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    outer.reset()
    assert outer.totals()["all"] == {"dense": 0, "executed": 0} and outer.layers() == []
    with outer, torch.no_grad():  # a counter can be reused
        model(x)
    assert _fig(outer, "0", "forward")[0] == one
    with pytest.raises(ValueError, match="no optimizer step"):
        outer.totals(per_step=True)
    with pytest.raises(KeyError, match="counted nothing"):
        outer.layer("1")


def test_per_step_table_and_summary(gen):
    model = stnn.sparsify(_convnet(), amount=0.9, mode="sparse")
    opt = MaskedSGD(model.parameters(), lr=0.1)
    x = torch.randn(B, 3, 8, 8, generator=gen)
    with FlopCounter(model) as fc:
        for _ in range(3):
            _step(model, opt, x, gen)
    run, step = fc.totals(), fc.totals(per_step=True)
    assert step["all"]["executed"] == pytest.approx(run["all"]["executed"] / 3)
    assert run["all"]["executed"] == sum(h["all"]["executed"] for h in fc.history)
    rows = fc.summary()
    assert {r["kind"] for r in rows if r["layer"] == "(total)"} == {"forward", "grad_input", "grad_weight",
                                                                     "optimizer", "all"}
    assert sum(r["executed_flops"] for r in rows if r["layer"] != "(total)") == run["all"]["executed"]
    text = fc.table()
    for name in ("0", "2", "5", "(total)", "SparseConv2d", "3 optimizer steps"):
        assert name in text
    assert "per step" in fc.table(per_step=True)


def test_layers_swapped_in_while_counting(gen):
    """sparsify inside the block, and a mask change that gives a layer a new Parameter."""
    model = _mlp()
    x = torch.randn(B, 784, generator=gen)
    with FlopCounter(model) as fc:
        stnn.sparsify(model, amount=0.9, scope="layerwise", mode="sparse")
        opt = MaskedSGD(model.parameters(), lr=0.1)
        _step(model, opt, x, gen)
        mask = torch.zeros(300, 784, dtype=torch.bool)
        mask[:, :10] = True
        model[0].set_mask(mask)  # nnz 23520 -> 3000: a new weight_values Parameter
        fc.reset()
        _step(model, opt, x, gen)
    assert _fig(fc, "0", "forward")[0] == 2 * B * 3000
    assert _fig(fc, "0", "optimizer")[0] == (3000 + 300) * 2


def test_compiled_model_runs_fullgraph_and_is_not_counted(gen):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = stnn.sparsify(nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3)), amount=0.6, mode="sparse")
    ref = copy.deepcopy(model)
    x = torch.randn(4, 12, generator=gen)
    with FlopCounter(model) as fc:
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        y = compiled(x)
        y.sum().backward()
        assert fc.totals()["all"]["executed"] == 0
        model(x).sum().backward()  # the eager call is counted
    torch.testing.assert_close(y, ref(x))
    assert _fig(fc, "0", "forward")[0] == 2 * 4 * model[0].nnz


def test_exported_from_package():
    assert sparseticket.flops.FlopCounter is FlopCounter
