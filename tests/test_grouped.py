"""The tensor-core path (cuda/grouped.py): selection and tile table
everywhere, numerics on the GPU.

Like the decode kernels, it sums in fp32 in another order than gather_qmm,
so it is held to a stated tolerance against a float32 evaluation of the same
dequantized weights, and to at most ``GATHER_SLACK`` times gather_qmm's own
error on the same inputs. The GPU tests skip on the CPU with the reason and
were run on the lent H100 (docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from kernel_checks import (  # kernels_on: autouse, MOEFUSE_KERNEL=1
    SWIGLU_ACT,
    TOLERANCE,
    compare,
    kernels_on,  # noqa: F401
    needs_cuda,
    quantized_layer,
    reference,
    relative_error,
)
from mlx_lm.models.activations import SwigluOAI
from mlx_lm.models.deepseek_v41 import DeepseekV41SwiGLU

import moefuse_runtime
from moefuse_runtime import cuda
from moefuse_runtime.cuda import activations, grouped, jit, source
from moefuse_runtime.cuda.device import ARCH_LIMITS
from moefuse_runtime.cuda.formats import QuantizedArrays, WeightFormat
from moefuse_runtime.cuda.tiles import parse as parse_table
from moefuse_runtime.cuda.tiles import shipped as shipped_tables
from moefuse_runtime.layer import kernel_paths

AFFINE_4 = WeightFormat("affine", 4)

# -- everywhere: which path, which tiles --------------------------------------


def test_schedule_bound_covers_every_routing():
    # Each non-empty expert adds at most one partial tile to pairs / BM.
    rng = np.random.default_rng(0)
    for _ in range(200):
        experts, bm = int(rng.integers(1, 300)), int(rng.choice([16, 32, 64, 128]))
        idx = rng.integers(0, experts, int(rng.integers(1, 5000)))
        needed = sum(-(-c // bm) for c in np.bincount(idx))
        assert needed <= grouped.max_tiles(idx.size, experts, bm)


def test_tiling_sizes():
    t = grouped.Tiling(128, 128, 2, 4, 4)
    assert t.threads == 256
    # A: 4 x 128 x 128 B, packed 4-bit B: 4 x 128 x 32 B, two bf16 B tiles: 2 x 128 x 128 B
    assert t.shared_bytes(4) == 4 * 128 * 128 + 4 * 128 * 32 + 2 * 128 * 128
    # dequantized in mma fragments: no dequantized tiles
    assert grouped.Tiling(128, 128, 2, 4, 4, b_regs=True).shared_bytes(4) == (
        4 * 128 * 128 + 4 * 128 * 32
    )
    h100 = ARCH_LIMITS[90]
    assert "warp tiles" in grouped.Tiling(128, 64, 2, 4, 4).why_not(True, 4, h100)
    assert "shared memory" in grouped.Tiling(256, 256, 2, 4, 8).why_not(False, 8, h100)


def test_wgmma_tilings_fit_sm_90_alone():
    t = grouped.Tiling(128, 128, 1, 8, 4, wgmma=True)
    assert t.threads == 256
    # x stages 4 x 128 x 128 B, packed 4-bit stages 4 x 128 x 32 B, the alignment
    assert t.shared_bytes(4) == 4 * 128 * 128 + 4 * 128 * 32 + 1024
    h100 = ARCH_LIMITS[90]
    assert t.why_not(True, 4, h100) is None and t.why_not(False, 8, h100) is None
    two_tiles = grouped.Tiling(128, 256, 1, 8, 4, wgmma=True)  # 32 weight rows per warp
    assert two_tiles.why_not(True, 4, h100) is None and two_tiles.threads == 256
    for arch in (80, 86, 89, 100, 120, 121):
        assert "needs wgmma (sm_90)" in t.why_not(True, 4, ARCH_LIMITS[arch])
    assert "4- and 8-bit" in t.why_not(True, 5, h100)
    shapes = (
        (96, 128, 1, 8),
        (512, 128, 1, 8),
        (128, 96, 1, 6),
        (128, 128, 2, 4),
        (128, 256, 1, 4),
    )
    for shape in shapes:
        assert "warpgroups" in grouped.Tiling(*shape, 4, wgmma=True).why_not(True, 4, h100)
    assert "3 stages" in grouped.Tiling(128, 128, 1, 8, 2, wgmma=True).why_not(True, 4, h100)
    overlap = grouped.Tiling(128, 128, 1, 8, 3, wgmma=True, overlap=True)
    assert "4 stages" in overlap.why_not(True, 4, h100)
    assert dataclasses.replace(overlap, stages=4).why_not(True, 4, h100) is None
    mma_sync = grouped.Tiling(64, 128, 1, 4, 4, b_regs=True, overlap=True)
    assert "only the wgmma kernel" in mma_sync.why_not(True, 4, h100)
    copying = grouped.Tiling(64, 128, 1, 4, 4, b_regs=True, producer=True)
    assert "a copying warp" in copying.why_not(True, 4, h100)


def test_a_copying_warpgroup_is_four_more_warps_and_two_barriers_a_stage():
    t = grouped.Tiling(128, 256, 1, 8, 4, wgmma=True, producer=True)
    assert t.threads == 12 * 32
    plain = dataclasses.replace(t, producer=False)
    assert t.shared_bytes(4) == plain.shared_bytes(4) + 4 * 2 * 8
    h100 = ARCH_LIMITS[90]
    assert t.why_not(True, 4, h100) is None and t.why_not(False, 8, h100) is None
    for arch in (80, 89, 120):
        assert "needs wgmma (sm_90)" in t.why_not(True, 4, ARCH_LIMITS[arch])
    # it lends its registers to the other warpgroups of the SM's one block
    assert "one block per SM" in dataclasses.replace(t, min_blocks=2).why_not(True, 4, h100)


def test_a_table_of_wgmma_tilings_falls_through_off_hopper():
    # a table measured on an H100 (wgmma first) read on an RTX 4090: the next entry
    wgmma = grouped.Tiling(128, 128, 1, 8, 4, wgmma=True)
    mma = grouped.Tiling(64, 128, 1, 4, 4, b_regs=True)
    entry = {"max_rows_per_expert": None}
    table = parse_table(
        "mixed",
        {
            kind: [
                {**entry, "tiling": dataclasses.asdict(wgmma)},
                {**entry, "tiling": dataclasses.asdict(mma)},
            ]
            for kind in ("gate_up", "down")
        },
    )
    affine = functools.partial(WeightFormat, "affine")
    assert table.tiling(64, True, affine(4), ARCH_LIMITS[90]) == wgmma
    assert table.tiling(64, True, affine(4), ARCH_LIMITS[89]) == mma
    assert table.tiling(64, False, affine(3), ARCH_LIMITS[90]) == mma  # 3-bit: no wgmma kernel


def test_wgmma_specs_name_the_hopper_kernel():
    layer = quantized_layer(256, 128, 8)
    moefuse_runtime.install(layer, reserve_bytes=0)
    proj = QuantizedArrays.of(layer.gate_up_proj)
    two_groups = grouped.Tiling(128, 128, 1, 8, 4, wgmma=True)
    four_groups = grouped.Tiling(128, 256, 1, 16, 3, wgmma=True)
    spec = grouped.gemm_spec(proj, mx.bfloat16, 256, SWIGLU_ACT, 8, two_groups)
    assert spec.name == grouped.WGMMA_NAME and "moefuse::grouped_wgmma<" in spec.source
    assert "grouped_wgmma.cuh" in spec.header and "__launch_bounds__" not in spec.header
    names = [name for name, _ in spec.template]
    # warpgroups, no B_REGS
    assert names[-6:] == ["BM", "BN", "WARPS", "STAGES", "OVERLAP", "PRODUCER"]
    assert dict(spec.template)["PRODUCER"] is False
    # 512 threads: a launch bound caps the registers at 128 (64K per SM)
    spec = grouped.gemm_spec(proj, mx.bfloat16, 256, SWIGLU_ACT, 8, four_groups)
    assert "__launch_bounds__(512, 1)" in spec.header
    # a copying warpgroup: 384 threads under one launch bound
    copying = dataclasses.replace(two_groups, producer=True)
    spec = grouped.gemm_spec(proj, mx.bfloat16, 256, SWIGLU_ACT, 8, copying)
    assert "__launch_bounds__(384, 1)" in spec.header and dict(spec.template)["PRODUCER"] is True


def test_both_paths_are_selected_with_their_pair_ranges(as_cuda):
    layer = quantized_layer(128, 64, 16)
    report = moefuse_runtime.install(layer, reserve_bytes=0)
    kernels = layer.kernels
    assert kernels.decode.max_pairs == 32
    assert kernels.grouped == grouped.GroupedKernels(True, 32, "h100", ARCH_LIMITS[90])
    assert report.layers[0].compute_path == (
        "cuda kernels <= 32 pairs (gate_up+swiglu, down: kernel); tensor cores above (down: kernel)"
    )


def test_pairs_pick_the_path(as_cuda):
    layer = quantized_layer(128, 64, 16)
    moefuse_runtime.install(layer, reserve_bytes=0)
    x = mx.zeros((1, 8, 128), dtype=mx.bfloat16)
    assert layer.kernels.pick(x, mx.zeros((1, 8, 4), mx.uint32)) is layer.kernels.decode
    assert layer.kernels.pick(x, mx.zeros((1, 9, 4), mx.uint32)) is layer.kernels.grouped
    # an input in another dtype than the scales keeps gather_qmm
    assert layer.kernels.pick(x.astype(mx.float16), mx.zeros((1, 9, 4), mx.uint32)) is None


CHECKPOINTS = {
    # issue 13's targets at their layer dimensions (hidden, width), one
    # expert: the expert count moves only the decode range
    "Qwen3-30B-A3B 4-bit": ((2048, 768), {"bits": 4}, None, "swiglu"),
    "Qwen3-30B-A3B 8-bit": ((2048, 768), {"bits": 8}, None, "swiglu"),
    "Qwen3-30B-A3B 3-bit": ((2048, 768), {"bits": 3}, None, "swiglu"),
    "Qwen3-30B-A3B 5-bit": ((2048, 768), {"bits": 5}, None, "swiglu"),
    "Qwen3-30B-A3B 6-bit": ((2048, 768), {"bits": 6}, None, "swiglu"),
    "GPT-OSS-120B mxfp4, biases": (
        (2880, 2880),
        {"mode": "mxfp4", "bias": True},
        SwigluOAI(),
        "swiglu oai",
    ),
    "DeepSeek-V3 mxfp4, clamped": (
        (7168, 2048),
        {"mode": "mxfp4"},
        DeepseekV41SwiGLU(10.0),
        "limited swiglu",
    ),
    "Mixtral-8x7B 4-bit": ((4096, 14336), {"bits": 4}, None, "swiglu"),
    "nvfp4, down global scale": (
        (2048, 768),
        {"mode": "nvfp4", "global_scale": True},
        None,
        "swiglu",
    ),
}


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_issue_checkpoints_take_both_kernel_paths(name, as_cuda):
    (hidden, width), quant, activation, act_name = CHECKPOINTS[name]
    layer = quantized_layer(hidden, width, 1, **quant)
    if activation is not None:
        layer.activation = activation
    report = moefuse_runtime.install(layer, reserve_bytes=0)
    assert report.layers[0].compute_path == (
        f"cuda kernels <= 32 pairs (gate_up+{act_name}, down: kernel); "
        "tensor cores above (down: kernel)"
    )


def test_pre_ampere_gpus_keep_gather_qmm_above_decode(as_cuda):
    as_cuda["value"] = "sm_75"
    layer = quantized_layer(128, 64, 16)
    moefuse_runtime.install(layer, reserve_bytes=0)
    assert layer.kernels.grouped is None
    assert "gather_qmm above (sm_75 is older than sm_80)" in kernel_paths(layer)[1]


def test_decode_range_follows_the_measured_crossovers(as_cuda):
    # the decode kernels stop at half a pair per expert against the tensor
    # cores, one per expert where they are missing (tests/test_tiles.py)
    layer = quantized_layer(64, 64, 128)
    moefuse_runtime.install(layer, reserve_bytes=0)
    assert layer.kernels.decode.max_pairs == 64 == layer.kernels.grouped.min_pairs
    assert kernel_paths(layer)[1].startswith("cuda kernels <= 64 pairs")
    as_cuda["value"] = "sm_75"
    assert kernel_paths(layer)[1].startswith("cuda kernels <= 128 pairs")


def test_arrays_past_32_bit_offsets_keep_gather_qmm(as_cuda, monkeypatch):
    # the kernels index with 32-bit offsets; gate_up's 16 experts x 128 rows
    # x 16 words are 32,768 words, which a limit of 2^15 rejects
    monkeypatch.setattr(grouped, "OFFSET_LIMIT", 2**15)
    layer = quantized_layer(128, 64, 16)
    moefuse_runtime.install(layer, reserve_bytes=0)
    assert layer.kernels.grouped is None
    assert "(gate_up_proj has 32768 packed words, past 32-bit offsets)" in kernel_paths(layer)[1]


def test_calls_past_32_bit_offsets_keep_gather_qmm(as_cuda, monkeypatch):
    layer = quantized_layer(128, 64, 16)
    moefuse_runtime.install(layer, reserve_bytes=0)
    x = mx.zeros((1, 64, 128), dtype=mx.bfloat16)
    indices = mx.zeros((1, 64, 4), mx.uint32)  # h: 256 pairs x 64 = 16,384 values
    assert layer.kernels.pick(x, indices) is layer.kernels.grouped
    monkeypatch.setattr(cuda, "OFFSET_LIMIT", 16_384)
    bound_again = dataclasses.replace(layer.kernels)  # the limit is bound at install
    assert bound_again.pick(x, indices) is None
    assert bound_again.pick(x, indices[:, :63]) is bound_again.grouped  # 252 x 64 values


def test_float_down_runs_the_layers_own_down_proj(as_cuda):
    layer = quantized_layer(128, 64, 16, quantize_down=False)
    moefuse_runtime.install(layer, reserve_bytes=0)
    assert layer.kernels.grouped.down is False
    assert "tensor cores above (down: down_proj)" in kernel_paths(layer)[1]
    x = mx.zeros((1, 9, 128), dtype=mx.bfloat16)
    assert layer.kernels.pick(x, mx.zeros((1, 9, 4), mx.uint32)) is layer.kernels.grouped


# -- on the GPU: numerics -------------------------------------------------------


FORMATS = [(bits, gs) for bits in (4, 8) for gs in (32, 64, 128)]
CASES = [(*f, mx.bfloat16) for f in FORMATS] + [(4, 64, mx.float16), (8, 32, mx.float16)]


@needs_cuda
@pytest.mark.parametrize(("bits", "group_size", "dtype"), CASES)
@pytest.mark.parametrize("tokens", [40, 300])
def test_qwen3_dims(bits, group_size, dtype, tokens):
    # 40 x 8 = 320 pairs (2.5 per expert: small tiles), 300 x 8 = 2400 (~19)
    layer = quantized_layer(2048, 768, 128, bits=bits, group_size=group_size, dtype=dtype)
    x = mx.random.normal((1, tokens, 2048)).astype(dtype)
    indices = mx.random.randint(0, 128, (1, tokens, 8)).astype(mx.uint32)
    compare(layer, x, indices, dtype, "grouped")


@needs_cuda
def test_experts_with_zero_one_and_many_rows():
    layer = quantized_layer(1024, 256, 16)
    many = [[3, 3, 3, 9]] * 150  # expert 3 three times per token: 450 rows
    one = [[15, 0, 3, 9]]  # experts 15 and 0 get one row each
    indices = mx.array(many + one, dtype=mx.uint32)  # experts 1-2, 4-8, 10-14: none
    x = mx.random.normal((151, 1024)).astype(mx.bfloat16)
    compare(layer, x, indices, mx.bfloat16, "grouped")


@needs_cuda
@pytest.mark.parametrize("swiglu", [True, False])
@pytest.mark.parametrize("rows_per_expert", [2, 30, 300])
def test_every_output_element_is_written(swiglu, rows_per_expert):
    layer = quantized_layer(2880, 96, 5, group_size=32)
    moefuse_runtime.install(layer, reserve_bytes=0)
    proj = QuantizedArrays.of(layer.gate_up_proj if swiglu else layer.down_proj)
    pairs = 5 * rows_per_expert
    k = proj.weight.shape[-1] * 32 // proj.bits
    x = mx.random.normal((pairs // (2 if swiglu else 1), k)).astype(mx.bfloat16)
    indices = mx.random.randint(0, 5, (pairs,)).astype(mx.uint32)
    weights = (proj.format, proj.format)
    tiling = grouped.GroupedKernels(True, 0).tilings(5 * rows_per_expert, 5, weights)
    tiling = tiling[0 if swiglu else 1]
    order, tiles, _ = grouped.route(indices, 5, (tiling.bm, tiling.bm))
    act = SWIGLU_ACT if swiglu else None
    out = grouped.grouped_gemm(
        x,
        proj,
        order,
        tiles,
        activation=act,
        top_k=2 if swiglu else 1,
        tiling=tiling,
        init_value=float("nan"),
    )
    assert out.shape == (pairs, proj.weight.shape[-2] // (2 if swiglu else 1))  # 96 or 2880
    assert not mx.isnan(out).any().item()


SHARED_AND_REGISTERS = [
    (grouped.Tiling(16, 128, 1, 4, 4), grouped.Tiling(16, 128, 1, 4, 4, 4, b_regs=True)),
    (grouped.Tiling(32, 128, 1, 4, 4), grouped.Tiling(32, 128, 1, 4, 4, 4, b_regs=True)),
    (grouped.Tiling(64, 128, 2, 4, 4), grouped.Tiling(64, 128, 1, 4, 4, b_regs=True)),
    # `moefuse tune`'s wide candidate against the shipped register tiling of its BM
    (grouped.Tiling(128, 256, 2, 4, 3), grouped.Tiling(128, 128, 2, 4, 3, 1, b_regs=True)),
]


WORDWISE = [(2, 32, mx.bfloat16), (3, 32, mx.bfloat16), (5, 64, mx.bfloat16), (6, 128, mx.float16)]


@needs_cuda
@pytest.mark.parametrize(("bits", "group_size", "dtype"), CASES + WORDWISE)
@pytest.mark.parametrize("swiglu", [True, False])
@pytest.mark.parametrize(
    "tilings", SHARED_AND_REGISTERS, ids=["bm16", "bm32", "bm64", "bm128-wide"]
)
def test_dequant_in_registers_equals_shared(bits, group_size, dtype, swiglu, tilings):
    # The same dequantized values in the same mma order: bitwise equal.
    # gate_up: hidden 2912 (group 32: a k tail) or 2944, width 90 (columns
    # past N); down: k 96 (group 32: a tail) or 384, 2912/2944 outputs.
    # 7 experts, 2, 14, 40 or 170 rows each.
    hidden = 2912 if group_size == 32 else 2944
    width = 90 if swiglu else 96 if group_size == 32 else 384
    layer = quantized_layer(
        hidden, width, 7, bits=bits, group_size=group_size, dtype=dtype, quantize_down=not swiglu
    )
    report = moefuse_runtime.install(layer, reserve_bytes=0)
    assert report.fused, str(report)
    proj = QuantizedArrays.of(layer.gate_up_proj if swiglu else layer.down_proj)
    k = proj.weight.shape[-1] * 32 // bits
    pairs = {16: 14, 32: 98, 64: 280, 128: 1190}[tilings[0].bm]
    x = mx.random.normal((pairs // (2 if swiglu else 1), k)).astype(dtype)
    indices = mx.random.randint(0, 7, (pairs,)).astype(mx.uint32)
    order, tiles, _ = grouped.route(indices, 7, (tilings[0].bm, tilings[0].bm))
    shared, registers = (
        grouped.grouped_gemm(
            x,
            proj,
            order,
            tiles,
            activation=SWIGLU_ACT if swiglu else None,
            top_k=2 if swiglu else 1,
            tiling=tiling,
            init_value=float("nan"),
        )
        for tiling in tilings
    )
    assert not mx.isnan(registers).any().item()
    assert mx.array_equal(shared, registers).item()


def needs_hopper():
    """Skip (with the reason) off sm_90, where tiles.py never picks wgmma."""
    arch = jit.device_arch()
    if jit.arch_number(arch) != 90:
        pytest.skip(f"the wgmma kernel runs on sm_90 only, this GPU is {arch}")


HOPPER_FORMATS = [
    ("affine", 4, 32, mx.bfloat16),
    ("affine", 4, 64, mx.bfloat16),
    ("affine", 4, 128, mx.float16),
    ("affine", 8, 32, mx.float16),
    ("affine", 8, 64, mx.bfloat16),
    ("mxfp4", 4, 32, mx.bfloat16),
    ("nvfp4", 4, 16, mx.bfloat16),
    ("mxfp8", 8, 32, mx.float16),
]
HOPPER_TILINGS = [
    grouped.Tiling(64, 128, 1, 8, 4, wgmma=True),
    grouped.Tiling(128, 256, 1, 16, 3, wgmma=True),
    grouped.Tiling(256, 128, 1, 8, 3, wgmma=True),
    grouped.Tiling(128, 256, 1, 16, 4, wgmma=True, overlap=True),
    grouped.Tiling(128, 256, 1, 8, 4, wgmma=True, producer=True),
    grouped.Tiling(256, 128, 1, 8, 3, wgmma=True, producer=True),
    grouped.Tiling(64, 128, 1, 8, 4, wgmma=True, overlap=True, producer=True),
    grouped.Tiling(128, 128, 1, 8, 3, min_blocks=2, wgmma=True),
]
HOPPER_IDS = [
    "bm64",
    "bm128-bn256",
    "bm256",
    "bm128-bn256-overlap",
    "bm128-bn256-producer",
    "bm256-producer",
    "bm64-producer-overlap",
    "bm128-two-per-sm",
]


def test_every_shipped_hopper_tiling_is_a_gpu_test_tiling():
    # what a table can pick on an H100 or H200 runs in the GPU tests below
    tables, _ = shipped_tables()
    shipped = {
        entry.tiling
        for table in tables.values()
        for entry in (*table.gate_up, *table.down)
        if entry.tiling.wgmma
    }
    assert shipped and shipped <= set(HOPPER_TILINGS), shipped - set(HOPPER_TILINGS)


@needs_cuda
@pytest.mark.parametrize(("mode", "bits", "group_size", "dtype"), HOPPER_FORMATS)
@pytest.mark.parametrize("swiglu", [True, False])
@pytest.mark.parametrize("tiling", HOPPER_TILINGS, ids=HOPPER_IDS)
def test_wgmma_matches_the_mma_sync_kernel(mode, bits, group_size, dtype, swiglu, tiling):
    # The same dequantized weights and products as the register-fragment
    # mma.sync kernel of the same BM, summed in the tensor cores' own order:
    # close, not bitwise. gate_up: hidden 2912 (a k tail) or 2944, width 90
    # (columns past N); down: k 96 or 384, 2912/2944 outputs. 7 experts,
    # 1-300 rows each (one tile of a BM 256, partial ones everywhere). A
    # copying warpgroup (producer) changes who copies, not what is summed.
    needs_hopper()
    hidden = 2912 if group_size == 32 else 2944
    width = 90 if swiglu else 96 if group_size == 32 else 384
    quant = {"bits": bits, "group_size": group_size} if mode == "affine" else {"mode": mode}
    layer = quantized_layer(
        hidden, width, 7, dtype=dtype, quantize_down=not swiglu, bias=mode == "mxfp4", **quant
    )
    report = moefuse_runtime.install(layer, reserve_bytes=0)
    assert report.fused, str(report)
    proj = QuantizedArrays.of(layer.gate_up_proj if swiglu else layer.down_proj)
    k = proj.weight.shape[-1] * 32 // bits
    counts = [1, 63, 64, 65, 130, 300, 7]  # 630 pairs
    indices = np.random.default_rng(1).permutation(np.repeat(np.arange(7), counts))
    indices = mx.array(indices, dtype=mx.uint32)
    x = mx.random.normal((indices.size // (2 if swiglu else 1), k)).astype(dtype)
    mma_sync = (
        grouped.Tiling(64, 128, 1, 4, 4, b_regs=True)
        if tiling.bm == 64
        else grouped.Tiling(128, 128, 2, 4, 3, b_regs=True)
    )
    order, *schedules = grouped.route(indices, 7, (tiling.bm, mma_sync.bm))
    wgmma, expected = (
        grouped.grouped_gemm(
            x,
            proj,
            order,
            tiles,
            activation=SWIGLU_ACT if swiglu else None,
            top_k=2 if swiglu else 1,
            tiling=each,
            init_value=float("nan"),
        )
        for each, tiles in zip((tiling, mma_sync), schedules, strict=True)
    )
    assert not mx.isnan(wgmma).any().item()
    assert relative_error(wgmma, expected) < TOLERANCE[dtype] / 4


@needs_cuda
@pytest.mark.parametrize(("mode", "bits", "group_size", "dtype"), HOPPER_FORMATS[1::3])
@pytest.mark.parametrize("swiglu", [True, False])
@pytest.mark.parametrize("overlap", [False, True])
def test_a_copying_warpgroup_changes_no_bit(mode, bits, group_size, dtype, swiglu, overlap):
    # The same fragments and wgmmas in the same order, whoever copies the
    # stages and however they are handed over: bitwise the same output.
    # 2,944 inputs: 46 k-tiles through 4 stages, so every barrier phase
    # turns over many times; down's 384: 6 k-tiles.
    needs_hopper()
    width = 90 if swiglu else 384
    quant = {"bits": bits, "group_size": group_size} if mode == "affine" else {"mode": mode}
    layer = quantized_layer(2944, width, 7, dtype=dtype, quantize_down=not swiglu, **quant)
    moefuse_runtime.install(layer, reserve_bytes=0)
    proj = QuantizedArrays.of(layer.gate_up_proj if swiglu else layer.down_proj)
    k = proj.weight.shape[-1] * 32 // bits
    counts = [1, 63, 64, 65, 130, 300, 7]
    indices = np.random.default_rng(2).permutation(np.repeat(np.arange(7), counts))
    indices = mx.array(indices, dtype=mx.uint32)
    x = mx.random.normal((indices.size // (2 if swiglu else 1), k)).astype(dtype)
    block_barrier = grouped.Tiling(128, 256, 1, 8, 4, wgmma=True, overlap=overlap)
    copying = dataclasses.replace(block_barrier, producer=True)
    order, tiles, _ = grouped.route(indices, 7, (128, 128))
    plain, produced = (
        grouped.grouped_gemm(
            x,
            proj,
            order,
            tiles,
            activation=SWIGLU_ACT if swiglu else None,
            top_k=2 if swiglu else 1,
            tiling=tiling,
            init_value=float("nan"),
        )
        for tiling in (block_barrier, copying)
    )
    assert not mx.isnan(produced).any().item()
    assert mx.array_equal(plain, produced).item()


def hopper_table(path: Path) -> Path:
    """A table of the user's: the wgmma tilings above 16 rows per expert,
    each followed by an mma.sync tiling for the GPUs without wgmma."""
    small = grouped.Tiling(16, 128, 1, 4, 4, 4, b_regs=True)
    mma_sync = grouped.Tiling(64, 128, 1, 4, 4, b_regs=True)
    runs = [(16, small), (100, HOPPER_TILINGS[0]), (100, mma_sync)]
    runs += [(None, HOPPER_TILINGS[2]), (None, mma_sync)]
    entries = [{"max_rows_per_expert": r, "tiling": dataclasses.asdict(t)} for r, t in runs]
    path.write_text(json.dumps({"gate_up": entries, "down": entries}))
    return path


def test_a_users_table_takes_the_wgmma_kernel_on_sm_90_alone(as_cuda, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEFUSE_TILES", str(hopper_table(tmp_path / "tiles.json")))
    for arch, wgmma in (("sm_90", True), ("sm_89", False)):
        as_cuda["value"] = arch
        layer = quantized_layer(256, 128, 128)
        moefuse_runtime.install(layer, reserve_bytes=0)
        path = layer.kernels.grouped
        for tokens, bm in ((300, 64), (2048, 256 if wgmma else 64)):
            chosen = path.tilings(tokens * 8, 128, (AFFINE_4, AFFINE_4))
            assert [(t.wgmma, t.bm) for t in chosen] == [(wgmma, bm)] * 2
        assert path.tilings(128, 128, (AFFINE_4, AFFINE_4))[0].bm == 16  # 1 row per expert


@needs_cuda
@pytest.mark.parametrize("tokens", [300, 2048])
@pytest.mark.parametrize(("bits", "dtype"), [(4, mx.bfloat16), (8, mx.float16)])
def test_wgmma_tables_run_qwen3_layers(tokens, bits, dtype, tmp_path, monkeypatch):
    # the wgmma tilings in a whole layer (300 tokens: 19 rows per expert, BM
    # 64; 2,048: 128, BM 256) against float32 and gather_qmm (compare)
    needs_hopper()
    monkeypatch.setenv("MOEFUSE_TILES", str(hopper_table(tmp_path / "tiles.json")))
    layer = quantized_layer(2048, 768, 128, bits=bits, dtype=dtype)
    x = mx.random.normal((1, tokens, 2048)).astype(dtype)
    indices = mx.random.randint(0, 128, (1, tokens, 8)).astype(mx.uint32)
    compare(layer, x, indices, dtype, "grouped")
    weights = WeightFormat("affine", bits)
    chosen = layer.kernels.grouped.tilings(tokens * 8, 128, (weights, weights))
    assert all(t.wgmma for t in chosen)


@needs_cuda
def test_route_matches_the_routing():
    indices = mx.array([5, 0, 5, 5, 2, 0] * 40, dtype=mx.uint32)  # 80 of 0, 40 of 2, 120 of 5
    order, tiles_64, tiles_16 = (np.array(a) for a in grouped.route(indices, 7, (64, 16)))
    assert sorted(order.tolist()) == list(range(240))
    assert np.array(indices)[order].tolist() == [0] * 80 + [2] * 40 + [5] * 120
    live = tiles_64[tiles_64[:, 0] >= 0]
    assert live.tolist() == [
        [0, 0, 64, 0],
        [0, 64, 80, 0],
        [2, 80, 120, 0],
        [5, 120, 184, 0],
        [5, 184, 240, 0],
    ]
    assert len(tiles_64) == grouped.max_tiles(240, 7, 64)
    assert (tiles_64[len(live) :, 0] == -1).all()
    assert tiles_16.tolist() == np.array(emulated_route(indices, 7, (16, 16))[1]).tolist()


@needs_cuda
@pytest.mark.parametrize(
    ("pairs", "experts", "skew"),
    [
        (1, 8, 0),
        (257, 128, 0),
        (4100, 7, 0),
        (16384, 128, 1),
        (131072, 128, 0),
        (3000, 512, 2),
        (20000, 1024, 0),
    ],
)
def test_route_against_numpy(pairs, experts, skew):
    # Uniform routings, one expert taking nearly every pair (its atomics
    # serialized), more pairs than threads, more experts than 128.
    rng = np.random.default_rng(pairs)
    ids = rng.integers(0, experts, pairs)
    if skew == 1:
        ids[rng.random(pairs) < 0.95] = 3
    elif skew == 2:
        ids = rng.integers(experts - 40, experts, pairs)  # only the last experts
    indices = mx.array(ids.astype(np.uint32))
    got = grouped.route(indices, experts, (16, 64))
    want = emulated_route(indices, experts, (16, 64))
    order = np.array(got[0])
    assert sorted(order.tolist()) == list(range(pairs))
    assert (ids[order] == np.sort(ids)).all()
    for tiles, expected in zip(got[1:], want[1:], strict=True):
        assert np.array(tiles).tolist() == np.array(expected).tolist()


@needs_cuda
def test_16384_tokens_top8_in_one_call():
    # 131,072 pairs: more than a grid's y or z may hold (65,535)
    layer = quantized_layer(2048, 768, 128)
    x = mx.random.normal((16384, 2048)).astype(mx.bfloat16) * 0.5
    indices = mx.random.randint(0, 128, (16384, 8)).astype(mx.uint32)
    sample = slice(0, 16384, 997)  # a float32 check of every 997th token
    ref = reference(layer, x[sample], indices[sample])
    moefuse_runtime.install(layer, reserve_bytes=0)
    assert layer.kernels.pick(x, indices) is layer.kernels.grouped
    out = layer(x, indices)
    mx.eval(out)
    assert out.shape == (16384, 8, 2048)
    assert mx.isfinite(out).all().item()
    assert relative_error(out[sample], ref) < TOLERANCE[mx.bfloat16]


@needs_cuda
def test_bf16_model_prefill_close_to_unfused():
    from moefuse_runtime.demo import build_demo_model

    plain = build_demo_model("tiny", dtype=mx.bfloat16)
    model = build_demo_model("tiny", dtype=mx.bfloat16)
    report = moefuse_runtime.install(model, reserve_bytes=0)
    assert all("tensor cores above" in r.compute_path for r in report.layers), str(report)
    tokens = mx.random.randint(0, 512, (2, 96))  # a batch-2 prompt: the grouped path
    error = relative_error(model(tokens), np.array(plain(tokens).astype(mx.float32)))
    assert error < TOLERANCE[mx.bfloat16], error


# -- everywhere: the data flow around the kernels, with their contract emulated --


def emulated_route(flat_indices, experts, bms):
    """What route computes, in numpy (its contract, not its code): a stable
    sort, and each expert's rows cut into tiles of BM."""
    idx = np.array(flat_indices)
    order = np.argsort(idx, kind="stable").astype(np.uint32)
    ids = idx[order]
    schedules = []
    for bm in bms:
        tiles = [
            [e, s, min(s + bm, end), 0]
            for e in range(experts)
            for start, end in [(np.searchsorted(ids, e), np.searchsorted(ids, e, "right"))]
            for s in range(start, end, bm)
        ]
        tiles += [[-1, 0, 0, 0]] * (grouped.max_tiles(idx.size, experts, bm) - len(tiles))
        schedules.append(mx.array(np.array(tiles, np.int32)))
    return mx.array(order), *schedules


