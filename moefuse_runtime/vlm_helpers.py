"""mlx-vlm's short-block helpers, taught to read fused layers.

mlx-vlm's SwitchGLU runs a short block (2-8 tokens, fewer than 64 routes,
in inference: speculative verification) through helpers that take the
layer's projections by type: on Metal a one-dispatch gate+up kernel
(4/5-bit), else ``exact_quantized_switch_linear`` for up and then gate,
each bitwise what token-by-token calls give. A fused layer's projections
are `Half` s, so both helpers said None and the block ran token by token.
`teach_short_block_helpers` wraps them (once, when an mlx-vlm layer is
first fused): the kernel gets `gate_up_views` of the stacked arrays, and
the halves share one dispatch of the stacked projection in the other. A
fault in a wrapper is logged and the helper runs as before.
"""

from __future__ import annotations

import copy
import importlib
import logging
from dataclasses import dataclass

import mlx.nn as nn

from .halves import FUSED_NAME, Half, is_split
from .patching import arguments, wrap

logger = logging.getLogger("moefuse_runtime")


def _first_three(wrapped, args: tuple, kwargs: dict) -> tuple:
    """A helper's (projection or layer, x, indices), by its signature."""
    projection, x, indices = list(arguments(wrapped, args, kwargs).values())[:3]
    return projection, x, indices


def _switch_linear_for_halves(wrapped, instance, args, kwargs):
    """mlx-vlm's ``exact_quantized_switch_linear(linear, x, indices)`` that
    also takes a `Half`: its share of the same helper run on the stacked
    projection (both halves' rows: each half bitwise the same)."""
    try:
        linear, x, indices = _first_three(wrapped, args, kwargs)
        if isinstance(linear, Half):
            owner = linear.owner
            return linear.share((x, indices), {}, lambda: wrapped(owner[FUSED_NAME], x, indices))
    except Exception:  # noqa: BLE001 - never into the host: it falls back token by token
        logger.exception("moefuse_runtime: mlx-vlm's short-block helper on a fused layer")
    return wrapped(*args, **kwargs)


def gate_up_views(layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    """gate_proj and up_proj of a fused quantized layer as projections of
    their own class, for helpers that read their arrays: the stacked arrays
    are (E, 2N, ...), expert e's gate rows then its up rows, so seen as
    (2E, N, ...) gate e is block 2e and up e block 2e + 1. The gate view
    drops the last block and the up view the first: same shapes, contiguous
    views (no copy), both read at expert index 2e."""
    stacked = layer[FUSED_NAME]
    views = []
    for first in (0, 1):
        view = copy.copy(stacked)
        for name in ("weight", "scales", "biases"):
            if name in stacked:
                a = stacked[name]
                blocks = a.reshape(2 * a.shape[0], a.shape[1] // 2, *a.shape[2:])
                view[name] = blocks[first : first + blocks.shape[0] - 1]
        views.append(view)
    return views[0], views[1]


@dataclass
class _GateUp:
    """What mlx-vlm's gate+up helper reads of a SwitchGLU."""

    gate_proj: nn.Module
    up_proj: nn.Module


def _gate_up_kernel_for_fused(wrapped, instance, args, kwargs):
    """mlx-vlm's ``exact_affine_switch_gate_up(switch, x, indices)`` (on
    Metal, one dispatch for a short block's gate and up) for a fused layer:
    the same kernel on `gate_up_views`, expert indices doubled."""
    try:
        switch, x, indices = _first_three(wrapped, args, kwargs)
        if is_split(switch) and "scales" in switch[FUSED_NAME]:
            return wrapped(_GateUp(*gate_up_views(switch)), x, indices * 2)
    except Exception:  # noqa: BLE001 - never into the host: the helper below runs instead
        logger.exception("moefuse_runtime: mlx-vlm's gate+up kernel on a fused layer")
    return wrapped(*args, **kwargs)


HELPERS = (
    ("mlx_vlm.models.fast_ops", "exact_affine_switch_gate_up", _gate_up_kernel_for_fused),
    (
        "mlx_vlm.models.quantized_verifier",
        "exact_quantized_switch_linear",
        _switch_linear_for_halves,
    ),
)


def teach_short_block_helpers() -> None:
    """Wrap mlx-vlm's short-block helpers (idempotent; see the top of this
    module). Without the wrappers, short blocks run token by token."""
    for module_name, name, wrapper in HELPERS:
        try:
            wrap(importlib.import_module(module_name), name, wrapper)
        except Exception:  # noqa: BLE001 - without it, short blocks run token by token
            logger.exception("moefuse_runtime: could not wrap %s.%s", module_name, name)
