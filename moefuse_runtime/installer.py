"""`install` and `uninstall`: walk a model and (un)fuse its SwitchGLU layers.

One layer at a time: build the new arrays, evaluate them, swap them in, drop
the old ones, then go on. No list of modules is ever held (mlx's
``named_modules()`` would keep every replaced projection alive until the
end), so the extra memory at any moment is one layer's gate and up.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import sys
import threading
import time
from typing import cast

import mlx.core as mx
import mlx.nn as nn

from . import blocks, cuda, first_forward, projections
from .config import ENABLE_ENV, check_env, check_flag, check_reserve, env_flag
from .cuda import prepare_kernels
from .dense import DENSE_MLP
from .first_forward import disarm
from .layer import FUSED_NAME, Kind, has_kernels
from .memory import default_reserve_bytes, format_bytes, headroom
from .patching import arguments, wrap
from .report import RELAID, FuseReport, LayerResult, Outcome
from .walk import find_targets

logger = logging.getLogger(__name__)


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
            install before it is safe too (`guard_shard`, below).
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
    cuda.check_env()
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
    cuda.check_env()
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
        vetoes = cast(list[int], mx.distributed.all_sum(mx.array(mine), group=self.group).tolist())
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
    counts = cast(list[int], mx.distributed.all_gather(mx.array([count]), group=group).tolist())
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


# -- sharding ------------------------------------------------------------------
# Tensor-parallel sharding of a fused model, in either order.
#
# mlx-lm's ``Model.shard(group)`` reaches for ``switch_mlp.gate_proj`` and
# ``up_proj`` and shards each along its outputs ("all-to-sharded"). A fused
# layer holds neither. Teaching the fused projection to shard itself would mean
# getting the segments right for every model: mlx-lm's load-time attempt sharded
# the stacked tensor as one segment and handed rank 0 all of gate and rank 1
# all of up. Instead the model class's ``shard`` is wrapped (with wrapt): fused
# layers are split back, the model's own code shards gate and up exactly as it
# always does, and each rank fuses its local halves again, the verdicts agreed
# across the group. One mechanism for every model whose ``shard`` touches a
# SwitchGLU, with no per-model code.
#
# Code that shards with its own functions instead of ``model.shard`` (exo's
# strategies) should call ``install`` after sharding; it fuses the local shards.

SHARD_GROUP = "_moefuse_shard_group"
"""Set on a model by its guarded ``shard``: the tensor group, for a model
that fuses on its first forward (`arm`)."""


def guard_shard(model: nn.Module) -> bool:
    """Wrap ``type(model).shard`` once so that it unfuses, shards, re-fuses.

    Returns whether the class has a ``shard`` method (now guarded).
    """
    cls = type(model)
    if inspect.getattr_static(cls, "shard", None) is None:
        return False
    if wrap(cls, "shard", _refuse_around_shard):
        logger.debug("wrapped %s.shard to re-fuse after sharding", cls.__qualname__)
    return True


def _refuse_around_shard(wrapped, instance, args, kwargs):
    if instance is None:
        return wrapped(*args, **kwargs)
    group = arguments(wrapped, args, kwargs).get("group") or mx.distributed.init()
    instance.__dict__[SHARD_GROUP] = group  # for a model that fuses on its first forward
    fused = {kind.name for _, m, kind in find_targets(instance, dense=True) if kind.is_fused(m)}
    if not fused:
        return wrapped(*args, **kwargs)
    uninstall(instance)
    result = wrapped(*args, **kwargs)
    install(instance, enabled=True, group=group, dense=DENSE_MLP.name in fused)
    return result


# -- for the loader hooks --------------------------------------------------------


def install_quietly(model: object, group: object = None) -> None:
    """`install`, logging instead of raising: the host must keep serving."""
    try:
        install(model, group=group)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - a server must keep serving, unfused
        logger.exception("moefuse_runtime: install failed; the model is left unfused")


def fuse_armed(model: nn.Module) -> None:
    """What an armed model does on its first forward: install over the group
    a ``model.shard(group)`` recorded."""
    install_quietly(model, group=model.__dict__.get(SHARD_GROUP))


def arm(model: nn.Module) -> int:
    """Arm ``model`` to fuse on its first forward (`first_forward`), for
    loaders that return before their callers shard; guard its ``shard`` so
    that the group is recorded. Returns how many layers were armed."""
    armed = first_forward.arm(model, fuse_armed)
    if armed:
        guard_shard(model)
    return armed
