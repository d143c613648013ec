"""Masked AdamW's meaning for the Triton kernels.

The op ``sparseticket::masked_adamw_`` is defined in ``sparseticket/ops/_library.py`` and
its reference lives with the others in ``sparseticket/ops/reference.py``; this module only
re-exports them under the names the Triton code and its tests use.
"""
from ..ops._library import SCHEMAS, check_masked_adamw
from ..ops.reference import reference_masked_adamw_

#: the op's schema (kept under its old name for callers of this module)
PROPOSED_SCHEMA = "masked_adamw_" + SCHEMAS["masked_adamw_"]

__all__ = ["PROPOSED_SCHEMA", "check_masked_adamw", "reference_masked_adamw_"]
