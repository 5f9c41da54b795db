"""The tensor-core path: the fused FFN as grouped GEMMs over the routed experts.

Above the decode kernels' pair count (prefill, batched decode), MLX's sorted
``gather_qmm`` computes each (token, expert) pair as its own one-row matrix
product. Here the pairs are sorted by expert and each
expert's rows run as one GEMM on the tensor cores (grouped_gemm.cuh), packed
weights dequantized into the mma fragments, fp32 accumulation:

    order, tiles = route(indices)     pairs grouped by expert, (expert, rows)
                                      per tile of BM rows: one launch
    h     = grouped_gemm(x, gate_up)  act(gate, up), sorted rows
    y     = grouped_gemm(h, down)     each row back to its pair's place

Tile shapes come from a tile table (tiles.py: by device, weight format and
rows per expert, only those that fit the GPU); a fused layer binds
them at install, one compiled function per bucket of the table (`bind`).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

import mlx.core as mx

from . import jit, source
from .activations import NONE, SWIGLU, KernelActivation
from .decode import KernelPath, apply_module, columns, flat_uint32
from .device import SMALLEST, Limits
from .formats import Layout, PortableDtypes, QuantizedArrays, WeightFormat
from .tiles import Tiling, table_named

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


@cache
def buckets(
    table: str, weights: tuple[WeightFormat, WeightFormat | None], limits: Limits
) -> tuple[tuple[float, ...], tuple[tuple[Tiling, Tiling | None], ...]] | None:
    """A table's (gate_up, down) tilings for these formats (down None: not on
    the kernel) on a GPU of these limits, as ``(limits of rows, tilings)``: a
    call of up to ``rows[i]`` rows per expert takes ``tilings[i]``, one past
    them all the last. The table's choice changes only at its limits of rows.
    None when some range has no tiling that fits (`why_not_tiled`)."""
    tile_table = table_named(table)
    rows = tile_table.limits_of_rows()
    tilings = []
    for at in (*rows, math.inf):
        gate_up = tile_table.tiling(at, True, weights[0], limits)
        down = None if weights[1] is None else tile_table.tiling(at, False, weights[1], limits)
        if gate_up is None or (weights[1] is not None and down is None):
            return None
        tilings.append((gate_up, down))
    return rows, tuple(tilings)


def why_not_tiled(
    table: str, weights: tuple[WeightFormat, WeightFormat | None], limits: Limits
) -> str | None:
    """Why no call of a layer of these formats could be tiled here, or None."""
    if buckets(table, weights, limits) is not None:
        return None
    return (
        f"no tiling of tile table {table!r} fits this GPU ({limits.shared_per_block} bytes "
        f"of shared memory per block, {limits.threads_per_sm} threads per SM)"
    )


def rows_per_expert(pairs: int, experts: int) -> float:
    """Rows per expert hit, as the table reads density: at least one."""
    return pairs / min(experts, pairs)


def max_tiles(pairs: int, experts: int, bm: int) -> int:
    """Tiles the schedule may need (grouped_gemm.cuh: max_tiles)."""
    return math.ceil(pairs / bm) + min(experts, pairs)


ROUTE_THREADS = 1024
ROUTE_NAME = "moefuse_route"
ROUTE_SOURCE = "moefuse::route<E, BM_A, BM_B>(experts, experts_shape[0], order, tiles_a, tiles_b);"


@cache
def _route_kernel():
    return mx.fast.cuda_kernel(
        name=ROUTE_NAME,
        input_names=["experts"],
        output_names=["order", "tiles_a", "tiles_b"],
        source=ROUTE_SOURCE,
        header=source.kernel_header("grouped_gemm.cuh", jit.kernel_arch()),
    )


def route_spec(experts: int, bms: tuple[int, int]) -> jit.KernelSpec:
    """The route kernel variant for this many experts and these two BMs."""
    return jit.KernelSpec(
        name=ROUTE_NAME,
        inputs=(("experts", mx.uint32, 1),),
        outputs=(("order", mx.uint32), ("tiles_a", mx.int32), ("tiles_b", mx.int32)),
        template=(("E", experts), ("BM_A", bms[0]), ("BM_B", bms[1])),
        header=source.kernel_header("grouped_gemm.cuh", jit.kernel_arch()),
        source=ROUTE_SOURCE,
    )


def route(flat_indices: mx.array, experts: int, bms: tuple[int, int]) -> tuple[mx.array, ...]:
    """The pairs grouped by expert, and the tiles of the two kernels, in one launch.

    Returns ``order`` (pairs,) uint32: the pair at each sorted row (experts in
    order; within an expert, any order: no row's result depends on it), and
    per BM of ``bms`` a (max_tiles, 4) int32 schedule: expert, first sorted
    row, end row, 0; -1 = empty. One block counts, places and schedules the
    pairs: MLX's argsort, a gather and a schedule per kernel took three to
    six launches.
    """
    pairs = flat_indices.size
    spec = route_spec(experts, bms)
    return tuple(
        jit.launch(
            spec,
            _route_kernel(),
            inputs=[flat_indices],
            template=list(spec.template),
            grid=(ROUTE_THREADS, 1, 1),
            threadgroup=(ROUTE_THREADS, 1, 1),
            output_shapes=[(pairs,), *((max_tiles(pairs, experts, bm), 4) for bm in bms)],
            output_dtypes=[mx.uint32, mx.int32, mx.int32],
        )
    )


GEMM_NAME = "moefuse_grouped_gemm"
GEMM_SOURCE = (
    "moefuse::grouped_gemm<T, MODE, BITS, GROUP, K, N, GATE_UP, ACT, ACT_P, ACT_Q, TOP_K, BM, "
    "BN, WARPS_M, WARPS_N, STAGES, B_REGS>(x, {args}, order, tiles, out);"
)
WGMMA_NAME = "moefuse_grouped_wgmma"
WGMMA_SOURCE = (
    "moefuse::grouped_wgmma<T, MODE, BITS, GROUP, K, N, GATE_UP, ACT, ACT_P, ACT_Q, TOP_K, BM, "
    "BN, WARPS, STAGES, OVERLAP, PRODUCER>(x, {args}, order, tiles, out);"
)


def kernel_params(spec: jit.KernelSpec) -> str:
    """The parameter list MLX gives a kernel of these inputs and outputs
    (mlx/backend/cuda/custom_kernel.cpp; the GEMM reads no shapes)."""
    params = [f"const {jit.CUDA_TYPES[dtype]}* {name}" for name, dtype, _ in spec.inputs]
    params += [f"{jit.CUDA_TYPES[dtype]}* {name}" for name, dtype in spec.outputs]
    return ", ".join(params)


def _launch_bounds(spec: jit.KernelSpec, tiling: Tiling) -> str:
    """A declaration of the kernel MLX will generate, with __launch_bounds__.

    MLX writes the ``__global__`` function itself and takes no attributes; a
    prior declaration of the same function with launch bounds caps its
    registers (checked with nvcc by scripts/check_kernel_source.py).
    """
    return (
        "namespace mlx::core::cu {\n"
        f"__global__ void __launch_bounds__({tiling.threads}, {tiling.min_blocks}) "
        f"{spec.kernel_name}({kernel_params(spec)});\n"
        "}\n"
    )


def gemm_spec(
    proj: QuantizedArrays,
    dtype: mx.Dtype,
    k: int,
    activation: KernelActivation | None,
    top_k: int,
    tiling: Tiling,
) -> jit.KernelSpec:
    """The grouped GEMM variant `grouped_gemm` launches for these weights,
    inputs (x of ``dtype``, width ``k``) and tiling."""
    n, _ = columns(proj, activation)
    act = activation or KernelActivation(NONE)
    *_, args = proj.inputs()
    warps = (
        (("WARPS", tiling.warps_n),)
        if tiling.wgmma
        else (("WARPS_M", tiling.warps_m), ("WARPS_N", tiling.warps_n))
    )
    last = (
        (("OVERLAP", tiling.overlap), ("PRODUCER", tiling.producer))
        if tiling.wgmma
        else (("B_REGS", tiling.b_regs),)
    )
    spec = jit.KernelSpec(
        name=WGMMA_NAME if tiling.wgmma else GEMM_NAME,
        inputs=(
            ("x", dtype, 2),
            *proj.input_specs(),
            ("order", mx.uint32, 1),
            ("tiles", mx.int32, 2),
        ),
        outputs=(("out", dtype),),
        template=(
            *proj.template(dtype, k, n, activation is not None),
            *act.template(),
            ("TOP_K", top_k),
            ("BM", tiling.bm),
            ("BN", tiling.bn),
            *warps,
            ("STAGES", tiling.stages),
            *last,
        ),
        header=source.kernel_header(
            "grouped_wgmma.cuh" if tiling.wgmma else "grouped_gemm.cuh", jit.kernel_arch()
        ),
        source=(WGMMA_SOURCE if tiling.wgmma else GEMM_SOURCE).format(args=args),
    )
    if tiling.min_blocks > 1 or tiling.threads > 256:  # > 256 threads: at most 128 registers
        spec = dataclasses.replace(spec, header=spec.header + _launch_bounds(spec, tiling))
    return spec


@cache
def _gemm_kernel(name: str, header: str, shared: int, names: tuple[str, ...], body: str):
    """The grouped GEMM of this header (launch bounds included) and inputs."""
    return mx.fast.cuda_kernel(
        name=name,
        input_names=list(names),
        output_names=["out"],
        source=body,
        header=header,
        shared_memory=shared,
    )


def grouped_gemm(
    x: mx.array,
    proj: QuantizedArrays,
    order: mx.array,
    tiles: mx.array,
    *,
    activation: KernelActivation | None,
    top_k: int,
    tiling: Tiling,
    init_value: float | None = None,
) -> mx.array:
    """Rows of ``x`` times their experts' weights, for every tile of ``tiles``.

    gate_up (an ``activation``): row s of the result is act(gate, up) of x
    row ``order[s] // top_k``, in sorted order (NONE: gate and up side by
    side). down (None): x rows are sorted h rows, and row s lands at
    ``order[s]``. ``init_value`` pre-fills the output (tests poison it with
    NaN to prove every element is written).
    """
    gate_up = activation is not None
    n, written = columns(proj, activation)
    cols = tiling.bn // 2 if gate_up else tiling.bn
    blocks = tiles.shape[0] * math.ceil(n / cols)
    spec = gemm_spec(proj, x.dtype, x.shape[-1], activation, top_k, tiling)
    names = tuple(name for name, _, _ in spec.inputs)
    shared = tiling.shared_bytes(proj.bits)
    kernel = _gemm_kernel(spec.name, spec.header, shared, names, spec.source)
    (out,) = jit.launch(
        spec,
        kernel,
        inputs=[x, *proj.arrays, order, tiles],
        template=list(spec.template),
        grid=(tiling.threads * blocks, 1, 1),
        threadgroup=(tiling.threads, 1, 1),
        output_shapes=[(order.size, written)],
        output_dtypes=[x.dtype],
        init_value=init_value,
    )
    return out


@dataclass(frozen=True)
class GroupedKernels(PortableDtypes):
    """The tensor-core path of one fused layer, for more than ``min_pairs`` pairs.

    gate_up always, with ``activation`` in its epilogue (NONE: the layer's
    own module runs between the kernels); down on the kernel when it
    qualifies (``down``), else the layer's own ``down_proj`` on the sorted
    rows. ``dtypes``: the activation dtypes both formats take. ``table`` names
    the tile table (`tiles.table_for`), whose tilings are taken only where
    they fit ``limits`` (the GPU's). With both kernels and a known
    activation the call runs under mx.compile, the layer's arrays as inputs.
    """

    down: bool
    min_pairs: int
    table: str = "h100"
    limits: Limits = SMALLEST
    compiled: bool = True
    activation: KernelActivation = KernelActivation(SWIGLU)
    dtypes: tuple = (mx.bfloat16,)

    def buckets(
        self, weights: tuple[WeightFormat, WeightFormat | None]
    ) -> tuple[tuple[float, ...], tuple[tuple[Tiling, Tiling | None], ...]]:
        """`buckets` of this path's table and limits (kernels_for takes the
        path only where they exist: `why_not_tiled`)."""
        found = buckets(self.table, weights, self.limits)
        if found is None:
            raise ValueError(why_not_tiled(self.table, weights, self.limits))
        return found

    def tilings(
        self, pairs: int, experts: int, weights: tuple[WeightFormat, WeightFormat | None]
    ) -> tuple[Tiling, Tiling | None]:
        """gate_up's and down's tilings for this many pairs and the two
        projections' formats (None: down is not on the kernel)."""
        rows, tilings = self.buckets(weights)
        return tilings[bisect.bisect_left(rows, rows_per_expert(pairs, experts))]

    def __call__(self, layer, gate_up_proj, x: mx.array, indices: mx.array) -> mx.array:
        """The layer's routed output for this call, every format fact read
        afresh (tests, the benchmark's forced paths); a fused layer calls the
        path `bind` made at install. ``gate_up_proj`` is its stacked
        projection as the layer's forward read it."""
        gate_up = QuantizedArrays.of(gate_up_proj)
        down = QuantizedArrays.of(layer["down_proj"]).layout if self.down else None
        experts = gate_up.weight.shape[0]
        return self.bind(gate_up.layout, down, experts)(layer, gate_up_proj, x, indices)

    def bind(self, gate_up_layout: Layout, down_layout: Layout | None, experts: int) -> KernelPath:
        """This path for a layer of ``experts`` whose projections have these
        layouts (None: down is not on the kernel), made at install: a call
        picks its tilings by rows per expert (`buckets`: a bisection),
        reads the projections' arrays and launches."""
        down_layout = down_layout if self.down else None
        weights = (gate_up_layout.format, None if down_layout is None else down_layout.format)
        rows, tilings = self.buckets(weights)
        module_runs = self.activation.kind == NONE  # the layer's own activation
        if down_layout is None or not self.compiled or module_runs:
            return functools.partial(self._uncompiled, gate_up_layout, down_layout, experts)
        ffns = [_compiled_ffn(gate_up_layout, down_layout, t, self.activation) for t in tilings]
        gate_up_arrays, down_arrays = gate_up_layout.arrays, down_layout.arrays

        def run(layer, gate_up_proj, x, indices):
            ffn = ffns[bisect.bisect_left(rows, rows_per_expert(indices.size, experts))]
            return ffn(x, indices, gate_up_arrays(gate_up_proj), down_arrays(layer["down_proj"]))

        return run

    def _uncompiled(self, gate_up_layout, down_layout, experts, layer, gate_up_proj, x, indices):
        """Without mx.compile: the layer's own activation module runs between
        the kernels, or its own down_proj after gate_up."""
        gate_up = QuantizedArrays.rebuilt(gate_up_layout.arrays(gate_up_proj), gate_up_layout)
        module = layer.activation if self.activation.kind == NONE else None
        down_proj = layer["down_proj"]
        if down_layout is None:
            tilings = self.tilings(indices.size, experts, (gate_up.format, None))
            return self.ffn(x, indices, gate_up, None, tilings, self.activation, module, down_proj)
        down = QuantizedArrays.rebuilt(down_layout.arrays(down_proj), down_layout)
        tilings = self.tilings(indices.size, experts, (gate_up.format, down.format))
        return self.ffn(x, indices, gate_up, down, tilings, self.activation, module)

    def reachable_tilings(
        self, experts: int, weights: tuple[WeightFormat, WeightFormat | None]
    ) -> list[tuple[Tiling, Tiling | None]]:
        """Every (gate_up, down) tiling pair some call can pick."""
        return sorted(set(self.buckets(weights)[1]), key=str)

    def specs(
        self, gate_up: QuantizedArrays, down: QuantizedArrays | None, dtype: mx.Dtype, top_k: int
    ) -> Iterator[jit.KernelSpec]:
        """The kernel variants this path launches for a layer of these weights
        at activations of ``dtype`` and ``top_k`` experts per token."""
        experts = gate_up.weight.shape[0]
        hidden = gate_up.weight.shape[-1] * 32 // gate_up.bits
        width = gate_up.weight.shape[-2] // 2  # the activation's output
        weights = (gate_up.format, None if down is None else down.format)
        for gate_up_tiling, down_tiling in self.reachable_tilings(experts, weights):
            yield route_spec(experts, (gate_up_tiling.bm, (down_tiling or gate_up_tiling).bm))
            yield gemm_spec(gate_up, dtype, hidden, self.activation, top_k, gate_up_tiling)
            if down is not None and down_tiling is not None:
                yield gemm_spec(down, dtype, width, None, 1, down_tiling)

    @staticmethod
    def ffn(x, indices, gate_up, down, tilings, activation, module=None, down_proj=None):
        """The FFN on the grouped GEMMs: (..., top_k, hidden), as SwitchGLU.
        ``module``: the layer's activation, for NONE."""
        gate_up_tiling, down_tiling = tilings
        experts = gate_up.weight.shape[0]
        bms = (gate_up_tiling.bm, (down_tiling or gate_up_tiling).bm)
        order, gate_up_tiles, down_tiles = route(flat_uint32(indices), experts, bms)
        h = grouped_gemm(
            x.reshape(-1, x.shape[-1]),
            gate_up,
            order,
            gate_up_tiles,
            activation=activation,
            top_k=indices.shape[-1],
            tiling=gate_up_tiling,
        )
        if module is not None:
            h = apply_module(module, h)
        if down is None:  # the layer's own down_proj, on h back in pair order (MLX
            # 0.32.4's sorted float gather_mm gave wrong results at width 90)
            h = h[mx.argsort(order)].reshape(*indices.shape, 1, h.shape[-1])
            return down_proj(h, indices).squeeze(-2)
        y = grouped_gemm(h, down, order, down_tiles, activation=None, top_k=1, tiling=down_tiling)
        return y.reshape(*indices.shape, y.shape[-1])

    @property
    def path(self) -> str:
        down = "kernel" if self.down else "down_proj"
        act = self.activation.name
        return f"tensor cores > {self.min_pairs} pairs (gate_up+{act}, down: {down})"


@cache
def _compiled_ffn(gate_up_layout: Layout, down_layout: Layout, tilings: tuple, activation):
    """`GroupedKernels.ffn` under mx.compile, per weight layout, tilings and
    activation."""

    def ffn(x, indices, gate_up, down):
        gate_up = QuantizedArrays.rebuilt(gate_up, gate_up_layout)
        down = QuantizedArrays.rebuilt(down, down_layout)
        return GroupedKernels.ffn(x, indices, gate_up, down, tilings, activation)

    return mx.compile(ffn)
