"""The CUDA decode kernels: path selection everywhere, numerics on the GPU.

The kernels change the summation order (fp32 accumulation, activation fused),
so they are held to a stated tolerance, not bitwise equality: relative error
against a float32 reference within ``TOLERANCE`` of the dtype, and never more
than ``GATHER_SLACK`` times the error of MLX's own gather_qmm path on the
same inputs. The GPU tests skip on CPU with the reason and were run on the
lent H100 (docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import mlx.nn as nn
import pytest
from helpers import switch_glu
from kernel_checks import (  # kernels_on: autouse, MOEFUSE_KERNEL=1
    SWIGLU_ACT,
    TOLERANCE,
    compare,
    kernels_on,  # noqa: F401
    needs_cuda,
    quantized_layer,
    relative_error,
)

import moefuse_runtime
from moefuse_runtime.cuda import activations, formats
from moefuse_runtime.cuda import decode as kernels
from moefuse_runtime.cuda.device import ARCH_LIMITS
from moefuse_runtime.cuda.formats import QuantizedArrays
from moefuse_runtime.cuda.tiles import Decode
from moefuse_runtime.layer import kernel_paths
from moefuse_runtime.memory import backend

H100 = ARCH_LIMITS[90]

# -- everywhere: which path a layer takes, and why --------------------------


def test_cpu_keeps_gather_qmm():
    if backend() == "cuda":
        pytest.skip("this machine has CUDA: see test_model_reports_kernel_path_and_decodes_close")
    layer = quantized_layer(128, 64, 8, dtype=mx.float32)
    report = moefuse_runtime.install(layer, reserve_bytes=0)
    assert report.layers[0].compute_path == f"gather_qmm ({backend()})"
    assert layer.kernels is None


@pytest.mark.parametrize(("bits", "group_size"), [(2, 64), (3, 64), (5, 32), (6, 128)])
def test_every_affine_bit_width_is_taken(bits, group_size):
    layer = switch_glu(128, 64, 4)
    layer.set_dtype(mx.bfloat16)
    proj = layer.gate_proj.to_quantized(group_size, bits)
    assert kernels.why_not_kernel(proj, H100) is None
    # 32-code units, BITS words each (3 and 5 bits cross words)
    assert formats.unit_values(bits) == 32


def test_bit_widths_outside_the_kernels_are_named():
    layer = switch_glu(128, 64, 4)
    layer.set_dtype(mx.bfloat16)
    proj = layer.gate_proj.to_quantized(64, 4)
    proj.bits = 7  # no MLX mode has it today; a future width must not pass
    assert "affine 7-bit" in kernels.why_not_kernel(proj, H100)


def test_group_size_outside_the_kernels_is_named():
    layer = switch_glu(128, 64, 4)
    layer.set_dtype(mx.bfloat16)
    proj = layer.gate_proj.to_quantized(32, 4)
    proj.group_size = 256  # MLX quantizes with 32/64/128 today; a future size must not pass
    assert "group size 256" in kernels.why_not_kernel(proj, H100)


def test_float_and_float32_scales_are_not_taken():
    layer = switch_glu(128, 64, 4)
    assert "not quantized" in kernels.why_not_kernel(layer.gate_proj, H100)
    assert "float32 scales" in kernels.why_not_kernel(layer.gate_proj.to_quantized(64, 4), H100)


@pytest.mark.parametrize(
    ("mode", "global_scale"),
    [("mxfp4", False), ("nvfp4", False), ("nvfp4", True), ("mxfp8", False)],
)
def test_float_formats_are_taken(mode, global_scale):
    layer = switch_glu(128, 64, 4)
    layer.set_dtype(mx.bfloat16)
    (bits,), (group_size,) = formats.FORMATS[mode]
    proj = layer.gate_proj.to_quantized(group_size, bits, mode, global_scale=global_scale)
    assert kernels.why_not_kernel(proj, H100) is None


def test_bias_is_taken_in_the_activation_dtype():
    layer = switch_glu(128, 64, 4, bias=True)
    layer.set_dtype(mx.bfloat16)
    proj = layer.gate_proj.to_quantized(64, 4)
    assert kernels.why_not_kernel(proj, H100) is None
    proj.bias = proj.bias.astype(mx.float32)
    assert "float32 bias" in kernels.why_not_kernel(proj, H100)


def test_selection_on_cuda(as_cuda):
    layer = quantized_layer(128, 64, 4)
    moefuse_runtime.install(layer, reserve_bytes=0)
    chosen, path = kernel_paths(layer)
    assert chosen.decode == kernels.DecodeKernels(down=True, down_tiling=Decode().short_row_tiling)
    assert path.startswith("cuda kernels")


@pytest.mark.parametrize(
    ("width", "bits", "tiling"),
    [(768, 4, (4, 8)), (1024, 4, (4, 8)), (1056, 4, (1, 8)), (768, 8, (1, 8)), (14336, 4, (1, 8))],
)
def test_down_tiling_follows_row_length(width, bits, tiling):
    # Qwen3-30B-A3B's 768-wide 4-bit rows are one 16-byte load per lane:
    # four rows per warp; longer rows (Mixtral's 14336) one (docs/benchmarks.md).
    down = nn.QuantizedLinear(width, 64, bias=False, group_size=32, bits=bits)
    assert kernels.down_tiling_for(down, Decode()) == tiling


def test_env_turns_kernels_off(as_cuda, monkeypatch):
    layer = quantized_layer(128, 64, 4)
    moefuse_runtime.install(layer, reserve_bytes=0)
    monkeypatch.setenv("MOEFUSE_KERNEL", "0")
    assert kernel_paths(layer) == (None, "gather_qmm (MOEFUSE_KERNEL=0)")
    monkeypatch.setenv("MOEFUSE_KERNEL", "maybe")
    with pytest.raises(ValueError, match="MOEFUSE_KERNEL"):
        kernel_paths(layer)


def test_known_activations_run_in_the_epilogue(as_cuda):
    from mlx_lm.models.activations import SwigluOAI

    layer = quantized_layer(128, 64, 4)
    layer.activation = SwigluOAI(alpha=1.5, limit=6.0)  # GPT-OSS's clamped variant
    moefuse_runtime.install(layer, reserve_bytes=0)
    chosen, path = kernel_paths(layer)
    assert chosen.decode.activation == activations.KernelActivation(activations.OAI, 6.0, 1.5)
    assert "gate_up+swiglu oai" in path


def test_unknown_activations_run_between_the_kernels(as_cuda):
    layer = quantized_layer(128, 64, 4)
    layer.activation = nn.GELU()  # any module: the kernels write gate and up, it runs after
    moefuse_runtime.install(layer, reserve_bytes=0)
    chosen, path = kernel_paths(layer)
    assert chosen.decode.activation.kind == activations.NONE
    assert "gate_up+mlx activation" in path


def test_float_down_keeps_gather_qmm_for_down(as_cuda):
    layer = quantized_layer(128, 64, 4)
    layer.down_proj = switch_glu(64, 128, 4).down_proj  # float down (wrong width is fine)
    moefuse_runtime.install(layer, reserve_bytes=0)
    chosen, path = kernel_paths(layer)
    assert chosen.decode == kernels.DecodeKernels(down=False)
    assert "down: gather_qmm" in path


def test_down_in_another_dtype_keeps_gather_qmm_for_down(as_cuda):
    layer = quantized_layer(128, 64, 4)
    layer.down_proj.set_dtype(mx.float16)  # bf16 gate/up, fp16 down scales
    moefuse_runtime.install(layer, reserve_bytes=0)
    chosen, _ = kernel_paths(layer)
    assert chosen.decode == kernels.DecodeKernels(down=False)


def test_uninstall_drops_the_kernels(as_cuda):
    layer = quantized_layer(128, 64, 4)
    moefuse_runtime.install(layer, reserve_bytes=0)
    assert layer.kernels is not None
    moefuse_runtime.uninstall(layer)
    assert "kernels" not in layer.__dict__


# -- on the GPU: numerics ---------------------------------------------------

FORMATS = [(bits, gs) for bits in (4, 8) for gs in (32, 64, 128)]


CASES = [(*f, mx.bfloat16) for f in FORMATS] + [(4, 64, mx.float16), (8, 128, mx.float16)]


@needs_cuda
@pytest.mark.parametrize(("bits", "group_size", "dtype"), CASES)
def test_qwen3_dims_one_token(bits, group_size, dtype):
    layer = quantized_layer(2048, 768, 128, bits=bits, group_size=group_size, dtype=dtype)
    mx.random.seed(3)
    x = mx.random.normal((1, 1, 2048)).astype(dtype)
    indices = mx.random.randint(0, 128, (1, 1, 8)).astype(mx.uint32)
    compare(layer, x, indices, dtype, "decode")


@needs_cuda
def test_duplicate_experts_within_a_token():
    layer = quantized_layer(1024, 256, 16)
    x = mx.random.normal((2, 1, 1024)).astype(mx.bfloat16)
    indices = mx.array([[[5, 5, 5, 2]], [[0, 15, 0, 15]]], dtype=mx.uint32)
    compare(layer, x, indices, mx.bfloat16, "decode")


TILINGS = [(1, 8), (1, 4), (2, 4), (2, 8), (4, 8), (4, 4)]
"""(outputs per warp, warps per block): the installed ones and the candidates
that scripts/profile/profile_formats.py times."""


@needs_cuda
@pytest.mark.parametrize("tiling", TILINGS, ids=[f"{o}x{w}" for o, w in TILINGS])
@pytest.mark.parametrize("swiglu", [True, False])
def test_every_output_element_is_written(swiglu, tiling):
    # Every tiling writes every element, and the same values: a row's sum
    # does not depend on which warp or block computes it.
    layer = quantized_layer(2880, 90 if swiglu else 96, 5, group_size=32, quantize_down=not swiglu)
    moefuse_runtime.install(layer, reserve_bytes=0)
    proj = layer.gate_up_proj if swiglu else layer.down_proj
    k = proj.weight.shape[-1] * 32 // proj.bits
    indices = mx.array([4, 0, 4, 1, 2, 3], dtype=mx.uint32)
    x_div = 2 if swiglu else 1
    x = mx.random.normal((indices.size // x_div, k)).astype(mx.bfloat16)  # one row per x_div pairs
    arrays = QuantizedArrays.of(proj)

    def run(outs, warps):
        return kernels.gather_qmv(
            x,
            arrays,
            indices,
            activation=SWIGLU_ACT if swiglu else None,
            x_div=x_div,
            init_value=float("nan"),
            outs=outs,
            warps=warps,
        )

    out = run(*tiling)
    assert out.shape == (6, proj.weight.shape[-2] // (2 if swiglu else 1))
    assert not mx.isnan(out).any().item()
    installed = Decode().gate_up_tiling if swiglu else kernels.down_tiling_for(proj, Decode())
    assert mx.array_equal(out, run(*installed)).item()


@needs_cuda
def test_many_pairs_take_gather_qmm_bitwise():
    layer = quantized_layer(512, 128, 16)
    x = mx.random.normal((1, 16, 512)).astype(mx.bfloat16)  # 16 x 4 = 64 pairs
    indices = mx.random.randint(0, 16, (1, 16, 4)).astype(mx.uint32)
    moefuse_runtime.install(layer, reserve_bytes=0)
    assert layer.kernels.pick(x, indices) is layer.kernels.grouped
    layer.kernels = dataclasses.replace(layer.kernels, grouped=None)  # gather_qmm above decode
    out = layer(x, indices)
    layer.kernels = None
    assert mx.array_equal(out, layer(x, indices)).item()


@needs_cuda
def test_model_reports_kernel_path_and_decodes_close():
    from mlx_lm.models.cache import make_prompt_cache

    from moefuse_runtime.demo import build_demo_model

    plain = build_demo_model("tiny", dtype=mx.bfloat16)
    model = build_demo_model("tiny", dtype=mx.bfloat16)
    report = moefuse_runtime.install(model, reserve_bytes=0)
    assert all(r.compute_path.startswith("cuda kernels") for r in report.layers), str(report)
    tokens = mx.random.randint(0, 512, (16,)).tolist()
    logits = []
    for m in (plain, model):  # one token per step through the KV cache: the kernel path
        cache = make_prompt_cache(m)
        logits.append(mx.concatenate([m(mx.array([[t]]), cache=cache) for t in tokens], 1))
    error = relative_error(logits[1], logits[0])
    assert error < TOLERANCE[mx.bfloat16], error
