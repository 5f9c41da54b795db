"""Where a served decode step's host time goes on CUDA: MLX's encoding of each
primitive, and one decode step split into graph building, ``mx.async_eval``
and what the GPU has left after it.

    python3 scripts/profile/profile_server_step.py OUT.json [--sequences 1 32]
        [--preset qwen3-30b-a3b --layers 48 --context 256 --steps 15]

The decode steps of ``mlx_lm.server`` never wait for the GPU (its steps timed
inside the server, docs/benchmarks.md): the host bounds them. This times
that host work with each step serialized (the GPU idle when it begins):

* ``primitives``: a chain of 480 of one op (an elementwise multiply, a
  custom kernel, ``quantized_matmul``, a bf16 matmul), microseconds per op
  to build, to encode and launch (``mx.async_eval``), and of GPU time left
  after (CUDA only);
* ``steps``: one decode step of plain (mlx-lm's layers), fused (as
  installed) and bound (every MoE FFN a broadcast of its input, as the
  server benchmark's bound), with the cache ``mlx_lm generate`` uses
  (``kv``: KVCache), with the server's (``batch``: BatchKVCache, whose
  array mask keeps MLX's CUDA attention off its vector kernel) and with
  the server's without that mask at one token (``batch_unmasked``: the
  same math when nothing is padded); in the main thread and in a worker
  thread, as the server's generation thread runs it. Milliseconds,
  medians of ``--steps``; plain and fused twice, alternating, bound once
  (last: it patches mlx-lm's SwitchGLU for good);
* ``pipelined``: the same steps as a server's generation thread runs them
  (``batch`` cache, in a worker thread): each step built and handed to
  ``mx.async_eval`` before the previous step's tokens are read, so the GPU
  runs one step while the host builds the next; ``server``: the same, then
  one ``.item()`` per sequence as ``mlx_lm.server`` reads each response's
  log-probability, the first of which waits for the next step's GPU work.
  ``period_ms`` per step and, on CUDA (CUPTI through PyTorch's profiler),
  ``gpu_busy_ms`` per step: a period the GPU is busy for most of is bound
  by the GPU, not the host.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import threading
import time
from collections.abc import Callable

import mlx.core as mx

CHAIN = 480
CACHES = ("kv", "batch", "batch_unmasked")
PREFILL_TOKENS = 2048


def serialized(build: Callable[[], mx.array], repeats: int) -> dict:
    """Medians of ``repeats`` runs (after 2 warm-ups) of: build the graph,
    ``mx.async_eval`` it, wait for the GPU; milliseconds each."""
    parts: dict[str, list[float]] = {"build_ms": [], "async_eval_ms": [], "gpu_after_ms": []}
    for i in range(repeats + 2):
        mx.synchronize()
        start = time.perf_counter()
        out = build()
        built = time.perf_counter()
        mx.async_eval(out)
        launched = time.perf_counter()
        mx.synchronize()
        if i >= 2:
            parts["build_ms"].append(1e3 * (built - start))
            parts["async_eval_ms"].append(1e3 * (launched - built))
            parts["gpu_after_ms"].append(1e3 * (time.perf_counter() - launched))
    return {key: statistics.median(values) for key, values in parts.items()}


def overlapped(step: Callable[[], mx.array], repeats: int, per_sequence: bool) -> dict:
    """``repeats`` steps as mlx-lm's BatchGenerator runs them: the next step
    built and launched before the current one's tokens are read. With
    ``per_sequence``, then one ``.item()`` per sequence on a new op of the
    current step's output, as ``mlx_lm.server`` reads each response's
    log-probability (``r.logprobs[r.token].item()``): on one stream, the
    first of those waits for the whole next step. Per step: the period, and
    the GPU's busy time where CUPTI is there."""

    def run() -> None:
        current = step()
        mx.async_eval(current)
        for _ in range(repeats):
            following = step()
            mx.async_eval(following)
            tokens = current.tolist()
            if per_sequence:
                for s in range(len(tokens)):
                    current[s].item()
            current = following
        current.tolist()

    run()  # warm-up
    start = time.perf_counter()
    run()
    figures = {"period_ms": 1e3 * (time.perf_counter() - start) / (repeats + 1)}
    if mx.default_device() == mx.gpu:
        from cupti import kernel_timeline

        busy = kernel_timeline(run, 1)["gpu_busy_ms"]
        figures["gpu_busy_ms"] = busy / (repeats + 1)
    return figures


def primitives(repeats: int) -> dict:
    """Microseconds per op of a chain of CHAIN ops of each kind."""
    x0 = mx.random.normal((1, 2048)).astype(mx.bfloat16)
    w = (mx.random.normal((2048, 2048)) * 0.02).astype(mx.bfloat16)
    qw, qs, qb = mx.quantize(w, group_size=64, bits=4)
    copy = mx.fast.cuda_kernel(
        name="profile_copy",
        input_names=["a"],
        output_names=["o"],
        source="int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < a_shape[1]) o[i] = a[i];",
    )
    ops: dict[str, Callable[[mx.array], mx.array]] = {
        "multiply": lambda x: x * 1.001,
        "custom_kernel": lambda x: copy(
            inputs=[x],
            output_shapes=[x.shape],
            output_dtypes=[x.dtype],
            grid=(2048, 1, 1),
            threadgroup=(256, 1, 1),
        )[0],
        "quantized_matmul": lambda x: mx.quantized_matmul(x, qw, qs, qb, group_size=64, bits=4),
        "matmul_bf16": lambda x: x @ w,
    }

    def chain(op):
        def build():
            x = x0
            for _ in range(CHAIN):
                x = op(x)
            return x

        return build

    return {
        name: {
            k.replace("_ms", "_us"): 1e3 * v / CHAIN
            for k, v in serialized(chain(op), repeats).items()
        }
        for name, op in ops.items()
    }


