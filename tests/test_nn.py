"""sparseticket.nn: sparse and NEq layers against nn.Linear / nn.Conv2d with masked weights,
conversion in place (sparsify / densify / torch.nn.utils.prune), checkpoints, execution
mode choice, errors naming the layer, and torch.compile.

Gradients are compared in float64 so a mismatch is a bug, not rounding; each check covers
the forward, the input gradient and the gradient of every kept weight (sparse gradients
are compared with the masked dense gradient at the kept positions).
"""
import copy
import io
import pickle
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import sparseticket.nn as stnn
from sparseticket.nn import _mode
from sparseticket.nn._registry import param_masks

F64 = torch.float64
SPARSITIES = (0.0, 0.5, 0.95, 1.0)
MODES = ("sparse", "dense")


def make_mask(shape, sparsity, gen):
    """Bool keep-mask with exactly round((1 - sparsity) * numel) True entries."""
    n = 1
    for s in shape:
        n *= s
    k = int(round((1 - sparsity) * n))
    m = torch.zeros(n, dtype=torch.bool)
    m[torch.randperm(n, generator=gen)[:k]] = True
    return m.view(shape)


def masked_copy(layer, mask):
    """A plain dense copy of ``layer`` whose weight is the masked weight (the reference)."""
    ref = copy.deepcopy(layer)
    with torch.no_grad():
        ref.weight.mul_(mask.to(ref.weight.dtype))
    return ref


def dense_grad_of_values(module, grad_values):
    """Scatter a compact-values gradient into the layer's dense weight shape."""
    g = torch.zeros(module.mask().numel(), dtype=grad_values.dtype)
    g[module.flat] = grad_values
    return g.view(module.mask().shape)


def compare_to_reference(module, ref, mask, x, active=None, tol=1e-10):
    """Forward, input grad, kept-weight grad and bias grad of ``module`` vs ``ref``.

    With ``active``, frozen rows must get exactly zero weight and bias gradient.
    """
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    y1 = module(x1)
    y2 = ref(x2)
    torch.testing.assert_close(y1, y2, rtol=tol, atol=tol, msg="forward")
    gy = torch.randn_like(y2)
    y1.backward(gy)
    y2.backward(gy)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=tol, atol=tol, msg="input grad")
    gw_ref = ref.weight.grad * mask
    gb_ref = None if ref.bias is None else ref.bias.grad.clone()
    if active is not None:
        gw_ref[~active] = 0
        if gb_ref is not None:
            gb_ref[~active] = 0
    gw = dense_grad_of_values(module, module.weight_values.grad) if hasattr(module, "weight_values") else module.weight.grad
    torch.testing.assert_close(gw, gw_ref, rtol=tol, atol=tol, msg="kept-weight grad")
    if active is not None:
        assert torch.all(gw[~active] == 0), "frozen rows got a weight gradient"
    if gb_ref is not None:
        torch.testing.assert_close(module.bias.grad, gb_ref, rtol=tol, atol=tol, msg="bias grad")


# ----------------------------------------------------------------------------- SparseLinear


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_matches_masked_linear(mode, sparsity, bias, gen):
    lin = nn.Linear(13, 7, bias=bias, dtype=F64)
    mask = make_mask((7, 13), sparsity, gen)
    s = stnn.SparseLinear.from_dense(lin, mask, mode=mode)
    assert s.nnz == int(mask.sum()) and torch.equal(s.mask(), mask)
    assert torch.equal(s.dense_weight(), torch.where(mask, lin.weight.detach(), 0.0))
    compare_to_reference(s, masked_copy(lin, mask), mask, torch.randn(5, 13, dtype=F64, generator=gen))


@pytest.mark.parametrize("mode", MODES)
def test_sparse_linear_leading_dims_and_empty_batch(mode, gen):
    lin = nn.Linear(6, 4, dtype=F64)
    mask = make_mask((4, 6), 0.5, gen)
    s = stnn.SparseLinear.from_dense(lin, mask, mode=mode)
    compare_to_reference(s, masked_copy(lin, mask), mask, torch.randn(2, 3, 6, dtype=F64, generator=gen))
    y = s(torch.randn(0, 6, dtype=F64))
    assert y.shape == (0, 4)


@pytest.mark.parametrize("mode", MODES)
def test_sparse_linear_frozen_rows(mode, gen):
    lin = nn.Linear(9, 6, dtype=F64)
    mask = make_mask((6, 9), 0.5, gen)
    active = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool)
    s = stnn.SparseLinear.from_dense(lin, mask, mode=mode)
    s.set_active(active)
    assert stnn.neq_capable(s) and s.frozen_fraction == 0.5
    compare_to_reference(s, masked_copy(lin, mask), mask, torch.randn(4, 9, dtype=F64, generator=gen), active)
    s.set_active(None)
    assert s.active is None


def test_dense_neq_linear(gen):
    lin = nn.Linear(9, 6, dtype=F64)
    active = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    d = stnn.DenseNEqLinear(9, 6, dtype=F64)
    d.load_state_dict(lin.state_dict())
    d.set_active(active)
    compare_to_reference(d, copy.deepcopy(lin), torch.ones(6, 9, dtype=torch.bool),
                         torch.randn(4, 9, dtype=F64, generator=gen), active)
    assert set(d.state_dict()) == {"weight", "bias", "active"}


# ----------------------------------------------------------------------------- SparseConv2d

CONV_OPTIONS = {
    "plain": dict(),
    "stride2": dict(stride=2),
    "pad1": dict(padding=1),
    "dilation2": dict(dilation=2, padding=2),
    "groups2": dict(groups=2, padding=1),
    "nobias": dict(bias=False),
    "odd": dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0)),
    "same": dict(padding="same", kernel_size=4, dilation=1),
    "reflect": dict(padding=1, padding_mode="reflect"),
    "pointwise": dict(kernel_size=1),
}


def _conv(options, cin=4, cout=6):
    o = dict(kernel_size=3)
    o.update(options)
    return nn.Conv2d(cin, cout, dtype=F64, **o)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("option", sorted(CONV_OPTIONS))
