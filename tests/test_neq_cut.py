"""sparseticket.neq.cut_frozen_outputs: the layer after the first partially frozen one
computes its input gradient for that layer's active channels only.

Every parameter gradient (and the gradient of any input that requires it) must equal the
full backward's; the activation gradient between the two layers is 0 at the source's
frozen channels and unchanged at the others. A forward is cut only when the autograd
graph shows the consumer reads the source module's last call (with the mask that call
used) through channel-wise, parameter-free steps, and that call's input needed no
gradient: the models below that break one of those conditions (a BatchNorm or PReLU
registered elsewhere, a learnable scale, another branch, ops that mix channels, weight
tying, a source called twice, another NEq op on the source's Parameters, a Parameter fed
to the source, a direct call of the consumer) must not be cut, and their gradients must
stay exact; so must checkpointing with the context or the masks changed before
backward, a mask changed between the two layers' forwards, and a penalty on the
activation gradient. The FLOP counter reports the consumer's input gradient as computed.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import sparseticket.nn as stnn
from sparseticket.flops import FlopCounter
from sparseticket.neq import cut_frozen_outputs, freeze_prefix, frontier_cut
from sparseticket.nn.conv import neq_conv2d

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


class Net(nn.Module):
    """conv1 -> ReLU -> pool -> ``between`` -> conv2 (the consumer) -> ReLU -> conv3 -> linear."""

    def __init__(self, between: nn.Module | None = None, groups2: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.between = between if between is not None else nn.Identity()
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, groups=groups2)
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


class Shuffle(nn.Module):
    def forward(self, h):
        n, c, hh, ww = h.shape
        return h.view(n, 2, c // 2, hh, ww).transpose(1, 2).reshape(n, c, hh, ww)


class BNAfter(nn.Module):
    """the convs registered first, the BatchNorm after them (runs between conv1 and conv2)"""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.conv2(F.relu(self.bn1(self.conv1(x))))


class SharedPReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.act = nn.PReLU()

    def forward(self, x):
        return self.act(self.conv2(self.act(self.conv1(x))))


class RootScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.full((1, 6, 1, 1), 1.5))
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x)) * self.scale)


class Merge(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.aux = nn.Conv2d(2, 6, 1)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x) + self.aux(x)))


class Tied(nn.Module):
    """conv2 applied twice (weight tying): only its first call reads conv1's output"""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x):
        return self.conv2(F.relu(self.conv2(F.relu(self.conv1(x)))))


class TwoSourceCalls(nn.Module):
    """conv1 on a trainable input and on data; conv2 reads both"""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.prompt = nn.Parameter(torch.randn(1, 2, 8, 8))

    def forward(self, x):
        hp = F.relu(self.conv1(self.prompt.expand(x.shape[0], -1, -1, -1)))
        hx = F.relu(self.conv1(x))
        return self.conv2(hp) + self.conv2(hx)


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.reentrant = reentrant

    def forward(self, x):
        h = F.relu(self.conv1(x))
        return checkpoint(lambda t: F.relu(self.conv2(t)), h, use_reentrant=self.reentrant)


