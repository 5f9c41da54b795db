"""A real-server benchmark: a server plain and under ``moefuse run``.

``moefuse bench --server`` writes a model directory (the demo model at a
preset's dimensions: random 4-bit weights, the demo tokenizer, mlx-lm's
``save_model``; mlx-vlm loads it as its own ``qwen3_moe``), or takes the
user's own (``--server-model DIR``, any local mlx-lm model), then for each
round starts three fresh servers of one program (`APPS`: ``mlx_lm.server``
or ``mlx_vlm.server``) in turn, each on 127.0.0.1 and stopped by its pid
when done:

* ``plain``: the program itself (``python -m mlx_lm server``, say);
* ``fused``: the same command under ``moefuse run``;
* ``bound``: the plain server with every MoE FFN replaced by a broadcast of
  its input (`ffn_free`): the most any FFN could give this server, so
  that a ratio can be read against what the rest of the server leaves.

On each server, in order:

* ``start``: seconds from the process start until ``/health`` answers;
* ``load``: the first request (one token): the model loads, and in the fused
  server, install fuses and prepares the kernels;
* ``single``: requests one at a time (on the GPU four, so that one
  request's noise does not set the ratio);
* ``concurrent``: many requests, a fixed number in flight at a time;
* ``long_prompts``: a batch of long prompts sent at once, few tokens each.

The server loads its model on the first request, and every workload is the
first of its sizes in that process: compile stalls of either server land
inside them. Clients stream (server-sent events), so each request gives its
time to first token and the gaps between tokens. Reported per workload and
server: aggregate tokens/s, TTFT and per-token latency p50/p99, the ratios
fused/plain, and greedy agreement (temperature 0: the same text from both).
Batched greedy decoding is not reproducible across runs of one server (which
requests share a batch step depends on timing, and a batch's size changes
the matmul kernels and their rounding), so agreement is also reported
between runs of the same server: the reference for plain against fused.

Start-up is also timed on its own (``starts``): servers started and stopped
as soon as ``/health`` answers, plain and fused alternating, since one start
per server and round says little about a difference of a second. And the
first single request's prompt is decoded in mlx-lm's own loop (``mlx_lm
generate``, plain, under ``moefuse run`` and FFN-free; `model_loop`): the model's
time per token without a server, so that what the server adds per token
stands beside the single-request ratio; and by mlx-lm's ``BatchGenerator``
in a thread, as the server's generation thread runs it but with no HTTP
(`batch_decode`), its steps timed: what mlx-lm's batching adds to a step
apart from what the server around it adds. JSON plus a PNG.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

WORDS = (
    "model",
    "expert",
    "router",
    "token",
    "layer",
    "gate",
    "fused",
    "kernel",
    "memory",
    "server",
    "batch",
    "prompt",
    "cache",
    "weight",
    "matrix",
    "vector",
    "quantized",
    "group",
    "scale",
    "tensor",
    "stream",
    "decode",
    "prefill",
    "shard",
    "rank",
    "thread",
    "process",
    "device",
    "graph",
    "compile",
    "launch",
)
START_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 600


@dataclass(frozen=True)
class App:
    """A server program: how ``python -m`` starts it, the arguments it gets
    unless told otherwise, whether a request must name the model, and
    whether its decode steps are mlx-lm's ``GenerationBatch``'s
    (`trace_steps` times them)."""

    name: str
    module: tuple[str, ...]
    default_args: tuple[str, ...]
    names_model: bool = False
    batch_generator: bool = False


APPS = {
    "mlx_lm": App(
        "mlx_lm.server",
        ("mlx_lm", "server"),
        ("--decode-concurrency", "32", "--prompt-concurrency", "8"),
        batch_generator=True,
    ),
    # continuous batching by default; its request schema requires "model"
    "mlx_vlm": App("mlx_vlm.server", ("mlx_vlm.server",), ("--max-num-seqs", "32"), True),
}
"""The programs the benchmark serves with, by ``--server-app`` name."""


@dataclass(frozen=True)
class Workload:
    """``requests`` requests of ``prompt_words`` words, ``in_flight`` at a time,
    ``max_tokens`` each."""

    name: str
    requests: int
    in_flight: int
    prompt_words: int
    max_tokens: int


GPU_WORKLOADS = (
    Workload("single", 4, 1, 40, 128),
    Workload("concurrent", 64, 32, 62, 128),
    Workload("long_prompts", 16, 16, 240, 16),
)
"""About 166, 247 and 902 prompt tokens with the demo tokenizer and chat template."""
SMOKE_WORKLOADS = (
    Workload("single", 1, 1, 8, 8),
    Workload("concurrent", 4, 2, 16, 8),
    Workload("long_prompts", 3, 3, 48, 4),
)


def prompt(seed: int, words: int) -> str:
    """A prompt of its own (no prefix shared with another, so that no server's
    prompt cache serves one from another)."""
    rng = random.Random(seed)
    return f"Request {seed}: " + " ".join(rng.choice(WORDS) for _ in range(words))


@dataclass
class Reply:
    text: str = ""
    ttft_s: float = 0.0
    gaps_s: list[float] = field(default_factory=list)
    tokens: int = 0
    prompt_tokens: int = 0
    seconds: float = 0.0
    retries: int = 0


RETRIES = 3
"""Connections a request may retry when the server drops it before answering
(``ThreadingHTTPServer`` listens with a backlog of 5: a burst of connections
can be reset); each retry is counted in the results."""


def stream_chat(port: int, text: str, max_tokens: int, model: str | None = None) -> Reply:
    """One streamed chat completion at temperature 0, timed from its first try
    (``model``: the name the request gives, where the server needs one)."""
    start = time.perf_counter()
    for attempt in range(RETRIES + 1):
        try:
            reply = _stream_chat(port, text, max_tokens, model, start)
        except (ConnectionError, http.client.RemoteDisconnected, urllib.error.URLError):
            if attempt == RETRIES:
                raise
            time.sleep(0.1 * (attempt + 1))
            continue
        reply.retries = attempt
        return reply
    raise AssertionError("unreachable")


def _stream_chat(port: int, text: str, max_tokens: int, model: str | None, start: float) -> Reply:
    fields = {
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    body = json.dumps(fields if model is None else {"model": model, **fields}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    reply = Reply()
    last = None
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            usage = event.get("usage")
            if usage:
                reply.tokens = usage.get("completion_tokens", reply.tokens)
                reply.prompt_tokens = usage.get("prompt_tokens", 0)
            for choice in event.get("choices", []):
                piece = streamed_text(choice.get("delta") or {})
                if not piece:
                    continue
                now = time.perf_counter()
                if last is None:
                    reply.ttft_s = now - start
                else:
                    reply.gaps_s.append(now - last)
                last = now
                reply.text += piece
    reply.seconds = time.perf_counter() - start
    return reply


def streamed_text(delta: dict) -> str:
    """The text of one streamed chunk, reasoning included: a server whose chat
    template opens a thinking block streams the first tokens, or all of them,
    as ``reasoning`` (mlx_vlm.server, mlx_lm.server) or ``reasoning_content``."""
    return "".join(delta.get(key) or "" for key in ("reasoning_content", "reasoning", "content"))


LAUNCHER = "from moefuse_runtime.server_bench import serve; serve()"
"""Runs a server's command line (``sys.argv[1]``: the module ``python -m``
runs, then its arguments) with what the environment asks: `FFN_FREE_ENV`,
`TRACE_ENV`."""

FFN_FREE_ENV = "MOEFUSE_BENCH_FFN_FREE"
TRACE_ENV = "MOEFUSE_BENCH_TRACE"


def serve() -> None:
    """`LAUNCHER`: the server's module as ``__main__``, its MoE FFNs replaced
    (`FFN_FREE_ENV`, `ffn_free`), its decode steps timed (`TRACE_ENV`,
    `trace_steps`)."""
    import runpy

    module = sys.argv[1]
    if os.environ.get(FFN_FREE_ENV) == "1":
        ffn_free(module)
    if os.environ.get(TRACE_ENV):
        trace_steps(os.environ[TRACE_ENV])
    sys.argv = sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def ffn_free(module: str) -> None:
    """The forward of ``module``'s package's SwitchGLU (mlx-lm's or mlx-vlm's)
    replaced by a broadcast of its input, combined as that forward combines
    its output: the server's time without its MoE FFNs. Its replies mean
    nothing."""
    import importlib

    import mlx.core as mx

    from .layer import FLAVOURS

    for flavour in FLAVOURS:
        if flavour.module.split(".")[0] != module.split(".")[0]:
            continue
        finish = flavour.finish

        def forward(self, x: mx.array, indices: mx.array, *args, finish=finish, **kwargs):
            routed = mx.broadcast_to(mx.expand_dims(x, -2), (*indices.shape, x.shape[-1]))
            return finish(self, routed, *args, **kwargs)

        base = getattr(importlib.import_module(flavour.module), flavour.name)
        base.__call__ = forward


def trace_steps(path: str) -> None:
    """A host timeline of mlx-lm's ``GenerationBatch._step`` (a server's decode
    step), one JSON line per step appended to ``path``: when the step began
    (``time.perf_counter``, one clock for every process of the machine),
    the host time it spent building the step's graph (``build_s``: the
    model's forward and the sampling, up to ``mx.async_eval``), in
    ``async_eval`` (``launch_s``: MLX encodes and launches the kernels),
    waiting in ``mx.eval`` for the previous step's tokens (``wait_s``: the
    GPU is behind the host), the whole step (``step_s``) and the batch's
    sequences. A step that never waits is bound by the host: its GPU work
    ends before the host has the next one ready."""
    import importlib
    import json as json_
    import types

    import mlx.core as mx

    generate = importlib.import_module("mlx_lm.generate")  # the package's `generate` is a function
    if not callable(getattr(getattr(generate, "GenerationBatch", None), "_step", None)):
        print("moefuse bench: this mlx-lm has no GenerationBatch._step; steps not timed")
        return  # the server runs untimed; its summary has no `steps`

    out = open(path, "a", buffering=1)  # noqa: SIM115 - open for the process's life
    marks: dict[str, float] = {}

    def async_eval(*arrays):
        if "start" in marks:
            marks["built"] = time.perf_counter()
        mx.async_eval(*arrays)
        if "start" in marks:
            marks["launched"] = time.perf_counter()

    def eval_(*arrays):
        began = time.perf_counter()
        mx.eval(*arrays)
        if "start" in marks:
            marks["wait"] = marks.get("wait", 0.0) + time.perf_counter() - began

    timed = types.ModuleType("mlx.core (timed)")
    timed.__getattr__ = lambda name: getattr(mx, name)  # type: ignore[method-assign]
    timed.async_eval = async_eval  # type: ignore[attr-defined]
    timed.eval = eval_  # type: ignore[attr-defined]
    generate.mx = timed  # type: ignore[attr-defined]
    step = generate.GenerationBatch._step

    def timed_step(self):
        marks.clear()
        marks["start"] = start = time.perf_counter()
        result = step(self)
        end = time.perf_counter()
        built, launched = marks.get("built", start), marks.get("launched", start)
        row = {
            "start": start,
            "build_s": built - start,
            "launch_s": launched - built,
            "wait_s": marks.get("wait", 0.0),
            "step_s": end - start,
            "sequences": len(self.uids),
        }
        marks.clear()
        out.write(json_.dumps(row) + "\n")
        return result

    generate.GenerationBatch._step = timed_step  # type: ignore[method-assign]


def order(round_index: int, kinds: tuple[str, ...]) -> tuple[str, ...]:
    """The servers of a round, each round starting with the next kind."""
    k = round_index % len(kinds)
    return kinds[k:] + kinds[:k]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process (`App`) on 127.0.0.1, in a session of its own."""

    def __init__(
        self,
        app: App,
        model: Path,
        kind: str,
        log: Path,
        server_args: list[str],
        steps: Path | None = None,
    ):
        """``steps``: where `trace_steps` writes the decode steps' timeline
        (None: not timed, the program started as it is)."""
        self.port = free_port()
        self.model_name = str(model) if app.names_model else None
        arguments = [
            *app.module,
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *server_args,
        ]
        launched = steps is not None or kind == "bound"
        program = [sys.executable, *(("-c", LAUNCHER) if launched else ("-m",)), *arguments]
        if kind == "fused":
            program = [sys.executable, "-m", "moefuse_runtime.cli", "run", "--", *program]
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "EXO_FUSED_MOE": "1" if kind == "fused" else "0",
            FFN_FREE_ENV: "1" if kind == "bound" else "0",
            TRACE_ENV: str(steps or ""),
        }
        self.log_path = log
        self.log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            program, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def wait_healthy(self) -> float:
        """Seconds from the start until /health answers."""
        deadline = self.started + START_TIMEOUT_S
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return time.perf_counter() - self.started
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.05)
        raise TimeoutError(f"no /health within {START_TIMEOUT_S} s")

    def chat(self, text: str, max_tokens: int) -> Reply:
        return stream_chat(self.port, text, max_tokens, self.model_name)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_workload(server: Server, workload: Workload, seed: int) -> dict:
    """The workload's requests, ``in_flight`` at a time; its figures and texts."""
    prompts = [prompt(seed + i, workload.prompt_words) for i in range(workload.requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workload.in_flight) as pool:
        replies = list(pool.map(lambda p: server.chat(p, workload.max_tokens), prompts))
    seconds = time.perf_counter() - start
    tokens = sum(r.tokens for r in replies)
    ttfts = [r.ttft_s for r in replies]
    gaps = [g for r in replies for g in r.gaps_s]
    return {
        "seconds": seconds,
        "tokens": tokens,
        "tok_per_s": tokens / seconds,
        "prompt_tokens_mean": statistics.mean(r.prompt_tokens for r in replies),
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p99_s": percentile(ttfts, 0.99),
        "token_latency_p50_s": percentile(gaps, 0.5),
        "token_latency_p99_s": percentile(gaps, 0.99),
        "retries": sum(r.retries for r in replies),
        "ttfts_s": ttfts,
        "texts": [r.text for r in replies],
    }


def serve_once(
    app: App, model: Path, kind: str, workloads, log: Path, server_args: list[str]
) -> dict:
    """A fresh server: its start, its first request, then each workload, with
    its decode steps' host timeline per workload where the app's steps are
    mlx-lm's (`step_figures`)."""
    steps = log.with_suffix(".steps.jsonl") if app.batch_generator else None
    server = Server(app, model, kind, log, server_args, steps)
    windows = {}
    try:
        result: dict[str, Any] = {"start_s": server.wait_healthy()}
        load = time.perf_counter()
        server.chat("Hello", 1)
        result["load_s"] = time.perf_counter() - load
        for i, workload in enumerate(workloads):
            began = time.perf_counter()
            result[workload.name] = run_workload(server, workload, seed=1000 * (i + 1))
            windows[workload.name] = (began, time.perf_counter())
    finally:
        server.stop()
    if steps is not None and steps.exists():
        rows = [json.loads(line) for line in steps.read_text().splitlines() if line.strip()]
        for name, window in windows.items():
            result[name]["steps"] = step_figures(rows, window)
    result["install_log"] = [
        line for line in log.read_text().splitlines() if "moefuse_runtime" in line
    ][-6:]
    return result


def step_figures(rows: list[dict], window: tuple[float, float]) -> dict | None:
    """Medians, in ms, of the decode steps (`trace_steps`) that began inside
    ``window``: host time building the graph, launching it and waiting for
    the GPU, the step, the time from one step's start to the next one's
    (``period``) and what the server did between steps (``between``); and
    the share of steps that waited for the GPU at all (under 0.1 ms: not).
    None if no step began there."""
    began, ended = window
    inside = sorted((r for r in rows if began <= r["start"] <= ended), key=lambda r: r["start"])
    if not inside:
        return None
    periods = [b["start"] - a["start"] for a, b in pairwise(inside)] or [inside[0]["step_s"]]
    between = [p - r["step_s"] for p, r in zip(periods, inside, strict=False)]

    def ms(values) -> float:
        return 1e3 * statistics.median(values)

    return {
        "steps": len(inside),
        "sequences": statistics.median(r["sequences"] for r in inside),
        "build_ms": ms(r["build_s"] for r in inside),
        "launch_ms": ms(r["launch_s"] for r in inside),
        "wait_ms": ms(r["wait_s"] for r in inside),
        "step_ms": ms(r["step_s"] for r in inside),
        "period_ms": ms(periods),
        "between_ms": ms(between),
        "waiting_share": sum(r["wait_s"] > 1e-4 for r in inside) / len(inside),
    }


def identical(first: list[str], second: list[str]) -> tuple[int, int]:
    """How many of two runs' texts (the same prompts, in order) are equal."""
    return sum(a == b for a, b in zip(first, second, strict=True)), len(first)


def agreement(runs: list[tuple[dict, dict]], name: str) -> str:
    """``"same/total"`` over pairs of runs of one workload."""
    counts = [identical(a[name]["texts"], b[name]["texts"]) for a, b in runs]
    return f"{sum(c[0] for c in counts)}/{sum(c[1] for c in counts)}"


def summarize(rounds: list[dict], workloads, warmup: dict | None = None) -> dict:
    """Medians over rounds per server, ratios fused/plain, and agreement:
    plain against fused per round, and each server's runs (warm-up included)
    against each other, which sets how much agreement batching allows."""

    def both(*keys: str) -> dict[str, float]:
        medians = {}
        for server in rounds[0]:
            values = []
            for r in rounds:
                value = r[server]
                for key in keys:
                    value = value[key]
                values.append(value)
            medians[server] = statistics.median(values)
        return medians

    summary: dict = {"start_s": both("start_s"), "load_s": both("load_s")}
    start = summary["start_s"]
    start["fused_minus_plain"] = start["fused"] - start["plain"]
    for workload in workloads:
        row: dict = {m: both(workload.name, m) for m in METRICS}
        tok_per_s = row["tok_per_s"]
        tok_per_s["ratio"] = tok_per_s["fused"] / tok_per_s["plain"]
        if "bound" in tok_per_s:
            tok_per_s["bound_ratio"] = tok_per_s["bound"] / tok_per_s["plain"]
        name = workload.name
        row["greedy_identical"] = agreement([(r["plain"], r["fused"]) for r in rounds], name)
        every = [*([warmup] if warmup else []), *rounds]
        row["greedy_identical_same_server"] = {
            server: agreement([(a[server], b[server]) for a, b in pairwise(every)], name)
            for server in ("plain", "fused")
        }
        steps = {server: [r[server][name].get("steps") for r in rounds] for server in rounds[0]}
        if all(figures for values in steps.values() for figures in values):
            row["steps"] = {
                server: {key: statistics.median(f[key] for f in values) for key in values[0]}
                for server, values in steps.items()
            }
        summary[workload.name] = row
    return summary


METRICS = (
    "tok_per_s",
    "seconds",
    "ttft_p50_s",
    "ttft_p99_s",
    "token_latency_p50_s",
    "token_latency_p99_s",
)


def time_starts(app: App, model: Path, starts: int, folder: Path, server_args: list[str]) -> dict:
    """Seconds until ``/health`` answers, ``starts`` fresh servers of each
    kind, alternating (plain, fused, fused, plain, ...); each stopped at once."""
    seconds: dict[str, list[float]] = {"plain": [], "fused": []}
    for i in range(starts):
        for name in ("plain", "fused") if i % 2 == 0 else ("fused", "plain"):
            server = Server(app, model, name, folder / f"start-{name}.log", server_args)
            try:
                seconds[name].append(server.wait_healthy())
            finally:
                server.stop()
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    return {
        "seconds": seconds,
        "median_s": medians,
        "fused_minus_plain_s": medians["fused"] - medians["plain"],
    }


GENERATION_RATE = re.compile(r"Generation: \d+ tokens, ([\d.]+) tokens-per-sec")
BATCH_RATE = re.compile(r"Batch decode: ([\d.]+) ms/token")
LOOPS = ("loop", "batch")
"""mlx-lm's own loop (``mlx_lm generate``), and a server's generation thread
without the server (`batch_decode`)."""


def model_loop(model: Path, kind: str, workload: Workload, log: Path, how: str = "loop") -> float:
    """Milliseconds per token of ``workload``'s first prompt decoded without
    a server (``how``: `LOOPS`), plain, fused under ``moefuse run``, or bound
    (its MoE FFNs a broadcast, `ffn_free`); each times its own decode steps."""
    text = prompt(1000, workload.prompt_words)
    if how == "loop":
        arguments = ["mlx_lm", "generate", "--model", str(model), "--prompt", text]
        arguments += ["--max-tokens", str(workload.max_tokens), "--temp", "0"]
        command = [sys.executable, *(("-c", LAUNCHER) if kind == "bound" else ("-m",)), *arguments]
    else:
        command = [sys.executable, "-m", __name__, "batch-decode", str(model), text]
        command.append(str(workload.max_tokens))
    if kind == "fused":
        command = [sys.executable, "-m", "moefuse_runtime.cli", "run", "--", *command]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "EXO_FUSED_MOE": "1" if kind == "fused" else "0",
        FFN_FREE_ENV: "1" if kind == "bound" else "0",
        TRACE_ENV: str(log.with_suffix(".steps.jsonl")) if how == "batch" else "",
    }
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=REQUEST_TIMEOUT_S
    )
    log.write_text(done.stdout + done.stderr)
    rate = (GENERATION_RATE if how == "loop" else BATCH_RATE).search(done.stdout)
    if done.returncode != 0 or rate is None:
        program = "mlx_lm generate" if how == "loop" else "batch decode"
        raise RuntimeError(f"{program} ({kind}) failed: {log.read_text()[-2000:]}")
    value = float(rate.group(1))
    return 1e3 / value if how == "loop" else value


