"""MoE blocks compiled for decode steps (moefuse_runtime/blocks.py).

install() compiles the blocks around fused layers that run on the CUDA
kernels; here, on any backend, `compile_blocks` is called with every fused
layer accepted, so the compiled block runs the gather_qmm path: each block
of every mlx-lm and mlx-vlm family must give bitwise the logits it gave
uncompiled, and every way a block can fail to compile must leave it
working. The GPU test at the end runs install()'s own choice with the
kernels.
"""

from __future__ import annotations

import copy
import logging

import families
import mlx.core as mx
import mlx.nn as nn
import pytest
import vlm_families
from helpers import build_family, logits_or_skip, logits_sequence, switch_glu

import moefuse_runtime
from moefuse_runtime import blocks
from moefuse_runtime.cuda.bench import BroadcastFFN
from moefuse_runtime.layer import is_fused
from moefuse_runtime.memory import backend


def compiled_states(model: nn.Module) -> list:
    return [m.__dict__[blocks.STATE] for m in model.modules() if blocks.is_compiled(m)]


def compiled_keeps_logits(model: nn.Module, family: str) -> None:
    """Fuse, then compile every block: the logits must not change, and the
    decode steps (2 tokens) must have run compiled."""
    model.eval()  # as mlx_lm.load leaves a model; training mode runs uncompiled
    moefuse_runtime.install(model, reserve_bytes=0)
    reference = logits_or_skip(model, family)
    blocks.compile_blocks(model, is_fused)
    compiled = logits_sequence(model)
    for step, (a, b) in enumerate(zip(reference, compiled, strict=True)):
        assert mx.array_equal(a, b).item(), f"step {step} differs"
    states = compiled_states(model)
    assert states and not [s.failure for s in states if s.failure]
    assert any(s.graph is not None for s in states)


@pytest.mark.parametrize("family", families.discover())
def test_mlx_lm_family_blocks_compile_bitwise(family):
    compiled_keeps_logits(build_family(family, quantized=True), family)


@pytest.mark.parametrize("family", vlm_families.buildable())
def test_mlx_vlm_family_blocks_compile_bitwise(family):
    compiled_keeps_logits(build_family(family, quantized=True, vlm=True), family)


class Block(nn.Module):
    """A MoE block around one fused layer, whose forward can break a rule."""

    def __init__(self, rule: str = "") -> None:
        super().__init__()
        self.router = nn.Linear(64, 8)
        self.switch_mlp = switch_glu(64, 32, 8, quant={"group_size": 32, "bits": 4})
        self.rule = rule

    def __call__(self, x: mx.array, bias: mx.array | None = None, scale: float = 1.0):
        scores = mx.softmax(self.router(x) * scale, axis=-1)
        if bias is not None:
            scores = scores + bias
        indices = mx.argpartition(scores, kth=-2, axis=-1)[..., -2:]
        y = self.switch_mlp(x, indices)
        weighted = (y * mx.take_along_axis(scores, indices, axis=-1)[..., None]).sum(axis=-2)
        if self.rule == "sets":
            self.last = weighted  # noqa: B010 - the rule being broken
        if self.rule == "reads":
            weighted = weighted * float(scores.max())
        if self.rule == "tuple":
            return weighted, scores
        return weighted


def fused_block(rule: str = "") -> Block:
    mx.random.seed(0)
    block = Block(rule)
    mx.eval(block.parameters())
    block.eval()
    moefuse_runtime.install(block, reserve_bytes=0)
    return block


def first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("rule", ["sets", "reads", "tuple"])
def test_a_block_that_cannot_compile_runs_as_before(rule, caplog):
    block = fused_block(rule)
    x = mx.random.normal((1, 3, 64))
    expected = first(block(x))
    arrays = dict(nn.utils.tree_flatten(block.parameters()))
    blocks.compile_blocks(block, is_fused)
    with caplog.at_level(logging.WARNING, logger="moefuse_runtime"):
        out = first(block(x))
    assert mx.array_equal(out, expected).item()
    assert "runs uncompiled" in caplog.text
    state = block.__dict__[blocks.STATE]
    assert state.failure and state.graph is None
    # the block's own arrays are back (a tracer left there could not be
    # evaluated), and so are its attributes
    after = dict(nn.utils.tree_flatten(block.parameters()))
    assert arrays.keys() == after.keys()
    assert all(mx.array_equal(arrays[k], after[k]).item() for k in arrays)
    assert mx.array_equal(first(block(x)), expected).item()