def _half_active(model: nn.Module, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in stnn.neq_modules(model):
        n = m.out_channels if hasattr(m, "out_channels") else m.out_features
        a = torch.zeros(n, dtype=torch.bool)
        a[torch.randperm(n, generator=g)[: n // 2]] = True
        m.set_active(a)
        out[name] = a
    return out


def _neq(model: nn.Module) -> tuple[nn.Module, nn.Module, dict]:
    torch.manual_seed(0)
    dense = model.to(F64)
    neq = stnn.enable_neq(copy.deepcopy(dense))
    return dense, neq, _half_active(neq)


def _run(model, *inputs, seed=0):
    """Parameter gradients (and those of inputs requiring grad) of one forward+backward;
    the RNG is reset first so dropout draws the same masks in every run."""
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    model(*inputs).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads.update({f"input{i}": t.grad.clone() for i, t in enumerate(inputs) if t.grad is not None})
    for t in inputs:
        t.grad = None
    return grads


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], **TOL, msg=name)


def _x(batch=3):
    return torch.randn(batch, 2, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- the cut


@pytest.mark.parametrize("between", ["identity", "dropout", "dropout2d", "leaky_inplace", "st_pool", "avg_pool",
                                     "st_pool2x2"])
@pytest.mark.parametrize("batch", [3, 1])
def test_cut_keeps_every_parameter_gradient(between, batch):
    mods = {"identity": nn.Identity(), "dropout": nn.Dropout(0.3), "dropout2d": nn.Dropout2d(0.3),
            "leaky_inplace": nn.LeakyReLU(0.1, inplace=True), "st_pool": stnn.MaxPool2d(1),
            "avg_pool": nn.AvgPool2d(3, stride=1, padding=1), "st_pool2x2": nn.Identity()}
    net = Net(mods[between])
    if between == "st_pool2x2":  # the source's pool is sparseticket's 2x2 kernel (a C++ autograd node)
        net.pool = stnn.MaxPool2d(2)
    dense, neq, actives = _neq(net)
    x = _x(batch)
    full = _run(dense, x)
    full_mid = dense.mid.grad
    plain = _run(neq, x)
    plain_mid = neq.mid.grad
    with cut_frozen_outputs(neq) as pair:
        assert pair == ("conv1", "conv2")
        cut = _run(neq, x)
        assert neq.conv2.last_input_cut == pytest.approx(0.5)
        cut_mid = neq.mid.grad
    _assert_same(plain, cut)
    for name, g in cut.items():  # and the dense model's, frozen rows 0
        a = actives.get(name.rsplit(".", 1)[0])
        ref = full[name] if a is None else torch.where(a.view(-1, *([1] * (g.dim() - 1))), full[name], 0)
        torch.testing.assert_close(g, ref, **TOL, msg=name)
    a1 = actives["conv1"]
    torch.testing.assert_close(plain_mid, full_mid, **TOL)
    torch.testing.assert_close(cut_mid[:, a1], plain_mid[:, a1], **TOL)
    assert torch.all(cut_mid[:, ~a1] == 0) and bool((plain_mid[:, ~a1] != 0).any())


@pytest.mark.parametrize("case", ["bn_registered_after", "local_response_norm", "group_norm", "channel_shuffle",
                                  "shared_prelu", "root_scale", "merged_branch", "tied_consumer",
                                  "source_called_twice", "checkpoint_reentrant", "checkpoint_nonreentrant"])
def test_unsafe_graphs_are_not_cut(case):
    """Models where the consumer's input is not (only) a channel-wise function of this
    forward's source output fed by data: gradients equal the uncut run's, and where the
    only consumer call is unsafe, it is not cut."""
    models = {"bn_registered_after": BNAfter, "local_response_norm": lambda: Net(nn.LocalResponseNorm(3)),
              "group_norm": lambda: Net(nn.GroupNorm(2, 6, affine=False)), "channel_shuffle": lambda: Net(Shuffle()),
              "shared_prelu": SharedPReLU, "root_scale": RootScale, "merged_branch": Merge, "tied_consumer": Tied,
              "source_called_twice": TwoSourceCalls, "checkpoint_reentrant": lambda: Checkpointed(True),
              "checkpoint_nonreentrant": lambda: Checkpointed(False)}
    _, neq, _ = _neq(models[case]())
    x = _x()
    plain = _run(neq, x)
    with cut_frozen_outputs(neq) as pair:
        assert pair == ("conv1", "conv2")
        cut = _run(neq, x)
        if case not in ("tied_consumer", "source_called_twice", "checkpoint_nonreentrant", "checkpoint_reentrant"):
            assert neq.conv2.last_input_cut is None
    _assert_same(plain, cut)


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpoint_with_two_passes_before_one_backward(reentrant):
    """An input-gradient pass (x requires grad) and a clean pass, then one backward,
    the consumer inside torch.utils.checkpoint: the recompute decides as the forward did."""
    _, neq, _ = _neq(Checkpointed(reentrant))
    x = _x()

    def step():
        neq.zero_grad(set_to_none=True)
        xa = x.clone().requires_grad_(True)
        (neq(xa).square().sum() + neq(x).square().sum()).backward()
        return {**{n: p.grad.clone() for n, p in neq.named_parameters()}, "xa": xa.grad.clone()}

    plain = step()
    with cut_frozen_outputs(neq):
        cut = step()
    _assert_same(plain, cut)


def test_no_cut_when_the_source_input_requires_grad():
    dense, neq, _ = _neq(Net())
    x = _x().requires_grad_(True)
    full = _run(dense, x)
    with cut_frozen_outputs(neq):
        plain_cut = _run(neq, x)
        assert neq.conv2.last_input_cut is None
    torch.testing.assert_close(plain_cut["input0"], full["input0"], **TOL)


def test_consumer_called_alone_after_a_step_is_not_cut():
    _, neq, _ = _neq(Net())
    z = torch.randn(3, 6, 4, 4, dtype=F64, requires_grad=True)
    ref = torch.autograd.grad(neq.conv2(z).square().sum(), z)[0]
    with cut_frozen_outputs(neq):
        _run(neq, _x())
        got = torch.autograd.grad(neq.conv2(z).square().sum(), z)[0]
        assert neq.conv2.last_input_cut is None
    torch.testing.assert_close(got, ref, **TOL)


def test_unbatched_input_is_not_cut_and_stays_exact():
    """The source's unbatched path squeezes its output, a step the walk does not accept."""
    _, neq, _ = _neq(Net())
    x = _x(1)
    grads = []
    with cut_frozen_outputs(neq):
        for xin in (x[0], x):
            neq.zero_grad(set_to_none=True)
            neq.conv2(torch.relu(neq.conv1(xin))).square().sum().backward()
            grads.append([p.grad.clone() for p in (neq.conv1.weight, neq.conv2.weight)])
        assert neq.conv2.last_input_cut == pytest.approx(0.5)  # the batched call
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL)


def test_channels_last_and_float32():
    for dtype, tol in ((F64, TOL), (torch.float32, dict(rtol=1e-5, atol=1e-6))):
        _, neq, _ = _neq(Net())
        neq = neq.to(dtype)
        x = _x().to(dtype).contiguous(memory_format=torch.channels_last)
        plain = _run(neq, x)
        with cut_frozen_outputs(neq):
            cut = _run(neq, x)
            assert neq.conv2.last_input_cut == pytest.approx(0.5)
        for name in plain:
            torch.testing.assert_close(cut[name], plain[name], **tol, msg=name)


# ----------------------------------------------------------------------------- pairs and the context


def test_pairs_frontier_cut_refuses():
    _, neq, _ = _neq(Net(groups2=2))
    assert frontier_cut(neq) is None  # grouped consumer
    _, neq, _ = _neq(Net())
    neq.conv1.set_active(torch.ones(6, dtype=torch.bool))
    assert frontier_cut(neq) is None  # nothing frozen in the source
    neq.conv1.set_active(None)
    assert frontier_cut(neq) is None
    mlp = stnn.enable_neq(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)))
    mlp[0].set_active(torch.tensor([True, False] * 3))
    assert frontier_cut(mlp) is None  # a Linear source (LeNet)
    with cut_frozen_outputs(mlp) as pair:
        assert pair is None
    # the next NEq layer in registration order takes another width: not the consumer
    odd = stnn.enable_neq(nn.ModuleDict({"a": nn.Conv2d(2, 6, 3), "b": nn.Conv2d(4, 4, 3), "c": nn.Conv2d(6, 6, 3)}))
    odd["a"].set_active(torch.tensor([True, False] * 3))
    assert frontier_cut(odd) is None
    assert frontier_cut(odd, order=["a", "c"]) == ("a", "c")
    with pytest.raises(ValueError, match="no module named"):
        frontier_cut(neq, order=["conv1", "nope"])