def batch_decode(model: str, text: str, max_tokens: int) -> None:
    """What ``mlx_lm.server``'s generation thread does for one request, without
    the server: mlx-lm's ``BatchGenerator`` on the thread's default stream,
    in a thread of its own, decoding ``text`` (chat template applied, as the
    server and ``mlx_lm generate`` do) greedily. Prints the median time per
    token and the text. `FFN_FREE_ENV` and `TRACE_ENV` as for `serve`."""
    import threading

    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator

    if os.environ.get(FFN_FREE_ENV) == "1":
        ffn_free("mlx_lm")
    if os.environ.get(TRACE_ENV):
        trace_steps(os.environ[TRACE_ENV])
    loaded, tokenizer = load(model)[:2]
    messages = [{"role": "user", "content": text}]
    tokens = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    times: list[float] = []
    out: list[int] = []

    def decode() -> None:
        generator = BatchGenerator(loaded, stream=mx.default_stream(mx.default_device()))
        generator.insert([tokens], max_tokens=[max_tokens])
        finished = False
        while not finished:
            responses = generator.next_generated()
            times.append(time.perf_counter())
            out.extend(r.token for r in responses)
            finished = not responses or any(r.finish_reason is not None for r in responses)
        generator.close()

    worker = threading.Thread(target=decode)
    worker.start()
    worker.join()
    gaps = [b - a for a, b in pairwise(times)]
    print(f"Batch decode: {1e3 * statistics.median(gaps):.4f} ms/token, {len(out)} tokens")
    print(f"=========={tokenizer.decode(out)}==========", flush=True)
    # MLX 0.32 at times aborts at exit after a thread made its own default
    # stream (std::terminate in its teardown; so does a plain model): the
    # figures are out, leave without the teardown
    os._exit(0)


