"""Memory: one layer at a time, nothing kept alive, and a fallback when tight."""

import gc

import mlx.core as mx
import pytest
from helpers import quantize_model, route, switch_glu
from mlx_lm.models import qwen3_moe

import moefuse_runtime
from moefuse_runtime import projections

LAYERS = 6


def stack(layers=LAYERS, dims=512, hidden=512):
    """A model of several big SwitchGLU layers: 4 MiB of gate+up each (fp32)."""
    import mlx.nn as nn

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [switch_glu(dims, hidden, seed=i) for i in range(layers)]

        def __call__(self, x, indices):
            for layer in self.layers:
                x = mx.tanh(layer(x, indices).sum(-2))
            return x

    model = Stack()
    mx.eval(model.parameters())
    return model


def settle():
    gc.collect()
    mx.clear_cache()
    return mx.get_active_memory()


def layer_bytes(model):
    layer = model.layers[0]
    return projections.nbytes(layer.gate_proj) + projections.nbytes(layer.up_proj)


def test_streaming_peak_and_steady_state():
    model = stack()
    per_layer = layer_bytes(model)
    before = settle()
    mx.reset_peak_memory()
    report = moefuse_runtime.install(model, reserve_bytes=0)
    peak_extra = mx.get_peak_memory() - before
    assert len(report.fused) == LAYERS
    # One layer's gate+up held twice, never the whole model's.
    assert peak_extra <= 1.25 * per_layer, (peak_extra, per_layer)
    assert LAYERS * per_layer > 4 * per_layer
    assert settle() == before
    assert report.max_layer_bytes == per_layer

    mx.reset_peak_memory()
    moefuse_runtime.uninstall(model)
    assert mx.get_peak_memory() - before <= 1.25 * per_layer
    assert settle() == before


def test_lazily_loaded_model_is_not_forced_into_memory(tmp_path):
    from mlx_lm.utils import load_model, save_model

    args = qwen3_moe.ModelArgs.from_dict(
        {
            "model_type": "qwen3_moe",
            "hidden_size": 256,
            "num_hidden_layers": 8,
            "intermediate_size": 256,
            "num_attention_heads": 4,
            "num_experts": 16,
            "num_experts_per_tok": 2,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "moe_intermediate_size": 256,
            "rms_norm_eps": 1e-5,
            "vocab_size": 256,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "rope_theta": 1e4,
            "tie_word_embeddings": False,
            "max_position_embeddings": 512,
            "norm_topk_prob": True,
        }
    )
    model = quantize_model(qwen3_moe.Model(args), bits=8)
    mx.eval(model.parameters())
    prompt = mx.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    expected = model(prompt)
    mx.eval(expected)
    total = sum(a.nbytes for _, a in __import__("mlx.utils").utils.tree_flatten(model.parameters()))
    import json

    config = {**args.__dict__, "quantization": {"group_size": 32, "bits": 8}}
    save_model(tmp_path, model)
    (tmp_path / "config.json").write_text(json.dumps(config))
    del model
    before = settle()

    lazy, _ = load_model(tmp_path, lazy=True)
    mx.reset_peak_memory()
    report = moefuse_runtime.install(lazy, reserve_bytes=0)
    assert len(report.fused) == 8
    gate_up = sum(r.nbytes for r in report.layers)
    # Only gate+up were materialized (plus one layer's transient copy).
    assert mx.get_peak_memory() - before <= gate_up + 1.25 * report.max_layer_bytes
    assert gate_up + 2 * report.max_layer_bytes < total
    assert mx.array_equal(lazy(prompt), expected).item()


def test_headroom_fallback_with_a_small_memory_limit():
    model = stack()
    per_layer = layer_bytes(model)
    x, indices = mx.random.normal((1, 70, 512)), route(70, 8, 1)
    expected = model(x, indices)
    previous = mx.set_memory_limit(settle() + int(2.5 * per_layer))
    try:
        report = moefuse_runtime.install(model, reserve_bytes=per_layer)
    finally:
        mx.set_memory_limit(previous)
    # Headroom is 2.5 layers: each needs 1 on top of the 1-layer reserve.
    assert 1 <= len(report.fused) < LAYERS
    assert len(report.skipped) == LAYERS - len(report.fused)
    assert all("headroom" in reason for reason in report.skipped.values())
    assert "mx.get_memory_limit()" in next(iter(report.skipped.values()))
    assert mx.array_equal(model(x, indices), expected).item()


def test_huge_reserve_fuses_nothing():
    model = stack(layers=2)
    report = moefuse_runtime.install(model, reserve_bytes=1 << 60)
    assert report.fused == ()
    assert list(report.skipped) == ["layers.0", "layers.1"]
    assert "stopped at layers.0" in report.skipped["layers.1"]


def test_reserve_from_environment(monkeypatch):
    monkeypatch.setenv("MOEFUSE_RESERVE_GB", "1000000")
    assert moefuse_runtime.install(stack(layers=1)).fused == ()
    monkeypatch.setenv("MOEFUSE_RESERVE_GB", "0")
    assert len(moefuse_runtime.install(stack(layers=1)).fused) == 1
    monkeypatch.setenv("MOEFUSE_RESERVE_GB", "lots")
    with pytest.raises(ValueError, match="MOEFUSE_RESERVE_GB='lots'"):
        moefuse_runtime.install(stack(layers=1))


def failing_on(call_number, error):
    real = projections.fuse
    calls = {"n": 0}

    def fuse(gate, up):
        calls["n"] += 1
        if calls["n"] == call_number:
            raise error
        return real(gate, up)

    return fuse


def test_failure_in_the_middle_leaves_the_layer_intact(monkeypatch):
    model = stack()
    x, indices = mx.random.normal((1, 70, 512)), route(70, 8, 1)
    expected = model(x, indices)
    monkeypatch.setattr(projections, "fuse", failing_on(3, ValueError("injected")))
    report = moefuse_runtime.install(model, reserve_bytes=0)
    assert len(report.fused) == LAYERS - 1
    assert report.skipped == {
        "layers.2": "failed while fusing (ValueError: injected); layer left unfused"
    }
    assert not moefuse_runtime.is_fused(model.layers[2]) and "gate_proj" in model.layers[2]
    assert mx.array_equal(model(x, indices), expected).item()


def test_allocation_failure_stops_fusing(monkeypatch):
    model = stack()
    x, indices = mx.random.normal((1, 70, 512)), route(70, 8, 1)
    expected = model(x, indices)
    error = RuntimeError("[metal::malloc] Attempting to allocate 1 bytes which is greater than ...")
    monkeypatch.setattr(projections, "fuse", failing_on(2, error))
    report = moefuse_runtime.install(model, reserve_bytes=0)
    assert report.fused == ("layers.0",)
    assert len(report.skipped) == LAYERS - 1
    assert all("headroom" in r for r in report.skipped.values())
    assert mx.array_equal(model(x, indices), expected).item()
