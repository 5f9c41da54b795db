"""What both CUDA kernel paths must do alike, each test run on the decode
kernels and on the tensor cores (the GPU; they skip on the CPU)."""

from __future__ import annotations

import mlx.core as mx
import pytest
from kernel_checks import (  # kernels_on: autouse, MOEFUSE_KERNEL=1
    compare,
    compiled_call_follows_new_weights,
    kernels_on,  # noqa: F401
    needs_cuda,
    quantized_layer,
)

TOKENS = {"decode": 3, "grouped": 250}
"""Per path, a token count it takes at 7 experts, top-4: 12 pairs (decode);
1,000 pairs, ~143 rows per expert (the tensor cores' large tiles)."""


@needs_cuda
@pytest.mark.parametrize("path", TOKENS)
@pytest.mark.parametrize(("bits", "group_size"), [(4, 64), (8, 32)])
@pytest.mark.parametrize("width", [90, 192])
def test_odd_shapes(path, bits, group_size, width):
    # hidden 2880 (GPT-OSS): loads per row not a multiple of 32 lanes, a k
    # tail (2880 = 45 x 64); width 90: rows not a multiple of any warp count
    # or tile (down stays float: 90 is no multiple of a group); width 192:
    # down reads 6 or 12 loads per row
    layer = quantized_layer(
        2880, width, 7, bits=bits, group_size=group_size, quantize_down=width % group_size == 0
    )
    mx.random.seed(4)
    x = mx.random.normal((TOKENS[path], 2880)).astype(mx.bfloat16)
    indices = mx.random.randint(0, 7, (TOKENS[path], 4)).astype(mx.uint32)
    compare(layer, x, indices, mx.bfloat16, path)


@needs_cuda
@pytest.mark.parametrize(("path", "tokens"), [("decode", 2), ("grouped", 64)])
def test_compiled_call_equals_uncompiled_and_follows_new_weights(path, tokens):
    compiled = compiled_call_follows_new_weights(path, tokens=tokens)
    assert compiled.compiled and compiled.down