def loop_figures(model: Path, single: Workload, summary: dict, folder: Path) -> dict:
    """`model_loop`, each way of `LOOPS`, for each server kind that ran
    (plain, fused, bound), and what the server adds per token over each:
    the single request's per-token latency p50 minus the loop's. The
    batch's decode steps are timed (`trace_steps`): ``batch_steps``. A
    loop that fails is reported (``error``), and the servers' figures stand."""
    served = summary[single.name]["token_latency_p50_s"]
    kinds = [k for k in ("plain", "fused", "bound") if k in served]
    try:
        ms = {
            how: {
                kind: model_loop(model, kind, single, folder / f"{how}-{kind}.log", how)
                for kind in kinds
            }
            for how in LOOPS
        }
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        return {"error": str(error)[-2000:]}
    steps = {}
    for kind in kinds:
        path = folder / f"batch-{kind}.steps.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        figures = step_figures(rows, (-math.inf, math.inf))
        if figures is not None:
            steps[kind] = figures
    loop, batch = ms["loop"], ms["batch"]
    return {
        "ms_per_token": loop,
        "ratio": loop["plain"] / loop["fused"],
        **({"bound_ratio": loop["plain"] / loop["bound"]} if "bound" in loop else {}),
        "server_adds_ms_per_token": {k: 1e3 * served[k] - loop[k] for k in loop},
        "batch_ms_per_token": batch,
        "batch_ratio": batch["plain"] / batch["fused"],
        "server_adds_over_batch_ms_per_token": {k: 1e3 * served[k] - batch[k] for k in batch},
        "batch_steps": steps,
    }


