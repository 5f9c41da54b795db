"""Tiny configurations of every mlx-lm model family that builds a SwitchGLU.

The families are discovered from ``mlx_lm.models`` (any module whose source
names SwitchGLU); each gets one shared tiny config, which
``ModelArgs.from_dict`` trims to the fields the family knows, plus the few
family-specific fields (per-layer lists, nested text configs) listed below.
A family that appears in a new mlx-lm and cannot be built from this table
fails `test_every_family_builds`, so the table cannot silently go stale.
"""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
import pkgutil
import re

import mlx.nn as nn
import mlx_lm.models

LAYERS = 3
# Widths are multiples of 64 so that, split over 2 ranks by model.shard(),
# every shard still divides into quantization groups of 32.
TINY = {
    "hidden_size": 64,
    "dim": 64,
    "intermediate_size": 128,
    "ffn_hidden_size": 128,
    "moe_intermediate_size": 64,
    "expert_ffn_hidden_size": 64,
    "shared_expert_intermediate_size": 64,
    "shared_intermediate_size": 64,
    "num_hidden_layers": LAYERS,
    "num_layers": LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_attention_groups": 2,
    "head_dim": 16,
    "vocab_size": 128,
    "rms_norm_eps": 1e-5,
    "norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    "model_max_length": 512,
    "num_experts": 8,
    "n_routed_experts": 8,
    "num_local_experts": 8,
    "moe_num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "moe_k": 2,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "num_shared_expert": 1,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [0],
    "first_k_dense_replace": 1,
    "num_dense_layers": 1,
    "norm_topk_prob": True,
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 1.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "use_bias": False,
    "sliding_window": 8,
    "sliding_window_size": 8,
    "rope_scaling": None,
}


def _layers(pattern: list) -> list:
    return (pattern * LAYERS)[:LAYERS]


_YARN = {
    "beta_fast": 32,
    "beta_slow": 1,
    "factor": 40,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 4096,
    "type": "yarn",
}

_KDA = {"num_heads": 4, "head_dim": 16, "kda_layers": [1], "short_conv_kernel_size": 4}

_LINEAR_ATTENTION = {
    "linear_num_value_heads": 4,
    "linear_num_key_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 3,
}

