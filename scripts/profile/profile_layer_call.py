"""Where one fused MoE layer call's wall time goes at prefill sizes (CUPTI).

    python3 scripts/profile/profile_layer_call.py OUT.json [TOKENS ...]

The layer figures of ``moefuse bench --cuda layers`` are wall TFLOP/s of
one MLX call (routing included); ``moefuse tune`` times each kernel in a
batch of back-to-back calls. Per layer shape (Qwen3-30B-A3B and
Mixtral-8x7B dims, 4-bit g64, the installed tile table) and token count
(default 2,048 and 8,192), this times one call both ways and takes its
GPU timeline with PyTorch's CUPTI profiler (MLX's kernels included):

* ``wall_ms``: one call, evaluated and synchronized (median of 10), as
  the layer benchmark; ``batched_ms``: per call of 10 evaluated at once;
* ``gpu_busy_ms`` (the union of kernel intervals) and ``gpu_span_ms``
  (first kernel start to last kernel end) per call;
* ``kernels_us``: GPU time per kernel name per call (the route, gate_up
  and down kernels, and any other).

Wall much above span: the host (Python, MLX's encoding, the launch and
the synchronization); span above busy: gaps between kernels.
"""

import functools
import json
import statistics
import sys
import time

import mlx.core as mx
from cupti import kernel_timeline

import moefuse_runtime
from moefuse_runtime import bench
from moefuse_runtime.cuda.bench import LAYER_SHAPES

CALLS = 10


def one_call_ms(call) -> float:
    samples = []
    for _ in range(CALLS + 1):
        mx.synchronize()
        start = time.perf_counter()
        mx.eval(call())
        mx.synchronize()
        samples.append(time.perf_counter() - start)
    return 1e3 * statistics.median(samples[1:])


def batched_ms(call) -> float:
    mx.synchronize()
    start = time.perf_counter()
    mx.eval([call() for _ in range(CALLS)])
    mx.synchronize()
    return 1e3 * (time.perf_counter() - start) / CALLS


def timeline(call) -> dict:
    """GPU busy, span and per-kernel time of one call, averaged over CALLS."""

    def run() -> None:
        mx.eval(call())
        mx.synchronize()

    return kernel_timeline(run, CALLS)


def main(out_path: str, token_counts: list[int]) -> None:
    rows = []
    for shape, (hidden, experts, top_k, width) in LAYER_SHAPES.items():
        layer = bench.make_layer(hidden, experts, width, "4bit", seed=0)
        report = moefuse_runtime.install(layer, reserve_bytes=0)
        for tokens in token_counts:
            x = mx.random.normal((tokens, hidden)).astype(mx.bfloat16)
            indices = mx.random.randint(0, experts, (tokens, top_k)).astype(mx.uint32)
            mx.eval(x, indices)

            call = functools.partial(layer, x, indices)
            flops = 2 * tokens * top_k * hidden * 3 * width
            row = {"shape": shape, "tokens": tokens, "path": report.layers[0].compute_path}
            row["wall_ms"] = one_call_ms(call)
            row["batched_ms"] = batched_ms(call)
            row.update(timeline(call))
            row["tflops"] = {
                k: flops / row[k] / 1e9
                for k in ("wall_ms", "batched_ms", "gpu_span_ms")
                if row[k] > 0  # no CUDA timeline on another backend
            }
            print(
                f"{shape} {tokens} tokens: wall {row['wall_ms']:.3f} ms, batched "
                f"{row['batched_ms']:.3f}, GPU span {row['gpu_span_ms']:.3f}, busy "
                f"{row['gpu_busy_ms']:.3f}",
                flush=True,
            )
            for name, us in list(row["kernels_us"].items())[:6]:
                print(f"    {us:9.1f} us  {name}", flush=True)
            rows.append(row)
        bench.free(layer)
    with open(out_path, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], [int(a) for a in sys.argv[2:]] or [2048, 8192])
