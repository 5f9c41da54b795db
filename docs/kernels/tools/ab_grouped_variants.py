"""A/B of grouped_gemm.cuh variants: GPU time per kernel (CUPTI, torch profiler).

    python3 docs/kernels/tools/ab_grouped_variants.py QUANT TOKENS,... OUT.json [SET]

Each variant is a copy of grouped_gemm.cuh in xp/VARIANT.cuh, built under
its own kernel name with the package's common.cuh; all variants must give
bitwise-equal outputs (asserted; probe_* variants are exempt: they measure
a traffic pattern, not a kernel), then each runs 20 calls per profiled
batch, 3 rounds interleaved, median. Qwen3-30B-A3B dimensions, BM 16.
SET "layout" (ab-layout-*.json): the files make_layout_probes.sh writes.
SET "ring" (ab-ring-4bit.json): xp/new.cuh (the shipped kernel) and
xp/ring8.cuh (RING's docstring), at 4, 6 and 8 stages.
SET "prefetch" (the default), the variants of ab-occupancy-4bit.json and
ab-prefetch-*.json:

    git show eeac147:moefuse_runtime/cuda/grouped_gemm.cuh > xp/old.cuh
    git show HEAD:moefuse_runtime/cuda/grouped_gemm.cuh | \
        sed 's/cp_async_16<256>(q_stage/cp_async_16(q_stage/' > xp/new.cuh
    mid: new with the per-chunk 16-byte fragment loads of old
    *_l2 / *_l2x: sed 's/cp_async_16(q_stage/cp_async_16<128>(q_stage/' (<256>)
"""

import json
import math
import statistics
import sys
from collections import defaultdict

import mlx.core as mx
from torch.profiler import ProfilerActivity, profile

from moefuse_runtime import bench, install
from moefuse_runtime.cuda import grouped, source
from moefuse_runtime.cuda.formats import QuantizedArrays

EXPERTS, HIDDEN, WIDTH, TOP_K = 128, 2048, 768, 8
REPS, ROUNDS = 20, 3


def tiling(*args) -> grouped.Tiling:
    return grouped.Tiling(*args, b_regs=True)


PREFETCH = {  # gate_up (True) and down: (variant file, tiling)
    True: [("old", tiling(16, 128, 1, 4, 4, 3)), ("old_l2", tiling(16, 128, 1, 4, 4, 3)),
           ("new", tiling(16, 128, 1, 4, 4, 4)), ("new_l2", tiling(16, 128, 1, 4, 4, 4)),
           ("new_l2", tiling(16, 128, 1, 4, 4, 5)), ("new_l2", tiling(16, 128, 1, 4, 4, 6)),
           ("new_l2x", tiling(16, 128, 1, 4, 4, 4)), ("new_l2x", tiling(16, 128, 1, 4, 4, 5)),
           ("mid_l2", tiling(16, 128, 1, 4, 4, 4)), ("new_l2", tiling(16, 128, 1, 4, 6, 5)),
           ("new_l2", tiling(16, 128, 1, 4, 8, 4))],
    False: [("old", tiling(16, 128, 1, 4, 4, 2)), ("old_l2", tiling(16, 128, 1, 4, 4, 2)),
            ("new", tiling(16, 128, 1, 4, 4, 4)), ("new_l2", tiling(16, 128, 1, 4, 4, 4)),
            ("new_l2", tiling(16, 128, 1, 4, 4, 5)), ("new_l2x", tiling(16, 128, 1, 4, 4, 4)),
            ("new_l2x", tiling(16, 128, 1, 4, 4, 5)), ("mid_l2", tiling(16, 128, 1, 4, 4, 4)),
            ("new_l2", tiling(16, 128, 1, 4, 6, 5))],
}  # fmt: skip
"""The sets of ab-prefetch-*.json; ab-occupancy-4bit.json ran old, new (min_blocks
3-6) and mid without the L2 prefetch."""

LAYOUT = {
    swiglu: [*((v, tiling(16, 128, 1, 4, 4, 4)) for v in (
                "new", "probe_contig", "probe_nomma", "probe_contig_nomma", "probe_stagger",
                "probe_stagger_nomma", "probe_contig_stagger_nomma")),
             ("probe_nomma", tiling(16, 128, 1, 4, 8, 4))]
    for swiglu in (True, False)
}  # fmt: skip
RING = {
    swiglu: [("new", tiling(16, 128, 1, 4, 4, 4)), ("new", tiling(16, 128, 1, 4, 8, 4)),
             ("ring8", tiling(16, 128, 1, 4, 4, 4)), ("ring8", tiling(16, 128, 1, 4, 6, 4)),
             ("ring8", tiling(16, 128, 1, 4, 8, 4))]
    for swiglu in (True, False)
}  # fmt: skip
"""ab-ring-4bit.json: scales and biases 8 k-tiles ahead (ring8: sed
's/SCALE_RING = 4;/SCALE_RING = 8;/'), with deeper copy pipelines."""
VARIANT_SETS = {"prefetch": PREFETCH, "layout": LAYOUT, "ring": RING}

