"""GPU tests: every weight format and activation of the kernels, both paths.

Each case builds a SwitchGLU in a format (formats.py) and with an
activation module (activations.py), and holds both kernel paths to a
float32 evaluation of the same dequantized weights with the module itself:
within the dtype's tolerance and no worse than 1.5x MLX's own gather_qmm
path (kernel_checks.compare). Odd shapes: hidden 2880, width 96, 7
experts; decode at 8 pairs, the tensor cores at 256.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from kernel_checks import (  # kernels_on: autouse, MOEFUSE_KERNEL=1
    compare,
    kernels_on,  # noqa: F401
    needs_cuda,
    quantized_layer,
)
from mlx_lm.models.activations import SwigluOAI
from mlx_lm.models.deepseek_v41 import DeepseekV41SwiGLU
from mlx_lm.models.gemma4_text import GeGLU
from mlx_lm.models.kimi_k3 import SiTU
from mlx_lm.models.muse_spark import PreciseSwiGLU
from mlx_lm.models.step3p5 import ClampedSwiGLU

import moefuse_runtime

pytestmark = needs_cuda

PATHS = {"decode": (2, 4), "grouped": (64, 4)}
"""path -> (tokens, top_k): 8 pairs (decode kernels), 256 (tensor cores)."""

FORMAT_CASES = {
    "mxfp4": {"mode": "mxfp4"},
    "mxfp4+bias": {"mode": "mxfp4", "bias": True},
    "nvfp4": {"mode": "nvfp4"},
    "nvfp4+global_scale": {"mode": "nvfp4", "global_scale": True},
    "mxfp8": {"mode": "mxfp8"},
    "affine4+bias": {"bias": True, "group_size": 32},
    "mxfp4 gate_up, affine8 down": {
        "mode": "mxfp4",
        "down_mode": "affine",
        "bits": 8,
        "group_size": 32,
    },
}


class Unknown(nn.Module):
    """No kernel formula: the module runs between the kernels."""

    def __call__(self, x, gate):
        return nn.gelu(gate) * x


ACTIVATIONS = {
    "oai": lambda: SwigluOAI(),
    "clamped": lambda: ClampedSwiGLU(2.0),
    "deepseek_v41": lambda: DeepseekV41SwiGLU(3.0),
    "precise": lambda: PreciseSwiGLU(),
    "geglu": lambda: GeGLU(),
    "situ": lambda: SiTU(2.0, 3.0),
    "unknown": lambda: Unknown(),
}


def run(layer, path, dtype=mx.bfloat16):
    tokens, top_k = PATHS[path]
    mx.random.seed(1)
    x = mx.random.normal((1, tokens, 2880)).astype(dtype)
    experts = layer.gate_proj.weight.shape[0]
    indices = mx.random.randint(0, experts, (1, tokens, top_k)).astype(mx.uint32)
    return compare(layer, x, indices, dtype, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", FORMAT_CASES)
def test_formats(case, path):
    layer = quantized_layer(2880, 96, 7, **FORMAT_CASES[case])
    run(layer, path)
    assert layer.kernels.decode.down  # down on the kernel too


WORDWISE_CASES = [(2, 32, 96), (3, 32, 96), (3, 64, 192), (5, 32, 96), (5, 64, 384), (6, 32, 96)]
"""(bits, group size, width) of the wordwise bits (32-code units of BITS
words): hidden 2880 copies 16 (2, 6 bits) or 8 bytes (3, 5) per piece on the
tensor cores; down at width 96 has an odd word count (3, 5 bits: 4-byte
copies) and half a k-tile at the end; width 192/384 with group 64 (2880
takes no group 128)."""


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("bits", "group_size", "width"), WORDWISE_CASES)
def test_wordwise_bits(bits, group_size, width, path):
    run(quantized_layer(2880, width, 7, bits=bits, group_size=group_size), path)


@pytest.mark.parametrize(("path", "tokens"), [("decode", 1), ("grouped", 300)])
@pytest.mark.parametrize("bits", [3, 5, 6])
def test_qwen3_dims_wordwise(bits, path, tokens):
    # the checkpoints that motivated issue 13: 3-, 5- and 6-bit Qwen3 MoEs
    layer = quantized_layer(2048, 768, 128, bits=bits, group_size=64)
    mx.random.seed(5)
    x = mx.random.normal((1, tokens, 2048)).astype(mx.bfloat16)
    indices = mx.random.randint(0, 128, (1, tokens, 8)).astype(mx.uint32)
    compare(layer, x, indices, mx.bfloat16, path)


@pytest.mark.parametrize("path", PATHS)
def test_float_format_in_fp16(path):
    run(quantized_layer(2880, 96, 7, mode="mxfp4", bias=True, dtype=mx.float16), path, mx.float16)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations(activation, path):
    layer = quantized_layer(2880, 96, 7, bias=activation == "oai", group_size=32)
    layer.activation = ACTIVATIONS[activation]()
    run(layer, path)


def test_gpt_oss_like_layer_takes_both_paths():
    # GPT-OSS's experts: mxfp4, biases, SwigluOAI; its width 2880 at odd sizes.
    layer = quantized_layer(2880, 2880, 5, mode="mxfp4", bias=True)
    layer.activation = SwigluOAI()
    report = moefuse_runtime.install(layer, reserve_bytes=0)
    assert "gate_up+swiglu oai" in report.layers[0].compute_path
    assert "tensor cores" in report.layers[0].compute_path