def test_after_a_frozen_prefix():
    """conv1 fully frozen and cut by freeze_prefix: conv2 is the source, conv3 the consumer."""
    dense, neq, actives = _neq(Net())
    neq.conv1.set_active(torch.zeros(6, dtype=torch.bool))
    x = _x()
    with cut_frozen_outputs(neq) as pair:  # without the prefix cut conv2's input requires grad: not cut
        assert pair == ("conv2", "conv3")
        _run(neq, x)
        assert neq.conv3.last_input_cut is None
    with freeze_prefix(neq), cut_frozen_outputs(neq) as pair:
        assert pair == ("conv2", "conv3")
        cut = _run(neq, x)
        assert neq.conv3.last_input_cut == pytest.approx(0.5)
    full = _run(dense, x)
    assert not any(n.startswith("conv1.") for n in cut)
    for name, g in cut.items():
        a = actives.get(name.rsplit(".", 1)[0])
        ref = full[name] if a is None else torch.where(a.view(-1, *([1] * (g.dim() - 1))), full[name], 0)
        torch.testing.assert_close(g, ref, **TOL, msg=name)


def test_context_lifecycle():
    from sparseticket.nn.conv import _INPUT_CUTS
    _, neq, actives = _neq(Net())
    x = _x()
    with cut_frozen_outputs(neq):
        snapshot = copy.deepcopy(neq)  # an EMA / best-model copy made inside the block
        _run(snapshot, x)
        assert snapshot.conv2.last_input_cut is None
        with cut_frozen_outputs(neq):  # nested: the inner exit keeps the outer cut
            _run(neq, x)
            assert neq.conv2.last_input_cut == pytest.approx(0.5)
        _run(neq, x)
        assert neq.conv2.last_input_cut == pytest.approx(0.5)
    assert neq.conv2 not in _INPUT_CUTS and "last_input_cut" not in neq.conv2.__dict__
    _run(neq, x)
    assert neq.conv2.last_input_cut is None
    with pytest.raises(RuntimeError, match="boom"):
        with cut_frozen_outputs(neq):
            raise RuntimeError("boom")
    assert neq.conv2 not in _INPUT_CUTS


