"""Is a bf16 model's decode deterministic here, and is fusion bitwise in it?

    python3 scripts/check_model_determinism.py [LAYERS]

Two identically built Qwen3-30B-A3B-dimension models (bf16, 4-bit), one
fused with the kernels off; the same 64 tokens teacher-forced one at a time
through the KV cache: the plain model twice, the fused one once.
"""

from __future__ import annotations

import os
import sys

import mlx.core as mx

sys.path.insert(0, os.path.dirname(__file__))
from bench_kernels import teacher_forced  # noqa: E402

from moefuse_runtime import find_switch_glus, install  # noqa: E402
from moefuse_runtime.demo import build_demo_model  # noqa: E402

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 8
plain = build_demo_model("qwen3-30b-a3b", layers=layers, dtype=mx.bfloat16)
fused = build_demo_model("qwen3-30b-a3b", layers=layers, dtype=mx.bfloat16)
install(fused, reserve_bytes=0)
for _, layer in find_switch_glus(fused):
    layer.decode_kernels = None
prompt = mx.arange(1, 33).astype(mx.uint32)
tokens, first = teacher_forced(plain, prompt, 64)
_, again = teacher_forced(plain, prompt, 64, tokens)
_, fused_logits = teacher_forced(fused, prompt, 64, tokens)
print("plain run twice bitwise:", mx.array_equal(first, again).item())
print("plain vs fused bitwise:", mx.array_equal(first, fused_logits).item())
print("max |plain - plain|:", mx.abs(first - again).max().item())
print("max |plain - fused|:", mx.abs(first - fused_logits).max().item())