def emulated_gemm(x, proj, order, tiles, *, activation, top_k, tiling, init_value=None):
    """What grouped_gemm computes, in numpy float32, row by row of every tile."""
    w = np.array(
        mx.dequantize(proj.weight, proj.scales, proj.biases, proj.group_size, proj.bits).astype(
            mx.float32
        )
    )
    xs, order = np.array(x.astype(mx.float32)), np.array(order)
    swiglu = activation is not None
    n = w.shape[1] // (2 if swiglu else 1)
    both = swiglu and activation.kind == activations.NONE
    out = np.full((order.size, 2 * n if both else n), np.nan, np.float32)
    for expert, start, end, _ in np.array(tiles).tolist():
        if expert < 0:
            continue
        rows = np.arange(start, end)
        a = xs[order[rows] // top_k] if swiglu else xs[rows]
        y = a @ w[expert].T
        if both:
            out[rows] = y
        elif swiglu:
            out[rows] = activation.reference(y[:, n:], y[:, :n])
        else:
            out[order[rows]] = y
    return mx.array(out).astype(x.dtype)


class UnknownActivation(nn.Module):
    """An activation no kernel knows: it runs between the kernels."""

    def __call__(self, x, gate):
        return mx.tanh(gate) * x - 0.5 * gate


ACTIVATIONS = {"swiglu": None, "oai": SwigluOAI, "unknown": UnknownActivation}


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("quantize_down", [True, False])
@pytest.mark.parametrize(("tokens", "experts", "top_k"), [(3, 8, 2), (40, 16, 4), (100, 5, 3)])
def test_grouped_data_flow_matches_switch_glu(
    monkeypatch, cpu_device, tokens, experts, top_k, quantize_down, activation
):
    # Sorting, the x gather for gate_up, the scatter back to pair order and
    # the float-down fallback, with the kernels replaced by their contract:
    # the fused FFN must equal the unfused SwitchGLU.  It runs on the CPU
    # device everywhere: on CUDA, MLX's float32 matmuls round through TF32
    # and would blur a data-flow error into rounding.
    monkeypatch.setattr(grouped, "route", emulated_route)
    monkeypatch.setattr(grouped, "grouped_gemm", emulated_gemm)
    layer = quantized_layer(128, 64, experts, dtype=mx.float32, quantize_down=quantize_down)
    if ACTIVATIONS[activation]:
        layer.activation = ACTIVATIONS[activation]()
    x = mx.random.normal((2, tokens, 128))
    indices = mx.random.randint(0, experts, (2, tokens, top_k)).astype(mx.uint32)
    expected = layer(x, indices)
    moefuse_runtime.install(layer, reserve_bytes=0)
    act = activations.kernel_activation(layer.activation)
    assert (
        act.name
        == {"swiglu": "swiglu", "oai": "swiglu oai", "unknown": "mlx activation"}[activation]
    )
    path = grouped.GroupedKernels(quantize_down, 0, compiled=False, activation=act)
    out = path(layer, layer.gate_up_proj, x, indices)
    assert out.shape == expected.shape
    assert relative_error(out, expected) < 1e-5


def test_route_emulation_matches_the_known_routing():
    # The same routing as test_route_matches_the_routing (GPU), emulated.
    tiles = np.array(emulated_route(mx.array([5, 0, 5, 5, 2, 0] * 40), 7, (64, 64))[1])
    assert tiles[tiles[:, 0] >= 0].tolist() == [
        [0, 0, 64, 0],
        [0, 64, 80, 0],
        [2, 80, 120, 0],
        [5, 120, 184, 0],
        [5, 184, 240, 0],
    ]


def test_header_inlines_common_once():
    text = source.header("grouped_gemm.cuh")
    assert '#include "' not in text and "#pragma once" not in text
    assert text.count("struct same_type {") == 1  # common.cuh, once
    assert "__device__ void grouped_gemm(" in text and "__device__ void route(" in text
    hopper = source.header("grouped_wgmma.cuh")  # includes grouped_gemm.cuh, which includes common
    assert '#include "' not in hopper and hopper.count("struct same_type {") == 1
    assert "__device__ void grouped_wgmma(" in hopper and "__device__ void route(" in hopper


def test_kernel_sources_keep_the_python_line_length():
    # The .cuh files read as the Python does: at most 100 characters a line.
    folder = Path(cuda.__file__).parent
    long_lines = [
        f"{path.name}:{number}"
        for path in sorted(folder.glob("*.cuh"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if len(line) > 100
    ]
    assert len(list(folder.glob("*.cuh"))) >= 4 and not long_lines, long_lines


def test_kernel_header_includes_the_file_on_disk():
    # MLX hashes a kernel's whole source per launch: the launchers pass one
    # #include line naming the shipped file, which inlines to `header`.
    line, stamp = source.kernel_header("grouped_gemm.cuh", "sm_90a").splitlines()
    path = Path(line.removeprefix('#include "').removesuffix('"'))
    assert stamp == f"// moefuse_runtime kernels {source.digest()} for sm_90a"
    assert line.startswith('#include "/') and path.is_absolute()
    assert path.read_text() == source.read("grouped_gemm.cuh")  # what `header` inlines
    assert '"common.cuh"' in path.read_text() and (path.parent / "common.cuh").is_file()


def test_kernel_header_inlines_where_the_files_are_not_on_disk(monkeypatch):
    monkeypatch.setattr(source, "on_disk", lambda name: None)
    source.kernel_header.cache_clear()
    try:
        text = source.kernel_header("gemv.cuh", "sm_80")
        assert text.startswith(source.header("gemv.cuh")) and text.endswith("for sm_80\n")
    finally:
        source.kernel_header.cache_clear()


def test_on_disk_refuses_paths_an_include_cannot_carry(monkeypatch, tmp_path):
    odd = tmp_path / 'a "quoted" dir'
    odd.mkdir()
    (odd / "k.cuh").write_text("")
    monkeypatch.setattr(source.resources, "files", lambda package: odd)
    assert source.on_disk("k.cuh") is None
    assert source.on_disk("missing.cuh") is None


def test_launch_bounds_declare_the_kernel_mlx_generates():
    # MLX names a custom kernel custom_kernel_<name><template hash> (seen in an
    # NVRTC error on the H100: ..._bfloat16_t_4_32_2048_768_t_8_16_128_1_4_4)
    # and passes the inputs as const pointers in order, then the output.
    template = (
        ("T", mx.bfloat16),
        ("BITS", 4),
        ("GROUP", 32),
        ("K", 2048),
        ("N", 768),
        ("SWIGLU", True),
        ("TOP_K", 8),
        ("BM", 16),
        ("BN", 128),
        ("WARPS_M", 1),
        ("WARPS_N", 4),
        ("STAGES", 4),
        ("B_REGS", True),
    )
    tiling = grouped.Tiling(16, 128, 1, 4, 4, min_blocks=3, b_regs=True)
    inputs = (
        ("x", mx.bfloat16, 2),
        ("w", mx.uint32, 3),
        ("scales", mx.uint8, 3),
        ("global_scale", mx.float32, 1),
        ("order", mx.uint32, 1),
        ("tiles", mx.int32, 2),
    )
    spec = jit.KernelSpec("moefuse_grouped_gemm", inputs, (("out", mx.bfloat16),), template, "", "")
    text = grouped._launch_bounds(spec, tiling)
    assert (
        "__global__ void __launch_bounds__(128, 3) custom_kernel_moefuse_grouped_gemm_"
        "bfloat16_t_4_32_2048_768_t_8_16_128_1_4_4_t(const __nv_bfloat16* x, const uint32_t* w, "
        "const uint8_t* scales, const float* global_scale, const uint32_t* order, "
        "const int32_t* tiles, __nv_bfloat16* out);"
    ) in text