OVERRIDES: dict[str, dict] = {
    "afmoe": {"layer_types": _layers(["sliding_attention", "full_attention"])},
    "exaone_moe": {
        "layer_types": _layers(["sliding_attention", "full_attention"]),
        "is_moe_layer": [False] + [True] * (LAYERS - 1),
    },
    "granitemoehybrid": {"layer_types": _layers(["attention"])},
    "mimo_v2_flash": {
        "hybrid_layer_pattern": _layers([0, 1]),
        "moe_layer_freq": [0] + [1] * (LAYERS - 1),
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "routed_scaling_factor": None,
        "n_group": 2,
        "swa_num_attention_heads": 4,
        "swa_num_key_value_heads": 2,
        "v_head_dim": 16,
        "swa_head_dim": 16,
        "swa_v_head_dim": 16,
        "partial_rotary_factor": 0.5,
    },
    "deepseek_v2": {"rope_scaling": _YARN},
    "mistral4": {"rope_parameters": {**_YARN, "llama_4_scaling_beta": 0.1, "rope_theta": 10000.0}},
    "mellum": {
        "layer_types": _layers(["sliding_attention", "full_attention"]),
        "rope_parameters": {
            "sliding_attention": {"rope_theta": 10000.0},
            "full_attention": {"rope_theta": 10000.0},
        },
    },
    "longcat_flash": {
        "attention_method": "MLA",
        "zero_expert_type": "identity",
        "zero_expert_num": 2,
        "mla_scale_q_lora": True,
        "mla_scale_kv_lora": True,
    },
    # Pipelines split it by layer groups: two groups of two for two ranks.
    "bailing_hybrid": {"num_hidden_layers": 4, "layer_group_size": 2},
    "longcat_flash_ngram": {
        "attention_method": "MLA",
        "zero_expert_type": "identity",
        "zero_expert_num": 2,
        "mla_scale_q_lora": True,
        "mla_scale_kv_lora": True,
        "ngram_vocab_size_ratio": 2,
    },
    "glm_moe_dsa": {
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "rope_parameters": {"rope_theta": 10000.0},
        "index_head_dim": 16,
        "index_n_heads": 2,
        "index_topk": 8,
        "moe_layer_freq": 1,
    },
    "qwen3_5": {"full_attention_interval": 2, **_LINEAR_ATTENTION},
    "qwen3_5_moe": {"full_attention_interval": 2, **_LINEAR_ATTENTION},
    "hunyuan": {
        "rope_scaling": {"alpha": 1000.0, "factor": 1.0, "type": "dynamic"},
        "use_mixed_mlp_moe": True,
        "use_cla": True,
        "cla_share_factor": 2,
    },
    "jamba": {
        "attn_layer_offset": 1,
        "attn_layer_period": 2,
        "expert_layer_offset": 1,
        "expert_layer_period": 2,
        "mamba_d_conv": 4,
        "mamba_d_state": 16,
        "mamba_expand": 2,
    },
    "kimi_linear": {
        "linear_attn_config": _KDA,
    },
    "lfm2_moe": {"full_attn_idxs": [0, 2], "conv_bias": True, "conv_L_cache": 3},
    "qwen3_next": {"partial_rotary_factor": 0.5, "full_attention_interval": 2, **_LINEAR_ATTENTION},
    "gemma4_text": {
        "enable_moe_block": True,
        "top_k_experts": 2,
        "sliding_window_pattern": 2,
        "hidden_size_per_layer_input": 0,
        "num_kv_shared_layers": 0,
        "global_head_dim": 16,
        "num_global_key_value_heads": 2,
    },
    # Families whose ModelArgs nest the language model's args in text_config.
    "kimi_k3": {"num_experts_per_token": 2, "linear_attn_config": _KDA},
    "llama4": {
        "attention_chunk_size": 8,
        "interleave_moe_layer_step": 2,
        "intermediate_size_mlp": 128,
        "use_qk_norm": True,
        "num_experts_per_tok": 1,
        "num_hidden_layers": 4,  # its forward reads the cache of layer 3
    },
    "minimax_m3_vl": {"dense_intermediate_size": 128, "moe_layer_freq": [0] + [1] * (LAYERS - 1)},
    "muse_spark": {
        "post_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 10000.0},
        "layer_rope_theta": [0.0] * LAYERS,  # rope has a Metal-only kernel
        "layer_types": _layers(["full_attention"]),
        "final_logit_softcapping": 30.0,
        "output_multiplier": 1.0,
        "moe_hidden_size": 64,
        "num_shared_experts": 0,
    },
}


TEXT_ARGS_NAMES = ("TextArgs", "TextConfig", "TextModelArgs")


def discover() -> list[str]:
    """mlx_lm.models modules that build a SwitchGLU, directly or by importing
    from a module that does (kimi_k25 reuses deepseek_v3, and so on)."""
    folder = pathlib.Path(mlx_lm.models.__path__[0])
    sources = {
        info.name: (folder / f"{info.name}.py").read_text()
        for info in pkgutil.iter_modules([str(folder)])
        if info.name != "switch_layers"
    }
    found = {name for name, source in sources.items() if "SwitchGLU(" in source}
    while importers := {
        name
        for name, source in sources.items()
        if name not in found and set(re.findall(r"from \.(\w+) import", source)) & found
    }:
        found |= importers
    return sorted(found)


