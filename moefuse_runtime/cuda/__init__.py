"""CUDA kernels for fused layers, on MLX's CUDA backend.

Two paths, picked per call by the number of (token, expert) pairs:

* `decode.DecodeKernels` (gemv.cuh): quantized GEMVs, up to about half a
  pair per expert (one where the tensor-core path is missing; the tile
  table's `tiles.Decode`): decode steps.
* `grouped.GroupedKernels` (grouped_gemm.cuh): pairs grouped by expert,
  tensor-core GEMMs (mma.sync, sm_80 and newer), above that: prefill and
  batched decode.

Both read every format of formats.py (affine 2-6 and 8 bits, mxfp4, nvfp4,
mxfp8), with or without a Linear bias, bf16 or fp16 activations, and run
the forward of mlx-lm's or mlx-vlm's SwitchGLU with its activation in
gate_up's epilogue when they know it (activations.py), else between the
kernels. Everything else keeps ``gather_qmm``.
`kernels_for` decides per layer, at install, and says why: the GPU's tile
table (`tiles.table_for`) and limits (`device.device_limits`) are read
there, so that no tiling past the GPU's limits is ever chosen.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from typing import cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..config import KERNEL_ENV, TILES_ENV, env_flag
from ..memory import backend
from .activations import NONE, kernel_activation
from .decode import DecodeKernels, KernelPath, down_tiling_for, why_not_kernel
from .device import Limits, device_limits
from .formats import KERNEL_DTYPES, Layout, QuantizedArrays, WeightFormat
from .grouped import OFFSET_LIMIT, GroupedKernels, why_not_grouped, why_not_tiled
from .jit import (
    BuildReport,
    KernelSpec,
    arch_number,
    device_arch,
    device_name,
    kernel_arch,
    prepare_all,
)
from .tiles import table_for, user_table

MIN_TENSOR_CORE_ARCH = 80
"""mma.sync m16n8k16 with bf16, ldmatrix and cp.async need sm_80 (Ampere) or newer."""


@dataclass(frozen=True)
class LayerKernels:
    """The kernel paths of one fused layer, bound at install to the layer's
    weight layouts: a call picks a path by its pairs and dtype and launches
    it, nothing else (`__call__`).

    ``experts`` and ``rows`` (gate_up's, both halves) are the layer's;
    ``gate_up`` and ``down`` the layouts of its projections (`Layout`; down
    None where it is not on the kernels).
    """

    decode: DecodeKernels
    grouped: GroupedKernels | None
    gate_up: Layout
    down: Layout | None
    experts: int
    rows: int
    runs: tuple[KernelPath, ...] = field(init=False, repr=False, compare=False)
    """The bound paths: decode's, then the tensor cores' if any."""
    max_grouped_pairs: int = field(init=False, repr=False, compare=False)
    """The most pairs whose h (pairs x width) stays within 32-bit offsets."""

    def __post_init__(self) -> None:
        # made once per layer (and again for a copy or an unpickled one)
        runs = [self.decode.bind(self.gate_up, self.down)]
        if self.grouped is not None:
            runs.append(self.grouped.bind(self.gate_up, self.down, self.experts))
        width = self.rows if self.decode.activation.kind == NONE else self.rows // 2
        object.__setattr__(self, "runs", tuple(runs))
        object.__setattr__(self, "max_grouped_pairs", (OFFSET_LIMIT - 1) // width)

    @classmethod
    def of(cls, layer: nn.Module, decode: DecodeKernels, grouped: GroupedKernels | None):
        gate_up = QuantizedArrays.of(layer["gate_up_proj"])
        down = QuantizedArrays.of(layer["down_proj"]).layout if decode.down else None
        experts, rows = gate_up.weight.shape[:2]
        return cls(decode, grouped, gate_up.layout, down, experts, rows)

    def __reduce__(self):
        return (type(self), tuple(getattr(self, f.name) for f in fields(self) if f.init))

    def choice(self, x: mx.array, indices: mx.array) -> int | None:
        """0: the decode kernels take this call, 1: the tensor cores, None:
        neither (gather_qmm). The two paths take the same dtypes."""
        if x.dtype not in self.decode.dtypes:
            return None
        pairs = indices.size
        if pairs <= self.decode.max_pairs:
            return 0
        if self.grouped is None or x.size >= OFFSET_LIMIT:
            return None
        return 1 if pairs <= self.max_grouped_pairs else None

    def pick(self, x: mx.array, indices: mx.array) -> DecodeKernels | GroupedKernels | None:
        """The path that takes this call, or None (gather_qmm)."""
        choice = self.choice(x, indices)
        return None if choice is None else (self.decode, self.grouped)[choice]

    def __call__(
        self, layer: nn.Module, gate_up_proj: nn.Module, x: mx.array, indices: mx.array
    ) -> mx.array | None:
        """The layer's routed output on the kernels, or None: gather_qmm
        takes this call. ``gate_up_proj``: the stacked projection as the
        layer's forward read it."""
        choice = self.choice(x, indices)
        if choice is None:
            return None
        return self.runs[choice](layer, gate_up_proj, x, indices)

    def specs(self, layer: nn.Module, dtype: mx.Dtype, top_k: int) -> Iterator[KernelSpec]:
        """Every kernel variant a call of this layer can launch, at activations
        of ``dtype`` and ``top_k`` experts per token."""
        gate_up = QuantizedArrays.of(layer.gate_up_proj)
        down = QuantizedArrays.of(layer.down_proj) if self.decode.down else None
        yield from self.decode.specs(gate_up, down, dtype, top_k)
        if self.grouped is not None:
            yield from self.grouped.specs(gate_up, down, dtype, top_k)

    def variants(self, layer: nn.Module, block: nn.Module) -> list[KernelSpec] | None:
        """`specs` for the layer as its MoE block calls it: the block's top-k
        and activation dtype (`top_k_of`, `activation_dtypes`); None when the
        block does not say its top-k."""
        top_k = top_k_of(block)
        if top_k is None:
            return None
        dtypes = activation_dtypes(block, self.decode.dtypes)
        return [spec for dtype in dtypes for spec in self.specs(layer, dtype, top_k)]

    @property
    def path(self) -> str:
        down = "kernel" if self.decode.down else "gather_qmm"
        above = (
            f"tensor cores above (down: {'kernel' if self.grouped.down else 'down_proj'})"
            if self.grouped is not None
            else "gather_qmm above"
        )
        act = self.decode.activation.name
        decode = f"cuda kernels <= {self.decode.max_pairs} pairs (gate_up+{act}, down: {down})"
        return f"{decode}; {above}"


def kernels_for(layer: nn.Module, why_not_forward: str | None) -> tuple[LayerKernels | None, str]:
    """The kernels a fused layer should use here, or None and why not.

    ``why_not_forward`` says why the layer's forward is not the one the
    kernels implement (gate_up, activation, down per routed pair), if it
    is not.
    """
    if backend() != "cuda":
        return None, f"gather_qmm ({backend()})"
    if not env_flag(KERNEL_ENV, default=True):
        return None, f"gather_qmm ({KERNEL_ENV}=0)"
    if why_not_forward:
        return None, f"gather_qmm ({why_not_forward})"
    arch = device_arch()
    limits = device_limits(arch)
    reason = why_not_kernel(layer.gate_up_proj, limits)
    if reason:
        return None, f"gather_qmm ({reason})"
    experts = layer.gate_up_proj["weight"].shape[0]
    gate_up_dtypes = _dtypes(layer.gate_up_proj)
    if not gate_up_dtypes:
        return None, "gather_qmm (gate_up_proj takes no bf16 or fp16 activations)"
    # the down kernel reads gate_up's output, in the activation dtype
    down_dtypes = set() if why_not_kernel(layer.down_proj, limits) else _dtypes(layer.down_proj)
    down_dtypes &= gate_up_dtypes
    down = bool(down_dtypes)
    dtypes = tuple(d for d in KERNEL_DTYPES if d in (down_dtypes if down else gate_up_dtypes))
    activation = kernel_activation(getattr(layer, "activation", None))
    table = table_for(device_name(), arch)
    settings = table.decode
    why_not_tensor_cores = _why_not_tensor_cores(layer, arch, table.name, limits, down)
    decode = DecodeKernels(
        down,
        settings.max_pairs_for(experts, tensor_cores=why_not_tensor_cores is None),
        settings.gate_up_tiling,
        down_tiling_for(layer.down_proj, settings) if down else settings.down_tiling,
        activation=activation,
        dtypes=dtypes,
    )
    if why_not_tensor_cores is None:
        grouped = GroupedKernels(
            down, decode.max_pairs, table.name, limits, activation=activation, dtypes=dtypes
        )
        kernels = LayerKernels.of(layer, decode, grouped)
        return kernels, kernels.path
    kernels = LayerKernels.of(layer, decode, None)
    return kernels, f"{kernels.path} ({why_not_tensor_cores})"


def _why_not_tensor_cores(
    layer: nn.Module, arch: str, table: str, limits: Limits, down: bool
) -> str | None:
    """Why calls above the decode range cannot take the tensor cores here."""
    if arch_number(arch) < MIN_TENSOR_CORE_ARCH:
        return f"{arch or 'this GPU'} is older than sm_{MIN_TENSOR_CORE_ARCH}"
    gate_up, down_proj = layer.gate_up_proj, layer.down_proj
    weights = (
        WeightFormat(gate_up.mode, gate_up.bits, gate_up.group_size),
        WeightFormat(down_proj.mode, down_proj.bits, down_proj.group_size) if down else None,
    )
    return why_not_grouped(layer) or why_not_tiled(table, weights, limits)


def check_env() -> None:
    """``MOEFUSE_TILES``, read now on every backend: a file that is not a tile
    table is a ValueError naming it."""
    path = os.environ.get(TILES_ENV, "").strip()
    if path:
        user_table(path)


def _dtypes(proj: nn.Module) -> set[mx.Dtype]:
    """The activation dtypes the kernels can read this projection with."""
    arrays = QuantizedArrays.of(proj)
    return {d for d in KERNEL_DTYPES if arrays.takes(d)}


TOP_K_NAMES = ("top_k", "num_experts_per_tok", "topk", "k")
"""Where MoE blocks of mlx-lm and mlx-vlm keep their experts per token."""


def top_k_of(block: nn.Module) -> int | None:
    """Experts per token of a MoE block (or of its router), if it says."""
    for module in block.modules():
        for name in TOP_K_NAMES:
            value = module.__dict__.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def activation_dtypes(block: nn.Module, taken: tuple[mx.Dtype, ...]) -> tuple[mx.Dtype, ...]:
    """The activation dtypes a fused layer of this block will see: the dtype of
    the block's first parameter of a ``taken`` dtype (the router's, or affine
    scales), else every taken dtype."""
    leaves = cast(list[tuple[str, mx.array]], tree_flatten(block.parameters()))
    for _, value in leaves:
        if value.dtype in taken:
            return (value.dtype,)
    return taken


def prepare_kernels(blocks: Iterable[tuple[nn.Module, tuple[str, ...]]]) -> tuple[str, ...]:
    """Compile (or find compiled) every kernel variant that the fused layers of
    these (block, layer keys) can launch, so that no call compiles one. What
    it did, for the report: one line, and one per layer it could not foresee."""
    specs: list[KernelSpec] = []
    unknown = 0
    for block, keys in blocks:
        for key in keys:
            variants = block[key].kernels.variants(block[key], block)
            unknown += variants is None
            specs += variants or []
    if not specs and not unknown:
        return ()
    build: BuildReport = prepare_all(specs, kernel_arch())
    notes = [build.summary()]
    if unknown:
        notes.append(
            f"CUDA kernels: {unknown} layers' blocks name no top-k; "
            "they compile at their first calls"
        )
    return tuple(notes)
