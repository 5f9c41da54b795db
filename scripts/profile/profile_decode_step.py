"""Where one batched decode step's time goes, fused against the bound (CUPTI).

    python3 scripts/profile/profile_decode_step.py OUT.json SEQS [SEQS...]

The 48-layer Qwen3-30B-A3B-dimension model of ``moefuse bench --cuda model``,
a 128-token context, one decode step of SEQS sequences. Per variant (fused
as installed; bound: every MoE FFN a broadcast of its input):

* wall ms per step (median of 10), and the part of it that is Python
  building the lazy graph (``model(step)`` before ``mx.eval``);
* GPU time per kernel name per step, GPU busy time (the union of kernel
  intervals) and the span from first kernel start to last kernel end.

Wall much above GPU busy says the host bounds the step; GPU busy near wall
says the kernels do.
"""

import json
import statistics
import sys
import time

import mlx.core as mx
from cupti import kernel_timeline

from moefuse_runtime import blocks, install
from moefuse_runtime.cuda.bench import BroadcastFFN, decode_cache, use_kernels
from moefuse_runtime.demo import build_demo_model
from moefuse_runtime.walk import find_switch_glus

STEPS = 10
PROFILED = 5


def measure(model, step, cache):
    walls, builds = [], []
    for _ in range(STEPS + 1):
        mx.synchronize()
        start = time.perf_counter()
        out = model(step, cache=cache)
        built = time.perf_counter()
        mx.eval(out)
        mx.synchronize()
        walls.append(time.perf_counter() - start)
        builds.append(built - start)

    def run() -> None:
        mx.eval(model(step, cache=cache))
        mx.synchronize()

    gpu = kernel_timeline(run, PROFILED)
    return {
        "wall_ms": 1e3 * statistics.median(walls[1:]),
        "graph_build_ms": 1e3 * statistics.median(builds[1:]),
        **gpu,
        "gpu_kernel_sum_ms": sum(gpu["kernels_us"].values()) / 1e3,
    }


def main(out_path, batches):
    model = build_demo_model("qwen3-30b-a3b", layers=48, dtype=mx.bfloat16)
    install(model, reserve_bytes=0)
    layers = [layer for _, layer in find_switch_glus(model)]
    kernels = [layer.kernels for layer in layers]
    results = []
    for batch in batches:
        cache = decode_cache(model, batch)
        step = mx.random.randint(0, 1000, (batch, 1))
        row = {"sequences": batch}
        for name, chosen in (("fused", kernels), ("bound", [BroadcastFFN()] * len(layers)),
                             ("fused", kernels)):  # fmt: skip
            use_kernels(layers, chosen)
            for block in model.modules():  # compiled blocks trace the new kernels
                blocks.recompile(block)
            row[name] = measure(model, step, cache)  # fused twice: the second is kept
        for name in ("fused", "bound"):
            r = row[name]
            print(f"{batch} seqs {name}: wall {r['wall_ms']:.2f} ms, graph build "
                  f"{r['graph_build_ms']:.2f}, GPU busy {r['gpu_busy_ms']:.2f}, span "
                  f"{r['gpu_span_ms']:.2f}")  # fmt: skip
            for kname, us in list(r["kernels_us"].items())[:14]:
                print(f"    {us:9.1f} us  {kname}")
        results.append(row)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], [int(a) for a in sys.argv[2:]] or [32, 64])
