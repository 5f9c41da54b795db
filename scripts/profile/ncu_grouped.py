"""One MoE layer on the tensor-core path, for Nsight Compute.

    ncu --kernel-name regex:moefuse_grouped --launch-skip 4 --launch-count 2 \
        --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats --section MemoryWorkloadAnalysis \
        python3 scripts/profile/ncu_grouped.py TOKENS [SHAPE]

TOKENS: 32 (a 32-sequence decode step of Qwen3-30B-A3B: 256 pairs, 2 rows
per expert) or 2048 (prefill). SHAPE: a layer shape of
``presets.LAYER_SHAPES`` (qwen3-30b-a3b unless given; mixtral-8x7b). Three
calls: the first compiles, ncu skips it.
"""

import sys

import mlx.core as mx

import moefuse_runtime
from moefuse_runtime import bench, presets

tokens = int(sys.argv[1])
hidden, experts, top_k, width = presets.LAYER_SHAPES[
    sys.argv[2] if len(sys.argv) > 2 else "qwen3-30b-a3b"
]
layer = bench.make_layer(hidden, experts, width, "4bit", seed=0)
moefuse_runtime.install(layer, reserve_bytes=0)
x = mx.random.normal((tokens, hidden)).astype(mx.bfloat16)
# top_k distinct experts per token, as a router picks them
indices = mx.argsort(mx.random.uniform(shape=(tokens, experts)), axis=-1)[:, :top_k].astype(
    mx.uint32
)
for _ in range(3):
    mx.eval(layer(x, indices))
mx.synchronize()
print("done", flush=True)
