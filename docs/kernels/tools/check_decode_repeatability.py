"""Does mlx-lm's own decode give the same greedy tokens every time here?

    python3 scripts/check_decode_repeatability.py [LAYERS] [STEPS] [RUNS]

The plain (unfused) Qwen3-30B-A3B-dimension model (bf16, random 4-bit
weights) and a fused copy on gather_qmm decode the same prompt greedily
RUNS times each, interleaved; prints, per run, the first step whose token
differs from the plain model's first run (None: all equal).
"""

from __future__ import annotations

import os
import sys

import mlx.core as mx

sys.path.insert(0, os.path.dirname(__file__))
from bench_kernels import first_difference  # noqa: E402

from moefuse_runtime import find_switch_glus, install  # noqa: E402
from moefuse_runtime.demo import build_demo_model, decode_intervals  # noqa: E402

args = [int(a) for a in sys.argv[1:]] + [48, 256, 3][len(sys.argv) - 1 :]
layers, steps, runs = args
plain = build_demo_model("qwen3-30b-a3b", layers=layers, dtype=mx.bfloat16)
fused = build_demo_model("qwen3-30b-a3b", layers=layers, dtype=mx.bfloat16)
install(fused, reserve_bytes=0)
for _, layer in find_switch_glus(fused):
    layer.decode_kernels = None
prompt = mx.random.randint(0, plain.args.vocab_size, (32,)).astype(mx.uint32)
first, _ = decode_intervals(plain, prompt, steps)
for run in range(runs):
    for name, model in (("plain", plain), ("fused gather_qmm", fused)):
        tokens, _ = decode_intervals(model, prompt, steps)
        step = first_difference(first, tokens)
        print(f"run {run} {name}: first difference from plain run 0 at step {step}", flush=True)
