"""Real servers (mlx_lm.server, mlx_vlm.server) started through ``moefuse run``.

For each, two servers on 127.0.0.1 serve the same demo model, one plain and one fused;
the same chat requests (temperature 0) are sent to both concurrently, and the
answers must be identical. Requests and waits are bounded. Also the server
benchmark's smoke run for each, and the CUDA benchmark's stand-in for a
server's batched prefill.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import run

from moefuse_runtime import server_bench

BIN = Path(sys.executable).parent
PROMPTS = [
    "Hello, how are you?",
    "Tell me about mixture of experts.",
    "The quick brown fox",
    "Why do servers shard models?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, program: str, model: Path, log: Path, fused: bool):
        self.port = free_port()
        self.log_path = log
        self.model = str(model)
        command = [program, "--model", self.model, "--host", "127.0.0.1", "--port", str(self.port)]
        if fused:
            command = ["moefuse", "run", "--", *command]
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "EXO_FUSED_MOE": "1" if fused else "",
        }
        self.log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def wait_ready(self, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"server exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"server not ready in {timeout} s:\n{self.log_path.read_text()[-3000:]}")

    def chat(self, prompt: str) -> str:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 24,
            "temperature": 0.0,
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.load(response)
        return answer["choices"][0]["message"]["content"]

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


@pytest.mark.parametrize("program", ["mlx_lm.server", "mlx_vlm.server"])
def test_fused_server_answers_exactly_like_a_plain_one(program, demo_model, tmp_path):
    if program == "mlx_vlm.server":
        pytest.importorskip("mlx_vlm", reason="mlx-vlm is pinned in requirements-test.txt")
    plain = Server(program, demo_model, tmp_path / "plain.log", fused=False)
    fused = Server(program, demo_model, tmp_path / "fused.log", fused=True)
    try:
        plain.wait_ready()
        fused.wait_ready()
        jobs = [(server, prompt) for prompt in PROMPTS for server in (plain, fused)]
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            answers = list(pool.map(lambda job: job[0].chat(job[1]), jobs))
    finally:
        plain.stop()
        fused.stop()
    plain_answers, fused_answers = answers[0::2], answers[1::2]
    assert fused_answers == plain_answers
    assert all(len(a) > 0 for a in plain_answers)
    assert len(set(plain_answers)) > 1  # the prompts matter: not a constant reply
    assert "fused 4/4 SwitchGLU layers" in (tmp_path / "fused.log").read_text()
    assert "fused" not in (tmp_path / "plain.log").read_text().lower()


@pytest.mark.parametrize("app", ["mlx_lm", "mlx_vlm"])
def test_the_server_benchmark_runs_real_servers(app, tmp_path, demo_model):
    # `moefuse bench --server --quick`: a plain, a fused and an FFN-free
    # server on the tiny demo model, every workload streamed; the figures
    # exist and plain and fused agree. mlx_lm: on a model the benchmark
    # writes; mlx_vlm: on a model directory given (--server-model)
    out = tmp_path / "bench"
    served = ["--server-preset", "tiny"] if app == "mlx_lm" else ["--server-model", str(demo_model)]
    done = run(
        [
            "moefuse",
            "bench",
            "--server",
            "--quick",
            "--server-app",
            app,
            *served,
            "--server-rounds",
            "1",
            "--server-starts",
            "1",
            "--out",
            str(out),
        ]
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((out / "server.json").read_text())
    assert result["app"] == f"{app}.server"
    if app == "mlx_lm":
        assert (result["preset"], result["model"]) == ("tiny", None)
        assert (out / "model" / "config.json").is_file()
    else:
        assert (result["preset"], result["model"]) == (None, str(demo_model.resolve()))
        assert not (out / "model").exists()  # the given model served, none written
    summary = result["summary"]
    assert summary["start_s"]["plain"] > 0 and summary["start_s"]["fused"] > 0
    for workload in ("single", "concurrent", "long_prompts"):
        row = summary[workload]
        assert min(row["tok_per_s"][k] for k in ("plain", "fused", "bound")) > 0
        assert row["tok_per_s"]["bound_ratio"] > 0
        assert row["ttft_p99_s"]["fused"] >= row["ttft_p50_s"]["fused"] > 0
        requests = next(w["requests"] for w in result["workloads"] if w["name"] == workload)
        assert len(result["runs"][0]["fused"][workload]["ttfts_s"]) == requests
        done_requests, total = map(int, row["greedy_identical"].split("/"))
        assert done_requests == total > 0  # the CPU path is bitwise
        assert set(row["greedy_identical_same_server"]) == {"plain", "fused"}
    loop = summary["model_loop"]
    assert min(loop["ms_per_token"].values()) > 0 and loop["ratio"] > 0
    served = summary["single"]["token_latency_p50_s"]
    for kind, added in loop["server_adds_ms_per_token"].items():
        assert added == pytest.approx(1e3 * served[kind] - loop["ms_per_token"][kind])
    assert "fused 4/4 SwitchGLU layers" in (out / "loop-fused.log").read_text()
    assert set(loop["ms_per_token"]) == {"plain", "fused", "bound"} and loop["bound_ratio"] > 0
    texts = {
        k: (out / f"loop-{k}.log").read_text().split("==========")[1] for k in loop["ms_per_token"]
    }
    assert texts["plain"] == texts["fused"] != texts["bound"]  # the bound's MoE FFNs: a broadcast
    # the same prompt by mlx-lm's BatchGenerator in a thread, no server: its
    # steps timed as the server's are
    assert set(loop["batch_ms_per_token"]) == {"plain", "fused", "bound"}
    assert min(loop["batch_ms_per_token"].values()) > 0 and loop["batch_ratio"] > 0
    for kind, added in loop["server_adds_over_batch_ms_per_token"].items():
        assert added == pytest.approx(1e3 * served[kind] - loop["batch_ms_per_token"][kind])
    batch_texts = {
        k: (out / f"batch-{k}.log").read_text().split("==========")[1] for k in ("plain", "fused")
    }
    assert batch_texts["plain"] == batch_texts["fused"] != ""
    assert "fused 4/4 SwitchGLU layers" in (out / "batch-fused.log").read_text()
    assert set(loop["batch_steps"]) == {"plain", "fused", "bound"}
    for figures in loop["batch_steps"].values():
        assert figures["steps"] >= 4 and figures["sequences"] == 1  # 8 tokens
    starts = result["starts"]
    assert [len(starts["seconds"][s]) for s in ("plain", "fused")] == [1, 1]
    assert min(starts["median_s"].values()) > 0
    runs = result["runs"][0]
    assert runs["bound"]["install_log"] == []  # FFN-free, not fused: other replies
    assert runs["bound"]["concurrent"]["texts"] != runs["plain"]["concurrent"]["texts"]
    for kind in ("plain", "fused", "bound"):  # every reply streamed text, timed from it
        for workload in ("single", "concurrent", "long_prompts"):
            assert all(runs[kind][workload]["texts"]), (kind, workload)
    fused_log = result["runs"][0]["fused"]["install_log"]
    assert any("fused 4/4 SwitchGLU layers" in line for line in fused_log)
    assert (out / "server.png").stat().st_size > 0
    if app == "mlx_lm":  # its decode steps, timed in every server
        for workload in ("single", "concurrent", "long_prompts"):
            steps = summary[workload]["steps"]
            assert set(steps) == {"plain", "fused", "bound"}
            for figures in steps.values():
                assert figures["steps"] > 0 and figures["sequences"] >= 1
                # each step ends before the next begins (medians of different
                # lists need not keep the order of their elements)
                assert figures["between_ms"] >= 0 and figures["period_ms"] > 0
                assert figures["step_ms"] > 0 and figures["build_ms"] > 0
                assert 0 <= figures["waiting_share"] <= 1


def test_step_timing_leaves_an_mlx_lm_without_its_step_untimed(tmp_path, monkeypatch):
    import importlib

    generate = importlib.import_module("mlx_lm.generate")
    monkeypatch.delattr(generate, "GenerationBatch")
    server_bench.trace_steps(str(tmp_path / "steps.jsonl"))
    assert not (tmp_path / "steps.jsonl").exists()


def test_step_figures_read_a_timeline():
    rows = [
        {
            "start": t,
            "build_s": 0.002,
            "launch_s": 0.001,
            "wait_s": w,
            "step_s": 0.004,
            "sequences": 2,
        }
        for t, w in ((10.0, 0.0), (10.005, 0.0005), (10.010, 0.0), (99.0, 0.0))
    ]
    figures = server_bench.step_figures(rows, (9.0, 11.0))
    assert figures["steps"] == 3 and figures["sequences"] == 2
    assert figures["period_ms"] == pytest.approx(5.0) and figures["step_ms"] == pytest.approx(4.0)
    assert figures["between_ms"] == pytest.approx(1.0)
    assert figures["waiting_share"] == pytest.approx(1 / 3)
    assert server_bench.step_figures(rows, (0.0, 1.0)) is None


def test_agreement_is_counted_across_servers_and_within_each():
    # plain against fused per round; each server's consecutive runs (warm-up
    # first) against each other: the agreement batching alone allows
    from moefuse_runtime.server_bench import Workload, summarize

    def run_of(texts: list[str]) -> dict:
        figures = {m: 1.0 for m in ("tok_per_s", "seconds", "ttft_p50_s", "ttft_p99_s")}
        latency = {"token_latency_p50_s": 1.0, "token_latency_p99_s": 1.0}
        return {"start_s": 1.0, "load_s": 1.0, "w": {**figures, **latency, "texts": texts}}

    warmup = {"plain": run_of(["a", "b", "c"]), "fused": run_of(["a", "x", "c"])}
    rounds = [
        {"plain": run_of(["a", "b", "y"]), "fused": run_of(["a", "b", "c"])},
        {"plain": run_of(["a", "b", "c"]), "fused": run_of(["z", "x", "c"])},
    ]
    row = summarize(rounds, [Workload("w", 3, 3, 1, 1)], warmup)["w"]
    assert row["greedy_identical"] == "3/6"  # round 0: a, b; round 1: c
    assert row["greedy_identical_same_server"] == {"plain": "4/6", "fused": "3/6"}


def test_the_benchmark_prefills_a_padded_batch_as_a_server_does():
    # `bench --cuda model --batched-prefill`: prompts of several lengths
    # right-padded into one batch, into mlx-lm's merged per-sequence caches
    # prepared for that padding (BatchGenerator's prompt step). Each prompt's
    # hidden states are those of prefilling it alone, and the fused model's
    # the unfused one's, bitwise.
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from moefuse_runtime import install
    from moefuse_runtime.cuda.bench import batched_prompt_cache, batched_prompts
    from moefuse_runtime.demo import build_demo_model

    plain, fused = (build_demo_model("tiny", layers=2, dtype=mx.float32) for _ in range(2))
    install(fused)
    prompts, lengths = batched_prompts(3, 40, vocabulary=31)
    assert lengths == [40, 39, 38] and (prompts < 31).all().item()
    assert prompts[1, 39].item() == 0 and prompts[2, 38:].tolist() == [0, 0]
    hidden = plain.model(prompts, cache=batched_prompt_cache(plain, lengths))
    for i, n in enumerate(lengths):
        alone = plain.model(prompts[i : i + 1, :n], cache=make_prompt_cache(plain))
        assert mx.array_equal(hidden[i, :n], alone[0]).item()
    fused_hidden = fused.model(prompts, cache=batched_prompt_cache(fused, lengths))
    assert mx.array_equal(fused_hidden, hidden).item()


def test_a_failed_model_loop_is_reported_and_the_servers_figures_stand(tmp_path):
    from moefuse_runtime.server_bench import SMOKE_WORKLOADS, loop_figures

    served = {"single": {"token_latency_p50_s": {"plain": 0.01, "fused": 0.01}}}
    figures = loop_figures(tmp_path / "no-model", SMOKE_WORKLOADS[0], served, tmp_path)
    assert set(figures) == {"error"} and "mlx_lm generate (plain) failed" in figures["error"]
    assert (tmp_path / "loop-plain.log").read_text()  # mlx-lm's own words are kept


def test_streamed_text_takes_reasoning_and_content():
    # a thinking block streams as `reasoning` (mlx_vlm.server, mlx_lm.server)
    # or `reasoning_content`: those tokens count for time to first token
    from moefuse_runtime.server_bench import streamed_text

    assert streamed_text({"role": "assistant", "content": None, "reasoning": "Hm"}) == "Hm"
    assert streamed_text({"reasoning_content": "a", "content": "b"}) == "ab"
    assert streamed_text({"content": "x", "reasoning": None}) == "x"
    assert streamed_text({"role": "assistant"}) == ""
