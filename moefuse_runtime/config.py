"""Environment variables, in one place, and how they are read."""

from __future__ import annotations

import os

ENABLE_ENV = "EXO_FUSED_MOE"
"""`1`/`true`/`on` (or unset) lets `install` fuse; `0`/`false`/`off` disables it."""

KERNEL_ENV = "MOEFUSE_KERNEL"
"""`0`/`false`/`off` keeps fused layers on gather_qmm on CUDA (default: kernels on)."""

CACHE_ENV = "MOEFUSE_CACHE_DIR"
"""Where compiled CUDA kernels are kept (default: ``$XDG_CACHE_HOME/moefuse_runtime``)."""

TILES_ENV = "MOEFUSE_TILES"
"""A tile table of the user's (JSON, as ``moefuse tune`` writes), used on CUDA
instead of the shipped tables."""

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
    if not 0 <= gigabytes < float("inf"):
        raise ValueError(f"{RESERVE_ENV}={raw!r} must be a finite, non-negative number of GB")
    return int(gigabytes * 1e9)


def check_env() -> None:
    """Every variable `install` reads, read now, on every backend: a typo is a
    ValueError naming the variable, whether or not this machine would act on it."""
    env_flag(ENABLE_ENV, default=True)
    env_flag(KERNEL_ENV, default=True)
    env_reserve_bytes()


def check_flag(function: str, name: str, value: object, none: bool = False) -> None:
    """A flag argument is a bool (or None where ``none``): 0, 1 or "false" are
    refused, since ``enabled="false"`` would otherwise read as true."""
    if isinstance(value, bool) or (none and value is None):
        return
    accepted = "True, False or None" if none else "True or False"
    raise TypeError(f"{function}: {name} must be {accepted}, not {value!r}")


def check_reserve(function: str, value: object) -> int | None:
    """``reserve_bytes``: None, or a finite, non-negative number of bytes."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{function}: reserve_bytes must be a number of bytes or None, not {value!r}"
        )
    if not 0 <= value < float("inf"):
        raise ValueError(
            f"{function}: reserve_bytes must be finite and non-negative, not {value!r}"
        )
    return int(value)
