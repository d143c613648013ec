"""torch.compile(fullgraph=True) traces the ops (fake kernels, autograd, the mutating
optimizer op) and computes what eager computes.

Compilation dominates the cost on two cores, so the models are tiny and there are two
tests: one whole training step (forward, torch.autograd.grad, masked_sgd_) in a single
graph with the cheap "aot_eager" backend, changing the batch size to exercise the fake
kernels with symbolic shapes; and the usual split (compiled forward, .backward() through
the compiled backward, compiled optimizer step) with inductor, the backend users get.
"""
import pytest
import torch
from helpers import ST, assert_close, make_active, make_mask, make_ticket, randn

import sparseticket

LR, MOM, DAMP, WD = 0.1, 0.9, 0.0, 5e-4
I, H, O = 12, 10, 6
TOL = 1e-5  # float32, relative to magnitude; inductor may reorder the bias-grad sums


def _model(gen):
    w1, m1 = randn(H, I, gen=gen), make_mask(H, I, 0.7, gen, holes=True)
    t1 = make_ticket(w1, m1)
    return dict(t1=t1, v1=t1.values.clone(), b1=randn(H, gen=gen), a1=make_active(H, gen),
                w2=randn(O, H, gen=gen), b2=randn(O, gen=gen), a2=make_active(O, gen))


def _params(m):
    return [m["v1"], m["b1"], m["w2"], m["b2"]]


def _masks(m):
    t1 = m["t1"]
    keeps = [None, None, None, None]
    actives = [m["a1"], m["a1"], m["a2"], m["a2"]]
    row_ptrs = [t1.crow, None, None, None]
    return keeps, actives, row_ptrs


def _forward(m, x, target, v1, b1, w2, b2):
    h = sparseticket.sparse_linear(x, m["t1"], b1, m["a1"], values=v1)
    y = sparseticket.neq_linear(torch.relu(h), w2, b2, m["a2"])
    return ((y - target) ** 2).mean()


def _step(m, params, grads, bufs, fresh):
    keeps, actives, row_ptrs = _masks(m)
    ST.masked_sgd_(params, grads, bufs, keeps, actives, row_ptrs, [fresh] * 4, LR, MOM, DAMP, WD, False, False)


def _eager_run(m, batches):
    params = [p.clone() for p in _params(m)]
    bufs = [torch.zeros_like(p) for p in params]
    losses = []
    for k, (x, target) in enumerate(batches):
        ps = [p.detach().requires_grad_() for p in params]
        loss = _forward(m, x, target, *ps)
        grads = torch.autograd.grad(loss, ps)
        with torch.no_grad():
            _step(m, params, list(grads), bufs, k == 0)
        losses.append(loss.detach())
    return params, bufs, losses


def _batches(gen, sizes):
    return [(randn(b, I, gen=gen), randn(b, O, gen=gen)) for b in sizes]


def _compare(got, expected):
    (p, b, loss), (pe, be, losse) = got, expected
    for j in range(len(p)):
        assert_close(p[j], pe[j], tol=TOL, what=f"param {j}")
        assert_close(b[j], be[j], tol=TOL, what=f"buffer {j}")
    assert_close(torch.stack(loss), torch.stack(losse), tol=TOL, what="loss")


@pytest.mark.skipif(not hasattr(torch._dynamo.config, "trace_autograd_ops"),
                    reason="this torch cannot trace torch.autograd.grad into a graph")
def test_compiled_train_step_single_graph(gen):
    m = _model(gen)
    batches = _batches(gen, [8, 8, 5, 3])  # a new batch size recompiles with a symbolic batch

    def train_step(x, target, v1, b1, w2, b2, buf_v1, buf_b1, buf_w2, buf_b2, fresh: bool):
        ps = [v1, b1, w2, b2]
        leaves = [p.detach().requires_grad_() for p in ps]
        loss = _forward(m, x, target, *leaves)
        grads = torch.autograd.grad(loss, leaves)
        with torch.no_grad():
            _step(m, ps, list(grads), [buf_v1, buf_b1, buf_w2, buf_b2], fresh)
        return loss.detach()

    torch._dynamo.reset()
    compiled = torch.compile(train_step, fullgraph=True, backend="aot_eager")
    params = [p.clone() for p in _params(m)]
    bufs = [torch.zeros_like(p) for p in params]
    losses = []
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        for k, (x, target) in enumerate(batches):
            losses.append(compiled(x, target, *params, *bufs, k == 0))
    _compare((params, bufs, losses), _eager_run(m, batches))
    assert not torch.equal(params[0], m["v1"])  # the compiled step really updated in place


def test_compiled_forward_backward_and_step_inductor(gen):
    m = _model(gen)
    batches = _batches(gen, [8, 8, 8])

    @torch.compile(fullgraph=True, backend="inductor")
    def loss_fn(x, target, v1, b1, w2, b2):
        return _forward(m, x, target, v1, b1, w2, b2)

    @torch.compile(fullgraph=True, backend="inductor")
    def opt_step(params, grads, bufs, fresh: bool):
        _step(m, params, grads, bufs, fresh)

    torch._dynamo.reset()
    params = [p.clone().requires_grad_() for p in _params(m)]
    bufs = [torch.zeros_like(p) for p in params]
    losses = []
    for k, (x, target) in enumerate(batches):
        for p in params:
            p.grad = None
        loss = loss_fn(x, target, *params)
        loss.backward()
        with torch.no_grad():
            opt_step(params, [p.grad for p in params], bufs, k == 0)
        losses.append(loss.detach())
    _compare(([p.detach() for p in params], bufs, losses), _eager_run(m, batches))
    # frozen rows of the dense layer were never touched by the compiled step
    assert torch.equal(params[2].detach()[~m["a2"]], m["w2"][~m["a2"]])
