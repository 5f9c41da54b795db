"""``moefuse tune``: measure the tensor-core tilings on this GPU, write a tile table.

For one MoE layer shape (a model's first SwitchGLU, or a preset), at each
token count: every candidate tiling of the gate_up kernel and of the down
kernel that fits this GPU (`Tiling.why_not` with its limits) and suits the
count's rows per expert is timed on its own (pairs routed once, outside the
timing; calls launched back to back, so that GPU time is what is timed),
and the fastest kept. Counts whose fastest tiling is the same become one
entry, up to the last such count's rows per expert; the last entry takes
any count; below the fewest rows timed, the table this GPU uses now keeps
its choices. The entries hold for the shape's weight format (mode, bits);
other formats keep that table's.

The decode settings (`measure_decode`): each decode tiling of gate_up and
of down timed at a decode step's sizes, the fastest kept; and the layer
timed on the decode kernels and on the tensor cores at 1-32 tokens, the
decode range ending where the tensor cores first win (`boundary`). With
``--no-decode``, the decode settings are those of the table this GPU uses.

The result is a table in tiles.json's form (`tiles.parse`): point
``MOEFUSE_TILES`` at it, or contribute it to tiles.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import jit
from .device import Limits
from .formats import WeightFormat
from .tiles import Decode, Entry, TileTable, Tiling

TOKENS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

CANDIDATES = tuple(
    Tiling(bm, bn, wm, wn, stages, min_blocks, b_regs=True)
    for bm, bn, wm, wn, stages, min_blocks in (
        (16, 64, 1, 2, 6, 8),
        (16, 128, 1, 4, 4, 3),
        (16, 128, 1, 4, 4, 4),
        (16, 128, 1, 4, 4, 5),
        (16, 128, 1, 4, 8, 4),
        (16, 256, 1, 8, 4, 2),
        (32, 128, 1, 4, 4, 2),
        (32, 128, 1, 4, 4, 4),
        (32, 128, 1, 4, 6, 4),
        (64, 128, 1, 4, 4, 1),
        (64, 128, 2, 4, 4, 1),
        (64, 128, 2, 4, 4, 2),
        (64, 256, 2, 4, 3, 1),
        (128, 128, 2, 4, 3, 1),
        (128, 128, 4, 2, 4, 1),
    )
)
"""Tilings tried, dequantizing in the mma fragments (the shared-tile
variants of these shapes lost at every size measured); the register-capped
ones (``min_blocks`` > 1) spill a little for some formats below sm_100
(scripts/check_kernel_source.py --candidates), which only their timing
judges. Each count tries those whose BM suits its rows per expert
(`suits`), with `WIDE` and `WGMMA`."""


WIDE = tuple(Tiling(128, 256, 2, 4, stages) for stages in (3, 4))
"""The bf16 peers' prefill shape (BM 128 x BN 256, 8 warps of 64 x 64),
dequantizing into a shared tile: its register variant spills at every
width, this one at most 16 bytes up to 6 bits and more at 8
(scripts/check_kernel_source.py --candidates), so it is tried up to
`WIDE_MAX_BITS`. 136-176 KiB of shared memory: sm_80 (not every variant),
sm_90 and sm_100."""
WIDE_MAX_BITS = 6

WGMMA = tuple(
    Tiling(bm, bn, 1, warps, stages, min_blocks, wgmma=True)
    for bm, bn, warps, stages, min_blocks in (
        (64, 128, 8, 4, 1),
        (128, 128, 8, 4, 1),
        (128, 128, 8, 3, 2),
        (256, 128, 8, 3, 1),
        (256, 128, 8, 4, 1),
        (64, 256, 8, 4, 1),
        (128, 256, 8, 4, 1),
        (128, 256, 16, 3, 1),
    )
) + tuple(
    Tiling(bm, bn, 1, 8, stages, wgmma=True, overlap=overlap, producer=True)
    for bm, bn, stages, overlap in (
        (64, 128, 4, False),
        (64, 128, 4, True),
        (128, 128, 4, False),
        (128, 128, 4, True),
        (256, 128, 3, False),
        (256, 128, 4, False),
        (64, 256, 4, False),
        (128, 256, 4, False),
    )
)
"""The Hopper kernel's tilings (grouped_wgmma.cuh), tried on sm_90 for 4-
and 8-bit weights (`Tiling.why_not`): BM x rows, BN weight rows over 2 or
4 warpgroups (16 or 32 rows per warp). BN 256 halves the x rows each
weight row's products re-read against BN 128, which the L2 bandwidth needs
at prefill sizes. The kernel issues its dequantization next to few warps
(docs/benchmarks.md: Nsight Compute), so one candidate caps its registers
at 128 for two blocks of 8 warps per SM (no more than 16 bytes spilled at
affine 4-bit g64 and g128; three blocks of BM 64 would cap them at 80 and
spill 100-500 bytes in every format). The 2-warpgroup shapes of one block
per SM are also tried with a copying warpgroup (``producer``), which frees
the others of the copies and of the block barrier per k-tile and lends
them its registers; ``overlap`` only with it and 16 weight rows per warp
(BM 64 and 128 x BN 128): without that warpgroup it was slower at every
size measured, and with 32 rows per warp or BM 256 the previous k-tile's
fragments it keeps live spill in most formats
(scripts/check_kernel_source.py --candidates)."""


def tried(tiling: Tiling, bits: int) -> bool:
    """Whether ``tune`` times this tiling for weights of ``bits``."""
    return tiling not in WIDE or bits <= WIDE_MAX_BITS


def suits(bm: int, rows_per_expert: float) -> bool:
    """A BM worth trying at this density: neither mostly empty tiles nor
    many tiles per expert where a larger BM would do."""
    return min(64, rows_per_expert / 4) <= bm <= max(16, 4 * rows_per_expert)


@dataclass(frozen=True)
class Shape:
    """One MoE layer: dimensions, experts per token, weight format."""

    name: str
    hidden: int
    experts: int
    top_k: int
    width: int
    bits: int = 4
    group_size: int = 64
    mode: str = "affine"


Timer = Callable[[Shape, int, bool, Tiling], float]
"""(shape, tokens, gate_up, tiling) -> seconds of one call of that kernel."""


@dataclass
class Point:
    """One kernel at one token count: each candidate's TFLOP/s, or why not."""

    tokens: int
    rows_per_expert: float
    gate_up: bool
    results: dict[Tiling, float | str]

    def best(self) -> Tiling | None:
        timed = {t: r for t, r in self.results.items() if isinstance(r, float)}
        return max(timed, key=lambda t: timed[t]) if timed else None


