"""Wrapping other packages' functions, in one place (wrapt).

Every patch this package makes goes through `wrap`: the loaders' hooks
(`hooks`), a model class's ``shard`` (`installer.guard_shard`) and
mlx-vlm's short-block helpers (`vlm_helpers`). One ``wrapt.FunctionWrapper``
per target and wrapper, made once (wrapt does not make patches idempotent),
switched on and off by an ``enabled`` callable where the patch can be
turned off, and, for a module's function that other modules took by name
(``from .utils import load``), rebound under every alias: patching the
module alone does not reach those. `unwrap` puts the original back the same
way, and `arguments` reads a call's arguments by the wrapped function's
signature, so that a hook finds ``tensor_group`` whatever its position.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Any

import wrapt

Wrapper = Callable[[Any, Any, tuple, dict], Any]
"""wrapt's ``wrapper(wrapped, instance, args, kwargs)``."""


def wrapper_of(function: object) -> Callable | None:
    """The wrapper a wrapt ``FunctionWrapper`` calls, else None."""
    if isinstance(function, wrapt.FunctionWrapper):
        return function._self_wrapper
    return None


def wrap(
    owner: object,
    name: str,
    wrapper: Wrapper,
    *,
    enabled: Callable[[], bool] | None = None,
    aliases: bool = False,
) -> bool:
    """Wrap ``owner.name`` (a module's function or a class's method, own or
    inherited) with ``wrapper``, unless it is already. Returns whether it was
    wrapped now.

    ``enabled``: called at every call; when it says False the original runs
    alone. ``aliases``: also rebind every module global that holds the
    original, under any name.
    """
    current = inspect.getattr_static(owner, name)
    if wrapper_of(current) is wrapper:
        return False
    options = {"enabled": enabled}
    patched = wrapt.wrap_object(owner, name, wrapt.FunctionWrapper, (wrapper,), options)
    if aliases:
        _rebind_everywhere(current, patched)
    return True


def unwrap(owner: object, name: str, wrapper: Wrapper, *, aliases: bool = False) -> bool:
    """Undo `wrap` (and its aliases); returns whether ``owner.name`` was ours."""
    current = inspect.getattr_static(owner, name, None)
    if wrapper_of(current) is not wrapper:
        return False
    original = current.__wrapped__  # type: ignore[union-attr]
    setattr(owner, name, original)
    if aliases:
        _rebind_everywhere(current, original)
    return True


def arguments(function: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A call's arguments by parameter name, defaults included; empty when
    they do not fit ``function``'s signature (the call itself then fails)."""
    try:
        bound = inspect.signature(function).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return {}
    bound.apply_defaults()
    return dict(bound.arguments)


def _rebind_everywhere(old: object, new: object) -> None:
    """Rebind every module global that holds ``old``, under any name
    (``from mlx_lm.utils import load as load_model_and_tokenizer`` too)."""
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)  # vars(): no lazy __getattr__
        if not isinstance(namespace, dict):
            continue
        for key, value in list(namespace.items()):
            if value is old:
                namespace[key] = new
