"""GPU time per weight format and kernel path of one MoE layer (CUPTI).

    python3 scripts/profile/profile_formats.py OUT_DIR [--only TEXT ...] [--no-tilings]
        [--decode-only]

For each checkpoint format (Qwen3-30B-A3B dimensions in every affine width
and float format; GPT-OSS-120B with mxfp4, biases and SwigluOAI; DeepSeek-V3
with mxfp4 experts and a clamped activation; Mixtral 4-bit), one MoE layer
with random packed weights: GPU time of its kernels per call (torch.profiler
records MLX's kernels too), unfused (mlx-lm's gather_qmm) and fused (the
path install() picks), at one token (the decode kernels: fraction of the
streaming bandwidth, reading the routed experts' bytes) and at 512 tokens
(the tensor cores: TFLOP/s). Writes OUT_DIR/formats.json.

Two references per case at one token, in the same run:

* ``read_floor``: GPU time of two MLX reductions over contiguous buffers of
  the routed experts' gate_up and down bytes (two launches, as the decode
  kernels): what reading these bytes costs at this size, where a launch's
  ramp and DRAM latency weigh against a few MB.
* ``gate_up_tilings``: the decode gate_up kernel alone in each candidate
  tiling (outputs per warp, warps per block; decode.py), its GPU time and
  whether its output is bitwise the installed tiling's (the per-row
  arithmetic does not depend on the tiling).
"""

import argparse
import json
import os
import sys
from collections import defaultdict

import mlx.core as mx
from mlx_lm.models.activations import SwigluOAI
from mlx_lm.models.deepseek_v41 import DeepseekV41SwiGLU
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU

import moefuse_runtime
from moefuse_runtime import bench
from moefuse_runtime.cuda import decode
from moefuse_runtime.cuda.formats import QuantizedArrays

REPEATS = 20
GATE_UP_TILINGS = [(1, 8), (1, 4), (2, 4), (2, 8)]
TILING_CASES = (
    "qwen3 affine 4-bit g64",
    "qwen3 affine 8-bit g64",
    "qwen3 affine 3-bit g64",
    "qwen3 mxfp4",
    "gpt-oss-120b mxfp4 bias oai",
    "mixtral affine 4-bit g64",
)
QWEN3 = (2048, 128, 8, 768)  # hidden, experts, top-k, width
CASES = [
    *((f"qwen3 affine {b}-bit g64", QWEN3, ("affine", b, 64), {}) for b in (2, 3, 4, 5, 6, 8)),
    ("qwen3 mxfp4", QWEN3, ("mxfp4", 4, 32), {}),
    ("qwen3 nvfp4", QWEN3, ("nvfp4", 4, 16), {}),
    ("qwen3 nvfp4, down global scale", QWEN3, ("nvfp4", 4, 16), {"global_scale": True}),
    ("qwen3 mxfp8", QWEN3, ("mxfp8", 8, 32), {}),
    ("gpt-oss-120b mxfp4 bias oai", (2880, 128, 4, 2880), ("mxfp4", 4, 32),
     {"bias": True, "activation": SwigluOAI()}),
    ("deepseek-v3 mxfp4 limit 10", (7168, 256, 8, 2048), ("mxfp4", 4, 32),
     {"activation": DeepseekV41SwiGLU(10.0)}),
    ("mixtral affine 4-bit g64", (4096, 8, 2, 14336), ("affine", 4, 64), {}),
]  # fmt: skip


def make_layer(shape, quant, bias=False, activation=None, global_scale=False):
    hidden, experts, _, width = shape
    mode, bits, group = quant
    layer = SwitchGLU(hidden, width, experts, bias=bias)  # float weights never evaluated
    if activation is not None:
        layer.activation = activation
    for name, dims in (("gate_proj", (hidden, width)), ("up_proj", (hidden, width)),
                       ("down_proj", (width, hidden))):  # fmt: skip
        scale = global_scale and name == "down_proj"
        proj = QuantizedSwitchLinear(*dims, experts, bias, group, bits, mode, scale)
        if bias:
            proj.bias = (mx.random.normal(proj.bias.shape) * 0.1).astype(mx.bfloat16)
        if proj.get("biases") is not None:
            proj.scales, proj.biases = (
                proj.scales.astype(mx.bfloat16),
                proj.biases.astype(mx.bfloat16),
            )
        layer[name] = proj
        mx.eval(proj.parameters())
    return layer


def gpu_us(fn) -> float:
    """Device microseconds per call of every kernel ``fn`` launches."""
    from torch.profiler import ProfilerActivity, profile  # the lent GPU has it

    mx.eval(fn())
    mx.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPEATS):
            mx.eval(fn())
        mx.synchronize()
    totals = defaultdict(float)
    for event in prof.events():
        if event.device_type.name == "CUDA" and event.device_time_total > 0:
            totals[event.name] += event.device_time_total / REPEATS
    return sum(totals.values())


def routing(tokens, experts, top_k, seed=0):
    mx.random.seed(seed)
    scores = mx.random.uniform(shape=(tokens, experts))
    return mx.argpartition(-scores, top_k - 1, axis=-1)[:, :top_k].astype(mx.uint32)


