"""Benchmarks: fused vs unfused SwitchGLU, per layer and per model.

Method, the same everywhere: warm-up first; every timed region ends with
``mx.eval`` and ``mx.synchronize``; A (unfused) and B (fused) alternate round
by round on rotating inputs; figures are medians with the spread (min..max)
beside them; the machine's streaming bandwidth is measured in the same run, so
each layer's effective bandwidth is reported as a fraction of it (roofline).
"""

from __future__ import annotations

import functools
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU

from . import projections
from .cuda.jit import mlx_version
from .installer import install
from .presets import DENSE_SHAPES, LAYER_SHAPES, TOKENS


def sync() -> None:
    mx.synchronize()


def timed(fn: Callable[[], object]) -> float:
    """Seconds for one call of ``fn``, its outputs evaluated and synchronized."""
    sync()
    start = time.perf_counter()
    mx.eval(fn())
    sync()
    return time.perf_counter() - start


def summary(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def streaming_bandwidth(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes/s of an elementwise pass (read + write) in the default dtype path."""
    x = mx.random.normal((nbytes // 2,)).astype(mx.bfloat16)
    mx.eval(x)
    for _ in range(2):
        timed(lambda: x * 2)
    seconds = statistics.median(timed(lambda: x * 2) for _ in range(repeats))
    return 2 * nbytes / seconds


def make_layer(hidden: int, experts: int, width: int, kind: str, seed: int) -> SwitchGLU:
    """One SwitchGLU with random weights: ``kind`` is 'bf16', 'fp32' or '<b>bit'."""
    mx.random.seed(seed)
    layer = SwitchGLU(hidden, width, experts)
    dtype = mx.float32 if kind == "fp32" else mx.bfloat16
    for name in ("gate_proj", "up_proj", "down_proj"):
        proj = layer[name]
        proj.weight = (mx.random.normal(proj.weight.shape) * 0.02).astype(dtype)
        mx.eval(proj.weight)
        if kind.endswith("bit"):
            layer[name] = proj.to_quantized(group_size=64, bits=int(kind[:-3]))
        mx.eval(layer[name].parameters())
    return layer


@dataclass(frozen=True)
class LayerRow:
    shape: str
    kind: str
    tokens: int
    unfused_ms: dict[str, float]
    fused_ms: dict[str, float]
    ratio: float
    """unfused / fused median time: above 1 means fusion is faster."""
    weight_bytes: int
    """Bytes of the distinct experts' weights one call reads (per layer)."""
    unfused_gbps: float
    fused_gbps: float
    fused_roofline: float


def layer_stacks(
    hidden: int, experts: int, width: int, kind: str, layers: int
) -> tuple[list[SwitchGLU], list[SwitchGLU]]:
    """``layers`` distinct random layers, and the same layers fused."""
    unfused = [make_layer(hidden, experts, width, kind, seed) for seed in range(layers)]
    fused = [make_layer(hidden, experts, width, kind, seed) for seed in range(layers)]
    for layer in fused:
        install(layer, reserve_bytes=0)
    return unfused, fused


def bench_layers(
    shape: str,
    kind: str,
    tokens: tuple[int, ...] = TOKENS,
    layers: int = 4,
    rounds: int = 20,
    stream_bps: float = 0.0,
    scale: int = 1,
) -> list[LayerRow]:
    """Time ``layers`` distinct layers (so weights do not sit in cache), A/B."""
    hidden, experts, top_k, width = LAYER_SHAPES[shape]
    # Scaled widths stay multiples of 64 (the quantization group size).
    experts, width = max(top_k, experts // scale), max(64, width // scale // 64 * 64)
    unfused, fused = layer_stacks(hidden, experts, width, kind, layers)
    per_expert = expert_bytes(unfused[0], experts)
    dtype = mx.float32 if kind == "fp32" else mx.bfloat16
    rows = []
    for n in tokens:
        inputs = [
            (
                mx.random.normal((1, n, hidden)).astype(dtype),
                mx.random.randint(0, experts, (1, n, top_k)).astype(mx.uint32),
            )
            for _ in range(4)
        ]
        mx.eval(inputs)
        times = _time_ab(unfused, fused, inputs, rounds)
        distinct = statistics.mean(len(set(cast(list, i.flatten().tolist()))) for _, i in inputs)
        label = shape if scale == 1 else f"{shape}/{scale}"
        rows.append(_row(label, kind, n, times, int(distinct * per_expert), stream_bps))
    return rows


def make_dense(hidden: int, width: int, kind: str, seed: int) -> nn.Module:
    """mlx-lm's llama MLP with random weights: 'bf16', 'fp32' or '<b>bit'."""
    from types import SimpleNamespace

    from mlx_lm.models.llama import MLP

    mx.random.seed(seed)
    mlp = MLP(cast(Any, SimpleNamespace(hidden_size=hidden, intermediate_size=width)))
    dtype = mx.float32 if kind == "fp32" else mx.bfloat16
    for name in ("gate_proj", "up_proj", "down_proj"):
        mlp[name].weight = (mx.random.normal(mlp[name].weight.shape) * 0.02).astype(dtype)
    if kind.endswith("bit"):
        nn.quantize(mlp, 64, int(kind[:-3]))
    mx.eval(mlp.parameters())
    return mlp


def bench_dense(
    shape: str,
    kind: str,
    tokens: tuple[int, ...] = TOKENS,
    layers: int = 4,
    rounds: int = 20,
    stream_bps: float = 0.0,
    scale: int = 1,
) -> list[LayerRow]:
    """Dense gated MLPs, unfused vs install(dense=True), A/B like bench_layers."""
    hidden, width = DENSE_SHAPES[shape]
    width = max(64, width // scale // 64 * 64)
    unfused = [make_dense(hidden, width, kind, seed) for seed in range(layers)]
    fused = [make_dense(hidden, width, kind, seed) for seed in range(layers)]
    for mlp in fused:
        install(mlp, reserve_bytes=0, dense=True)
    weight_bytes = sum(
        projections.nbytes(unfused[0][k]) for k in ("gate_proj", "up_proj", "down_proj")
    )
    dtype = mx.float32 if kind == "fp32" else mx.bfloat16
    rows = []
    for n in tokens:
        inputs = [(mx.random.normal((1, n, hidden)).astype(dtype),) for _ in range(4)]
        mx.eval(inputs)
        times = _time_ab(unfused, fused, inputs, rounds)
        label = f"dense {shape}" if scale == 1 else f"dense {shape}/{scale}"
        rows.append(_row(label, kind, n, times, weight_bytes, stream_bps))
    return rows


def _call_each(modules: list, args: tuple) -> list[mx.array]:
    return [m(*args) for m in modules]


def _time_ab(unfused: list, fused: list, inputs: list[tuple], rounds: int) -> dict:
    """ms per layer of each stack, A and B alternating round by round on
    rotating inputs, after two warm-up rounds."""
    times: dict[str, list[float]] = {"unfused": [], "fused": []}
    for r in range(rounds + 2):
        args = inputs[r % len(inputs)]
        for name, stack in (("unfused", unfused), ("fused", fused)):
            seconds = timed(functools.partial(_call_each, stack, args)) / len(stack)
            if r >= 2:
                times[name].append(seconds * 1e3)
    return times


def _row(
    label: str, kind: str, tokens: int, times: dict, weight_bytes: int, stream_bps: float
) -> LayerRow:
    med = {k: statistics.median(v) for k, v in times.items()}
    gbps = {k: weight_bytes / (v / 1e3) / 1e9 for k, v in med.items()}
    return LayerRow(
        label,
        kind,
        tokens,
        summary(times["unfused"]),
        summary(times["fused"]),
        med["unfused"] / med["fused"],
        weight_bytes,
        gbps["unfused"],
        gbps["fused"],
        gbps["fused"] * 1e9 / stream_bps if stream_bps else 0.0,
    )


def expert_bytes(layer: SwitchGLU, experts: int) -> int:
    """Bytes of one expert's gate, up and down (weights, scales, biases)."""
    total = sum(projections.nbytes(layer[k]) for k in ("gate_proj", "up_proj", "down_proj"))
    return total // experts


def free(*objects: object) -> None:
    del objects
    gc.collect()
    mx.clear_cache()


def as_dicts(rows: list) -> list[dict]:
    return [asdict(r) for r in rows]


def bench_model(
    build: Callable[[], nn.Module],
    prompt_tokens: int = 512,
    decode_tokens: int = 64,
    rounds: int = 5,
    dense: bool = False,
) -> dict:
    """Decode and prefill tok/s of two copies of a model, one fused; A/B rounds.

    Also the install cost: seconds, peak extra memory and active memory
    before/after. Greedy tokens of both copies must match.
    """
    from .demo import greedy_tokens

    unfused = build()
    fused = build()
    gc.collect()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    report = install(fused, reserve_bytes=0, dense=dense)
    install_cost = {
        "dense_fused": sum(
            r.layer_type != "SwitchGLU" for r in report.layers if r.path in report.fused
        ),
        "seconds": report.seconds,
        "peak_extra_bytes": mx.get_peak_memory() - before,
        "active_bytes_before": before,
        "active_bytes_after": mx.get_active_memory(),
        "fused_layers": len(report.fused),
        "total_layers": report.total,
        "max_layer_bytes": report.max_layer_bytes,
    }
    vocab = unfused.args.vocab_size
    prompt = mx.random.randint(0, vocab, (prompt_tokens,)).astype(mx.uint32)
    results: dict[str, dict[str, list[float]]] = {
        name: {"decode_tok_s": [], "prefill_tok_s": []} for name in ("unfused", "fused")
    }
    tokens: dict[str, list[int]] = {}
    for r in range(rounds + 1):
        for name, model in (("unfused", unfused), ("fused", fused)):
            prefill = timed(functools.partial(model, prompt[None]))
            tokens[name], decode = greedy_tokens(model, prompt, decode_tokens)
            if r > 0:  # round 0 is warm-up
                results[name]["prefill_tok_s"].append(prompt_tokens / prefill)
                results[name]["decode_tok_s"].append(decode)
    medians = {
        name: {k: summary(v) for k, v in metrics.items()} for name, metrics in results.items()
    }
    return {
        "install": install_cost,
        "rounds": rounds,
        "prompt_tokens": prompt_tokens,
        "decode_tokens": decode_tokens,
        **medians,
        "decode_ratio": medians["fused"]["decode_tok_s"]["median"]
        / medians["unfused"]["decode_tok_s"]["median"],
        "prefill_ratio": medians["fused"]["prefill_tok_s"]["median"]
        / medians["unfused"]["prefill_tok_s"]["median"],
        "greedy_tokens_match": tokens["fused"] == tokens["unfused"],
    }


def plot(layer_rows: list[dict], path: str) -> None:
    """Fused/unfused speed ratio per token count, one line per shape and kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    series: dict[str, list[dict]] = {}
    for row in layer_rows:
        series.setdefault(f"{row['shape']} {row['kind']}", []).append(row)
    for label, rows in series.items():
        n = [r["tokens"] for r in rows]
        left.plot(n, [r["ratio"] for r in rows], marker="o", label=label)
        right.plot(n, [r["fused_roofline"] for r in rows], marker="o", label=label)
    left.axhline(1.0, color="grey", linewidth=0.8)
    left.set(
        xscale="log",
        xlabel="tokens",
        ylabel="unfused time / fused time",
        title="Speed-up of gate+up fusion per MoE layer",
    )
    right.set(
        xscale="log",
        xlabel="tokens",
        ylabel="fraction of streaming bandwidth",
        title="Fused layer: effective weight bandwidth",
    )
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_suite(
    out_dir: str,
    *,
    shapes: list[str],
    kinds: list[str],
    tokens: tuple[int, ...] = TOKENS,
    layers: int = 4,
    rounds: int = 20,
    scale: int = 1,
    model_preset: str = "qwen3-30b-a3b",
    model_layers: int = 8,
    model_rounds: int = 5,
    decode_tokens: int = 64,
    dense_shapes: tuple[str, ...] = (),
    model_dense: bool = False,
    log: Callable[[str], None] = lambda _: None,
) -> dict:
    """The whole suite; writes ``bench.json`` and ``bench.png`` to ``out_dir``."""
    import json
    import os
    import platform

    from .demo import build_demo_model

    os.makedirs(out_dir, exist_ok=True)
    stream = streaming_bandwidth(1 << 28 if scale > 1 else 1 << 30)
    log(f"streaming bandwidth: {stream / 1e9:.0f} GB/s")
    result: dict[str, Any] = {
        "device": mx.device_info().get("device_name", str(mx.default_device())),
        "backend": str(mx.default_device()),
        "mlx": mlx_version(),
        "python": platform.python_version(),
        "streaming_bandwidth_bytes_per_s": stream,
        "layers": [],
    }

    def save() -> None:  # after every step: a crash later keeps what was measured
        with open(os.path.join(out_dir, "bench.json"), "w") as f:
            json.dump(result, f, indent=1)
        plot(result["layers"], os.path.join(out_dir, "bench.png"))

    for shape in shapes:
        for kind in kinds:
            rows = bench_layers(shape, kind, tokens, layers, rounds, stream, scale)
            for row in rows:
                log(format_layer_row(row))
            result["layers"] += as_dicts(rows)
            free()
            save()
    for shape in dense_shapes:
        for kind in kinds:
            rows = bench_dense(shape, kind, tokens, layers, rounds, stream, scale)
            for row in rows:
                log(format_layer_row(row))
            result["layers"] += as_dicts(rows)
            free()
            save()
    model = bench_model(
        lambda: build_demo_model(model_preset, layers=model_layers),
        decode_tokens=decode_tokens,
        rounds=model_rounds,
        dense=model_dense,
    )
    log(format_model(model))
    result["model"] = {
        "preset": model_preset,
        "layers": model_layers,
        "dense": model_dense,
        **model,
    }
    save()
    return result


LAYER_HEADER = f"{'shape':<37} kind  tokens  unfused ms  fused ms  ratio  fused GB/s  roofline"


def format_layer_row(row: LayerRow) -> str:
    return (
        f"{row.shape:<37} {row.kind:<5} {row.tokens:>6}  {row.unfused_ms['median']:>10.4f}"
        f"  {row.fused_ms['median']:>8.4f}  {row.ratio:>5.3f}  {row.fused_gbps:>10.1f}"
        f"  {row.fused_roofline:>8.3f}"
    )


def format_model(model: dict) -> str:
    u, f = model["unfused"], model["fused"]
    return (
        f"model decode tok/s: unfused {u['decode_tok_s']['median']:.2f} "
        f"[{u['decode_tok_s']['min']:.2f}..{u['decode_tok_s']['max']:.2f}], fused "
        f"{f['decode_tok_s']['median']:.2f} [{f['decode_tok_s']['min']:.2f}.."
        f"{f['decode_tok_s']['max']:.2f}], ratio {model['decode_ratio']:.3f}; prefill ratio "
        f"{model['prefill_ratio']:.3f}; greedy tokens match: {model['greedy_tokens_match']}; "
        f"{model['install']['dense_fused']} dense MLPs fused; "
        f"install {model['install']['seconds']:.2f} s, peak extra "
        f"{model['install']['peak_extra_bytes'] / 2**20:.1f} MiB"
    )