def candidates_for(
    rows_per_expert: float, gate_up: bool, bits: int, limits: Limits
) -> list[Tiling]:
    """The candidates this count tries: fit here, suit its rows per expert."""
    return [
        tiling
        for tiling in CANDIDATES + WIDE + WGMMA
        if tried(tiling, bits)
        and tiling.why_not(gate_up, bits, limits) is None
        and suits(tiling.bm, rows_per_expert)
    ]


def flops(shape: Shape, tokens: int, gate_up: bool) -> int:
    pairs = tokens * shape.top_k
    return 2 * pairs * shape.hidden * shape.width * (2 if gate_up else 1)


CANDIDATE_SECONDS = 300.0
"""The longest one measurement (a candidate's compile and timing, a few
seconds) may take before `Watchdog` takes its kernel for one that never
finishes."""


class Watchdog:
    """Ends the process, exit status 3, when one measurement runs longer
    than ``seconds``: a kernel that never finishes (a tiling on a GPU no
    table was measured on) cannot be interrupted from Python, and tune would
    wait forever. ``on_expiry(what, so_far)`` runs first: the CLI writes what
    was measured, ``so_far`` (the list of `Point` or the `DecodePoints` until
    then)."""

    def __init__(self, seconds: float, on_expiry: Callable[[str, Any], None]) -> None:
        self.seconds, self.on_expiry = seconds, on_expiry

    @contextlib.contextmanager
    def watching(self, what: str, so_far: Callable[[], Any]) -> Iterator[None]:
        timer = threading.Timer(self.seconds, self._expire, (what, so_far))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def _expire(self, what: str, so_far: Callable[[], Any]) -> None:
        try:
            self.on_expiry(what, so_far())
        finally:
            os._exit(3)


def _watching(watchdog: Watchdog | None, what: str, so_far: Callable[[], Any]):
    return watchdog.watching(what, so_far) if watchdog else contextlib.nullcontext()


Plan = list[tuple[int, float, bool, Tiling]]
"""(tokens, rows per expert, gate_up, tiling) of each measurement, in order."""


def plan(shape: Shape, tokens: Iterable[int], limits: Limits) -> Plan:
    """Every candidate at every count, for gate_up and for down."""
    planned: Plan = []
    for count in tokens:
        rows = count * shape.top_k / shape.experts
        for gate_up in (True, False):
            planned += [
                (count, rows, gate_up, t) for t in candidates_for(rows, gate_up, shape.bits, limits)
            ]
    return planned


