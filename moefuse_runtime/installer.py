"""`install` and `uninstall`: walk a model and (un)fuse its SwitchGLU layers.

One layer at a time: build the new arrays, evaluate them, swap them in, drop
the old ones, then go on. No list of modules is ever held (mlx's
``named_modules()`` would keep every replaced projection alive until the
end), so the extra memory at any moment is one layer's gate and up.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
from collections.abc import Iterator

import mlx.core as mx
import mlx.nn as nn

from . import blocks, projections
from .config import ENABLE_ENV, check_env, check_flag, check_reserve, env_flag
from .cuda import prepare_kernels
from .dense import DENSE_MLP
from .dense import is_candidate as is_dense_candidate
from .first_forward import disarm
from .layer import FUSED_NAME, SWITCH_GLU, Kind, has_kernels, switch_glu_classes
from .memory import default_reserve_bytes, format_bytes, headroom
from .report import RELAID, FuseReport, LayerResult, Outcome
from .sharding import guard_shard

logger = logging.getLogger(__name__)


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
        yield path, value, SWITCH_GLU
        return
    if dense and isinstance(value, nn.Module) and is_dense_candidate(value):
        yield path, value, DENSE_MLP
        return
    if isinstance(value, dict):
        children = value.items()
    elif isinstance(value, (list, tuple)):
        children = ((str(i), v) for i, v in enumerate(value))
    else:
        return
    for key, child in children:
        if isinstance(child, (dict, list, tuple)):
            yield from _walk(child, f"{path}.{key}" if path else str(key), dense, switch)


def install(
    model: nn.Module,
    *,
    enabled: bool | None = None,
    reserve_bytes: int | None = None,
    group: mx.distributed.Group | None = None,
    dense: bool = False,
) -> FuseReport:
    """Fuse gate and up of every SwitchGLU in ``model``, in place.

    Args:
        model: A loaded (possibly lazily loaded, sharded or pipelined) model.
        enabled: Overrides ``EXO_FUSED_MOE``; None reads it (unset = on).
        reserve_bytes: Memory to leave free on the device; None takes
            ``MOEFUSE_RESERVE_GB`` or 5% of device memory (at least 1 GiB).
            A layer whose fusion would cut into it is left unfused, and so
            is every layer after it.
        group: With tensor-parallel ranks, the group whose ranks must agree
            on each layer's fuse/skip verdict, so all run the same path.
            Install after ``model.shard(group)`` fuses the local shards;
            install before it is safe too (see `sharding`).
        dense: Also fuse dense gated MLPs (shared experts, dense layers)
            whose forward calls gate_proj and up_proj on one input.

    Returns:
        A `FuseReport`; layers that could not be fused say why. Never raises
        for a layer: any failure leaves that layer unfused and working.

    Raises:
        TypeError: an argument of the wrong type (named in the message).
        ValueError: a negative or infinite ``reserve_bytes``, or an
            environment variable that is not understood.

    Where fused layers run on the CUDA kernels, the MoE blocks holding them
    also run compiled on decode steps (`blocks`; a note in the report), and
    every kernel variant they can launch is compiled now, or found compiled
    by an earlier process (`cuda.jit`; a note says how long it took).

    Thread-safe: installs and uninstalls take turns (`SWAPS`), so a second
    caller finds the layers already fused; a forward running meanwhile in
    another thread computes with each layer as it was or as it becomes.
    """
    _check_model("install", model)
    check_flag("install", "enabled", enabled, none=True)
    check_flag("install", "dense", dense)
    reserve_bytes = check_reserve("install", reserve_bytes)
    if group is not None and not isinstance(group, mx.distributed.Group):
        raise TypeError(f"install: group must be an mx.distributed.Group or None, not {group!r}")
    check_env()
    with SWAPS:
        return _install(model, enabled, reserve_bytes, group, dense)


def _check_model(function: str, model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{function}: model must be an mlx.nn.Module, not {type(model).__name__}")


SWAPS = threading.RLock()
"""Held by `install`, `uninstall` and `plan`: one of them at a time."""


def _install(
    model: nn.Module,
    enabled: bool | None,
    reserve_bytes: int | None,
    group: mx.distributed.Group | None,
    dense: bool,
) -> FuseReport:
    disarm(model)  # fusing now supersedes fusing on the first forward
    if enabled is False:
        return _disabled_report(model, dense, "disabled by enabled=False")
    if enabled is None and not env_flag(ENABLE_ENV, default=True):
        return _disabled_report(model, dense, f"disabled by {ENABLE_ENV}=0")
    start = time.perf_counter()
    reserve = default_reserve_bytes() if reserve_bytes is None else reserve_bytes
    fuser = _Fuser(reserve, *_agreeing_group(model, group, dense))
    report = _run("install", model, dense, fuser)
    if report.fused or report.already_fused:
        guard_shard(model)  # a later model.shard(group) must still work
        notes = [*blocks.compile_blocks(model, has_kernels), *_prepare_kernels(model)]
        if notes:
            logger.info("%s", "; ".join(notes))
        seconds = time.perf_counter() - start  # the kernels' preparation included
        report = dataclasses.replace(report, notes=(*report.notes, *notes), seconds=seconds)
    return report


def _prepare_kernels(model: nn.Module) -> tuple[str, ...]:
    """Every CUDA kernel variant the fused layers can launch, compiled (or found
    compiled) now rather than on a request."""
    try:
        holders = list(blocks.blocks_holding(model, has_kernels))
        return prepare_kernels(holders) if holders else ()
    except Exception as error:  # noqa: BLE001 - the kernels then compile at first use
        logger.exception("CUDA kernels not prepared ahead")
        return (f"CUDA kernels: not prepared ahead ({type(error).__name__}: {error})",)


def plan(model: nn.Module, *, reserve_bytes: int | None = None, dense: bool = False) -> FuseReport:
    """What `install` would do on this machine now, changing nothing.

    Each layer's verdict (fusable or why not, and the headroom check against
    the memory free now) is reported with outcome ``would fuse``/``skipped``;
    with ``EXO_FUSED_MOE=0``, every layer is skipped as install would skip it.
    """
    _check_model("plan", model)
    check_flag("plan", "dense", dense)
    reserve_bytes = check_reserve("plan", reserve_bytes)
    check_env()
    if not env_flag(ENABLE_ENV, default=True):
        return _disabled_report(model, dense, f"disabled by {ENABLE_ENV}=0")
    reserve = default_reserve_bytes() if reserve_bytes is None else reserve_bytes
    with SWAPS:
        return _run("plan", model, dense, _Fuser(reserve, None, (), dry_run=True))


def uninstall(model: nn.Module) -> FuseReport:
    """Split every fused layer back into ``gate_proj`` and ``up_proj``.

    The arrays come back bitwise identical and the layer regains its
    original class, so the model saves and loads as an ordinary mlx-lm model.
    """
    _check_model("uninstall", model)
    with SWAPS:
        disarm(model)
        blocks.uncompile_blocks(model)
        return _run("uninstall", model, True, _Unfuser())


def _disabled_report(model: nn.Module, dense: bool, why: str) -> FuseReport:
    layers = tuple(
        LayerResult(path, Outcome.SKIPPED, why, layer_type=kind.name)
        for path, _, kind in find_targets(model, dense)
    )
    report = FuseReport(layers=layers, disabled_reason=why)
    logger.info("%s", report.summary())
    return report


def _run(action: str, model: nn.Module, dense: bool, step) -> FuseReport:
    before = mx.get_active_memory()
    start = time.perf_counter()
    layers = []
    layer = None
    for path, layer, kind in _with_progress(find_targets(model, dense), model, dense, action):
        result = step(path, layer, kind)
        if result is None:
            continue
        logger.debug("%s %s: %s %s", action, path, result.outcome, result.reason)
        layers.append(result)
    del layer  # the last layer's old arrays must not outlive the loop
    report = FuseReport(
        layers=tuple(layers),
        action=action,
        seconds=time.perf_counter() - start,
        active_bytes_before=before,
        active_bytes_after=mx.get_active_memory(),
        max_layer_bytes=max(
            (r.nbytes for r in layers if r.outcome in RELAID),
            default=0,
        ),
        notes=getattr(step, "notes", ()),
    )
    logger.info("%s", report.summary())
    return report


PROGRESS_MIN_LAYERS = 8


def _with_progress(items, model: nn.Module, dense: bool, action: str):
    """A tqdm bar on a terminal, for models with many layers; else as is."""
    if not sys.stderr.isatty():
        return items
    total = sum(1 for _ in find_targets(model, dense))
    if total < PROGRESS_MIN_LAYERS:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc=f"moefuse {action}", unit="layer", leave=False)


class _Fuser:
    """Fuses one layer per call; remembers when memory ran out to stop there."""

    def __init__(
        self,
        reserve: int,
        group: mx.distributed.Group | None,
        notes: tuple[str, ...],
        dry_run: bool = False,
    ) -> None:
        self.reserve = reserve
        self.dry_run = dry_run
        self.group = group
        self.stopped: str | None = None
        self.notes = notes

    def __call__(self, path: str, layer: nn.Module, kind: Kind) -> LayerResult:
        """One layer, in two rounds of votes with the group's peers (if any):
        every rank takes part in both, whatever happens here, so that an
        exception on one rank is its "no" and never a peer waiting for it."""
        if kind.is_fused(layer):
            self._agree(None)  # two votes, in step with peers that fuse this layer
            self._agree(None)
            fused = layer[FUSED_NAME]
            return LayerResult(
                path,
                Outcome.ALREADY_FUSED,
                "",
                projections.describe(fused),
                projections.nbytes(fused),
                kind.name,
                _selected_path(layer, kind),
            )
        storage, need = "", 0
        try:
            reason = kind.why_not_fusable(layer)
            storage = projections.describe(layer["gate_proj"]) if "gate_proj" in layer else ""
            need = sum(projections.nbytes(layer[k]) for k in ("gate_proj", "up_proj") if k in layer)
            if reason is None:
                reason = self.stopped or self._headroom_verdict(path, need)
        except Exception as error:  # noqa: BLE001 - this rank's "no", in step with its peers
            logger.debug("checking %s failed", path, exc_info=True)
            reason = f"failed while checking ({type(error).__name__}: {error}); layer left unfused"
        if self.dry_run:
            self.stopped = None  # nothing is allocated: each layer on its own
            outcome = Outcome.WOULD_FUSE if reason is None else Outcome.SKIPPED
            return LayerResult(path, outcome, reason or "", storage, need, kind.name)
        reason = self._agree(reason)
        fused = None
        if reason is None:
            try:
                fused = projections.fuse(layer["gate_proj"], layer["up_proj"])
            except Exception as error:  # noqa: BLE001 - any failure leaves the layer as it was
                reason = self._failure(path, error)
        reason = self._agree(reason)
        if reason is not None:
            return LayerResult(path, Outcome.SKIPPED, reason, storage, need, kind.name)
        kind.fuse(layer, fused)
        compute_path = _selected_path(layer, kind)
        return LayerResult(path, Outcome.FUSED, "", storage, need, kind.name, compute_path)

    def _headroom_verdict(self, path: str, need: int) -> str | None:
        room = headroom()
        if room.available - need >= self.reserve:
            return None
        self.stopped = (
            f"headroom: stopped at {path}, which needs {format_bytes(need)} while "
            f"{room.source} leaves {format_bytes(room.available)} "
            f"and {format_bytes(self.reserve)} must stay free"
        )
        return self.stopped

    def _failure(self, path: str, error: Exception) -> str:
        message = f"{type(error).__name__}: {error}"
        if _is_allocation_error(error):
            self.stopped = f"headroom: allocation failed at {path} ({message}); stopped fusing"
            return self.stopped
        return f"failed while fusing ({message}); layer left unfused"

    def _agree(self, reason: str | None) -> str | None:
        """With a group, a layer is fused only where every rank can fuse it;
        a rank that cannot is named in its peers' reasons."""
        if self.group is None or self.group.size() < 2:
            return reason
        rank, size = self.group.rank(), self.group.size()
        mine = [int(r == rank and reason is not None) for r in range(size)]
        # Evaluated on every rank, vetoing or not: a lazy collective left
        # unevaluated on one rank would leave its peers waiting forever.
        vetoes = mx.distributed.all_sum(mx.array(mine), group=self.group).tolist()
        others = [str(r) for r, vetoed in enumerate(vetoes) if vetoed and r != rank]
        if others and reason is None:
            ranks = f"rank{'s' if len(others) > 1 else ''} {', '.join(others)}"
            return f"{ranks} could not fuse this layer (verdicts agreed across ranks)"
        return reason


