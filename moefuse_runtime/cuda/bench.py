"""Benchmarks of the CUDA kernel paths (``moefuse bench --cuda``, lent GPU).

One run measures, variants interleaved round by round, medians:

* ``model``: a Qwen3-30B-A3B-dimension model (random 4-bit weights, bf16):
  prefill (512 and 2,048 tokens) and one batched decode step (4, 16, 32 and
  64 sequences), for ``unfused`` (mlx-lm), ``fused`` (as install() selects:
  kernels) and ``bound`` (every MoE FFN replaced by a broadcast of its
  input: no FFN kernel can do better).
  ``batched_prefill``: prompts of several sequences at once, right-padded
  into one batch as mlx-lm's ``BatchGenerator`` prefills a server's
  concurrent prompts (its attention takes an array mask), from random
  tokens and from a 31-token vocabulary (the server benchmark's prompts'
  words, whose routing crowds fewer experts).
* ``layers``: one MoE layer's FLOP rate at 512 and 2,048 tokens (Qwen3 and
  Mixtral dimensions): unfused, fused, PyTorch's bf16 ``torch._grouped_mm``
  on the same routing (the peer, when PyTorch is there) and MLX's dense bf16
  matmul of the same FLOPs (the machine's reference).
* ``pairs``: one Qwen3 layer from 1 to 16,384 tokens at top-8: unfused,
  fused ``gather_qmm``, the decode kernels and the tensor-core kernels, each
  forced, and the path install() selects, to show the crossovers that the
  selection follows.
* ``fidelity``: teacher-forced top-1 agreement of unfused and fused with a
  float32 evaluation of the same model, over a 512-token prompt (the
  tensor-core path). Three 48-layer copies: on an 80 GB GPU run it in a
  process of its own (after ``model`` in the same process it ran out of
  memory on the H100).
* ``stream``: single-stream decode of the same model with mlx-lm's own
  loop (``generate_step``, which builds step n + 1 while the GPU runs step
  n): unfused, fused (kernels and compiled MoE blocks, as install()
  selects), fused with the blocks uncompiled, and the FFN-free bound with
  the blocks uncompiled (the bound as defined before blocks compiled) and
  compiled.

``model`` and ``stream`` time the fused model with its MoE blocks compiled
(``fused``) and uncompiled (``fused_uncompiled_blocks``), the blocks
switched between rounds by their class (`use_blocks`).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import mlx.core as mx

from .. import bench, blocks
from ..installer import install
from ..server_bench import WORDS as SERVER_PROMPT_WORDS
from ..walk import find_switch_glus
from . import jit

LAYER_SHAPES = {"qwen3-30b-a3b": (2048, 128, 8, 768), "mixtral-8x7b": (4096, 8, 2, 14336)}
LAYER_TOKENS = (512, 2048)
PREFILL_TOKENS = (512, 2048)
DECODE_BATCHES = (4, 16, 32, 64)
PAIR_SWEEP_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
DECODE_CONTEXT = 128
FIDELITY_TOKENS = 512
CONTEXT_CHUNK = 32
STREAM_TOKENS = 96
STREAM_PROMPT = 32


def seconds_of(fn: Callable[[], object], inner: int = 1) -> float:
    """Wall seconds of one call, outputs evaluated and the device synchronized."""
    mx.synchronize()
    start = time.perf_counter()
    for _ in range(inner):
        mx.eval(fn())
    mx.synchronize()
    return (time.perf_counter() - start) / inner


def interleaved(
    variants: dict[str, Callable[[], object]],
    rounds: int,
    prepare: Callable[[str], object] = lambda _: None,
) -> dict[str, list]:
    """Seconds per variant per round, variants alternating; one warm-up round.
    ``prepare(name)`` runs before each variant's call, outside the timing."""
    times: dict[str, Any] = {k: [] for k in variants}  # seconds, or why the variant failed
    for r in range(rounds + 1):
        for name, fn in variants.items():
            try:
                prepare(name)
                seconds = seconds_of(fn)
            except Exception as error:  # noqa: BLE001 - a variant that fails is recorded
                times[name] = f"failed: {type(error).__name__}: {error}"[:300]
                continue
            if r and isinstance(times[name], list):
                times[name].append(seconds)
    return times


class BroadcastFFN:
    """A kernel path that replaces the MoE FFN by a broadcast of its input."""

    def __call__(self, layer, gate_up_proj, x, indices):
        return mx.broadcast_to(mx.expand_dims(x, -2), (*indices.shape, x.shape[-1]))


