"""The 8-wide layouts' panels (block_panel.c), which block_linear.c hands every call of PANEL_MIN_ROWS rows or
more: each row's outputs are the floats of block_linear.c's full 8-row register tiles, bit for bit, across the
panels' row blocks (192 rows), input chunks (256) and an odd last group, with a bias, on one thread and two; so a
row's result does not depend on how many rows share its call."""

from __future__ import annotations

import shutil

import pytest
import torch

from sagellm.backends.native import NativeKernels, interleave
from sagellm.backends.quantized import BLOCK_INPUTS, KEPT_KINDS
from tests.backends.test_block_linear import assert_linear_close, quantized_weight

PANEL_MIN_ROWS = 9  # kernels.h
REGISTER_TILE = 8  # block_linear.c's rows per tile in the variants reading 8-wide layouts

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None and shutil.which("cc") is None, reason="needs a C compiler (gcc or cc)"
)


@pytest.mark.parametrize("kind", KEPT_KINDS)
@pytest.mark.parametrize("threads", [1, 2])
def test_panels_give_each_row_the_register_tiles_floats(native: NativeKernels, kind: str, threads: int) -> None:
    k = 3 * 256 if BLOCK_INPUTS[kind] == 256 else 18 * 32  # three chunks of inputs, the last a part one for Q*_0/1
    n = 8 * 7  # seven groups: three pairs and one alone
    weight, dense = quantized_weight(kind, n, k)
    blocks = interleave(weight, 8)
    bias = torch.randn(n)
    for rows in (PANEL_MIN_ROWS, 16, 200):  # one 6-row tile and a rest, a decode step of 16, two row blocks
        x = torch.randn(rows, k + 8)[:, :k]  # rows of a wider tensor, as the graph's views
        panels = native.block_linear(x, blocks, bias, threads)
        whole = rows - rows % REGISTER_TILE
        tiles = [native.block_linear(x[t : t + REGISTER_TILE], blocks, bias) for t in range(0, whole, REGISTER_TILE)]
        assert torch.equal(panels[:whole], torch.cat(tiles)), f"{rows} rows"
        assert_linear_close(panels, x, dense, kind, bias, rounded=False)