def test_sparse_conv_matches_masked_conv(option, sparsity, mode, gen):
    conv = _conv(CONV_OPTIONS[option])
    mask = make_mask(tuple(conv.weight.shape), sparsity, gen)
    s = stnn.SparseConv2d.from_dense(conv, mask, mode=mode)
    assert torch.equal(s.mask(), mask)
    assert torch.equal(s.dense_weight(), torch.where(mask, conv.weight.detach(), 0.0))
    compare_to_reference(s, masked_copy(conv, mask), mask, torch.randn(2, 4, 9, 8, dtype=F64, generator=gen))


@pytest.mark.parametrize("block_bytes", [64, 3000])  # h-bands of one image; several images per block
@pytest.mark.parametrize("option", ["stride2", "dilation2", "groups2", "odd"])
def test_sparse_conv_blocked_im2col(option, block_bytes, gen, monkeypatch):
    from sparseticket.nn import conv as conv_module

    monkeypatch.setattr(conv_module, "BLOCK_BYTES", block_bytes)
    conv = _conv(CONV_OPTIONS[option])
    mask = make_mask(tuple(conv.weight.shape), 0.5, gen)
    s = stnn.SparseConv2d.from_dense(conv, mask, mode="sparse")
    s.set_active(make_mask((6,), 0.5, gen))
    compare_to_reference(s, masked_copy(conv, mask), mask, torch.randn(5, 4, 11, 9, dtype=F64, generator=gen),
                         s.active)


@pytest.mark.parametrize("mode", MODES)
def test_sparse_conv_unbatched_and_channels_last(mode, gen):
    conv = _conv(dict(padding=1))
    mask = make_mask(tuple(conv.weight.shape), 0.5, gen)
    s = stnn.SparseConv2d.from_dense(conv, mask, mode=mode)
    ref = masked_copy(conv, mask)
    x = torch.randn(4, 7, 7, dtype=F64, generator=gen)
    torch.testing.assert_close(s(x), ref(x))
    xc = torch.randn(2, 4, 7, 7, dtype=F64, generator=gen).contiguous(memory_format=torch.channels_last)
    compare_to_reference(s, ref, mask, xc)
    assert s(torch.randn(0, 4, 7, 7, dtype=F64)).shape == (0, 6, 7, 7)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("groups,cout", [(1, 6), (2, 6), (4, 4), (2, 8)])
def test_sparse_conv_frozen_channels(groups, cout, mode, gen):
    conv = _conv(dict(padding=1, groups=groups), cout=cout)
    mask = make_mask(tuple(conv.weight.shape), 0.3, gen)
    active = make_mask((cout,), 0.5, gen)
    s = stnn.SparseConv2d.from_dense(conv, mask, mode=mode)
    s.set_active(active)
    compare_to_reference(s, masked_copy(conv, mask), mask, torch.randn(2, 4, 6, 5, dtype=F64, generator=gen), active)


@pytest.mark.parametrize("groups,cout", [(1, 6), (2, 6), (4, 4), (2, 8)])
def test_neq_conv2d_frozen_channels(groups, cout, gen):
    conv = _conv(dict(padding=1, groups=groups, stride=2), cout=cout)
    active = make_mask((cout,), 0.5, gen)
    n = stnn.NEqConv2d(4, cout, 3, padding=1, groups=groups, stride=2, dtype=F64)
    n.load_state_dict(conv.state_dict())
    n.set_active(active)
    compare_to_reference(n, copy.deepcopy(conv), torch.ones_like(conv.weight, dtype=torch.bool),
                         torch.randn(2, 4, 7, 6, dtype=F64, generator=gen), active)



@pytest.mark.parametrize("kind", ["NEqConv2d", "SparseConv2d dense path"])
def test_frozen_outputs_skip_their_weight_gradient(kind, gen):
    """The dense NEq convs compute the weight gradient of active channels only (not all of
    it, then masked): torch's own FLOP counter sees half of it with half frozen. (The NEq
    Linear layers run sparseticket ops, which that counter does not see: their row
    skipping is tested in test_ops.py.)"""
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    dense, x = nn.Conv2d(4, 8, 3, padding=1), torch.randn(2, 4, 6, 6)

    def weight_grad_flops(m):
        y = m(x)  # x needs no gradient: the backward is the weight (and bias) gradient alone
        with FlopCounterMode(display=False) as fc:
            y.square().sum().backward()
        return fc.get_total_flops()

    full = weight_grad_flops(copy.deepcopy(dense))
    if kind == "NEqConv2d":
        m = stnn.NEqConv2d(4, 8, 3, padding=1)
        m.load_state_dict(dense.state_dict())
    else:
        m = stnn.SparseConv2d.from_dense(dense, torch.ones_like(dense.weight, dtype=torch.bool), mode="dense")
    active = torch.zeros(8, dtype=torch.bool)
    active[torch.randperm(8, generator=gen)[:4]] = True
    m.set_active(active)
    assert full > 0 and weight_grad_flops(m) == full // 2


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "3d", "empty_batch", "no_channels"])
def test_select_channels_is_index_select(layout, gen):
    """The NEq conv's gather of active channels (rows of the [N*C, rest] view for a
    contiguous tensor) equals index_select along dim 1 for every layout."""
    from sparseticket.nn.conv import _select_channels
    t = torch.randn(3, 6, 5, 4, dtype=F64, generator=gen)
    idx = torch.tensor([0, 2, 3, 5])
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        t = t[:, :, 1:]
    elif layout == "3d":
        t = t.reshape(3, 6, 20)
    elif layout == "empty_batch":
        t = t[:0]
    elif layout == "no_channels":
        idx = idx[:0]
    got = _select_channels(t, idx)
    assert torch.equal(got, t.index_select(1, idx))
    assert got.shape == (t.shape[0], idx.numel(), *t.shape[2:])


