#!/usr/bin/env python
"""How much of a sparse LeNet-300-100 training step is the framework, not the kernels: the
step as a user runs it (modules, autograd, MaskedSGD) against the same kernels called by
hand in one Python function (no autograd graph, no module calls, one fused update).

    python bench/framework_overhead.py --densities 0.03,0.2,0.5

Both contenders run the same ticket ops (spmm forward, sddmm kept-weight gradient, spmm_t
input gradient, masked_sgd_) on the same sparsified model, 'sparse' path forced. The hand
version first checks that its gradients equal autograd's (rtol 1e-4), then the two alternate in
blocks of steps (order reversed every round); the table has the median microseconds per
step and their ratio. The gap bounds what any restructuring of the step around the same
kernels could save. It is not in the layer count alone: in session 6 a
torch.autograd.Function running the three layers and their ReLUs as one node (same ops,
bit-identical gradients; not landed) ran at 0.95-1.00x of the module-by-module step, its
own Python cost eating what the fewer nodes saved. The rest is spread over the autograd
engine, the loss's two nodes, the optimizer's Python (MaskedSGD.step ~33 us of which the
fused update is ~10) and module calls. A measurement of an idea, not a contender of the
project's benchmarks: nothing here is written to a CSV.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--densities", default="0.03,0.2,0.5")
    p.add_argument("--batch-size", type=int, default=60)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--steps", type=int, default=200, help="steps per block")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()

    import sparseticket.nn as stnn
    from sparseticket import runtime
    from sparseticket.lottery.models import get_model
    from sparseticket.optim import MaskedSGD

    ops = torch.ops.sparseticket
    torch.set_num_threads(a.threads)
    runtime.retain_freed_memory()
    bs = a.batch_size
    print(f"{'density':>8} {'modules+autograd us':>20} {'by hand us':>11} {'ratio':>6}")
    for dens in [float(d) for d in a.densities.split(",")]:
        torch.manual_seed(0)
        m = get_model("lenet_300_100", (1, 28, 28), 10)
        masks = {n: torch.rand_like(mod.weight) < dens for n, mod in m.named_modules()
                 if isinstance(mod, torch.nn.Linear)}
        stnn.sparsify(m, masks=masks, mode="sparse")
        layers = [mod for mod in m.modules() if isinstance(mod, stnn.SparseLinear)]
        assert len(layers) == 3 and isinstance(m[2], torch.nn.ReLU) and isinstance(m[4], torch.nn.ReLU)
        opt = MaskedSGD(m.parameters(), lr=0.01, momentum=0.9)
        params = [q for layer in layers for q in (layer.weight_values, layer.bias)]
        bufs = [torch.zeros_like(q) for q in params]
        x, y = torch.randn(bs, 1, 28, 28), torch.randint(0, 10, (bs,))

        def user_step():
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def hand_grads():
            with torch.no_grad():
                h = x.reshape(bs, -1)
                acts = [h]
                for i, layer in enumerate(layers):
                    b = layer._buffers
                    h = ops.spmm.default(h, layer.weight_values, b["crow"], b["col"], layer.bias)
                    if i < len(layers) - 1:
                        h = h.relu_()
                    acts.append(h)
                g = torch.softmax(h, 1)  # d(mean cross-entropy)/d(logits)
                g[torch.arange(bs), y] -= 1
                g /= bs
                grads = []
                for i in reversed(range(len(layers))):
                    layer, b, a_in = layers[i], layers[i]._buffers, acts[i]
                    grads = [ops.sddmm.default(g, a_in, b["crow"], b["col"], None), g.sum(0)] + grads
                    if i > 0:
                        g = ops.spmm_t.default(g, layer.weight_values, b["ccol"], b["row"], b["perm"])
                        g = g.mul_(a_in > 0)
                return grads

        def hand_step():
            grads = hand_grads()
            with torch.no_grad():
                n = len(params)
                ops.masked_sgd_.default(params, grads, bufs, [None] * n, [None] * n, [None] * n, [False] * n,
                                        0.01, 0.9, 0.0, 0.0, False, False)

        # the hand version computes what autograd computes
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()
        for q, g in zip(params, hand_grads()):
            assert torch.allclose(q.grad, g, rtol=1e-4, atol=1e-6), "hand gradients differ from autograd's"

        for _ in range(30):
            user_step()
            hand_step()
        res = {user_step: [], hand_step: []}
        for r in range(a.rounds):
            for f in ((user_step, hand_step) if r % 2 == 0 else (hand_step, user_step)):
                t = time.perf_counter()
                for _ in range(a.steps):
                    f()
                res[f].append((time.perf_counter() - t) / a.steps * 1e6)
        u, h = statistics.median(res[user_step]), statistics.median(res[hand_step])
        print(f"{dens:8.3f} {u:20.0f} {h:11.0f} {u / h:6.2f}")


if __name__ == "__main__":
    main()
