"""Is the fused gather_qmm path bitwise equal to mlx-lm's unfused one here?

    python3 scripts/check_bitwise_bf16.py

For Qwen3-30B-A3B and Mixtral layer shapes, 4-bit, bfloat16 and float32
activations, 1/8/64 tokens: prints whether fused (kernels off) and unfused
outputs are identical and, if not, the largest difference.
"""

from __future__ import annotations

import mlx.core as mx

from moefuse_runtime import bench, install

for shape in ("qwen3-30b-a3b", "mixtral-8x7b"):
    hidden, experts, top_k, width = bench.LAYER_SHAPES[shape]
    for dtype in (mx.bfloat16, mx.float32):
        plain = bench.make_layer(hidden, experts, width, "4bit", 0)
        fused = bench.make_layer(hidden, experts, width, "4bit", 0)
        plain.set_dtype(dtype)
        fused.set_dtype(dtype)
        install(fused, reserve_bytes=0, enabled=True)
        fused.decode_kernels = None
        for tokens in (1, 8, 64):
            x = mx.random.normal((1, tokens, hidden)).astype(dtype)
            idx = mx.random.randint(0, experts, (1, tokens, top_k)).astype(mx.uint32)
            a, b = plain(x, idx), fused(x, idx)
            same = mx.array_equal(a, b).item()
            diff = mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()
            print(f"{shape} {dtype} tokens {tokens}: bitwise {same}, max |diff| {diff:.3g}")
        bench.free(plain, fused)
