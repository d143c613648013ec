"""``MaxPool2d``: nn.MaxPool2d whose 2x2, stride-2 case runs sparseticket's CPU kernel.

aten's max-pool for NCHW tensors branches per element, and on activations those branches
mispredict about half the time: a 2x2 pool of a 64x64x28x28 batch takes ~8 ms, as long
as a 90%-sparse 3x3 conv of it (2 threads). ``torch.ops.sparseticket.max_pool2x2`` is
branch-free (~0.2 ms; its backward ~0.3 ms against aten's ~0.7; bench/bench_pool.py) and
returns exactly what ``F.max_pool2d(x, 2)`` does: the same values, the same element kept
on ties and NaNs, so the same gradient, bit for bit (tests/test_pool.py).

It is a pooling layer, not a sparsity gain: the model registry (``sparseticket.lottery``)
builds its Conv/VGG nets with it for the sparse run and the dense baseline alike.
Anything else (other window, stride, padding, dilation, ``ceil_mode``,
``return_indices``, an input that is not NCHW-contiguous, such as channels-last, whose
aten pool is vectorised already, a GPU tensor, no compiled kernel) runs
``nn.MaxPool2d.forward``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops

__all__ = ["MaxPool2d"]


def _is(v, n: int) -> bool:
    """v (an int or a pair, as nn.MaxPool2d stores its options) is n in both dimensions"""
    return v == n if isinstance(v, int) else isinstance(v, (tuple, list)) and tuple(v) == (n, n)


class MaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d (same arguments, same results); 2x2 windows at stride 2 run the
    branch-free kernel on CPU tensors.

    ``relu_after`` (set by ``sparsify(..., fuse_relu=True)`` where a SparseConv2d, an
    nn.ReLU and this pool follow each other in an nn.Sequential; the ReLU becomes a
    FusedReLU placeholder): the pool applies the ReLU to its output instead. A max-pool
    and a ReLU commute exactly (the same values, the same element kept in each window
    whenever the gradient through it is not zero), so outputs and gradients are those of
    ReLU-then-pool, while the ReLU's backward runs on the pooled tensor, a quarter of the
    conv's output (Conv-4's sparse step at 10.8% kept: 53.7 -> 51.9 ms, `python
    bench/ab_step_paths.py --model conv4 ...`; docs/PERF_LOG.md, session 23).
    """

    relu_after: bool = False

    def _fast(self, x: Tensor) -> bool:
        return (_is(self.kernel_size, 2) and _is(self.stride, 2)  # (nn.MaxPool2d sets stride=None to the kernel)
                and _is(self.padding, 0) and _is(self.dilation, 1) and not self.ceil_mode
                and not self.return_indices and x.dim() == 4 and x.device.type == "cpu" and x.is_contiguous()
                and x.dtype in (torch.float32, torch.float64) and x.shape[2] >= 2 and x.shape[3] >= 2
                and ops.BACKENDS.get("cpu") == "c++" and "max_pool2x2" not in ops.STALE_OPS)

    def forward(self, x: Tensor) -> Tensor:
        if self.relu_after and self.return_indices:
            # (never set so by sparsify) ReLU first, as written: pooled after it, a window of
            # negative values returns the index of its first element (the tie of zeros), not
            # that of its largest negative value
            return super().forward(torch.relu(x))
        y = torch.ops.sparseticket.max_pool2x2(x)[0] if self._fast(x) else super().forward(x)
        return torch.relu(y) if self.relu_after else y

    def extra_repr(self) -> str:
        return super().extra_repr() + (", relu_after=True" if self.relu_after else "")
