"""Tiny language models of every mlx-vlm family that builds a SwitchGLU.

mlx-vlm has its own ``mlx_vlm.models.switch_layers.SwitchGLU`` (not mlx-lm's)
and its own copies of the text families. The families are discovered from
``mlx_vlm.models`` (any package whose source names SwitchGLU); each builds
its ``LanguageModel`` from tests/families.py's shared TINY config plus the
overrides below. Families that cannot be built that way are listed in
`NOT_BUILT` with the reason, and a test checks that every discovered family
is either built or listed, so the table cannot silently go stale.
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
    "qwen3_5_moe_text": {"full_attention_interval": 2, **_LINEAR_ATTENTION},
}

VISION_CONFIGS = {
    "glm4v_moe": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                  "patch_size": 14},
}  # fmt: skip
"""Vision configs of families whose language model reads one (glm4v_moe: the
spatial merge size, for its rotary position ids); the vision tower is not built."""

NOT_BUILT = {
    # Packed or already fused by mlx-vlm itself: no SwitchGLU at run time.
    "hy_v4": "its experts are mlx-vlm's own FusedSwitchGLU (gate and up already stacked)",
    "laguna": "its experts are LagunaPackedSwitchGLU (gate and up already stacked)",
    "ernie4_5_moe_vl": "builds no SwitchGLU from the tiny config (experts are per-modality)",
    "lfm2": "builds no SwitchGLU from the tiny config",
    "step3p7": "builds no SwitchGLU from the tiny config",
    # Not buildable from the shared tiny table yet (each needs its own config).
    "deepseek_v4": "hyper-connection and compressed-attention config not in the tiny table",
    "deepseek_v41": "its ModelConfig needs get_vocab_size and a nested text config",
    "deepseek_vl_v2": "needs a projector_config and a vision config",
    "deepseekocr": "needs a projector_config and a vision config",
    "gemma4": "needs a per-layer config of the unified vision-text model",
    "ming_image": "an image model with no language.LanguageModel",
    "mistral4": "its language module has no LanguageModel",
    "muse_spark": "its forward is a Metal-only kernel",
    "qwen3_omni_moe": "its thinker/talker configs nest several levels",
}


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
    return [family for family in discover() if family not in NOT_BUILT]


def build(family: str) -> nn.Module:
    """The family's LanguageModel at the tiny config (random weights)."""
    package = importlib.import_module(f"mlx_vlm.models.{family}")
    language = importlib.import_module(f"mlx_vlm.models.{family}.language")
    config = {**TINY, "model_type": family, **OVERRIDES.get(family, {})}
    config.update(VLM_OVERRIDES.get(family, {}))
    text_config_class = getattr(package, "TextConfig", None)
    if text_config_class is None:  # text families: ModelConfig is the text config
        text_config = model_config = package.ModelConfig.from_dict(config)
    else:
        text_config = text_config_class.from_dict(config)
        model_config = package.ModelConfig.from_dict(
            {"model_type": family, "text_config": config, "vision_config": {"model_type": family}}
        )
        model_config.text_config = text_config
        if family in VISION_CONFIGS:
            vision = {"model_type": family, **VISION_CONFIGS[family]}
            model_config.vision_config = package.VisionConfig.from_dict(vision)
    takes_model_config = len(inspect.signature(language.LanguageModel.__init__).parameters) > 2
    if takes_model_config:
        return language.LanguageModel(text_config, model_config)
    return language.LanguageModel(text_config)
