"""MoE blocks replayed as one compiled graph on decode steps.

At one token a MoE block (router, softmax, top-k, the fused layer, the
weighted sum) is a dozen small ops. On CUDA, with the fused layer on the
kernels, their host work (Python, graph building, launches) costs more than
their GPU time, and single-stream decode waits on the host
(docs/design.md). `compile_blocks` rebinds the class of each module that
holds a fused SwitchGLU to a twin, ``Compiled<Class>``, whose short calls
(`COMPILED_TOKENS`) and decode steps (`COMPILED_SEQUENCES`) run the block's
own forward under ``mx.compile``:
the first call of a shape traces it, later ones replay the graph without
Python per op, and MLX fuses its elementwise ops into fewer kernels. The
block's arrays are the compiled call's inputs (``inputs=``), read afresh at
every call, so weights that change stay live.

The forward stays the block's own; what compiling needs of it is checked,
and a block that does not qualify keeps running its forward as before:

* at `compile_blocks`: it holds no distributed group (a sharded block's
  collectives stay outside compiled graphs);
* at each call: eval mode (mlx-lm's and mlx-vlm's loaders leave a model
  so; the install report says when a model is not), at most
  `COMPILED_TOKENS` tokens or a decode step of at most
  `COMPILED_SEQUENCES` sequences, and arguments that are arrays or None,
  positional or keyword (mlx-vlm's ernie4_5_moe_vl passes
  ``token_type_ids=``). Any other value (a cache, an int) keeps the
  call uncompiled: mx.compile would make each value a constant of its
  graph, a new trace for every new value;
* when traced: it returns one array, raises nothing (reading an array's
  value does), and leaves every module of the block as it found it (an
  attribute set during a trace would hold a tracer). A block that fails
  here runs uncompiled from then on, with the reason logged once.

A block's graph is traced once and replayed as is: a call looks up
nothing. Code that changes its fused layers' kernels afterwards (the
benchmark's variants) calls `recompile`; `install` compiles afresh.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from .twins import Twin, original_class, twin_class

logger = logging.getLogger(__name__)

COMPILED_TOKENS = 16
"""Calls of up to this many tokens run compiled: decode steps of up to 16
sequences, short speculative blocks. Each new shape costs a trace, and
host work matters only where the GPU work is small."""

COMPILED_SEQUENCES = 64
"""Decode steps (one token per sequence, x of shape (sequences, 1, hidden))
of up to this many sequences run compiled too: a server's decode batch,
which runs at the host's pace (docs/benchmarks.md). Other calls of more
than `COMPILED_TOKENS` tokens do not: MLX looks a call's graph up among
its traces one by one, so the shapes traced stay few."""

STATE = "_moefuse_compiled"
IGNORED = frozenset({"_moefuse_pending"})
"""Attributes a fused layer may set during a forward and clear again (halves.PENDING)."""


class CompiledBlock(Twin):
    """What every compiled block twin adds to its class (a mixin, `twins`);
    instances are live blocks whose ``__class__`` was rebound (`compile_blocks`)."""

    PREFIX = "Compiled"

    def __call__(self, *args, **kwargs):
        # the class as read now: an uncompile in another thread may rebind it
        forward = original_class(type(self)).__call__
        state = self.__dict__.get(STATE)
        if state is None or self.training or not _compilable_call(args, kwargs):
            return forward(self, *args, **kwargs)
        return state.run(self, forward, args, kwargs)


class _Compiled:
    """One block's compiled forward, traced on its first compilable call.

    The graph captures the kernel choice of the block's fused layers as it
    was then: code that changes ``layer.kernels`` (the benchmark's variants)
    calls `recompile` after. Not copied: a deep copy of the block starts
    with none (it captures the block it was made for) and traces its own.
    """

    def __init__(self) -> None:
        self.graph: Callable | None = None
        self.failure: str | None = None

    def __deepcopy__(self, memo) -> _Compiled:
        return _Compiled()

    def __reduce__(self):
        return (_Compiled, ())

    def run(self, block: nn.Module, forward: Callable, args: tuple, kwargs: dict):
        if self.failure is not None:
            return forward(block, *args, **kwargs)
        graph = self.graph
        if graph is None:
            graph = self.graph = _compile(block, forward, self)
        out = graph(*args, **kwargs)
        if self.failure is None:
            return out
        self.graph = None  # the failed trace goes with its compiled function
        logger.warning("%s runs uncompiled: %s", _name(block), self.failure)
        return forward(block, *args, **kwargs)


def _compilable_call(args: tuple, kwargs: dict) -> bool:
    """x (the first argument) of at most COMPILED_TOKENS tokens, or a decode
    step of at most COMPILED_SEQUENCES sequences, and every other argument
    an array or None."""
    if not args or not isinstance(args[0], mx.array):
        return False
    if not all(a is None or isinstance(a, mx.array) for a in (*args, *kwargs.values())):
        return False
    x = args[0]
    if x.ndim < 1 or x.shape[-1] == 0:
        return False
    tokens = x.size // x.shape[-1]
    decode_step = x.ndim == 3 and x.shape[1] == 1
    return tokens <= (COMPILED_SEQUENCES if decode_step else COMPILED_TOKENS)


def _compile(block: nn.Module, forward: Callable, state: _Compiled) -> Callable:
    """``forward`` under mx.compile with the block's arrays as inputs; a trace
    that breaks a rule records it in ``state.failure`` and returns a stand-in,
    so that MLX still puts the block's own arrays back."""

    def traced(*args, **kwargs):
        before = _snapshot(block)
        try:
            out = forward(block, *args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any trace failure means uncompiled
            out, state.failure = None, f"tracing failed ({type(error).__name__}: {error})"
        changed = _restore(block, before)
        if state.failure is None and changed:
            state.failure = f"its forward sets {', '.join(changed)}"
        if state.failure is None and not isinstance(out, mx.array):
            state.failure = f"its forward returns {type(out).__name__}, not one array"
        return out if state.failure is None else args[0]

    return mx.compile(traced, inputs=block)


def _snapshot(block: nn.Module) -> list[tuple[nn.Module, dict, dict]]:
    """Each module's attributes and entries, to check a trace changed none."""
    return [(m, dict(m.__dict__), dict(m)) for m in block.modules()]


def _restore(block: nn.Module, before: list) -> list[str]:
    """Put back what a traced forward changed; the names it changed."""
    changed = []
    for module, attributes, entries in before:
        for now, then, restore in (
            (module.__dict__, attributes, module.__dict__),
            (dict(module), entries, module),
        ):
            names = {k for k in now.keys() | then.keys() if k not in IGNORED}
            diff = sorted(k for k in names if now.get(k, _MISSING) is not then.get(k, _MISSING))
            for name in diff:
                if name in then:
                    restore[name] = then[name]
                else:
                    del restore[name]
            changed += [f"{_name(module)}.{name}" for name in diff]
    return changed


def own_class(module: nn.Module) -> type:
    """The module's class as its model made it, compiled twin or not."""
    return original_class(type(module), CompiledBlock)


def _name(module: nn.Module) -> str:
    return own_class(module).__name__


_MISSING = object()


def compiled_class_for(cls: type) -> type:
    """The compiled twin of a block class (one per class, made once)."""
    return twin_class(CompiledBlock, cls)


def is_compiled(block: nn.Module) -> bool:
    return isinstance(block, CompiledBlock)


def blocks_holding(model: nn.Module, is_layer: Callable[[nn.Module], bool]):
    """(block, keys of its fused layers) for every module holding one."""
    for module in model.modules():
        keys = tuple(k for k, v in module.items() if isinstance(v, nn.Module) and is_layer(v))
        if keys:
            yield module, keys


def why_not_compilable(block: nn.Module) -> str | None:
    """Why this block must keep running uncompiled, or None."""
    for module in block.modules():
        for name, value in vars(module).items():
            if isinstance(value, mx.distributed.Group):
                return f"sharded ({_name(module)}.{name}): collectives stay outside compiled graphs"
    return None


def compile_blocks(model: nn.Module, is_layer: Callable[[nn.Module], bool]) -> list[str]:
    """Compile, for decode steps, every block holding a layer ``is_layer``
    accepts; afresh where already compiled. Returns what it did, for the
    report: one line per reason a block was left as it was."""
    compiled, left = 0, dict[str, int]()
    for block, _ in blocks_holding(model, is_layer):
        reason = why_not_compilable(block)
        if reason is not None:
            uncompile(block)
            left[reason] = left.get(reason, 0) + 1
            continue
        block.__dict__[STATE] = _Compiled()
        block.__class__ = compiled_class_for(own_class(block))
        compiled += 1
    notes = [
        f"MoE blocks: {compiled} compiled for calls of <= {COMPILED_TOKENS} tokens "
        f"and decode steps of <= {COMPILED_SEQUENCES} sequences"
    ]
    if compiled and model.training:
        notes[0] += " (the model is in training mode: they run uncompiled until model.eval())"
    notes += [f"MoE blocks: {n} not compiled, {why}" for why, n in left.items()]
    return notes[0 if compiled else 1 :]


def recompile(block: nn.Module) -> None:
    """Drop a compiled block's graph: its next call traces the block as it is
    now (after its layers' kernels changed)."""
    if is_compiled(block):
        block.__dict__[STATE] = _Compiled()


def uncompile(block: nn.Module) -> None:
    block.__dict__.pop(STATE, None)
    if is_compiled(block):
        block.__class__ = own_class(block)


def uncompile_blocks(model: nn.Module) -> None:
    """The inverse of `compile_blocks` for the whole model."""
    for module in model.modules():
        uncompile(module)
