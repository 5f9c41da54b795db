"""Layer-level parity for every projection kind the fused layer supports."""

import mlx.core as mx
import pytest
from helpers import CPU_FLOAT_ONLY, CPU_GLOBAL_SCALE, fused_matches, on_cpu, route, switch_glu

from moefuse_runtime import projections

# indices.size on both sides of SwitchGLU's sort threshold (64).
PAIRS = [1, 63, 64, 65, 300]

AFFINE = [(bits, gs) for bits in (2, 3, 4, 5, 6, 8) for gs in (32, 64, 128)]
MICROSCALED = [("mxfp4", 4, 32), ("mxfp8", 8, 32), ("nvfp4", 4, 16)]


def run(layer, pairs, batch=1, dims=128, dtype=mx.float32):
    tokens = max(1, pairs // batch)
    x = mx.random.normal((batch, tokens, dims)).astype(dtype)
    return fused_matches(layer, x, route(tokens, 8, 1, batch=batch))


@pytest.mark.parametrize("pairs", PAIRS)
@pytest.mark.parametrize("bits,group_size", AFFINE)
def test_affine_quantized(bits, group_size, pairs):
    layer = switch_glu(128, 128, quant={"bits": bits, "group_size": group_size})
    assert run(layer, pairs)


@pytest.mark.parametrize("pairs", PAIRS)
@pytest.mark.parametrize("mode,bits,group_size", MICROSCALED)
def test_microscaled_quantized(mode, bits, group_size, pairs):
    quant = {"bits": bits, "group_size": group_size, "mode": mode}
    assert run(switch_glu(128, 128, quant=quant), pairs)


@pytest.mark.parametrize("pairs", [1, 300])
def test_nvfp4_with_shared_global_scale(pairs):
    if on_cpu():
        pytest.skip(CPU_GLOBAL_SCALE)
    layer = switch_glu(
        128, 128, quant={"bits": 4, "group_size": 16, "mode": "nvfp4"}, global_scale=True
    )
    layer.up_proj.global_scale = layer.gate_proj.global_scale
    assert run(layer, pairs)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    "quant", [None, {"bits": 4, "group_size": 64}, {"bits": 8, "group_size": 32, "mode": "mxfp8"}]
)
@pytest.mark.parametrize("pairs", [5, 300])
def test_bias(quant, bias, pairs):
    assert run(switch_glu(128, 128, bias=bias, quant=quant), pairs)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("pairs", PAIRS)
def test_float(dtype, pairs):
    if dtype != mx.float32 and on_cpu():
        pytest.skip(CPU_FLOAT_ONLY)
    assert run(switch_glu(128, 128, dtype=dtype), pairs, dtype=dtype)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision_weights_round_trip_on_any_device(dtype):
    """The weight math itself (no matmul) is exact for half types everywhere."""
    layer = switch_glu(128, 128, dtype=dtype, bias=True)
    fused = projections.fuse(layer.gate_proj, layer.up_proj)
    assert fused.weight.dtype == dtype
    assert fused.weight.shape == (8, 256, 128)
    gate, up = projections.split(fused)
    for key in ("weight", "bias"):
        assert mx.array_equal(gate[key], layer.gate_proj[key]).item()
        assert mx.array_equal(up[key], layer.up_proj[key]).item()


@pytest.mark.parametrize("pairs", [4, 300])
def test_batch_and_top_k(pairs):
    layer = switch_glu(128, 128, quant={"bits": 4, "group_size": 64})
    x = mx.random.normal((3, pairs, 128))
    assert fused_matches(layer, x, route(pairs, 8, 4, batch=3))


def test_odd_hidden_width():
    """Widths that are not powers of two (gpt-oss uses 2880)."""
    layer = switch_glu(96, 64, experts=5, quant={"bits": 4, "group_size": 32})
    x = mx.random.normal((2, 70, 96))
    assert fused_matches(layer, x, route(70, 5, 2, batch=2))


def test_global_scale_is_shared_not_stacked():
    layer = switch_glu(
        128, 128, quant={"bits": 4, "group_size": 16, "mode": "nvfp4"}, global_scale=True
    )
    layer.up_proj.global_scale = layer.gate_proj.global_scale
    fused = projections.fuse(layer.gate_proj, layer.up_proj)
    assert fused.global_scale.shape == (8,)
    assert mx.array_equal(fused.global_scale, layer.gate_proj.global_scale).item()
    gate, up = projections.split(fused)
    for key in ("weight", "scales", "global_scale"):
        assert mx.array_equal(gate[key], layer.gate_proj[key]).item()
        assert mx.array_equal(up[key], layer.up_proj[key]).item()
