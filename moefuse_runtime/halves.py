"""Gate and up as two halves of one stacked projection.

A fused module keeps its own forward. Its ``gate_up_proj`` child holds the
stacked projection, and ``gate_proj`` and ``up_proj`` become two `Half` s of
it. The first half called computes the stacked projection once and leaves
the other half its share; the other half, called with the very same
arguments (the same array objects), takes it. Called with anything else, a
half computes the stacked projection afresh and returns its share: always
correct, just not fused.

So the fusion does not depend on how a forward is written, only on one fact
that `why_forward_not_alike` checks in its source: every call of
``self.gate_proj(...)`` and ``self.up_proj(...)`` passes the same arguments.
One mechanism serves dense MLPs, mlx-lm's and mlx-vlm's SwitchGLUs and their
subclasses, whichever of gate and up they call first.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

FUSED_NAME = "gate_up_proj"
HALF_NAMES = ("gate_proj", "up_proj")
PENDING = "_moefuse_pending"
_CALL = re.compile(r"self\.(gate_proj|up_proj)\(([^()]*)\)")


class Half:
    """``gate_proj`` (index 0) or ``up_proj`` (index 1) of a fused module.

    Not an nn.Module: the parameters live once, in ``owner.gate_up_proj``,
    which `nn.quantize`, ``update`` and ``load_weights`` see and may replace.
    """

    def __init__(self, owner: nn.Module, index: int) -> None:
        self.owner = owner
        self.index = index

    def __call__(self, *args, **kwargs) -> mx.array:
        stacked = self.owner.get(FUSED_NAME)
        if stacked is None:  # unfused since this half was looked up: gate or up is back
            return self.owner[HALF_NAMES[self.index]](*args, **kwargs)
        return self.share(args, kwargs, lambda: stacked(*args, **kwargs))

    def share(self, args: tuple, kwargs: dict, stacked: Callable[[], mx.array | None]):
        """This half of ``stacked()``: computed once for the two halves when
        both ask with the same ``args`` and ``kwargs``. A host helper that
        takes a projection and its inputs (mlx-vlm's short-block helpers)
        shares the same way; ``stacked()`` may say None (not supported), and
        then so does the half."""
        state = self.owner.__dict__
        pending = state.get(PENDING)
        if pending is not None and _same_call(pending[0], pending[1], args, kwargs):
            state[PENDING] = None
            return pending[2][self.index]
        out = stacked()
        if out is None:
            return None
        halves = mx.split(out, 2, axis=-1)
        state[PENDING] = (args, kwargs, halves)
        return halves[self.index]

    def __repr__(self) -> str:
        return f"Half({FUSED_NAME}[{self.index}])"


def _same_call(args: tuple, kwargs: dict, new_args: tuple, new_kwargs: dict) -> bool:
    """Arrays must be the same objects, other values equal."""
    if len(args) != len(new_args) or kwargs.keys() != new_kwargs.keys():
        return False
    pairs = [*zip(args, new_args, strict=True), *((kwargs[k], new_kwargs[k]) for k in kwargs)]
    return all(
        a is b if isinstance(a, mx.array) or isinstance(b, mx.array) else a == b for a, b in pairs
    )


def is_split(module: nn.Module) -> bool:
    """Whether the module's gate_proj is a `Half` (the module is fused)."""
    return isinstance(module.get("gate_proj"), Half)


def split_into_halves(module: nn.Module, fused_projection: nn.Module) -> None:
    """Swap in the stacked projection, then the two halves in place of gate
    and up (one entry assignment each, so the old projections go at once).

    The halves are the module's entries, as its projections were: a forward
    running meanwhile in another thread looks each name up in one step
    (mlx's ``Module.__getattr__``) and finds the old projection or a half of
    a stacked projection that is already there, never nothing. mlx's tree
    functions (``parameters``, ``children``, ``update``) skip the halves,
    which are not modules: the parameters live once, in ``gate_up_proj``.
    """
    module[FUSED_NAME] = fused_projection
    for index, name in enumerate(HALF_NAMES):
        module[name] = Half(module, index)


def join_halves(module: nn.Module, gate: nn.Module, up: nn.Module) -> None:
    """The inverse of `split_into_halves`, in the reverse order: gate and up
    replace the halves before the stacked projection goes (a half looked up
    earlier then falls back to its own)."""
    module["gate_proj"], module["up_proj"] = gate, up
    module.__dict__.pop(PENDING, None)
    del module[FUSED_NAME]


def why_forward_not_alike(cls: type) -> str | None:
    """None when ``cls.__call__`` calls gate_proj and up_proj with the same
    arguments everywhere (in every branch), else why it cannot be fused."""
    try:
        source = inspect.getsource(cls.__call__)
    except (OSError, TypeError):
        return f"forward of {cls.__name__} has no readable source"
    calls = [(name, " ".join(args.split())) for name, args in _CALL.findall(source)]
    if {name for name, _ in calls} != {"gate_proj", "up_proj"} or len({a for _, a in calls}) != 1:
        name = cls.__name__
        return f"forward of {name} does not call gate_proj and up_proj with the same arguments"
    return None
