"""Model-level parity for every mlx-lm family that builds a SwitchGLU.

For each family (discovered, see families.py): a tiny model, float32 and
4-bit, a batch-2 prompt long enough for the sorted path, then decode steps
with a KV cache (the unsorted path). Every logit must be bitwise equal.
"""

import families
import mlx.core as mx
import pytest
from helpers import quantize_model
from mlx_lm.models.cache import make_prompt_cache

import moefuse_runtime

FAMILIES = families.discover()
PROMPT_TOKENS = 40  # x batch 2 x top-k 2 = 160 token-expert pairs: sorted path
DECODE_STEPS = 3  # batch 2 x top-k 2 = 4 pairs: unsorted path
METAL_ONLY = "No Metal back-end"


def test_discovery_finds_the_families_we_know():
    assert {"qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "step3p5"} <= set(FAMILIES)
    assert len(FAMILIES) >= 30


def logits_sequence(model, prompt):
    """Logits of the prompt and of DECODE_STEPS greedy steps with a cache."""
    cache = make_prompt_cache(model)
    outputs = [model(prompt, cache=cache)]
    for _ in range(DECODE_STEPS):
        token = mx.argmax(outputs[-1][:, -1:, :], axis=-1)
        outputs.append(model(token, cache=cache))
    mx.eval(outputs)
    return outputs


@pytest.mark.parametrize("quantized", [False, True], ids=["float32", "4bit"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_parity(family, quantized):
    mx.random.seed(0)
    model = families.build(family)
    if quantized:
        quantize_model(model)
    mx.eval(model.parameters())
    prompt = mx.random.randint(0, 128, (2, PROMPT_TOKENS))
    try:
        reference = logits_sequence(model, prompt)
    except RuntimeError as error:
        if METAL_ONLY in str(error):
            pytest.skip(f"{family}'s forward uses a Metal-only kernel of mlx-lm")
        raise

    report = moefuse_runtime.install(model, reserve_bytes=0)
    assert report.total >= 1 and len(report.fused) == report.total, str(report)

    fused = logits_sequence(model, prompt)
    for step, (a, b) in enumerate(zip(reference, fused, strict=True)):
        assert mx.array_equal(a, b).item(), f"{family} step {step} differs"


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