def measure(
    shape: Shape,
    tokens: Iterable[int],
    limits: Limits,
    timer: Timer,
    progress: Callable[[Iterable[Any], int], Iterable[Any]] = lambda items, total: items,
    watchdog: Watchdog | None = None,
) -> list[Point]:
    """Every candidate at every count, for gate_up and for down (`plan`)."""
    planned = plan(shape, tokens, limits)
    points: dict[tuple[int, bool], Point] = {}
    for count, rows, gate_up, tiling in progress(planned, len(planned)):
        point = points.setdefault((count, gate_up), Point(count, rows, gate_up, {}))
        what = f"{count} tokens, {'gate_up' if gate_up else 'down'}, {tiling}"
        try:
            with _watching(watchdog, what, lambda: list(points.values())):
                seconds = timer(shape, count, gate_up, tiling)
            point.results[tiling] = flops(shape, count, gate_up) / seconds / 1e12
        except Exception as error:  # noqa: BLE001 - a failing candidate is recorded
            point.results[tiling] = f"failed: {type(error).__name__}: {error}"[:300]
    return list(points.values())


DECODE_TILINGS = ((1, 4), (1, 8), (2, 4), (2, 8), (4, 4), (4, 8))
"""The decode kernels' tilings tried: (outputs per warp, warps per block)."""
DECODE_TOKENS = (1, 4)
"""Token counts the decode tilings are timed at (a decode step's sizes)."""
BOUNDARY_TOKENS = (1, 2, 4, 8, 16, 32)
"""Token counts the whole layer is timed at on each path, for the boundary
between the decode kernels and the tensor cores (`boundary`)."""
PATHS = ("decode", "tensor_cores")

DecodeTimer = Callable[[Shape, int, bool, tuple[int, int]], float]
"""(shape, tokens, gate_up, tiling) -> seconds of one decode kernel call."""
PathTimer = Callable[[Shape, int, str], float]
"""(shape, tokens, path in `PATHS`) -> seconds of one call of the layer on it."""


@dataclass
class DecodePoints:
    """The decode kernels' timings: ``tilings[(tokens, gate_up)][tiling]``
    and ``paths[tokens][path]``, seconds, or why a candidate failed."""

    tilings: dict[tuple[int, bool], dict[tuple[int, int], float | str]]
    paths: dict[int, dict[str, float | str]]


def measure_decode(
    shape: Shape,
    tiling_timer: DecodeTimer,
    path_timer: PathTimer,
    progress: Callable[[Iterable[Any], int], Iterable[Any]] = lambda items, total: items,
    watchdog: Watchdog | None = None,
) -> DecodePoints:
    """Every decode tiling at `DECODE_TOKENS`, and the layer on each path at
    `BOUNDARY_TOKENS`."""
    steps: list[tuple] = [
        ("tiling", count, gate_up, t)
        for count in DECODE_TOKENS
        for gate_up in (True, False)
        for t in DECODE_TILINGS
    ]
    steps += [("path", count, path, None) for count in BOUNDARY_TOKENS for path in PATHS]
    points = DecodePoints({}, {})
    for what, count, which, tiling in progress(steps, len(steps)):
        label = f"{count} tokens, decode {what} {tiling or which}"
        try:
            with _watching(watchdog, label, lambda: points):
                if what == "tiling":
                    seconds: float | str = tiling_timer(shape, count, which, tiling)
                else:
                    seconds = path_timer(shape, count, which)
        except Exception as error:  # noqa: BLE001 - a failing candidate is recorded
            seconds = f"failed: {type(error).__name__}: {error}"[:300]
        if what == "tiling":
            points.tilings.setdefault((count, which), {})[tiling] = seconds
        else:
            points.paths.setdefault(count, {})[which] = seconds
    return points


def fastest_decode_tiling(points: DecodePoints, gate_up: bool) -> tuple[int, int] | None:
    """The tiling with the least time summed over the counts (one that failed
    at any count is out), or None."""
    totals: dict[tuple[int, int], float] = {}
    for (_, kind), results in points.tilings.items():
        if kind != gate_up:
            continue
        for tiling, seconds in results.items():
            if isinstance(seconds, float) and totals.get(tiling, 0.0) != float("inf"):
                totals[tiling] = totals.get(tiling, 0.0) + seconds
            else:
                totals[tiling] = float("inf")
    finite = {t: v for t, v in totals.items() if v != float("inf")}
    return min(finite, key=lambda t: finite[t]) if finite else None


