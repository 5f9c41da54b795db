"""Which path faults at a 32 x 128-token batched prefill (illegal memory access)?

    python3 docs/kernels/tools/repro_batch32.py {unfused,fused,layer,layer_unfused} [layers] [batch]

One case per process: a CUDA fault is sticky and would fail every case after it.
"""

import sys

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

import moefuse_runtime
from moefuse_runtime import bench
from moefuse_runtime.demo import build_demo_model

case = sys.argv[1]
layers = int(sys.argv[2]) if len(sys.argv) > 2 else 4
batch = int(sys.argv[3]) if len(sys.argv) > 3 else 32
if case.startswith("layer"):
    layer = bench.make_layer(2048, 128, 768, "4bit", seed=0)
    if case == "layer":
        moefuse_runtime.install(layer, reserve_bytes=0)
    x = mx.random.normal((batch, 128, 2048)).astype(mx.bfloat16)
    idx = mx.random.randint(0, 128, (batch, 128, 8)).astype(mx.uint32)
    mx.eval(layer(x, idx))
else:
    model = build_demo_model("qwen3-30b-a3b", layers=layers, dtype=mx.bfloat16)
    if case == "fused":
        print(moefuse_runtime.install(model, reserve_bytes=0).summary())
    cache = make_prompt_cache(model)
    mx.eval(model.model(mx.random.randint(0, 1000, (batch, 128)), cache=cache))
    mx.synchronize()
    print("prefill ok", flush=True)
    for _ in range(3):  # decode steps: batch x top-k pairs
        mx.eval(model(mx.random.randint(0, 1000, (batch, 1)), cache=cache))
        mx.synchronize()
mx.synchronize()
print(f"{case} layers={layers} batch={batch}: ok", flush=True)