_kernels = {}


def kernel(variant: str, template: tuple, t: grouped.Tiling, dtype, bits: int):
    """xp/VARIANT.cuh as its own kernel (own name: own module and profile line)."""
    name = f"xp_{variant}_mb{t.min_blocks}_s{t.stages}"
    if (name, template) not in _kernels:
        with open(f"xp/{variant}.cuh") as f:
            text = f.read().replace("#pragma once\n", "")
        header = text.replace('#include "common.cuh"', source.header("common.cuh"))
        if t.min_blocks > 1:
            header += grouped._launch_bounds(name, list(template), t, dtype)
        _kernels[name, template] = mx.fast.cuda_kernel(
            name=name, input_names=grouped._GEMM_INPUTS, output_names=["out"],
            source=grouped._GEMM_SOURCE, header=header, shared_memory=t.shared_bytes(bits),
        )  # fmt: skip
    return _kernels[name, template]


def call(variant, x, proj, order, tiles, swiglu, top_k, t: grouped.Tiling) -> mx.array:
    """grouped.grouped_gemm with the variant's kernel."""
    n = proj.weight.shape[-2] // (2 if swiglu else 1)
    blocks = tiles.shape[0] * math.ceil(n / (t.bn // 2 if swiglu else t.bn))
    template = (*proj.template(x, n, swiglu), ("TOP_K", top_k), ("BM", t.bm), ("BN", t.bn),
                ("WARPS_M", t.warps_m), ("WARPS_N", t.warps_n), ("STAGES", t.stages),
                ("B_REGS", t.b_regs))  # fmt: skip
    (out,) = kernel(variant, template, t, x.dtype, proj.bits)(
        inputs=[x, proj.weight, proj.scales, proj.biases, order, tiles],
        template=list(template), grid=(t.threads * blocks, 1, 1), threadgroup=(t.threads, 1, 1),
        output_shapes=[(order.size, n)], output_dtypes=[x.dtype],
    )  # fmt: skip
    return out


def gpu_us(fn) -> float:
    """GPU time of one call of fn, averaged over REPS calls launched back to back."""
    mx.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        mx.eval([fn() for _ in range(REPS)])
        mx.synchronize()
    events = (e for e in prof.events() if e.device_type.name == "CUDA" and "xp_" in e.name)
    return sum(e.device_time_total for e in events) / REPS


def main() -> None:
    quant, counts, out_path = sys.argv[1], [int(t) for t in sys.argv[2].split(",")], sys.argv[3]
    variants = VARIANT_SETS[sys.argv[4] if len(sys.argv) > 4 else "prefetch"]
    layer = bench.make_layer(HIDDEN, EXPERTS, WIDTH, quant, seed=0)
    install(layer, reserve_bytes=0)
    gate_up, down = (QuantizedArrays.of(layer[k]) for k in ("gate_up_proj", "down_proj"))
    results = []
    for tokens in counts:
        x = mx.random.normal((tokens, HIDDEN)).astype(mx.bfloat16)
        h = mx.random.normal((tokens * TOP_K, WIDTH)).astype(mx.bfloat16)
        flat = mx.random.randint(0, EXPERTS, (tokens * TOP_K,)).astype(mx.uint32)
        order, tiles, _ = grouped.route(flat, EXPERTS, (16, 16))
        for swiglu in (True, False):
            args = (x, gate_up, order, tiles, True, TOP_K) if swiglu else (
                h, down, order, tiles, False, 1)  # fmt: skip
            outs = [call(v, *args, t) for v, t in variants[swiglu] if not v.startswith("probe")]
            assert all(mx.array_equal(o, outs[0]).item() for o in outs), "variants differ"
            times = defaultdict(list)
            for _ in range(ROUNDS):
                for v, t in variants[swiglu]:
                    times[v, t].append(gpu_us(lambda v=v, t=t, a=args: call(v, *a, t)))
            for (v, t), us in times.items():
                row = {"quant": quant, "tokens": tokens, "kind": "gate_up" if swiglu else "down",
                       "variant": v, "tiling": str(t), "us": statistics.median(us)}  # fmt: skip
                results.append(row)
                print(json.dumps(row), flush=True)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