def boundary(points: DecodePoints, shape: Shape) -> float | None:
    """Pairs per expert up to which the decode kernels beat the tensor cores:
    the largest of the counts from the fewest up whose decode path was
    faster, stopping at the first that was not; None if neither path ran
    at the fewest count."""
    per_expert = None
    for count in sorted(points.paths):
        times = points.paths[count]
        decode, tensor = times.get("decode"), times.get("tensor_cores")
        if not isinstance(decode, float) or not isinstance(tensor, float):
            break
        if decode >= tensor:
            return per_expert if per_expert is not None else 0.0
        per_expert = count * shape.top_k / shape.experts
    return per_expert


def decode_settings(base: Decode, points: DecodePoints, shape: Shape) -> Decode:
    """``base`` with the measured choices: gate_up's tiling; down's, as its
    ``short_row_tiling`` when this shape's down rows are short (`short_rows`)
    or else its ``down_tiling``; and the decode range's pairs per expert
    (with ``max_pairs`` raised to cover it for this shape)."""
    settings = base
    gate_up = fastest_decode_tiling(points, True)
    if gate_up is not None:
        settings = dataclasses.replace(settings, gate_up_tiling=gate_up)
    down = fastest_decode_tiling(points, False)
    if down is not None and short_rows(shape, base):
        settings = dataclasses.replace(settings, short_row_tiling=down)
    elif down is not None:
        settings = dataclasses.replace(settings, down_tiling=down)
    per_expert = boundary(points, shape)
    if per_expert is not None:
        pairs = int(shape.experts * per_expert)
        settings = dataclasses.replace(
            settings, pairs_per_expert=per_expert, max_pairs=max(base.max_pairs, pairs)
        )
    return settings


def short_rows(shape: Shape, settings: Decode) -> bool:
    """Whether this shape's down rows take the decode kernels' short-row
    tiling (decode.down_tiling_for: at most ``short_row_max_loads`` 16-byte
    loads of packed codes)."""
    return shape.width * shape.bits // 128 <= settings.short_row_max_loads


def entries(points: list[Point], gate_up: bool, weights: WeightFormat) -> list[Entry]:
    """The table's entries for one kernel: runs of counts with the same best
    tiling, each up to its last count's rows per expert; the last for any."""
    ordered = sorted((p for p in points if p.gate_up == gate_up), key=lambda p: p.rows_per_expert)
    runs: list[tuple[float, Tiling]] = []
    for point in ordered:
        best = point.best()
        if best is None:
            continue
        if runs and runs[-1][1] == best:
            runs[-1] = (point.rows_per_expert, best)
        else:
            runs.append((point.rows_per_expert, best))
    if not runs:
        raise RuntimeError(f"no tiling of {'gate_up' if gate_up else 'down'} ran on this GPU")
    return [
        Entry(
            None if i == len(runs) - 1 else limit,
            tiling,
            bits=(weights.bits,),
            modes=(weights.mode,),
            group_sizes=measured_group(weights),
        )
        for i, (limit, tiling) in enumerate(runs)
    ]


def below(base: tuple[Entry, ...], weights: WeightFormat, rows: float) -> list[Entry]:
    """``base``'s entries for these weights that end below ``rows`` (the
    fewest rows measured), kept in front of the measured ones: a table tuned
    at prefill sizes leaves the smaller calls to the choices it had."""
    kept = []
    for entry in base:
        limit = entry.max_rows_per_expert
        if not entry.holds(0, weights):
            continue  # another format's
        if limit is None or limit >= rows:
            break
        kept.append(
            dataclasses.replace(
                entry,
                bits=(weights.bits,),
                modes=(weights.mode,),
                group_sizes=measured_group(weights),
            )
        )
    return kept


def measured_group(weights: WeightFormat) -> tuple[int, ...] | None:
    """The group sizes a measured entry holds for: the one measured (a tiling
    fast at group size 64 can spill at 32), or any when none is given."""
    return None if weights.group_size is None else (weights.group_size,)


