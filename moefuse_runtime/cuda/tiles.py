"""Tuning choices as data: tile tables per device (tiles.json).

A table holds, for one kind of GPU, the decode kernels' settings (their
pair range and tilings) and the tensor-core tilings by rows per expert
(pairs / experts hit) and weight format, for gate_up and for down: each
kind's list is read in order, and the first entry whose ``modes``,
``bits`` and ``group_sizes`` (if given) and ``max_rows_per_expert`` (null:
any) hold, and whose tiling fits the GPU (`Tiling.why_not`), is used. Modes
and group sizes matter where bits do not tell enough: a tiling whose
registers suffice for affine 4-bit codes can spill for nvfp4's at the same
bits, or for affine's at group size 32 (twice the scales of 64 per k-tile).

The table of a GPU (`table_for`): ``MOEFUSE_TILES=path.json`` if set (a
table ``moefuse tune`` wrote, or one of the same form); else the shipped
table whose ``devices`` name-prefixes match the GPU's name; else the one
whose ``archs`` hold its architecture; else the ``default`` table, whose
tilings fit every supported architecture, with a one-line warning that the
GPU has no measured table.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from ..config import TILES_ENV
from . import source
from .device import Limits
from .formats import FORMATS, WeightFormat

logger = logging.getLogger(__name__)

GEMM_BK = 64
"""k values per pipeline stage (grouped_gemm.cuh: GEMM_BK)."""


@dataclass(frozen=True)
class Tiling:
    """One tensor-core block's work: BM x BN outputs, warps as WARPS_M x
    WARPS_N, a STAGES-deep copy pipeline, at least MIN_BLOCKS blocks per SM
    (a register cap the compiler honours through __launch_bounds__), and
    where packed weights are dequantized: a shared tile per block, or with
    B_REGS each warp's mma fragments (grouped_gemm.cuh). With WGMMA, the
    Hopper kernel (grouped_wgmma.cuh): ``warps_n`` warps in warpgroups of 4
    (``warps_m`` 1), each warp 16 or 32 of the BN weight rows, dequantized
    into the wgmma fragments; BM a multiple of 64 up to 256."""

    bm: int
    bn: int
    warps_m: int
    warps_n: int
    stages: int
    min_blocks: int = 1
    b_regs: bool = False
    wgmma: bool = False
    overlap: bool = False
    """WGMMA only: a k-tile's wgmmas run on while the next k-tile starts
    (its copies one stage less ahead)."""
    producer: bool = False
    """WGMMA only: one more warpgroup does every copy, handing stages to
    the others through mbarriers instead of a block barrier per k-tile, and
    its registers to them (one block per SM)."""

    @property
    def threads(self) -> int:
        return 32 * (self.warps_m * self.warps_n + 4 * self.producer)

    def shared_bytes(self, bits: int) -> int:
        """A stages, packed B stages and (without B_REGS) two dequantized B
        tiles, in 16-byte chunks; WGMMA: 1,024 bytes more, to align the
        stages on wgmma's swizzle atoms, and with PRODUCER two 8-byte
        mbarriers per stage."""
        chunks = self.stages * (self.bm * 8 + self.bn * GEMM_BK * bits // 128)
        if self.wgmma:
            return 16 * chunks + WGMMA_ALIGN + (16 * self.stages if self.producer else 0)
        return 16 * (chunks + (0 if self.b_regs else 2 * self.bn * 8))

    def why_not(self, gate_up: bool, bits: int, limits: Limits) -> str | None:
        """Why this tiling cannot run here (the kernel's static checks, the
        GPU's limits), or None."""
        reason = self._why_not_wgmma(bits, limits) if self.wgmma else self._why_not_warps(gate_up)
        if reason:
            return reason
        if self.shared_bytes(bits) > limits.shared_per_block:
            return (
                f"{self} needs {self.shared_bytes(bits)} bytes of shared memory, "
                f"{limits.shared_per_block} per block here"
            )
        if self.threads * self.min_blocks > limits.threads_per_sm:
            return f"{self} asks for more threads per SM than {limits.threads_per_sm}"
        return None

    def _why_not_warps(self, gate_up: bool) -> str | None:
        wm, wn = self.bm // self.warps_m, self.bn // self.warps_n
        if wm % 16 or wn % (32 if gate_up else 16) or self.stages < 3:
            return f"{self} does not split into warp tiles"
        if self.overlap or self.producer:
            return f"{self}: only the wgmma kernel overlaps k-tiles or has a copying warp"
        return None

    def _why_not_wgmma(self, bits: int, limits: Limits) -> str | None:
        if not limits.warpgroup_mma:
            return f"{self} needs wgmma (sm_90)"
        if bits not in (4, 8):
            return f"{self} reads 4- and 8-bit codes only"
        rows_per_warp = self.bn / (self.warps_n * self.warps_m)
        warpgroups = self.warps_m == 1 and self.warps_n % 4 == 0 and rows_per_warp in (16, 32)
        if self.bm % 64 or self.bm > 256 or not warpgroups:
            return f"{self} does not split into warpgroups"
        if self.producer and self.min_blocks != 1:
            return f"{self}: a copying warpgroup lends its registers within one block per SM"
        if self.stages < (4 if self.overlap else 3):
            return f"{self} needs {4 if self.overlap else 3} stages or more"
        return None


WGMMA_ALIGN = 1024
"""Bytes of shared memory a wgmma tiling adds to align its stages (grouped_wgmma.cuh)."""


@dataclass(frozen=True)
class Entry:
    """One line of a kind's list: when it applies, and its tiling."""

    max_rows_per_expert: float | None
    tiling: Tiling
    bits: tuple[int, ...] | None = None
    modes: tuple[str, ...] | None = None
    group_sizes: tuple[int, ...] | None = None

    def holds(self, rows_per_expert: float, weights: WeightFormat) -> bool:
        """Whether this entry applies to these weights at this many rows per
        expert. An entry that names group sizes never holds for weights whose
        group size is not given (None)."""
        limit = self.max_rows_per_expert
        bits_hold = self.bits is None or weights.bits in self.bits
        mode_holds = self.modes is None or weights.mode in self.modes
        group_holds = self.group_sizes is None or weights.group_size in self.group_sizes
        rows_hold = limit is None or rows_per_expert <= limit
        return bits_hold and mode_holds and group_holds and rows_hold

    @property
    def conditional(self) -> bool:
        """Whether it holds for some formats only."""
        return bool(self.bits or self.modes or self.group_sizes)

    def json(self) -> dict[str, Any]:
        """This entry in tiles.json's form (`parse` reads it back)."""
        return {
            **({"modes": list(self.modes)} if self.modes else {}),
            **({"bits": list(self.bits)} if self.bits else {}),
            **({"group_sizes": list(self.group_sizes)} if self.group_sizes else {}),
            "max_rows_per_expert": self.max_rows_per_expert,
            "tiling": dataclasses.asdict(self.tiling),
        }


@dataclass(frozen=True)
class Decode:
    """The decode kernels' settings: tilings as (outputs per warp, warps per
    block), and their pair range: ``pairs_per_expert`` times the experts
    (``pairs_per_expert_alone`` where the tensor cores are missing), within
    ``min_pairs`` and ``max_pairs``. A down row of at most
    ``short_row_max_loads`` 16-byte loads takes ``short_row_tiling``."""

    gate_up_tiling: tuple[int, int] = (1, 8)
    down_tiling: tuple[int, int] = (1, 8)
    short_row_tiling: tuple[int, int] = (4, 8)
    short_row_max_loads: int = 32
    pairs_per_expert: float = 0.5
    pairs_per_expert_alone: float = 1.0
    min_pairs: int = 32
    max_pairs: int = 128

    def max_pairs_for(self, experts: int, tensor_cores: bool) -> int:
        """The most (token, expert) pairs the decode kernels take: a GEMV reads
        an expert once per pair, a grouped GEMM once per tile of its rows, so
        the pairs per expert decide where one path overtakes the other."""
        per_expert = self.pairs_per_expert if tensor_cores else self.pairs_per_expert_alone
        return max(self.min_pairs, min(self.max_pairs, int(experts * per_expert)))


@dataclass(frozen=True)
class TileTable:
    name: str
    decode: Decode
    gate_up: tuple[Entry, ...]
    down: tuple[Entry, ...]
    devices: tuple[str, ...] = ()
    archs: tuple[str, ...] = ()

    def tiling(
        self, rows_per_expert: float, gate_up: bool, weights: WeightFormat, limits: Limits
    ) -> Tiling | None:
        """The first entry's tiling that holds and fits, or None."""
        for entry in self.gate_up if gate_up else self.down:
            if entry.holds(rows_per_expert, weights) and not entry.tiling.why_not(
                gate_up, weights.bits, limits
            ):
                return entry.tiling
        return None

    def limits_of_rows(self) -> tuple[float, ...]:
        """Where the table's choice can change (rows per expert, from one up:
        a call has at least one row per expert hit)."""
        found = {e.max_rows_per_expert for e in (*self.gate_up, *self.down)}
        return tuple(sorted(t for t in found if t is not None and t >= 1))


def parse(name: str, data: dict[str, Any]) -> TileTable:
    """A table from its JSON form; ValueError naming what is wrong."""
    try:
        settings: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in data.get("decode", {}).items()
        }
        decode = Decode(**settings)
        kinds = {
            kind: tuple(
                Entry(
                    e["max_rows_per_expert"],
                    Tiling(**e["tiling"]),
                    tuple(e["bits"]) if "bits" in e else None,
                    tuple(e["modes"]) if "modes" in e else None,
                    tuple(e["group_sizes"]) if "group_sizes" in e else None,
                )
                for e in data[kind]
            )
            for kind in ("gate_up", "down")
        }
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"tile table {name}: {type(error).__name__}: {error}") from None
    for kind, entries in kinds.items():
        unknown = {m for e in entries for m in e.modes or ()} - set(FORMATS)
        if unknown:
            raise ValueError(f"tile table {name}: {kind}: unknown modes {sorted(unknown)}")
        last = entries[-1] if entries else None
        if last is None or last.max_rows_per_expert is not None or last.conditional:
            raise ValueError(
                f"tile table {name}: {kind} needs a last entry for any rows, bits, modes "
                "and group sizes"
            )
    return TileTable(
        name,
        decode,
        kinds["gate_up"],
        kinds["down"],
        tuple(data.get("devices", ())),
        tuple(data.get("archs", ())),
    )


