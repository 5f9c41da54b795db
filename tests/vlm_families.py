"""Tiny language models of every mlx-vlm family that builds a SwitchGLU.

mlx-vlm has its own ``mlx_vlm.models.switch_layers.SwitchGLU`` (not mlx-lm's)
and its own copies of the text families. The families are discovered from
``mlx_vlm.models`` (any package whose source names SwitchGLU); each builds
its ``LanguageModel`` from tests/families.py's shared TINY config plus the
overrides below (some with their own vision, thinker or host config).
Families with no SwitchGLU to fuse are listed in `NOT_BUILT` with the
reason, families whose forward cannot run here in `LAYERS_ONLY` (their
SwitchGLUs are still built and compared), and a test checks that every
discovered family is built or listed, so the table cannot silently go stale.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib

import mlx.nn as nn
from families import _LINEAR_ATTENTION, OVERRIDES, TINY, _layers

_SCALED = {
    "logits_scaling": 1.0,
    "attention_multiplier": 1.0,
    "embedding_multiplier": 1.0,
    "residual_multiplier": 1.0,
}

VLM_OVERRIDES: dict[str, dict] = {
    "bailing_moe_linear": {"num_hidden_layers": 4, "layer_group_size": 2, "group_norm_size": 1},
    # o_groups must divide the heads; small hyper-connection, output-LoRA and
    # indexer sizes; the first layer routes its experts by token hash
    "deepseek_v4": {
        "o_groups": 2,
        "o_lora_rank": 16,
        "hc_mult": 2,
        "hc_sinkhorn_iters": 3,
        "index_n_heads": 2,
        "index_head_dim": 16,
        "index_topk": 4,
        "index_block": 4,
        "index_keep": 2,
        "num_hash_layers": 1,
        "head_dim": 64,  # 4-bit, sharded: wo_a's rows per output group split in 2
    },
    # as deepseek_v4, without the engram tables (hundreds of millions of rows);
    # widths that its fp8 fake-quantization's blocks of 32 and 64 divide
    "deepseek_v41": {
        "o_groups": 2,
        "o_lora_rank": 32,
        "hc_mult": 2,
        "hc_sinkhorn_iters": 3,
        "index_n_heads": 2,
        "index_head_dim": 32,
        "index_topk": 4,
        "engram_layer_ids": [],
        "head_dim": 64,
    },
    # MoE from layer 1 on, text and multimodal expert sets (text prompts route
    # through the text set; the multimodal one is fused and must not break)
    "ernie4_5_moe_vl": {
        "moe_layer_start_index": 1,
        "moe_layer_end_index": 2,
        "moe_num_experts": [8, 8],
        "moe_intermediate_size": [64, 64],
        "moe_k": 2,
        "moe_num_shared_experts": 1,
        "mrope_section": [3, 3, 2],  # 8 rotary pairs of head dim 16 over (h, w, t)
        "freq_allocation": 2,
    },
    "gemma4": OVERRIDES["gemma4_text"],  # the unified model's text config is gemma4_text's
    "glm4_moe": {"use_qk_norm": False, "partial_rotary_factor": 0.5},
    "glm4v_moe": {  # rotary dim 8: sections of 4 pairs over (time, height, width)
        "use_qk_norm": False,
        "partial_rotary_factor": 0.5,
        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1]},
    },
    # NoPE sparse attention, as many key/value heads as query heads (its checks)
    "glm5_next": {
        "num_key_value_heads": TINY["num_attention_heads"],
        "qk_rope_head_dim": 0,
        "mla_use_nope": True,
    },
    "granitemoe": _SCALED,
    "granitemoehybrid": _SCALED,
    "hunyuan": {"use_qk_norm": True},
    "kolibri1": {"layer_types": _layers(["full_attention"])},
    # its sparse indexer on (keeps the top 4 keys), so prompts past 4 tokens use it
    "longcat_flash_sparse": {"index_n_heads": 2, "index_head_dim": 16, "index_topk": 4},
    "mimo_v2_flash": {
        "add_swa_attention_sink_bias": False,
        "add_full_attention_sink_bias": False,
        "layernorm_epsilon": 1e-5,
        "swa_rope_theta": 10000.0,
    },
    "minimax": {"rotary_dim": 16},
    # MoE from layer 1 on, one layer with a clamped SwiGLU (its own activation)
    "step3p7": {
        "moe_layers_enum": [1, 2],
        "moe_top_k": 2,
        "share_expert_dim": 64,
        "num_attention_groups": 2,
        "swiglu_limits": [0, 0, 7.0],
    },
    "qwen3_5_moe_text": {"full_attention_interval": 2, **_LINEAR_ATTENTION},
}

VISION_CONFIGS = {
    "ernie4_5_moe_vl": {"depth": 1, "spatial_merge_size": 2},
    "glm4v_moe": {
        "depth": 1,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 14,
    },
}
"""Vision configs of families whose language model reads one (the spatial
merge size, for rotary position ids); the vision tower is not built."""

NOT_BUILT = {
    # Packed or already fused by mlx-vlm itself: no SwitchGLU at run time.
    "hy_v4": "its experts are mlx-vlm's own FusedSwitchGLU (gate and up already stacked)",
    "laguna": "its experts are LagunaPackedSwitchGLU (gate and up already stacked)",
    # Its MoE branch reads num_experts, a field neither lfm2's ModelConfig nor
    # lfm2_vl's TextConfig has (from_dict drops it): no config builds one.
    "lfm2": "no mlx-vlm config reaches its SwitchGLU (num_experts is not a config field)",
}

LAYERS_ONLY = {
    "muse_spark": "its forward runs seven mlx-vlm kernels that exist only on Metal (routing, "
    "norms, the expert combine); its SwitchGLUs (PreciseSwiGLU, a post-expert norm attached) "
    "are built and compared layer by layer",
    "ming_image": "an image generator: its SwitchGLUs are in the text encoder's BailingMoeV2 "
    "backbone (MingMLLM: hidden states, no cache, no logits), built from bailing_moe's config",
}
"""Families built, but whose forward cannot run here: their SwitchGLUs are
tested as layers (test_vlm.py: test_layers_only_family_fuses_bitwise)."""


def discover() -> list[str]:
    """mlx_vlm.models packages whose source names SwitchGLU."""
    import mlx_vlm.models

    root = pathlib.Path(mlx_vlm.models.__path__[0])
    return sorted(
        folder.name
        for folder in root.iterdir()
        if folder.is_dir() and any("SwitchGLU" in f.read_text() for f in folder.glob("*.py"))
    )


def buildable() -> list[str]:
    return [family for family in discover() if family not in NOT_BUILT | LAYERS_ONLY]


THINKER_CONFIGS = {
    "qwen3_omni_moe": lambda package, text: package.config.ThinkerConfig.from_dict(
        {"text_config": text}
    ),
}
"""Omni models: the language model takes the thinker's config (vision and
audio left at their defaults: only the vision merge size and token ids are
read, for rotary position ids), not the top-level thinker/talker config."""


HOSTS = {"mistral4": "mistral3"}
"""Packages with no model of their own: mistral4's Mistral4Model is built by
mistral3's LanguageModel for a text config of model_type "mistral4"."""


