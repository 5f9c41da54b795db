"""Dense gated MLPs (shared experts, dense layers, dense models), install(dense=True)."""

import copy

import families
import mlx.core as mx
import mlx.nn as nn
import pytest
from helpers import build_family, install_keeps_logits, logits_sequence, quantize_model
from mlx.utils import tree_flatten

import moefuse_runtime
from moefuse_runtime.dense import Half
from moefuse_runtime.memory import backend

MOE_FAMILIES = families.discover()
DENSE_FAMILIES = families.discover_dense()


@pytest.mark.parametrize("quantized", [False, True], ids=["float32", "4bit"])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_family_with_dense(family, quantized):
    report = install_keeps_logits(family, quantized, dense=True)
    assert len([p for p in report.fused]) >= report.total  # every SwitchGLU, plus dense


@pytest.mark.parametrize("quantized", [False, True], ids=["float32", "4bit"])
@pytest.mark.parametrize("family", DENSE_FAMILIES)
def test_dense_family(family, quantized):
    if family in families.DENSE_NOT_BUILT:
        pytest.skip(f"not run: {families.DENSE_NOT_BUILT[family]} (test_bitnet_is_left_alone)")
    report = install_keeps_logits(family, quantized, dense=True)
    assert report.dense_total >= 1
    if not quantized and backend() == "cuda":  # float dense pairs stay unfused there
        assert all("not bitwise stable" in why for why in report.skipped.values()), str(report)
        assert len(report.skipped) == report.dense_total
        return
    assert len(report.fused) == report.dense_total + report.total, str(report)
    if quantized:
        assert all("bit" in r.kind for r in report.layers), str(report)


def test_discovery_of_dense_families():
    assert {"llama", "qwen2", "qwen3", "gemma", "olmo2"} <= set(DENSE_FAMILIES)
    assert set(families.DENSE_NOT_BUILT) <= set(DENSE_FAMILIES)  # the table is not stale
    assert set(families.DENSE_OVERRIDES) <= set(DENSE_FAMILIES)
    assert set(families.DENSE_NOT_BUILT) == {"bitnet"}  # every other family is run
    assert len(DENSE_FAMILIES) >= 40


def test_bitnet_is_left_alone():
    # Its MLP calls gate_proj/up_proj on one input, but they are BitLinear
    # (ternary, Metal kernel): not a dense projection type, so not a candidate.
    model = build_family("bitnet", quantized=False)
    report = moefuse_runtime.install(model, reserve_bytes=0, dense=True)
    assert report.dense_total == 0 and report.total == 0
    assert type(model.model.layers[0].mlp.gate_proj).__name__ == "BitLinear"


def test_shared_expert_and_dense_layer_are_fused():
    model = build_family("deepseek_v3", quantized=True)
    report = moefuse_runtime.install(model, reserve_bytes=0, dense=True)
    dense = {r.path for r in report.layers if r.layer_type == "dense MLP"}
    assert "model.layers.0.mlp" in dense and "model.layers.1.mlp.shared_experts" in dense
    assert "fused 2/2 SwitchGLU layers and 3/3 dense MLPs" in report.summary()  # 1 dense + 2 shared
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.gate_proj, Half) and "gate_up_proj" in mlp
    assert "gate_proj" not in mlp.parameters()


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(8, 16), nn.Linear(8, 16)
        self.down_proj = nn.Linear(16, 8)

    def __call__(self, x):
        y = x * 2
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(y))


def test_module_whose_forward_differs_is_left_alone():
    module = TwoInputs()
    report = moefuse_runtime.install(module, reserve_bytes=0, dense=True)
    assert report.skipped == {
        "": "forward of TwoInputs does not call gate_proj and up_proj with the same arguments"
    }
    assert isinstance(module.gate_proj, nn.Linear)


def test_dense_is_off_by_default():
    model = build_family("qwen3_moe", quantized=False)
    report = moefuse_runtime.install(model, reserve_bytes=0)
    assert report.dense_total == 0 and isinstance(model.model.layers[0].mlp.gate_proj, nn.Linear)


