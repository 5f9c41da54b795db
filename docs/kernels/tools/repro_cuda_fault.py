"""Reproduce the CUDA fault of the DeepSeek-like bf16 layer benchmark, one path.

    python scripts/repro_cuda_fault.py unfused|fused [LAYERS] [TOKENS...]

Runs bench.py's timed loop on one path only (no A/B), so that a fault says
which path needs it. Prints one line per token count, or dies with the fault.
"""

import sys

import mlx.core as mx

from moefuse_runtime import install
from moefuse_runtime.bench import LAYER_SHAPES, make_layer, timed

path = sys.argv[1]
layers = int(sys.argv[2]) if len(sys.argv) > 2 else 2
tokens = [int(t) for t in sys.argv[3:]] or [1, 4, 16]
hidden, experts, top_k, width = LAYER_SHAPES["deepseek-v3-scaled"]
stack = [make_layer(hidden, experts, width, "bf16", seed) for seed in range(layers)]
if path == "fused":
    for layer in stack:
        install(layer, reserve_bytes=0)
for n in tokens:
    x = mx.random.normal((1, n, hidden)).astype(mx.bfloat16)
    idx = mx.random.randint(0, experts, (1, n, top_k)).astype(mx.uint32)
    seconds = [timed(lambda x=x, i=idx: [layer(x, i) for layer in stack]) for _ in range(5)]
    print(f"{path} tokens={n} ok median_ms={sorted(seconds)[2] * 1e3 / layers:.4f}", flush=True)
