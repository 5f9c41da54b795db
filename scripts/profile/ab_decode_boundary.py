"""A batched decode step with the decode/tensor-core boundary moved, interleaved.

    python3 scripts/profile/ab_decode_boundary.py OUT.json [ROUNDS]

The 48-layer Qwen3-30B-A3B-dimension model of ``moefuse bench --cuda model``
(128 experts, top-8), one decode step of 8 and 16 sequences (64 and 128
pairs per layer) after a 128-token context. Variants: the boundary as
shipped (decode kernels up to 128 pairs), at 64 and at 32 pairs (tensor
cores above). Medians of the rounds, ratios to the shipped boundary paired
per round. Run G's layer sweep had the tensor cores ahead at 128 pairs;
this measures it where it matters, in a model step.
"""

import dataclasses
import json
import statistics
import sys

import mlx.core as mx

from moefuse_runtime import blocks, install
from moefuse_runtime.cuda.bench import decode_cache, interleaved, use_kernels
from moefuse_runtime.demo import build_demo_model
from moefuse_runtime.walk import find_switch_glus


def with_boundary(kernels, pairs):
    decode = dataclasses.replace(kernels.decode, max_pairs=pairs)
    return dataclasses.replace(
        kernels, decode=decode, grouped=dataclasses.replace(kernels.grouped, min_pairs=pairs)
    )


def main(out, rounds):
    model = build_demo_model("qwen3-30b-a3b", layers=48, dtype=mx.bfloat16)
    install(model, reserve_bytes=0)
    layers = [layer for _, layer in find_switch_glus(model)]
    shipped = [layer.kernels for layer in layers]
    variants = {f"boundary_{p}": [with_boundary(k, p) for k in shipped] for p in (128, 64, 32)}
    results = []
    for batch in (8, 16):
        caches = {name: decode_cache(model, batch) for name in variants}
        step = mx.random.randint(0, 1000, (batch, 1))

        def run_with(name, step=step, caches=caches):
            def run():
                use_kernels(layers, variants[name])
                for block in model.modules():  # compiled blocks trace the new kernels
                    blocks.recompile(block)
                return model(step, cache=caches[name])

            return run

        times = interleaved({name: run_with(name) for name in variants}, rounds)
        base = times["boundary_128"]
        row = {
            "sequences": batch,
            "pairs_per_layer": batch * 8,
            "step_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
            "speedup_vs_shipped": {
                k: statistics.median(b / s for b, s in zip(base, v, strict=True))
                for k, v in times.items()
            },
        }
        print(json.dumps(row))
        results.append(row)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 15)