def test_flop_counter_reports_the_computed_input_gradient():
    _, neq, _ = _neq(Net())
    x = _x()
    with FlopCounter(neq) as full:
        _run(neq, x)
    with cut_frozen_outputs(neq), FlopCounter(neq) as cut:
        _run(neq, x)
    f, c = full.layer("conv2")["grad_input"], cut.layer("conv2")["grad_input"]
    assert f["executed"] == f["dense"] > 0
    assert c["dense"] == f["dense"] and c["executed"] == f["executed"] // 2
    assert cut.layer("conv3")["grad_input"] == full.layer("conv3")["grad_input"]


class Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.relu1(self.conv1(x)))


@pytest.mark.parametrize("fuse_relu", [False, True])
@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_sparse_conv2d_source(fuse_relu, mode):
    """A SparseConv2d source (sparse kernels, with or without the fused ReLU, or its dense
    path): both record their NEq-aware op's call, so both are cut, and stay exact."""
    torch.manual_seed(0)
    model = Seq().to(F64)
    stnn.sparsify(model, amount=0.5, filter=lambda n, m: n == "conv1", mode=mode, fuse_relu=fuse_relu)
    stnn.enable_neq(model)
    _half_active(model)
    x = _x()
    plain = _run(model, x)
    with cut_frozen_outputs(model) as pair:
        assert pair == ("conv1", "conv2")
        cut = _run(model, x)
        assert model.conv2.last_input_cut == pytest.approx(0.5)
    _assert_same(plain, cut)


def test_a_plain_conv_sharing_the_source_weight_is_not_a_source():
    """The walk ends at a node fed by the source's parameters alone; a plain conv applying
    the same Parameter (it computes every row's weight gradient) must not pass for it."""
    _, neq, _ = _neq(Seq())
    w = neq.conv1.weight

    def forward(x):
        return neq.conv2(torch.relu(F.conv2d(x, w, None, padding=1)))

    x = _x()
    neq.zero_grad(set_to_none=True)
    forward(x).square().sum().backward()
    ref = w.grad.clone()
    with cut_frozen_outputs(neq):
        neq.zero_grad(set_to_none=True)
        forward(x).square().sum().backward()
        assert neq.conv2.last_input_cut is None
    torch.testing.assert_close(w.grad, ref, **TOL)


# ----------------------------------------------------------------------------- the source's own call


def test_the_mask_is_the_one_the_source_call_used():
    """set_active on the source between its forward and the consumer's (a forward hook,
    a scheduler): the cut uses the mask the source's call ran with, not the new one."""
    _, neq, actives = _neq(Net())
    new_mask = actives["conv1"].roll(1)
    handle = neq.conv1.register_forward_hook(lambda m, i, o: m.set_active(new_mask))
    x = _x()

    def step():
        neq.conv1.set_active(actives["conv1"])
        return _run(neq, x)

    plain = step()
    with cut_frozen_outputs(neq):
        cut = step()
        assert neq.conv2.last_input_cut == pytest.approx(0.5)
    handle.remove()
    _assert_same(plain, cut)


