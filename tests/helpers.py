"""Builders shared by the tests: SwitchGLU layers of every projection kind."""

from __future__ import annotations

import inspect

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU

import moefuse_runtime

CPU_FLOAT_ONLY = "mlx's CPU gather_mm supports float32 only; run on the GPU"
CPU_GLOBAL_SCALE = "mlx's CPU gather_qmm has no global_scale; run on the GPU"


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def switch_glu(
    dims: int = 64,
    hidden: int = 32,
    experts: int = 8,
    *,
    dtype: mx.Dtype = mx.float32,
    bias: bool = False,
    quant: dict | None = None,
    global_scale: bool = False,
    seed: int = 0,
) -> SwitchGLU:
    """A SwitchGLU with random weights (and biases), float or quantized."""
    mx.random.seed(seed)
    layer = SwitchGLU(dims, hidden, experts, bias=bias)
    for name in ("gate_proj", "up_proj", "down_proj"):
        proj = layer[name]
        proj.weight = (mx.random.normal(proj.weight.shape) * 0.2).astype(dtype)
        if bias:
            proj.bias = (mx.random.normal(proj.bias.shape) * 0.2).astype(dtype)
        if quant is not None:
            layer[name] = proj.to_quantized(**quant, global_scale=global_scale)
    mx.eval(layer.parameters())
    return layer


def route(tokens: int, experts: int, top_k: int, batch: int = 1, seed: int = 1) -> mx.array:
    """Expert indices (batch, tokens, top_k), duplicates across tokens included."""
    mx.random.seed(seed)
    return mx.random.randint(0, experts, (batch, tokens, top_k)).astype(mx.uint32)


def fused_matches(layer: SwitchGLU, x: mx.array, indices: mx.array) -> bool:
    """Fuse ``layer`` in place and tell whether its output is bitwise the same."""
    before = layer(x, indices)
    mx.eval(before)
    report = moefuse_runtime.install(layer, reserve_bytes=0)
    assert report.fused == ("",), report
    after = layer(x, indices)
    return after.dtype == before.dtype and mx.array_equal(after, before).item()


def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 32, mode: str = "affine"):
    """nn.quantize every layer whose input width the group size divides."""

    def predicate(_path: str, module: nn.Module) -> bool:
        weight = module.get("weight") if isinstance(module, dict) else None
        return (
            hasattr(module, "to_quantized")
            # afm7's FusedLinear (attention) has an older to_quantized without mode
            and "mode" in inspect.signature(module.to_quantized).parameters
            and weight is not None
            and weight.shape[-1] % group_size == 0
        )

    nn.quantize(model, group_size, bits, mode=mode, class_predicate=predicate)
    return model


PROMPT_TOKENS = 40  # x batch 2 x top-k 2 = 160 token-expert pairs: the sorted path
DECODE_STEPS = 3  # batch 2 x top-k 2 = 4 pairs: the unsorted path


def build_family(family: str, quantized: bool, vlm: bool = False) -> nn.Module:
    """A family's tiny model (tests/families.py; with ``vlm``, mlx-vlm's
    language model, tests/vlm_families.py), float32 or 4-bit, evaluated."""
    if vlm:
        import vlm_families as families
    else:
        import families

    mx.random.seed(0)
    model = families.build(family)
    if quantized:
        quantize_model(model)
    mx.eval(model.parameters())
    return model


def same(outputs: list[mx.array], others: list[mx.array]) -> bool:
    """Bitwise equal, pair by pair."""
    return all(mx.array_equal(a, b).item() for a, b in zip(outputs, others, strict=True))


def logits_sequence(model: nn.Module) -> list[mx.array]:
    """Logits of a batch-2 prompt, then of greedy decode steps with a KV cache.

    Evaluated step by step: pipelined models send and receive per step.
    """
    from mlx_lm.models.cache import make_prompt_cache

    mx.random.seed(1)
    prompt = mx.random.randint(0, 128, (2, PROMPT_TOKENS))
    cache = make_prompt_cache(model)
    outputs = [_logits(model(prompt, cache=cache))]
    for _ in range(DECODE_STEPS):
        outputs.append(_logits(model(mx.argmax(outputs[-1][:, -1:, :], axis=-1), cache=cache)))
    return outputs


def _logits(output) -> mx.array:
    """The logits of a forward, evaluated (mlx-vlm's models return an object)."""
    logits = getattr(output, "logits", output)
    mx.eval(logits)
    return logits


METAL_ONLY = "No Metal back-end"


def logits_or_skip(model: nn.Module, family: str) -> list[mx.array]:
    """`logits_sequence`, or the test skipped where the family's forward
    needs a Metal-only kernel."""
    import pytest

    try:
        return logits_sequence(model)
    except RuntimeError as error:
        if METAL_ONLY in str(error):
            pytest.skip(f"{family}'s forward uses a Metal-only kernel")
        raise


def install_keeps_logits(family: str, quantized: bool, **options) -> moefuse_runtime.FuseReport:
    """A family's tiny model: install(**options) must leave every logit of the
    prompt and the decode steps bitwise the same. Skips Metal-only forwards."""
    model = build_family(family, quantized)
    reference = logits_or_skip(model, family)
    report = moefuse_runtime.install(model, reserve_bytes=0, **options)
    fused = logits_sequence(model)
    for step, (a, b) in enumerate(zip(reference, fused, strict=True)):
        assert mx.array_equal(a, b).item(), f"{family} step {step} differs"
    return report
