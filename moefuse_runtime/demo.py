"""The embedded default: a small MoE model built from mlx-lm's own classes.

No download: a Qwen3-MoE architecture (mlx-lm's ``qwen3_moe``) with random
weights, quantized to 4 bits the way ``mlx_lm.convert -q`` does it, so the
demo, the CLI and the tests exercise real code paths on any machine.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step

from .installer import install
from .presets import PRESETS, QUANTIZATION
from .report import FuseReport


def demo_config(preset: str = "tiny", layers: int | None = None) -> dict:
    """A qwen3_moe ``config.json`` dictionary for one of the `PRESETS`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    sizes = dict(PRESETS[preset])
    if layers is not None:
        sizes["num_hidden_layers"] = layers
    return {
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "intermediate_size": 2 * sizes["hidden_size"],
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": sizes["hidden_size"] // 8,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "quantization": dict(QUANTIZATION),
        **sizes,
    }


def build_demo_model(
    preset: str = "tiny",
    seed: int = 0,
    layers: int | None = None,
    dtype: mx.Dtype = mx.float32,
) -> nn.Module:
    """The demo model in memory: random weights, 4-bit, evaluated, in
    inference mode (``eval()``) as mlx-lm's loaders leave a model.

    ``dtype`` is that of the activations, scales and unquantized weights:
    float32 runs everywhere; released checkpoints are bfloat16 (GPU only).
    """
    mx.random.seed(seed)
    config = demo_config(preset, layers)
    family = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = family.Model(family.ModelArgs.from_dict(config))
    model.set_dtype(dtype)
    # Random init is uniform in +-1/sqrt(d); scale the embedding alike so
    # that logits have a spread and greedy decoding is not a constant.
    embed = model.model.embed_tokens
    embed.weight = mx.random.normal(embed.weight.shape).astype(dtype)
    group_size, bits = QUANTIZATION["group_size"], QUANTIZATION["bits"]
    nn.quantize(model, group_size, bits, class_predicate=_quantizable)
    for layer in model.model.layers:  # still lazy: one layer's float weights at a time
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    return model.eval()


def _quantizable(_path: str, module: nn.Module) -> bool:
    return hasattr(module, "to_quantized") and module.weight.shape[-1] % 64 == 0


@dataclass(frozen=True)
class DemoResult:
    report: FuseReport
    unfused_tokens: list[int]
    fused_tokens: list[int]
    unfused_tokens_per_s: float
    fused_tokens_per_s: float

    @property
    def identical(self) -> bool:
        return self.unfused_tokens == self.fused_tokens


def decode_intervals(
    model: nn.Module, prompt: mx.array, steps: int
) -> tuple[list[int], list[float]]:
    """Greedy decode with mlx-lm's own loop: tokens, and the seconds between
    consecutive tokens (timing starts once prefill and the first token are
    done). The median interval is robust to a stall that a whole-run average
    counts in full."""
    tokens, stamps = [], []
    for n, (token, _) in enumerate(generate_step(prompt, model, max_tokens=steps)):
        if n == 0:
            mx.synchronize()
        stamps.append(time.perf_counter())
        tokens.append(int(token))
    return tokens, [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def greedy_tokens(model: nn.Module, prompt: mx.array, steps: int) -> tuple[list[int], float]:
    """Greedy decode with mlx-lm's own loop; tokens and decode tokens/s."""
    tokens, gaps = decode_intervals(model, prompt, steps)
    return tokens, len(gaps) / sum(gaps) if gaps else 0.0


def run_demo(
    preset: str = "tiny",
    steps: int = 64,
    rounds: int = 3,
    log: Callable[[str], None] = lambda _: None,
) -> DemoResult:
    """Build, fuse a copy, decode with both (interleaved rounds), compare."""
    unfused = build_demo_model(preset)
    fused = build_demo_model(preset)  # same seed, same weights, own arrays
    report = install(fused)
    log(str(report))
    prompt = mx.array([1, 2, 3, 4, 5, 6, 7, 8] * 4, dtype=mx.uint32)
    speeds: dict[str, list[float]] = {"unfused": [], "fused": []}
    outputs: dict[str, list[int]] = {}
    for _ in range(rounds):
        for name, model in (("unfused", unfused), ("fused", fused)):
            outputs[name], tokens_per_s = greedy_tokens(model, prompt, steps)
            speeds[name].append(tokens_per_s)
    median = {name: sorted(v)[len(v) // 2] for name, v in speeds.items()}
    return DemoResult(
        report, outputs["unfused"], outputs["fused"], median["unfused"], median["fused"]
    )


CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = """\
Mixture of experts models route every token to a few experts out of many.
Each expert is a gated feed forward network: gate, up and down projections.
The gate and up projections read the same input, so they can be one matmul.
Servers load a model, shard it over machines, and answer chat requests.
The quick brown fox jumps over the lazy dog while the server streams tokens.
Hello, how are you today? I am a small demo model with random weights.
"""


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained here on a few lines of text.

    Byte-level, so any text round-trips; its vocabulary (at most
    ``vocab_size``) fits the model's embedding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines() * 4, trainer)
    return tokenizer


def _predict_only(head: nn.Module, token_ids: list[int]) -> None:
    """Zero the output projection's rows of every other token id.

    The presets keep their models' vocabularies (151,936 for Qwen3) for the
    output projection's cost, while the tokenizer writes a few hundred
    tokens: random weights would mostly predict ids it cannot write, which
    `mlx_vlm.server` streams as no text at all, or an end-of-sequence id
    that ends a request early. Their logits become 0, below the maximum of
    the rest; the projection keeps its shape and cost.
    """
    keep = mx.zeros((head.weight.shape[0], 1))
    keep[mx.array(token_ids)] = 1
    if isinstance(head, nn.QuantizedLinear):
        head.scales = head.scales * keep.astype(head.scales.dtype)
        if head.biases is not None:
            head.biases = head.biases * keep.astype(head.biases.dtype)
    else:
        head.weight = head.weight * keep.astype(head.weight.dtype)
    mx.eval(head.parameters())


def write_demo_model(
    path: str | os.PathLike,
    preset: str = "tiny",
    layers: int | None = None,
    dtype: mx.Dtype = mx.float32,
) -> Path:
    """A real mlx-lm model directory: config, 4-bit safetensors, tokenizer.

    Loadable by ``mlx_lm.load`` and servable by ``mlx_lm.server`` offline.
    ``layers`` and ``dtype`` as in `build_demo_model`.
    """
    from mlx_lm.utils import save_model

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = demo_config(preset, layers)
    tokenizer = build_tokenizer(config["vocab_size"])
    eos_id = tokenizer.token_to_id("<|im_end|>")
    config["eos_token_id"] = eos_id
    model = build_demo_model(preset, layers=layers, dtype=dtype)
    writable = [i for token, i in tokenizer.get_vocab().items() if token not in SPECIAL_TOKENS]
    _predict_only(model.lm_head, writable)
    save_model(folder, model)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save(str(folder / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": config["max_position_embeddings"],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_id}))
    return folder
