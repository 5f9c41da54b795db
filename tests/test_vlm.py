"""mlx-vlm's SwitchGLU (its own class, 61 model packages) fused like mlx-lm's.

Model-level parity for every mlx-vlm family that builds (vlm_families.py):
float32 and 4-bit, a batch-2 prompt on the sorted path, then KV-cache decode
steps, every logit bitwise equal; layer-level parity for the families whose
forward cannot run here. Then the layer itself, in inference mode: every
quantization format, the extra forward arguments (weights, shared,
residual), the short-block path and its helpers (vlm_helpers.py), the
subclasses with their own forward, uninstall, headroom and the CUDA path
selection.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

pytest.importorskip("mlx_vlm", reason="mlx-vlm is pinned in requirements-test.txt")

import vlm_families  # noqa: E402
from helpers import build_family, logits_sequence, quantize_model, same  # noqa: E402
from mlx_vlm.models import switch_layers as vlm  # noqa: E402
from vlm_layers import call_args, vlm_layer  # noqa: E402

import moefuse_runtime  # noqa: E402
from moefuse_runtime.layer import kernel_paths  # noqa: E402

FAMILIES = vlm_families.buildable()


def test_every_discovered_family_is_built_or_says_why():
    found = set(vlm_families.discover())
    assert {"qwen3_vl_moe", "qwen3_5_moe", "llama4", "gpt_oss", "mixtral", "kimi_vl"} <= found
    listed = set(vlm_families.NOT_BUILT) | set(vlm_families.LAYERS_ONLY)
    assert listed <= found, "a listed family is gone: update the list"
    assert len(FAMILIES) >= 55


@pytest.mark.parametrize("quantized", [False, True], ids=["float32", "4bit"])
@pytest.mark.parametrize("family", sorted(vlm_families.LAYERS_ONLY))
def test_layers_only_family_fuses_bitwise(family, quantized):
    # The family's own SwitchGLUs (its activation, whatever it attached to
    # them), called as its MoE block calls them: decode, short block, sorted.
    model = build_family(family, quantized, vlm=True)
    layers = [layer for _, layer in moefuse_runtime.find_switch_glus(model)]
    assert layers, f"{family} built no SwitchGLU"
    calls = []
    for layer in layers:
        experts, dims = layer.down_proj.weight.shape[0], layer.down_proj.weight.shape[-2]
        for tokens in (1, 4, 40):
            indices = mx.random.randint(0, experts, (2, tokens, 2)).astype(mx.uint32)
            calls.append((layer, mx.random.normal((2, tokens, dims)), indices))
    expected = [layer(x, indices) for layer, x, indices in calls]
    report = moefuse_runtime.install(model, reserve_bytes=0)
    assert len(report.fused) == report.total == len(layers), str(report)
    got = [layer(x, indices) for layer, x, indices in calls]
    assert all(mx.array_equal(a, b).item() for a, b in zip(expected, got, strict=True))


@pytest.mark.parametrize("quantized", [False, True], ids=["float32", "4bit"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_parity(family, quantized):
    model = build_family(family, quantized, vlm=True)
    reference = logits_sequence(model)
    report = moefuse_runtime.install(model, reserve_bytes=0)
    assert report.total >= 1 and len(report.fused) == report.total, str(report)
    for step, (a, b) in enumerate(zip(reference, logits_sequence(model), strict=True)):
        assert mx.array_equal(a, b).item(), f"{family} step {step} differs"
    assert moefuse_runtime.uninstall(model).unfused
    assert same(reference, logits_sequence(model))


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("tokens", [1, 4, 40], ids=["decode", "short-block", "sorted"])
def test_layer_with_weights_and_shared_experts(tokens, quantized):
    # 4 tokens take mlx-vlm's short-block path (1 < L <= 8): on Metal its
    # exact kernels, elsewhere one call per token.
    layer = vlm_layer(quantized=quantized)
    x, indices, weights, shared = call_args(tokens)
    expected = [layer(x, indices), layer(x, indices, weights, shared)]
    moefuse_runtime.install(layer, reserve_bytes=0)
    assert moefuse_runtime.is_fused(layer) and "gate_up_proj" in layer
    got = [layer(x, indices), layer(x, indices, weights, shared)]
    assert all(mx.array_equal(a, b).item() for a, b in zip(expected, got, strict=True))


@pytest.mark.parametrize("quantized", [False, True])
def test_short_block_runs_as_the_unfused_layer_does(monkeypatch, quantized):
    # A short block of a quantized layer takes mlx-vlm's block helpers, not a
    # call per token; the halves share the stacked projection there. Count
    # mlx-vlm's token-by-token fallback: as often fused as unfused.
    from mlx_vlm.models import linear

    calls = []
    tokenwise = linear.tokenwise
    monkeypatch.setattr(linear, "tokenwise", lambda *a, **k: calls.append(1) or tokenwise(*a, **k))
    layer = vlm_layer(quantized=quantized)
    x, indices, weights, shared = call_args(4)
    expected = layer(x, indices, weights, shared)
    unfused_calls = len(calls)
    moefuse_runtime.install(layer, reserve_bytes=0)
    got = layer(x, indices, weights, shared)
    assert len(calls) - unfused_calls == unfused_calls == (0 if quantized else 1)
    assert mx.array_equal(expected, got).item()


def test_short_block_helper_fault_falls_back_token_by_token(monkeypatch):
    from moefuse_runtime import vlm_helpers

    layer = vlm_layer()
    x, indices, weights, shared = call_args(4)
    expected = layer(x, indices, weights, shared)
    moefuse_runtime.install(layer, reserve_bytes=0)

    def broken(*args, **kwargs):
        raise RuntimeError("a fault in the shared half")

    monkeypatch.setattr(vlm_helpers, "_first_three", broken)  # inside the wrappers
    assert mx.array_equal(expected, layer(x, indices, weights, shared)).item()


def test_gate_up_views_read_each_expert_at_twice_its_index():
    from moefuse_runtime import vlm_helpers

    layer = vlm_layer()
    x = mx.random.normal((2, 3, 1, 1, 128))  # as SwitchGLU expands it
    indices = mx.random.randint(0, 8, (2, 3, 2)).astype(mx.uint32)
    expected = [layer.gate_proj(x, indices), layer.up_proj(x, indices)]
    moefuse_runtime.install(layer, reserve_bytes=0)
    gate, up = vlm_helpers.gate_up_views(layer)
    assert type(gate) is type(layer.gate_up_proj) and gate.weight.shape == up.weight.shape
    got = [gate(x, indices * 2), up(x, indices * 2)]
    assert all(mx.array_equal(a, b).item() for a, b in zip(expected, got, strict=True))


def test_metal_gate_up_kernel_gets_the_views(monkeypatch):
    # On Metal a short block first asks mlx-vlm's one-dispatch gate+up kernel
    # (exact_affine_switch_gate_up), which reads switch.up_proj and gate_proj
    # arrays. Here (no Metal) a stand-in with its contract: the fused layer
    # hands it the views and doubled indices, bitwise what unfused gets.
    from mlx_vlm.models import fast_ops

    seen = []

    def stand_in(switch, x, indices):
        seen.append(type(switch).__name__)
        projected = mx.expand_dims(x, (-2, -3))
        return tuple(
            p(projected, indices, sorted_indices=False).squeeze(-2)
            for p in (switch.up_proj, switch.gate_proj)
        )

    monkeypatch.setattr(fast_ops, "exact_affine_switch_gate_up", stand_in)
    layer = vlm_layer()
    x, indices, weights, shared = call_args(4)
    expected = layer(x, indices, weights, shared)
    moefuse_runtime.install(layer, reserve_bytes=0)
    got = layer(x, indices, weights, shared)
    assert seen == ["SwitchGLU", "_GateUp"]
    assert mx.array_equal(expected, got).item()


FORMATS = [("affine", bits, gs) for bits in (2, 3, 4, 5, 6, 8) for gs in (32, 64, 128)] + [
    ("mxfp4", 4, 32),
    ("mxfp8", 8, 32),
    ("nvfp4", 4, 16),
]


@pytest.mark.parametrize(("mode", "bits", "group_size"), FORMATS)
def test_every_quantization_mode(mode, bits, group_size):
    # mlx-vlm's own QuantizedSwitchLinear in every format: decode, a short
    # block and the sorted path, with its weighted sum and shared experts.
    layer = vlm_layer(quantized=False)
    quantize_model(layer, bits=bits, group_size=group_size, mode=mode)
    mx.eval(layer.parameters())
    calls = [call_args(tokens) for tokens in (1, 4, 40)]
    expected = [layer(*args) for args in calls]
    report = moefuse_runtime.install(layer, reserve_bytes=0)
    assert len(report.fused) == 1, str(report)
    assert layer.gate_up_proj.mode == mode and layer.gate_up_proj.bits == bits
    got = [layer(*args) for args in calls]
    assert all(mx.array_equal(a, b).item() for a, b in zip(expected, got, strict=True))


def test_subclass_forwards_are_fused_bitwise():
    from mlx_vlm.models.deepseek_v41.language import DeepseekV41SwitchGLU
    from mlx_vlm.models.inkling.language import InklingSwitchGLU

    x, indices, weights, _ = call_args(40)
    inkling = vlm_layer(InklingSwitchGLU)
    inkling.gate_scale = mx.linspace(0.5, 1.5, 8)  # its non-trivial-scale forward
    deepseek = vlm_layer(DeepseekV41SwitchGLU, quantized=False)
    deepseek.activation = lambda up, gate, w: vlm.swiglu(gate, up) * w  # its call shape
    expected = [inkling(x, indices), deepseek(x, indices, weights)]
    moefuse_runtime.install(inkling, reserve_bytes=0)
    moefuse_runtime.install(deepseek, reserve_bytes=0)
    assert type(inkling).__name__ == "FusedInklingSwitchGLU"
    got = [inkling(x, indices), deepseek(x, indices, weights)]
    assert all(mx.array_equal(a, b).item() for a, b in zip(expected, got, strict=True))


def test_uninstall_restores_the_class_and_arrays():
    layer = vlm_layer()
    before = {k: v for k, v in layer.parameters()["gate_proj"].items()}
    moefuse_runtime.install(layer, reserve_bytes=0)
    moefuse_runtime.uninstall(layer)
    assert type(layer) is vlm.SwitchGLU
    assert isinstance(layer.gate_proj, vlm.QuantizedSwitchLinear)
    assert all(mx.array_equal(v, layer.gate_proj[k]).item() for k, v in before.items())


def test_headroom_keeps_the_layer_unfused():
    layer = vlm_layer()
    x, indices, weights, shared = call_args(40)
    expected = layer(x, indices, weights, shared)
    report = moefuse_runtime.install(layer, reserve_bytes=1 << 60)
    assert not report.fused and "headroom" in report.layers[0].reason
    assert mx.array_equal(layer(x, indices, weights, shared), expected).item()


def test_cuda_kernels_take_the_plain_forward_only(as_cuda):
    from mlx_vlm.models.inkling.language import InklingSwitchGLU

    plain = vlm_layer(dtype=mx.bfloat16)
    inkling = vlm_layer(InklingSwitchGLU, dtype=mx.bfloat16)
    moefuse_runtime.install(plain, reserve_bytes=0)
    moefuse_runtime.install(inkling, reserve_bytes=0)
    assert kernel_paths(plain)[1].startswith("cuda kernels")
    assert kernel_paths(inkling) == (None, "gather_qmm (InklingSwitchGLU has its own forward)")


def test_cuda_kernel_output_goes_through_combine(as_cuda, monkeypatch):
    # The kernels compute the routed (token, expert) rows; mlx-vlm's forward
    # then weights, sums and adds the shared experts (SwitchGLU._combine).
    layer = vlm_layer()
    x, indices, weights, shared = call_args(4)
    routed = layer(x, indices)
    expected = layer(x, indices, weights, shared)
    moefuse_runtime.install(layer, reserve_bytes=0)

    class Emulated:
        def __call__(self, _layer, _gate_up_proj, _x, _indices):
            return routed

    layer.kernels = Emulated()
    assert mx.array_equal(layer(x, indices, weights, shared), expected).item()
