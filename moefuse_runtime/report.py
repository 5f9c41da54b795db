"""What an install or uninstall did to each layer, and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .memory import format_bytes


class Outcome(str, Enum):
    FUSED = "fused"
    SKIPPED = "skipped"
    ALREADY_FUSED = "already fused"
    UNFUSED = "unfused"
    WOULD_FUSE = "would fuse"

    def __str__(self) -> str:
        return self.value


SWITCH_GLU = "SwitchGLU"

RELAID = (Outcome.FUSED, Outcome.UNFUSED, Outcome.WOULD_FUSE)
"""Outcomes whose gate and up are (or would be) re-laid in memory."""


@dataclass(frozen=True)
class LayerResult:
    """One SwitchGLU: where it is, what happened, why, and how big it is."""

    path: str
    outcome: Outcome
    reason: str = ""
    kind: str = ""
    nbytes: int = 0
    """Bytes of gate and up together (the fused projection holds the same)."""
    layer_type: str = SWITCH_GLU
    """'SwitchGLU' or 'dense MLP'."""
    compute_path: str = ""
    """How a fused layer computes here, e.g. 'gather_qmm (cpu)' or the CUDA kernels."""


@dataclass(frozen=True)
class FuseReport:
    """The result of `install` or `uninstall`.

    ``active_bytes_before``/``after`` are MLX's active memory around the call:
    fusion re-lays arrays, it must not grow the model. ``max_layer_bytes`` is
    the most that one layer held twice while it was being re-laid.
    """

    layers: tuple[LayerResult, ...] = ()
    action: str = "install"
    seconds: float = 0.0
    active_bytes_before: int = 0
    active_bytes_after: int = 0
    max_layer_bytes: int = 0
    disabled_reason: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def _paths(self, outcome: Outcome) -> tuple[str, ...]:
        return tuple(r.path for r in self.layers if r.outcome is outcome)

    @property
    def fused(self) -> tuple[str, ...]:
        return self._paths(Outcome.FUSED)

    @property
    def unfused(self) -> tuple[str, ...]:
        return self._paths(Outcome.UNFUSED)

    @property
    def would_fuse(self) -> tuple[str, ...]:
        return self._paths(Outcome.WOULD_FUSE)

    @property
    def already_fused(self) -> tuple[str, ...]:
        return self._paths(Outcome.ALREADY_FUSED)

    @property
    def skipped(self) -> dict[str, str]:
        return {r.path: r.reason for r in self.layers if r.outcome is Outcome.SKIPPED}

    @property
    def total(self) -> int:
        """SwitchGLU layers seen (dense MLPs are counted in `dense_total`)."""
        return sum(r.layer_type == SWITCH_GLU for r in self.layers)

    @property
    def dense_total(self) -> int:
        return len(self.layers) - self.total

    def summary(self) -> str:
        """One line, e.g. ``fused 48/48 SwitchGLU layers in 0.41 s ...``."""
        if self.disabled_reason:
            return f"fused 0/{self.total} SwitchGLU layers: {self.disabled_reason}"
        done, verb = {
            "install": (self.fused, "fused"),
            "uninstall": (self.unfused, "unfused"),
            "plan": (self.would_fuse, "would fuse"),
        }[self.action]
        switch_done = sum(r.layer_type == SWITCH_GLU for r in self.layers if r.path in done)
        parts = [f"{verb} {switch_done}/{self.total} SwitchGLU layers"]
        if self.dense_total:
            dense_done = len(done) - switch_done
            parts.append(f"and {dense_done}/{self.dense_total} dense MLPs")
        extras = []
        if self.already_fused:
            extras.append(f"{len(self.already_fused)} already fused")
        if self.skipped:
            extras.append(f"{len(self.skipped)} skipped")
        if extras:
            parts.append(f"({', '.join(extras)})")
        parts.append(f"in {self.seconds:.2f} s;")
        moved = sum(r.nbytes for r in self.layers if r.outcome in RELAID)
        relaid = "to re-lay" if self.action == "plan" else "re-laid"
        parts.append(f"{format_bytes(moved)} {relaid};")
        parts.append(
            f"active memory {format_bytes(self.active_bytes_before)} -> "
            f"{format_bytes(self.active_bytes_after)}"
        )
        if self.notes:
            parts.append("; " + "; ".join(self.notes))
        return " ".join(parts).replace(" ;", ";")

    def __str__(self) -> str:
        rows = [("layer", "type", "outcome", "kind", "gate+up", "reason or compute path")]
        rows += [
            (
                r.path,
                r.layer_type,
                str(r.outcome),
                r.kind,
                format_bytes(r.nbytes) if r.nbytes else "",
                r.reason or r.compute_path,
            )
            for r in self.layers
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = [
            "  ".join([*(c.ljust(w) for c, w in zip(row[:5], widths, strict=True)), row[5]])
            for row in rows
        ]
        return "\n".join([*(line.rstrip() for line in lines), self.summary()])