def model_directory(path: str | os.PathLike) -> Path:
    """``path`` resolved, if it is a local model directory a server can load
    (its ``config.json`` there); a ValueError that says why if not."""
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise ValueError(f"{path}: not a directory (a local model directory is needed)")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{path}: no config.json there: not a model directory")
    return folder


def run(
    out: str,
    *,
    preset: str,
    layers: int | None,
    rounds: int,
    smoke: bool,
    app: App = APPS["mlx_lm"],
    server_args: list[str] | None = None,
    warmup: bool = True,
    starts: int = 0,
    bound: bool = True,
    loop: bool = True,
    model_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Write the model (``preset``, ``layers``), or take ``model_dir``, and
    serve it with ``app`` plain, fused and (with ``bound``) FFN-free
    ``rounds`` times, interleaved: each round starts with another kind.
    ``server_args``: the app's own arguments if None.

    With ``warmup``, a round before them is run and kept apart (``warmup``
    in the JSON): on a machine that never ran MLX, the first server fills
    MLX's own disk cache of its kernels, which any server after it reads.
    ``starts`` start-only servers, plain and fused, are timed after the rounds;
    with ``loop``, the single request's prompt decoded without a server
    (`loop_figures`).
    """
    import mlx.core as mx

    from . import demo

    folder = Path(out)
    if model_dir is not None:
        model = model_directory(model_dir)
    folder.mkdir(parents=True, exist_ok=True)
    server_args = list(app.default_args if server_args is None else server_args)
    if model_dir is None:
        dtype = mx.float32 if smoke else mx.bfloat16
        model = demo.write_demo_model(folder / "model", preset, layers=layers, dtype=dtype)
    workloads = SMOKE_WORKLOADS if smoke else GPU_WORKLOADS
    kinds = ("plain", "fused", "bound") if bound else ("plain", "fused")
    results: list[dict] = []
    warmup_row = None
    for i in range(-1 if warmup else 0, rounds):
        row = {}
        for name in order(i, kinds):
            row[name] = serve_once(
                app, model, name, workloads, folder / f"server-{name}-{i}.log", server_args
            )
            figures = ", ".join(
                f"{w.name} {row[name][w.name]['tok_per_s']:.1f} tok/s" for w in workloads
            )
            label = "warm-up" if i < 0 else f"round {i}"
            log(
                f"{label} {name}: start {row[name]['start_s']:.2f} s, first request "
                f"{row[name]['load_s']:.2f} s, {figures}"
            )
            (folder / "server-partial.json").write_text(json.dumps([*results, row], indent=2))
        if i < 0:
            warmup_row = row
        else:
            results.append(row)
    start_only = time_starts(app, model, starts, folder, server_args) if starts else None
    if start_only:
        log(
            f"start-up, {starts} servers each: plain {start_only['median_s']['plain']:.2f} s, "
            f"fused {start_only['median_s']['fused']:.2f} s (medians)"
        )
    summary = summarize(results, workloads, warmup_row)
    for workload in workloads:
        for server, f in summary[workload.name].get("steps", {}).items():
            log(
                f"{workload.name} {server}: {f['sequences']:.0f} sequences a step, every "
                f"{f['period_ms']:.1f} ms: build {f['build_ms']:.1f}, launch "
                f"{f['launch_ms']:.1f}, wait for the GPU {f['wait_ms']:.1f} (in "
                f"{100 * f['waiting_share']:.0f}% of steps), between steps "
                f"{f['between_ms']:.1f} ms (medians)"
            )
    result = {
        "app": app.name,
        "model": None if model_dir is None else str(model),
        "preset": None if model_dir is not None else preset,
        "layers": None if model_dir is not None else layers,
        "rounds": rounds,
        "server_args": server_args,
        "workloads": [asdict(w) for w in workloads],
        "summary": summary,
        "starts": start_only,
        "runs": results,
        "warmup": warmup_row,
    }
    # written before the loops and again after: a run stopped during them
    # keeps the servers' figures
    (folder / "server.json").write_text(json.dumps(result, indent=2))
    if loop:
        in_loop = summary["model_loop"] = loop_figures(model, workloads[0], summary, folder)
        if "error" in in_loop:
            log(f"decoding without a server failed: {in_loop['error'][-300:]}")
        else:
            for name, ms, adds in (
                ("mlx-lm's own loop", "ms_per_token", "server_adds_ms_per_token"),
                ("a BatchGenerator", "batch_ms_per_token", "server_adds_over_batch_ms_per_token"),
            ):
                log(
                    f"{name}: "
                    + ", ".join(f"{k} {v:.1f} ms/token" for k, v in in_loop[ms].items())
                    + "; the server adds "
                    + ", ".join(f"{k} {v:.1f}" for k, v in in_loop[adds].items())
                    + " ms/token"
                )
    (folder / "server.json").write_text(json.dumps(result, indent=2))
    plot(result, folder / "server.png")
    return result


def plot(result: dict, path: Path) -> None:
    """Aggregate tok/s and TTFT p99 per workload, plain beside fused."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [w["name"] for w in result["workloads"]]
    summary = result["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in (
        (axes[0], "tok_per_s", "aggregate tokens/s"),
        (axes[1], "ttft_p99_s", "time to first token, p99 (s)"),
    ):
        servers = [k for k in ("plain", "fused", "bound") if k in summary[names[0]][metric]]
        width = 0.8 / len(servers)
        for k, server in enumerate(servers):
            values = [summary[n][metric][server] for n in names]
            ax.bar([i + width * k for i in range(len(names))], values, width, label=server)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
        ax.set_ylabel(label)
        ax.legend()
    served = (
        Path(result["model"]).name
        if result["model"]
        else f"{result['preset']} ({result['layers'] or 'all'} layers)"
    )
    rounds = result["rounds"]
    fig.suptitle(f"{result['app']}, {served}, medians of {rounds} rounds of fresh servers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":  # `model_loop`'s batch, `batch_decode`
    if sys.argv[1:2] != ["batch-decode"] or len(sys.argv) != 5:
        sys.exit("usage: python -m moefuse_runtime.server_bench batch-decode MODEL TEXT MAX_TOKENS")
    batch_decode(sys.argv[2], sys.argv[3], int(sys.argv[4]))
