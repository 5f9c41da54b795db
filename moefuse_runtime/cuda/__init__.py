"""CUDA kernels for fused layers, on MLX's CUDA backend.

Two paths, picked per call by the number of (token, expert) pairs:

* `decode.DecodeKernels` (gemv.cuh): quantized GEMVs, up to
  ``max(32, min(128, experts // 2))`` pairs (``experts`` where the
  tensor-core path is missing; `decode.max_pairs_for`): decode steps.
* `grouped.GroupedKernels` (grouped_gemm.cuh): pairs grouped by expert,
  tensor-core GEMMs (mma.sync, sm_80 and newer), above that: prefill and
  batched decode.

Both take affine 4- and 8-bit weights, group sizes 32/64/128, bf16 or fp16
scales, no bias, and the plain SwiGLU forward of mlx-lm's or mlx-vlm's
SwitchGLU; everything else keeps ``gather_qmm``. `kernels_for` decides per
layer, at install, and says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..config import KERNEL_ENV, env_flag
from ..memory import backend
from .decode import DOWN_TILING, DecodeKernels, down_tiling_for, max_pairs_for, why_not_kernel
from .grouped import GroupedKernels, why_not_grouped

MIN_TENSOR_CORE_ARCH = 80
"""mma.sync m16n8k16 with bf16, ldmatrix and cp.async need sm_80 (Ampere) or newer."""


@dataclass(frozen=True)
class LayerKernels:
    """The kernel paths of one fused layer; `pick` chooses one per call."""

    decode: DecodeKernels
    grouped: GroupedKernels | None

    def pick(self, layer: nn.Module, x: mx.array, indices: mx.array):
        """The path that takes this call, or None (gather_qmm)."""
        for kernels in (self.decode, self.grouped):
            if kernels is not None and kernels.takes(layer, x, indices):
                return kernels
        return None

    @property
    def path(self) -> str:
        down = "kernel" if self.decode.down else "gather_qmm"
        above = (
            f"tensor cores above (down: {'kernel' if self.grouped.down else 'down_proj'})"
            if self.grouped is not None
            else "gather_qmm above"
        )
        decode = f"cuda kernels <= {self.decode.max_pairs} pairs (gate_up+swiglu, down: {down})"
        return f"{decode}; {above}"


def device_arch() -> str:
    """'sm_90' and the like, as MLX reports the default GPU."""
    return str(mx.device_info().get("architecture", ""))


def arch_number(arch: str) -> int:
    digits = arch.removeprefix("sm_").rstrip("a")
    return int(digits) if digits.isdigit() else 0


def kernels_for(layer: nn.Module, why_not_forward: str | None) -> tuple[LayerKernels | None, str]:
    """The kernels a fused layer should use here, or None and why not.

    ``why_not_forward`` says why the layer's forward is not the one the
    kernels implement (gate_up, SwiGLU, down per routed pair), if it is not.
    """
    if backend() != "cuda":
        return None, f"gather_qmm ({backend()})"
    if not env_flag(KERNEL_ENV, default=True):
        return None, f"gather_qmm ({KERNEL_ENV}=0)"
    if why_not_forward:
        return None, f"gather_qmm ({why_not_forward})"
    reason = why_not_kernel(layer.gate_up_proj)
    if reason:
        return None, f"gather_qmm ({reason})"
    experts = layer.gate_up_proj["weight"].shape[0]
    down = why_not_kernel(layer.down_proj) is None and (
        layer.down_proj["scales"].dtype == layer.gate_up_proj["scales"].dtype
    )  # the down kernels read their input (gate_up's output) in the scales' dtype
    tiling = down_tiling_for(layer.down_proj) if down else DOWN_TILING
    arch = device_arch()
    if arch_number(arch) < MIN_TENSOR_CORE_ARCH:
        why_not_tensor_cores = f"{arch or 'this GPU'} is older than sm_{MIN_TENSOR_CORE_ARCH}"
    else:
        why_not_tensor_cores = why_not_grouped(layer)
    max_pairs = max_pairs_for(experts, tensor_cores=why_not_tensor_cores is None)
    decode = DecodeKernels(down, max_pairs, down_tiling=tiling)
    if why_not_tensor_cores is None:
        kernels = LayerKernels(decode, GroupedKernels(down, decode.max_pairs, arch))
        return kernels, kernels.path
    kernels = LayerKernels(decode, None)
    return kernels, f"{kernels.path} ({why_not_tensor_cores})"
