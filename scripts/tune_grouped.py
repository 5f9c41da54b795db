"""Sweep the tensor-core path's tilings and measure one MoE layer's FLOP rate.

    python3 scripts/tune_grouped.py OUT_DIR [--quick]

On the lent GPU (MLX's CUDA backend; PyTorch there is the peer). For each
layer shape and token count: every candidate tiling of the gate_up and the
down kernel, timed on its own (sorted pairs and schedule precomputed), the
whole fused FFN as install() selects it, mlx-lm's SwitchGLU (unfused
gather_qmm), PyTorch's bf16 grouped GEMM (torch._grouped_mm) on the same
gate_up and down shapes, and MLX's dense bf16 matmul of the same FLOPs.
Variants alternate round by round; medians of wall time around mx.eval +
synchronize. Writes OUT_DIR/tune.json; the best tilings go into
moefuse_runtime/cuda/tiles.json by hand, with the figures in docs/kernels.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import mlx.core as mx

from moefuse_runtime import bench, cuda, install
from moefuse_runtime.cuda import grouped
from moefuse_runtime.cuda.decode import QuantizedArrays

SHAPES = {"qwen3-30b-a3b": (2048, 128, 8, 768), "mixtral-8x7b": (4096, 8, 2, 14336)}
TOKENS = {"qwen3-30b-a3b": (32, 128, 512, 2048), "mixtral-8x7b": (64, 512, 2048)}
CANDIDATES = {
    True: [(16, 128, 1, 4, 4), (32, 128, 1, 4, 4), (64, 128, 2, 4, 4), (64, 256, 2, 4, 3),
           (128, 128, 2, 4, 4), (128, 128, 2, 4, 3), (128, 128, 4, 2, 4), (128, 256, 2, 4, 3)],
    False: [(16, 64, 1, 4, 4), (16, 128, 1, 4, 4), (32, 128, 1, 4, 4), (64, 128, 2, 4, 4),
            (64, 256, 2, 4, 3), (128, 128, 2, 4, 4), (128, 128, 2, 4, 3), (128, 128, 4, 2, 4)],
}  # fmt: skip
"""(bm, bn, warps_m, warps_n, stages) per kind (True: gate_up); each also with min_blocks 2."""
ROUNDS = 7


def median_seconds(fn, rounds: int = ROUNDS, inner: int = 3) -> float:
    mx.eval(fn())
    mx.synchronize()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(inner):
            mx.eval(fn())
        mx.synchronize()
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def torch_peer(hidden, experts, width, indices) -> dict[str, float]:
    """Seconds of torch._grouped_mm bf16 for gate_up and down on the same routing."""
    try:
        import numpy as np
        import torch
    except ImportError:
        return {}
    idx = np.array(indices).reshape(-1)
    counts = np.bincount(idx, minlength=experts)
    offs = torch.tensor(np.cumsum(counts), dtype=torch.int32, device="cuda")
    pairs = idx.size
    a = torch.randn(pairs, hidden, device="cuda", dtype=torch.bfloat16)
    w1 = torch.randn(experts, hidden, 2 * width, device="cuda", dtype=torch.bfloat16) * 0.02
    h = torch.randn(pairs, width, device="cuda", dtype=torch.bfloat16)
    w2 = torch.randn(experts, width, hidden, device="cuda", dtype=torch.bfloat16) * 0.02
    out = {}
    for name, fn in {
        "gate_up": lambda: torch._grouped_mm(a, w1, offs=offs),
        "down": lambda: torch._grouped_mm(h, w2, offs=offs),
    }.items():
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        samples = []
        for _ in range(ROUNDS):
            start.record()
            for _ in range(3):
                fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 3 / 1e3)
        out[name] = statistics.median(samples)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--quick", action="store_true", help="one token count per shape")
    parser.add_argument("--only", nargs="+", metavar="SHAPE:TOKENS",
                        help="e.g. qwen3-30b-a3b:32 mixtral-8x7b:2048")
    parser.add_argument("--no-sweep", action="store_true", help="installed tilings only")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    arch = cuda.device_arch()
    results = {"arch": arch, "device": mx.device_info().get("device_name"), "rows": []}
    for shape, (hidden, experts, top_k, width) in SHAPES.items():
        unfused = bench.make_layer(hidden, experts, width, "4bit", seed=0)
        fused = bench.make_layer(hidden, experts, width, "4bit", seed=0)
        install(fused, reserve_bytes=0)
        gate_up, down = (QuantizedArrays.of(fused[k]) for k in ("gate_up_proj", "down_proj"))
        counts = TOKENS[shape][-2:-1] if args.quick else TOKENS[shape]
        if args.only:
            counts = [int(t) for s, t in (o.split(":") for o in args.only) if s == shape]
        for tokens in counts:
            x = mx.random.normal((tokens, hidden)).astype(mx.bfloat16)
            indices = mx.random.randint(0, experts, (tokens, top_k)).astype(mx.uint32)
            pairs = tokens * top_k
            flops = {"gate_up": 2 * pairs * hidden * 2 * width, "down": 2 * pairs * width * hidden}
            total = sum(flops.values())
            row = {"shape": shape, "tokens": tokens, "pairs": pairs, "flops": total}
            order = mx.argsort(indices.reshape(-1))
            sorted_experts = indices.reshape(-1)[order]
            h = mx.random.normal((pairs, width)).astype(mx.bfloat16)
            mx.eval(x, indices, order, sorted_experts, h)
            if not args.no_sweep:
                for swiglu in (True, False):
                    kind = "gate_up" if swiglu else "down"
                    sweep = {}
                    for cand in CANDIDATES[swiglu]:
                        for min_blocks in (1, 2):
                            tiling = grouped.Tiling(*cand, min_blocks=min_blocks)
                            if tiling.why_not(swiglu, 4):
                                continue
                            tiles = grouped.schedule(sorted_experts, experts, tiling.bm)
                            mx.eval(tiles)

                            def run(tiling=tiling, tiles=tiles, swiglu=swiglu):
                                return grouped.grouped_gemm(
                                    x if swiglu else h, gate_up if swiglu else down, order,
                                    tiles, swiglu=swiglu, top_k=top_k if swiglu else 1,
                                    tiling=tiling,
                                )  # fmt: skip

                            try:
                                seconds = median_seconds(run)
                            except Exception as error:  # noqa: BLE001 - record and go on
                                sweep[str(tiling)] = f"failed: {error}"[:300]
                                continue
                            sweep[str(tiling)] = {
                                "ms": seconds * 1e3, "tflops": flops[kind] / seconds / 1e12
                            }  # fmt: skip
                    row[f"{kind}_sweep"] = sweep
                    ok = [(v["tflops"], k) for k, v in sweep.items() if isinstance(v, dict)]
                    best = f"{max(ok)[0]:.1f} TFLOP/s {max(ok)[1]}" if ok else str(sweep)[:400]
                    print(f"{shape} {tokens} tok {kind}: best {best}", flush=True)
            paths = {
                "unfused": lambda: unfused(x, indices),
                "fused": lambda: fused(x, indices),
                "dense_bf16": lambda: x_dense @ w_dense,
            }
            # dense bf16 matmul of the same FLOPs: (pairs, hidden) x (hidden, 3 * width)
            x_dense = mx.random.normal((pairs, hidden)).astype(mx.bfloat16)
            w_dense = mx.random.normal((hidden, 3 * width)).astype(mx.bfloat16)
            mx.eval(x_dense, w_dense)
            times = {k: [] for k in paths}
            for _ in range(ROUNDS):  # interleaved
                for k, fn in paths.items():
                    times[k].append(median_seconds(fn, rounds=1))
            for k, samples in times.items():
                seconds = statistics.median(samples)
                row[k] = {"ms": seconds * 1e3, "tflops": total / seconds / 1e12}
            peer = torch_peer(hidden, experts, width, indices)
            if peer:
                seconds = sum(peer.values())
                row["torch_grouped_mm_bf16"] = {"ms": seconds * 1e3, "tflops": total / seconds / 1e12}
            results["rows"].append(row)
            summary = "  ".join(
                f"{k} {row[k]['tflops']:.1f}" for k in ("unfused", "fused", "torch_grouped_mm_bf16",
                                                        "dense_bf16") if k in row
            )  # fmt: skip
            print(f"{shape} {tokens} tok ({pairs} pairs) TFLOP/s: {summary}", flush=True)
            with open(os.path.join(args.out, "tune.json"), "w") as f:
                json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