# Dense-only families (see discover_dense) whose tiny build needs more than the
# shared TINY values.
DENSE_OVERRIDES: dict[str, dict] = {
    "afm7": {
        "hidden_dim": 64,
        "num_layers": LAYERS,
        "num_kv_reuse_layers": 1,
        "num_heads": 4,
        "num_kv_heads": 2,
        "hidden_dim_scale_factor": 2.0,
    },
    "baichuan_m1": {"sliding_window_layers": [0], "conv_window": 2},
    "cohere2": {"sliding_window_pattern": 2},
    "exaone4": {"sliding_window_pattern": "LLG"},
    "gear": {"layer_types": _layers(["full_attention"])},
    "gemma3_text": {"sliding_window_pattern": 2},
    "gemma3n": {
        "layer_types": _layers(["sliding_attention", "full_attention"]),
        "num_kv_shared_layers": 1,
        "vocab_size_per_layer_input": 128,
        "rope_local_base_freq": 10000.0,
        "final_logit_softcapping": 30.0,
        "activation_sparsity_pattern": [0.0] * LAYERS,
        "hidden_size_per_layer_input": 16,
        "altup_num_inputs": 2,
        "altup_coef_clip": 120.0,
        "altup_correct_scale": True,
        "altup_active_idx": 0,
        "laurel_rank": 16,
    },
    "lille-130m": {
        "block_size": 512,
        "layer_norm_eps": 1e-5,
        "n_embd": 64,
        "n_head": 4,
        "n_kv_heads": 2,
        "n_layer": LAYERS,
    },
    "llama4_text": {
        "intermediate_size_mlp": 128,
        "no_rope_layers": _layers([1, 1, 0]),
        "use_qk_norm": True,
    },
    "minicpm3": {
        "dim_model_base": 64,
        "scale_depth": 1.4,
        "scale_emb": 12,
        "rope_scaling": {"original_max_position_embeddings": 512},
    },
    "ministral3": {
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 128,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "llama_4_scaling_beta": 0.1,
        }
    },
    "nemotron-nas": {
        "block_configs": [
            {"attention": {"n_heads_in_group": 2}, "ffn": {"ffn_mult": 1.5}},
            {"attention": {"no_op": True}, "ffn": {"ffn_mult": 1.5}},
            {"attention": {"n_heads_in_group": 2}, "ffn": {"replace_with_linear": True}},
        ],
    },
    "olmo3": {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
    "plamo": {"n_shared_head": 2},
    "recurrent_gemma": {
        "block_types": ["recurrent", "attention", "recurrent"],
        "conv1d_width": 4,
        "logits_soft_cap": 30.0,
        "attention_window_size": 8,
    },
    "spark2_5": {
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "rope_parameters": {
            "sliding_attention": {"rope_theta": 10000.0},
            "full_attention": {"rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        },
    },
}
OVERRIDES.update(DENSE_OVERRIDES)

# Dense families not run here, and why.
DENSE_NOT_BUILT = {
    "bitnet": "its projections are BitLinear (not fusable) and its forward is a Metal kernel",
}


def discover_dense() -> list[str]:
    """mlx_lm.models modules without SwitchGLU whose forward calls gate_proj and up_proj."""
    folder = pathlib.Path(mlx_lm.models.__path__[0])
    moe = set(discover())
    return sorted(
        info.name
        for info in pkgutil.iter_modules([str(folder)])
        if info.name not in moe
        and info.name != "switch_layers"
        and "self.gate_proj(" in (text := (folder / f"{info.name}.py").read_text())
        and "self.up_proj(" in text
    )


def config_for(family: str) -> dict:
    """The tiny config; nested under text_config where the family wants it."""
    module = importlib.import_module(f"mlx_lm.models.{family}")
    config = _filled(module.ModelArgs, {"model_type": family, **TINY, **OVERRIDES.get(family, {})})
    if "text_config" in {f.name for f in dataclasses.fields(module.ModelArgs)}:
        text_args = next((getattr(module, n) for n in TEXT_ARGS_NAMES if hasattr(module, n)), None)
        text = dict(config)
        config["text_config"] = _filled(text_args, text) if text_args else text
    return config


def _filled(args_class: type, config: dict) -> dict:
    for field in dataclasses.fields(args_class):
        if field.name in config:
            continue
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            config[field.name] = _filler(field)
    return config


def _filler(field: dataclasses.Field) -> object:
    if field.name == "text_config":
        return {}
    kind = (
        field.type
        if isinstance(field.type, str)
        else getattr(field.type, "__name__", str(field.type))
    )
    if "int" in kind:
        return 2
    if "float" in kind:
        return 1.0
    if "bool" in kind:
        return False
    raise KeyError(f"no tiny value for required field {field.name}: {field.type}")


def build(family: str) -> nn.Module:
    module = importlib.import_module(f"mlx_lm.models.{family}")
    args = module.ModelArgs.from_dict(config_for(family))
    return module.Model(args)
