"""SparseConv2d (ticket weight; direct sparse conv, im2col + sparse matmul for groups > 1, or oneDNN
dense conv) and NEqConv2d."""
from __future__ import annotations

import weakref
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from . import _mode
from ._common import REDUCED_FLOATS, TicketModule, TicketToDense, autocast_device, autocast_operand, where
from .linear import DenseNEqBase, _init_neq, _random_mask, _weight_and_mask

_sparse_linear = torch.ops.sparseticket.sparse_linear
_spmm = torch.ops.sparseticket.spmm
_spmm_t = torch.ops.sparseticket.spmm_t
_sddmm = torch.ops.sparseticket.sddmm
_sparse_conv2d = torch.ops.sparseticket.sparse_conv2d
_sparse_conv2d_relu = torch.ops.sparseticket.sparse_conv2d_relu


def _padding_plan(padding, padding_mode: str, kernel_size, dilation) -> Tuple[Optional[List[int]], str, Tuple[int, int]]:
    """(explicit F.pad amounts or None, F.pad mode, symmetric conv padding) matching nn.Conv2d."""
    if isinstance(padding, str):
        if padding == "valid":
            rev = [0, 0, 0, 0]
        else:  # 'same': nn.Conv2d's split, larger half on the right/bottom
            rev = []
            for d, k in zip(reversed(dilation), reversed(kernel_size)):
                total = d * (k - 1)
                rev += [total // 2, total - total // 2]
    else:
        p = _pair(padding)
        rev = [p[1], p[1], p[0], p[0]]
    if padding_mode != "zeros":
        return (rev if any(rev) else None), padding_mode, (0, 0)
    if rev[0] == rev[1] and rev[2] == rev[3]:
        return None, "constant", (rev[2], rev[0])
    return rev, "constant", (0, 0)


class SparseConv2d(TicketModule):
    """Drop-in nn.Conv2d (stride, padding incl. 'same'/'valid', dilation, groups, bias,
    padding_mode) whose weight [out, in/groups, kh, kw] is a ticket.

    Sparse path, groups == 1: the direct sparse convolution ``sparseticket::sparse_conv2d``
    (no im2col; each kept tap is a shifted axpy over a register tile of output rows; NCHW
    output). Groups > 1: im2col then the ticket matmul on the [N·L, kh·kw·C] matrix, whose
    ticket is the block-diagonal [out, kh·kw·C] matrix (each row's columns shifted to its
    group's input channels), so all groups run in one matmul with no wasted work; output
    channels-last strided (values identical). Dense path: oneDNN's ``F.conv2d`` with the
    masked dense weight. The choice is measured per shape like SparseLinear's.

    ``activation='relu'`` (``sparsify(..., fuse_relu=True)``): the layer computes
    relu(conv(x)), on the direct sparse path as one op whose kernel writes the ReLU'd
    output (``sparseticket::sparse_conv2d_relu``) and one autograd node.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *, density: float = 1.0,
                 mode: str = "auto", device=None, dtype=None):
        super().__init__()
        ref = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                        padding_mode, device=device, dtype=dtype)
        self._copy_options(ref)
        self._init_ticket(ref.weight, _random_mask(ref.weight.shape, density, ref.weight.device), ref.bias, mode)

    def _copy_options(self, conv: nn.Conv2d) -> None:
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        self.dilation, self.groups, self.padding_mode = tuple(conv.dilation), conv.groups, conv.padding_mode
        self._pre_pad, self._pad_mode, self._pad = _padding_plan(self.padding, self.padding_mode, self.kernel_size,
                                                                 self.dilation)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, mask: Optional[Tensor] = None, *, mode: str = "auto",
                   name: Optional[str] = None) -> "SparseConv2d":
        """A SparseConv2d computing ``conv`` with its weight masked by ``mask`` (weight's shape).

        ``mask=None``: the torch.nn.utils.prune mask if any, else ``weight != 0``.
        """
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._st_name = name
        if getattr(conv, "transposed", False) or len(conv.kernel_size) != 2:
            raise TypeError(f"sparseticket: {where(conv, name)}: only nn.Conv2d converts to SparseConv2d")
        self._copy_options(conv)
        weight, mask = _weight_and_mask(conv, mask)
        self._init_ticket(weight, mask, conv.bias, mode)
        a = getattr(conv, "active", None)
        if a is not None:
            self.set_active(a)
        self.train(conv.training)
        return self

    def to_dense(self) -> nn.Conv2d:
        """A dense nn.Conv2d with the masked weight (an NEqConv2d if channels are frozen). A
        fused activation is not part of it: ``densify`` puts the nn.ReLU back."""
        p = self.weight_values
        frozen = self._buffers.get("active") is not None
        cls = NEqConv2d if frozen else nn.Conv2d
        conv = cls(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
                   self.groups, self.bias is not None, self.padding_mode, device=p.device, dtype=p.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.dense_weight())
            conv.weight.requires_grad_(p.requires_grad)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
                conv.bias.requires_grad_(self.bias.requires_grad)
        if frozen:
            conv.set_active(self.active)
        conv.train(self.training)
        return conv

    _layout_kind = "Conv2d"

    # -- structure
    def _weight_shape(self):
        return (self.out_channels, self.in_channels // self.groups) + self.kernel_size

    def ticket_layout(self) -> str:
        return super().ticket_layout() + (f" groups={self.groups}" if self.groups > 1 else "")

    def _check_cols(self, rows: Tensor, col: Tensor) -> Optional[str]:
        if self.groups == 1:
            return None
        Cg, Og = self.in_channels // self.groups, self.out_channels // self.groups
        if bool(((col % self.in_channels) // Cg != rows // Og).any()):
            return (f"an entry reads an input channel outside its output channel's group (groups={self.groups}): "
                    f"a ticket of an ungrouped conv?")
        return None

    def _ticket_cols(self) -> int:
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    # Ticket columns are ordered (tap, input channel): column (i*kw + j)*C + c multiplies
    # x[c, h*s + i*d, w*s + j*d], which is the layout of a channels-last im2col (runs of C
    # contiguous values per tap). A grouped conv's ticket is the block-diagonal [O, kh*kw*C]
    # matrix, so all groups run in one matmul with no wasted work.
    def _ticket_rows_2d(self, t: Tensor) -> Tensor:
        return t.permute(0, 2, 3, 1).reshape(self._dense2d_shape())  # [O, kh, kw, C/g]

    def _ticket_col(self, rows: Tensor, local: Tensor) -> Optional[Tensor]:
        if self.groups == 1:
            return None
        Cg, Og = self.in_channels // self.groups, self.out_channels // self.groups
        return (local // Cg) * self.in_channels + (rows // Og) * Cg + local % Cg

    def _natural_col(self, rows: Tensor, col: Tensor) -> Optional[Tensor]:
        K = self.kernel_size[0] * self.kernel_size[1]
        Cg = self.in_channels // self.groups
        return ((col % self.in_channels) % Cg) * K + col // self.in_channels

    # -- execution
    def _prepare(self, x: Tensor) -> Tensor:
        if self._pre_pad is not None:
            x = F.pad(x, self._pre_pad, mode=self._pad_mode)
        return x

    def _out_hw(self, h: int, w: int) -> Tuple[int, int]:
        (kh, kw), (sh, sw), (dh, dw), (ph, pw) = self.kernel_size, self.stride, self.dilation, self._pad
        return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def _run_sparse(self, x: Tensor, values: Tensor, bias: Optional[Tensor]) -> Tensor:
        b = self._buffers
        if self.groups == 1:
            op = _sparse_conv2d if self.activation is None else _sparse_conv2d_relu
            active = b["active"]  # read once: the op and the record get the same mask
            y = op(x, values, b["crow"], b["col"], b["ccol"], b["row"], b["perm"], bias, active,
                   self.kernel_size, self.stride, self._pad, self.dilation)
            _record_source_call(self, y, active)
            return y
        y = self._run_grouped(x, values, bias)
        return y if self.activation is None else torch.relu(y)

    def _pointwise(self) -> bool:
        """A 1x1, stride-1, unpadded conv: its im2col is a transpose, one call for the batch."""
        return self.kernel_size == (1, 1) and self.stride == (1, 1) and self._pad == (0, 0)

    def _run_grouped(self, x: Tensor, values: Tensor, bias: Optional[Tensor]) -> Tensor:
        b = self._buffers
        N, C, H, W = x.shape
        oh, ow = self._out_hw(H, W)
        pointwise = self._pointwise()
        if not pointwise and not torch.compiler.is_compiling():
            geom = (self.kernel_size, self.stride, self._pad, self.dilation, oh, ow)
            # permuted outside the Function: autograd forbids writing in place (ReLU(inplace=True))
            # into a view a custom Function returns
            return _BlockedSparseConv2d.apply(x, values, bias, b["crow"], b["col"], b["ccol"], b["row"], b["perm"],
                                              b["active"], geom).permute(0, 3, 1, 2)
        if pointwise:
            a = x.permute(0, 2, 3, 1).reshape(N * H * W, C)  # 1x1 conv: im2col is a transpose
        else:  # one graph-friendly im2col of the whole batch (no Python loop in the trace)
            a = _Im2ColNHWC.apply(x, self.kernel_size, self.stride, self._pad, self.dilation, oh, ow)
        y = _sparse_linear(a, values, b["crow"], b["col"], b["ccol"], b["row"], b["perm"], bias, b["active"])
        return y.view(N, oh, ow, self.out_channels).permute(0, 3, 1, 2)

    def _dense_weight_of(self, values: Tensor) -> Tensor:
        O, K = self._dense2d_shape()
        if values.shape[0] == O * K:  # full ticket: values are W in (out, kh, kw, in/groups) order
            kh, kw = self.kernel_size
            # contiguous: a channels-last weight view made oneDNN return a channels-last
            # output, unlike nn.Conv2d (and `y.view(n, -1)` then fails); the copy is one
            # pass over the weight
            return values.view(O, kh, kw, K // (kh * kw)).permute(0, 3, 1, 2).contiguous()
        b = self._buffers
        w = TicketToDense.apply(values, b["flat"], O, K)
        return w.view(self._weight_shape())

    def _run_dense(self, x: Tensor, values: Tensor, bias: Optional[Tensor], needed: Optional[Tensor] = None) -> Tensor:
        """oneDNN's conv on the ticket's dense weight; ``needed``: the input channels whose
        gradient is computed (cut_frozen_outputs; None: all)."""
        w = self._dense_weight_of(values)
        active = self._buffers["active"]
        if active is None and needed is None:
            y = F.conv2d(x, w, bias, self.stride, self._pad, self.dilation, self.groups)
        else:
            ran = active if active is not None else torch.ones(self.out_channels, dtype=torch.bool, device=x.device)
            y = neq_conv2d(x, w, bias, ran, self.stride, self._pad, self.dilation, self.groups, needed)
            _record_source_call(self, y, active)
        return y if self.activation is None else torch.relu(y)

    def forward(self, x: Tensor) -> Tensor:
        amp = autocast_device(x)
        if amp is not None:
            with torch.autocast(amp, enabled=False):
                return self.forward(x.to(self.weight_values.dtype) if x.dtype in REDUCED_FLOATS else x)
        given = x
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.dtype != self.weight_values.dtype:
            raise ValueError(f"sparseticket: {where(self)}: input has shape {tuple(x.shape)} and dtype {x.dtype}; "
                             f"expected [N, {self.in_channels}, H, W] of {self.weight_values.dtype}")
        # nn.Conv2d answers in the input's memory format; the kernels' natural outputs differ
        # (the direct kernel writes NCHW, the im2col path NHWC, oneDNN follows the input)
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
            else torch.contiguous_format
        x = self._prepare(x)
        oh, ow = self._out_hw(x.shape[2], x.shape[3])
        if oh <= 0 or ow <= 0:
            raise ValueError(f"sparseticket: {where(self)}: input of spatial size {tuple(x.shape[2:])} (after "
                             f"padding) is smaller than the dilated kernel")
        path = self._path(x)
        if path == "sparse":
            y = self._run_sparse(x, self.weight_values, self.bias)
            if self in _INPUT_CUTS:  # a cut's consumer: only the dense path cuts
                self.__dict__["last_input_cut"] = None
        else:
            # the cut is decided on the input as the caller gave it (before padding)
            needed = _input_cut(self, given) if self.groups == 1 and self in _INPUT_CUTS else None
            y = self._run_dense(x, self.weight_values, self.bias, needed)
        y = y.contiguous(memory_format=fmt)  # a no-op when it already is
        return y.squeeze(0) if unbatched else y

    def _key(self, x: Tensor) -> tuple:
        return (("conv2d", self.in_channels, self.out_channels, self.kernel_size, self.stride, self._pad,
                 self.dilation, self.groups, x.shape[2], x.shape[3], _mode.nnz_bucket(self.nnz),
                 _mode.batch_bucket(x.shape[0]), self.activation)
                + _mode.common_key(x.dtype, x.device, self._grad_key(x)))

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s + ", " + self._repr_common()


class NEqConv2d(DenseNEqBase, nn.Conv2d):
    """nn.Conv2d with NEq freezing: frozen output channels (``active`` False) get no
    weight/bias gradient, and their weight gradient is never computed; the input gradient
    still flows through them. State dict keys are nn.Conv2d's plus ``active`` when set."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _init_neq(self)

    def _n_out(self) -> int:
        return self.out_channels

    def forward(self, x: Tensor) -> Tensor:
        mask = self._buffers["active"]  # read once: the op and the record get the same mask
        needed = _input_cut(self, x)
        if mask is None and needed is None:
            return super().forward(x)
        active = mask
        if active is None:
            active = torch.ones(self.out_channels, dtype=torch.bool, device=x.device)
        pre, pad_mode, pad = _padding_plan(self.padding, self.padding_mode, self.kernel_size, self.dilation)
        if pre is not None:
            x = F.pad(x, pre, mode=pad_mode)
        unbatched = x.dim() == 3
        y = neq_conv2d(x.unsqueeze(0) if unbatched else x, self.weight, self.bias, active, self.stride, pad,
                       self.dilation, self.groups, needed)
        _record_source_call(self, y, mask)
        return y.squeeze(0) if unbatched else y

# ----------------------------------------------------------------------------- cut_frozen_outputs bookkeeping
#
# A consumer's input gradient may skip the source's frozen channels only when nothing reads
# the gradient there. The source call's own backward (an NEq-aware op) reads its output
# gradient at the channels active *in that call* only, and its input gradient is not
# needed when the call's input requires no grad. So the consumer must find, in its
# input's autograd graph, the very node of the source's call, with the mask that call
# used; nothing about the source module's current state (its mask now, who else uses its
# parameters) is trusted.


class _SourceRecord:
    """``call``: the last call of a cut's source, as (its output's autograd node, the
    ``active`` tensor it ran with), or None; one tuple, replaced whole, so a reader never
    pairs one call's node with another's mask. Holding the node keeps its Python object,
    compared by identity, the same. ``users``: how many open contexts registered the module."""

    __slots__ = ("users", "call")

    def __init__(self):
        self.users, self.call = 0, None


#: source module -> _SourceRecord; set by sparseticket.neq.cut_frozen_outputs, filled by
#: the source's forward (_record_source_call). Keyed by the live module: copies are not sources.
_CUT_SOURCES: "weakref.WeakKeyDictionary[nn.Module, _SourceRecord]" = weakref.WeakKeyDictionary()

#: consumer (an NEqConv2d, or a SparseConv2d, which cuts on its dense path) -> the source
#: layers it is cut against, innermost last; set by
#: sparseticket.neq.cut_frozen_outputs. Keyed by the live module, so a copy made inside
#: the block (deepcopy, pickling) is not cut.
_INPUT_CUTS: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()


def _input_cut(consumer: nn.Module, x: Tensor) -> Optional[Tensor]:
    """The input channels of ``consumer`` (an NEqConv2d, or a SparseConv2d on its dense
    path) whose gradient anything reads, under ``sparseticket.neq.cut_frozen_outputs``:
    the active channels of the source layer's call that produced ``x`` (the consumer's
    input as its forward got it), when ``_reaches_source_call`` proves ``x`` is that call's
    output through channel-wise steps and the call's own input needed no gradient. None
    (every channel) otherwise. Recorded in ``last_input_cut`` (the fraction of input
    channels whose gradient is computed, or None) for the FLOP counter."""
    needed = None
    stack = _INPUT_CUTS.get(consumer)
    if stack and _cut_allowed():
        rec = _CUT_SOURCES.get(stack[-1])
        call = None if rec is None else rec.call  # one read: (node, mask) stay a pair
        # (the width test is a guard: the walk only accepts steps that keep the channels)
        if (call is not None and x.dim() >= 3 and call[1].numel() == x.shape[-3]
                and not bool(call[1].all()) and _reaches_source_call(x, call[0])):
            needed = call[1]
    consumer.__dict__["last_input_cut"] = None if needed is None else int(needed.sum()) / needed.numel()
    return needed


def _cut_allowed() -> bool:
    """False where a forward's graph may be rebuilt later from state that can change: inside
    a backward (a checkpoint's recomputation) and under saved-tensor hooks (non-reentrant
    checkpointing, offloading), where a source's saved mask could be recomputed from a
    newer one. Then nothing is recorded or cut, in the forward and in any recomputation
    alike, so both save the same tensors. Also off without grad, under torch.compile and
    while torch.jit.trace records (a trace would keep one call's cut as a constant)."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if torch._C._current_graph_task_id() != -1:
        return False
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(True) is None


def _record_source_call(module: nn.Module, y: Tensor, active: Optional[Tensor]) -> None:
    """Called by SparseConv2d / NEqConv2d with the output of their NEq-aware op and the mask
    it ran with; a dictionary lookup unless ``module`` is a registered source."""
    rec = _CUT_SOURCES.get(module)
    if rec is None:
        return
    if active is not None and y.grad_fn is not None and _cut_allowed():
        rec.call = (y.grad_fn, active)
    else:
        rec.call = None


#: Autograd nodes that may stand between a cut's source and its consumer: each maps
#: channel c of its one differentiable input to channel c of its output (elementwise ops,
#: 2-D pooling, dropout's mask multiply) and holds no parameter (a node with a second
#: differentiable input, e.g. a BatchNorm's or PReLU's weight or another branch, has two
#: next functions and stops the walk).
_CHANNELWISE_NODES = frozenset({
    "ReluBackward0", "ReluBackward1", "ThresholdBackward0", "ThresholdBackward1", "LeakyReluBackward0",
    "LeakyReluBackward1", "EluBackward0", "EluBackward1", "GeluBackward0", "SiluBackward0", "SigmoidBackward0",
    "TanhBackward0", "HardtanhBackward0", "HardtanhBackward1", "Relu6Backward0", "HardswishBackward0",
    "MishBackward0", "SoftplusBackward0", "MaxPool2DWithIndicesBackward0", "AvgPool2DBackward0",
    "AdaptiveAvgPool2DBackward0", "AdaptiveMaxPool2DBackward0", "NativeDropoutBackward0", "MulBackward0",
    "DivBackward0", "AddBackward0", "SubBackward0", "CloneBackward0",
    "GeneratedBackwardFor_sparseticket_max_pool2x2_defaultBackward",
})


#: C++ autograd nodes (``CppFunction``s, told apart by ``name()``) that are channel-wise
#: too: sparseticket's 2x2 max-pool (csrc/autograd_conv.cpp)
_CHANNELWISE_CPP_NODES = ("::MaxPool2x2Function>",)


def _channelwise(node) -> bool:
    name = type(node).__name__
    if name == "CppFunction":
        return node.name().endswith(_CHANNELWISE_CPP_NODES)
    return name in _CHANNELWISE_NODES


def _reaches_source_call(x: Tensor, source_node, max_steps: int = 16) -> bool:
    """Whether ``x``'s autograd graph leads, through channel-wise single-input nodes
    (_CHANNELWISE_NODES), to ``source_node`` (the recorded call of the source, compared by
    identity), and that call's input (its first edge) needed no gradient. Anything else
    (another branch, a parameter on the way, an op that mixes channels, another call of
    the source or of an op sharing its parameters) is False."""
    node = x.grad_fn
    for _ in range(max_steps):
        if node is None:
            return False
        if node is source_node:
            return node.next_functions[0][0] is None
        nxt = [f for f, _ in node.next_functions if f is not None]
        if len(nxt) != 1 or not _channelwise(node):
            return False
        node = nxt[0]
    return False


# ----------------------------------------------------------------------------- im2col


#: bytes of im2col patches per kernel call. Swept 0.5-16 MB on 3x3 convs of Conv-4 sizes
#: (batch 64, 2 threads, 2% and 10% density): 4 MB was fastest or within 10% in 5 of 6
#: (e.g. 64x64x28x28 at 2%: 136 / 98 / 73 / 56 / 65 / 90 ms for 0.5 / 1 / 2 / 4 / 8 / 16 MB).
BLOCK_BYTES = 4 << 20


def _blocks(N: int, oh: int, ow: int, row_bytes: int):
    """(n0, n1, h0, h1) blocks of output positions whose patches take about BLOCK_BYTES."""
    per_image = oh * ow * row_bytes
    if per_image <= BLOCK_BYTES:
        step = max(1, BLOCK_BYTES // max(per_image, 1))
        return [(n, min(n + step, N), 0, oh) for n in range(0, N, step)]
    hstep = max(1, BLOCK_BYTES // max(ow * row_bytes, 1))
    return [(n, n + 1, h, min(h + hstep, oh)) for n in range(N) for h in range(0, oh, hstep)]


def _patches(xp: Tensor, n0: int, n1: int, h0: int, h1: int, geom) -> Tensor:
    """im2col rows of output block [n0:n1, h0:h1, :] from padded NHWC ``xp``: [rows, kh·kw·C]."""
    (kh, kw), (sh, sw), _, (dh, dw), _, ow = geom
    sN, sH, sW, sC = xp.stride()
    C = xp.shape[3]
    base = xp[n0:n1, h0 * sh:]
    return base.as_strided((n1 - n0, h1 - h0, ow, kh, kw, C), (sN, sh * sH, sw * sW, dh * sH, dw * sW, sC),
                           base.storage_offset()).reshape(-1, kh * kw * C)


class _BlockedSparseConv2d(torch.autograd.Function):
    """Sparse conv through im2col one L2-sized block of output positions at a time (used
    for groups > 1; groups == 1 runs the direct kernel, sparseticket::sparse_conv2d).

    Materialising the whole batch's patches (64x64x28x28, 3x3: 115 MB) made every
    kernel stream it from DRAM: forward + backward took 217 ms at 2% density against
    62 ms for oneDNN's dense conv; block by block the patches stay in cache (56 ms), and
    backward rebuilds them instead of saving them (saved: the padded input only). At 10%
    density it is still 2x slower than oneDNN (128 vs 64 ms: the sparse kernels run at
    ~12 GFLOP/s on these tall, narrow operands against oneDNN's ~170), so convs picked the
    dense path; groups == 1 now runs the direct kernel instead.
    """

    @staticmethod
    def forward(ctx, x, values, bias, crow, col, ccol, row, perm, active, geom):
        (kh, kw), _, (ph, pw), _, oh, ow = geom
        N, C, H, W = x.shape
        xp = x.permute(0, 2, 3, 1)
        xp = F.pad(xp, (0, 0, pw, pw, ph, ph)) if (ph or pw) else xp.contiguous()
        O = crow.shape[0] - 1
        y = x.new_empty(N, oh, ow, O)
        for n0, n1, h0, h1 in _blocks(N, oh, ow, kh * kw * C * x.element_size()):
            a = _patches(xp, n0, n1, h0, h1, geom)
            y[n0:n1, h0:h1] = _spmm(a, values, crow, col, bias).view(n1 - n0, h1 - h0, ow, O)
        ctx.save_for_backward(xp, values, crow, col, ccol, row, perm, active)
        ctx.geom, ctx.xshape, ctx.has_bias = geom, (N, C, H, W), bias is not None
        return y  # [N, oh, ow, O]

    @staticmethod
    def backward(ctx, gy):
        xp, values, crow, col, ccol, row, perm, active = ctx.saved_tensors
        geom = ctx.geom
        (kh, kw), (sh, sw), (ph, pw), (dh, dw), oh, ow = geom
        N, C, H, W = ctx.xshape
        O = crow.shape[0] - 1
        need_x, need_v, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        gyl = gy.contiguous()  # [N, oh, ow, O]
        gxp = torch.zeros_like(xp) if need_x else None
        gv = torch.zeros_like(values) if need_v else None
        if need_x or need_v:
            for n0, n1, h0, h1 in _blocks(N, oh, ow, kh * kw * C * xp.element_size()):
                g = gyl[n0:n1, h0:h1].reshape(-1, O)
                if need_v:
                    gv += _sddmm(g, _patches(xp, n0, n1, h0, h1, geom), crow, col, active)
                if need_x:
                    ga = _spmm_t(g, values, ccol, row, perm).view(n1 - n0, h1 - h0, ow, kh, kw, C)
                    for i in range(kh):
                        r0 = h0 * sh + i * dh
                        for j in range(kw):
                            gxp[n0:n1, r0:r0 + sh * (h1 - h0 - 1) + 1:sh,
                                j * dw:j * dw + sw * (ow - 1) + 1:sw] += ga[:, :, :, i, j]
        gx = gxp[:, ph:ph + H, pw:pw + W].permute(0, 3, 1, 2) if need_x else None
        gb = None
        if ctx.has_bias and need_b:
            gb = torch.ops.sparseticket.masked_bias_grad(gyl.reshape(-1, O), active)
        return gx, gv, gb, None, None, None, None, None, None, None


class _Im2ColNHWC(torch.autograd.Function):
    """x [N, C, H, W] -> patches [N·oh·ow, kh·kw·C], columns (tap, channel), one copy.

    F.unfold builds (channel, tap) columns from NCHW and was 2-5x slower than one strided
    copy of the padded channels-last input (64x64x28x28, 3x3: 170-520 -> 96 ms, 2 threads).
    Backward adds each tap's slice back: kh·kw strided adds, no scatter.
    """

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, oh: int, ow: int):
        N, C, H, W = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
        xp = x.permute(0, 2, 3, 1)
        xp = F.pad(xp, (0, 0, pw, pw, ph, ph)) if (ph or pw) else xp
        ctx.conf = (N, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow)
        if torch.compiler.is_compiling():  # storage_offset() cannot be traced; same values
            taps = [xp[:, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw, :]
                    for i in range(kh) for j in range(kw)]
            return torch.stack(taps, 3).view(N * oh * ow, kh * kw * C)
        # one strided copy: 96 ms vs 133 ms for stacking the taps (64x64x28x28, 3x3, 2 threads)
        sN, sH, sW, sC = xp.stride()
        patches = xp.as_strided((N, oh, ow, kh, kw, C), (sN, sh * sH, sw * sW, dh * sH, dw * sW, sC),
                                xp.storage_offset())
        return patches.reshape(N * oh * ow, kh * kw * C)

    @staticmethod
    def backward(ctx, ga):
        N, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow = ctx.conf
        g = ga.reshape(N, oh, ow, kh, kw, C)
        gxp = ga.new_zeros(N, H + 2 * ph, W + 2 * pw, C)
        for i in range(kh):
            for j in range(kw):
                gxp[:, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw, :] += g[:, :, :, i, j, :]
        gx = gxp[:, ph:ph + H, pw:pw + W, :].permute(0, 3, 1, 2)
        return gx, None, None, None, None, None, None


# ----------------------------------------------------------------------------- neuron-skipping conv


def neq_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], active: Tensor, stride, padding, dilation,
               groups: int, needed: Optional[Tensor] = None) -> Tensor:
    """F.conv2d whose weight/bias gradients are computed only for ``active`` output channels,
    and whose input gradient only for ``needed`` input channels (None: all; the others get
    0). ``needed`` is for groups == 1 (ignored otherwise)."""
    if groups != 1:
        needed = None
    conf = (tuple(stride), tuple(padding), tuple(dilation), groups, needed)
    device = x.device.type
    if torch.is_autocast_enabled(device):
        # as autocast runs F.conv2d: the operands cast to its dtype outside the Function (so
        # the casts are autograd nodes and the parameters get gradients of their own dtype),
        # the conv and its backward in that dtype (float64 and non-float operands as they are)
        dt = torch.get_autocast_dtype(device)
        x, weight, bias = autocast_operand(x, dt), autocast_operand(weight, dt), autocast_operand(bias, dt)
        with torch.autocast(device, enabled=False):
            return _NEqConv2dFn.apply(x, weight, bias, active, *conf)
    return _NEqConv2dFn.apply(x, weight, bias, active, *conf)


class _NEqConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, active, stride, padding, dilation, groups, needed):
        ctx.save_for_backward(x, weight, active, needed)
        ctx.conf = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, gy):
        x, weight, active, needed = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        gx = gw = gb = None
        if torch.is_grad_enabled():
            # create_graph=True: the input gradient may itself be differentiated (e.g. a
            # penalty on the activation gradient), which reads the frozen channels too
            needed = None
        if need_x and need_w and needed is None and bool(active.all()):  # nothing frozen: one call, as nn.Conv2d
            gx, gw, gb = _conv_backward(gy, x, weight, stride, padding, dilation, groups, (True, True, need_b))
            return gx, gw, gb, None, None, None, None, None, None
        if need_x and needed is not None:
            gx = _needed_input_grad(gy, x, weight, needed, stride, padding, dilation)
        elif need_x:  # frozen channels still pass gradient to earlier layers
            gx = _conv_backward(gy, x, weight, stride, padding, dilation, groups, (True, False, False))[0]
        if need_w or need_b:
            gw, gb = _active_conv_grads(x, weight, gy, active, stride, padding, dilation, groups, need_w, need_b)
        return gx, gw, gb, None, None, None, None, None, None


def _needed_input_grad(gy, x, weight, needed, stride, padding, dilation) -> Tensor:
    """The input gradient of a groups == 1 conv at the ``needed`` input channels, 0 at the
    others: one oneDNN call on the weight's needed input channels, then a scatter of the
    channel planes. The input gradient reads only x's shape, so a same-shaped stand-in
    (allocated, never written or read) replaces the gather of x's channels."""
    N, C = x.shape[0], x.shape[1]
    idx = needed.nonzero().squeeze(1)
    n = idx.numel()
    gx = gy.new_zeros(x.shape)  # from gy: under vmap (is_grads_batched) gy is the batched one
    if n == 0 or N == 0:
        return gx
    stand_in = x.new_empty((N, n) + tuple(x.shape[2:]))
    part = _conv_backward(gy, stand_in, weight.index_select(1, idx), stride, padding, dilation, 1,
                          (True, False, False))[0]
    rows = (torch.arange(N, device=x.device).mul_(C).view(N, 1) + idx.view(1, -1)).reshape(-1)
    gx.view(N * C, -1).index_copy_(0, rows, part.reshape(N * n, -1))
    return gx


def _conv_backward(gy, x, weight, stride, padding, dilation, groups, mask):
    """aten's convolution backward with the real x and weight. (torch.nn.grad.conv2d_input /
    conv2d_weight pass a zero-stride stand-in for the tensor they do not need, which took
    oneDNN off its fast path: 64->128 @14, batch 64: input gradient 26 ms vs 18 ms.)"""
    return torch.ops.aten.convolution_backward(gy, x, weight, [weight.shape[0]], stride, padding, dilation, False,
                                               (0,) * len(stride), groups, mask)


def _active_conv_grads(x, weight, gy, active, stride, padding, dilation, groups, need_w: bool, need_b: bool):
    """(weight gradient [O, C/g, kh, kw] or None, bias gradient [O] or None), computed for
    the active output channels only (frozen rows are 0). The bias gradient comes out of the
    same oneDNN call as the weight gradient (summing gy separately cost 1-2 ms a layer)."""
    def grads(xs, gys, n, g):
        # weight.narrow only gives the shape [n, C/g, kh, kw] (its values are not read)
        _, w, b = _conv_backward(gys, xs, weight.narrow(0, 0, n), stride, padding, dilation, g, (False, need_w, need_b))
        return w, b

    O = weight.shape[0]
    if torch.compiler.is_compiling():
        # the subset's size is data-dependent; inside a graph compute all rows and mask
        w, b = grads(x, gy, O, groups)
        return (None if w is None else torch.where(active.view(-1, 1, 1, 1), w, torch.zeros_like(w)),
                None if b is None else torch.where(active, b, torch.zeros_like(b)))
    idx = active.nonzero().squeeze(1)
    n = idx.numel()
    if n == O:
        return grads(x, gy, O, groups)
    gw = gy.new_zeros(weight.shape) if need_w else None
    gb = gy.new_zeros(O) if need_b else None
    if n == 0:
        return gw, gb

    def put(rows, w, b):
        if w is not None:
            gw.index_copy_(0, rows, w)
        if b is not None:
            gb.index_copy_(0, rows, b)

    if groups == 1:
        put(idx, *grads(x, _select_channels(gy, idx), n, 1))
    elif O == groups:  # one output channel per group (depthwise-like): keep the active groups
        Cg = weight.shape[1]
        N, _, H, W = x.shape
        xs = _select_channels(x.reshape(N, groups, Cg * H * W), idx).reshape(N, n * Cg, H, W)
        put(idx, *grads(xs, _select_channels(gy, idx), n, n))
    else:
        Og, Cg = O // groups, weight.shape[1]
        for gi in range(groups):
            sel = idx[(idx >= gi * Og) & (idx < (gi + 1) * Og)]
            if sel.numel():
                put(sel, *grads(x[:, gi * Cg:(gi + 1) * Cg], _select_channels(gy, sel), sel.numel(), 1))
    return gw, gb


def _select_channels(t: Tensor, idx: Tensor) -> Tensor:
    """t.index_select(1, idx) for t of shape [N, C, ...]. A contiguous t is gathered as
    rows of its [N * C, rest] view, one contiguous plane per row: aten's index_select
    along dim 1 of a contiguous 64x64x28x28 gy took 0.29 ms against 0.11 ms this way
    (64x128x14x14: 0.11 against 0.06 ms; ad hoc timing, 2 threads)."""
    if t.dim() < 3 or not t.is_contiguous() or t.numel() == 0:
        return t.index_select(1, idx)
    N, C = t.shape[0], t.shape[1]
    rows = (torch.arange(N, device=t.device).mul_(C).view(N, 1) + idx.view(1, -1)).reshape(-1)
    return t.reshape(N * C, -1).index_select(0, rows).view(N, idx.numel(), *t.shape[2:])