def test_calls_outside_the_rules_run_uncompiled():
    block = fused_block()
    blocks.compile_blocks(block, is_fused)
    state = block.__dict__[blocks.STATE]
    long = mx.random.normal((1, blocks.COMPILED_TOKENS + 1, 64))
    block(long)  # a prompt
    block.train()
    block(mx.random.normal((1, 1, 64)))
    assert state.graph is None
    block.eval()
    block(mx.random.normal((1, blocks.COMPILED_TOKENS, 64)))
    assert state.graph is not None


@pytest.mark.parametrize(
    ("shape", "compiled"),
    [
        ((1, 16, 8), True),  # a short prompt
        ((1, 17, 8), False),
        ((2, 8, 8), True),
        ((4, 8, 8), False),  # 32 tokens, not a decode step
        ((64, 1, 8), True),  # a decode step of 64 sequences
        ((65, 1, 8), False),
        ((16, 8), True),
        ((17, 8), False),  # flat tokens: not known to be a decode step
    ],
)
def test_short_calls_and_decode_steps_compile(shape, compiled):
    x = mx.zeros(shape)
    assert blocks._compilable_call((x, None), {}) is compiled
    assert blocks._compilable_call((x, 3), {}) is False  # not an array: a constant


@pytest.mark.parametrize("sequences", [17, 64])
def test_a_decode_step_of_many_sequences_runs_compiled_and_bitwise(sequences):
    block = fused_block()
    blocks.compile_blocks(block, is_fused)
    state = block.__dict__[blocks.STATE]
    x = mx.random.normal((sequences, 1, 64))
    compiled = block(x)
    assert state.graph is not None and state.failure is None
    blocks.uncompile(block)
    assert mx.array_equal(compiled, block(x)).item()


def test_the_notes_say_when_a_model_left_in_training_mode_runs_uncompiled():
    block = fused_block()
    assert "training mode" not in " ".join(blocks.compile_blocks(block, is_fused))
    block.train()  # as nn.Module starts; mlx-lm's loaders call eval()
    notes = blocks.compile_blocks(block, is_fused)
    assert notes == [
        "MoE blocks: 1 compiled for calls of <= 16 tokens and decode steps of <= 64 sequences"
        " (the model is in training mode: they run uncompiled until model.eval())"
    ]
    block(mx.random.normal((1, 1, 64)))
    assert block.__dict__[blocks.STATE].graph is None


def test_array_and_none_arguments_compile_other_values_do_not():
    # Keyword and positional arrays (mlx-vlm's ernie4_5_moe_vl passes
    # token_type_ids=) and None are inputs of the compiled call; a Python
    # value would be a constant of the graph, so it keeps the call uncompiled.
    block = fused_block()
    x, bias = mx.random.normal((1, 2, 64)), mx.random.uniform(shape=(8,))
    expected = [block(x, bias=bias), block(x, bias), block(x, bias=None), block(x, scale=2.0)]
    blocks.compile_blocks(block, is_fused)
    state = block.__dict__[blocks.STATE]
    got = [block(x, bias=bias), block(x, bias), block(x, bias=None)]
    assert state.graph is not None and state.failure is None

    def not_compiled(*_):
        raise AssertionError("a call with a Python value ran compiled")

    state.run = not_compiled
    got.append(block(x, scale=2.0))
    for a, b in zip(got, expected, strict=True):
        assert mx.array_equal(a, b).item()


