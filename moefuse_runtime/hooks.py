"""Zero-code activation: fuse every model that the MLX loaders return.

``autopatch()`` registers wrapt post-import hooks: they fire at once if the
target module is already imported, otherwise when it is. Each hook wraps one
loader and then replaces the aliases other modules already took of it
(``mlx_lm/server.py`` does ``from .utils import load, sharded_load``; a module
imported later gets the wrapper from the patched module itself).

Loaders that return a model *after* its sharding fuse it at once:

- ``mlx_lm.utils.load`` (``mlx_lm.load``, ``mlx_lm.generate``,
  ``mlx_lm.server``) and ``mlx_lm.utils.sharded_load`` (tensor and pipeline
  parallel; ``pipeline_load`` goes through it);
- ``mlx_vlm.utils.load`` (``mlx_vlm.load``, ``mlx_vlm.generate``,
  ``mlx_vlm.server``, vllm-mlx's multimodal path) and
  ``mlx_vlm.utils.sharded_load``;
- exo's ``load_mlx_items``, a generator that loads, shards with exo's own
  strategies, and returns ``(model, tokenizer, vision)``.

``mlx_lm.utils.load_model`` (vllm-mlx's text path) and
``mlx_vlm.utils.load_model`` return before their callers shard, with their
own code that reaches for ``gate_proj``: they only arm the model, which then
fuses on its first forward pass (see `first_forward`).

A hook never raises into the host: a failure is logged and the model stays
unfused. wrapt does not make patches idempotent, so each wrapper is marked.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

import wrapt

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    module: str
    name: str
    wrapper: Callable


def install_quietly(model: object, group: object = None) -> None:
    """`installer.install_quietly`, imported when a loader returns: this module
    stays light (``import moefuse_runtime`` imports it; the installer imports MLX)."""
    from .installer import install_quietly

    install_quietly(model, group=group)


def _after_load(wrapped, instance, args, kwargs):
    """mlx_lm.utils.load -> (model, tokenizer[, config])."""
    result = wrapped(*args, **kwargs)
    if _active:
        install_quietly(result[0])
    return result


def _after_sharded_load_of(tensor_at: int, pipeline_at: int, default_needs_shard: bool):
    """A hook for a ``sharded_load(repo, ...)`` taking its tensor and pipeline
    groups at these positions (or by name). With neither group given, the
    loader shards over ``mx.distributed.init()`` (mlx-vlm's only for a model
    with ``shard``), so its ranks agree verdicts over that group too."""

    def after(wrapped, instance, args, kwargs):
        result = wrapped(*args, **kwargs)
        if _active:
            tensor_group = kwargs.get("tensor_group", _positional(args, tensor_at))
            pipeline_group = kwargs.get("pipeline_group", _positional(args, pipeline_at))
            sharded = not default_needs_shard or hasattr(result[0], "shard")
            if tensor_group is None and pipeline_group is None and sharded:
                import mlx.core as mx

                tensor_group = mx.distributed.init()  # what sharded_load itself uses
            install_quietly(result[0], group=tensor_group)
        return result

    return after


def _positional(args: tuple, position: int) -> object:
    return args[position] if len(args) > position else None


# mlx_lm.utils.sharded_load(repo, pipeline_group, tensor_group, ...)
_after_sharded_load = _after_sharded_load_of(2, 1, default_needs_shard=False)
# mlx_vlm.utils.sharded_load(repo, tensor_group, pipeline_group): tensor first
_after_vlm_sharded_load = _after_sharded_load_of(1, 2, default_needs_shard=True)


def _after_load_model(wrapped, instance, args, kwargs):
    """load_model(path, ...) -> model, or (model, config) for mlx-lm's."""
    result = wrapped(*args, **kwargs)
    if _active:
        from .installer import arm

        arm(result[0] if isinstance(result, tuple) else result)
    return result


def _after_exo_load(wrapped, instance, args, kwargs):
    """exo's load_mlx_items(bound_instance, group): a generator returning
    (model, tokenizer, vision_processor) once loaded and sharded."""
    result = yield from wrapped(*args, **kwargs)
    if _active:
        install_quietly(result[0], group=kwargs.get("group", args[1] if len(args) > 1 else None))
    return result


TARGETS = (
    Target("mlx_lm.utils", "load", _after_load),
    Target("mlx_lm.utils", "sharded_load", _after_sharded_load),
    Target("mlx_lm.utils", "load_model", _after_load_model),
    Target("mlx_vlm.utils", "load", _after_load),
    Target("mlx_vlm.utils", "sharded_load", _after_vlm_sharded_load),
    Target("mlx_vlm.utils", "load_model", _after_load_model),
    Target("exo.worker.engines.mlx.utils_mlx", "load_mlx_items", _after_exo_load),
)

_active = False
_registered = False


def autopatch() -> None:
    """Fuse every model the loaders return from now on (idempotent)."""
    global _active, _registered
    _active = True
    if not _registered:
        for module in {t.module for t in TARGETS}:
            wrapt.register_post_import_hook(_patch_module, module)
        _registered = True
    # Hooks fire once per import; modules already loaded are (re)patched here.
    for module in {t.module for t in TARGETS}:
        if module in sys.modules:
            _patch_module(sys.modules[module])


def autopatch_on_import(_module) -> None:
    """For `moefuse run`'s sitecustomize: registered by name with wrapt, so
    that Python processes that never import mlx-lm never import us either."""
    autopatch()


def unpatch() -> None:
    """Undo `autopatch`: the original loaders are put back everywhere."""
    global _active
    _active = False
    for target in TARGETS:
        module = sys.modules.get(target.module)
        current = getattr(module, target.name, None)
        if _is_ours(current):
            _replace_everywhere(current, current.__wrapped__)


def is_patched() -> bool:
    return _active


def _patch_module(module) -> None:
    """Post-import hook: wrap this module's targets and their aliases."""
    if not _active:
        return
    for target in TARGETS:
        if target.module != module.__name__:
            continue
        try:
            original = getattr(module, target.name, None)
            if original is None or _is_ours(original):
                continue  # still being imported, or done already
            wrapper = wrapt.FunctionWrapper(original, target.wrapper)
            _replace_everywhere(original, wrapper)
            logger.debug("moefuse_runtime: wrapped %s.%s", target.module, target.name)
        except Exception:  # noqa: BLE001 - an exception here would break the import
            logger.exception("moefuse_runtime: could not wrap %s.%s", target.module, target.name)


def _is_ours(function: object) -> bool:
    return isinstance(function, wrapt.FunctionWrapper) and getattr(
        function, "_self_wrapper", None
    ) in {t.wrapper for t in TARGETS}


def _replace_everywhere(old: object, new: object) -> None:
    """Rebind every module global that holds ``old``, under any name
    (``from mlx_lm.utils import load as load_model_and_tokenizer`` too)."""
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)  # vars(): no lazy __getattr__
        if not isinstance(namespace, dict):
            continue
        for name, value in list(namespace.items()):
            if value is old:
                namespace[name] = new
