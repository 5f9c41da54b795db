"""The fused layer: a SwitchGLU whose gate and up run as one expert matmul.

Every SwitchGLU flavour (mlx-lm's, mlx-vlm's, and any subclass of them) is
fused the same way, driven by the `FLAVOURS` table:

* ``gate_up_proj`` = [gate_proj; up_proj] stacked on the output axis, and
  ``gate_proj`` / ``up_proj`` its two `Half` s (see `halves`), so the
  layer's own forward runs unchanged and computes both with one matmul.
* The layer's ``__class__`` is rebound to a fused twin of its class
  (`fused_class_for`), generated once per class: it marks the layer fused,
  remembers the class to restore, and on CUDA hands calls to the kernels
  when the layer's forward is its flavour's own (the kernels implement that
  forward; a subclass's forward may do more).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import mlx.core as mx
import mlx.nn as nn

from . import projections, vlm_helpers
from .cuda import kernels_for
from .halves import FUSED_NAME, join_halves, split_into_halves, why_forward_not_alike
from .memory import backend
from .twins import Twin, original_class, twin_class

if TYPE_CHECKING:
    ModuleMixin = nn.Module
else:
    ModuleMixin = object  # the twin's other base is the module class itself

__all__ = ["FUSED_NAME", "FLAVOURS", "FusedSwitchGLU", "Kind", "SWITCH_GLU", "is_fused"]


def _routed(layer: nn.Module, routed: mx.array) -> mx.array:
    return routed


def _combined(layer, routed, weights=None, shared=None, residual=None) -> mx.array:
    return layer._combine(routed, weights, shared, residual)


@dataclass(frozen=True)
class Flavour:
    """One package's SwitchGLU: where it lives, and how the CUDA kernels'
    per-(token, expert) output becomes the forward's result given the
    forward's extra arguments."""

    module: str
    name: str
    finish: Callable[..., mx.array]
    prepare: Callable[[], None] = lambda: None
    """Run before a layer of this flavour is fused (idempotent)."""

    def base(self) -> type | None:
        """The class, if its package is imported (it is not imported here)."""
        return getattr(sys.modules.get(self.module), self.name, None)


FLAVOURS = (
    Flavour("mlx_lm.models.switch_layers", "SwitchGLU", _routed),
    # __call__(x, indices, weights=None, shared=None, residual=None): the
    # routed output goes through SwitchGLU._combine (weighted sum, shared
    # experts, DeepSeek-V4's hyper-connection residual).
    Flavour(
        "mlx_vlm.models.switch_layers",
        "SwitchGLU",
        _combined,
        prepare=vlm_helpers.teach_short_block_helpers,
    ),
)


def switch_glu_classes() -> tuple[type, ...]:
    """The SwitchGLU base classes of the packages imported now."""
    return tuple(b for b in (f.base() for f in FLAVOURS) if b is not None)


def flavour_of(cls: type) -> Flavour | None:
    for flavour in FLAVOURS:
        base = flavour.base()
        if base is not None and issubclass(cls, base):
            return flavour
    return None


class FusedSwitchGLU(Twin, ModuleMixin):
    """What every fused SwitchGLU twin adds to its class (a mixin, `twins`).

    Instances are never constructed: `fuse_layer` rebinds the ``__class__`` of
    a live layer, which keeps ``activation``, ``down_proj`` and any other
    attribute the model set. ``isinstance(layer, FusedSwitchGLU)`` holds for
    every fused layer, whatever its package.
    """

    PREFIX = "Fused"
    flavour: ClassVar[Flavour]
    """The package whose SwitchGLU the original class is (or derives from)."""
    kernels = None
    """`cuda.LayerKernels` on CUDA when the layer qualifies, else None: called
    with (layer, gate_up_proj, x, indices), it returns the routed output, or
    None for a call that the layer's own forward (gather_qmm) takes."""

    @classmethod
    def twin_attributes(cls, original: type) -> dict:
        return {"flavour": flavour_of(original)}

    def __call__(self, x: mx.array, indices: mx.array, *args, **kwargs) -> mx.array:
        # Each read once, the class first: an uninstall in another thread drops
        # the kernels, then the halves, then the class, so kernels read here
        # mean that ``twin`` is still the fused class, and this call computes
        # with the layer as it was when read.
        twin = type(self)
        kernels, gate_up = self.__dict__.get("kernels"), self.get(FUSED_NAME)
        if kernels is not None and gate_up is not None:
            routed = kernels(self, gate_up, x, indices)
            if routed is not None:
                return twin.flavour.finish(self, routed, *args, **kwargs)
        return original_class(twin).__call__(self, x, indices, *args, **kwargs)


def fused_class_for(cls: type) -> type:
    """The fused twin of a SwitchGLU class (one per class, made once)."""
    return twin_class(FusedSwitchGLU, cls)


def is_fused(layer: nn.Module) -> bool:
    return isinstance(layer, FusedSwitchGLU)


def has_kernels(layer: nn.Module) -> bool:
    """Whether this is a fused layer on the CUDA kernels."""
    return is_fused(layer) and layer.kernels is not None


def why_not_fusable(layer: nn.Module) -> str | None:
    """Why this SwitchGLU cannot be fused, or None when it can."""
    missing = [k for k in ("gate_proj", "up_proj", "down_proj") if k not in layer]
    if missing:
        return f"no {', '.join(missing)}"
    return (
        projections.mismatch(layer["gate_proj"], layer["up_proj"])
        or projections.backend_limit(layer["gate_proj"], backend())
        or why_forward_not_alike(original_class(type(layer)))
    )


def fuse_layer(layer: nn.Module, fused_projection: nn.Module) -> None:
    """Swap in the fused projection and its halves, then the twin class.

    Only assignments happen here, after the fused arrays exist (and the
    flavour's idempotent `Flavour.prepare`, which never raises), so the
    layer is either fully unfused or fully fused, never in between.
    """
    twin = fused_class_for(type(layer))
    flavour = flavour_of(twin)
    if flavour is not None:
        flavour.prepare()
    split_into_halves(layer, fused_projection)
    layer.__class__ = twin  # kernels, if any, come after (select_path)


def kernel_paths(layer: nn.Module) -> tuple[Any, str]:
    """The CUDA kernels this fused layer would take here (or None), and the
    name of its compute path (`cuda.kernels_for`)."""
    return kernels_for(layer, _why_not_kernel_forward(layer))


def select_path(layer: nn.Module) -> str:
    """Pick the fused layer's compute path for this machine; say which."""
    kernels, path = kernel_paths(layer)
    if kernels is None:
        layer.__dict__.pop("kernels", None)
    else:
        layer.__dict__["kernels"] = kernels
    return path


def _why_not_kernel_forward(layer: nn.Module) -> str | None:
    """The kernels implement a flavour's own forward (with any activation:
    cuda/activations.py)."""
    cls = original_class(type(layer))
    flavour = flavour_of(cls)
    base = None if flavour is None else flavour.base()
    if base is None or cls.__call__ is not base.__call__:
        return f"{cls.__name__} has its own forward"
    return None


def unfuse_layer(layer: nn.Module, gate: nn.Module, up: nn.Module) -> None:
    """The inverse of `fuse_layer`: the kernels go first, then the halves
    (`join_halves`), then the twin class."""
    layer.__dict__.pop("kernels", None)
    join_halves(layer, gate, up)
    layer.__class__ = original_class(type(layer))


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
