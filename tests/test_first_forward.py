"""Fusing on the first forward pass: what load_model-style loaders get."""

from __future__ import annotations

import sys

import mlx.core as mx
from conftest import run
from helpers import build_family, logits_sequence, same

import moefuse_runtime
from moefuse_runtime import first_forward, installer

PYTHON = sys.executable


def test_armed_model_fuses_on_its_first_forward_bitwise():
    model = build_family("qwen3_moe", quantized=True)
    reference = logits_sequence(model)
    assert installer.arm(model) == 2
    layers = [layer for _, layer in moefuse_runtime.find_switch_glus(model)]
    assert all(type(layer).__name__ == "ArmedSwitchGLU" for layer in layers)
    assert not any(moefuse_runtime.is_fused(layer) for layer in layers)
    fused = logits_sequence(model)
    assert all(moefuse_runtime.is_fused(layer) for layer in layers)
    assert not first_forward.is_armed(model)
    assert same(reference, fused)


def test_a_deep_copy_of_an_armed_model_fuses_itself():
    # what the load_model hook leaves, copied: the copy fuses on its own first
    # forward and the original stays armed until its own
    import copy

    model = build_family("qwen3_moe", quantized=True)
    reference = logits_sequence(model)
    installer.arm(model)
    copied = copy.deepcopy(model)
    assert first_forward.is_armed(copied)
    assert same(reference, logits_sequence(copied))
    assert all(moefuse_runtime.is_fused(m) for _, m in moefuse_runtime.find_switch_glus(copied))
    assert first_forward.is_armed(model)
    assert not any(moefuse_runtime.is_fused(m) for _, m in moefuse_runtime.find_switch_glus(model))
    assert same(reference, logits_sequence(model))
    assert all(moefuse_runtime.is_fused(m) for _, m in moefuse_runtime.find_switch_glus(model))


def test_an_armed_layer_copied_alone_runs_unfused():
    import copy

    model = build_family("qwen3_moe", quantized=True)
    installer.arm(model)
    path, layer = next(iter(moefuse_runtime.find_switch_glus(model)))
    alone = copy.deepcopy(layer)
    x = mx.random.normal((1, 2, layer.gate_proj.weight.shape[-1] * 8))
    indices = mx.zeros((1, 2, 2), mx.uint32)
    unfused = type(layer).original.__call__(layer, x, indices)
    assert mx.array_equal(alone(x, indices), unfused).item()
    assert not moefuse_runtime.is_fused(alone) and first_forward.is_armed(model)


def test_install_and_plan_on_an_armed_model():
    model = build_family("mixtral", quantized=True)
    installer.arm(model)
    assert moefuse_runtime.plan(model, reserve_bytes=0).would_fuse
    assert first_forward.is_armed(model)  # plan changes nothing
    assert moefuse_runtime.install(model, reserve_bytes=0).fused
    assert not first_forward.is_armed(model)
    assert all(
        type(m).__name__ == "FusedSwitchGLU" for _, m in moefuse_runtime.find_switch_glus(model)
    )


def test_disabled_install_disarms_and_keeps_the_function(monkeypatch):
    model = build_family("mixtral", quantized=True)
    reference = logits_sequence(model)
    installer.arm(model)
    monkeypatch.setenv("EXO_FUSED_MOE", "0")
    assert logits_sequence(model)[0].shape == reference[0].shape
    assert not first_forward.is_armed(model)
    assert not any(moefuse_runtime.is_fused(m) for _, m in moefuse_runtime.find_switch_glus(model))
    assert same(reference, logits_sequence(model))


def test_shard_records_the_group_for_the_first_forward():
    model = build_family("qwen3_moe", quantized=True)
    reference = logits_sequence(model)
    installer.arm(model)
    group = mx.distributed.init()  # one rank: shard keeps every row
    model.shard(group)
    assert model.__dict__[installer.SHARD_GROUP] is group
    assert same(reference, logits_sequence(model))
    assert all(moefuse_runtime.is_fused(m) for _, m in moefuse_runtime.find_switch_glus(model))


LOAD_MODEL_AS_VLLM_MLX = """
import sys
from pathlib import Path
import mlx.core as mx
from mlx_lm.utils import load_model
from moefuse_runtime import find_switch_glus, is_fused
model, _ = load_model(Path(sys.argv[1]), strict=False)  # as vllm-mlx calls it
before = sum(is_fused(m) for _, m in find_switch_glus(model))
logits = model(mx.array([[1, 2, 3, 4, 5, 6, 7, 8] * 8]))
print("FUSED", before, sum(is_fused(m) for _, m in find_switch_glus(model)))
print("LOGITS", mx.argmax(logits, axis=-1).tolist())
"""


def test_load_model_as_vllm_mlx_calls_it(demo_model):
    args = [PYTHON, "-c", LOAD_MODEL_AS_VLLM_MLX, str(demo_model)]
    plain = run(args, env={"EXO_FUSED_MOE": ""})
    fused = run(["moefuse", "run", "--", *args])
    assert plain.returncode == 0 and fused.returncode == 0, fused.stderr
    assert "FUSED 0 0" in plain.stdout  # loaded, never fused
    assert "FUSED 0 4" in fused.stdout  # armed at load, fused by the first forward
    assert "fused 4/4 SwitchGLU layers" in fused.stderr
    logits = [line for line in plain.stdout.splitlines() if line.startswith("LOGITS")]
    assert logits and logits == [
        line for line in fused.stdout.splitlines() if line.startswith("LOGITS")
    ]
