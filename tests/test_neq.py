"""NEq tracker: both rules on hand-computed examples, freeze/release over epochs, zero-vector
conventions, batch-size (in)dependence, conv channels, stochastic baseline, resume, frozen
prefix, and an end-to-end MLP on sklearn digits whose frozen neurons keep their bits.

The modules here are stand-ins for sparseticket.nn's NEq-capable layers: they expose the
same duck-typed interface (``active``, ``set_active``) and honour it in backward.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sparseticket
from sparseticket.neq import NEqConfig, NEqTracker, freeze_prefix, frozen_prefix, rules


class NEqLinear(nn.Linear):
    """nn.Linear whose frozen neurons get no weight/bias gradient (neq_linear op)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.active = None

    def set_active(self, mask):
        assert mask is None or (mask.dtype == torch.bool and mask.shape == (self.out_features,))
        self.active = mask

    def forward(self, x):
        return sparseticket.neq_linear(x, self.weight, self.bias, self.active)


class NEqConv2d(nn.Conv2d):
    """nn.Conv2d emulating the frozen-channel skip by zeroing those gradient rows."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.active = None
        self.weight.register_hook(self._mask)
        if self.bias is not None:
            self.bias.register_hook(self._mask)

    def set_active(self, mask):
        assert mask is None or (mask.dtype == torch.bool and mask.shape == (self.out_channels,))
        self.active = mask

    def _mask(self, g):
        if self.active is None:
            return g
        return g * self.active.view((-1,) + (1,) * (g.dim() - 1)).to(g.dtype)


# ----------------------------------------------------------------------------- hand examples
#
# A NEqLinear(2, O, bias=False) fed the two validation samples e1, e2 outputs, for neuron o,
# exactly the vector W[o] over the validation set, so each epoch's weights *are* the neuron
# output vectors. Neuron A settles slowly; neuron B sits still, jumps, then sits still.

A = [(1, 0), (3, 4), (0, 2), (0, 5), (0, 7), (0, 1)]
B = [(1, 0), (1, 0), (1, 0), (0, 1), (0, 1), (0, 1)]
Z = [(0, 0), (0, 0), (1, 0), (0, 0), (0, 0), (0, 0)]     # silent, fires once, silent


def run_hand(rule, neurons, batch_size=2, eps=0.03, mu=0.5, warmup=0):
    """Replay the weight sequences, one tracker step per epoch; per-epoch stats and masks."""
    layer = NEqLinear(2, len(neurons), bias=False)
    val = torch.eye(2)

    def load(k):
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([n[k] for n in neurons], dtype=torch.float32))

    load(0)
    tracker = NEqTracker(layer, val, NEqConfig(rule=rule, eps=eps, mu_eq=mu, val_batch_size=batch_size,
                                               warmup=warmup))
    out = []
    for k in range(1, len(neurons[0])):
        load(k)
        tracker.step()
        out.append((tracker.stats(""), tracker.frozen()[""].tolist(),
                    None if layer.active is None else layer.active.tolist()))
    return out


def close(t, expected):
    assert t is not None
    assert torch.allclose(t.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6), (t, expected)


def test_paper_rule_hand_computed():
    hist = run_hand("paper", [A, B])
    phi = [[0.6, 1.0], [0.8, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    dphi = [None, [0.2, 0.0], [0.2, -1.0], [0.0, 1.0], [0.0, 0.0]]
    vel = [None, [0.2, 0.0], [0.1, -1.0], [-0.05, 1.5], [0.025, -0.75]]
    frozen = [[False, False], [False, True], [False, False], [False, False], [True, False]]
    for k, (st, fr, active) in enumerate(hist):
        close(st["phi"], phi[k])
        if dphi[k] is None:               # epoch 1: φ⁰ does not exist, nothing can freeze
            assert st["dphi"] is None and st["velocity"] is None
        else:
            close(st["dphi"], dphi[k])
            close(st["velocity"], vel[k])
        assert fr == frozen[k], k
        assert active == (None if not any(fr) else [not f for f in fr])


def test_code_rule_hand_computed():
    # One validation batch of 2: Δ = (1 − cos)/2; m = s − Δ; s ← ½s + ½Δ, reset where frozen.
    hist = run_hand("code", [A, B])
    delta = [[0.2, 0.0], [0.1, 0.0], [0.0, 0.5], [0.0, 0.0], [0.0, 0.0]]
    m = [[-0.2, 0.0], [0.0, 0.0], [0.0, -0.5], [0.0, 0.25], [0.0, 0.125]]
    s = [[0.1, 0.0], [0.0, 0.0], [0.0, 0.25], [0.0, 0.125], [0.0, 0.0625]]
    frozen = [[False, True], [True, True], [True, False], [True, False], [True, False]]
    for k, (st, fr, _) in enumerate(hist):
        close(st["delta"], delta[k])
        close(st["m"], m[k])
        close(st["s"], s[k])
        assert fr == frozen[k], k


def test_code_rule_depends_on_val_batch_size_paper_rule_does_not():
    # Batches of one sample: the code's cosine across a 1-sample batch is sign(a·b), or the
    # zero-vector convention: A's Δ becomes 0.5, 0.5, 0, 0, 0 and it never freezes.
    hist = run_hand("code", [A], batch_size=1)
    close(torch.stack([h[0]["delta"][0] for h in hist]), [0.5, 0.5, 0.0, 0.0, 0.0])
    close(torch.stack([h[0]["m"][0] for h in hist]), [-0.5, -0.25, 0.375, 0.1875, 0.09375])
    close(torch.stack([h[0]["s"][0] for h in hist]), [0.25, 0.375, 0.1875, 0.09375, 0.046875])
    assert not any(h[1][0] for h in hist)
    p1, p2 = run_hand("paper", [A, B], batch_size=1), run_hand("paper", [A, B], batch_size=2)
    for (s1, f1, _), (s2, f2, _) in zip(p1, p2):
        assert torch.equal(s1["phi"], s2["phi"]) and f1 == f2


def test_random_model_batch_size_dependence():
    torch.manual_seed(0)
    model = nn.Sequential(NEqLinear(6, 5), nn.Tanh(), NEqLinear(5, 4))
    val = torch.randn(24, 6)

    def phi_after_perturbation(rule, bs):
        m = copy.deepcopy(model)
        tr = NEqTracker(m, val, NEqConfig(rule=rule, val_batch_size=bs))
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        tr.step()
        return tr.stats("0")["phi" if rule == "paper" else "delta"]

    paper = [phi_after_perturbation("paper", bs) for bs in (1, 5, 24)]
    code = [phi_after_perturbation("code", bs) for bs in (1, 5, 24)]
    assert all(torch.allclose(paper[0], p, atol=1e-6) for p in paper[1:])
    assert not torch.allclose(code[0], code[1], atol=1e-3)
    assert not torch.allclose(code[1], code[2], atol=1e-3)


def test_threshold_strict_for_paper_inclusive_for_code():
    # B is perfectly still at first: the paper's v₂ = 0 and the code's m₁ = 0 exactly.
    paper = run_hand("paper", [B], eps=0.0)
    code = run_hand("code", [B], eps=0.0)
    assert paper[1][0]["velocity"].item() == 0.0 and paper[1][1] == [False]     # 0 < 0 is false
    assert code[0][0]["m"].item() == 0.0 and code[0][1] == [True]                 # 0 <= 0
    # |m| = ε exactly (B's jump at epoch 3: m = −0.5) still freezes under the code rule.
    assert run_hand("code", [B], eps=0.5)[2][1] == [True]
    assert run_hand("code", [B], eps=0.4999)[2][1] == [False]


def test_zero_vector_conventions():
    z, nz = torch.zeros(3), torch.tensor([1.0, 2.0, 2.0])
    hat = lambda v: rules.normalise(v.view(1, -1), dim=1)
    assert rules.cosine(hat(z), hat(z), dim=1).item() == 1.0
    assert rules.cosine(hat(z), hat(nz), dim=1).item() == 0.0
    assert rules.cosine(hat(nz), hat(z), dim=1).item() == 0.0
    assert rules.cosine(hat(nz), hat(-nz), dim=1).item() == pytest.approx(-1.0)
    paper = run_hand("paper", [Z])
    close(torch.stack([h[0]["phi"][0] for h in paper]), [1.0, 0.0, 0.0, 1.0, 1.0])
    code = run_hand("code", [Z])
    close(torch.stack([h[0]["delta"][0] for h in code]), [0.0, 0.5, 0.5, 0.0, 0.0])


def test_warmup_delays_freezing_but_not_the_state():
    base, warm = run_hand("paper", [A, B]), run_hand("paper", [A, B], warmup=1)
    assert warm[1][1] == [False, False] and base[1][1] == [False, True]
    for (s0, _, _), (s1, _, _) in zip(base, warm):
        for key in ("phi", "velocity"):
            assert (s0[key] is None and s1[key] is None) or torch.equal(s0[key], s1[key])
    assert [h[1] for h in warm[2:]] == [h[1] for h in base[2:]]
    code = run_hand("code", [A, B], warmup=1)
    assert code[0][1] == [False, False] and code[1][1] == [True, True]


# ----------------------------------------------------------------------------- conv


def _manual_conv_terms(o_prev, o_cur):
    """Paper φ per channel over all (n, h, w); code Δ = mean over samples of 1 − cos(h, w)."""
    C = o_cur.shape[1]
    a, b = o_cur.transpose(0, 1).reshape(C, -1).double(), o_prev.transpose(0, 1).reshape(C, -1).double()
    phi = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    a, b = o_cur.flatten(2).double(), o_prev.flatten(2).double()
    cos = (a * b).sum(2) / (a.norm(dim=2) * b.norm(dim=2))
    return phi, (1 - cos).mean(0)


@pytest.mark.parametrize("rule", ["paper", "code"])
def test_conv_channels_are_neurons(rule):
    conv = NEqConv2d(3, 4, 3, padding=1)
    x = torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        o_prev = conv(x)
    trackers = [NEqTracker(conv, x, NEqConfig(rule=rule, val_batch_size=bs)) for bs in (2, 5)]
    with torch.no_grad():
        conv.weight.add_(0.2 * torch.randn_like(conv.weight))
        o_cur = conv(x)
    for tr in trackers:
        tr.step()
    phi, delta = _manual_conv_terms(o_prev, o_cur)
    key = "phi" if rule == "paper" else "delta"
    got = trackers[0].stats("")[key]
    assert got.shape == (4,)
    assert torch.allclose(got, phi if rule == "paper" else delta, atol=1e-6)
    # a channel's cosine is over its positions per sample (code) or over everything
    # (paper): neither depends on the validation batch size for a conv
    assert torch.allclose(got, trackers[1].stats("")[key], atol=1e-6)
    assert trackers[0].memory_bytes() == 4 * 5 * 36 * 4


def test_conv_spatial_subsample_and_half_storage():
    conv = NEqConv2d(2, 3, 3, padding=1, bias=False)
    x = torch.randn(4, 2, 5, 5)
    with torch.no_grad():
        o_prev = conv(x)
    cfg = NEqConfig(spatial_positions=7, store_dtype="float16", seed=3)
    tr = NEqTracker(conv, x, cfg)
    pos = tr.layers[""].positions
    assert pos.shape == (7,) and len(set(pos.tolist())) == 7
    with torch.no_grad():
        conv.weight.mul_(-1).add_(0.5 * torch.randn_like(conv.weight))
        o_cur = conv(x)
    tr.step()
    assert torch.equal(tr.layers[""].positions, pos)             # fixed subset across epochs
    phi, _ = _manual_conv_terms(o_prev.flatten(2)[:, :, pos], o_cur.flatten(2)[:, :, pos])
    assert torch.allclose(tr.stats("")["phi"], phi, atol=2e-3)   # fp16 storage of normalised outputs
    assert tr.layers[""].prev.dtype == torch.float16
    assert tr.memory_bytes() == 3 * 4 * 7 * 2


# ----------------------------------------------------------------------------- stochastic


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(NEqLinear(6, 8), nn.ReLU(), NEqLinear(8, 12), nn.ReLU(), NEqLinear(12, 3))


def test_stochastic_baseline_fraction():
    model = _mlp()
    tr = NEqTracker(model, None, NEqConfig(stochastic=0.25, seed=7))
    masks = []
    for _ in range(4):
        frac = tr.step()
        fz = tr.frozen()
        assert [int(fz[n].sum()) for n in ("0", "2", "4")] == [2, 3, 1]     # round(0.25·O)
        assert frac["layer"] == {"0": 0.25, "2": 0.25, "4": 1 / 3}
        assert model[0].active is not None and int((~model[0].active).sum()) == 2
        masks.append(torch.cat([fz[n] for n in fz]))
    assert len({tuple(m.tolist()) for m in masks}) > 1                      # redrawn every epoch
    again = NEqTracker(_mlp(), None, NEqConfig(stochastic=0.25, seed=7))
    for m in masks:
        again.step()
        assert torch.equal(torch.cat(list(again.frozen().values())), m)
    per_layer = NEqTracker(_mlp(), None, NEqConfig(stochastic={"2": 0.5}))
    per_layer.update()                     # nothing to measure: update() alone is enough
    per_layer.apply()
    assert per_layer.frozen_fraction()["layer"] == {"0": 0.0, "2": 0.5, "4": 0.0}


# ----------------------------------------------------------------------------- resume


def _train_epoch(model, opt, xs, ys, epoch):
    g = torch.Generator().manual_seed(1000 + epoch)
    perm = torch.randperm(xs.shape[0], generator=g)
    for i in range(0, xs.shape[0], 16):
        idx = perm[i:i + 16]
        opt.zero_grad()
        nn.functional.cross_entropy(model(xs[idx]), ys[idx]).backward()
        opt.step()


@pytest.mark.parametrize("rule", ["paper", "code"])
def test_state_dict_resume_is_identical(rule):
    torch.manual_seed(1)
    xs, ys = torch.randn(96, 6), torch.randint(0, 3, (96,))
    val = xs[:32]
    cfg = {"rule": rule, "eps": 0.02, "mu_eq": 0.5, "val_batch_size": 8}

    full = _mlp(3)
    opt = torch.optim.SGD(full.parameters(), lr=0.1)
    tr_full = NEqTracker(full, val, NEqConfig(**cfg))
    for e in range(6):
        _train_epoch(full, opt, xs, ys, e)
        tr_full.step()

    first = _mlp(3)
    opt = torch.optim.SGD(first.parameters(), lr=0.1)
    tr = NEqTracker(first, val, NEqConfig(**cfg))
    for e in range(3):
        _train_epoch(first, opt, xs, ys, e)
        tr.step()
    ckpt = {"model": first.state_dict(), "opt": opt.state_dict(), "neq": tr.state_dict()}
    ckpt = copy.deepcopy(ckpt)

    resumed = _mlp(99)
    resumed.load_state_dict(ckpt["model"])
    opt = torch.optim.SGD(resumed.parameters(), lr=0.1)
    opt.load_state_dict(ckpt["opt"])
    tr2 = NEqTracker(resumed, val, NEqConfig(**cfg), baseline=False)
    tr2.load_state_dict(ckpt["neq"])
    assert all(torch.equal(a if a is not None else torch.ones(1), b if b is not None else torch.ones(1))
               for a, b in zip([m.active for m in first if hasattr(m, "active")],
                               [m.active for m in resumed if hasattr(m, "active")]))
    for e in range(3, 6):
        _train_epoch(resumed, opt, xs, ys, e)
        tr2.step()

    assert tr2.history == tr_full.history
    assert any(h["total"] > 0 for h in tr_full.history)
    for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n
    for name in tr_full.layers:
        assert torch.equal(tr_full.frozen()[name], tr2.frozen()[name])
        for k, v in tr_full.stats(name).items():
            assert torch.equal(v, tr2.stats(name)[k]), (name, k)


def test_load_state_dict_rejects_mismatches():
    val = torch.randn(10, 6)
    tr = NEqTracker(_mlp(), val, NEqConfig())
    sd = tr.state_dict()
    with pytest.raises(ValueError, match="rule"):
        NEqTracker(_mlp(), val, NEqConfig(rule="code")).load_state_dict(sd)
    with pytest.raises(ValueError, match="validation set differs"):
        NEqTracker(_mlp(), val + 1, NEqConfig()).load_state_dict(sd)
    with pytest.raises(ValueError, match="tracked modules"):
        NEqTracker(_mlp(), val, NEqConfig(modules=["0", "2"])).load_state_dict(sd)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="NEq-capable"):
        NEqTracker(nn.Sequential(nn.Linear(3, 2)), torch.randn(4, 3))
    with pytest.raises(ValueError, match="validation set is required"):
        NEqTracker(_mlp(), None)
    with pytest.raises(ValueError, match="rule"):
        NEqConfig(rule="published")
    with pytest.raises(ValueError, match="stochastic"):
        NEqConfig(stochastic=1.5)
    with pytest.raises(ValueError, match="no module named"):
        NEqTracker(_mlp(), torch.randn(4, 6), NEqConfig(modules=["7"]))
    plain = nn.Sequential(nn.Linear(3, 2))
    tr = NEqTracker(plain, torch.randn(4, 3), NEqConfig(modules=["0"]))   # tracking works
    tr.measure()
    tr.update()
    with pytest.raises(TypeError, match="cannot freeze"):
        tr.apply()
    with pytest.raises(RuntimeError, match="measure"):
        tr.update()


def test_loader_validation_is_cached_once():
    ds = torch.utils.data.TensorDataset(torch.randn(50, 6), torch.zeros(50))
    loader = torch.utils.data.DataLoader(ds, batch_size=7, shuffle=True)
    tr = NEqTracker(_mlp(), loader, NEqConfig(val_size=20))
    assert tr.val_size == 20 and tr.val_batch_size == 7
    before = tr.state_dict()["val_fingerprint"]
    tr.step()
    tr.step()
    assert tr.state_dict()["val_fingerprint"] == before
    # unchanged weights: every neuron is exactly at equilibrium
    assert tr.frozen_fraction()["total"] == 1.0


# ----------------------------------------------------------------------------- prefix


def test_frozen_prefix_cuts_the_backward():
    model = nn.Sequential(NEqLinear(4, 8), nn.ReLU(), NEqLinear(8, 8), nn.ReLU(), NEqLinear(8, 2))
    model[0].set_active(torch.zeros(8, dtype=torch.bool))
    model[2].set_active(torch.zeros(8, dtype=torch.bool))
    model[4].set_active(torch.tensor([True, False]))
    assert [n for n, _ in frozen_prefix(model)] == ["0", "2"]
    seen = {}

    def record(module, inputs, output):
        seen["rg"] = output.requires_grad

    h = model[2].register_forward_hook(record)
    x = torch.randn(5, 4)
    with freeze_prefix(model) as prefix:
        assert [n for n, _ in prefix] == ["0", "2"]
        model(x).sum().backward()
    h.remove()
    assert seen["rg"] is False                                  # nothing before layer 4 is recorded
    assert all(p.grad is None for p in list(model[0].parameters()) + list(model[2].parameters()))
    assert model[4].weight.grad is not None and model[4].weight.grad[1].abs().sum() == 0
    assert all(p.requires_grad for p in model.parameters())     # restored
    model[0].set_active(torch.ones(8, dtype=torch.bool))
    assert frozen_prefix(model) == []


def test_freeze_prefix_include_between_and_tracker_order():
    model = nn.Sequential(NEqLinear(4, 6), nn.LayerNorm(6), NEqLinear(6, 6), NEqLinear(6, 2))
    for i in (0, 2):
        model[i].set_active(torch.zeros(6, dtype=torch.bool))
    with freeze_prefix(model):
        assert model[1].weight.requires_grad                    # a LayerNorm keeps the chain alive
    with freeze_prefix(model, include_between=True):
        assert not model[1].weight.requires_grad
        out = model[2](model[1](model[0](torch.randn(3, 4))))
        assert not out.requires_grad
    assert model[1].weight.requires_grad
    tr = NEqTracker(model, torch.randn(6, 4), NEqConfig(stochastic=1.0, modules=["0", "2"]))
    tr.step()
    assert tr.frozen_fraction()["total"] == 1.0
    assert [n for n, _ in tr.frozen_prefix()] == ["0", "2"]


# ----------------------------------------------------------------------------- end to end


def test_digits_mlp_end_to_end():
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(X), generator=g)
    tr_idx, te_idx = perm[:1400], perm[1400:]
    Xtr, ytr, Xte, yte = X[tr_idx], y[tr_idx], X[te_idx], y[te_idx]

    torch.manual_seed(0)
    model = nn.Sequential(NEqLinear(64, 128), nn.ReLU(), NEqLinear(128, 64), nn.ReLU(), NEqLinear(64, 10))
    # plain SGD without momentum / weight decay: a zero gradient leaves a weight bit-identical
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tracker = NEqTracker(model, Xtr, NEqConfig(eps=2e-3, mu_eq=0.5, val_size=100, val_batch_size=50))

    linears = [m for m in model if isinstance(m, NEqLinear)]
    checked = 0
    for epoch in range(10):
        before = [(m.weight.detach().clone(), m.bias.detach().clone(), m.active) for m in linears]
        _train_epoch_digits(model, opt, Xtr, ytr, epoch)
        for m, (w, b, active) in zip(linears, before):
            if active is None:
                continue
            frozen = ~active
            assert torch.equal(m.weight[frozen], w[frozen]) and torch.equal(m.bias[frozen], b[frozen])
            assert not torch.equal(m.weight[active], w[active])
            checked += int(frozen.sum())
        tracker.step()

    totals = [h["total"] for h in tracker.history]
    assert totals[0] == 0.0                        # paper rule: no velocity after one epoch
    assert 0.1 < totals[-1] < 0.99, totals         # a nontrivial fraction froze (about 0.7 here)
    assert checked > 50
    released = any((tracker.history[i]["layer"][n] > tracker.history[i + 1]["layer"][n])
                   for i in range(len(totals) - 1) for n in tracker.layers)
    assert released, "some neurons left equilibrium and were released"
    acc = (model(Xte).argmax(1) == yte).float().mean().item()
    assert acc > 0.8, acc                          # about 0.89 here


def _train_epoch_digits(model, opt, X, y, epoch):
    g = torch.Generator().manual_seed(epoch)
    perm = torch.randperm(len(X), generator=g)
    model.train()
    for i in range(0, len(X), 32):
        idx = perm[i:i + 32]
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()


# ----------------------------------------------------------------------------- distributed


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for broadcast in (False, True):
            model = _mlp(0)
            # each rank sees a different validation set, so local decisions differ
            val = torch.randn(16, 6, generator=torch.Generator().manual_seed(100 + rank))
            tr = NEqTracker(model, val, NEqConfig(rule="code", eps=0.004, broadcast=broadcast))
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
            tr.step()
            results[broadcast] = {n: f.clone() for n, f in tr.frozen().items()}
            results[(broadcast, "active")] = [m.active for m in model if hasattr(m, "active")]
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_freeze_the_same_neurons(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert any(not torch.equal(r0[False][n], r1[False][n]) for n in r0[False])   # local decisions differ
    for n in r0[True]:
        assert torch.equal(r0[True][n], r1[True][n])
        assert torch.equal(r0[True][n], r0[False][n])                              # rank 0's decision wins
    for a, b in zip(r0[(True, "active")], r1[(True, "active")]):
        assert (a is None and b is None) or torch.equal(a, b)


# ----------------------------------------------------------------------------- sparseticket.nn


@pytest.mark.parametrize("optimizer", ["MaskedSGD", "MaskedAdamW"])
def test_with_sparseticket_nn_modules_and_masked_optimizers(optimizer):
    stnn = pytest.importorskip("sparseticket.nn")
    optim = pytest.importorskip("sparseticket.optim")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 16),
                          nn.ReLU(), nn.Linear(16, 3))
    stnn.sparsify(model, amount=0.5, filter=lambda name, m: name == "3")
    stnn.enable_neq(model)
    x, y = torch.randn(48, 1, 6, 6), torch.randint(0, 3, (48,))
    tracker = NEqTracker(model, x[:16], NEqConfig(stochastic=0.5, seed=1))
    assert set(tracker.layers) == {"0", "3", "5"}                # conv, SparseLinear, DenseNEqLinear
    if optimizer == "MaskedSGD":
        opt = optim.MaskedSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    else:  # (decoupled weight decay: would move a frozen weight if it were applied to it)
        opt = optim.MaskedAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for epoch in range(3):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for i in range(0, 48, 16):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 16]), y[i:i + 16]).backward()
            opt.step()
        if epoch > 0:                                            # masks set by the previous step()
            params = dict(model.named_parameters())
            for name, frozen in tracker.frozen().items():
                assert int(frozen.sum()) == round(0.5 * frozen.numel())
                if name == "3":                                  # compact values: row of each kept weight
                    crow = model[3].crow.long()
                    rows = torch.repeat_interleave(torch.arange(16), crow[1:] - crow[:-1])
                    w, w0 = params["3.weight_values"], before["3.weight_values"]
                    assert torch.equal(w[frozen[rows]], w0[frozen[rows]])
                    assert not torch.equal(w[~frozen[rows]], w0[~frozen[rows]])
                else:
                    assert torch.equal(params[f"{name}.weight"][frozen], before[f"{name}.weight"][frozen])
                assert torch.equal(params[f"{name}.bias"][frozen], before[f"{name}.bias"][frozen]), name
        tracker.step()
        assert tracker.frozen_fraction()["total"] == (2 + 8 + 2) / 23          # round(0.5·O) per layer
        assert all(torch.equal(m.active.cpu(), ~tracker.frozen()[n]) for n, m in tracker.layers.items()
                   for m in [m.module])


def test_freeze_prefix_keeps_a_parameter_tied_to_a_later_layer():
    """conv2 (active) holds conv1's weight (fully frozen): freezing that Parameter would take
    conv2's share of its gradient away; it stays trainable and its gradient is unchanged."""
    import sparseticket.nn as stnn

    class TiedConvs(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.conv2.weight = self.conv1.weight

        def forward(self, x):
            return self.conv2(torch.relu(self.conv1(x)))

    torch.manual_seed(0)
    m = stnn.enable_neq(TiedConvs().double())
    m.conv1.set_active(torch.zeros(4, dtype=torch.bool))
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    m(x).square().sum().backward()
    ref = m.conv1.weight.grad.clone()
    assert ref.abs().sum() > 0
    m.zero_grad(set_to_none=True)
    with freeze_prefix(m) as prefix:
        assert [n for n, _ in prefix] == ["conv1"]
        assert m.conv1.weight.requires_grad                      # tied: left alone
        assert not m.conv1.bias.requires_grad                    # conv1's own: frozen
        m(x).square().sum().backward()
    torch.testing.assert_close(m.conv1.weight.grad, ref, rtol=0, atol=0)
    assert m.conv1.bias.grad is None


@pytest.mark.parametrize("bias", [True, False])
def test_neq_conv2d_with_frozen_channels_under_cpu_autocast(bias):
    """Frozen channels (the neuron-skipping Function) under torch.autocast('cpu', bfloat16):
    the output is nn.Conv2d's under autocast, bit for bit; the active rows get autocast's
    weight gradient, the frozen ones 0; parameters' gradients keep their dtype."""
    import sparseticket.nn as stnn

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1, bias=bias)
    neq = stnn.enable_neq(nn.Sequential(copy.deepcopy(conv)))[0]
    active = torch.tensor([True, False, True, True, False, False])
    neq.set_active(active)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, y = conv(x), neq(x2)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert torch.equal(y, y_ref)
    g = torch.randn(y.shape)
    y_ref.float().backward(g)
    y.float().backward(g)
    assert neq.weight.grad.dtype == torch.float32 and x2.grad.dtype == torch.float32
    torch.testing.assert_close(neq.weight.grad[active], conv.weight.grad[active], rtol=2e-2, atol=2e-2)
    assert neq.weight.grad[~active].abs().sum() == 0
    torch.testing.assert_close(x2.grad, x.grad, rtol=2e-2, atol=2e-2)
    if bias:
        torch.testing.assert_close(neq.bias.grad[active], conv.bias.grad[active], rtol=2e-2, atol=2e-2)
        assert neq.bias.grad[~active].abs().sum() == 0


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(5,), (2, 3)], ids=["2d", "3d"])
def test_neq_linear_with_frozen_rows_under_cpu_autocast(bias, lead):
    """DenseNEqLinear with frozen rows under torch.autocast('cpu', bfloat16) (the kernels are
    fp32/fp64, so the reduced-precision Function serves it): the output is nn.Linear's under
    autocast, bit for bit; active rows get autocast's weight gradient, frozen ones exactly
    0; the parameters' gradients keep their dtype."""
    import sparseticket.nn as stnn

    torch.manual_seed(0)
    lin = nn.Linear(7, 6, bias=bias)
    neq = stnn.enable_neq(nn.Sequential(copy.deepcopy(lin)))[0]
    active = torch.tensor([True, False, True, True, False, False])
    neq.set_active(active)
    x = torch.randn(*lead, 7, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, y = lin(x), neq(x2)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert torch.equal(y, y_ref)
    g = torch.randn(y.shape)
    y_ref.float().backward(g)
    y.float().backward(g)
    assert neq.weight.grad.dtype == torch.float32 and x2.grad.dtype == torch.float32
    torch.testing.assert_close(neq.weight.grad[active], lin.weight.grad[active], rtol=2e-2, atol=2e-2)
    assert neq.weight.grad[~active].abs().sum() == 0
    torch.testing.assert_close(x2.grad, x.grad, rtol=0, atol=0)
    if bias:
        torch.testing.assert_close(neq.bias.grad[active], lin.bias.grad[active], rtol=2e-2, atol=2e-2)
        assert neq.bias.grad[~active].abs().sum() == 0


@pytest.mark.parametrize("mode", ["sparse", "dense"])
@pytest.mark.parametrize("frozen", [False, True])
def test_ticket_layers_run_in_their_dtype_under_cpu_autocast(mode, frozen):
    """Under autocast a SparseLinear / SparseConv2d takes a bf16 input (from a plain layer
    autocast ran before it), casts it to its weights' fp32 and runs either path at fp32:
    the output, and every gradient, equals the same model's without autocast fed that
    bf16-rounded input."""
    import sparseticket.nn as stnn

    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 25, 12), nn.ReLU(),
                         nn.Linear(12, 4))
    stnn.sparsify(body, amount=0.5)
    if frozen:
        stnn.enable_neq(body)
        body[0].set_active(torch.arange(8) >= 3)
        body[3].set_active(torch.arange(12) % 2 == 0)
    for m in body.modules():
        if isinstance(m, stnn.TicketModule):
            m.mode = mode
    head = nn.Conv2d(3, 3, 1)  # a plain layer: autocast runs it in bf16
    ref_body = copy.deepcopy(body)
    x = torch.randn(2, 3, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = head(x)
        assert h.dtype == torch.bfloat16
        y = body(h)
    assert y.dtype == torch.float32
    y_ref = ref_body(h.detach().float())
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    g = torch.randn(y.shape)
    y.backward(g)
    y_ref.backward(g)
    for (n, p), q in zip(body.named_parameters(), ref_body.parameters()):
        assert p.grad.dtype == torch.float32, n
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_neq_layers_follow_autocasts_dtype_rules_with_frozen_neurons(kind):
    """Autocast leaves float64 and integer tensors alone: a float64 NEq layer with frozen
    neurons stays float64 under autocast (as nn.Linear / nn.Conv2d do, bit for bit), and an
    operand of another dtype than the weights' raises as it does for the plain layer instead
    of being cast to autocast's dtype."""
    import sparseticket.nn as stnn

    torch.manual_seed(0)
    plain = nn.Linear(7, 6) if kind == "linear" else nn.Conv2d(3, 6, 3)
    shape = (5, 7) if kind == "linear" else (2, 3, 6, 6)
    active = torch.tensor([True, False, True, True, False, True])
    for wdt, xdt in ((torch.float64, torch.float64), (torch.float32, torch.float64),
                     (torch.float32, torch.int64), (torch.float64, torch.float32)):
        ref = copy.deepcopy(plain).to(wdt)
        neq = stnn.enable_neq(nn.Sequential(copy.deepcopy(ref)))[0]
        neq.set_active(active)
        x = torch.randn(shape).to(xdt) if xdt.is_floating_point else torch.randint(-3, 3, shape)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            try:
                y_ref = ref(x)
            except RuntimeError:
                y_ref = None
            if y_ref is None:
                with pytest.raises((RuntimeError, ValueError)):
                    neq(x)
                continue
            y = neq(x)
        assert y.dtype == y_ref.dtype == torch.float64, (wdt, xdt)
        assert torch.equal(y, y_ref), (wdt, xdt)
    # the cases that must raise did (fp32 layer given fp64 or int64; fp64 layer given fp32)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises((RuntimeError, ValueError)):
        copy.deepcopy(plain)(torch.randn(shape, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_ticket_layers_under_autocast_cast_up_reduced_precision_only(kind):
    """Under autocast a ticket layer casts a bf16 / fp16 input up to its weights' dtype;
    a float64 or integer input into float32 weights raises as it does without autocast."""
    import sparseticket.nn as stnn

    torch.manual_seed(0)
    plain = nn.Linear(7, 6) if kind == "linear" else nn.Conv2d(3, 6, 3)
    model = stnn.sparsify(nn.Sequential(plain), amount=0.5)
    shape = (5, 7) if kind == "linear" else (2, 3, 6, 6)
    x = torch.randn(shape)
    want = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for dt in (torch.bfloat16, torch.float16):
            y = model(x.to(dt))
            assert y.dtype == torch.float32
            assert torch.equal(y, model[0].__class__.forward(model[0], x.to(dt).float()))
        assert torch.equal(model(x), want)
        for bad in (x.double(), x.long()):
            with pytest.raises(ValueError, match="dtype"):
                model(bad)
    for bad in (x.double(), x.long()):  # the same without autocast
        with pytest.raises(ValueError, match="dtype"):
            model(bad)
