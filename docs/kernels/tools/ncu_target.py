"""One MoE layer's decode kernels at one token, for Nsight Compute.

    ncu --kernel-name regex:moefuse --launch-skip 2 --launch-count 2 \\
        --section SpeedOfLight --section Occupancy --section LaunchStats \\
        --section WarpStateStats --section MemoryWorkloadAnalysis \\
        python3 scripts/ncu_target.py [SHAPE]

Qwen3-30B-A3B dimensions by default (4-bit, bf16): two warm-up calls, then
two profiled ones (gate_up + SwiGLU, down).
"""

from __future__ import annotations

import sys

import mlx.core as mx

from moefuse_runtime import bench, kernels

shape = sys.argv[1] if len(sys.argv) > 1 else "qwen3-30b-a3b"
hidden, experts, top_k, width = bench.LAYER_SHAPES[shape]
_, (layer,) = bench.layer_stacks(hidden, experts, width, "4bit", 1)
layer.decode_kernels = kernels.DecodeKernels(True, compiled=False)
x = mx.random.normal((1, 1, hidden)).astype(mx.bfloat16)
idx = mx.array(list(range(0, experts, experts // top_k))[:top_k], dtype=mx.uint32)
for _ in range(4):
    mx.eval(layer(x, idx.reshape(1, 1, top_k)))
mx.synchronize()
