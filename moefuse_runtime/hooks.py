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
unfused. Every wrapper goes through `patching.wrap` (once, enabled while
`is_patched`, every alias rebound).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

import wrapt

from .patching import arguments, unwrap, wrap

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
    install_quietly(result[0])
    return result


def _after_sharded_load_of(default_needs_shard: bool):
    """A hook for a ``sharded_load(repo, ...)`` taking ``tensor_group`` and
    ``pipeline_group`` (mlx-lm's and mlx-vlm's, in different orders). With
    neither group given, the loader shards over ``mx.distributed.init()``
    (mlx-vlm's only for a model with ``shard``), so its ranks agree verdicts
    over that group too."""

    def after(wrapped, instance, args, kwargs):
        result = wrapped(*args, **kwargs)
        given = arguments(wrapped, args, kwargs)
        tensor_group = given.get("tensor_group")
        sharded = not default_needs_shard or hasattr(result[0], "shard")
        if tensor_group is None and given.get("pipeline_group") is None and sharded:
            import mlx.core as mx

            tensor_group = mx.distributed.init()  # what sharded_load itself uses
        install_quietly(result[0], group=tensor_group)
        return result

    return after


_after_sharded_load = _after_sharded_load_of(default_needs_shard=False)
_after_vlm_sharded_load = _after_sharded_load_of(default_needs_shard=True)


def _after_load_model(wrapped, instance, args, kwargs):
    """load_model(path, ...) -> model, or (model, config) for mlx-lm's."""
    result = wrapped(*args, **kwargs)
    from .installer import arm

    arm(result[0] if isinstance(result, tuple) else result)
    return result


def _after_exo_load(wrapped, instance, args, kwargs):
    """exo's load_mlx_items(bound_instance, group): a generator returning
    (model, tokenizer, vision_processor) once loaded and sharded."""
    result = yield from wrapped(*args, **kwargs)
    install_quietly(result[0], group=arguments(wrapped, args, kwargs).get("group"))
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

_patched = False
_registered = False


def is_patched() -> bool:
    """Whether the loaders fuse what they return (`autopatch` without `unpatch`)."""
    return _patched


def autopatch() -> None:
    """Fuse every model the loaders return from now on (idempotent)."""
    global _patched, _registered
    _patched = True
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
    global _patched
    _patched = False
    for target in TARGETS:
        module = sys.modules.get(target.module)
        if module is not None:
            unwrap(module, target.name, target.wrapper, aliases=True)


def _patch_module(module) -> None:
    """Post-import hook: wrap this module's targets and their aliases. The
    wrappers run only while `is_patched`."""
    if not _patched:
        return
    for target in TARGETS:
        if target.module != module.__name__ or not hasattr(module, target.name):
            continue  # another module's, or this one is still being imported
        try:
            if wrap(module, target.name, target.wrapper, enabled=is_patched, aliases=True):
                logger.debug("moefuse_runtime: wrapped %s.%s", target.module, target.name)
        except Exception:  # noqa: BLE001 - an exception here would break the import
            logger.exception("moefuse_runtime: could not wrap %s.%s", target.module, target.name)