def test_uninstall_deepcopy_save_load_quantize(tmp_path):
    model = build_family("qwen3_moe", quantized=False)
    before = dict(tree_flatten(model.parameters()))
    reference = logits_sequence(model)
    moefuse_runtime.install(model, reserve_bytes=0, dense=True)
    keys = {k for k, _ in tree_flatten(model.parameters())}
    assert "model.layers.0.mlp.gate_up_proj.weight" in keys
    assert not any(k.startswith("model.layers.0.mlp.gate_proj") for k in keys)

    clone = copy.deepcopy(model)
    assert all(
        mx.array_equal(a, b).item() for a, b in zip(logits_sequence(clone), reference, strict=True)
    )
    path = str(tmp_path / "w.safetensors")
    clone.save_weights(path)
    clone.load_weights(path)
    assert all(
        mx.array_equal(a, b).item() for a, b in zip(logits_sequence(clone), reference, strict=True)
    )

    quantize_first = quantize_model(build_family("qwen3_moe", quantized=False))
    moefuse_runtime.install(quantize_first, reserve_bytes=0, dense=True)
    quantize_model(clone)
    assert all(
        mx.array_equal(a, b).item()
        for a, b in zip(logits_sequence(clone), logits_sequence(quantize_first), strict=True)
    )

    report = moefuse_runtime.uninstall(model)
    assert any(r.layer_type == "dense MLP" for r in report.layers)
    after = dict(tree_flatten(model.parameters()))
    assert before.keys() == after.keys()
    assert all(mx.array_equal(before[k], after[k]).item() for k in before)
    assert isinstance(model.model.layers[0].mlp.gate_proj, nn.Linear)


@pytest.mark.parametrize("quantize", [False, True])
def test_dense_mlp_with_bias(quantize):
    from types import SimpleNamespace

    from mlx_lm.models.llama import MLP

    mx.random.seed(3)
    mlp = MLP(SimpleNamespace(hidden_size=128, intermediate_size=256, mlp_bias=True))
    for name in ("gate_proj", "up_proj", "down_proj"):
        mlp[name].bias = mx.random.normal(mlp[name].bias.shape)
    if quantize:
        nn.quantize(mlp, 64, 4)
    x, other = mx.random.normal((2, 5, 128)), mx.random.normal((1, 3, 128))
    expected, expected_other = mlp(x), mlp(other)
    assert moefuse_runtime.install(mlp, reserve_bytes=0, dense=True).fused == ("",)
    assert "bias" in mlp.gate_up_proj and mlp.gate_up_proj.bias.shape == (512,)
    assert mx.array_equal(mlp(x), expected).item()
    assert mx.array_equal(mlp(other), expected_other).item()


def test_half_called_alone_or_on_another_input_is_still_exact():
    """The views share one matmul only for the same input object."""
    from types import SimpleNamespace

    from mlx_lm.models.llama import MLP

    mlp = MLP(SimpleNamespace(hidden_size=64, intermediate_size=128))
    x, y = mx.random.normal((1, 4, 64)), mx.random.normal((1, 4, 64))
    gate_x, up_y = mlp.gate_proj(x), mlp.up_proj(y)
    moefuse_runtime.install(mlp, reserve_bytes=0, dense=True)
    assert mx.array_equal(mlp.gate_proj(x), gate_x).item()
    assert mx.array_equal(mlp.up_proj(y), up_y).item()  # not x's pending half
    assert mx.array_equal(mlp.up_proj(y), up_y).item()


def test_float_dense_stays_unfused_on_cuda(monkeypatch):
    """cuBLAS summed step3p5's float32 MLP differently once stacked (H100)."""
    from types import SimpleNamespace

    from mlx_lm.models.llama import MLP

    from moefuse_runtime import dense

    monkeypatch.setattr(dense, "backend", lambda: "cuda")
    mlp = MLP(SimpleNamespace(hidden_size=64, intermediate_size=128))
    assert (
        "not bitwise stable"
        in moefuse_runtime.install(mlp, reserve_bytes=0, dense=True).skipped[""]
    )
    nn.quantize(mlp, 64, 4)
    assert moefuse_runtime.install(mlp, reserve_bytes=0, dense=True).fused == ("",)
