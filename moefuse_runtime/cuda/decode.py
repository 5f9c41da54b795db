"""The CUDA decode path: gate_up + SwiGLU, and down, as two custom kernels.

At one token a MoE layer reads each active expert's packed weights once and
does almost no arithmetic, so it should run at memory speed. MLX's
``gather_qmm`` reaches 6-31% of the H100's streaming bandwidth there; these
kernels 38-46% (Qwen3-30B-A3B) to 62-68% (Mixtral) (GPU time,
docs/kernels.md). They are quantized GEMVs over the routed experts: one warp
per output row (four for short down rows), x staged once per block in
shared memory, up to eight 16-byte weight loads in flight per lane, fp32
sums:

* ``gate_up``: each warp reads row ``n`` of the gate half and row ``n`` of the
  up half of ``gate_up_proj`` for one (token, expert) pair and writes only
  ``silu(gate) * up``; the two halves are never written to memory.
* ``down``: the same GEMV without the activation, on ``down_proj``.

The two launches run under mx.compile: a decode step's wall time is mostly
host work per op, which a compiled call replays without Python. Only affine
4- and 8-bit weights with group sizes 32/64/128 and the plain `SwiGLU`
activation take this path, and only for few (token, expert) pairs (decode);
everything else, and every other backend, keeps ``gather_qmm``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from . import source

KERNEL_BITS = (4, 8)
KERNEL_GROUP_SIZES = (32, 64, 128)
KERNEL_DTYPES = (mx.bfloat16, mx.float16)
"""Scale (and activation) dtypes of the kernels; float32 models stay exact on gather_qmm."""

MIN_MAX_PAIRS, MAX_MAX_PAIRS = 32, 128
"""Bounds of the decode kernels' pair range (`max_pairs_for`)."""


def max_pairs_for(experts: int, tensor_cores: bool = False) -> int:
    """The most (token, expert) pairs the decode kernels take.

    Measured on an H100 (docs/kernels.md). Against ``gather_qmm`` (GPUs
    without the tensor-core path) they won at every count tried: up to 128
    pairs over 128 experts (Qwen3-30B-A3B) and 32 over 8 (Mixtral), about
    one pair per expert, or four on few experts. Against the tensor cores,
    in a 48-layer decode step over 128 experts: ahead at 64 pairs (by 1.7%),
    behind at 128 (by 7%; ab-decode-boundary.json): half a pair per expert.
    A GEMV reads an expert once per pair, a grouped GEMM once per tile of
    its rows, so the pairs per expert decide, floored at 32 pairs.
    """
    per_expert = experts // 2 if tensor_cores else experts
    return max(MIN_MAX_PAIRS, min(MAX_MAX_PAIRS, per_expert))


GATE_UP_TILING = DOWN_TILING = (1, 8)
SHORT_ROW_TILING = (4, 8)
"""(outputs per warp, warps per block), the best of those profiled on an
H100 (docs/kernels.md). A down row that is at most one 16-byte load per lane
(Qwen3-30B-A3B's width 768 at 4 bits) takes SHORT_ROW_TILING, four rows per
warp: 9.1-9.3 us instead of 10.1. Long rows keep one per warp: Mixtral's
down took 130 us with four, 52 us with one."""


def down_tiling_for(down: QuantizedSwitchLinear) -> tuple[int, int]:
    """The down kernel's tiling for this projection's rows."""
    loads_per_row = down["weight"].shape[-1] // 4  # 4 packed uint32 per 16-byte load
    return SHORT_ROW_TILING if loads_per_row <= 32 else DOWN_TILING