def test_compiled_block_reads_its_weights_at_every_call():
    block = fused_block()
    blocks.compile_blocks(block, is_fused)
    x = mx.random.normal((1, 2, 64))
    block(x)
    block.router.weight = block.router.weight * 2
    compiled = block(x)
    blocks.uncompile(block)
    assert mx.array_equal(compiled, block(x)).item()


def test_a_graph_keeps_its_kernels_until_recompiled():
    # a call looks nothing up: a kernel swap (the benchmark's bound) needs
    # recompile, and then the block traces the new choice
    block = fused_block()
    blocks.compile_blocks(block, is_fused)
    x = mx.random.normal((1, 2, 64))
    routed = block(x)
    graph = block.__dict__[blocks.STATE].graph
    block.switch_mlp.kernels = BroadcastFFN()
    assert mx.array_equal(block(x), routed).item()  # the graph traced before
    blocks.recompile(block)
    broadcast = block(x)
    assert not mx.array_equal(routed, broadcast).item()
    assert block.__dict__[blocks.STATE].graph is not graph
    block.switch_mlp.kernels = None
    blocks.recompile(block)
    assert mx.array_equal(block(x), routed).item()


def test_sharded_blocks_stay_uncompiled():
    block = fused_block()
    block.sharding_group = mx.distributed.init()
    notes = blocks.compile_blocks(block, is_fused)
    assert not blocks.is_compiled(block)
    assert notes == [
        "MoE blocks: 1 not compiled, sharded (Block.sharding_group): "
        "collectives stay outside compiled graphs"
    ]


def test_install_compiles_blocks_only_around_kernel_layers(monkeypatch):
    model = build_family("qwen3_moe", quantized=True)
    report = moefuse_runtime.install(model, reserve_bytes=0)
    assert not compiled_states(model) and not report.notes  # no kernels here

    class NoPath:  # kernels that take no call: gather_qmm runs
        def __call__(self, layer, gate_up_proj, x, indices):
            return None

        def variants(self, layer, block):
            return []

    monkeypatch.setattr("moefuse_runtime.layer.kernels_for", lambda *_: (NoPath(), "test"))
    report = moefuse_runtime.install(model, reserve_bytes=0)
    assert report.already_fused and len(compiled_states(model)) == 2
    assert "MoE blocks: 2 compiled for calls of <= 16 tokens and decode steps of <= 64" in (
        report.summary()
    )
    copied = copy.deepcopy(model)  # a copy compiles its own graphs
    assert [s.graph for s in compiled_states(copied)] == [None, None]
    assert mx.array_equal(logits_sequence(copied)[-1], logits_sequence(model)[-1]).item()
    moefuse_runtime.uninstall(model)
    assert not any(blocks.is_compiled(m) or blocks.STATE in m.__dict__ for m in model.modules())


@pytest.mark.skipif(backend() != "cuda", reason="the CUDA kernels: lent GPU")
@pytest.mark.parametrize("sequences", [1, 4, 16, 32, 64])
def test_kernel_blocks_compile_bitwise_on_the_gpu(sequences, monkeypatch):
    monkeypatch.setenv("MOEFUSE_KERNEL", "1")
    from mlx_lm.models.cache import make_prompt_cache

    from moefuse_runtime.demo import build_demo_model

    model = build_demo_model("small", layers=4, dtype=mx.bfloat16)
    model.eval()
    report = moefuse_runtime.install(model, reserve_bytes=0)
    assert "MoE blocks: 4 compiled" in report.summary(), report.summary()
    states = compiled_states(model)
    prompt = mx.random.randint(0, 1000, (sequences, 24))

    def steps():
        cache = make_prompt_cache(model)
        out = [model(prompt, cache=cache)]
        for _ in range(3):
            out.append(model(mx.argmax(out[-1][:, -1:], axis=-1), cache=cache))
        mx.eval(out)
        return out

    compiled = steps()
    assert all(s.graph is not None and s.failure is None for s in states)
    for block in model.modules():
        blocks.uncompile(block)
    for a, b in zip(steps(), compiled, strict=True):
        assert mx.array_equal(a, b).item()