def table(
    shape: Shape,
    points: list[Point],
    device: str,
    arch: str,
    base: TileTable,
    decode_points: DecodePoints | None = None,
) -> dict[str, Any]:
    """The tile table, as JSON: ``base``'s entries for this shape's format
    below the fewest rows measured, the measured entries for the format,
    then ``base``'s for every other format (its last entry of each kind
    holds any), and the decode settings: ``base``'s, with the measured
    choices where ``decode_points`` are given (`decode_settings`)."""
    weights = WeightFormat(shape.mode, shape.bits, shape.group_size)
    fewest = min(p.rows_per_expert for p in points)

    def kind(gate_up: bool, base_entries: tuple[Entry, ...]) -> list[dict[str, Any]]:
        measured = below(base_entries, weights, fewest) + entries(points, gate_up, weights)
        return [e.json() for e in measured + list(base_entries)]

    chosen = (
        base.decode if decode_points is None else decode_settings(base.decode, decode_points, shape)
    )
    decode = dataclasses.asdict(chosen)
    return {
        "measured_on": f"{device} ({arch}), MLX {getattr(mx, '__version__', '?')}: {shape}",
        "devices": [device],
        "archs": [arch.rstrip("a")],
        "decode": {k: list(v) if isinstance(v, tuple) else v for k, v in decode.items()},
        "gate_up": kind(True, base.gate_up),
        "down": kind(False, base.down),
        "timings": timings(points),
        **({"decode_timings": decode_timings(decode_points)} if decode_points else {}),
    }


def timings(points: list[Point]) -> list[dict[str, Any]]:
    """Every timing, kept in the table's file for the record."""
    return [
        {
            "tokens": p.tokens,
            "rows_per_expert": p.rows_per_expert,
            "kernel": "gate_up" if p.gate_up else "down",
            "tflops": {str(t): r for t, r in p.results.items()},
            "best": str(p.best()),
        }
        for p in points
    ]


def decode_timings(points: DecodePoints) -> dict[str, Any]:
    """The decode timings, in microseconds, kept in the table's file."""

    def us(value: float | str) -> float | str:
        return 1e6 * value if isinstance(value, float) else value

    return {
        "tilings": [
            {
                "tokens": count,
                "kernel": "gate_up" if gate_up else "down",
                "us": {f"{o}x{w}": us(v) for (o, w), v in results.items()},
            }
            for (count, gate_up), results in points.tilings.items()
        ],
        "paths": [
            {"tokens": count, "us": {path: us(v) for path, v in times.items()}}
            for count, times in points.paths.items()
        ],
    }


# -- on the GPU ----------------------------------------------------------------


def shape_of_model(path: Path) -> Shape:
    """The first SwitchGLU of a model directory (loaded lazily: no weights read)."""
    from mlx_lm.utils import load_model

    from ..walk import find_switch_glus
    from . import top_k_of

    model, _ = load_model(path, lazy=True, strict=False)
    found = next(find_switch_glus(model), None)
    top_k = top_k_of(model)
    if found is None or top_k is None:
        raise ValueError(f"{path}: no SwitchGLU layer (with its experts per token) to tune for")
    gate, down = found[1]["gate_proj"], found[1]["down_proj"]
    if getattr(gate, "bits", None) is None:
        raise ValueError(f"{path}: its experts are not quantized; the kernels read quantized ones")
    experts, width, _ = gate["weight"].shape
    hidden = down["weight"].shape[1]
    return Shape(path.name, hidden, experts, top_k, width, gate.bits, gate.group_size, gate.mode)


