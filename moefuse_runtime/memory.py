"""Memory probes: how much a layer's fusion may take on this machine.

Fusing one layer briefly holds gate and up twice (old and new copies). Load-
time fusion once pushed a 128 GB Mac serving a 122B model past its Metal
working set; so before each layer we ask every probe that applies and take
the smallest answer, keeping a reserve free for the server's own needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import psutil

from .config import env_reserve_bytes

GIB = 1 << 30
DEFAULT_RESERVE_FRACTION = 0.05
MIN_DEFAULT_RESERVE = 1 * GIB


@dataclass(frozen=True)
class Headroom:
    """Bytes available for new arrays, and the probe that bounded them."""

    available: int
    source: str


def backend() -> str:
    """'metal', 'cuda' or 'cpu': the backend that holds the model's arrays."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return "cpu"


def total_memory() -> int:
    """The memory the model's arrays live in (device memory or system RAM)."""
    info = mx.device_info()
    kind = backend()
    if kind == "metal":
        return int(info.get("memory_size", psutil.virtual_memory().total))
    if kind == "cuda":
        return int(info.get("total_memory", psutil.virtual_memory().total))
    return int(psutil.virtual_memory().total)


def headroom() -> Headroom:
    """The smallest of the applicable probes, read now."""
    active = mx.get_active_memory()
    probes = [Headroom(mx.get_memory_limit() - active, "mx.get_memory_limit()")]
    kind = backend()
    info = mx.device_info()
    if kind == "metal" and "max_recommended_working_set_size" in info:
        working_set = int(info["max_recommended_working_set_size"])
        probes.append(Headroom(working_set - active, "Metal recommended working set"))
    elif kind == "cuda" and "free_memory" in info:
        probes.append(Headroom(int(info["free_memory"]), "CUDA free memory"))
    else:
        available = psutil.virtual_memory().available
        probes.append(Headroom(int(available), "system RAM available"))
    return min(probes, key=lambda h: h.available)


def default_reserve_bytes() -> int:
    """``MOEFUSE_RESERVE_GB`` if set, else 5% of memory and at least 1 GiB."""
    from_env = env_reserve_bytes()
    if from_env is not None:
        return from_env
    return max(MIN_DEFAULT_RESERVE, int(total_memory() * DEFAULT_RESERVE_FRACTION))


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
