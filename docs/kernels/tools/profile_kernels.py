"""GPU time per kernel of the MoE FFN at one token, read from CUPTI.

    python3 scripts/profile_kernels.py OUT_DIR [--sweep]

Wall-clock timings of one MoE layer at one token on MLX's CUDA backend are
dominated by host work per op (graph building, launch), so they cannot show
how close a kernel gets to memory bandwidth. torch.profiler (CUPTI) records
every kernel the process runs, MLX's included, with its device time. For each
path and tiling it prints the kernels and the GPU time per layer, as a
fraction of the streaming bandwidth. Writes OUT_DIR/profile.json.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections import defaultdict
from dataclasses import replace

import mlx.core as mx

sys.path.insert(0, os.path.dirname(__file__))
from bench_kernels import layer_stacks  # noqa: E402

from moefuse_runtime import bench, kernels  # noqa: E402

SHAPES = ("qwen3-30b-a3b", "mixtral-8x7b")
SWEEP = [((1, 8), (1, 8)), ((1, 4), (2, 8)), ((1, 16), (4, 8)), ((2, 4), (4, 4)), ((1, 2), (8, 4))]
"""--sweep: (gate_up tiling, down tiling) pairs at Qwen3-30B-A3B dimensions;
each kernel's time is read on its own, so five runs cover five of each."""
LAYERS = 8
REPEATS = 10


def kernel_times(run) -> dict[str, tuple[int, float]]:
    """name -> (count, total device microseconds) of the kernels ``run`` launches."""
    from torch.profiler import ProfilerActivity, profile

    mx.eval(run())  # compile and warm up outside the trace
    mx.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPEATS):
            mx.eval(run())
        mx.synchronize()
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type.name == "CUDA" and event.device_time_total > 0:
            totals[event.name[:90]][0] += 1
            totals[event.name[:90]][1] += event.device_time_total
    return {k: (int(c), t) for k, (c, t) in totals.items()}


def main(out: str, sweep: bool = False) -> int:
    os.makedirs(out, exist_ok=True)
    stream = bench.streaming_bandwidth()
    print(f"streaming bandwidth {stream / 1e9:.0f} GB/s", flush=True)
    result = {"streaming_bandwidth_bytes_per_s": stream, "rows": []}
    for shape in SHAPES[:1] if sweep else SHAPES:
        hidden, experts, top_k, _ = bench.LAYER_SHAPES[shape]
        unfused, fused = layer_stacks(shape, "4bit", LAYERS)
        per_expert = bench.expert_bytes(unfused[0], experts)
        x = mx.random.normal((1, 1, hidden)).astype(mx.bfloat16)
        idx = mx.array(list(range(0, experts, experts // top_k))[:top_k], dtype=mx.uint32)
        idx = idx.reshape(1, 1, top_k)
        nbytes = top_k * per_expert
        floor_us = nbytes / stream * 1e6
        print(f"{shape}: {nbytes / 1e6:.1f} MB per layer, floor {floor_us:.1f} us", flush=True)

        def path(layers, chosen, x=x, idx=idx):
            def calls():
                for layer in layers:
                    layer.decode_kernels = chosen
                return [layer(x, idx) for layer in layers]

            return calls

        variants = {"unfused": path(unfused, None), "fused gather_qmm": path(fused, None)}
        v4 = kernels.DecodeKernels(True, 128, (1, 8), (1, 8), compiled=False)
        shipped, _ = kernels.kernels_for(fused[0])  # as install() selects it
        variants["kernel v4: (1, 8) both, uncompiled"] = path(fused, v4)
        variants["kernel shipped, uncompiled"] = path(fused, replace(shipped, compiled=False))
        variants["kernel shipped (compiled)"] = path(fused, shipped)
        if sweep:
            variants = {
                f"kernel gate_up {gate_up} down {down}": path(
                    fused, kernels.DecodeKernels(True, 128, gate_up, down)
                )
                for gate_up, down in SWEEP
            }
        for name, run in variants.items():
            times = kernel_times(run)
            per_layer = sum(t for _, t in times.values()) / (REPEATS * LAYERS)
            wall = statistics.median(bench.timed(run) for _ in range(10)) / LAYERS * 1e6
            row = {
                "shape": shape,
                "path": name,
                "gpu_us_per_layer": per_layer,
                "wall_us_per_layer": wall,
                "floor_us": floor_us,
                "gpu_fraction_of_stream": floor_us / per_layer if per_layer else 0.0,
                "kernels": {k: (c / (REPEATS * LAYERS), t / c) for k, (c, t) in times.items()},
            }
            result["rows"].append(row)
            print(
                f"  {name:<28} GPU {per_layer:8.1f} us/layer ({row['gpu_fraction_of_stream']:.0%})"
                f"  wall {wall:8.1f} us/layer",
                flush=True,
            )
            for k, (per, us) in sorted(row["kernels"].items(), key=lambda kv: -kv[1][1]):
                print(f"      {per:4.1f}x {us:8.1f} us  {k}", flush=True)
            with open(os.path.join(out, "profile.json"), "w") as f:
                json.dump(result, f, indent=1)
        bench.free(unfused, fused)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], "--sweep" in sys.argv[2:]))
