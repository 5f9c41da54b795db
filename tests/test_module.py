"""A fused model is still an ordinary nn.Module, and uninstall is exact."""

import copy

import families
import mlx.core as mx
import mlx.nn as nn
from helpers import route, switch_glu
from mlx.utils import tree_flatten, tree_map

import moefuse_runtime
from moefuse_runtime import FusedSwitchGLU, Outcome
from moefuse_runtime.halves import Half


def quantized_model():
    from helpers import quantize_model

    mx.random.seed(0)
    return quantize_model(families.build("qwen3_moe"))


PROMPT = mx.array(
    [
        [
            3,
            1,
            4,
            1,
            5,
            9,
            2,
            6,
            5,
            3,
            5,
            8,
            9,
            7,
            9,
            3,
            2,
            3,
            8,
            4,
            6,
            2,
            6,
            4,
            3,
            3,
            8,
            3,
            2,
            7,
            9,
            5,
        ]
    ]
)


def test_fused_layer_shape_and_repr():
    model = quantized_model()
    moefuse_runtime.install(model, reserve_bytes=0)
    layer = model.model.layers[1].mlp.switch_mlp
    assert isinstance(layer, FusedSwitchGLU)
    assert set(layer.children()) == {"gate_up_proj", "down_proj", "activation"}
    # gate_proj and up_proj are halves of gate_up_proj: no parameters of their own
    assert isinstance(layer["gate_proj"], Half) and isinstance(layer["up_proj"], Half)
    assert {k.split(".")[0] for k, _ in tree_flatten(layer.parameters())} == {
        "gate_up_proj",
        "down_proj",
    }
    assert "FusedSwitchGLU" in repr(model)


def test_uninstall_restores_weights_bitwise_and_class():
    model = quantized_model()
    before = dict(tree_flatten(model.parameters()))
    moefuse_runtime.install(model, reserve_bytes=0)
    report = moefuse_runtime.uninstall(model)
    assert report.unfused and all(r.outcome is Outcome.UNFUSED for r in report.layers)
    after = dict(tree_flatten(model.parameters()))
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype
        assert mx.array_equal(before[key], after[key]).item(), key
    assert type(model.model.layers[1].mlp.switch_mlp).__name__ == "SwitchGLU"


def test_install_twice_is_idempotent():
    model = quantized_model()
    first = moefuse_runtime.install(model, reserve_bytes=0)
    second = moefuse_runtime.install(model, reserve_bytes=0)
    assert len(first.fused) == first.total == 2
    assert second.fused == () and len(second.already_fused) == 2
    assert "fused 0/2 SwitchGLU layers (2 already fused)" in second.summary()


def test_deepcopy_of_a_fused_model():
    model = quantized_model()
    moefuse_runtime.install(model, reserve_bytes=0)
    clone = copy.deepcopy(model)
    assert isinstance(clone.model.layers[1].mlp.switch_mlp, FusedSwitchGLU)
    assert mx.array_equal(clone(PROMPT), model(PROMPT)).item()
    moefuse_runtime.uninstall(clone)  # the copy's arrays are its own
    assert isinstance(model.model.layers[1].mlp.switch_mlp, FusedSwitchGLU)
    assert mx.array_equal(clone(PROMPT), model(PROMPT)).item()


def test_save_and_load_weights(tmp_path):
    model = quantized_model()
    moefuse_runtime.install(model, reserve_bytes=0)
    expected = model(PROMPT)
    path = str(tmp_path / "fused.safetensors")
    model.save_weights(path)
    other = quantized_model()
    moefuse_runtime.install(other, reserve_bytes=0)
    other.update(tree_map(lambda a: mx.zeros_like(a), other.parameters()))
    other.load_weights(path)
    assert mx.array_equal(other(PROMPT), expected).item()


def test_parameters_update_and_astype():
    layer = switch_glu(128, 128)
    moefuse_runtime.install(layer, reserve_bytes=0)
    keys = {k for k, _ in tree_flatten(layer.parameters())}
    assert keys == {"gate_up_proj.weight", "down_proj.weight"}
    layer.update(tree_map(lambda a: a.astype(mx.float16), layer.parameters()))
    assert layer.gate_up_proj.weight.dtype == mx.float16
    layer.update({"gate_up_proj": {"weight": mx.zeros((8, 256, 128))}})
    out = layer(mx.ones((1, 3, 128)), route(3, 8, 2))
    assert mx.array_equal(out, mx.zeros_like(out)).item()


def test_nn_quantize_after_fusing_equals_fusing_after_quantize():
    """nn.quantize is left alone; it quantizes the fused projection row-wise,
    which is the same as quantizing gate and up and then fusing them."""
    x, indices = mx.random.normal((2, 40, 128)), route(40, 8, 2, batch=2)
    quantize_first = switch_glu(128, 128)
    nn.quantize(quantize_first, 64, 4)
    moefuse_runtime.install(quantize_first, reserve_bytes=0)
    fuse_first = switch_glu(128, 128)
    moefuse_runtime.install(fuse_first, reserve_bytes=0)
    nn.quantize(fuse_first, 64, 4)
    assert isinstance(fuse_first, FusedSwitchGLU)
    assert mx.array_equal(fuse_first(x, indices), quantize_first(x, indices)).item()


def test_frozen_state_is_kept():
    model = quantized_model()
    moefuse_runtime.install(model, reserve_bytes=0)
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert not any("gate_up_proj" in k for k in trainable)