def test_all_frozen_and_all_pruned(gen):
    conv = _conv({})
    s = stnn.SparseConv2d.from_dense(conv, torch.zeros_like(conv.weight, dtype=torch.bool), mode="sparse")
    s.set_active(torch.zeros(6, dtype=torch.bool))
    x = torch.randn(1, 4, 5, 5, dtype=F64, requires_grad=True)
    y = s(x)
    torch.testing.assert_close(y, conv.bias.detach().view(1, 6, 1, 1).expand_as(y))
    y.sum().backward()
    assert torch.all(x.grad == 0) and s.weight_values.grad.numel() == 0 and torch.all(s.bias.grad == 0)


@pytest.mark.parametrize("mode", MODES)
def test_inplace_activation_on_the_output(mode, gen):
    """ReLU(inplace=True) after a sparse layer (the sparse conv returns a permuted view;
    autograd refuses in-place writes into a view that a custom Function returned)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, dtype=F64), nn.ReLU(inplace=True), nn.Flatten(),
                        nn.Linear(4 * 5 * 5, 6, dtype=F64), nn.ReLU(inplace=True), nn.Linear(6, 2, dtype=F64))
    ref = copy.deepcopy(net)
    stnn.sparsify(net, amount=0.5, mode=mode)
    for i in (0, 3, 5):
        with torch.no_grad():
            ref[i].weight.copy_(net[i].dense_weight())
    x = torch.randn(2, 3, 7, 7, dtype=F64, generator=gen)
    y, y_ref = net(x), ref(x)
    torch.testing.assert_close(y, y_ref)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for i in (0, 3, 5):
        torch.testing.assert_close(dense_grad_of_values(net[i], net[i].weight_values.grad),
                                   ref[i].weight.grad * net[i].mask())


# ----------------------------------------------------------------------------- mask changes


@pytest.mark.parametrize("cls", ["linear", "conv"])
def test_set_mask(cls, gen):
    layer = nn.Linear(8, 5, dtype=F64) if cls == "linear" else _conv(dict(groups=2))
    shape = tuple(layer.weight.shape)
    m1 = make_mask(shape, 0.5, gen)
    s = (stnn.SparseLinear if cls == "linear" else stnn.SparseConv2d).from_dense(layer, m1, mode="sparse")
    p = s.weight_values
    # same nnz: the Parameter object stays; values come from the current dense weight
    m2 = make_mask(shape, 0.5, gen)
    s.set_mask(m2)
    assert s.weight_values is p and torch.equal(s.mask(), m2)
    w = layer.weight.detach()
    assert torch.equal(s.dense_weight(), torch.where(m1 & m2, w, 0.0))
    # new nnz, rewound to given weights: a new Parameter
    m3 = make_mask(shape, 0.8, gen)
    s.set_mask(m3, weight=w)
    assert s.weight_values is not p and torch.equal(s.dense_weight(), torch.where(m3, w, 0.0))
    assert param_masks(s.weight_values) is not None
    compare_to_reference(s, masked_copy(layer, m3), m3, torch.randn(3, *((8,) if cls == "linear" else (4, 6, 6)),
                                                                      dtype=F64, generator=gen))
    # a graph from before the change still alive does not break the next backward
    y_old = s(torch.randn(2, *((8,) if cls == "linear" else (4, 6, 6)), dtype=F64)).sum()
    y_old.backward()
    s.set_mask(make_mask(shape, 0.3, gen))
    s(torch.randn(2, *((8,) if cls == "linear" else (4, 6, 6)), dtype=F64)).sum().backward()


# ----------------------------------------------------------------------------- sparsify / densify


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, groups=2)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)  # its out_proj must stay dense
        self.fc1 = nn.Linear(8 * 4 * 4, 20)
        self.fc2 = nn.Linear(20, 5)

    def forward(self, x):
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        t = h.flatten(2).transpose(1, 2)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        return self.fc2(F.relu(self.fc1(t.transpose(1, 2).flatten(1))))


LAYERS = ("conv1", "conv2", "fc1", "fc2")


def _masks_for(model, sparsity, gen):
    return {n: make_mask(tuple(getattr(model, n).weight.shape), sparsity, gen) for n in LAYERS}


def test_sparsify_densify_round_trip(gen):
    model = Net().double()
    masks = _masks_for(model, 0.7, gen)
    x = torch.randn(2, 3, 9, 9, dtype=F64, generator=gen)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for n, m in masks.items():
            getattr(ref, n).weight.mul_(m)
    s = stnn.sparsify(copy.deepcopy(model), masks=masks)
    assert isinstance(s.fc1, stnn.SparseLinear) and isinstance(s.conv2, stnn.SparseConv2d)
    assert type(s.attn.out_proj) is not stnn.SparseLinear
    torch.testing.assert_close(s(x), ref(x))
    d = stnn.densify(s)
    for n, m in masks.items():
        layer = getattr(d, n)
        assert type(layer) in (nn.Linear, nn.Conv2d)
        assert torch.equal(layer.weight, torch.where(m, getattr(model, n).weight, 0.0)), n
        assert torch.equal(layer.bias, getattr(model, n).bias)
    assert torch.equal(d(x), ref(x))


def test_sparsify_filter_and_default_mask(gen):
    model = Net().double()
    with torch.no_grad():
        model.fc1.weight[:, ::2] = 0
    stnn.sparsify(model, filter=lambda name, m: isinstance(m, nn.Linear))
    assert type(model.conv1) is nn.Conv2d and isinstance(model.fc2, stnn.SparseLinear)
    assert model.fc1.density == 0.5 and model.fc2.density == 1.0


def test_shared_layer_stays_shared(gen):
    shared = nn.Linear(6, 6, dtype=F64)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    stnn.sparsify(model, amount=0.5)
    assert model[0] is model[2] and model[0].nnz == 18
    stnn.densify(model)
    assert model[0] is model[2] and type(model[0]) is nn.Linear


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_sparsify_magnitude(scope, gen):
    model = Net().double()
    w = {n: getattr(model, n).weight.detach().clone() for n in LAYERS}
    stnn.sparsify(model, amount=0.8, scope=scope, mode="sparse")
    total = sum(v.numel() for v in w.values())
    kept = sum(getattr(model, n).nnz for n in LAYERS)
    if scope == "global":
        assert kept == total - round(0.8 * total)
    if scope == "layerwise":
        for n in LAYERS:
            assert getattr(model, n).nnz == w[n].numel() - round(0.8 * w[n].numel())
    else:  # one threshold: every kept |w| >= every pruned |w|
        kept_min = min(float(w[n].abs()[getattr(model, n).mask()].min()) for n in LAYERS)
        pruned_max = max(float(w[n].abs()[~getattr(model, n).mask()].max()) for n in LAYERS)
        assert kept_min >= pruned_max


def test_sparsify_amount_per_layer_on_top_of_masks(gen):
    model = Net().double()
    masks = {"fc1": make_mask((20, 128), 0.5, gen), "fc2": make_mask((5, 20), 0.0, gen)}
    stnn.sparsify(model, masks=masks, amount={"fc1": 0.5, "fc2": 0.2})
    assert model.fc1.nnz == 640 and model.fc2.nnz == 80
    assert not (model.fc1.mask() & ~masks["fc1"]).any()
    assert type(model.conv1) is nn.Conv2d


def test_torch_prune_interop(gen):
    model = Net().double()
    prune.l1_unstructured(model.fc1, "weight", amount=0.6)
    prune.random_unstructured(model.conv1, "weight", amount=0.4)
    x = torch.randn(2, 3, 9, 9, dtype=F64, generator=gen)
    y = model(x)
    masks = {"fc1": model.fc1.weight_mask.bool(), "conv1": model.conv1.weight_mask.bool()}
    stnn.sparsify(model, filter=lambda n, m: n in masks)
    assert torch.equal(model.fc1.mask(), masks["fc1"]) and torch.equal(model.conv1.mask(), masks["conv1"])
    torch.testing.assert_close(model(x), y)
    stnn.densify(model, as_pruned=True)
    for n, m in masks.items():
        layer = getattr(model, n)
        assert prune.is_pruned(layer) and torch.equal(layer.weight_mask.bool(), m)
    torch.testing.assert_close(model(x), y)
    # and back again, straight from weight_orig + weight_mask
    stnn.sparsify(model, filter=lambda n, m: n in masks)
    assert torch.equal(model.fc1.mask(), masks["fc1"])
    torch.testing.assert_close(model(x), y)


def test_enable_neq_keeps_parameters_and_keys(gen):
    model = Net().double()
    keys = set(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    stnn.enable_neq(model)
    assert isinstance(model.fc1, stnn.DenseNEqLinear) and isinstance(model.conv2, stnn.NEqConv2d)
    assert type(model.attn.out_proj) is not stnn.DenseNEqLinear
    assert all(p is params[n] for n, p in model.named_parameters())
    assert set(model.state_dict()) == keys
    assert {n for n, _ in stnn.neq_modules(model)} == set(LAYERS)
    model.fc1.set_active(torch.arange(20) % 2 == 0)
    assert set(model.state_dict()) == keys | {"fc1.active"}


# ----------------------------------------------------------------------------- checkpoints


def _sparse_net(gen, sparsity):
    model = stnn.sparsify(Net().double(), masks=_masks_for(Net(), sparsity, gen))
    model.fc1.set_active(make_mask((20,), 0.5, gen))
    return model


def test_state_dict_into_fresh_model(gen):
    src = _sparse_net(gen, 0.8)
    x = torch.randn(2, 3, 9, 9, dtype=F64, generator=gen)
    sd = src.state_dict()
    assert "fc1.weight_values" in sd and "fc1.crow" in sd and "fc1.weight" not in sd and "fc1.active" in sd
    dst = _sparse_net(gen, 0.3)  # same architecture, other masks (other nnz), no freezing on fc2
    dst.fc1.set_active(None)
    dst.load_state_dict(sd)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, sd[k]), k
    torch.testing.assert_close(dst(x), src(x))
    fresh = Net().double()  # plain dense model: the helper converts the layers first
    stnn.load_state_dict(fresh, sd)
    assert isinstance(fresh.fc1, stnn.SparseLinear) and torch.equal(fresh.fc1.active, src.fc1.active)
    assert fresh.state_dict().keys() == sd.keys()
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k
    torch.testing.assert_close(fresh(x), src(x))  # (same state; 'auto' may still pick another path)


def test_safetensors_round_trip(gen, tmp_path):
    pytest.importorskip("safetensors")
    src = _sparse_net(gen, 0.9)
    path = str(tmp_path / "model.safetensors")
    stnn.save_safetensors(src, path)
    dst = Net().double()
    stnn.load_safetensors(dst, path)
    x = torch.randn(2, 3, 9, 9, dtype=F64, generator=gen)
    assert dst.state_dict().keys() == src.state_dict().keys()
    for k, v in dst.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k
    torch.testing.assert_close(dst(x), src(x))


def test_deepcopy_and_pickle_keep_optimizer_registry(gen):
    src = _sparse_net(gen, 0.5)
    for clone in (copy.deepcopy(src), pickle.loads(pickle.dumps(src))):
        info = param_masks(clone.fc1.weight_values)
        assert info is not None and info.row_ptr() is clone.fc1.crow and info.active() is clone.fc1.active


# ----------------------------------------------------------------------------- execution mode


@pytest.mark.parametrize("sparse_s,dense_s,settles", [
    (1.0, 3.0, True),    # sparse clearly faster
    (5.0, 1.0, True),    # dense clearly faster
    (1.0, 1.1, True),    # at the threshold (sparse * SPARSE_MARGIN == dense): a close call
    (1.0, 1.25, False),  # sparse ahead by 12% at the threshold: worth the whole budget
    (1.0, 0.95, False),  # dense ahead by 16%
    (1.0, 1.4, True),    # sparse ahead by 21%: settled
    (1.0, 0.9, True),    # dense ahead by 22%: settled
])
def test_measure_settles_clear_and_close_calls_early(sparse_s, dense_s, settles, monkeypatch):
    """Clear winners and close calls stop at SETTLE_REPS repetitions; outcomes in
    between use the whole budget. The minima returned are the ones timed."""
    fns = {"s": lambda: None, "d": lambda: None}
    times = {"s": [], "d": []}

    def fake_time(fn):
        k = "s" if fn is fns["s"] else "d"
        # a slow first timing, then the path's steady time
        t = (sparse_s if k == "s" else dense_s) * (2.0 if not times[k] else 1.0)
        times[k].append(t)
        return t

    monkeypatch.setattr(_mode, "_time_once", fake_time)
    ts, td = _mode.measure(fns["s"], fns["d"], budget_s=1e9, max_reps=40)
    assert (ts, td) == (sparse_s, dense_s)
    assert len(times["s"]) == len(times["d"]) == (_mode.SETTLE_REPS if settles else 40)


def test_mode_auto_measures_once_and_can_be_forced(gen):
    _mode.clear_cache()
    model = stnn.sparsify(nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 4)), amount=0.5)
    calls = {"sparse": 0, "dense": 0}
    layer = model[0]
    for path in calls:
        orig = getattr(layer, f"_run_{path}")

        def counted(*a, _orig=orig, _path=path):
            calls[_path] += 1
            return _orig(*a)

        setattr(layer, f"_run_{path}", counted)
    x = torch.randn(16, 30)
    model(x).sum().backward()
    assert len(_mode._CHOICES) == 2 and calls["sparse"] > 1 and calls["dense"] > 1  # measured both
    choice = layer._choice
    assert f"mode=auto ({choice})" in repr(layer) and layer.last_path == choice
    calls.update(sparse=0, dense=0)
    model(torch.randn(13, 30))  # same batch bucket (16) but no grad needed? grad is on: same key
    assert calls[choice] == 1 and sum(calls.values()) == 1
    with stnn.use_mode("dense"):
        model(x)
        assert "runs" in stnn.report(model) and "dense" in repr(layer)
    assert calls["dense"] >= 1
    calls.update(sparse=0, dense=0)
    layer.mode = "sparse"
    prev = stnn.set_mode("dense")
    try:
        model(x)  # a module's own forced mode beats the global one
        assert calls == {"sparse": 1, "dense": 0} and layer.last_path == "sparse"
    finally:
        stnn.set_mode(prev)
    rows = stnn.layer_report(model)
    assert [r["name"] for r in rows] == ["0", "2"] and rows[0]["mode"] == "sparse"
    text = stnn.report(model)
    assert "SparseLinear" in text and "density" in text


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_layer(gen):
    model = Net().double()
    with pytest.raises(ValueError, match=r"layer 'fc1'.*mask has shape \(20, 127\), expected \(20, 128\)"):
        stnn.sparsify(model, masks={"fc1": torch.ones(20, 127, dtype=torch.bool)})
    bad = torch.ones(20, 128)
    bad[3, 4] = 0.5
    with pytest.raises(ValueError, match=r"layer 'fc1'.*binary.*0.5"):
        stnn.sparsify(model, masks={"fc1": bad})
    with pytest.raises(KeyError, match=r"'fc3' \(no such layer\)"):
        stnn.sparsify(model, masks={"fc3": bad})
    with pytest.raises(KeyError, match=r"'attn' \(MultiheadAttention, not convertible\)"):
        stnn.sparsify(model, masks={"attn": bad})
    half = nn.Sequential(nn.Linear(4, 3).half())
    with pytest.raises(TypeError, match=r"layer '0'.*float16"):
        stnn.sparsify(half)
    stnn.sparsify(model, amount=0.5)
    with pytest.raises(ValueError, match=r"layer 'fc1'.*active must have shape \(20,\)"):
        model.fc1.set_active(torch.ones(19, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"layer 'fc2'.*input has shape \(2, 19\)"):
        model.fc2(torch.randn(2, 19, dtype=F64))
    with pytest.raises(ValueError, match=r"layer 'conv1'.*expected \[N, 3, H, W\]"):
        model.conv1(torch.randn(1, 4, 5, 5, dtype=F64))


def test_checkpoint_from_another_architecture(gen):
    src = stnn.sparsify(nn.Sequential(nn.Linear(10, 6), nn.Linear(6, 3)), amount=0.5)
    other = stnn.sparsify(nn.Sequential(nn.Linear(10, 7), nn.Linear(7, 3)), amount=0.5)
    with pytest.raises(RuntimeError,
                       match=r"layer '0'.*Linear\(6, 10\) weight.*Linear\(7, 10\) one.*another architecture"):
        other.load_state_dict(src.state_dict())
    with pytest.raises(RuntimeError, match=r"layer '0'.*crow has shape \(7,\), expected \(8,\).*another architecture"):
        other.load_state_dict(dict(src.state_dict()))  # (a plain dict: no metadata, the sizes tell)
    dense_ckpt = nn.Sequential(nn.Linear(10, 6), nn.Linear(6, 3)).state_dict()
    with pytest.raises(RuntimeError, match=r"layer '0'.*dense 'weight'"):
        src.load_state_dict(dense_ckpt)
    broken = dict(src.state_dict())
    broken["0.col"] = broken["0.col"].clone().fill_(99)
    with pytest.raises(RuntimeError, match=r"layer '0'.*col out of range"):
        copy.deepcopy(src).load_state_dict(broken)


def test_checkpoint_layout_and_transposes_are_checked(tmp_path):
    """Index sizes alone do not tell architectures apart: a Conv2d(2, 6, 3) ticket and a
    Linear(18, 6) one are both 6 x 18, an ungrouped Conv2d(4, 8, 3) and a grouped one have
    the same index sizes; and the transposed buffers must be those of crow / col."""
    torch.manual_seed(0)
    conv = stnn.sparsify(nn.Sequential(nn.Conv2d(2, 6, 3)), amount=0.5)
    lin = stnn.sparsify(nn.Sequential(nn.Linear(18, 6)), amount=0.5)
    assert conv[0].ticket_layout() == "Conv2d(6, 2, 3, 3)" and lin[0].ticket_layout() == "Linear(6, 18)"
    foreign = r"layer '0'.*Conv2d\(6, 2, 3, 3\) weight.*Linear\(6, 18\) one.*another architecture"
    with pytest.raises(RuntimeError, match=foreign):
        lin.load_state_dict(conv.state_dict())
    buf = io.BytesIO()  # the layout travels with torch.save
    torch.save(conv.state_dict(), buf)
    buf.seek(0)
    with pytest.raises(RuntimeError, match=foreign):
        lin.load_state_dict(torch.load(buf))
    pytest.importorskip("safetensors")
    stnn.save_safetensors(conv, str(tmp_path / "conv.safetensors"))
    with pytest.raises(RuntimeError, match=foreign):
        stnn.load_safetensors(lin, str(tmp_path / "conv.safetensors"))

    flat = stnn.sparsify(nn.Sequential(nn.Conv2d(4, 8, 3)), amount=0.5)
    grouped = stnn.sparsify(nn.Sequential(nn.Conv2d(4, 8, 3, groups=2)), amount=0.5)
    with pytest.raises(RuntimeError, match=r"Conv2d\(8, 4, 3, 3\) weight.*Conv2d\(8, 2, 3, 3\) groups=2 one"):
        copy.deepcopy(grouped).load_state_dict(flat.state_dict())
    bare = dict(flat.state_dict())  # no metadata: the columns themselves give it away
    bare.update({k: v for k, v in grouped.state_dict().items() if k == "0.crow"})
    n = int(bare["0.crow"][-1])
    bare["0.weight_values"], bare["0.col"] = bare["0.weight_values"][:n], flat.state_dict()["0.col"][:n]
    for k in ("0.ccol", "0.row", "0.perm"):
        del bare[k]
    with pytest.raises(RuntimeError, match=r"layer '0'.*outside its output channel's group"):
        copy.deepcopy(grouped).load_state_dict(bare, strict=False)

    a = stnn.sparsify(nn.Sequential(nn.Linear(10, 6)), amount=0.5)
    b = stnn.sparsify(nn.Sequential(nn.Linear(10, 6)), amount=0.5)
    assert a[0].nnz == b[0].nnz and not torch.equal(a[0].perm, b[0].perm)
    for k in ("ccol", "row", "perm"):
        mixed = dict(a.state_dict())
        mixed["0." + k] = b.state_dict()["0." + k]
        if torch.equal(mixed["0." + k], a.state_dict()["0." + k]):
            continue
        with pytest.raises(RuntimeError, match=rf"layer '0'.*{k} is not the transpose of crow / col"):
            copy.deepcopy(a).load_state_dict(mixed)
    # a checkpoint without the transposes (non-strict) gets them rebuilt, exactly
    fresh = copy.deepcopy(b)
    fresh.load_state_dict({k: v for k, v in a.state_dict().items() if k.split(".")[-1] not in ("ccol", "row", "perm")},
                          strict=False)
    for k in ("crow", "col", "ccol", "row", "perm", "bits", "flat"):
        assert torch.equal(getattr(fresh[0], k), getattr(a[0], k)), k
    x = torch.randn(5, 10, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    a(x).sum().backward()
    fresh(x2).sum().backward()
    assert torch.equal(x.grad, x2.grad)


def test_unsupported_options():
    with pytest.raises(TypeError, match="only nn.Conv2d"):
        stnn.SparseConv2d.from_dense(nn.ConvTranspose2d(2, 2, 3))
    with pytest.raises(ValueError, match="mode must be one of"):
        stnn.SparseLinear(3, 2, mode="fast")
    with pytest.raises(ValueError, match="mode must be one of"):
        stnn.set_mode("fast")


# ----------------------------------------------------------------------------- torch.compile


def _mlp(gen):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 3))
    return stnn.sparsify(m, amount=0.6)


@pytest.mark.parametrize("mode", MODES)
def test_compile_fullgraph_matches_eager(mode, gen):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = _mlp(gen)
    model[2].set_active(make_mask((6,), 0.5, gen))
    ref = copy.deepcopy(model)
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=cnt, fullgraph=True)
    with stnn.use_mode(mode):
        for b in (8, 5):
            x = torch.randn(b, 12, generator=gen)
            y, y_ref = compiled(x), ref(x)
            torch.testing.assert_close(y, y_ref)
            y.square().sum().backward()
            y_ref.square().sum().backward()
            for (n, p), p_ref in zip(model.named_parameters(), ref.parameters()):
                torch.testing.assert_close(p.grad, p_ref.grad, msg=n)
        frames = cnt.frame_count
        # a mask change (new nnz) costs at most one recompilation
        for layer in (model[0], ref[0]):
            layer.set_mask(make_mask((10, 12), 0.3, torch.Generator().manual_seed(1)))
        x = torch.randn(8, 12, generator=gen)
        torch.testing.assert_close(compiled(x), ref(x))
        assert cnt.frame_count <= frames + 1


def test_compile_conv_fullgraph(gen):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, groups=2),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 3))
    stnn.sparsify(model, amount=0.5, mode="sparse")
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 2, 7, 7, generator=gen)
    y, y_ref = compiled(x), ref(x)
    torch.testing.assert_close(y, y_ref)
    y.sum().backward()
    y_ref.sum().backward()
    for p, p_ref in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad)


def test_compile_mask_change_free_with_dynamic_parameter_shapes(gen):
    """With dynamo's static-shape forcing for module parameters/buffers off, nnz is symbolic:
    after the first compile, mask changes compile nothing new."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = _mlp(gen)
    cnt = CompileCounterWithBackend("aot_eager")
    with torch._dynamo.config.patch(force_parameter_static_shapes=False,
                                    force_nn_module_property_static_shapes=False), stnn.use_mode("sparse"):
        compiled = torch.compile(model, backend=cnt, fullgraph=True)
        x = torch.randn(8, 12, generator=gen)
        compiled(x).sum().backward()
        for k, sparsity in enumerate((0.3, 0.5, 0.8)):
            model[0].set_mask(make_mask((10, 12), sparsity, gen))
            model[2].set_mask(make_mask((6, 10), sparsity, gen))
            y = compiled(x)
            torch.testing.assert_close(y, model(x))
            y.sum().backward()
        assert cnt.frame_count == 1


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
@pytest.mark.parametrize("mode", ["dense", "sparse"])
@pytest.mark.parametrize("groups,k", [(1, 3), (2, 3), (2, 1)])
@pytest.mark.parametrize("fmt", ["nchw", "channels_last"])
def test_sparse_conv_output_layout_is_nn_conv2ds(sparsity, mode, groups, k, fmt):
    """Drop-in: the output has nn.Conv2d's memory format (contiguous NCHW for an NCHW
    input, channels-last for a channels-last one) on every path: a full ticket's weight
    view once made oneDNN answer channels-last (`y.view(n, -1)` failed), the im2col path
    (groups > 1) wrote NHWC and the direct kernel NCHW whatever the input; gradients match."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, k, padding=k // 2, groups=groups)
    sp = stnn.sparsify(nn.Sequential(copy.deepcopy(conv)), amount=sparsity, mode=mode)[0]
    with torch.no_grad():
        conv.weight.copy_(sp.dense_weight())
    x = torch.randn(2, 4, 5, 5)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    y, want = sp(x), conv(x)
    assert y.stride() == want.stride()
    assert y.is_contiguous() if fmt == "nchw" else y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.reshape(2, -1), want.reshape(2, -1))
    (y.reshape(2, -1) * torch.linspace(0.5, 1.5, y[0].numel())).sum().backward()  # position-dependent
    (want.reshape(2, -1) * torch.linspace(0.5, 1.5, want[0].numel())).sum().backward()
    # the kept values' gradient, scattered to dense through the ticket's flat positions
    flat = sp._buffers["flat"].long()
    got = torch.zeros(sp.dense_weight().numel()).index_put_((flat,), sp.weight_values.grad)
    torch.testing.assert_close(got.view_as(conv.weight), conv.weight.grad * (sp.dense_weight() != 0))


# ----------------------------------------------------------------- SparseLinear's C++ entry


def _fast_entry_layer(relu, gen):
    lin = nn.Linear(13, 7).double()
    layer = stnn.SparseLinear.from_dense(lin, make_mask(lin.weight.shape, 0.5, gen), mode="sparse")
    if relu:
        layer.activation = "relu"
    return layer


@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
def test_sparse_linear_fast_entry_matches_torch_ops(relu, monkeypatch):
    """The C++ entry (sparse_linear_call) and torch.ops give the same output and gradients, bit for bit."""
    import sparseticket.nn.linear as lin_mod
    if lin_mod._sparse_linear_call is None:
        pytest.skip("C++ extension not loaded")
    gen = torch.Generator().manual_seed(3)
    layer = _fast_entry_layer(relu, gen)
    x = torch.randn(5, 13, dtype=F64, generator=gen)
    runs, used = [], []
    real = lin_mod._sparse_linear_call

    def counted(*args):
        used.append(args[-1])
        return real(*args)

    for entry in (counted, None):
        monkeypatch.setattr(lin_mod, "_sparse_linear_call", entry)
        layer.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        y = layer(xx)
        assert y.grad_fn is not None
        (y * torch.arange(7, dtype=F64)).sum().backward()
        runs.append((y.detach(), xx.grad, layer.weight_values.grad, layer.bias.grad))
    assert used == [relu]  # the first run went through the C++ entry, once
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_sparse_linear_fast_entry_defers_to_torch_function():
    """Under a TorchFunctionMode, or with a tensor subclass that overrides
    __torch_function__, the layer calls torch.ops (which honours them), not the C++ entry."""
    from torch.overrides import TorchFunctionMode

    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    class Sub(torch.Tensor):
        calls = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.calls.append(str(func))
            return super().__torch_function__(func, types, args, kwargs or {})

    gen = torch.Generator().manual_seed(4)
    layer = _fast_entry_layer(True, gen)
    x = torch.randn(3, 13, dtype=F64, generator=gen)
    expected = layer(x)
    with Record():
        y = layer(x)
    assert any("sparse_linear_relu" in s for s in seen), seen
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    y = layer(x.as_subclass(Sub))
    assert any("sparse_linear_relu" in s for s in Sub.calls), Sub.calls
    torch.testing.assert_close(torch.Tensor(y), expected, rtol=0, atol=0)


def _create_graph_layer(kind, gen):
    if kind == "sparse_linear":
        return _fast_entry_layer(True, gen), torch.randn(4, 13, dtype=F64, generator=gen)
    if kind == "neq_linear":
        layer = stnn.enable_neq(nn.Sequential(nn.Linear(13, 7).double()))[0]
        layer.set_active(torch.arange(7) % 2 == 0)
        return layer, torch.randn(4, 13, dtype=F64, generator=gen)
    conv = nn.Conv2d(3, 5, 3, padding=1).double()
    layer = stnn.SparseConv2d.from_dense(conv, make_mask(conv.weight.shape, 0.5, gen), mode="sparse")
    return layer, torch.randn(2, 3, 6, 6, dtype=F64, generator=gen)


@pytest.mark.parametrize("kind", ["sparse_linear", "neq_linear", "sparse_conv2d"])
def test_create_graph_backward_gives_the_same_gradients(kind):
    """The C++ backward formulas call their ops below the Autograd key only when grad mode
    is off; with create_graph=True they go through torch's Autograd fallback as before, and
    the first-order gradients are the same either way."""
    gen = torch.Generator().manual_seed(5)
    layer, x = _create_graph_layer(kind, gen)
    x.requires_grad_(True)
    params = (x,) + tuple(p for p in layer.parameters() if p.requires_grad)
    plain = torch.autograd.grad(layer(x).square().sum(), params)
    graphed = torch.autograd.grad(layer(x).square().sum(), params, create_graph=True)
    for a, b in zip(plain, graphed):
        assert not a.requires_grad
        torch.testing.assert_close(b.detach(), a, rtol=0, atol=0)
    # the input gradient is recorded (square's backward multiplies by the output, and the
    # ops' fallback node stays in the graph): skipping the Autograd key unconditionally
    # would cut it
    assert graphed[0].requires_grad


@pytest.mark.parametrize("kind", ["sparse_linear", "sparse_linear_dense_path", "neq_linear", "sparse_conv2d"])
def test_non_reentrant_checkpoint(kind):
    """torch.utils.checkpoint(use_reentrant=False) re-runs the forward when the backward
    unpacks its saved tensors; the C++ backward formulas must let it record as usual."""
    from torch.utils.checkpoint import checkpoint
    gen = torch.Generator().manual_seed(6)
    layer, x = _create_graph_layer("sparse_linear" if kind == "sparse_linear_dense_path" else kind, gen)
    if kind == "sparse_linear_dense_path":
        layer.mode = "dense"  # ticket_expand's node
    x.requires_grad_(True)
    params = (x,) + tuple(p for p in layer.parameters() if p.requires_grad)

    def f(inp):
        return layer(torch.tanh(1.5 * inp))

    plain = torch.autograd.grad(f(x).square().sum(), params)
    ckpt = torch.autograd.grad(checkpoint(f, x, use_reentrant=False).square().sum(), params)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("n_in,n_out,batch", [(37, 19, 13), (300, 100, 60), (64, 32, 8)])
@pytest.mark.parametrize("density", [0.02, 0.3, 0.9])
def test_sparse_linear_nonfinite_inputs_reach_only_sums_that_read_them(n_in, n_out, batch, density):
    """Pruned weights are absent, not zeros (README, ops): an Inf or NaN in x or gy reaches
    exactly the outputs, input gradients and kept-weight gradients whose sums contain it."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(n_out, n_in, generator=gen) < density
    sp = stnn.sparsify(nn.Sequential(nn.Linear(n_in, n_out)), masks={"0": mask}, mode="sparse")
    dense = stnn.densify(copy.deepcopy(sp))[0]
    W, b = dense.weight.detach().double(), dense.bias.detach().double()
    x = torch.randn(batch, n_in, generator=gen)
    x[:, 5] = float("inf")
    x[2, 7] = float("nan")
    gy = torch.randn(batch, n_out, generator=gen)
    gy[1, 3] = float("inf")
    xd, gyd = x.double(), gy.double()
    y_ref = torch.stack([(W[o, mask[o]] * xd[:, mask[o]]).sum(1) for o in range(n_out)], 1) + b
    gx_ref = torch.stack([(W[mask[:, j], j] * gyd[:, mask[:, j]]).sum(1) for j in range(n_in)], 1)
    gw_ref = (gyd.T @ xd)[mask]  # each kept entry (o, j) sums gy[:, o] * x[:, j] only
    xg = x.clone().requires_grad_()
    y = sp(xg)
    y.backward(gy)
    for got, want, what in ((y, y_ref, "forward"), (xg.grad, gx_ref, "input gradient"),
                            (sp[0].weight_values.grad, gw_ref, "kept-weight gradient")):
        fin = want.isfinite()
        assert torch.equal(got.isfinite(), fin), f"{what}: {int((got.isfinite() != fin).sum())} entries differ"
        assert torch.equal(got[~fin].double().nan_to_num(0.0), want[~fin].nan_to_num(0.0)), f"{what}: NaN / Inf differ"
        torch.testing.assert_close(got[fin].double(), want[fin], rtol=1e-4, atol=1e-4)