def expert_bytes(layer, name) -> float:
    proj = layer[name]
    experts = proj["weight"].shape[0]
    return sum(v.nbytes for k, v in proj.parameters().items() if hasattr(v, "nbytes")) / experts


def read_floor_us(split: tuple[float, float], distinct: int) -> float:
    """GPU time of reading the routed experts' bytes (gate_up's and down's,
    per expert) in two reductions."""
    buffers = [mx.ones((int(b * distinct) // 4,), dtype=mx.uint32) for b in split]
    mx.eval(buffers)
    return gpu_us(lambda: [mx.max(b) for b in buffers])


def gate_up_tilings(layer, x, indices) -> dict:
    """The fused layer's decode gate_up kernel in each tiling: GPU us, and
    whether it gives the installed tiling's output bitwise."""
    kernels = layer.kernels.decode
    arrays = QuantizedArrays.of(layer.gate_up_proj)
    flat = decode.flat_uint32(indices)
    rows = x.reshape(-1, x.shape[-1])

    def run(outs, warps):
        return decode.gather_qmv(rows, arrays, flat, activation=kernels.activation,
                                 x_div=indices.shape[-1], outs=outs, warps=warps)  # fmt: skip

    reference = run(*kernels.gate_up_tiling)
    result = {}
    for tiling in GATE_UP_TILINGS:
        same = mx.array_equal(run(*tiling), reference).item()
        result[f"{tiling[0]}x{tiling[1]}"] = {"gpu_us": gpu_us(lambda t=tiling: run(*t)),
                                             "bitwise_as_installed": same}  # fmt: skip
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--only", nargs="*", default=[], help="cases whose label has any of these")
    parser.add_argument("--no-tilings", action="store_true", help="skip the gate_up tiling A/B")
    parser.add_argument("--decode-only", action="store_true", help="one token only, no 512")
    args = parser.parse_args()
    out = args.out
    os.makedirs(out, exist_ok=True)
    stream = bench.streaming_bandwidth()
    print(f"streaming bandwidth {stream / 1e9:.0f} GB/s", flush=True)
    rows = []
    cases = [c for c in CASES if not args.only or any(o in c[0] for o in args.only)]
    for label, shape, quant, extra in cases:
        hidden, experts, top_k, width = shape
        layer = make_layer(shape, quant, **extra)
        split = (expert_bytes(layer, "gate_proj") + expert_bytes(layer, "up_proj"),
                 expert_bytes(layer, "down_proj"))  # fmt: skip
        per_expert = sum(split)
        inputs = {}
        for tokens in (1,) if args.decode_only else (1, 512):
            x = mx.random.normal((tokens, hidden)).astype(mx.bfloat16)
            indices = routing(tokens, experts, top_k)
            inputs[tokens] = (x, indices, len(set(indices.reshape(-1).tolist())))
        row = {"case": label, "shape": shape, "quant": quant, "bytes_per_expert": per_expert}
        for variant in ("unfused", "fused"):
            if variant == "fused":
                report = moefuse_runtime.install(layer, reserve_bytes=0)
                row["compute_path"] = report.layers[0].compute_path
            for tokens, (x, indices, distinct) in inputs.items():
                us = gpu_us(lambda x=x, indices=indices, layer=layer: layer(x, indices))
                flops = 6 * tokens * top_k * hidden * width
                row[f"{variant}_{tokens}"] = {
                    "gpu_us": us,
                    "stream_fraction": distinct * per_expert / (us * 1e-6) / stream,
                    "tflops": flops / (us * 1e-6) / 1e12,
                }
        x1, indices1, distinct1 = inputs[1]
        floor = read_floor_us(split, distinct1)
        row["read_floor_1"] = {
            "gpu_us": floor,
            "stream_fraction": distinct1 * per_expert / (floor * 1e-6) / stream,
        }
        if label in TILING_CASES and layer.kernels is not None and not args.no_tilings:
            row["gate_up_tilings"] = gate_up_tilings(layer, x1, indices1)
            print(f"  gate_up tilings: {row['gate_up_tilings']}", flush=True)
        rows.append(row)
        one = row["fused_1"]
        line = (
            f"{label}: 1 token {one['gpu_us']:.1f} us ({one['stream_fraction']:.0%} of stream; "
            f"gather_qmm {row['unfused_1']['gpu_us']:.1f}; read floor {floor:.1f} us, "
            f"{row['read_floor_1']['stream_fraction']:.0%})"
        )
        if "fused_512" in row:
            many = row["fused_512"]
            line += f"; 512 tokens {many['gpu_us']:.0f} us {many['tflops']:.0f} TFLOP/s "
            line += f"(gather_qmm {row['unfused_512']['tflops']:.1f})"
        print(f"{line}; {row['compute_path']}", flush=True)
        del layer
        mx.clear_cache()
        with open(os.path.join(out, "formats.json"), "w") as f:
            json.dump({"streaming_bandwidth_bytes_per_s": stream, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