class GpuTimer:
    """Times on this GPU one call of a tensor-core kernel (a `Timer`), of a
    decode kernel (`decode`) or of the installed layer on one path
    (`path`): a layer per shape made once, pairs routed once per count."""

    ROUNDS, BATCH = 5, 10

    def __init__(self) -> None:
        self._layers: dict[Shape, Any] = {}

    def prepare(self, shape: Shape, planned: Plan, decode: bool) -> jit.BuildReport:
        """Compile every kernel variant the timings will launch, in parallel
        worker processes (install's mechanism), before the first is timed:
        one by one at their first launches, their compiles took most of a
        tune run. ``decode``: the decode tilings' variants too."""
        from .activations import SWIGLU, KernelActivation
        from .decode import gemv_spec
        from .formats import QuantizedArrays
        from .grouped import gemm_spec, route_spec

        swiglu = KernelActivation(SWIGLU)
        specs, bms = [], set()
        for gate_up in (True, False):
            proj = QuantizedArrays.of(self._projection(shape, gate_up))
            k, activation = (shape.hidden, swiglu) if gate_up else (shape.width, None)
            top_k = shape.top_k if gate_up else 1
            for tiling in dict.fromkeys(t for *_, g, t in planned if g == gate_up):
                specs.append(gemm_spec(proj, mx.bfloat16, k, activation, top_k, tiling))
                bms.add(tiling.bm)
            if decode:
                for outs in dict.fromkeys(outs for outs, _ in DECODE_TILINGS):
                    specs.append(gemv_spec(proj, mx.bfloat16, k, activation, top_k, outs))
        specs += [route_spec(shape.experts, (bm, bm)) for bm in sorted(bms)]
        return jit.prepare_all(specs, jit.kernel_arch())

    def __call__(self, shape: Shape, tokens: int, gate_up: bool, tiling: Tiling) -> float:
        from .activations import SWIGLU, KernelActivation
        from .formats import QuantizedArrays
        from .grouped import grouped_gemm, route

        proj = self._projection(shape, gate_up)
        pairs = tokens * shape.top_k
        rows = tokens if gate_up else pairs
        x = mx.random.normal((rows, shape.hidden if gate_up else shape.width)).astype(mx.bfloat16)
        flat = mx.random.randint(0, shape.experts, (pairs,)).astype(mx.uint32)
        order, tiles, _ = route(flat, shape.experts, (tiling.bm, tiling.bm))
        mx.eval(x, order, tiles)
        arrays = QuantizedArrays.of(proj)
        activation = KernelActivation(SWIGLU) if gate_up else None
        top_k = shape.top_k if gate_up else 1

        return self._seconds(
            lambda: grouped_gemm(
                x, arrays, order, tiles, activation=activation, top_k=top_k, tiling=tiling
            )
        )

    def decode(self, shape: Shape, tokens: int, gate_up: bool, tiling: tuple[int, int]) -> float:
        """A `DecodeTimer`: one decode kernel (`gather_qmv`) call."""
        from .activations import SWIGLU, KernelActivation
        from .decode import gather_qmv
        from .formats import QuantizedArrays

        pairs = tokens * shape.top_k
        rows, k = (tokens, shape.hidden) if gate_up else (pairs, shape.width)
        x = mx.random.normal((rows, k)).astype(mx.bfloat16)
        indices = mx.random.randint(0, shape.experts, (pairs,)).astype(mx.uint32)
        mx.eval(x, indices)
        arrays = QuantizedArrays.of(self._projection(shape, gate_up))
        activation = KernelActivation(SWIGLU) if gate_up else None
        outs, warps = tiling

        def call() -> mx.array:
            return gather_qmv(
                x,
                arrays,
                indices,
                activation=activation,
                x_div=shape.top_k if gate_up else 1,
                outs=outs,
                warps=warps,
            )

        return self._seconds(call)

    def path(self, shape: Shape, tokens: int, path: str) -> float:
        """A `PathTimer`: one call of the installed layer with its decode
        range moved so that every call takes ``path``."""
        layer = self._layer(shape)
        chosen = layer.kernels
        if path == "tensor_cores" and chosen.grouped is None:
            raise RuntimeError("this layer has no tensor-core path here")
        limit = 1 << 30 if path == "decode" else 0
        forced = dataclasses.replace(
            chosen, decode=dataclasses.replace(chosen.decode, max_pairs=limit)
        )
        x = mx.random.normal((tokens, shape.hidden)).astype(mx.bfloat16)
        indices = mx.random.randint(0, shape.experts, (tokens, shape.top_k)).astype(mx.uint32)
        mx.eval(x, indices)
        layer.kernels = forced
        try:
            return self._seconds(lambda: layer(x, indices))
        finally:
            layer.kernels = chosen

    def _seconds(self, call: Callable[[], mx.array]) -> float:
        from .bench import seconds_of

        def batch() -> list[mx.array]:
            return [call() for _ in range(self.BATCH)]

        seconds_of(batch)  # the first launch loads the kernel
        return statistics.median(seconds_of(batch) for _ in range(self.ROUNDS)) / self.BATCH

    def _projection(self, shape: Shape, gate_up: bool) -> nn.Module:
        layer = self._layer(shape)
        return layer["gate_up_proj"] if gate_up else layer["down_proj"]

    def _layer(self, shape: Shape) -> nn.Module:
        if shape not in self._layers:
            from mlx_lm.models.switch_layers import SwitchGLU

            from ..installer import install

            layer = SwitchGLU(shape.hidden, shape.width, shape.experts)
            layer.set_dtype(mx.bfloat16)
            for name in ("gate_proj", "up_proj", "down_proj"):
                layer[name] = layer[name].to_quantized(shape.group_size, shape.bits, shape.mode)
            mx.eval(layer.parameters())
            install(layer, reserve_bytes=0)
            self._layers[shape] = layer
        return self._layers[shape]


def write(out: Path, data: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
