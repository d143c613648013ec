"""sparseticket.neq.cut_frozen_outputs: the layer after the first partially frozen one
computes its input gradient for that layer's active channels only.

Every parameter gradient must equal the full backward's (the dense model's, with frozen
rows 0); the activation gradient between the two layers is 0 at the source's frozen
channels and unchanged at the others; the cut applies only to the pairs frontier_cut
accepts and only in forwards whose source input needs no gradient; the FLOP counter
reports the consumer's input gradient as computed.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sparseticket.nn as stnn
from sparseticket.flops import FlopCounter
from sparseticket.neq import cut_frozen_outputs, freeze_prefix, frontier_cut

F64 = torch.float64


class Net(nn.Module):
    """conv1 -> ReLU -> pool -> conv2 (the consumer) -> ReLU -> conv3 -> linear."""

    def __init__(self, between: nn.Module | None = None, groups2: int = 1, c1: int = 6):
        super().__init__()
        self.conv1 = nn.Conv2d(2, c1, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.between = between if between is not None else nn.Identity()
        self.conv2 = nn.Conv2d(c1, 6, 3, padding=1, groups=groups2)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(6, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        h = self.pool(self.relu1(self.conv1(x)))
        self.mid = h
        if h.requires_grad:
            h.retain_grad()
        h = self.relu2(self.conv2(self.between(h)))
        return self.fc(self.conv3(h).flatten(1))


def _actives(model, gen, frozen_first=None):
    """A random half of every NEq layer active; ``frozen_first``: conv1's mask instead."""
    out = {}
    for name, m in stnn.neq_modules(model):
        n = m.weight.shape[0]
        a = torch.zeros(n, dtype=torch.bool)
        a[torch.randperm(n, generator=gen)[: n // 2]] = True
        if name == "conv1" and frozen_first is not None:
            a = frozen_first.clone()
        m.set_active(a)
        out[name] = a
    return out


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    loss = model(x).square().sum()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, model.mid.grad


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def _pair(gen, **kw):
    torch.manual_seed(0)
    dense = Net(**kw).to(F64)
    neq = stnn.enable_neq(copy.deepcopy(dense))
    actives = _actives(neq, gen)
    x = torch.randn(3, 2, 8, 8, dtype=F64, generator=gen)
    return dense, neq, actives, x


@pytest.mark.parametrize("batch", [3, 1])
def test_parameter_gradients_equal_the_full_backward(gen, batch):
    dense, neq, actives, x = _pair(gen)
    x = x[:batch]
    full, full_mid = _grads(dense, x)
    plain, plain_mid = _grads(neq, x)
    with cut_frozen_outputs(neq) as pair:
        assert pair == ("conv1", "conv2")
        cut, cut_mid = _grads(neq, x)
        assert neq.conv2.last_input_cut == pytest.approx(0.5)
    for name, g in cut.items():
        layer, kind = name.rsplit(".", 1)
        a = actives.get(layer)
        ref = full[name] if a is None else torch.where(a.view(-1, *([1] * (g.dim() - 1))), full[name], 0)
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(g, plain[name], rtol=1e-10, atol=1e-12, msg=name)
    a1 = actives["conv1"]
    # the activation gradient between the two layers: 0 at conv1's frozen channels only
    torch.testing.assert_close(cut_mid[:, a1], plain_mid[:, a1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(plain_mid, full_mid, rtol=1e-10, atol=1e-12)
    assert torch.all(cut_mid[:, ~a1] == 0) and bool((plain_mid[:, ~a1] != 0).any())


def test_context_exit_restores_the_full_input_gradient(gen):
    dense, neq, actives, x = _pair(gen)
    with cut_frozen_outputs(neq):
        pass
    assert "_st_input_cut" not in neq.conv2.__dict__ and not neq.conv1._forward_pre_hooks
    _, mid = _grads(neq, x)
    assert bool((mid[:, ~actives["conv1"]] != 0).any())
    assert neq.conv2.__dict__.get("last_input_cut") is None


def test_no_cut_when_the_source_input_requires_grad(gen):
    dense, neq, actives, x = _pair(gen)
    x = x.clone().requires_grad_(True)
    with cut_frozen_outputs(neq):
        neq.zero_grad(set_to_none=True)
        neq(x).square().sum().backward()
        assert neq.conv2.last_input_cut is None
        gx = x.grad.clone()
    dense.zero_grad(set_to_none=True)
    x2 = x.detach().clone().requires_grad_(True)
    dense(x2).square().sum().backward()
    torch.testing.assert_close(gx, x2.grad, rtol=1e-10, atol=1e-12)


def test_pairs_frontier_cut_refuses(gen):
    # a trainable BatchNorm between the two layers needs the gradient at every channel
    _, neq, _, _ = _pair(gen, between=nn.BatchNorm2d(6, dtype=F64))
    assert frontier_cut(neq) is None
    # a parameter-free module between is fine
    _, neq, _, _ = _pair(gen, between=nn.Dropout(0.0))
    assert frontier_cut(neq) == ("conv1", "conv2")
    # grouped consumer
    _, neq, _, _ = _pair(gen, groups2=2)
    assert frontier_cut(neq) is None
    # a fully active source: nothing to cut
    _, neq, _, _ = _pair(gen)
    neq.conv1.set_active(torch.ones(6, dtype=torch.bool))
    assert frontier_cut(neq) is None
    neq.conv1.set_active(None)
    assert frontier_cut(neq) is None
    # a Linear source (no channels): LeNet's fc1 -> fc2
    mlp = stnn.enable_neq(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)))
    mlp[0].set_active(torch.tensor([True, False] * 3))
    assert frontier_cut(mlp) is None
    with cut_frozen_outputs(mlp) as pair:
        assert pair is None
    with pytest.raises(ValueError, match="no module named"):
        frontier_cut(neq, order=["conv1", "nope"])


def test_after_a_frozen_prefix(gen):
    """conv1 fully frozen and cut by freeze_prefix: conv2 is the source, conv3 the consumer."""
    dense, neq, actives, x = _pair(gen)
    neq.conv1.set_active(torch.zeros(6, dtype=torch.bool))
    with freeze_prefix(neq), cut_frozen_outputs(neq) as pair:
        assert pair == ("conv2", "conv3")
        neq.zero_grad(set_to_none=True)
        neq(x).square().sum().backward()
        assert neq.conv3.last_input_cut == pytest.approx(0.5)
        cut = {n: p.grad.clone() for n, p in neq.named_parameters() if p.grad is not None}
    full, _ = _grads(dense, x)
    for name, g in cut.items():
        layer = name.rsplit(".", 1)[0]
        a = actives.get(layer)
        ref = full[name] if a is None else torch.where(a.view(-1, *([1] * (g.dim() - 1))), full[name], 0)
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12, msg=name)
    assert not any(n.startswith("conv1.") for n in cut)
    # without the prefix cut, conv2's input requires grad: the pair exists but is not applied
    with cut_frozen_outputs(neq) as pair:
        assert pair == ("conv2", "conv3")
        _grads(neq, x)
        assert neq.conv3.last_input_cut is None


def test_flop_counter_reports_the_computed_input_gradient(gen):
    _, neq, _, x = _pair(gen)

    def run():
        neq.zero_grad(set_to_none=True)
        neq(x).square().sum().backward()

    with FlopCounter(neq) as full:
        run()
    with cut_frozen_outputs(neq), FlopCounter(neq) as cut:
        run()
    f, c = full.layer("conv2")["grad_input"], cut.layer("conv2")["grad_input"]
    assert f["executed"] == f["dense"] > 0
    assert c["dense"] == f["dense"] and c["executed"] == f["executed"] // 2
    assert cut.layer("conv3")["grad_input"] == full.layer("conv3")["grad_input"]


def test_unbatched_and_channels_last_inputs(gen):
    dense, neq, actives, x = _pair(gen)
    with cut_frozen_outputs(neq):
        for xin in (x.contiguous(memory_format=torch.channels_last),):
            cut, _ = _grads(neq, xin)
            full, _ = _grads(dense, xin)
            for name, g in cut.items():
                a = actives.get(name.rsplit(".", 1)[0])
                ref = full[name] if a is None else torch.where(a.view(-1, *([1] * (g.dim() - 1))), full[name], 0)
                torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12, msg=name)
        # an unbatched input: the same gradients as the batch of one
        grads = []
        for xin in (x[0], x[:1]):
            neq.zero_grad(set_to_none=True)
            neq.conv2(torch.relu(neq.conv1(xin))).square().sum().backward()
            assert neq.conv2.last_input_cut == pytest.approx(0.5)
            grads.append([p.grad.clone() for p in (neq.conv1.weight, neq.conv2.weight)])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
