"""moefuse_runtime: run gate and up of MLX MoE layers as one expert matmul.

    import moefuse_runtime
    report = moefuse_runtime.install(model)   # after mlx_lm.load / model.shard
    print(report.summary())

See README.md for what is fused, what is skipped and why.
"""

from __future__ import annotations

from .config import ENABLE_ENV, RESERVE_ENV, env_flag
from .hooks import autopatch, is_patched, unpatch
from .install import find_switch_glus, install, plan, uninstall
from .layer import FusedSwitchGLU, is_fused
from .report import FuseReport, LayerResult, Outcome

__version__ = "0.1.0"

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

# Servers opt in without code changes: EXO_FUSED_MOE=1 in the environment.
if env_flag(ENABLE_ENV, default=False):
    autopatch()
