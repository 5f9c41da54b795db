"""Dense gated MLPs: gate and up (nn.Linear / nn.QuantizedLinear) as one matmul.

mlx-lm has dozens of MLP classes (shared experts, dense first layers, dense
models) whose forward computes ``down(act(gate(x)) * up(x))`` with their own
activation. Each keeps its forward: gate and up become the two `Half` s of
one stacked projection (see `halves`). Only modules whose forward calls
``self.gate_proj(...)`` and ``self.up_proj(...)`` with the same arguments
are fused: others are left alone with the reason in the report.
"""

from __future__ import annotations

import mlx.nn as nn

from . import projections
from .halves import Half, is_split, join_halves, split_into_halves, why_forward_not_alike
from .layer import Kind
from .memory import backend

__all__ = ["DENSE_MLP", "Half", "is_candidate"]

DENSE_TYPES = projections.DENSE


def is_candidate(module: nn.Module) -> bool:
    """A module holding gate_proj and up_proj dense projections (or fused)."""
    if is_split(module):
        return True
    gate, up = module.get("gate_proj"), module.get("up_proj")
    return isinstance(gate, DENSE_TYPES) and isinstance(up, DENSE_TYPES)


def why_not_fusable(module: nn.Module) -> str | None:
    reason = projections.mismatch(module["gate_proj"], module["up_proj"])
    if reason:
        return reason
    if backend() == "cuda" and not hasattr(module["gate_proj"], "bits"):
        # cuBLAS may sum a float matmul twice as wide in
        # another order (step3p5's MLP, float32: last-digit differences).
        return "float dense matmuls are not bitwise stable under stacking on CUDA; kept unfused"
    return why_forward_not_alike(type(module))


def matmul_path(module: nn.Module) -> str:
    return "stacked matmul"


DENSE_MLP = Kind(
    "dense MLP", is_split, why_not_fusable, split_into_halves, join_halves, matmul_path
)
