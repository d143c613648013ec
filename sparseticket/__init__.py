"""sparseticket: lottery-ticket sparsity and NEq freezing that save real time and FLOPs."""
from . import ops
from .ops import BACKENDS
from .ticket import Ticket
from .functional import sparse_linear, neq_linear
from . import nn, optim, neq  # noqa: E402  (after ops: they build on it)
from . import flops  # noqa: E402  (after nn and optim: it reads what they ran)

__version__ = "0.1.0"
__all__ = ["ops", "BACKENDS", "Ticket", "sparse_linear", "neq_linear", "nn", "optim", "neq", "flops"]
