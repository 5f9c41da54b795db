"""GPU time per kernel of one Qwen3-30B-A3B MoE layer at TOKENS tokens (CUPTI).

    python3 docs/kernels/tools/profile_grouped_layer.py [TOKENS]

Where a fused layer's time goes on the tensor-core path: the routing (one
launch since the counting sort; argsort, gather and schedules before), the two
grouped GEMMs.
"""

import sys
from collections import defaultdict

import mlx.core as mx
from torch.profiler import ProfilerActivity, profile

import moefuse_runtime
from moefuse_runtime import bench

tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
layer = bench.make_layer(2048, 128, 768, "4bit", seed=0)
moefuse_runtime.install(layer, reserve_bytes=0)
x = mx.random.normal((tokens, 2048)).astype(mx.bfloat16)
indices = mx.random.randint(0, 128, (tokens, 8)).astype(mx.uint32)
mx.eval(layer(x, indices))
mx.synchronize()
REPEATS = 10
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(REPEATS):
        mx.eval(layer(x, indices))
    mx.synchronize()
totals = defaultdict(float)
for event in prof.events():
    if event.device_type.name == "CUDA" and event.device_time_total > 0:
        totals[event.name[:70]] += event.device_time_total / REPEATS
for name, us in sorted(totals.items(), key=lambda kv: -kv[1]):
    print(f"{us:9.1f} us  {name}")
print(f"{sum(totals.values()):9.1f} us  total GPU time per layer call ({tokens} tokens)")
