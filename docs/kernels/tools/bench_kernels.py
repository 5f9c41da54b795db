"""The CUDA decode kernels against gather_qmm: MoE FFN per layer, and decode.

    python3 scripts/bench_kernels.py OUT_DIR [--model-layers 48] [--steps 256]

Writes OUT_DIR/kernels.json after every step. Three paths per layer, timed in
interleaved rounds on rotating inputs (medians, spread beside them):
``unfused`` (mlx-lm's SwitchGLU: two gather_qmm, activation, gather_qmm),
``fused`` (one gather_qmm for gate+up, MOEFUSE_KERNEL=0) and ``kernel`` (the
two kernels, forced at every token count to find the crossover). Bytes moved
are the distinct routed experts' packed weights, scales and biases; floor time
is bytes over the streaming bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys

import mlx.core as mx

from moefuse_runtime import bench, find_switch_glus, install, kernels

SHAPES = {"qwen3-30b-a3b": ("4bit", "8bit"), "mixtral-8x7b": ("4bit",)}
TOKENS = (1, 2, 4, 8, 16)
PATHS = ("unfused", "fused", "kernel")
DECODE_PATHS = (*PATHS, "uncompiled", "ffn_free")
"""kernel: as install() selects it (compiled); uncompiled: the same kernels
without mx.compile (v4); ffn_free: every MoE FFN replaced by a view of its
input (no kernel at all), the upper bound on what any FFN kernel can do for
decode speed."""


class FreeFFN:
    def takes(self, layer, x, indices):
        return indices.size <= kernels.MAX_MAX_PAIRS

    def __call__(self, layer, x, indices):
        return mx.broadcast_to(mx.expand_dims(x, -2), (*indices.shape, x.shape[-1]))


def layer_stacks(shape: str, kind: str, layers: int):
    hidden, experts, _, width = bench.LAYER_SHAPES[shape]
    return bench.layer_stacks(hidden, experts, width, kind, layers)


def forced_kernels(fused) -> list:
    """Each fused layer's kernels as install() selected them, taking any
    number of pairs (to find the crossover)."""
    return [
        dataclasses.replace(kernels.kernels_for(layer)[0], max_pairs=1 << 30) for layer in fused
    ]


def run_paths(unfused, fused, forced, path: str, x, indices):
    if path == "unfused":
        return [layer(x, indices) for layer in unfused]
    out = []
    for layer, chosen in zip(fused, forced, strict=True):
        layer.decode_kernels = chosen if path == "kernel" else None
        out.append(layer(x, indices))
    return out


def bench_ffn(shape: str, kind: str, layers: int, rounds: int, stream: float) -> list[dict]:
    hidden, experts, top_k, width = bench.LAYER_SHAPES[shape]
    unfused, fused = layer_stacks(shape, kind, layers)
    forced = forced_kernels(fused)
    per_expert = bench.expert_bytes(unfused[0], experts)
    rows = []
    for n in TOKENS:
        inputs = [
            (
                mx.random.normal((1, n, hidden)).astype(mx.bfloat16),
                mx.random.randint(0, experts, (1, n, top_k)).astype(mx.uint32),
            )
            for _ in range(4)
        ]
        mx.eval(inputs)
        # Agreement first: the kernel against the gather_qmm path, same inputs.
        x, idx = inputs[0]
        ref = run_paths(unfused, fused, forced, "unfused", x, idx)[0].astype(mx.float32)
        got = run_paths(unfused, fused, forced, "kernel", x, idx)[0].astype(mx.float32)
        rel = (mx.linalg.norm((got - ref).flatten()) / mx.linalg.norm(ref.flatten())).item()
        times = {p: [] for p in PATHS}
        for r in range(rounds + 2):
            args = inputs[r % len(inputs)]
            for p in PATHS:
                seconds = bench.timed(lambda p=p, a=args: run_paths(unfused, fused, forced, p, *a))
                if r >= 2:
                    times[p].append(seconds / layers * 1e3)
        distinct = statistics.mean(len(set(i.flatten().tolist())) for _, i in inputs)
        nbytes = distinct * per_expert
        med = {p: statistics.median(v) for p, v in times.items()}
        row = {
            "shape": shape,
            "kind": kind,
            "tokens": n,
            "pairs": n * top_k,
            "bytes": nbytes,
            "floor_ms": nbytes / stream * 1e3,
            "ms": {p: bench.summary(v) for p, v in times.items()},
            "fraction_of_stream": {p: nbytes / (med[p] / 1e3) / stream for p in PATHS},
            "kernel_speedup_vs_unfused": med["unfused"] / med["kernel"],
            "kernel_speedup_vs_fused": med["fused"] / med["kernel"],
            "kernel_rel_error_vs_unfused": rel,
        }
        rows.append(row)
        print(
            f"{shape:<14} {kind} tokens {n:>2}: floor {row['floor_ms']:.4f} ms | "
            + " | ".join(f"{p} {med[p]:.4f} ms ({row['fraction_of_stream'][p]:.0%})" for p in PATHS)
            + f" | kernel x{row['kernel_speedup_vs_unfused']:.2f} vs unfused, rel err {rel:.1e}",
            flush=True,
        )
    bench.free(unfused, fused)
    return rows


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def bench_decode(model_layers: int, steps: int, rounds: int, check: bool = True) -> dict:
    """Decode tok/s per path, rounds interleaved; ratios are paired per round
    (each path against the unfused run of the same round)."""
    from moefuse_runtime.demo import build_demo_model, decode_intervals

    def build():
        return build_demo_model("qwen3-30b-a3b", layers=model_layers, dtype=mx.bfloat16)

    plain, fused = build(), build()
    report = install(fused, reserve_bytes=0)
    paths = sorted({r.compute_path for r in report.layers})
    kernel_state = [(layer, layer.decode_kernels) for _, layer in find_switch_glus(fused)]
    variants = [
        {
            "kernel": chosen,
            "uncompiled": chosen and dataclasses.replace(chosen, compiled=False),
            "ffn_free": FreeFFN(),
        }
        for _, chosen in kernel_state
    ]
    prompt = mx.random.randint(0, plain.args.vocab_size, (32,)).astype(mx.uint32)
    tok_s = {p: [] for p in DECODE_PATHS}
    step_tok_s = {p: [] for p in DECODE_PATHS}
    tokens = {p: [] for p in DECODE_PATHS}
    for r in range(rounds + 1):  # round 0 warms up (JIT, compile) and is not timed
        for p in DECODE_PATHS:
            for (layer, _), paths_of_layer in zip(kernel_state, variants, strict=True):
                layer.decode_kernels = paths_of_layer.get(p)
            out, gaps = decode_intervals(plain if p == "unfused" else fused, prompt, steps)
            tokens[p].append(out)
            speed = len(gaps) / sum(gaps)
            if r > 0:
                tok_s[p].append(speed)
                step_tok_s[p].append(1 / statistics.median(gaps))
            print(f"decode round {r} {p}: {speed:.1f} tok/s", flush=True)
    quality = fidelity(plain, fused, kernel_state, model_layers, steps, prompt) if check else None

    def paired(samples):
        return {
            p: bench.summary([a / b for a, b in zip(samples[p], samples["unfused"], strict=True)])
            for p in DECODE_PATHS
        }

    unfused_first = tokens["unfused"][0]
    return {
        "model_layers": model_layers,
        "steps": steps,
        "rounds": rounds,
        "compute_paths": paths,
        "tok_s": {p: bench.summary(v) for p, v in tok_s.items()},
        "tok_s_of_median_step": {p: bench.summary(v) for p, v in step_tok_s.items()},
        "vs_unfused_paired": paired(tok_s),
        "vs_unfused_paired_median_step": paired(step_tok_s),
        "first_token_difference_vs_unfused_round_0": {
            p: [first_difference(unfused_first, t) for t in v] for p, v in tokens.items()
        },
        "fidelity": quality,
    }


def teacher_forced(model, prompt, steps: int, forced: list[int] | None = None):
    """Logits of ``steps`` one-token steps through the KV cache, feeding
    ``forced`` tokens (or the model's own greedy ones); (tokens, logits)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(prompt[None], cache=cache)[0, -1].astype(mx.float32)
    tokens, rows = [], []
    for i in range(steps):
        rows.append(logits)
        tokens.append(int(mx.argmax(logits).item()))
        feed = tokens[-1] if forced is None else forced[i]
        logits = model(mx.array([[feed]]), cache=cache)[0, -1].astype(mx.float32)
    return tokens, mx.stack(rows)


def fidelity(plain, fused, kernel_state, model_layers: int, steps: int, prompt) -> dict:
    """How closely each bf16 path follows a float32 copy of the same model.

    The copy holds the same quantized weights with float32 scales, norms and
    activations (a more exact evaluation of the same network). Its greedy
    tokens are fed to every path; per step we compare the top-1 token and,
    over all steps, the logits' relative error.
    """
    from moefuse_runtime.demo import build_demo_model

    reference = build_demo_model("qwen3-30b-a3b", layers=model_layers, dtype=mx.bfloat16)
    reference.set_dtype(mx.float32)
    ref_tokens, ref_logits = teacher_forced(reference, prompt, steps)
    del reference
    bench.free()
    out = {}
    for p in PATHS:
        for layer, chosen in kernel_state:
            layer.decode_kernels = chosen if p == "kernel" else None
        model = plain if p == "unfused" else fused
        tokens, logits = teacher_forced(model, prompt, steps, ref_tokens)
        agree = sum(a == b for a, b in zip(tokens, ref_tokens, strict=True)) / steps
        err = (mx.linalg.norm(logits - ref_logits) / mx.linalg.norm(ref_logits)).item()
        out[p] = {"top1_agreement_with_float32": agree, "logits_rel_error_vs_float32": err}
        print(f"fidelity {p}: top-1 agreement {agree:.3f}, logits rel error {err:.2e}", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--layers", type=int, default=6, help="distinct layers per FFN timing")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--model-layers", type=int, default=48)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--model-rounds", type=int, default=7)
    parser.add_argument("--skip-ffn", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-fidelity", action="store_true")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    stream = bench.streaming_bandwidth()
    result = {
        "device": mx.device_info().get("device_name", str(mx.default_device())),
        "mlx": mx.__version__,
        "command": " ".join(["python3", *sys.argv]),
        "streaming_bandwidth_bytes_per_s": stream,
        "ffn": [],
    }
    print(f"streaming bandwidth {stream / 1e9:.0f} GB/s", flush=True)

    def save():
        with open(os.path.join(args.out, "kernels.json"), "w") as f:
            json.dump(result, f, indent=1)

    if not args.skip_ffn:
        for shape, kinds in SHAPES.items():
            for kind in kinds:
                result["ffn"] += bench_ffn(shape, kind, args.layers, args.rounds, stream)
                save()
    if not args.skip_decode:
        result["decode"] = bench_decode(
            args.model_layers, args.steps, args.model_rounds, not args.skip_fidelity
        )
        print(json.dumps(result["decode"], indent=1), flush=True)
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
