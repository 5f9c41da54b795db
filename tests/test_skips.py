"""Layers that must not be fused are left alone, each with a reason."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from helpers import route, switch_glu
from mlx_lm.models.switch_layers import SwitchGLU

import moefuse_runtime


def skipped_reason(layer):
    x = mx.random.normal((1, 70, 128))
    indices = route(70, 8, 1)
    before = layer(x, indices)
    report = moefuse_runtime.install(layer, reserve_bytes=0)
    assert report.fused == () and not moefuse_runtime.is_fused(layer)
    assert mx.array_equal(layer(x, indices), before).item()
    assert "gate_proj" in layer and "up_proj" in layer
    return report.skipped[""]


def test_mixed_bits():
    layer = switch_glu(128, 128, quant={"bits": 4, "group_size": 64})
    layer.up_proj = switch_glu(128, 128, quant={"bits": 8, "group_size": 64}).up_proj
    assert "8-bit" in skipped_reason(layer) and "4-bit" in skipped_reason(layer)


def test_mixed_group_size():
    layer = switch_glu(128, 128, quant={"bits": 4, "group_size": 64})
    layer.up_proj = switch_glu(128, 128, quant={"bits": 4, "group_size": 32}).up_proj
    assert "g32" in skipped_reason(layer)


def test_mixed_mode_and_class():
    layer = switch_glu(128, 128, quant={"bits": 4, "group_size": 32, "mode": "mxfp4"})
    layer.up_proj = switch_glu(128, 128, quant={"bits": 4, "group_size": 32}).up_proj
    assert "mxfp4" in skipped_reason(layer)
    layer = switch_glu(128, 128)
    layer.up_proj = switch_glu(128, 128, quant={"bits": 4, "group_size": 32}).up_proj
    assert "SwitchLinear but up is QuantizedSwitchLinear" in skipped_reason(layer)


def test_mixed_dtype():
    layer = switch_glu(128, 128)
    layer.up_proj.weight = layer.up_proj.weight.astype(mx.float16)
    assert "float16" in moefuse_runtime.install(layer, reserve_bytes=0).skipped[""]


def test_mismatched_global_scales():
    layer = switch_glu(
        128, 128, quant={"bits": 4, "group_size": 16, "mode": "nvfp4"}, global_scale=True
    )
    report = moefuse_runtime.install(layer, reserve_bytes=0)
    assert report.skipped[""] == "gate and up have different global_scale values"


def test_global_scale_on_one_side_only():
    layer = switch_glu(
        128, 128, quant={"bits": 4, "group_size": 16, "mode": "nvfp4"}, global_scale=True
    )
    layer.up_proj = switch_glu(
        128, 128, quant={"bits": 4, "group_size": 16, "mode": "nvfp4"}
    ).up_proj
    assert "global_scale" in moefuse_runtime.install(layer, reserve_bytes=0).skipped[""]


class MyProjection(nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.inner = proj

    def __call__(self, x, indices, sorted_indices=False):
        return self.inner(x, indices, sorted_indices=sorted_indices)


def test_unknown_projection_class():
    layer = switch_glu(128, 128)
    layer.gate_proj, layer.up_proj = MyProjection(layer.gate_proj), MyProjection(layer.up_proj)
    assert skipped_reason(layer) == "unknown projection class MyProjection"


class CustomGLU(SwitchGLU):
    def __call__(self, x, indices):
        return super().__call__(x, indices) * 2


def test_subclass_whose_forward_hides_gate_and_up():
    # Its forward reaches gate_proj and up_proj only through super(): the
    # source shows no calls, so nothing proves they get the same arguments.
    layer = switch_glu(128, 128)
    layer.__class__ = CustomGLU
    assert skipped_reason(layer) == (
        "forward of CustomGLU does not call gate_proj and up_proj with the same arguments"
    )


class ScaledGLU(SwitchGLU):
    """Its own forward (as mlx-vlm's DeepSeek-V4.1 and Inkling layers have),
    calling up before gate with the same arguments."""

    def __call__(self, x, indices):
        x = mx.expand_dims(x, (-2, -3))
        x_up = self.up_proj(x, indices)
        x_gate = self.gate_proj(x, indices)
        return self.down_proj(self.activation(x_up, x_gate) * 0.5, indices).squeeze(-2)


class MixedGLU(SwitchGLU):
    def __call__(self, x, indices):
        x = mx.expand_dims(x, (-2, -3))
        x_up = self.up_proj(x * 2, indices)
        return self.down_proj(self.activation(x_up, self.gate_proj(x, indices)), indices)


def test_subclass_calling_gate_and_up_on_different_inputs():
    layer = switch_glu(128, 128)
    layer.__class__ = MixedGLU
    assert skipped_reason(layer) == (
        "forward of MixedGLU does not call gate_proj and up_proj with the same arguments"
    )


class PlainSubclass(SwitchGLU):
    """A subclass that keeps SwitchGLU's forward can be fused."""


@pytest.mark.parametrize(("cls", "tokens", "top_k"), [(PlainSubclass, 70, 1), (ScaledGLU, 5, 2)])
def test_subclass_is_fused_bitwise_and_restored(cls, tokens, top_k):
    # PlainSubclass keeps SwitchGLU's forward; ScaledGLU has its own.
    layer = switch_glu(128, 128)
    layer.__class__ = cls
    x, indices = mx.random.normal((1, tokens, 128)), route(tokens, 8, top_k)
    before = layer(x, indices)
    assert moefuse_runtime.install(layer, reserve_bytes=0).fused == ("",)
    assert isinstance(layer, cls) and type(layer).__name__ == f"Fused{cls.__name__}"
    assert "gate_up_proj" in layer
    assert mx.array_equal(layer(x, indices), before).item()
    moefuse_runtime.uninstall(layer)
    assert type(layer) is cls and mx.array_equal(layer(x, indices), before).item()


def test_model_without_switch_glu():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    report = moefuse_runtime.install(model)
    assert report.total == 0 and report.fused == ()
    assert report.summary().startswith("fused 0/0 SwitchGLU layers")


def test_cuda_float_offset_limit(monkeypatch):
    """On CUDA, float layers whose fused offsets would pass MLX's 2 GiB fault
    line stay unfused; quantized layers and the CPU are not affected."""
    from moefuse_runtime import layer as layer_module
    from moefuse_runtime import projections

    float_layer, quantized = (
        switch_glu(128, 128),
        switch_glu(128, 128, quant={"bits": 4, "group_size": 64}),
    )
    per_expert_fused = 2 * float_layer.gate_proj.weight.nbytes // 8
    monkeypatch.setattr(projections, "CUDA_FLOAT_OFFSET_LIMIT", 7 * per_expert_fused)
    monkeypatch.setattr(layer_module, "backend", lambda: "cuda")
    reason = moefuse_runtime.install(float_layer, reserve_bytes=0).skipped[""]
    assert "MLX's CUDA gather_mm faults" in reason
    assert moefuse_runtime.install(quantized, reserve_bytes=0).fused == ("",)
    monkeypatch.setattr(projections, "CUDA_FLOAT_OFFSET_LIMIT", 7 * per_expert_fused + 1)
    assert moefuse_runtime.install(float_layer, reserve_bytes=0).fused == ("",)


@pytest.mark.parametrize("backend", ["cpu", "metal"])
def test_cuda_limit_ignored_elsewhere(monkeypatch, backend):
    from moefuse_runtime import layer as layer_module
    from moefuse_runtime import projections

    monkeypatch.setattr(layer_module, "backend", lambda: backend)
    monkeypatch.setattr(projections, "CUDA_FLOAT_OFFSET_LIMIT", 1)
    assert moefuse_runtime.install(switch_glu(128, 128), reserve_bytes=0).fused == ("",)