def _selected_path(layer: nn.Module, kind: Kind) -> str:
    """The fused layer's compute path here; a failure to choose keeps the one
    every fused layer has (its own forward, gather_qmm), and says why."""
    try:
        return kind.select_path(layer)
    except Exception as error:  # noqa: BLE001 - the layer stays fused and correct
        logger.debug("selecting a path failed", exc_info=True)
        layer.__dict__.pop("kernels", None)
        return f"gather_qmm (path selection failed: {type(error).__name__}: {error})"


class _Unfuser:
    def __call__(self, path: str, layer: nn.Module, kind: Kind) -> LayerResult | None:
        if not kind.is_fused(layer):
            if kind is DENSE_MLP:
                return None  # every dense MLP is visited: report only fused ones
            return LayerResult(path, Outcome.SKIPPED, "not fused", layer_type=kind.name)
        fused = layer[FUSED_NAME]
        storage, size = projections.describe(fused), projections.nbytes(fused)
        try:
            gate, up = projections.split(fused)
        except Exception as error:  # noqa: BLE001 - the layer stays fused and correct
            reason = f"failed to split: {error}"
            return LayerResult(path, Outcome.SKIPPED, reason, storage, size, kind.name)
        del fused
        kind.unfuse(layer, gate, up)
        return LayerResult(path, Outcome.UNFUSED, "", storage, size, kind.name)


def _agreeing_group(
    model: nn.Module, group: mx.distributed.Group | None, dense: bool
) -> tuple[mx.distributed.Group | None, tuple[str, ...]]:
    """The group to agree verdicts in, if its ranks hold the same layers.

    Tensor-parallel ranks hold a shard of every layer, so layer i is the same
    layer everywhere and one vote per layer keeps them on the same path.
    Pipeline ranks hold different layers: their verdicts stay their own (and
    a vote count that differs between ranks would hang the collectives).
    """
    if group is None or group.size() < 2:
        return None, ()
    count = sum(1 for _ in find_targets(model, dense))
    counts = mx.distributed.all_gather(mx.array([count]), group=group).tolist()
    if min(counts) != max(counts):
        return None, (f"ranks hold different layers ({counts} to fuse); verdicts are per rank",)
    return group, (f"verdicts agreed across {group.size()} ranks",)


def _is_allocation_error(error: Exception) -> bool:
    if isinstance(error, MemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        word in text for word in ("malloc", "out of memory", "allocat")
    )