def use_kernels(layers: list, chosen: list) -> None:
    """Give each fused layer its kernel paths (a variant's, between timed calls).

    ``layers`` is found once, before timing: a walk of a model's modules
    inside a timed call would count against the variants that swap kernels
    and not against unfused."""
    for layer, kernels in zip(layers, chosen, strict=True):
        layer.kernels = kernels


def use_blocks(compiled: list, on: bool) -> None:
    """Switch the fused model's compiled MoE blocks on or off (their class),
    keeping the graphs each has traced."""
    for block in compiled:
        base = blocks.own_class(block)
        block.__class__ = blocks.compiled_class_for(base) if on else base


def use_graphs(compiled: list, states: list) -> None:
    """Give each compiled block the graphs traced for the kernels its layers
    have now: a block's graph keeps the kernels it was traced with
    (`blocks.recompile`), so each kernel choice of the benchmark keeps its own
    across rounds, and no round pays a trace."""
    for block, state in zip(compiled, states, strict=True):
        block.__dict__[blocks.STATE] = state


def decode_cache(model, batch: int):
    """A prompt cache holding a DECODE_CONTEXT-token context of ``batch``
    sequences, filled CONTEXT_CHUNK tokens per call: mlx-lm's gather_qmm
    fails at 65,536 pairs or more in one call (64 x 128 x 8)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    for _ in range(DECODE_CONTEXT // CONTEXT_CHUNK):
        mx.eval(model.model(mx.random.randint(0, 1000, (batch, CONTEXT_CHUNK)), cache=cache))
    return cache


def _ratios(times: dict[str, list], base: str = "unfused") -> dict[str, float]:
    """Median over rounds of base time / variant time (paired per round)."""
    out = {}
    for name, samples in times.items():
        if isinstance(samples, list) and isinstance(times[base], list) and samples:
            out[name] = statistics.median(b / s for b, s in zip(times[base], samples, strict=True))
    return out


def batched_prompt_cache(model, lengths: list[int]) -> list:
    """The cache mlx-lm's BatchGenerator prefills a batch of new prompts into:
    one cache per sequence, merged, prepared for the right padding of the
    shorter prompts."""
    from mlx_lm.models.cache import make_prompt_cache

    per_sequence = [make_prompt_cache(model) for _ in lengths]
    merged = [caches[0].merge(list(caches)) for caches in zip(*per_sequence, strict=True)]
    longest = max(lengths)
    for cache in merged:
        cache.prepare(lengths=lengths, right_padding=[longest - n for n in lengths])
    return merged


def batched_prompts(sequences: int, tokens: int, vocabulary: int) -> tuple[mx.array, list[int]]:
    """``sequences`` prompts of 95% to 100% of ``tokens`` tokens drawn from
    ``vocabulary`` ids, right-padded with 0; and their lengths."""
    lengths = [tokens - (tokens // 20) * i // max(1, sequences - 1) for i in range(sequences)]
    ids = mx.random.randint(0, vocabulary, (sequences, tokens))
    keep = mx.arange(tokens)[None] < mx.array(lengths)[:, None]
    return mx.where(keep, ids, 0), lengths


def bench_model(
    layers: int,
    rounds: int,
    log: Callable[[str], None],
    prefill_tokens=PREFILL_TOKENS,
    decode_batches=DECODE_BATCHES,
    batched_prefill: tuple[int, int] | None = None,
) -> dict:
    """Prefill tok/s (one prompt; with ``batched_prefill`` (sequences,
    tokens), also a padded batch of prompts) and batched decode steps:
    unfused, fused, bound."""
    from mlx_lm.models.cache import make_prompt_cache  # prefill: an empty cache

    plain, fused, report = _model_pair(layers)
    setup = _Variants(plain, fused)

    def trunk(model, tokens, cache):
        return model.model(tokens, cache=cache)  # hidden states of every layer

    result: dict[str, Any] = {
        "layers": layers,
        "paths": sorted({r.compute_path for r in report.layers}),
        "notes": list(report.notes),
        "prefill": [],
        "decode": [],
    }
    prefill_variants = ("unfused", "fused", "bound")  # no prompt runs compiled blocks

    def prefill_fn(name, prompt):
        def run():
            model = setup.model(name)
            return trunk(model, prompt, make_prompt_cache(model))

        return run

    for n in prefill_tokens:
        prompt = mx.random.randint(0, 1000, (1, n))
        times = interleaved(
            {k: prefill_fn(k, prompt) for k in prefill_variants}, rounds, prepare=setup.use
        )
        row: dict[str, Any] = {
            "tokens": n,
            "tok_s": {k: n / statistics.median(v) for k, v in times.items() if isinstance(v, list)},
            "speedup": _ratios(times),
            "failures": _failures(times),
        }
        result["prefill"].append(row)
        log(f"prefill {n}: " + _format(row["tok_s"], "tok/s") + _format_ratios(row["speedup"]))
    if batched_prefill:
        result["batched_prefill"] = []
        sequences, n = batched_prefill
        for vocabulary in (1000, len(SERVER_PROMPT_WORDS)):
            prompts, lengths = batched_prompts(sequences, n, vocabulary)

            def batched_fn(name, prompts=prompts, lengths=lengths):
                def run():
                    model = setup.model(name)
                    return trunk(model, prompts, batched_prompt_cache(model, lengths))

                return run

            times = interleaved(
                {k: batched_fn(k) for k in prefill_variants}, rounds, prepare=setup.use
            )
            padded = sequences * n
            row = {
                "sequences": sequences,
                "tokens": n,
                "vocabulary": vocabulary,
                "seconds": {
                    k: statistics.median(v) for k, v in times.items() if isinstance(v, list)
                },
                "padded_tok_s": {
                    k: padded / statistics.median(v)
                    for k, v in times.items()
                    if isinstance(v, list)
                },
                "speedup": _ratios(times),
                "failures": _failures(times),
            }
            result["batched_prefill"].append(row)
            log(
                f"batched prefill {sequences} x {n}, {vocabulary} token ids: "
                + _format(row["seconds"], "s")
                + _format_ratios(row["speedup"])
            )
    for batch in decode_batches:
        caches = {}  # the last batch's caches go before this batch's are built
        for name in setup.DECODE:
            caches[name] = decode_cache(setup.use(name), batch)
        step = mx.random.randint(0, 1000, (batch, 1))

        def decode_fn(name, step=step, caches=caches):
            def run():
                return setup.model(name)(step, cache=caches[name])  # logits, as a server's step

            return run

        times = interleaved({k: decode_fn(k) for k in setup.DECODE}, rounds, prepare=setup.use)
        row = {
            "sequences": batch,
            "step_ms": {
                k: 1e3 * statistics.median(v) for k, v in times.items() if isinstance(v, list)
            },
            "speedup": _ratios(times),
            "failures": _failures(times),
        }
        result["decode"].append(row)
        log(
            f"decode step, {batch} sequences: "
            + _format(row["step_ms"], "ms")
            + _format_ratios(row["speedup"])
        )
    setup.use("fused")
    bench.free(plain, fused)
    return result


def _model_pair(layers: int, preset: str = "qwen3-30b-a3b", dtype: mx.Dtype = mx.bfloat16):
    """An unfused and an installed copy of the demo model, both in eval mode
    as mlx_lm.load leaves a model (in training mode the MoE blocks would run
    uncompiled, and ``fused`` would time the same as
    ``fused_uncompiled_blocks``); with the install report."""
    from ..demo import build_demo_model

    plain, fused = (build_demo_model(preset, layers=layers, dtype=dtype) for _ in range(2))
    return plain, fused, install(fused, reserve_bytes=0)


class _Variants:
    """One unfused and one fused model, and the variants timed on them: the
    fused model's kernels and compiled blocks are switched per variant."""

    DECODE = ("unfused", "fused", "fused_uncompiled_blocks", "bound", "bound_compiled_blocks")

    def __init__(self, plain, fused) -> None:
        self.plain, self.fused = plain, fused
        self.layers = [layer for _, layer in find_switch_glus(fused)]  # found once
        self.kernels = [layer.kernels for layer in self.layers]
        self.free = [BroadcastFFN()] * len(self.layers)
        self.blocks = [m for m in fused.modules() if blocks.is_compiled(m)]
        self.graphs = {
            "fused": [b.__dict__[blocks.STATE] for b in self.blocks],
            "bound": [type(b.__dict__[blocks.STATE])() for b in self.blocks],
        }

    def model(self, name: str):
        """The model variant ``name`` calls."""
        return self.plain if name == "unfused" else self.fused

    def use(self, name: str):
        """Set the fused model up as variant ``name`` (outside timed calls);
        the model to call."""
        if name != "unfused":
            choice = "bound" if name.startswith("bound") else "fused"
            use_kernels(self.layers, self.free if choice == "bound" else self.kernels)
            use_graphs(self.blocks, self.graphs[choice])
            use_blocks(self.blocks, name in ("fused", "bound_compiled_blocks"))
        return self.model(name)


