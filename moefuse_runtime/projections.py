"""The weight math: gate and up concatenated along the output axis, and back.

Every projection in mlx-lm stores its arrays with the output axis second to
last in ``weight``: expert projections hold ``weight`` (experts, out, in),
quantized ``scales``/``biases`` (experts, out, groups) and ``bias``
(experts, out); dense ``nn.Linear``/``nn.QuantizedLinear`` the same without
the experts axis. So all arrays of one projection stack on axis
``weight.ndim - 2``. Quantization groups run
along the input axis, so stacking two projections' rows is itself a valid
projection of the same kind, and each output column is computed from the very
same numbers as before: the outputs are bitwise equal. The one exception is a
per-expert ``global_scale`` (nvfp4), which cannot be stacked: it must be the
same for gate and up.
"""

from __future__ import annotations

import copy
import sys

import mlx.core as mx
import mlx.nn as nn

SHARED_KEYS = frozenset({"global_scale"})
"""Arrays that gate and up must share instead of being concatenated."""

DENSE = (
    nn.Linear,
    nn.QuantizedLinear,
    # What mlx's shard_linear(..., "all-to-sharded") makes of the two above:
    # the same arrays (this rank's rows), replicated input, sharded output.
    nn.AllToShardedLinear,
    nn.QuantizedAllToShardedLinear,
)
EXPERT_CLASSES = (
    ("mlx_lm.models.switch_layers", ("SwitchLinear", "QuantizedSwitchLinear")),
    # mlx-vlm's own copies: the same arrays, the same call signature.
    ("mlx_vlm.models.switch_layers", ("SwitchLinear", "QuantizedSwitchLinear")),
)


def supported() -> tuple[type, ...]:
    """Projection classes that stack, from the packages imported now."""
    experts = (
        getattr(sys.modules.get(module), name, None)
        for module, names in EXPERT_CLASSES
        for name in names
    )
    return (*(c for c in experts if c is not None), *DENSE)


CUDA_FLOAT_OFFSET_LIMIT = 1 << 31
"""MLX 0.32.4's CUDA ``gather_mm`` on its sorted path (SwitchGLU at >= 64
token-expert pairs) faults with an illegal memory access once an expert's byte
offset in a float weight reaches 2**31 (docs/benchmarks.md; the quantized
``gather_qmm`` path does not). Stacking gate and up doubles the offsets, so a layer
whose unfused weights are safe can cross it: such layers stay unfused there."""


def arrays(projection: nn.Module) -> dict[str, mx.array]:
    """The projection's own arrays (not those of any child module)."""
    return {k: v for k, v in projection.items() if isinstance(v, mx.array)}


def settings(projection: nn.Module) -> dict[str, object]:
    """Public non-array attributes that change the math (bits, mode, ...)."""
    return {
        k: v
        for k, v in vars(projection).items()
        if not k.startswith("_") and not isinstance(v, mx.array)
    }


def nbytes(projection: nn.Module) -> int:
    return sum(a.nbytes for a in arrays(projection).values())


def describe(projection: nn.Module) -> str:
    """A short name of the projection's storage, for reports."""
    if hasattr(projection, "bits"):
        mode = getattr(projection, "mode", "affine")
        return f"{mode} {projection.bits}-bit g{projection.group_size}"
    weight = projection.get("weight")
    return str(weight.dtype).removeprefix("mlx.core.") if weight is not None else "?"


def mismatch(gate: nn.Module, up: nn.Module) -> str | None:
    """Why gate and up cannot become one projection, or None when they can."""
    if type(gate) is not type(up):
        return f"gate is {type(gate).__name__} but up is {type(up).__name__}"
    if type(gate) not in supported():
        return f"unknown projection class {type(gate).__name__}"
    gate_settings, up_settings = settings(gate), settings(up)
    absent = object()
    differ = sorted(
        k
        for k in gate_settings.keys() | up_settings.keys()
        if gate_settings.get(k, absent) != up_settings.get(k, absent)
    )
    if differ:
        return f"gate and up differ in {', '.join(differ)}: {describe(gate)} vs {describe(up)}"
    gate_arrays, up_arrays = arrays(gate), arrays(up)
    if gate_arrays.keys() != up_arrays.keys():
        return f"gate holds {sorted(gate_arrays)} but up holds {sorted(up_arrays)}"
    for key, g in gate_arrays.items():
        u = up_arrays[key]
        if g.dtype != u.dtype or g.shape != u.shape:
            return f"{key}: gate is {g.dtype} {tuple(g.shape)} but up is {u.dtype} {tuple(u.shape)}"
        if key in SHARED_KEYS and not mx.array_equal(g, u).item():
            return f"gate and up have different {key} values"
    return None


def backend_limit(gate: nn.Module, backend: str) -> str | None:
    """Why the fused projection would fail on this backend, or None."""
    if backend != "cuda" or hasattr(gate, "bits") or gate["weight"].ndim != 3:
        return None  # only float expert weights take gather_mm
    weight = gate["weight"]
    experts = weight.shape[0]
    last_offset = (experts - 1) * 2 * (weight.nbytes // experts)
    if last_offset < CUDA_FLOAT_OFFSET_LIMIT:
        return None
    return (
        f"fused {weight.dtype} weight would put expert offsets past 2 GiB, where "
        f"MLX's CUDA gather_mm faults (sorted path); kept unfused"
    )


def output_axis(projection: nn.Module) -> int:
    return projection["weight"].ndim - 2


def fuse(gate: nn.Module, up: nn.Module) -> nn.Module:
    """One projection computing ``concat([gate(x), up(x)], axis=-1)``.

    The result is a new module of the same class, with its arrays evaluated,
    so the caller can drop gate and up right after. Neither input changes.
    """
    fused = _empty_like(gate)
    axis, up_arrays = output_axis(gate), arrays(up)
    for key, g in arrays(gate).items():
        fused[key] = g if key in SHARED_KEYS else mx.concatenate([g, up_arrays[key]], axis)
    mx.eval(arrays(fused))
    return fused


def split(fused: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The inverse of `fuse`: gate and up as separate, contiguous projections."""
    gate, up = _empty_like(fused), _empty_like(fused)
    axis = output_axis(fused)
    for key, a in arrays(fused).items():
        if key in SHARED_KEYS:
            gate[key] = up[key] = a
        else:
            g, u = mx.split(a, 2, axis=axis)
            gate[key], up[key] = mx.contiguous(g), mx.contiguous(u)
    mx.eval(arrays(gate), arrays(up))
    return gate, up


def _empty_like(projection: nn.Module) -> nn.Module:
    """A module of the same class and settings (frozen state too), no arrays.

    Calling the class's constructor would allocate a random weight of the
    full size, which is exactly the memory a tight machine does not have.
    """
    cls = type(projection)
    empty = cls.__new__(cls)
    # A sharded projection's communication group is shared, never copied.
    shared = {id(v): v for v in vars(projection).values() if isinstance(v, mx.distributed.Group)}
    empty.__dict__.update(copy.deepcopy(vars(projection), shared))
    for key, value in projection.items():
        if not isinstance(value, mx.array):
            empty[key] = copy.deepcopy(value)
    return empty
