"""The weight formats the CUDA kernels read, and what they read of a projection.

MLX quantizes expert weights in four modes (`mx.quantize`); the kernels
(common.cuh) dequantize each in registers:

========  ============  ===========  ==========================================
mode      bits          group sizes  per group
========  ============  ===========  ==========================================
affine    2-6, 8        32, 64, 128  scale and bias, in the activation dtype
mxfp4     4 (E2M1)      32           E8M0 scale byte
nvfp4     4 (E2M1)      16           E4M3 scale byte; optional per-expert
                                     float32 ``global_scale``
mxfp8     8 (E4M3)      32           E8M0 scale byte
========  ============  ===========  ==========================================

Any of them may carry a Linear ``bias`` (experts, outputs), as GPT-OSS's
experts do. gate_up and down may differ in format.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

MODES = {"affine": 0, "mxfp4": 1, "nvfp4": 2, "mxfp8": 3}
"""MLX's mode names and the kernels' MODE constants (common.cuh: Mode)."""

FORMATS = {
    "affine": ((2, 3, 4, 5, 6, 8), (32, 64, 128)),
    "mxfp4": ((4,), (32,)),
    "nvfp4": ((4,), (16,)),
    "mxfp8": ((8,), (32,)),
}
"""(bits, group sizes) the kernels take per mode."""

WORDWISE_BITS = (2, 3, 5, 6)
"""Bits the kernels read in units of 32 codes (BITS words: 3- and 5-bit codes
cross 32-bit words), not 16-byte loads (common.cuh: Packing)."""


def unit_values(bits: int) -> int:
    """Codes per unit the kernels read at once (common.cuh: Packing): a row's
    input size must be a multiple."""
    return 32 if bits in WORDWISE_BITS else 128 // bits


KERNEL_DTYPES = (mx.bfloat16, mx.float16)
"""Activation dtypes of the kernels; float32 models stay exact on gather_qmm."""


class PortableDtypes:
    """For the frozen kernel-path dataclasses that hold activation ``dtypes``:
    MLX's Dtype neither pickles nor deep-copies, so they travel by name (a
    fused model copied or pickled keeps its kernel paths)."""

    def __reduce__(self):
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        values["dtypes"] = tuple(_DTYPE_NAMES[d] for d in values["dtypes"])
        return (_with_dtypes, (type(self), values))


_DTYPE_NAMES = {mx.bfloat16: "bfloat16", mx.float16: "float16", mx.float32: "float32"}


def _with_dtypes(cls: type, values: dict):
    return cls(**{**values, "dtypes": tuple(getattr(mx, n) for n in values["dtypes"])})


class WeightFormat(NamedTuple):
    """A projection's format as a tile table tells formats apart (tiles.py):
    a tiling can suit one mode's dequantization and not another's at the
    same bits, or one group size and not a smaller one (more scales per
    k-tile: registers). ``group_size`` None: any."""

    mode: str
    bits: int
    group_size: int | None = None


ARRAY_NAMES = ("weight", "scales", "biases", "bias", "global_scale")
"""A quantized projection's arrays, in `QuantizedArrays` order."""


class Layout(NamedTuple):
    """Everything the kernels read of a quantized projection but its arrays:
    which arrays it has, and its format. Fixed at install, so that a call
    only reads the arrays (`arrays`)."""

    names: tuple[str, ...]
    mode: str
    bits: int
    group_size: int

    def arrays(self, proj: nn.Module) -> tuple[mx.array, ...]:
        """The projection's arrays of this layout, in order."""
        return tuple(proj[name] for name in self.names)

    @property
    def format(self) -> WeightFormat:
        return WeightFormat(self.mode, self.bits, self.group_size)


