"""The kept-weight gradient's dense-tile path (kernels.inl sddmm_tile_kernel).

Above a density (ops_cpu.cpp use_sddmm_tiles: 45% of the weight up to a batch of 64, 65%
above) sddmm and sparse_linear_backward compute each active row's whole row of gyᵀ x by
the row-subset tile and gather the kept entries. The op tests reach it at their 0% and
50% sparsities; here the shapes aim at its own edges (column tails shorter than a vector
and than a tile, x rows 512 bytes apart (cache-set aliasing, read in place), groups
of rows larger than one tile, rows with no entries inside a group, frozen rows), and the
op tests run again with the path forced on and off, since the threshold is read once per
process (SPARSETICKET_SDDMM_TILE_DENSITY).
"""
import os
import subprocess
import sys

import pytest
import torch

from helpers import FLOATS, assert_close, make_case
from sparseticket import ops as ST
from sparseticket.ops import reference as ref

HERE = os.path.dirname(os.path.abspath(__file__))

# (B, I, O): I = 7 (< one vector), 70 (a tile and a partial vector), 128 (x rows 512
# bytes apart in float32), 784 (LeNet's fc1); O over one group of 48 rows; B = 64 and 1.
SHAPES = [(60, 7, 5), (60, 70, 13), (64, 128, 50), (60, 784, 300), (1, 33, 97), (17, 130, 49)]


@pytest.mark.parametrize("active_kind", [None, "half", "none"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("sparsity,holes", [(0.0, False), (0.3, True), (0.5, False)])
@pytest.mark.parametrize("B,I,O", SHAPES, ids=[f"{b}x{i}x{o}" for b, i, o in SHAPES])
def test_dense_tile_sddmm(B, I, O, sparsity, holes, dtype, active_kind, gen):
    c = make_case(B, I, O, sparsity, holes, dtype, gen)
    t, gy, x = c["t"], c["gy"], c["x"]
    active = None
    if active_kind == "half":
        active = torch.rand(O, generator=gen) < 0.5
    elif active_kind == "none":
        active = torch.zeros(O, dtype=torch.bool)
    out = ST.sddmm(gy, x, t.crow, t.col, active)
    assert_close(out, ref.reference_sddmm(gy, x, t.crow, t.col, active),
                 ref.reference_sddmm(gy.abs(), x.abs(), t.crow, t.col, None), what="sddmm")
    if active is not None:
        frozen = ~active[c["mask"].nonzero()[:, 0]]
        assert (out[frozen] == 0).all(), "frozen rows must give exactly 0"


@pytest.mark.parametrize("layout", ["transposed", "row_stride"])
def test_dense_tile_sddmm_strided_x(layout, gen):
    B, I, O = 48, 200, 40
    c = make_case(B, I, O, 0.2, False, torch.float32, gen)
    t, gy = c["t"], c["gy"]
    if layout == "transposed":
        x = torch.randn(I, B, generator=gen).t()          # stride(1) != 1: copied
    else:
        x = torch.randn(B, I + 37, generator=gen)[:, :I]  # rows I + 37 apart: read in place
    out = ST.sddmm(gy, x, t.crow, t.col, None)
    assert_close(out, ref.reference_sddmm(gy, x, t.crow, t.col, None),
                 ref.reference_sddmm(gy.abs(), x.abs(), t.crow, t.col, None), what=f"sddmm {layout}")


@pytest.mark.parametrize("forced", ["0", "101"], ids=["always_tiles", "never_tiles"])
def test_op_suite_with_tiles_forced(forced):
    """test_ops' sddmm and backward tests with every density on one path."""
    env = dict(os.environ, SPARSETICKET_SDDMM_TILE_DENSITY=forced,
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        "-k", "(sddmm or backward or grad) and not forced",
                        os.path.join(HERE, "test_ops.py"), os.path.join(HERE, "test_sddmm_tiles.py"),
                        os.path.join(HERE, "test_fused_relu.py")],
                       env=env, capture_output=True, text=True, timeout=900, cwd=os.path.dirname(HERE))
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-2000:])
    assert " passed" in r.stdout