def bench_stream(
    layers: int,
    rounds: int,
    log: Callable[[str], None],
    tokens: int = STREAM_TOKENS,
    preset: str = "qwen3-30b-a3b",
    dtype: mx.Dtype = mx.bfloat16,
) -> dict:
    """Single-stream decode with mlx-lm's own loop, variants interleaved per
    round: tok/s of each round (tokens after the first over their seconds)
    and of its median interval; ratios paired per round against unfused."""
    from ..demo import decode_intervals

    plain, fused, report = _model_pair(layers, preset, dtype)
    setup = _Variants(plain, fused)
    prompt = mx.random.randint(0, 1000, (STREAM_PROMPT,)).astype(mx.uint32)
    seconds: dict[str, list[float]] = {k: [] for k in setup.DECODE}  # mean per token, per round
    median: dict[str, list[float]] = {k: [] for k in setup.DECODE}
    for r in range(rounds + 1):  # round 0 warms up (kernels, traces)
        for name in setup.DECODE:
            _, gaps = decode_intervals(setup.use(name), prompt, tokens)
            if r:
                seconds[name].append(sum(gaps) / len(gaps))
                median[name].append(statistics.median(gaps))
    result: dict[str, Any] = {
        "layers": layers,
        "tokens": tokens,
        "rounds": rounds,
        "paths": sorted({r.compute_path for r in report.layers}),
        "notes": list(report.notes),
        "tok_s": {k: 1 / statistics.median(v) for k, v in seconds.items()},
        "speedup": _ratios(seconds),
        "speedup_median_interval": _ratios(median),
        "seconds_per_token": seconds,
    }
    log(
        f"single-stream decode, {layers} layers, {tokens} tokens: "
        + _format(result["tok_s"], "tok/s")
        + _format_ratios(result["speedup"])
    )
    setup.use("fused")
    bench.free(plain, fused)
    return result