class QuantizedArrays(NamedTuple):
    """What the kernels read of a quantized projection: arrays and format.

    Arrays rather than the module, so that a compiled call takes them as
    inputs (a module's arrays captured by mx.compile would be constants,
    stale once the layer's weights change). ``biases`` (affine's), ``bias``
    (the Linear bias) and ``global_scale`` (nvfp4) may be None.
    """

    weight: mx.array
    scales: mx.array
    biases: mx.array | None
    bias: mx.array | None
    global_scale: mx.array | None
    mode: str
    bits: int
    group_size: int

    @classmethod
    def of(cls, proj: nn.Module) -> QuantizedArrays:
        get = proj.get
        return cls(
            proj["weight"],
            proj["scales"],
            get("biases"),
            get("bias"),
            get("global_scale"),
            proj.mode,
            proj.bits,
            proj.group_size,
        )

    @property
    def arrays(self) -> tuple[mx.array, ...]:
        """The arrays present, in order: a compiled call's inputs."""
        return tuple(a for a in self[:5] if a is not None)

    @property
    def format(self) -> WeightFormat:
        return WeightFormat(self.mode, self.bits, self.group_size)

    @property
    def layout(self) -> Layout:
        """Everything but the arrays: with `arrays`, enough to rebuild (`rebuilt`)."""
        names = tuple(name for name, a in zip(ARRAY_NAMES, self[:5], strict=True) if a is not None)
        return Layout(names, self.mode, self.bits, self.group_size)

    @classmethod
    def rebuilt(cls, arrays: tuple[mx.array, ...], layout: Layout) -> QuantizedArrays:
        got = dict(zip(layout.names, arrays, strict=True))
        return cls(
            got["weight"],
            got["scales"],
            got.get("biases"),
            got.get("bias"),
            got.get("global_scale"),
            layout.mode,
            layout.bits,
            layout.group_size,
        )

    def takes(self, dtype: mx.Dtype) -> bool:
        """Whether the kernels can read these weights with activations of ``dtype``
        (affine scales are in the activation dtype; so is any bias)."""
        if self.mode == "affine" and self.scales.dtype != dtype:
            return False
        return dtype in KERNEL_DTYPES and (self.bias is None or self.bias.dtype == dtype)

    def template(self, dtype: mx.Dtype, k: int, n: int, gate_up: bool) -> tuple:
        """The template constants both kernels take for this format and shape
        (activations of ``dtype``, ``k`` inputs and ``n`` outputs per row)."""
        return (
            ("T", dtype),
            ("MODE", MODES[self.mode]),
            ("BITS", self.bits),
            ("GROUP", self.group_size),
            ("K", k),
            ("N", n),
            ("GATE_UP", gate_up),
        )

    def input_specs(self) -> tuple[tuple[str, mx.Dtype, int], ...]:
        """(name, dtype, ndim) of the kernel inputs `inputs` passes (jit.KernelSpec)."""
        names, arrays, _ = self.inputs()
        return tuple((n, a.dtype, a.ndim) for n, a in zip(names, arrays, strict=True))

    def inputs(self) -> tuple[list[str], list[mx.array], str]:
        """Kernel input names and arrays after x, and the argument list the
        kernels' calls take for them (absent ones as null pointers; the
        float formats pass their scales as the unused affine biases)."""
        names = ["w", "scales"]
        names += ["biases"] if self.biases is not None else []
        names += ["bias"] if self.bias is not None else []
        names += ["global_scale"] if self.global_scale is not None else []
        absent = "static_cast<const {}*>(nullptr)"
        args = [
            "w",
            "scales",
            "biases" if self.biases is not None else "scales",
            "bias" if self.bias is not None else absent.format("T"),
            "global_scale" if self.global_scale is not None else absent.format("float"),
        ]
        return names, list(self.arrays), ", ".join(args)


def why_not_format(proj: nn.Module) -> str | None:
    """Why the kernels cannot read this expert projection's weights, or None."""
    # mlx-lm's and mlx-vlm's QuantizedSwitchLinear: quantized expert arrays.
    if getattr(proj, "bits", None) is None or proj["weight"].ndim != 3:
        return f"{type(proj).__name__} is not quantized"
    mode = getattr(proj, "mode", "affine")
    if mode not in FORMATS:
        return f"{mode} weights"
    bits, group_sizes = FORMATS[mode]
    if proj.bits not in bits:
        return f"{mode} {proj.bits}-bit (kernels: {mode} {bits}-bit)"
    if proj.group_size not in group_sizes:
        return f"{mode} group size {proj.group_size} (kernels: {group_sizes})"
    if mode == "affine" and proj.get("biases") is None:
        return "affine weights without biases"
    if mode == "affine" and proj["scales"].dtype not in KERNEL_DTYPES:
        return f"{proj['scales'].dtype} scales"
    if mode != "affine" and proj["scales"].dtype != mx.uint8:
        return f"{mode} with {proj['scales'].dtype} scales"
    experts, rows = proj["weight"].shape[:2]
    bias = proj.get("bias")
    if bias is not None and (bias.dtype not in KERNEL_DTYPES or bias.shape != (experts, rows)):
        return f"a {bias.dtype} bias of shape {bias.shape}"
    scale = proj.get("global_scale")
    if scale is not None and (scale.dtype != mx.float32 or scale.size != experts):
        return f"a {scale.dtype} global scale of shape {scale.shape} ({experts} experts)"
    return None
