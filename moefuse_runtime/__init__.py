"""moefuse_runtime: run gate and up of MLX MoE layers as one expert matmul.

    import moefuse_runtime
    report = moefuse_runtime.install(model)   # after mlx_lm.load / model.shard
    print(report.summary())

See README.md for what is fused, what is skipped and why.
"""

from __future__ import annotations

from .config import ENABLE_ENV, RESERVE_ENV
from .install import find_switch_glus, install, uninstall
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
    "find_switch_glus",
    "install",
    "is_fused",
    "uninstall",
]
