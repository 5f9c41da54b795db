"""Model shapes of the demo and the benchmarks: data only, so that the CLI
reads its choices without importing MLX."""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # Qwen3-30B-A3B's real dimensions (random weights), for benchmarks.
    "qwen3-30b-a3b": {
        "hidden_size": 2048,
        "num_hidden_layers": 48,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "vocab_size": 151936,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
    },
    # DeepSeek-V2-Lite's dimensions on mlx-lm's deepseek_v3 classes: a MoE
    # model with shared experts and a dense first layer, for dense fusion.
    "deepseek-v2-lite": {
        "model_type": "deepseek_v3",
        "hidden_size": 2048,
        "intermediate_size": 10944,
        "moe_intermediate_size": 1408,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "first_k_dense_replace": 1,
        "kv_lora_rank": 512,
        "q_lora_rank": 1536,
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 128,
        "v_head_dim": 128,
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 1.0,
        "vocab_size": 102400,
    },
    "tiny": {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 128,
        "vocab_size": 512,
    },
    "small": {
        "hidden_size": 1024,
        "num_hidden_layers": 8,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 384,
        "vocab_size": 2048,
    },
}
QUANTIZATION = {"group_size": 64, "bits": 4}


# (hidden, experts, top-k, expert width) of public MoE models.
LAYER_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "qwen3-30b-a3b": (2048, 128, 8, 768),
    "mixtral-8x7b": (4096, 8, 2, 14336),
    "gpt-oss-120b": (2880, 128, 4, 2880),
    "deepseek-v3-scaled": (7168, 64, 8, 2048),  # 256 experts scaled to 64 to fit
}
TOKENS = (1, 4, 16, 128, 512)

# (hidden, intermediate) of dense gated MLPs: a dense model's, and shared experts.
DENSE_SHAPES: dict[str, tuple[int, int]] = {
    "llama3-8b-mlp": (4096, 14336),
    "deepseek-v3-shared-expert": (7168, 2048),
    "deepseek-v2-lite-shared": (2048, 2816),
}
