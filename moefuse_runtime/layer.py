"""The fused layer: a SwitchGLU whose gate and up run as one expert matmul."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU, _gather_sort, _scatter_unsort

from . import projections
from .cuda import kernels_for
from .memory import backend

FUSED_NAME = "gate_up_proj"


class FusedSwitchGLU(SwitchGLU):
    """SwitchGLU with ``gate_up_proj`` = [gate_proj; up_proj] stacked on outputs.

    Instances are never constructed: `fuse_layer` rebinds the ``__class__`` of
    a live SwitchGLU, which keeps ``activation``, ``down_proj`` and any other
    attribute the model set. ``__call__`` is SwitchGLU's, line for line, with
    the two expert matmuls replaced by one and a split.
    """

    unfused_class: type[SwitchGLU] = SwitchGLU
    kernels = None
    """`cuda.LayerKernels` on CUDA when the layer qualifies, else None."""

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        kernel_path = self.kernels.pick(self, x, indices) if self.kernels is not None else None
        if kernel_path is not None:
            return kernel_path(self, x, indices)
        x = mx.expand_dims(x, (-2, -3))

        # Same threshold and helpers as SwitchGLU: many tokens are sorted by
        # expert so that each expert's weights are read in one run.
        indices = mx.stop_gradient(indices)
        do_sort = indices.size >= 64
        idx = indices
        inv_order = None
        if do_sort:
            x, idx, inv_order = _gather_sort(x, indices)
        gate_up = self.gate_up_proj(x, idx, sorted_indices=do_sort)
        x_gate, x_up = mx.split(gate_up, 2, axis=-1)
        x = self.down_proj(
            self.activation(x_up, x_gate),
            idx,
            sorted_indices=do_sort,
        )

        if do_sort:
            x = _scatter_unsort(x, inv_order, indices.shape)

        return x.squeeze(-2)


_FUSED_CLASSES: dict[type[SwitchGLU], type[FusedSwitchGLU]] = {SwitchGLU: FusedSwitchGLU}


def fused_class_for(cls: type[SwitchGLU]) -> type[FusedSwitchGLU]:
    """The fused counterpart of a SwitchGLU class (subclasses get their own)."""
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(
            f"Fused{cls.__name__}",
            (FusedSwitchGLU, cls),
            {"unfused_class": cls, "__module__": __name__},
        )
    return _FUSED_CLASSES[cls]


def is_fused(layer: nn.Module) -> bool:
    return isinstance(layer, FusedSwitchGLU)


def why_not_fusable(layer: SwitchGLU) -> str | None:
    """Why this SwitchGLU cannot be fused, or None when it can."""
    cls = type(layer)
    if cls.__call__ is not SwitchGLU.__call__:
        return f"{cls.__name__} overrides SwitchGLU.__call__"
    missing = [k for k in ("gate_proj", "up_proj", "down_proj") if k not in layer]
    if missing:
        return f"no {', '.join(missing)}"
    return projections.mismatch(layer["gate_proj"], layer["up_proj"]) or (
        projections.backend_limit(layer["gate_proj"], backend())
    )


def fuse_layer(layer: SwitchGLU, fused_projection: nn.Module) -> None:
    """Swap in the fused projection; gate and up are dropped from the layer.

    Only dictionary assignments happen here, after the fused arrays exist, so
    the layer is either fully unfused or fully fused, never in between.
    """
    layer[FUSED_NAME] = fused_projection
    del layer["gate_proj"], layer["up_proj"]
    layer.__class__ = fused_class_for(type(layer))


def select_path(layer: FusedSwitchGLU) -> str:
    """Pick the fused layer's compute path for this machine; say which."""
    kernels, path = kernels_for(layer)
    if kernels is None:
        layer.__dict__.pop("kernels", None)
    else:
        layer.kernels = kernels
    return path


def unfuse_layer(layer: FusedSwitchGLU, gate: nn.Module, up: nn.Module) -> None:
    """The inverse of `fuse_layer`."""
    layer.__dict__.pop("kernels", None)
    layer["gate_proj"], layer["up_proj"] = gate, up
    del layer[FUSED_NAME]
    layer.__class__ = type(layer).unfused_class


@dataclass(frozen=True)
class Kind:
    """How install() handles one kind of gate/up module."""

    name: str
    is_fused: Callable[[nn.Module], bool]
    why_not_fusable: Callable[[nn.Module], str | None]
    fuse: Callable[[nn.Module, nn.Module], None]
    unfuse: Callable[[nn.Module, nn.Module, nn.Module], None]
    select_path: Callable[[nn.Module], str]
    """Chooses how a fused module computes here; returns that path's name."""


SWITCH_GLU = Kind("SwitchGLU", is_fused, why_not_fusable, fuse_layer, unfuse_layer, select_path)