class Twin(nn.Module):
    """conv2 reads a second NEq call on conv1's Parameters, run with another mask:
    ``functional`` an all-active neq_conv2d, else an NEqConv2d sharing the Parameters."""

    def __init__(self, functional: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.functional = functional

    def forward(self, x):
        c1 = self.conv1
        hx = F.relu(c1(x))  # the source's call, recorded first
        if self.functional:
            ones = torch.ones(6, dtype=torch.bool)
            h = neq_conv2d(x, c1.weight, c1.bias, ones, (1, 1), (1, 1), (1, 1), 1)
        else:
            h = self.twin(x)
        return self.conv2(hx).mean() + self.conv2(F.relu(h))


@pytest.mark.parametrize("functional", [True, False])
def test_other_calls_on_the_source_parameters_are_not_sources(functional):
    """Only the source module's own last call counts; an NEq op applying its Parameters
    with another mask reads the gradient at channels the source froze."""
    _, neq, actives = _neq(Twin(functional))
    if not functional:
        twin = stnn.NEqConv2d(2, 6, 3, padding=1).to(F64)
        twin.weight, twin.bias = neq.conv1.weight, neq.conv1.bias
        twin.set_active(~actives["conv1"])
        object.__setattr__(neq, "twin", twin)  # not a submodule: frontier_cut sees conv1, conv2
    x = _x()
    plain = _run(neq, x)
    with cut_frozen_outputs(neq) as pair:
        assert pair == ("conv1", "conv2")
        cut = _run(neq, x)
        assert neq.conv2.last_input_cut is None  # the second consumer call
    _assert_same(plain, cut)


class LearnedInput(nn.Module):
    """conv1 applied to a Parameter registered on conv1 itself"""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(self.conv1.const + x)))


def test_a_source_fed_its_own_parameter_is_not_cut():
    model = LearnedInput()
    model.conv1.const = nn.Parameter(torch.randn(1, 2, 8, 8))
    _, neq, _ = _neq(model)
    x = _x()
    plain = _run(neq, x)
    with cut_frozen_outputs(neq):
        cut = _run(neq, x)
        assert neq.conv2.last_input_cut is None
    assert "conv1.const" in plain
    _assert_same(plain, cut)


# ----------------------------------------------------------------------------- checkpointing, double backward, hooks


class SourceCheckpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x):
        h = checkpoint(lambda t: F.relu(self.conv1(t)), x, use_reentrant=False)
        return self.conv2(h)


@pytest.mark.parametrize("model", ["consumer_reentrant", "consumer_nonreentrant", "source_nonreentrant"])
@pytest.mark.parametrize("between", ["exit_context", "change_mask"])
def test_checkpointing_with_state_changes_before_backward(model, between):
    """The forward inside the block, then (exit_context) backward after leaving it, the
    idiom torch.autocast teaches, or (change_mask) set_active on the source before
    backward: the recomputation must save what the forward saved and agree with the
    source's mask. Nothing is cut under checkpointing."""
    make = {"consumer_reentrant": lambda: Checkpointed(True), "consumer_nonreentrant": lambda: Checkpointed(False),
            "source_nonreentrant": SourceCheckpointed}[model]
    _, neq, actives = _neq(make())
    x = _x()

    def step(cut: bool):
        neq.conv1.set_active(actives["conv1"])
        neq.zero_grad(set_to_none=True)
        with cut_frozen_outputs(neq) if cut else contextlib.nullcontext():
            loss = neq(x).square().sum()
            if cut:
                assert neq.conv2.last_input_cut is None
            if between == "change_mask":
                neq.conv1.set_active(actives["conv1"].roll(1))
                loss.backward()
        if between == "exit_context":
            loss.backward()
        return {n: p.grad.clone() for n, p in neq.named_parameters()}

    _assert_same(step(False), step(True))


def test_a_penalty_on_the_activation_gradient_is_exact():
    """autograd.grad(..., create_graph=True) of the activations between the two layers,
    used in the loss: the double-backward pass reads every channel, so a backward that
    builds a graph computes the full input gradient."""
    _, neq, _ = _neq(Net())
    x = _x()

    def step():
        neq.zero_grad(set_to_none=True)
        loss = neq(x).square().sum()
        g = torch.autograd.grad(loss, neq.mid, create_graph=True)[0]
        (loss + 0.1 * g.square().sum()).backward()
        return {n: p.grad.clone() for n, p in neq.named_parameters()}

    plain = step()
    with cut_frozen_outputs(neq):
        cut = step()
    _assert_same(plain, cut)


def test_a_hook_on_the_activation_sees_zeros_at_frozen_channels():
    """The documented limit: a tensor hook between the two layers sees the cut gradient (0
    at the source's frozen channels, exact at the active ones); a hook that rewrites it
    from other channels would change the source's gradients (docs/NEQ.md)."""
    _, neq, actives = _neq(Seq())
    a = actives["conv1"]
    seen = []

    def forward(x):
        h = neq.relu1(neq.conv1(x))
        h.register_hook(lambda g: seen.append(g.clone()))
        return neq.conv2(h)

    x = _x()
    forward(x).square().sum().backward()
    with cut_frozen_outputs(neq):
        forward(x).square().sum().backward()
    full, cut = seen
    assert bool((full[:, ~a] != 0).any()) and bool((cut[:, ~a] == 0).all())
    torch.testing.assert_close(cut[:, a], full[:, a], **TOL)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
