"""Environment variables, in one place, and how they are read."""

from __future__ import annotations

import os

ENABLE_ENV = "EXO_FUSED_MOE"
"""`1`/`true`/`on` (or unset) lets `install` fuse; `0`/`false`/`off` disables it."""

KERNEL_ENV = "MOEFUSE_KERNEL"
"""`0`/`false`/`off` keeps fused layers on gather_qmm on CUDA (default: kernels on)."""

CACHE_ENV = "MOEFUSE_CACHE_DIR"
"""Where compiled CUDA kernels are kept (default: ``$XDG_CACHE_HOME/moefuse_runtime``)."""

RESERVE_ENV = "MOEFUSE_RESERVE_GB"
"""Memory (in GB, 10**9 bytes) that fusing must leave free on the device."""

_TRUE = frozenset({"1", "true", "on", "yes"})
_FALSE = frozenset({"0", "false", "off", "no"})


def env_flag(name: str, default: bool) -> bool:
    """Read a boolean environment variable; anything unrecognised is an error.

    A typo such as ``EXO_FUSED_MOE=ture`` must not silently mean "off" on a
    server, so values outside the two known sets raise ``ValueError``.
    """
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(
        f"{name}={raw!r} is not understood: use 1/true/on to enable or 0/false/off to disable"
    )


def env_reserve_bytes() -> int | None:
    """The reserve set by ``MOEFUSE_RESERVE_GB``, or None when unset."""
    raw = os.environ.get(RESERVE_ENV)
    if raw is None or raw.strip() == "":
        return None
    try:
        gigabytes = float(raw)
    except ValueError:
        raise ValueError(f"{RESERVE_ENV}={raw!r} is not a number of GB") from None
    if not gigabytes >= 0:
        raise ValueError(f"{RESERVE_ENV}={raw!r} must be a non-negative number of GB")
    return int(gigabytes * 1e9)
