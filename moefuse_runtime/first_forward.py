"""Fusing on a model's first forward pass, for loaders that return too early.

``mlx_lm.utils.load_model`` (vllm-mlx's loader) and ``mlx_vlm.utils.load_model``
return a model that its caller may still shard with its own code, which
reaches for ``gate_proj`` (mlx-lm's and mlx-vlm's ``sharded_load``, exo's
strategies), or evaluate lazily. Fusing there would break the one and force
the other. So these loaders only *arm* the model: each SwitchGLU's class is
rebound to an armed twin whose first call (by then every loader and sharder
has run) restores every layer of the model and runs `install` on the whole
model, with the group the model was sharded over, and then carries on with
that call, now fused. A loader that fuses by itself later (``load``,
``sharded_load``, exo) simply finds the model armed and disarms it.

The armed twin adds no cost after the first call: once disarmed, the layers
are of their own (or their fused) class again. mlx-vlm's generate calls
``model.language_model`` directly, which is why the layers are armed and
not the model's own ``__call__``.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable

import mlx.nn as nn

from .layer import is_fused
from .twins import Twin, original_class, twin_class
from .walk import find_switch_glus

logger = logging.getLogger(__name__)

ROOT = "_moefuse_armed_root"


class Root:
    """The model an armed layer fuses on its first call (held weakly), and
    what fusing it means (``on_first_call``, given by whoever armed it).

    A deep copy of the model gets a root of its own: the copy of the model
    (already in the copy's memo when its layers are copied); a layer copied
    without its model gets none and fuses nothing on its first call.
    """

    def __init__(self, model: nn.Module | None, on_first_call: Callable[[nn.Module], None]):
        self._ref = weakref.ref(model) if model is not None else None
        self.on_first_call = on_first_call

    def __call__(self) -> nn.Module | None:
        return self._ref() if self._ref is not None else None

    def __deepcopy__(self, memo) -> Root:
        model = self()
        return Root(memo.get(id(model)) if model is not None else None, self.on_first_call)

    def __reduce__(self):
        # pickled with its model (a reference in the same pickle) and the
        # function (by name)
        return (Root, (self(), self.on_first_call))


def _fuse_on_first_call(self, *args, **kwargs):
    root = self.__dict__.get(ROOT)
    model = root() if root is not None else None
    disarm(model if model is not None else self)
    self.__dict__.pop(ROOT, None)  # this layer is disarmed, whatever its root held
    self.__class__ = unarmed_class(type(self))
    if model is not None:
        root.on_first_call(model)
    return self(*args, **kwargs)  # as the class is now: fused, or not


class Armed(Twin):
    """What an armed twin adds to a SwitchGLU class: its first call fuses the
    model (`_fuse_on_first_call`)."""

    PREFIX = "Armed"
    __call__ = _fuse_on_first_call


def armed_class_for(cls: type) -> type:
    return twin_class(Armed, cls)


def unarmed_class(cls: type) -> type:
    """The layer's own class, whether armed or not (a fused twin stays fused)."""
    return original_class(cls, Armed)


def arm(model: nn.Module, on_first_call: Callable[[nn.Module], None]) -> int:
    """Make the first forward of any SwitchGLU in ``model`` call
    ``on_first_call(model)`` (which fuses it: `installer.arm`), then carry on.

    Returns how many layers were armed. Never raises into the loader.
    """
    try:
        root = Root(model, on_first_call)
        armed = 0
        for _, layer in find_switch_glus(model):
            if is_fused(layer):
                continue
            layer.__dict__[ROOT] = root
            layer.__class__ = armed_class_for(unarmed_class(type(layer)))
            armed += 1
        if armed:
            logger.debug("moefuse_runtime: %d layers fuse on the first forward", armed)
        return armed
    except Exception:  # noqa: BLE001 - a loader must still return its model
        logger.exception("moefuse_runtime: could not arm the model; it stays unfused")
        disarm(model)
        return 0


def disarm(model: nn.Module) -> None:
    """Give every armed layer in ``model`` its own class back."""
    for _, layer in find_switch_glus(model):
        layer.__dict__.pop(ROOT, None)
        layer.__class__ = unarmed_class(type(layer))


def is_armed(model: nn.Module) -> bool:
    return any(ROOT in layer.__dict__ for _, layer in find_switch_glus(model))