def _ming_text_backbone() -> nn.Module:
    from mlx_vlm.models.bailing_moe.config import ModelConfig
    from mlx_vlm.models.ming_image.text_encoder import MingMLLM

    config = {**TINY, "model_type": "bailing_moe", **OVERRIDES.get("bailing_moe", {})}
    return MingMLLM(ModelConfig.from_dict(config))


BUILDERS = {"ming_image": _ming_text_backbone}
"""Families whose SwitchGLUs live outside a LanguageModel."""


def _modules(family: str):
    """The family's package and language module (its host's, for HOSTS)."""
    host = HOSTS.get(family, family)
    return (
        importlib.import_module(f"mlx_vlm.models.{host}"),
        importlib.import_module(f"mlx_vlm.models.{host}.language"),
    )


def language_model_class(family: str) -> type:
    """The LanguageModel class `build` makes for a `buildable` family."""
    return _modules(family)[1].LanguageModel


def build(family: str) -> nn.Module:
    """The family's LanguageModel at the tiny config (random weights)."""
    if family in BUILDERS:
        return BUILDERS[family]()
    package, language = _modules(family)
    config = {**TINY, "model_type": family, **OVERRIDES.get(family, {})}
    config.update(VLM_OVERRIDES.get(family, {}))
    parameters = list(inspect.signature(language.LanguageModel.__init__).parameters)
    takes_model_config = len(parameters) > 2 and parameters[2] != "tokenizer"
    text_config_class = getattr(package, "TextConfig", None)
    if text_config_class is None:  # text families: ModelConfig is the text config
        text_config = model_config = package.ModelConfig.from_dict(config)
    else:
        text_config = text_config_class.from_dict(config)
        if family in THINKER_CONFIGS:  # the language model reads the thinker's config
            model_config = THINKER_CONFIGS[family](package, config)
        elif takes_model_config:
            vision = {"model_type": family}
            model_config = package.ModelConfig.from_dict(
                {"model_type": family, "text_config": config, "vision_config": vision}
            )
            model_config.text_config = text_config
            if family in VISION_CONFIGS:
                vision = {"model_type": family, **VISION_CONFIGS[family]}
                model_config.vision_config = package.VisionConfig.from_dict(vision)
    if takes_model_config:
        return language.LanguageModel(text_config, model_config)
    return language.LanguageModel(text_config)