def test_sparsify_refuses_tied_weights():
    """Two layers sharing one weight Parameter each became a ticket of its own and trained
    apart (review 49). Refused, naming the other holder; one layer under two names is fine."""
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.weight = a.weight
    with pytest.raises(ValueError, match=r"shares its weight with 'b'\.weight \(tied weights\)"):
        stnn.sparsify(nn.Sequential(OrderedDict(a=a, r=nn.ReLU(), b=b)), amount=0.5)
    emb = nn.Embedding(8, 8)
    head = nn.Linear(8, 8, bias=False)
    head.weight = emb.weight
    with pytest.raises(ValueError, match="tied weights"):
        stnn.sparsify(nn.ModuleDict(dict(emb=emb, head=head)), amount=0.5)
    shared = nn.Linear(8, 8)
    m = stnn.sparsify(nn.Sequential(shared, nn.ReLU(), shared), amount=0.5)
    assert m[0] is m[2] and isinstance(m[0], stnn.SparseLinear)


def test_sparsify_refuses_what_it_would_drop():
    """A spectral-norm layer's weight_orig was taken for torch.nn.utils.prune's and its
    normalisation dropped; hooks on a replaced layer or its weight were lost silently
    (review 49). Each is refused before any layer is replaced; prune's own hook is fine."""
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))

    cases = {}
    m = net()
    nn.utils.spectral_norm(m[0])
    cases["spectral norm"] = (m, "forward pre-hook")
    m = net()
    m[0].register_forward_hook(lambda mod, i, o: None)
    cases["forward hook"] = (m, "forward hook")
    m = net()
    m[2].weight.register_hook(lambda g: g)
    cases["Parameter hook"] = (m, "hooks on its weight Parameter")
    for what, (m, match) in cases.items():
        before = [type(c) for c in m]
        with pytest.raises(ValueError, match=match):
            stnn.sparsify(m, amount=0.5)
            pytest.fail(what)
        assert [type(c) for c in m] == before, what          # nothing replaced
    m = net()                                                # a parametrized layer is another class: left as is,
    torch.nn.utils.parametrizations.weight_norm(m[2])        # and from_dense refuses it
    stnn.sparsify(m, amount=0.5)
    assert type(m[2]).__name__ == "ParametrizedLinear"
    with pytest.raises(ValueError, match="parametrized"):
        stnn.SparseLinear.from_dense(m[2])
    m = net()
    prune.l1_unstructured(m[0], "weight", amount=0.5)
    stnn.sparsify(m)                                         # prune's mask is what sparsify reads
    assert isinstance(m[0], stnn.SparseLinear) and m[0].mask().float().mean() == 0.5