def in_thread(fn: Callable[[], dict]) -> dict:
    box: dict = {}
    worker = threading.Thread(target=lambda: box.setdefault("value", fn()))
    worker.start()
    worker.join()
    return box["value"]


class Steps:
    """Decode steps of one model after a ``context``-token prompt, its
    sequences never padded."""

    def __init__(self, model, sequences: int, context: int, repeats: int) -> None:
        self.model, self.sequences, self.context, self.repeats = model, sequences, context, repeats

    def run(self, kind: str, pipelined: str = "") -> dict:
        from mlx_lm.models import cache

        batch = cache.BatchKVCache
        masked = batch.make_mask
        if kind == "kv":
            caches = [cache.KVCache() for _ in self.model.layers]
        else:
            caches = [batch(left_padding=[0] * self.sequences) for _ in self.model.layers]
        if kind == "batch_unmasked":
            batch.make_mask = _without_mask(masked)
        try:
            prompt = mx.random.randint(0, 1000, (self.sequences, self.context))
            state = {"y": self.prefill(prompt, caches)}

            def step():
                logits = self.model(state["y"][:, None], cache=caches)
                state["y"] = mx.argmax(logits[:, -1], axis=-1)
                return state["y"]

            if pipelined:
                return overlapped(step, self.repeats, per_sequence=pipelined == "server")
            return serialized(step, self.repeats)
        finally:
            batch.make_mask = masked

    def prefill(self, prompt: mx.array, caches: list) -> mx.array:
        """The prompt in chunks of about PREFILL_TOKENS tokens, as a server
        prefills: MLX's CUDA graph of one 32 x 256-token unfused call fails
        to build (cuGraphAddKernelNode: invalid argument, H100, MLX 0.32.4)."""
        width = max(1, PREFILL_TOKENS // self.sequences)
        for start in range(0, prompt.shape[1], width):
            logits = self.model(prompt[:, start : start + width], cache=caches)
            mx.eval(logits)
        return mx.argmax(logits[:, -1], axis=-1)


def _without_mask(masked):
    """BatchKVCache.make_mask with no mask for one token (nothing is padded here)."""

    def make_mask(self, n, *args, return_array=False, **kwargs):
        if n == 1 and not return_array:
            return None
        return masked(self, n, *args, return_array=return_array, **kwargs)

    return make_mask


def all_steps(model, label: str, args, out: dict) -> None:
    for sequences in args.sequences:
        steps = Steps(model, sequences, args.context, args.steps)
        for kind in CACHES:
            for where in ("main", "thread"):
                run = functools.partial(steps.run, kind)
                figures = run() if where == "main" else in_thread(run)
                out.setdefault(f"{sequences} {label} {kind} {where}", []).append(figures)
                shown = ", ".join(f"{k} {v:.2f}" for k, v in figures.items())
                print(f"{sequences} sequences, {label}, {kind}, {where}: {shown}", flush=True)
        for pipelined in ("pipelined", "server"):
            figures = in_thread(functools.partial(steps.run, "batch", pipelined=pipelined))
            out.setdefault(f"{sequences} {label} batch {pipelined}", []).append(figures)
            shown = ", ".join(f"{k} {v:.2f}" for k, v in figures.items())
            print(f"{sequences} sequences, {label}, batch, {pipelined}: {shown}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--sequences", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--preset", default="qwen3-30b-a3b")
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()

    import moefuse_runtime
    from moefuse_runtime.demo import build_demo_model
    from moefuse_runtime.server_bench import ffn_free

    result: dict = {"args": vars(args), "device": mx.device_info().get("device_name", "cpu")}
    if mx.default_device() == mx.gpu:
        result["primitives"] = primitives(7)
        for name, figures in result["primitives"].items():
            print(name, {k: round(v, 2) for k, v in figures.items()}, flush=True)
    dtype = mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32
    model = build_demo_model(args.preset, layers=args.layers, dtype=dtype).eval()
    steps: dict = {}
    for round_ in range(2):
        all_steps(model, "plain", args, steps)
        report = moefuse_runtime.install(model, reserve_bytes=0)
        if round_ == 0:
            result["install"] = report.summary()
        all_steps(model, "fused", args, steps)
        moefuse_runtime.uninstall(model)
    ffn_free("mlx_lm")
    all_steps(model, "bound", args, steps)
    result["steps"] = steps
    result["medians"] = {
        key: {k: statistics.median(f[k] for f in runs) for k in runs[0]}
        for key, runs in steps.items()
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
