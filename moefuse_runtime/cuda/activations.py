"""The SwitchGLU activations the kernels' epilogues compute, by module class.

Each known class maps to one of the epilogue's formulas (common.cuh: Act)
with its parameters read from the instance. ``reference`` states the same
math in float32 NumPy: tests hold every class's own output to it, and the
kernels to the class. An activation not in the table still takes the
kernels: gate_up writes gate and up (``NONE``) and the module itself runs
between the two kernels.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.nn as nn
import numpy as np

NONE, SWIGLU, SWIGLU_F32, LIMITED, CLAMPED, OAI, GELU_TANH, SITU = range(8)
"""The kernels' ACT constants (common.cuh: Act)."""

NAMES = (
    "mlx activation",
    "swiglu",
    "swiglu fp32",
    "limited swiglu",
    "clamped swiglu",
    "swiglu oai",
    "geglu",
    "situ",
)


@dataclass(frozen=True)
class KernelActivation:
    """One epilogue activation: its ACT constant and float parameters P, Q."""

    kind: int
    p: float = 0.0
    q: float = 0.0

    @property
    def name(self) -> str:
        return NAMES[self.kind]

    def template(self) -> list[tuple[str, object]]:
        """ACT, and P and Q as the bit patterns of float32 (template constants
        are integers; the kernels read them back with __int_as_float)."""
        return [("ACT", self.kind), ("ACT_P", _bits(self.p)), ("ACT_Q", _bits(self.q))]

    def reference(self, up: np.ndarray, gate: np.ndarray) -> np.ndarray:
        """The formula in float32 (what the kernels compute before rounding)."""
        g, u = gate.astype(np.float32), up.astype(np.float32)
        p, q = np.float32(self.p), np.float32(self.q)

        def sigmoid(v):
            return 1 / (1 + np.exp(-v))

        if self.kind in (SWIGLU, SWIGLU_F32):
            return g * sigmoid(g) * u
        if self.kind == LIMITED:
            if p > 0:
                g, u = np.minimum(g, p), np.clip(u, -p, p)
            return g * sigmoid(g) * u
        if self.kind == CLAMPED:
            return np.minimum(g * sigmoid(g), p) * np.clip(u, -p, p)
        if self.kind == OAI:
            g = np.minimum(g, p)
            return (np.clip(u, -p, p) + 1) * g * sigmoid(q * g)
        if self.kind == GELU_TANH:
            return 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3))) * u
        if self.kind == SITU:
            return p * np.tanh(g / p) * sigmoid(g) * (q * np.tanh(u / q) if q > 0 else u)
        raise ValueError(f"{self.name} has no formula: the module computes it")


def _bits(value: float) -> int:
    """A non-negative float32's bits as an int (MLX names kernels by them: no sign)."""
    (bits,) = struct.unpack("<i", struct.pack("<f", value))
    if bits < 0:
        raise ValueError(f"activation parameter {value} is negative")
    return bits


def _limit(kind: int, *, clamps_always: bool = False) -> Callable:
    """LIMITED or CLAMPED from the module's ``limit``. A limit <= 0 means no
    limit to DeepSeek's modules (``if limit > 0``); a module that clamps
    always has no kernel formula for it (None)."""

    def spec(module):
        limit = float(module.limit or 0)
        if limit <= 0:
            return None if clamps_always or kind == CLAMPED else KernelActivation(kind, 0.0)
        return KernelActivation(kind, limit)

    return spec


def _fixed(kind: int, p: float = 0.0, q: float = 0.0) -> Callable:
    """A formula whose parameters do not depend on the instance."""
    return lambda module: KernelActivation(kind, p, q)


def _situ(module):
    beta, linear = float(module.beta), float(module.linear_beta or 0)
    return KernelActivation(SITU, beta, linear) if beta > 0 and linear >= 0 else None


KNOWN: dict[tuple[str, str], Callable[[nn.Module], KernelActivation | None]] = {
    ("mlx_lm.models.switch_layers", "SwiGLU"): _fixed(SWIGLU),
    ("mlx_vlm.models.switch_layers", "SwiGLU"): _fixed(SWIGLU),
    ("mlx_lm.models.muse_spark", "PreciseSwiGLU"): _fixed(SWIGLU_F32),
    ("mlx_vlm.models.muse_spark.language", "PreciseSwiGLU"): _fixed(SWIGLU_F32),
    ("mlx_lm.models.activations", "SwigluOAI"): lambda m: KernelActivation(OAI, m._limit, m._alpha),
    # mlx-vlm's gpt_oss: swiglu(x, gate) with alpha 1.702 and limit 7.0 fixed
    ("mlx_vlm.models.gpt_oss.language", "SwiGLU"): _fixed(OAI, 7.0, 1.702),
    ("mlx_lm.models.step3p5", "ClampedSwiGLU"): _limit(CLAMPED),
    ("mlx_vlm.models.step3p5.language", "ClampedSwiGLU"): _limit(CLAMPED),
    ("mlx_vlm.models.step3p7.language", "ClampedSwiGLU"): _limit(CLAMPED),
    ("mlx_lm.models.deepseek_v41", "DeepseekV41SwiGLU"): _limit(LIMITED),
    ("mlx_vlm.models.deepseek_v4.language", "LimitedSwiGLU"): _limit(LIMITED),
    ("mlx_vlm.models.glm5_next.language", "LimitedSwiGLU"): _limit(LIMITED, clamps_always=True),
    ("mlx_lm.models.gemma4_text", "GeGLU"): _fixed(GELU_TANH),
    ("mlx_vlm.models.gemma4.language", "GeGLU"): _fixed(GELU_TANH),
    ("mlx_vlm.models.gemma4_text.language", "GeGLU"): _fixed(GELU_TANH),
    ("mlx_vlm.models.diffusion_gemma.language", "GeGLU"): _fixed(GELU_TANH),
    ("mlx_lm.models.kimi_k3", "SiTU"): _situ,
    ("mlx_vlm.models.kimi_k3.language", "SiTU"): _situ,
}
"""(module, class name) -> the epilogue formula of an instance, or None when
its parameters have none. Keys by name: nothing here imports a model."""


def kernel_activation(module: Any) -> KernelActivation:
    """The epilogue activation for a SwitchGLU's ``activation`` (NONE: the
    module runs between the kernels)."""
    cls = type(module)
    spec = KNOWN.get((cls.__module__, cls.__qualname__))
    return (spec(module) if spec else None) or KernelActivation(NONE)
