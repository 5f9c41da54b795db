"""Finding the layers to fuse in a model, lazily.

The walk follows a model's children (dicts, lists and tuples of modules) and
yields each SwitchGLU (mlx-lm's, mlx-vlm's and their subclasses) and, when
asked, each dense gated MLP, with its dotted path. It holds no list of
modules, so that a layer replaced while walking can be freed at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import cast

import mlx.nn as nn

from .dense import DENSE_MLP
from .dense import is_candidate as is_dense_candidate
from .layer import SWITCH_GLU, Kind, switch_glu_classes


def find_switch_glus(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every SwitchGLU (mlx-lm's, mlx-vlm's, subclasses) in ``model`` with its
    dotted path, found lazily."""
    for path, module, _ in _walk(model, "", dense=False, switch=switch_glu_classes()):
        yield path, module


def find_targets(model: nn.Module, dense: bool) -> Iterator[tuple[str, nn.Module, Kind]]:
    """SwitchGLUs and (with ``dense``) dense gate/up MLPs, found lazily."""
    yield from _walk(model, "", dense, switch_glu_classes())


def _walk(
    value: object, path: str, dense: bool, switch: tuple[type, ...]
) -> Iterator[tuple[str, nn.Module, Kind]]:
    if isinstance(value, switch):
        yield path, cast(nn.Module, value), SWITCH_GLU
        return
    if dense and isinstance(value, nn.Module) and is_dense_candidate(value):
        yield path, value, DENSE_MLP
        return
    children: Iterable[tuple[str, object]]
    if isinstance(value, dict):
        children = value.items()
    elif isinstance(value, (list, tuple)):
        children = ((str(i), v) for i, v in enumerate(value))
    else:
        return
    for key, child in children:
        if isinstance(child, (dict, list, tuple)):
            yield from _walk(child, f"{path}.{key}" if path else str(key), dense, switch)
