"""Host time of one fused MoE layer and one MoE block per decode step.

A decode step's wall time on CUDA is partly Python building MLX's lazy graph;
this times only that: the call of a fused layer (``switch_mlp(x, indices)``)
and of its block (``mlp(x)``, compiled on the kernels for <= 16 tokens), with
nothing evaluated, on a Qwen3-30B-A3B-dimension model (random 4-bit weights,
bf16), at decode batches of 1, 16, 32 and 64 sequences. Medians of
``--repeats`` rounds of ``--calls`` calls each, in microseconds per call.

    python scripts/bench_host_path.py OUT.json [--calls 200] [--repeats 9]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

SEQUENCES = (1, 16, 32, 64)


def per_call_us(fn, calls: int, repeats: int) -> float:
    import mlx.core as mx

    for _ in range(10):
        fn()
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
        mx.synchronize()
    return statistics.median(rounds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    os.environ.setdefault("MOEFUSE_KERNEL", "1")
    import mlx.core as mx

    import moefuse_runtime
    from moefuse_runtime.demo import build_demo_model

    model = build_demo_model("qwen3-30b-a3b", layers=1, dtype=mx.bfloat16)
    report = moefuse_runtime.install(model, reserve_bytes=0)
    block = model.model.layers[0].mlp
    layer = block.switch_mlp
    result = {"install": report.summary(), "compute_path": report.layers[0].compute_path}
    for seqs in SEQUENCES:
        x = mx.random.normal((seqs, 1, 2048)).astype(mx.bfloat16)
        indices = mx.random.randint(0, 128, (seqs, 1, 8)).astype(mx.uint32)
        mx.eval(x, indices, layer(x, indices), block(x))
        result[seqs] = {
            "layer_us": per_call_us(lambda x=x, i=indices: layer(x, i), args.calls, args.repeats),
            "block_us": per_call_us(lambda x=x: block(x), args.calls, args.repeats),
        }
        print(f"{seqs} sequences: layer {result[seqs]['layer_us']:.1f} us, "
              f"block {result[seqs]['block_us']:.1f} us per call", flush=True)  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
