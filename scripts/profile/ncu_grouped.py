"""One Qwen3-30B-A3B MoE layer on the tensor-core path, for Nsight Compute.

    ncu --kernel-name regex:moefuse_grouped --launch-skip 4 --launch-count 2 \
        --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats --section MemoryWorkloadAnalysis \
        python3 scripts/profile/ncu_grouped.py TOKENS

TOKENS: 32 (a 32-sequence decode step: 256 pairs, 2 rows per expert) or
2048 (prefill). Three calls: the first compiles, ncu skips it.
"""

import sys

import mlx.core as mx

import moefuse_runtime
from moefuse_runtime import bench

tokens = int(sys.argv[1])
layer = bench.make_layer(2048, 128, 768, "4bit", seed=0)
moefuse_runtime.install(layer, reserve_bytes=0)
x = mx.random.normal((tokens, 2048)).astype(mx.bfloat16)
indices = mx.random.randint(0, 128, (tokens, 8)).astype(mx.uint32)
for _ in range(3):
    mx.eval(layer(x, indices))
mx.synchronize()
print("done", flush=True)
