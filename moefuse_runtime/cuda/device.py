"""What the running GPU allows a kernel, so that no tiling is chosen past it.

A launch past the shared memory a block may have fails at run time, and a
``__launch_bounds__`` that asks for more resident threads than an SM holds
does not fit at all; both differ by architecture (an RTX 4090 or a GB10
allows 99 KB per block where an H100 allows 227 KB). `device_limits` asks
the CUDA driver of the running GPU (``cuDeviceGetAttribute`` through
ctypes: MLX has loaded and initialized it); where it cannot be asked, the
table below stands in.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
from dataclasses import dataclass
from functools import cache

import mlx.core as mx

from .jit import arch_number

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """A GPU's limits for one block of a kernel."""

    shared_per_block: int
    """Bytes of shared memory a block may have, with the opt-in above 48 KB."""
    threads_per_sm: int
    """Threads resident on one SM (a launch bound's blocks x threads must fit)."""
    warpgroup_mma: bool = False
    """Whether it has wgmma (sm_90 alone: sm_100 has other tensor-core instructions)."""


KB = 1024

ARCH_LIMITS: dict[int, Limits] = {
    80: Limits(163 * KB, 2048),  # A100
    86: Limits(99 * KB, 1536),  # RTX 30, A10, A40
    87: Limits(163 * KB, 1536),  # Jetson Orin
    89: Limits(99 * KB, 1536),  # RTX 40, L4, L40S
    90: Limits(227 * KB, 2048, warpgroup_mma=True),  # H100, H200, GH200
    100: Limits(227 * KB, 2048),  # B200, GB200
    103: Limits(227 * KB, 2048),  # B300
    110: Limits(227 * KB, 1536),  # Jetson Thor
    120: Limits(99 * KB, 1536),  # RTX 50, RTX PRO 6000 Blackwell
    121: Limits(99 * KB, 1536),  # DGX Spark (GB10)
}
"""Per compute capability: the opt-in shared memory per block (the SM's
shared memory less the 1 KB reserved per block) and the resident threads per
SM, as the CUDA C++ Programming Guide's "Technical Specifications per
Compute Capability" gives them and CCCL encodes them
(libcudacxx/include/cuda/__device/arch_traits.h)."""

SMALLEST = Limits(
    min(limits.shared_per_block for limits in ARCH_LIMITS.values()),
    min(limits.threads_per_sm for limits in ARCH_LIMITS.values()),
    all(limits.warpgroup_mma for limits in ARCH_LIMITS.values()),
)
"""What every architecture above allows: the limits of an unknown GPU."""

_SHARED_PER_BLOCK_OPTIN = 97  # CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
_THREADS_PER_SM = 39  # CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR


def limits_of(arch: str) -> Limits:
    """The table's limits of an architecture ('sm_89', 'sm_90a'), else `SMALLEST`."""
    return ARCH_LIMITS.get(arch_number(arch), SMALLEST)


def device_limits(arch: str) -> Limits:
    """The running GPU's limits, from its driver; those of its architecture
    (``arch``, as `jit.device_arch` says) where the driver cannot be asked."""
    ordinal = getattr(mx.default_device(), "index", 0)  # not exposed by every MLX
    driver = _driver_limits(ordinal)
    if driver is None:
        return limits_of(arch)
    return dataclasses.replace(driver, warpgroup_mma=limits_of(arch).warpgroup_mma)


@cache
def _driver_limits(ordinal: int) -> Limits | None:
    try:
        return _ask_driver(ordinal)
    except Exception as error:  # noqa: BLE001 - the table is the fallback by design
        logger.debug("GPU limits from the table, not the driver (%s)", error)
        return None


def _ask_driver(ordinal: int) -> Limits:
    driver = ctypes.CDLL("libcuda.so.1")

    def check(result: int, what: str) -> None:
        if result != 0:
            raise OSError(f"{what} returned CUresult {result}")

    check(driver.cuInit(0), "cuInit")
    device = ctypes.c_int()
    check(driver.cuDeviceGet(ctypes.byref(device), ordinal), "cuDeviceGet")

    def attribute(number: int) -> int:
        value = ctypes.c_int()
        check(driver.cuDeviceGetAttribute(ctypes.byref(value), number, device), "attribute")
        return value.value

    return Limits(attribute(_SHARED_PER_BLOCK_OPTIN), attribute(_THREADS_PER_SM))
