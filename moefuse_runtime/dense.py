"""Dense gated MLPs: gate and up (nn.Linear / nn.QuantizedLinear) as one matmul.

mlx-lm has dozens of MLP classes (shared experts, dense first layers, dense
models) whose forward computes ``down(act(gate(x)) * up(x))`` with their own
activation. Instead of one fused subclass per class, each keeps its forward:
its ``gate_up_proj`` child holds the stacked projection, and ``gate_proj`` and
``up_proj`` become the two `Half` s of it. The first half called with ``x``
computes the stacked projection of ``x`` once and hands the other half its
share; the other half, called with that same ``x`` object, takes it. Called
with any other input it computes its own (always correct, just not fused).

Only modules whose forward source calls ``self.gate_proj(v)`` and
``self.up_proj(v)`` on one and the same variable ``v`` (in every branch) are
fused: others are left alone with the reason in the report.
"""

from __future__ import annotations

import inspect
import re

import mlx.core as mx
import mlx.nn as nn

from . import projections
from .layer import Kind
from .memory import backend

FUSED_NAME = "gate_up_proj"
DENSE_TYPES = projections.DENSE
_CALL = re.compile(r"self\.(gate_proj|up_proj)\(\s*(\w+)\s*\)")


class Half:
    """``gate_proj`` (index 0) or ``up_proj`` (index 1) of a fused dense MLP.

    Not an nn.Module: the parameters live once, in ``owner.gate_up_proj``,
    which `nn.quantize`, ``update`` and ``load_weights`` see and may replace.
    """

    def __init__(self, owner: nn.Module, index: int) -> None:
        self.owner = owner
        self.index = index

    def __call__(self, x: mx.array) -> mx.array:
        pending = self.owner.__dict__.get("_moefuse_pending")
        if pending is not None and pending[0] is x:
            self.owner.__dict__["_moefuse_pending"] = None
            return pending[1][self.index]
        halves = mx.split(self.owner[FUSED_NAME](x), 2, axis=-1)
        self.owner.__dict__["_moefuse_pending"] = (x, halves)
        return halves[self.index]

    def __repr__(self) -> str:
        return f"Half({FUSED_NAME}[{self.index}])"


def is_fused(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("gate_proj"), Half)


def is_candidate(module: nn.Module) -> bool:
    """A module holding gate_proj and up_proj dense projections (or fused)."""
    if is_fused(module):
        return True
    gate, up = module.get("gate_proj"), module.get("up_proj")
    return isinstance(gate, DENSE_TYPES) and isinstance(up, DENSE_TYPES)


def why_not_fusable(module: nn.Module) -> str | None:
    reason = projections.mismatch(module["gate_proj"], module["up_proj"])
    if reason:
        return reason
    if backend() == "cuda" and not hasattr(module["gate_proj"], "bits"):
        # Measured on an H100: cuBLAS may sum a float matmul twice as wide in
        # another order (step3p5's MLP, float32: last-digit differences).
        return "float dense matmuls are not bitwise stable under stacking on CUDA; kept unfused"
    try:
        source = inspect.getsource(type(module).__call__)
    except (OSError, TypeError):
        return f"forward of {type(module).__name__} has no readable source"
    calls = _CALL.findall(source)
    if {p for p, _ in calls} != {"gate_proj", "up_proj"} or len({v for _, v in calls}) != 1:
        name = type(module).__name__
        return f"forward of {name} does not call gate_proj and up_proj on one input"
    return None


def fuse_module(module: nn.Module, fused_projection: nn.Module) -> None:
    """Swap in the stacked projection and the two halves (dict assignments only)."""
    module[FUSED_NAME] = fused_projection
    del module["gate_proj"], module["up_proj"]
    object.__setattr__(module, "gate_proj", Half(module, 0))
    object.__setattr__(module, "up_proj", Half(module, 1))


def unfuse_module(module: nn.Module, gate: nn.Module, up: nn.Module) -> None:
    for name in ("gate_proj", "up_proj", "_moefuse_pending"):
        module.__dict__.pop(name, None)
    module["gate_proj"], module["up_proj"] = gate, up
    del module[FUSED_NAME]


def matmul_path(module: nn.Module) -> str:
    return "stacked matmul"


DENSE_MLP = Kind("dense MLP", is_fused, why_not_fusable, fuse_module, unfuse_module, matmul_path)