def shared_bytes(k: int, bits: int) -> int:
    """Dynamic shared memory of one block: x pre-scaled (fp32) and its sums."""
    return 4 * (k + k // (128 // bits))


MAX_SHARED_BYTES = 200 * 1024
"""Below the H100's 227 KiB per block, leaving room for two blocks per SM."""


_GEMV_SOURCE = (
    "moefuse::gemv<T, BITS, GROUP, K, N, SWIGLU, X_DIV, OUTS>(x, w, scales, biases, indices, out);"
)


@cache
def _kernel(swiglu: bool, shared: int):
    return mx.fast.cuda_kernel(
        name="moefuse_gate_up_swiglu" if swiglu else "moefuse_down",
        input_names=["x", "w", "scales", "biases", "indices"],
        output_names=["out"],
        source=_GEMV_SOURCE,
        header=source.kernel_header("gemv.cuh"),
        shared_memory=shared,
    )


class QuantizedArrays(NamedTuple):
    """What the kernels read of a quantized projection: arrays and format.

    Arrays rather than the module, so that a compiled call takes them as
    inputs (a module's arrays captured by mx.compile would be constants,
    stale once the layer's weights change).
    """

    weight: mx.array
    scales: mx.array
    biases: mx.array
    bits: int
    group_size: int

    @classmethod
    def of(cls, proj: QuantizedSwitchLinear) -> QuantizedArrays:
        return cls(proj["weight"], proj["scales"], proj["biases"], proj.bits, proj.group_size)

    def template(self, x: mx.array, n: int, swiglu: bool) -> list[tuple[str, object]]:
        """The template constants both kernels take for this format and shape."""
        return [("T", x.dtype), ("BITS", self.bits), ("GROUP", self.group_size),
                ("K", x.shape[-1]), ("N", n), ("SWIGLU", swiglu)]  # fmt: skip


def gather_qmv(
    x: mx.array,
    proj: QuantizedArrays,
    indices: mx.array,
    *,
    swiglu: bool,
    x_div: int,
    init_value: float | None = None,
    outs: int = 1,
    warps: int = 8,
) -> mx.array:
    """``out[p] = proj(x[p // x_div])`` for expert ``indices[p]``, one row per pair.

    With ``swiglu``, ``proj`` is ``gate_up_proj`` and the result is
    ``silu(gate) * up`` (half its outputs). ``x`` is (rows, K), ``indices``
    flat uint32; returns (pairs, N). ``init_value`` pre-fills the output
    (tests poison it with NaN to prove every element is written). x rows are
    read in 16-byte loads: MLX passes row-contiguous copies, whose rows start
    16-byte aligned since ``why_not_kernel`` asks K to fill whole loads.
    """
    k = x.shape[-1]
    n = proj.weight.shape[-2] // (2 if swiglu else 1)
    blocks = math.ceil(n / (warps * outs))
    (out,) = _kernel(swiglu, shared_bytes(k, proj.bits))(
        inputs=[x, proj.weight, proj.scales, proj.biases, indices],
        template=[*proj.template(x, n, swiglu), ("X_DIV", x_div), ("OUTS", outs)],
        grid=(32 * warps * blocks, indices.size, 1),
        threadgroup=(32 * warps, 1, 1),
        output_shapes=[(indices.size, n)],
        output_dtypes=[x.dtype],
        init_value=init_value,
    )
    return out


def why_not_kernel(proj: nn.Module) -> str | None:
    """Why this expert projection cannot run on the decode kernels, or None."""
    # mlx-lm's and mlx-vlm's QuantizedSwitchLinear: quantized expert arrays.
    if getattr(proj, "bits", None) is None or proj["weight"].ndim != 3:
        return f"{type(proj).__name__} is not quantized"
    if proj.mode != "affine" or proj.bits not in KERNEL_BITS:
        return f"{proj.mode} {proj.bits}-bit (kernels: affine {KERNEL_BITS}-bit)"
    if proj.group_size not in KERNEL_GROUP_SIZES:
        return f"group size {proj.group_size} (kernels: {KERNEL_GROUP_SIZES})"
    if "bias" in proj or proj.get("biases") is None:
        return "bias term (kernels have none)"
    if proj["scales"].dtype not in KERNEL_DTYPES:
        return f"{proj['scales'].dtype} scales"
    k = proj["weight"].shape[-1] * 32 // proj.bits
    if k % (128 // proj.bits):
        return f"input size {k} does not fill whole 16-byte loads"
    if shared_bytes(k, proj.bits) > MAX_SHARED_BYTES:
        return f"input size {k} does not fit in shared memory"
    return None


@dataclass(frozen=True)
class DecodeKernels:
    """The kernel path of one fused layer: always gate_up, down when it qualifies.

    A tiling is (outputs per warp, warps per block), see `gather_qmv`. With
    both kernels the call runs under mx.compile (``compiled``): at decode
    sizes the layer's wall time is mostly host work per op, and a compiled
    call replays its graph without running Python per op (docs/kernels.md).
    """

    down: bool
    max_pairs: int = MIN_MAX_PAIRS
    gate_up_tiling: tuple[int, int] = GATE_UP_TILING
    down_tiling: tuple[int, int] = DOWN_TILING
    compiled: bool = True

    def takes(self, layer: nn.Module, x: mx.array, indices: mx.array) -> bool:
        return indices.size <= self.max_pairs and x.dtype == layer.gate_up_proj["scales"].dtype

    def __call__(self, layer: nn.Module, x: mx.array, indices: mx.array) -> mx.array:
        gate_up = QuantizedArrays.of(layer.gate_up_proj)
        if not self.down:
            h = self.gate_up(x, flat_uint32(indices), indices.shape[-1], gate_up)
            h = h.reshape(*indices.shape, 1, h.shape[-1])
            return layer.down_proj(h, indices).squeeze(-2)
        down = QuantizedArrays.of(layer.down_proj)
        if not self.compiled:
            return self.ffn(x, indices, gate_up, down)
        formats = (gate_up.bits, gate_up.group_size, down.bits, down.group_size)
        return _compiled_ffn(self, formats)(x, indices, gate_up[:3], down[:3])

    def gate_up(
        self, x: mx.array, flat: mx.array, top_k: int, gate_up: QuantizedArrays
    ) -> mx.array:
        """silu(gate) * up for each (token, expert) pair: (pairs, width)."""
        outs, warps = self.gate_up_tiling
        x = x.reshape(-1, x.shape[-1])
        return gather_qmv(x, gate_up, flat, swiglu=True, x_div=top_k, outs=outs, warps=warps)

    def ffn(
        self, x: mx.array, indices: mx.array, gate_up: QuantizedArrays, down: QuantizedArrays
    ) -> mx.array:
        """The whole FFN on the two kernels: (..., top_k, hidden), as SwitchGLU."""
        flat = flat_uint32(indices)
        h = self.gate_up(x, flat, indices.shape[-1], gate_up)
        outs, warps = self.down_tiling
        y = gather_qmv(h, down, flat, swiglu=False, x_div=1, outs=outs, warps=warps)
        return y.reshape(*indices.shape, y.shape[-1])


def flat_uint32(indices: mx.array) -> mx.array:
    """The routing indices as the kernels read them: flat, uint32."""
    flat = indices.reshape(-1)
    return flat if flat.dtype == mx.uint32 else flat.astype(mx.uint32)


@cache
def _compiled_ffn(kernels: DecodeKernels, formats: tuple[int, int, int, int]):
    """`DecodeKernels.ffn` under mx.compile, one per tiling and weight format
    (shared by the layers that have them); the arrays are its inputs."""
    gate_up_format, down_format = formats[:2], formats[2:]

    def ffn(x, indices, gate_up, down):
        gate_up = QuantizedArrays(*gate_up, *gate_up_format)
        return kernels.ffn(x, indices, gate_up, QuantizedArrays(*down, *down_format))

    return mx.compile(ffn)
