"""moefuse_runtime: run gate and up of MLX MoE layers as one expert matmul.

    import moefuse_runtime
    report = moefuse_runtime.install(model)   # after mlx_lm.load / model.shard
    print(report.summary())

See README.md for what is fused, what is skipped and why.

Importing the package imports neither MLX nor mlx-lm: the API below is
loaded on first use, so that ``moefuse run`` and a process that never
loads a model pay nothing for it.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

from .config import ENABLE_ENV, RESERVE_ENV, env_flag
from .hooks import autopatch, is_patched, unpatch

if TYPE_CHECKING:
    from .installer import install, plan, uninstall
    from .layer import FusedSwitchGLU, is_fused
    from .report import FuseReport, LayerResult, Outcome
    from .walk import find_switch_glus

__version__ = "0.1.0"

_LAZY = {
    "install": "installer",
    "uninstall": "installer",
    "plan": "installer",
    "find_switch_glus": "walk",
    "FusedSwitchGLU": "layer",
    "is_fused": "layer",
    "FuseReport": "report",
    "LayerResult": "report",
    "Outcome": "report",
}
"""Public names, and the module each lives in (imported on first use)."""

__all__ = [
    "ENABLE_ENV",
    "RESERVE_ENV",
    "FuseReport",
    "FusedSwitchGLU",
    "LayerResult",
    "Outcome",
    "autopatch",
    "find_switch_glus",
    "install",
    "is_fused",
    "is_patched",
    "plan",
    "uninstall",
    "unpatch",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


def _autopatch_if_asked() -> None:
    """Servers opt in without code changes: EXO_FUSED_MOE=1 in the environment.

    A malformed value must not break ``import moefuse_runtime`` (nor the
    ``moefuse`` CLI that reports it); `install` raises on it instead.
    """
    try:
        wanted = env_flag(ENABLE_ENV, default=False)
    except ValueError as error:
        logging.getLogger(__name__).error("%s; not patching the loaders", error)
        return
    if wanted:
        autopatch()


_autopatch_if_asked()
