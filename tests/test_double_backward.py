"""Second derivatives through sparse layers equal the dense masked layers' (review 49).

The backward formulas run ops (spmm_t, sddmm, sparse_linear_backward, ticket_compress,
row_masked_grad_weight, the conv gradient ops) that had no autograd formula of their own:
a backward with create_graph=True recorded them as constants, so every second derivative
through a ticket layer came out 0, with only a warning. Each is now differentiated as its
pure-PyTorch reference (sparseticket/ops/__init__.py). Checked here against nn.Linear /
nn.Conv2d with the masked weight (float64), for both paths of the layers, the fused ReLU,
the MLP chain node and the NEq layers, and by gradgradcheck on the ops.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

import sparseticket.nn as stnn
from sparseticket.ops import reference as ref

D = torch.float64
ST = torch.ops.sparseticket


def _net(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, stride=2)).double()


def _input(kind):
    g = torch.Generator().manual_seed(1)
    shape = (5, 7) if kind == "mlp" else (2, 3, 7, 6)
    return torch.randn(shape, generator=g, dtype=D)


def _second_derivatives(model, x, weights, keeps=None):
    """d/dW of |dL/dx|^2 and of |dL/dW|^2 (L = sum of squared outputs; dL/dW at the kept
    entries: `keeps` masks a dense weight's gradient), for W in weights."""
    x = x.clone().requires_grad_()
    loss = model(x).pow(2).sum()
    gx, *gw = torch.autograd.grad(loss, [x] + weights, create_graph=True)
    if keeps is not None:
        gw = [g * k for g, k in zip(gw, keeps)]
    first = torch.autograd.grad(gx.pow(2).sum(), weights, retain_graph=True)
    second = torch.autograd.grad(sum(g.pow(2).sum() for g in gw), weights)
    return first, second


def _kept(dense_grad, mask):
    """a dense weight's gradient at the kept entries, in a ticket's values order ((tap, channel) for convs)"""
    if dense_grad.dim() == 4:
        dense_grad, mask = dense_grad.permute(0, 2, 3, 1), mask.permute(0, 2, 3, 1)
    return dense_grad[mask]


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("mode", ["sparse", "dense"])
@pytest.mark.parametrize("fuse_relu", [False, True])
def test_second_derivatives_are_the_dense_masked_layers(kind, mode, fuse_relu):
    base, x = _net(kind), _input(kind)
    layers = [n for n, m in base.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    g = torch.Generator().manual_seed(2)
    masks = {n: torch.rand(base.get_submodule(n).weight.shape, generator=g) > 0.4 for n in layers}
    dense = copy.deepcopy(base)
    with torch.no_grad():
        for n in layers:
            dense.get_submodule(n).weight.mul_(masks[n])
    sparse = stnn.sparsify(copy.deepcopy(base), masks=masks, mode=mode, fuse_relu=fuse_relu)
    want = _second_derivatives(dense, x, [dense.get_submodule(n).weight for n in layers],
                               [masks[n].to(D) for n in layers])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (torch warns when it backprops through an op without a formula)
        got = _second_derivatives(sparse, x, [sparse.get_submodule(n).weight_values for n in layers])
    for w_list, g_list in zip(want, got):
        for n, w, gv in zip(layers, w_list, g_list):
            expected = _kept(w, masks[n])
            assert expected.abs().max() > 0, n                  # (a derivative that is there to be wrong)
            torch.testing.assert_close(gv, expected, rtol=1e-10, atol=1e-12, msg=f"{kind} {mode} {n}")


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_neq_layers_second_derivatives(kind):
    base, x = _net(kind), _input(kind)
    layer = base[0]
    neq = stnn.enable_neq(copy.deepcopy(base))
    active = torch.ones(layer.weight.shape[0], dtype=torch.bool)
    active[1] = False
    neq[0].set_active(active)
    keep = active.view((-1,) + (1,) * (layer.weight.dim() - 1))
    out = []
    for model in (base, neq):
        xr = x.clone().requires_grad_()
        gw, = torch.autograd.grad(model(xr).pow(2).sum(), [model[0].weight], create_graph=True)
        if model is base:
            gw = gw * keep
        out.append(torch.autograd.grad(gw.pow(2).sum(), [model[0].weight])[0])
    # a frozen row's gradient is 0 at every order (neq_linear's weight gradient never computes it)
    want = out[0] * keep
    assert want.abs().max() > 0
    torch.testing.assert_close(out[1], want, rtol=1e-10, atol=1e-12)


def _ticket(O, I, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(O, I, generator=g, dtype=D)
    m = torch.rand(O, I, generator=g) > 0.5
    m[1] = False                                              # an empty row
    values, crow, col = ref.reference_dense_to_ticket(w, m)
    ccol, row, perm = ref.reference_ticket_transpose(crow, col, I)
    return values, crow, col, ccol, row, perm


def test_gradgradcheck_on_the_ops():
    values, crow, col, ccol, row, perm = _ticket(5, 6, 3)
    g = torch.Generator().manual_seed(4)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=D, requires_grad=True)

    x, b, v = r(3, 6), r(5), values.clone().requires_grad_()
    active = torch.tensor([True, True, False, True, True])
    torch.autograd.gradgradcheck(lambda x, v, b: ST.sparse_linear(x, v, crow, col, ccol, row, perm, b, active),
                                 (x, v, b), fast_mode=True)
    torch.autograd.gradgradcheck(lambda x, v, b: ST.sparse_linear_relu(x, v, crow, col, ccol, row, perm, b, None),
                                 (x, v, b), fast_mode=True)
    gy = r(3, 5)
    torch.autograd.gradgradcheck(lambda gy, v: ST.spmm_t(gy, v, ccol, row, perm), (gy, v), fast_mode=True)
    torch.autograd.gradgradcheck(lambda gy, x: ST.sddmm(gy, x, crow, col, active), (gy, x), fast_mode=True)
    torch.autograd.gradgradcheck(lambda gy, x: ST.row_masked_grad_weight(gy, x, active), (gy, x),
                                 fast_mode=True)
    # a 3x3 conv over 2 input channels, stride 2: the ticket is [O, 3*3*2] with columns (tap, channel)
    cv, ccrow, ccolumn, cccol, crow_t, cperm = _ticket(2, 18, 5)
    cv = cv.clone().requires_grad_()
    xc, bc = r(1, 2, 5, 4), r(2)
    conf = ((3, 3), (2, 2), (1, 1), (1, 1))
    torch.autograd.gradgradcheck(
        lambda x, v, b: ST.sparse_conv2d(x, v, ccrow, ccolumn, cccol, crow_t, cperm, b, None, *conf), (xc, cv, bc),
        fast_mode=True)
