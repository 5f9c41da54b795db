"""The tensor-core path: the fused FFN as grouped GEMMs over the routed experts.

Above the decode kernels' pair count (prefill, batched decode), MLX's sorted
``gather_qmm`` computes each (token, expert) pair as its own one-row matrix
product: 5 TFLOP/s on an H100. Here the pairs are sorted by expert and each
expert's rows run as one GEMM on the tensor cores (grouped_gemm.cuh), packed
weights dequantized into the mma fragments, fp32 accumulation:

    order, tiles = route(indices)     pairs grouped by expert, (expert, rows)
                                      per tile of BM rows: one launch
    h     = grouped_gemm(x, gate_up)  silu(gate) * up, sorted rows
    y     = grouped_gemm(h, down)     each row back to its pair's place

Tile shapes come from tiles.json (measured; scripts/tune_grouped.py), looked
up by device, weight bits and rows per expert. Measured on an H100
(docs/kernels.md): a Qwen3-30B-A3B layer at 2,048 tokens runs its kernels at
about 150 TFLOP/s (gather_qmm: 4.8), prefill of a 48-layer model x15-16, and
a 64-sequence decode step x1.61-1.66.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache, lru_cache

import mlx.core as mx

from . import source
from .decode import QuantizedArrays, flat_uint32

GEMM_BK = 64
"""k values per pipeline stage (grouped_gemm.cuh: GEMM_BK)."""


@dataclass(frozen=True)
class Tiling:
    """One block's work: BM x BN outputs, warps as WARPS_M x WARPS_N, a
    STAGES-deep copy pipeline, at least MIN_BLOCKS blocks per SM (a register
    cap the compiler honours through __launch_bounds__), and where packed
    weights are dequantized: a shared tile per block, or with B_REGS each
    warp's mma fragments (grouped_gemm.cuh)."""

    bm: int
    bn: int
    warps_m: int
    warps_n: int
    stages: int
    min_blocks: int = 1
    b_regs: bool = False

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n

    def shared_bytes(self, bits: int) -> int:
        """A stages, packed B stages and (without B_REGS) two dequantized B
        tiles, in 16-byte chunks."""
        chunks = self.stages * (self.bm * 8 + self.bn * GEMM_BK * bits // 128)
        return 16 * (chunks + (0 if self.b_regs else 2 * self.bn * 8))

    def why_not(self, swiglu: bool, bits: int) -> str | None:
        """Why the kernel's static checks would reject this tiling, or None."""
        wm, wn = self.bm // self.warps_m, self.bn // self.warps_n
        if wm % 16 or wn % (32 if swiglu else 16) or self.stages < 3:
            return f"{self} does not split into warp tiles"
        if self.shared_bytes(bits) > MAX_SHARED_BYTES:
            return f"{self} needs {self.shared_bytes(bits)} bytes of shared memory"
        return None


OFFSET_LIMIT = 2**32
"""The kernels index x, h, packed weights and scales with 32-bit offsets
(fewer registers, more blocks per SM): arrays at least this long are not
taken (`why_not_grouped`, `GroupedKernels.takes`)."""


def why_not_grouped(layer) -> str | None:
    """Why this layer's projections are too large for 32-bit offsets, or None."""
    for name in ("gate_up_proj", "down_proj"):
        words = layer[name]["weight"].size
        if words >= OFFSET_LIMIT:
            return f"{name} has {words} packed words, past 32-bit offsets"
    return None


MAX_SHARED_BYTES = 227 * 1024
"""Shared memory one block may have on sm_80 (A100) and sm_90 (H100)."""


@cache
def _table() -> dict:
    return json.loads(source.read("tiles.json"))


def tiling_for(arch: str, rows_per_expert: float, swiglu: bool, bits: int) -> Tiling:
    """The measured tiling for this device, weight format and density
    (tiles.json: the first entry whose ``bits``, if given, and
    ``max_rows_per_expert``, if not null, hold)."""
    table = _table()
    by_kind = table.get(arch, table["default"])["gate_up" if swiglu else "down"]
    for entry in by_kind:
        if bits not in entry.get("bits", [bits]):
            continue
        if entry["max_rows_per_expert"] is None or rows_per_expert <= entry["max_rows_per_expert"]:
            return Tiling(**entry["tiling"])
    raise ValueError(f"tiles.json: no catch-all entry for {arch}")


@lru_cache(maxsize=4096)
def _tilings(
    arch: str, pairs: int, experts: int, bits: tuple[int, int | None]
) -> tuple[Tiling, Tiling | None]:
    """`GroupedKernels.tilings`, looked up once per pair count: a call's host
    time adds to a decode step's wall time (the table walk cost about 4 us
    per layer and call)."""
    rows_per_expert = pairs / min(experts, pairs)  # at least one row per expert hit
    return (
        tiling_for(arch, rows_per_expert, swiglu=True, bits=bits[0]),
        None if bits[1] is None else tiling_for(arch, rows_per_expert, swiglu=False, bits=bits[1]),
    )


def max_tiles(pairs: int, experts: int, bm: int) -> int:
    """Tiles the schedule may need (grouped_gemm.cuh: max_tiles)."""
    return math.ceil(pairs / bm) + min(experts, pairs)


ROUTE_THREADS = 1024
ROUTE_SOURCE = "moefuse::route<E, BM_A, BM_B>(experts, experts_shape[0], order, tiles_a, tiles_b);"


@cache
def _route_kernel():
    return mx.fast.cuda_kernel(
        name="moefuse_route",
        input_names=["experts"],
        output_names=["order", "tiles_a", "tiles_b"],
        source=ROUTE_SOURCE,
        header=source.kernel_header("grouped_gemm.cuh"),
    )


def route(flat_indices: mx.array, experts: int, bms: tuple[int, int]) -> tuple[mx.array, ...]:
    """The pairs grouped by expert, and the tiles of the two kernels, in one launch.

    Returns ``order`` (pairs,) uint32: the pair at each sorted row (experts in
    order; within an expert, any order: no row's result depends on it), and
    per BM of ``bms`` a (max_tiles, 4) int32 schedule: expert, first sorted
    row, end row, 0; -1 = empty. One block counts, places and schedules the
    pairs: MLX's argsort, a gather and a schedule per kernel took three to
    six launches (about 50 us at 2,048 tokens, `profile-layer-2048.txt`).
    """
    pairs = flat_indices.size
    return tuple(
        _route_kernel()(
            inputs=[flat_indices],
            template=[("E", experts), ("BM_A", bms[0]), ("BM_B", bms[1])],
            grid=(ROUTE_THREADS, 1, 1),
            threadgroup=(ROUTE_THREADS, 1, 1),
            output_shapes=[(pairs,), *((max_tiles(pairs, experts, bm), 4) for bm in bms)],
            output_dtypes=[mx.uint32, mx.int32, mx.int32],
        )
    )


_CUDA_TYPES = {mx.bfloat16: "__nv_bfloat16", mx.float16: "__half"}
_HASH_TYPES = {mx.bfloat16: "bfloat16_t", mx.float16: "float16_t"}
_GEMM_INPUTS = ["x", "w", "scales", "biases", "order", "tiles"]
_GEMM_SOURCE = (
    "moefuse::grouped_gemm<T, BITS, GROUP, K, N, SWIGLU, TOP_K, BM, BN, WARPS_M, WARPS_N, "
    "STAGES, B_REGS>(x, w, scales, biases, order, tiles, out);"
)


def kernel_name(name: str, template: list[tuple[str, object]]) -> str:
    """The ``__global__`` function MLX generates for ``name`` with these
    template constants (mlx/backend/cuda/custom_kernel.cpp)."""
    suffix = "".join(
        f"_{_HASH_TYPES[v]}" if k == "T" else ("_t" if v else "_f") if isinstance(v, bool)
        else f"_{v}" for k, v in template
    )  # fmt: skip
    return f"custom_kernel_{name}{suffix}"


def _launch_bounds(name: str, template: list[tuple[str, object]], tiling: Tiling, dtype) -> str:
    """A declaration of the kernel MLX will generate, with __launch_bounds__.

    MLX writes the ``__global__`` function itself and takes no attributes; a
    prior declaration of the same function with launch bounds caps its
    registers (checked with nvcc by scripts/check_kernel_source.py). The
    parameters follow mlx/backend/cuda/custom_kernel.cpp.
    """
    t = _CUDA_TYPES[dtype]
    params = f"const {t}*, const uint32_t*, const {t}*, const {t}*, const uint32_t*, "
    params += f"const int32_t*, {t}*"
    return (
        "namespace mlx::core::cu {\n"
        f"__global__ void __launch_bounds__({tiling.threads}, {tiling.min_blocks}) "
        f"{kernel_name(name, template)}({params});\n"
        "}\n"
    )


@cache
def _gemm_kernel(template: tuple, tiling: Tiling, shared: int, dtype):
    name = "moefuse_grouped_gemm"
    header = source.kernel_header("grouped_gemm.cuh")
    if tiling.min_blocks > 1:
        header += _launch_bounds(name, list(template), tiling, dtype)
    return mx.fast.cuda_kernel(
        name=name,
        input_names=_GEMM_INPUTS,
        output_names=["out"],
        source=_GEMM_SOURCE,
        header=header,
        shared_memory=shared,
    )


def grouped_gemm(
    x: mx.array,
    proj: QuantizedArrays,
    order: mx.array,
    tiles: mx.array,
    *,
    swiglu: bool,
    top_k: int,
    tiling: Tiling,
    init_value: float | None = None,
) -> mx.array:
    """Rows of ``x`` times their experts' weights, for every tile of ``tiles``.

    gate_up (``swiglu``): row s of the result is silu(gate) * up of x row
    ``order[s] // top_k``, in sorted order. down: x rows are sorted h rows,
    and row s lands at ``order[s]``. ``init_value`` pre-fills the output
    (tests poison it with NaN to prove every element is written).
    """
    n = proj.weight.shape[-2] // (2 if swiglu else 1)
    cols = tiling.bn // 2 if swiglu else tiling.bn
    blocks = tiles.shape[0] * math.ceil(n / cols)
    template = (
        *proj.template(x, n, swiglu),
        ("TOP_K", top_k),
        ("BM", tiling.bm),
        ("BN", tiling.bn),
        ("WARPS_M", tiling.warps_m),
        ("WARPS_N", tiling.warps_n),
        ("STAGES", tiling.stages),
        ("B_REGS", tiling.b_regs),
    )
    kernel = _gemm_kernel(template, tiling, tiling.shared_bytes(proj.bits), x.dtype)
    (out,) = kernel(
        inputs=[x, proj.weight, proj.scales, proj.biases, order, tiles],
        template=list(template),
        grid=(tiling.threads * blocks, 1, 1),
        threadgroup=(tiling.threads, 1, 1),
        output_shapes=[(order.size, n)],
        output_dtypes=[x.dtype],
        init_value=init_value,
    )
    return out


@dataclass(frozen=True)
class GroupedKernels:
    """The tensor-core path of one fused layer, for more than ``min_pairs`` pairs.

    gate_up always; down on the kernel when it qualifies (``down``), else
    the layer's own ``down_proj`` on the sorted rows. ``arch`` picks the
    tile table. With both kernels the call runs under mx.compile, the
    layer's arrays as inputs.
    """

    down: bool
    min_pairs: int
    arch: str = "default"
    compiled: bool = True

    def takes(self, layer, x: mx.array, indices: mx.array) -> bool:
        width = layer.gate_up_proj["weight"].shape[-2] // 2  # h's columns
        return (
            indices.size > self.min_pairs
            and x.dtype == layer.gate_up_proj["scales"].dtype
            and max(x.size, indices.size * width) < OFFSET_LIMIT
        )

    def tilings(
        self, pairs: int, experts: int, bits: tuple[int, int | None]
    ) -> tuple[Tiling, Tiling | None]:
        """gate_up's and down's tilings for this many pairs and the two
        projections' bits (None: down is not on the kernel), from tiles.json."""
        return _tilings(self.arch, pairs, experts, bits)

    def __call__(self, layer, x: mx.array, indices: mx.array) -> mx.array:
        gate_up = QuantizedArrays.of(layer.gate_up_proj)
        if not self.down:
            tilings = self.tilings(indices.size, gate_up.weight.shape[0], (gate_up.bits, None))
            return self.ffn(x, indices, gate_up, None, tilings, layer.down_proj)
        down = QuantizedArrays.of(layer.down_proj)
        tilings = self.tilings(indices.size, gate_up.weight.shape[0], (gate_up.bits, down.bits))
        if not self.compiled:
            return self.ffn(x, indices, gate_up, down, tilings)
        formats = (gate_up.bits, gate_up.group_size, down.bits, down.group_size)
        return _compiled_ffn(formats, tilings)(x, indices, gate_up[:3], down[:3])

    @staticmethod
    def ffn(x, indices, gate_up, down, tilings, down_proj=None) -> mx.array:
        """The FFN on the grouped GEMMs: (..., top_k, hidden), as SwitchGLU."""
        gate_up_tiling, down_tiling = tilings
        experts = gate_up.weight.shape[0]
        bms = (gate_up_tiling.bm, (down_tiling or gate_up_tiling).bm)
        order, gate_up_tiles, down_tiles = route(flat_uint32(indices), experts, bms)
        h = grouped_gemm(
            x.reshape(-1, x.shape[-1]), gate_up, order, gate_up_tiles,
            swiglu=True, top_k=indices.shape[-1], tiling=gate_up_tiling,
        )  # fmt: skip
        if down is None:  # the layer's own down_proj, on h back in pair order (MLX
            # 0.32.4's sorted float gather_mm gave wrong results at width 90 on an H100)
            h = h[mx.argsort(order)].reshape(*indices.shape, 1, h.shape[-1])
            return down_proj(h, indices).squeeze(-2)
        y = grouped_gemm(h, down, order, down_tiles, swiglu=False, top_k=1, tiling=down_tiling)
        return y.reshape(*indices.shape, y.shape[-1])

    @property
    def path(self) -> str:
        down = "kernel" if self.down else "down_proj"
        return f"tensor cores > {self.min_pairs} pairs (gate_up+swiglu, down: {down})"


@cache
def _compiled_ffn(formats: tuple[int, int, int, int], tilings: tuple[Tiling, Tiling]):
    """`GroupedKernels.ffn` under mx.compile, per weight format and tilings."""

    def ffn(x, indices, gate_up, down):
        gate_up = QuantizedArrays(*gate_up, *formats[:2])
        down = QuantizedArrays(*down, *formats[2:])
        return GroupedKernels.ffn(x, indices, gate_up, down, tilings)

    return mx.compile(ffn)
