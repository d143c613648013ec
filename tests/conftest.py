"""Shared pytest setup: two threads (the CI machines have two cores) and a seed per test.

Each test gets its own seed, derived from its node id, so a failure reproduces exactly
when the test is run alone (``pytest tests/test_ops.py::test_spmm[...]``) and tests do
not silently depend on the random state left behind by the tests before them.
"""
import os
import sys
import zlib

import pytest
import torch

# Let `pytest tests/` work from a checkout that is not pip-installed.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

torch.set_num_threads(2)

import sparseticket  # noqa: E402  (after the sys.path fix)


def pytest_report_header(config):
    ops = sparseticket.ops
    why = f" ({ops.EXTENSION_ERROR})" if ops.EXTENSION_ERROR else ""
    return f"sparseticket backends: {dict(ops.BACKENDS)}{why}; torch {torch.__version__}"


def _seed_of(nodeid: str) -> int:
    return zlib.crc32(nodeid.encode())


@pytest.fixture(autouse=True)
def _seed_every_test(request):
    torch.manual_seed(_seed_of(request.node.nodeid))
    yield


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded from the test id: use it for masks and data."""
    return torch.Generator().manual_seed(_seed_of(request.node.nodeid))