def bench_fidelity(layers: int, tokens: int, log: Callable[[str], None]) -> dict:
    """Teacher-forced top-1 agreement with a float32 evaluation, prefill path.

    One prompt of ``tokens`` random tokens through three copies of the same
    model: bf16 unfused (mlx-lm), bf16 fused (kernels) and a float32 copy
    (the same quantized weights; scales, biases and activations in float32).
    At every position: does the top-1 token match the float32 copy's, and
    the logits' relative error.
    """
    from ..demo import build_demo_model

    def build():
        return build_demo_model("qwen3-30b-a3b", layers=layers, dtype=mx.bfloat16)

    plain, fused, reference = build(), build(), build()
    install(fused, reserve_bytes=0)
    reference.set_dtype(mx.float32)
    prompt = mx.random.randint(0, 1000, (1, tokens))
    ref = reference(prompt).astype(mx.float32)
    mx.eval(ref)
    ref_top = mx.argmax(ref, axis=-1)
    result: dict[str, Any] = {"layers": layers, "tokens": tokens}
    for name, model in (("unfused", plain), ("fused", fused)):
        logits = model(prompt).astype(mx.float32)
        agree = mx.mean(mx.argmax(logits, axis=-1) == ref_top).item()
        error = (mx.linalg.norm((logits - ref).flatten()) / mx.linalg.norm(ref.flatten())).item()
        result[name] = {"top1_agreement": agree, "logits_rel_error": error}
    log(
        f"fidelity vs float32, {layers} layers, {tokens} tokens: "
        + ", ".join(
            f"{k} top-1 {v['top1_agreement']:.4f} (logits rel. error {v['logits_rel_error']:.2e})"
            for k, v in result.items()
            if isinstance(v, dict)
        )
    )
    bench.free(plain, fused, reference)
    return result


def _failures(times: dict) -> dict[str, str]:
    return {k: v for k, v in times.items() if isinstance(v, str)}


def _format(values: dict[str, float], unit: str) -> str:
    return ", ".join(f"{k} {v:.1f} {unit}" for k, v in values.items())


def _format_ratios(ratios: dict[str, float]) -> str:
    return " | x" + ", x".join(f"{v:.2f} {k}" for k, v in ratios.items() if k != "unfused")


