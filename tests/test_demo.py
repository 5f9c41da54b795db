"""The main job (scripts/demo) on the embedded default model."""

import subprocess
import sys
from pathlib import Path

import mlx.core as mx

from moefuse_runtime.demo import build_demo_model, demo_config, run_demo

ROOT = Path(__file__).resolve().parents[1]


def test_demo_config_is_a_quantized_qwen3_moe():
    config = demo_config("tiny")
    assert config["model_type"] == "qwen3_moe" and config["quantization"]["bits"] == 4


def test_run_demo_tokens_identical():
    result = run_demo("tiny", steps=8, rounds=1)
    assert len(result.report.fused) == result.report.total == 4
    assert result.identical and len(result.fused_tokens) == 8
    assert len(set(result.fused_tokens)) > 1  # greedy output is not a constant
    assert result.fused_tokens_per_s > 0 and result.unfused_tokens_per_s > 0


def test_demo_models_are_reproducible():
    a, b = build_demo_model("tiny"), build_demo_model("tiny")
    weight = a.model.layers[0].mlp.switch_mlp.gate_proj.weight
    assert (weight == b.model.layers[0].mlp.switch_mlp.gate_proj.weight).all().item()


def test_demo_script():
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo"), "--steps", "8", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "fused 4/4 SwitchGLU layers" in out.stdout
    assert "identical: True" in out.stdout


def test_a_written_model_predicts_only_tokens_its_tokenizer_writes(demo_model):
    # a server streams text per token: random weights over the preset's whole
    # vocabulary would mostly predict ids the small tokenizer cannot write
    # (mlx_vlm.server then streams nothing) or end a request at <|im_end|>
    from mlx_lm import load

    from moefuse_runtime.demo import SPECIAL_TOKENS

    model, tokenizer = load(str(demo_model))
    vocab = tokenizer.get_vocab()
    writable = {i for token, i in vocab.items() if token not in SPECIAL_TOKENS}
    assert model.args.vocab_size > len(vocab)  # ids past the tokenizer exist
    prompt = tokenizer.encode("Servers load a model and answer chat requests with experts.")
    logits = model(mx.array([prompt]))[0]  # every position's prediction
    others = mx.array(sorted(set(range(model.args.vocab_size)) - writable))
    assert (logits[:, others] == 0).all().item()
    predicted = mx.argmax(logits, axis=-1).tolist()
    assert set(predicted) <= writable and len(set(predicted)) > 1
