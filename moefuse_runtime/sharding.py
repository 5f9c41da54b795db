"""Tensor-parallel sharding of a fused model, in either order.

mlx-lm's ``Model.shard(group)`` reaches for ``switch_mlp.gate_proj`` and
``up_proj`` and shards each along its outputs ("all-to-sharded"). A fused
layer holds neither. Teaching the fused projection to shard itself would mean
getting the segments right for every model: mlx-lm's load-time attempt sharded
the stacked tensor as one segment and handed rank 0 all of gate and rank 1
all of up. Instead the model class's ``shard`` is wrapped (with wrapt): fused
layers are split back, the model's own code shards gate and up exactly as it
always does, and each rank fuses its local halves again, the verdicts agreed
across the group. One mechanism for every model whose ``shard`` touches a
SwitchGLU, with no per-model code.

Code that shards with its own functions instead of ``model.shard`` (exo's
strategies) should call ``install`` after sharding; it fuses the local shards.
"""

from __future__ import annotations

import inspect
import logging

import mlx.core as mx
import mlx.nn as nn
import wrapt

from .dense import DENSE_MLP
from .first_forward import GROUP

logger = logging.getLogger(__name__)


def guard_shard(model: nn.Module) -> bool:
    """Wrap ``type(model).shard`` once so that it unfuses, shards, re-fuses.

    Returns whether the class has a ``shard`` method (now guarded).
    """
    cls = type(model)
    current = inspect.getattr_static(cls, "shard", None)
    if current is None:
        return False
    if getattr(current, "_self_wrapper", None) is not _refuse_around_shard:
        wrapt.wrap_function_wrapper(cls, "shard", _refuse_around_shard)
        logger.debug("wrapped %s.shard to re-fuse after sharding", cls.__qualname__)
    return True


def _refuse_around_shard(wrapped, instance, args, kwargs):
    from .installer import find_targets, install, uninstall

    if instance is None:
        return wrapped(*args, **kwargs)
    group = kwargs.get("group", args[0] if args else None) or mx.distributed.init()
    instance.__dict__[GROUP] = group  # for a model that fuses on its first forward
    fused = {kind.name for _, m, kind in find_targets(instance, dense=True) if kind.is_fused(m)}
    if not fused:
        return wrapped(*args, **kwargs)
    uninstall(instance)
    result = wrapped(*args, **kwargs)
    install(instance, enabled=True, group=group, dense=DENSE_MLP.name in fused)
    return result