def torch_grouped_mm_seconds(hidden: int, experts: int, width: int, indices, rounds: int):
    """PyTorch's bf16 grouped GEMM on the same routing: gate_up + down, or None."""
    try:
        import numpy as np
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() or not hasattr(torch, "_grouped_mm"):
        return None
    idx = np.array(indices).reshape(-1)
    offs = torch.tensor(
        np.cumsum(np.bincount(idx, minlength=experts)), dtype=torch.int32, device="cuda"
    )
    bf16 = {"device": "cuda", "dtype": torch.bfloat16}
    a, h = torch.randn(idx.size, hidden, **bf16), torch.randn(idx.size, width, **bf16)
    w1 = torch.randn(experts, hidden, 2 * width, **bf16)
    w2 = torch.randn(experts, width, hidden, **bf16)

    def run():
        torch._grouped_mm(a, w1, offs=offs)
        torch._grouped_mm(h, w2, offs=offs)

    run()
    samples = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def bench_layers(
    rounds: int, log: Callable[[str], None], tokens: tuple[int, ...] = LAYER_TOKENS
) -> list[dict]:
    """TFLOP/s of one MoE layer: unfused, fused, torch peer, dense reference."""
    rows = []
    for shape, (hidden, experts, top_k, width) in LAYER_SHAPES.items():
        unfused = bench.make_layer(hidden, experts, width, "4bit", seed=0)
        fused = bench.make_layer(hidden, experts, width, "4bit", seed=0)
        install(fused, reserve_bytes=0)
        for n in tokens:
            x = mx.random.normal((n, hidden)).astype(mx.bfloat16)
            indices = mx.random.randint(0, experts, (n, top_k)).astype(mx.uint32)
            pairs = n * top_k
            dense_x = mx.random.normal((pairs, hidden)).astype(mx.bfloat16)
            dense_w = mx.random.normal((hidden, 3 * width)).astype(mx.bfloat16)
            mx.eval(x, indices, dense_x, dense_w)
            flops = 2 * pairs * hidden * 3 * width  # gate, up and down
            times = interleaved(
                {
                    "unfused": functools.partial(unfused, x, indices),
                    "fused": functools.partial(fused, x, indices),
                    "dense_bf16_matmul": functools.partial(mx.matmul, dense_x, dense_w),
                },
                rounds,
            )
            tflops = {
                k: flops / statistics.median(v) / 1e12
                for k, v in times.items()
                if isinstance(v, list)
            }
            peer = torch_grouped_mm_seconds(hidden, experts, width, indices, rounds)
            if peer is not None:
                tflops["torch_grouped_mm_bf16"] = flops / peer / 1e12
            rows.append(
                {
                    "shape": shape,
                    "tokens": n,
                    "pairs": pairs,
                    "flops": flops,
                    "tflops": tflops,
                    "failures": _failures(times),
                }
            )
            log(f"layer {shape} {n} tokens: " + _format(tflops, "TFLOP/s"))
        bench.free(unfused, fused)
    return rows


def bench_pairs(rounds: int, log: Callable[[str], None]) -> list[dict]:
    """One Qwen3 layer per path, each forced, from 1 to 16,384 tokens at top-8."""
    hidden, experts, top_k, width = LAYER_SHAPES["qwen3-30b-a3b"]
    unfused = bench.make_layer(hidden, experts, width, "4bit", seed=0)
    fused = bench.make_layer(hidden, experts, width, "4bit", seed=0)
    install(fused, reserve_bytes=0)
    chosen = fused.kernels
    forced = {  # each bound as install binds, with the decode range moved
        "fused_gather_qmm": None,
        "decode_kernels": dataclasses.replace(
            chosen, decode=dataclasses.replace(chosen.decode, max_pairs=1 << 30)
        ),
        "tensor_cores": dataclasses.replace(
            chosen, decode=dataclasses.replace(chosen.decode, max_pairs=0)
        ),
        "installed": chosen,
    }

    def on(path, x, indices):
        def run():
            fused.kernels = forced[path]
            return fused(x, indices)

        return run

    rows = []
    for n in PAIR_SWEEP_TOKENS:
        x = mx.random.normal((n, hidden)).astype(mx.bfloat16)
        indices = mx.random.randint(0, experts, (n, top_k)).astype(mx.uint32)
        mx.eval(x, indices)
        variants = {
            "unfused": lambda x=x, i=indices: unfused(x, i),
            **{p: on(p, x, indices) for p in forced},
        }
        if n * top_k > 4096:
            del variants["decode_kernels"]  # a GEMV per pair: far behind, and slow to time
        times = interleaved(variants, rounds)
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items() if isinstance(v, list)}
        rows.append({"tokens": n, "pairs": n * top_k, "ms": ms, "failures": _failures(times)})
        failed = ", ".join(_failures(times))
        log(f"pairs {n * top_k}: " + _format(ms, "ms") + (f" | failed: {failed}" if failed else ""))
    fused.kernels = chosen
    bench.free(unfused, fused)
    return rows


