"""Sweep the tilings of the tensor-core kernels (the data of cuda/tiles.json).

    python3 scripts/tune_grouped.py OUT_DIR [--only qwen3-30b-a3b:512 mixtral-8x7b:2048]

On the lent GPU. For each layer shape and token count, every candidate tiling
of the gate_up and of the down kernel is timed on its own (pairs routed
once, outside the timing), median of rounds, as TFLOP/s.
The best per rows-per-expert class go into moefuse_runtime/cuda/tiles.json
by hand, with the figures in docs/kernels.md. Whole-layer and model figures:
``moefuse bench --cuda``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import mlx.core as mx

from moefuse_runtime import bench, install
from moefuse_runtime.cuda import grouped
from moefuse_runtime.cuda.activations import SWIGLU as SWIGLU_KIND
from moefuse_runtime.cuda.activations import KernelActivation
from moefuse_runtime.cuda.bench import LAYER_SHAPES, seconds_of
from moefuse_runtime.cuda.formats import QuantizedArrays

TOKENS = {"qwen3-30b-a3b": (32, 128, 512, 2048), "mixtral-8x7b": (64, 512, 2048)}
# fmt: off
SHARED_TILE = [(16, 64, 1, 2, 6, 1), (16, 128, 1, 4, 4, 1), (16, 128, 1, 4, 6, 1),
               (16, 256, 1, 8, 4, 1), (32, 128, 1, 4, 4, 2), (32, 256, 1, 8, 4, 1),
               (64, 128, 2, 4, 4, 1), (64, 128, 2, 4, 4, 2), (128, 128, 2, 4, 4, 1),
               (128, 128, 4, 2, 4, 1)]
IN_REGISTERS = [(16, 128, 1, 4, 4, 3), (16, 128, 1, 4, 4, 4), (16, 128, 1, 4, 4, 5),
                (16, 128, 1, 4, 8, 4), (16, 64, 1, 2, 6, 8), (16, 256, 1, 8, 4, 2),
                (32, 128, 1, 4, 4, 2), (32, 128, 1, 4, 4, 4), (32, 128, 1, 4, 6, 4),
                (64, 128, 1, 4, 4, 1), (64, 128, 2, 4, 4, 1), (64, 128, 2, 4, 4, 2)]
# fmt: on
CANDIDATES = {
    swiglu: [*SHARED_TILE, *((*c, True) for c in IN_REGISTERS)] for swiglu in (True, False)
}
"""(bm, bn, warps_m, warps_n, stages, min_blocks[, b_regs]) per kind (True:
gate_up); a count tries those whose bm suits its rows per expert (`suits`).
The shared-tile ones lost to registers at every count in the last sweeps
(docs/kernels.md) and stay as the reference; min_blocks up to 6 became
possible when the quad-shared scale ring cut registers (145 -> 95 at BM 16)."""


def suits(bm: int, rows_per_expert: float) -> bool:
    return min(64, rows_per_expert / 4) <= bm <= max(16, 4 * rows_per_expert)


ROUNDS = 7
BATCH = 10
"""Calls per evaluation: launched back to back, so that the GPU time, not
the host's launch and synchronization per call, is what is timed (one call
per evaluation measured about 2x the GPU time at 32 tokens)."""


def regs_only(swiglu: bool, bits: int) -> list[tuple]:
    """The candidates that dequantize in registers, and the tiles.json tilings
    they compete with."""
    table = {grouped.tiling_for("default", r, swiglu, bits) for r in (1, 1e9)}
    tilings = [(c, grouped.Tiling(*c)) for c in CANDIDATES[swiglu]]
    return [c for c, tiling in tilings if tiling.b_regs or tiling in table]


def sweep_kind(candidates, swiglu, x, proj, flat, experts, top_k, flops) -> dict:
    """TFLOP/s of every candidate tiling of one kernel (or why it failed)."""
    results = {}
    rows_per_expert = flat.size / experts
    for candidate in candidates:
        tiling = grouped.Tiling(*candidate)
        if tiling.why_not(swiglu, proj.bits) or not suits(tiling.bm, rows_per_expert):
            continue
        order, tiles, _ = grouped.route(flat, experts, (tiling.bm, tiling.bm))

        def run(tiling=tiling, order=order, tiles=tiles):
            act = KernelActivation(SWIGLU_KIND) if swiglu else None
            return grouped.grouped_gemm(
                x, proj, order, tiles, activation=act, top_k=top_k, tiling=tiling
            )

        def batch(run=run):
            return [run() for _ in range(BATCH)]

        try:
            seconds_of(run)  # compile and warm up
            seconds = statistics.median(seconds_of(batch) for _ in range(ROUNDS)) / BATCH
        except Exception as error:  # noqa: BLE001 - a failing candidate is recorded
            results[str(tiling)] = f"failed: {error}"[:300]
            continue
        results[str(tiling)] = {"ms": seconds * 1e3, "tflops": flops / seconds / 1e12}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--only", nargs="+", metavar="SHAPE:TOKENS")
    parser.add_argument("--quant", default="4bit", help="weight format (bench.make_layer)")
    parser.add_argument(
        "--regs-only",
        action="store_true",
        help="only the candidates that dequantize in registers, and the "
        "tiles.json tilings they compete with",
    )
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    wanted = [tuple(o.split(":")) for o in args.only] if args.only else None
    results = {"device": mx.device_info().get("device_name"), "quant": args.quant, "rows": []}
    bits = int(args.quant.removesuffix("bit"))
    candidates = {s: regs_only(s, bits) if args.regs_only else CANDIDATES[s] for s in CANDIDATES}
    for shape, (hidden, experts, top_k, width) in LAYER_SHAPES.items():
        counts = [int(t) for s, t in wanted if s == shape] if wanted else TOKENS[shape]
        if not counts:
            continue
        layer = bench.make_layer(hidden, experts, width, args.quant, seed=0)
        install(layer, reserve_bytes=0)
        gate_up, down = (QuantizedArrays.of(layer[k]) for k in ("gate_up_proj", "down_proj"))
        for tokens in counts:
            pairs = tokens * top_k
            x = mx.random.normal((tokens, hidden)).astype(mx.bfloat16)
            h = mx.random.normal((pairs, width)).astype(mx.bfloat16)
            flat = mx.random.randint(0, experts, (pairs,)).astype(mx.uint32)
            mx.eval(x, h, flat)
            row = {"shape": shape, "tokens": tokens, "rows_per_expert": pairs / experts}
            for swiglu, kind in ((True, "gate_up"), (False, "down")):
                flops = 2 * pairs * hidden * width * (2 if swiglu else 1)
                args_ = (
                    (x, gate_up, flat, experts, top_k) if swiglu else (h, down, flat, experts, 1)
                )
                row[kind] = sweep_kind(candidates[swiglu], swiglu, *args_, flops)
                ok = [(v["tflops"], k) for k, v in row[kind].items() if isinstance(v, dict)]
                print(
                    f"{shape} {tokens} tokens {kind}: best {max(ok) if ok else row[kind]}",
                    flush=True,
                )
            results["rows"].append(row)
            with open(os.path.join(args.out, "tune.json"), "w") as f:
                json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
