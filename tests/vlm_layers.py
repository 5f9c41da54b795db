"""One mlx-vlm SwitchGLU layer and its call arguments, for the layer tests."""

from __future__ import annotations

import mlx.core as mx
from helpers import quantize_model
from mlx_vlm.models import switch_layers as vlm


def vlm_layer(cls=vlm.SwitchGLU, *, quantized=True, dims=128, width=64, dtype=mx.float32):
    mx.random.seed(2)
    layer = cls(dims, width, 8)
    layer.set_dtype(dtype)
    if quantized:
        quantize_model(layer, bits=4, group_size=32)
    mx.eval(layer.parameters())
    return layer.eval()  # inference, as servers run it: mlx-vlm's short-block path is eval-only


def call_args(tokens, top_k=2, batch=2, experts=8, dims=128):
    mx.random.seed(3)
    x = mx.random.normal((batch, tokens, dims))
    indices = mx.random.randint(0, experts, (batch, tokens, top_k)).astype(mx.uint32)
    weights = mx.softmax(mx.random.normal((batch, tokens, top_k)), axis=-1)
    shared = mx.random.normal((batch, tokens, dims))
    return x, indices, weights, shared