def run(
    out_dir: str,
    *,
    layers: int = 48,
    rounds: int = 7,
    parts=("layers", "model", "pairs"),
    prefill_tokens=PREFILL_TOKENS,
    decode_batches=DECODE_BATCHES,
    batched_prefill: tuple[int, int] | None = None,
    layer_tokens: tuple[int, ...] = LAYER_TOKENS,
    stream_tokens: int = STREAM_TOKENS,
    log: Callable[[str], None] = lambda _: None,
) -> dict:
    """The CUDA suite; writes ``cuda.json`` (after each part) and ``cuda.png``."""
    import json
    import os

    os.makedirs(out_dir, exist_ok=True)
    result: dict[str, Any] = {
        "device": mx.device_info().get("device_name"),
        "mlx": jit.mlx_version(),
        "streaming_bandwidth_bytes_per_s": bench.streaming_bandwidth(),
    }
    for part in parts:
        if part == "layers":
            result["layers"] = bench_layers(rounds, log, layer_tokens)
        elif part == "model":
            result["model"] = bench_model(
                layers, rounds, log, prefill_tokens, decode_batches, batched_prefill
            )
        elif part == "pairs":
            result["pairs"] = bench_pairs(rounds, log)
        elif part == "fidelity":
            result["fidelity"] = bench_fidelity(layers, FIDELITY_TOKENS, log)
        elif part == "stream":
            result["stream"] = bench_stream(layers, rounds, log, stream_tokens)
        with open(os.path.join(out_dir, "cuda.json"), "w") as f:  # a later crash keeps it
            json.dump(result, f, indent=1)
        plot(result, os.path.join(out_dir, "cuda.png"))
    return result


def plot(result: dict, path: str) -> None:
    """Per-layer time against pairs per path (or, for a stream-only run,
    each round's ms per token per variant), and the model ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    if result.get("pairs") or "stream" not in result:
        _plot_pairs(left, result.get("pairs", []))
    else:
        _plot_stream_rounds(left, result["stream"])
    model = result.get("model", {})
    labels, fused, bound = [], [], []
    for r in model.get("prefill", []):
        labels.append(f"prefill {r['tokens']}")
        fused.append(r["speedup"].get("fused", 0))
        bound.append(r["speedup"].get("bound", 0))
    for r in model.get("decode", []):
        labels.append(f"decode x{r['sequences']}")
        fused.append(r["speedup"].get("fused", 0))
        bound.append(r["speedup"].get("bound", 0))
    if "stream" in result:
        labels.append("single stream")
        fused.append(result["stream"]["speedup"].get("fused", 0))
        bound.append(result["stream"]["speedup"].get("bound", 0))
    if labels:
        pos = range(len(labels))
        right.bar([p - 0.2 for p in pos], fused, width=0.4, label="fused (kernels)")
        right.bar([p + 0.2 for p in pos], bound, width=0.4, label="FFN-free bound")
        right.set_xticks(list(pos), labels, rotation=30, fontsize=7)
        layers = model.get("layers") or result.get("stream", {}).get("layers")
        right.set(
            ylabel="speed-up over unfused (median of paired rounds)", title=f"{layers}-layer model"
        )
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_pairs(ax, rows: list[dict]) -> None:
    for path_name in ("unfused", "fused_gather_qmm", "decode_kernels", "tensor_cores", "installed"):
        points = [(r["pairs"], r["ms"][path_name]) for r in rows if path_name in r["ms"]]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=path_name)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="(token, expert) pairs",
        ylabel="ms per layer",
        title="Qwen3-30B-A3B MoE layer, 4-bit, per path",
    )
    if rows:
        ax.legend(fontsize=7)


def _plot_stream_rounds(ax, stream: dict) -> None:
    for name, seconds in stream["seconds_per_token"].items():
        ax.plot(range(1, len(seconds) + 1), [1e3 * s for s in seconds], marker="o", label=name)
    ax.set(
        xlabel="round",
        ylabel="ms per token (mean over the round)",
        title=f"single-stream decode, {stream['tokens']} tokens per round",
    )
    ax.legend(fontsize=7)