@pytest.mark.parametrize("fuse_relu", [False, True])
def test_sparse_conv2d_consumer_cuts_on_its_dense_path(mode, fuse_relu):
    """A SparseConv2d consumer (an IMP ticket at a density where oneDNN wins) computes its
    input gradient for the source's active channels on its dense path; its sparse
    kernels compute every channel. Exact either way."""
    torch.manual_seed(0)
    model = Net().to(F64)
    stnn.sparsify(model, amount=0.4, filter=lambda n, m: n in ("conv2", "conv3"), mode=mode, fuse_relu=fuse_relu)
    stnn.enable_neq(model)
    _half_active(model)
    x = _x()
    plain = _run(model, x)
    with cut_frozen_outputs(model) as pair:
        assert pair == ("conv1", "conv2")
        cut = _run(model, x)
        assert model.conv2.last_input_cut == (pytest.approx(0.5) if mode == "dense" else None)
    assert "last_input_cut" not in model.conv2.__dict__
    _assert_same(plain, cut)


# ----------------------------------------------------------------------------- review 4 (session 18)


@pytest.mark.parametrize("source", ["neq", "sparse"])
def test_a_mask_swapped_during_the_source_call_is_not_paired_with_it(source):
    """set_active landing between the source's op and its record (another thread; here a
    TorchFunctionMode reacting to the op): the record keeps the mask the op ran with."""
    from torch.overrides import TorchFunctionMode

    _, neq, actives = _neq(Net())
    if source == "sparse":
        neq = stnn.sparsify(neq, masks={"conv1": torch.rand(6, 2, 3, 3, generator=torch.Generator().manual_seed(2)) < 0.7},
                            mode="sparse", filter=lambda name, m: name == "conv1")
        neq.conv1.set_active(actives["conv1"])
    swapped = ~actives["conv1"]
    swap_done: list = []

    class Swap(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not swap_done and (func is torch.conv2d or "sparse_conv2d" in str(func)):
                swap_done.append(True)  # (the first conv of the forward is conv1's)
                neq.conv1.set_active(swapped)
            return out

    x = _x()

    def step(cut):
        neq.conv1.set_active(actives["conv1"])
        swap_done.clear()
        with cut_frozen_outputs(neq) if cut else contextlib.nullcontext():
            neq.zero_grad(set_to_none=True)
            with Swap():
                out = neq(x)
            assert swap_done
            out.square().sum().backward()
            if cut:
                assert neq.conv2.last_input_cut == pytest.approx(0.5)
        return {n: p.grad.clone() for n, p in neq.named_parameters() if p.grad is not None}

    plain, cut = step(False), step(True)
    assert plain["conv1.weight" if source == "neq" else "conv1.weight_values"].abs().sum() > 0
    _assert_same(plain, cut)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.trace is deprecated, still in use
def test_jit_trace_inside_the_context_records_no_cut():
    """A trace made inside the block must not keep that call's cut as a constant: the
    traced module, later fed an input that requires grad, gives the exact input gradient."""
    _, neq, _ = _neq(Net())
    x = _x()
    with cut_frozen_outputs(neq):
        traced = torch.jit.trace(neq, (x,), check_trace=False)
        assert neq.conv2.last_input_cut is None
    xr = x.clone().requires_grad_(True)
    neq(xr).square().sum().backward()
    want = xr.grad.clone()
    xr.grad = None
    traced(xr).square().sum().backward()
    torch.testing.assert_close(xr.grad, want, **TOL)


def test_batched_grads_inside_the_context():
    """autograd.grad(..., is_grads_batched=True) (vmap over the backward) runs inside the
    block and gives the per-sample rows it gives outside."""
    _, neq, _ = _neq(Net())
    x = _x()
    params = list(neq.parameters())

    def rows():
        out = neq(x).sum(1)
        return torch.autograd.grad(out, params, torch.eye(out.shape[0], dtype=out.dtype), is_grads_batched=True)

    want = rows()
    with cut_frozen_outputs(neq):
        got = rows()
        assert neq.conv2.last_input_cut == pytest.approx(0.5)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, **TOL)