@cache
def shipped() -> tuple[dict[str, TileTable], str]:
    """The tables of tiles.json, by name, and the default's name."""
    data = json.loads(source.read("tiles.json"))
    tables = {name: parse(name, table) for name, table in data["tables"].items()}
    return tables, data["default"]


@cache
def user_table(path: str) -> TileTable:
    """A table of the user's (``MOEFUSE_TILES``); ValueError naming the file."""
    try:
        data = json.loads(Path(path).expanduser().read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{TILES_ENV}={path!r}: {error}") from None
    return parse(f"{TILES_ENV}={path}", data)


def table_named(name: str) -> TileTable:
    """A table by the name `table_for` gave it (a kernel path keeps the name)."""
    if name.startswith(f"{TILES_ENV}="):
        return user_table(name.removeprefix(f"{TILES_ENV}="))
    tables, default = shipped()
    return tables.get(name, tables[default])


def table_for(device_name: str, arch: str) -> TileTable:
    """The table of this GPU (see the top of this module)."""
    own = os.environ.get(TILES_ENV, "").strip()
    if own:
        return user_table(own)
    tables, default = shipped()
    for table in tables.values():
        if any(device_name.startswith(prefix) for prefix in table.devices):
            return table
    bare = arch.rstrip("a")
    for table in tables.values():
        if bare in table.archs:
            return table
    _warn_unmeasured(device_name or "this GPU", arch, default)
    return tables[default]


@cache
def _warn_unmeasured(device_name: str, arch: str, default: str) -> None:
    logger.warning(
        "moefuse_runtime: no measured tile table for %s (%s); using %r, which fits every "
        "supported GPU: `moefuse tune` measures one (%s=path to use it)",
        device_name,
        arch or "unknown architecture",
        default,
        TILES_ENV,
    )
