"""Model-level parity for every mlx-lm family that builds a SwitchGLU.

For each family (discovered, see families.py): a tiny model, float32 and
4-bit, a batch-2 prompt long enough for the sorted path, then decode steps
with a KV cache (the unsorted path). Every logit must be bitwise equal.
"""

import families
import mlx.core as mx
import pytest
from helpers import install_keeps_logits, quantize_model

import moefuse_runtime

FAMILIES = families.discover()


def test_discovery_finds_the_families_we_know():
    assert {"qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "step3p5"} <= set(FAMILIES)
    assert len(FAMILIES) >= 30


@pytest.mark.parametrize("quantized", [False, True], ids=["float32", "4bit"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_parity(family, quantized):
    report = install_keeps_logits(family, quantized)
    assert report.total >= 1 and len(report.fused) == report.total, str(report)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_fuses_and_unfuses(family):
    """Runs on every backend, Metal-only forwards included: the layers."""
    model = quantize_model(families.build(family))
    before = dict(_switch_arrays(model))
    assert moefuse_runtime.install(model, reserve_bytes=0).fused
    assert all(
        moefuse_runtime.is_fused(layer) for _, layer in moefuse_runtime.find_switch_glus(model)
    )
    assert moefuse_runtime.uninstall(model).unfused
    after = dict(_switch_arrays(model))
    assert before.keys() == after.keys()
    assert all(mx.array_equal(before[k], after[k]).item() for k in before)


def _switch_arrays(model):
    from mlx.utils import tree_flatten

    for path, layer in moefuse_runtime.find_switch_glus(model):
        for key, value in tree_flatten(layer.parameters()):
            yield f"{path}.{key}", value
