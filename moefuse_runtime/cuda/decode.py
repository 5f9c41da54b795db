"""The CUDA decode path: gate_up + activation, and down, as two custom kernels.

At one token a MoE layer reads each active expert's packed weights once and
does almost no arithmetic, so it should run at memory speed. These kernels
are quantized GEMVs over the routed experts, built to keep loads in flight:
one warp per output row (four for short down rows), x staged once per block in
shared memory, up to eight units of packed weights in flight per lane (16
bytes; 32 codes at 2, 3, 5 and 6 bits), affine weights dequantized to the
activation dtype as MLX's, fp32 sums:

* ``gate_up``: each warp reads row ``n`` of the gate half and row ``n`` of the
  up half of ``gate_up_proj`` for one (token, expert) pair and writes only
  the activation of the two (activations.py); the two halves are never
  written to memory, unless the activation is one the kernels do not know:
  then they are, and the layer's own module runs before ``down``.
* ``down``: the same GEMV without the activation, on ``down_proj``.

Both read every format of formats.py, and add a projection's bias. The two
launches run under mx.compile: a decode step's wall time is mostly host
work per op, which a compiled call replays without Python. Only few
(token, expert) pairs take this path (decode); float32 models, other
formats and other backends keep ``gather_qmm``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from . import jit, source
from .activations import NONE, SWIGLU, KernelActivation
from .device import Limits
from .formats import Layout, PortableDtypes, QuantizedArrays, unit_values, why_not_format
from .tiles import Decode


def down_tiling_for(down: nn.Module, settings: Decode) -> tuple[int, int]:
    """The down kernel's tiling for this projection's rows: a row of a few
    16-byte loads per lane (Qwen3-30B-A3B's width 768 at 4 bits) takes four
    rows per warp, so that a warp's lanes all load; a longer row keeps a
    warp to itself, its loads in flight along the row."""
    loads_per_row = down["weight"].shape[-1] // 4  # 4 packed uint32 per 16-byte load
    if loads_per_row <= settings.short_row_max_loads:
        return settings.short_row_tiling
    return settings.down_tiling


def shared_bytes(k: int) -> int:
    """Dynamic shared memory of one block: its x row as fp32."""
    return 4 * k


GEMV_SOURCE = (
    "moefuse::gemv<T, MODE, BITS, GROUP, K, N, GATE_UP, ACT, ACT_P, ACT_Q, X_DIV, OUTS>"
    "(x, {args}, indices, out);"
)
"""The kernels' body; {args}: the weight arguments (`QuantizedArrays.inputs`)."""


@functools.cache
def _kernel(gate_up: bool, shared: int, names: tuple[str, ...], args: str):
    return mx.fast.cuda_kernel(
        name=GEMV_NAMES[gate_up],
        input_names=["x", *names, "indices"],
        output_names=["out"],
        source=GEMV_SOURCE.format(args=args),
        header=source.kernel_header("gemv.cuh", jit.kernel_arch()),
        shared_memory=shared,
    )


GEMV_NAMES = {True: "moefuse_gate_up", False: "moefuse_down"}


def columns(proj: QuantizedArrays, activation: KernelActivation | None) -> tuple[int, int]:
    """N (outputs per pair the kernel computes) and the columns it writes:
    gate_up (an activation) computes the width and writes it, or with NONE
    gate and up side by side; down (None) computes and writes every row."""
    rows = proj.weight.shape[-2]
    if activation is None:
        return rows, rows
    return rows // 2, rows if activation.kind == NONE else rows // 2


def gemv_spec(
    proj: QuantizedArrays,
    dtype: mx.Dtype,
    k: int,
    activation: KernelActivation | None,
    x_div: int,
    outs: int,
) -> jit.KernelSpec:
    """The kernel variant `gather_qmv` launches for these weights and inputs
    (x of ``dtype``, width ``k``): what install compiles ahead of the call."""
    *_, args = proj.inputs()
    n, _ = columns(proj, activation)
    act = activation or KernelActivation(NONE)
    return jit.KernelSpec(
        name=GEMV_NAMES[activation is not None],
        inputs=(("x", dtype, 2), *proj.input_specs(), ("indices", mx.uint32, 1)),
        outputs=(("out", dtype),),
        template=(
            *proj.template(dtype, k, n, activation is not None),
            *act.template(),
            ("X_DIV", x_div),
            ("OUTS", outs),
        ),
        header=source.kernel_header("gemv.cuh", jit.kernel_arch()),
        source=GEMV_SOURCE.format(args=args),
    )


def gather_qmv(
    x: mx.array,
    proj: QuantizedArrays,
    indices: mx.array,
    *,
    activation: KernelActivation | None,
    x_div: int,
    init_value: float | None = None,
    outs: int = 1,
    warps: int = 8,
) -> mx.array:
    """``out[p] = proj(x[p // x_div])`` for expert ``indices[p]``, one row per pair.

    With an ``activation``, ``proj`` is ``gate_up_proj`` and the result is
    ``act(gate, up)`` (half its outputs), or with NONE both halves. ``x``
    is (rows, K), ``indices`` flat uint32; returns (pairs, outputs).
    ``init_value`` pre-fills the output (tests poison it with NaN to prove
    every element is written). x rows are read in 16-byte loads: MLX passes
    row-contiguous copies, whose rows start 16-byte aligned since
    ``why_not_kernel`` asks K to fill whole loads.
    """
    k = x.shape[-1]
    n, written = columns(proj, activation)
    blocks = math.ceil(n / (warps * outs))
    names, arrays, args = proj.inputs()
    spec = gemv_spec(proj, x.dtype, k, activation, x_div, outs)
    kernel = _kernel(activation is not None, shared_bytes(k), tuple(names), args)
    (out,) = jit.launch(
        spec,
        kernel,
        inputs=[x, *arrays, indices],
        template=list(spec.template),
        grid=(32 * warps * blocks, indices.size, 1),
        threadgroup=(32 * warps, 1, 1),
        output_shapes=[(indices.size, written)],
        output_dtypes=[x.dtype],
        init_value=init_value,
    )
    return out


def why_not_kernel(proj: nn.Module, limits: Limits) -> str | None:
    """Why this expert projection cannot run on the decode kernels of a GPU
    of these limits, or None."""
    reason = why_not_format(proj)
    if reason:
        return reason
    k = proj["weight"].shape[-1] * 32 // proj.bits
    if k % unit_values(proj.bits):
        return f"input size {k} does not fill whole {unit_values(proj.bits)}-value units"
    if shared_bytes(k) > limits.shared_per_block:
        return (
            f"input size {k} needs {shared_bytes(k)} bytes of shared memory, "
            f"{limits.shared_per_block} per block here"
        )
    return None


@dataclass(frozen=True)
class DecodeKernels(PortableDtypes):
    """The kernel path of one fused layer: always gate_up, down when it qualifies.

    ``activation`` is gate_up's epilogue (NONE: the layer's own module runs
    between the kernels); ``dtypes`` the activation dtypes both projections'
    formats take. A tiling is (outputs per warp, warps per block), see
    `gather_qmv`. With both kernels and a known activation the call runs
    under mx.compile (``compiled``): at decode sizes the layer's wall time is
    mostly host work per op, and a compiled call replays its graph without
    running Python per op.
    """

    down: bool
    max_pairs: int = Decode.min_pairs
    gate_up_tiling: tuple[int, int] = Decode.gate_up_tiling
    down_tiling: tuple[int, int] = Decode.down_tiling
    compiled: bool = True
    activation: KernelActivation = KernelActivation(SWIGLU)
    dtypes: tuple = (mx.bfloat16,)

    def __call__(
        self, layer: nn.Module, gate_up_proj: nn.Module, x: mx.array, indices: mx.array
    ) -> mx.array:
        """The layer's routed output for this call, every format fact read
        afresh (tests, the benchmark's forced paths); a fused layer calls the
        path `bind` made at install. ``gate_up_proj`` is its stacked
        projection as the layer's forward read it."""
        gate_up, down = QuantizedArrays.of(gate_up_proj), None
        if self.down:
            down = QuantizedArrays.of(layer["down_proj"]).layout
        return self.bind(gate_up.layout, down)(layer, gate_up_proj, x, indices)

    def bind(self, gate_up_layout: Layout, down_layout: Layout | None) -> KernelPath:
        """This path for a layer whose projections have these layouts
        (`QuantizedArrays.layout`; None: down is not on the kernel), made at
        install: per call it reads the projections' arrays and launches."""
        down_layout = down_layout if self.down else None
        module_runs = self.activation.kind == NONE  # the layer's own activation
        if down_layout is None or not self.compiled or module_runs:
            return functools.partial(self._uncompiled, gate_up_layout, down_layout)
        ffn = _compiled_ffn(self, gate_up_layout, down_layout)
        gate_up_arrays, down_arrays = gate_up_layout.arrays, down_layout.arrays

        def run(layer, gate_up_proj, x, indices):
            return ffn(x, indices, gate_up_arrays(gate_up_proj), down_arrays(layer["down_proj"]))

        return run

    def _uncompiled(self, gate_up_layout, down_layout, layer, gate_up_proj, x, indices):
        """Without mx.compile: the layer's own activation module runs between
        the kernels, or its own down_proj after gate_up."""
        gate_up = QuantizedArrays.rebuilt(gate_up_layout.arrays(gate_up_proj), gate_up_layout)
        module = layer.activation if self.activation.kind == NONE else None
        if down_layout is None:
            h = self.gate_up(x, flat_uint32(indices), indices.shape[-1], gate_up, module)
            h = h.reshape(*indices.shape, 1, h.shape[-1])
            return layer["down_proj"](h, indices).squeeze(-2)
        down_proj = layer["down_proj"]
        down = QuantizedArrays.rebuilt(down_layout.arrays(down_proj), down_layout)
        return self.ffn(x, indices, gate_up, down, module)

    def specs(
        self, gate_up: QuantizedArrays, down: QuantizedArrays | None, dtype: mx.Dtype, top_k: int
    ) -> Iterator[jit.KernelSpec]:
        """The kernel variants this path launches for a layer of these weights
        at activations of ``dtype`` and ``top_k`` experts per token."""
        hidden = gate_up.weight.shape[-1] * 32 // gate_up.bits
        yield gemv_spec(gate_up, dtype, hidden, self.activation, top_k, self.gate_up_tiling[0])
        if down is not None:
            width = gate_up.weight.shape[-2] // 2  # the activation's output
            yield gemv_spec(down, dtype, width, None, 1, self.down_tiling[0])

    def gate_up(
        self, x: mx.array, flat: mx.array, top_k: int, gate_up: QuantizedArrays, module=None
    ) -> mx.array:
        """The activation of gate and up for each (token, expert) pair:
        (pairs, width). ``module``: the layer's activation, for NONE."""
        outs, warps = self.gate_up_tiling
        x = x.reshape(-1, x.shape[-1])
        h = gather_qmv(
            x, gate_up, flat, activation=self.activation, x_div=top_k, outs=outs, warps=warps
        )
        return h if module is None else apply_module(module, h)

    def ffn(
        self,
        x: mx.array,
        indices: mx.array,
        gate_up: QuantizedArrays,
        down: QuantizedArrays,
        module=None,
    ) -> mx.array:
        """The whole FFN on the two kernels: (..., top_k, hidden), as SwitchGLU."""
        flat = flat_uint32(indices)
        h = self.gate_up(x, flat, indices.shape[-1], gate_up, module)
        outs, warps = self.down_tiling
        y = gather_qmv(h, down, flat, activation=None, x_div=1, outs=outs, warps=warps)
        return y.reshape(*indices.shape, y.shape[-1])


KernelPath = Callable[[nn.Module, nn.Module, mx.array, mx.array], mx.array]
"""A path bound at install: (layer, gate_up_proj, x, indices) -> routed output."""


def apply_module(module, gate_up: mx.array) -> mx.array:
    """The layer's own activation on a NONE kernel's output ([gate | up] per row)."""
    gate, up = mx.split(gate_up, 2, axis=-1)
    return module(up, gate)


def flat_uint32(indices: mx.array) -> mx.array:
    """The routing indices as the kernels read them: flat, uint32."""
    flat = indices.reshape(-1)
    return flat if flat.dtype == mx.uint32 else flat.astype(mx.uint32)


@functools.cache
def _compiled_ffn(kernels: DecodeKernels, gate_up_layout: Layout, down_layout: Layout):
    """`DecodeKernels.ffn` under mx.compile, one per tiling, activation and
    weight layout (shared by the layers that have them); the arrays are its
    inputs."""

    def ffn(x, indices, gate_up, down):
        gate_up = QuantizedArrays.rebuilt(gate_up, gate_up_layout)
        return kernels.ffn(x, indices, gate_up, QuantizedArrays.rebuilt(down, down_layout))

    return mx.compile(ffn)
