"""The ``moefuse`` command: each subcommand's happy path and its errors."""

import json
import sys

import pytest
from conftest import run

SUBCOMMANDS = ["run", "inspect", "make-demo-model", "demo", "bench"]


@pytest.mark.parametrize("command", [[], *([c] for c in SUBCOMMANDS)])
def test_help(command):
    out = run(["moefuse", *command, "--help"])
    assert out.returncode == 0 and out.stdout.startswith("usage: moefuse")


def test_python_dash_m_entry_point():
    out = run([sys.executable, "-m", "moefuse_runtime", "--help"])
    assert out.returncode == 0 and "make-demo-model" in out.stdout


def test_make_demo_model_is_loadable_by_mlx_lm(demo_model):
    files = {p.name for p in demo_model.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert any(name.endswith(".safetensors") for name in files)
    config = json.loads((demo_model / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["quantization"]["bits"] == 4
    code = (
        "import sys, mlx_lm; m, t = mlx_lm.load(sys.argv[1]); "
        "p = t.apply_chat_template([{'role': 'user', 'content': 'hi'}], "
        "add_generation_prompt=True); "
        "print(t.decode(p))"
    )
    out = run([sys.executable, "-c", code, str(demo_model)], env={"EXO_FUSED_MOE": ""})
    assert out.returncode == 0, out.stderr
    assert "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" in out.stdout


def test_make_demo_model_command_and_its_errors(tmp_path):
    target = tmp_path / "m"
    out = run(["moefuse", "make-demo-model", str(target)])
    assert out.returncode == 0, out.stderr
    assert (target / "config.json").is_file()
    again = run(["moefuse", "make-demo-model", str(target)])
    assert again.returncode == 2 and "is not empty" in again.stderr
    assert "Traceback" not in again.stderr


def test_inspect_happy_path_changes_nothing(demo_model):
    before = {p.name: p.stat().st_mtime_ns for p in demo_model.iterdir()}
    out = run(["moefuse", "inspect", str(demo_model)])
    assert out.returncode == 0, out.stderr
    assert "would fuse 4/4 SwitchGLU layers" in out.stdout
    assert "affine 4-bit g64" in out.stdout and "headroom now:" in out.stdout
    assert {p.name: p.stat().st_mtime_ns for p in demo_model.iterdir()} == before


def test_inspect_headroom_verdict(demo_model):
    out = run(["moefuse", "inspect", str(demo_model), "--reserve-gb", "1000000"])
    assert out.returncode == 0
    assert out.stdout.count("headroom:") == 4 and "would fuse 0/4" in out.stdout


@pytest.mark.parametrize(
    "target,message",
    [("missing", "no such directory"), ("empty", "not an MLX model directory")],
)
def test_inspect_errors(tmp_path, target, message):
    (tmp_path / "empty").mkdir()
    out = run(["moefuse", "inspect", str(tmp_path / target)])
    assert out.returncode == 2 and message in out.stderr
    assert "Traceback" not in out.stderr


def test_inspect_model_without_switch_glu(tmp_path):
    code = f"""
import json, mlx.core as mx
from mlx_lm.models import llama
from mlx_lm.utils import save_model
config = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=128)
model = llama.Model(llama.ModelArgs.from_dict(config))
mx.eval(model.parameters())
save_model({str(tmp_path)!r}, model)
open({str(tmp_path / "config.json")!r}, "w").write(json.dumps(config))
"""
    assert run([sys.executable, "-c", code]).returncode == 0
    out = run(["moefuse", "inspect", str(tmp_path)])
    assert out.returncode == 1 and "no SwitchGLU layers" in out.stderr
    assert "Traceback" not in out.stderr


def test_inspect_unloadable_model(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no_such_architecture"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    out = run(["moefuse", "inspect", str(tmp_path)])
    assert out.returncode == 1 and "cannot load" in out.stderr
    assert "Traceback" not in out.stderr


def test_run_errors():
    missing = run(["moefuse", "run"])
    assert missing.returncode == 2 and "give a command" in missing.stderr
    unknown = run(["moefuse", "run", "--", "no-such-command-anywhere"])
    assert unknown.returncode == 127 and "command not found" in unknown.stderr


def test_run_passes_the_exit_code_through():
    out = run(["moefuse", "run", "--", sys.executable, "-c", "import sys; sys.exit(7)"])
    assert out.returncode == 7


def test_demo_command():
    out = run(["moefuse", "demo", "--steps", "8", "--rounds", "1"])
    assert out.returncode == 0, out.stderr
    assert "fused 4/4 SwitchGLU layers" in out.stdout and "identical: True" in out.stdout


def test_bench_quick_writes_json_and_png(tmp_path):
    out = run(["moefuse", "bench", "--quick", "--out", str(tmp_path)])
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["streaming_bandwidth_bytes_per_s"] > 0
    assert [r["tokens"] for r in result["layers"]] == [1, 16, 1, 16]
    assert result["layers"][2]["shape"].startswith("dense ")
    assert all(r["ratio"] > 0 and r["weight_bytes"] > 0 for r in result["layers"])
    assert result["model"]["greedy_tokens_match"] is True
    assert result["model"]["install"]["fused_layers"] == 2
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_cuda_says_it_needs_cuda(tmp_path):
    from moefuse_runtime.memory import backend

    if backend() == "cuda":
        pytest.skip("this machine has CUDA: the CUDA bench runs (docs/benchmarks.md)")
    done = run(["moefuse", "bench", "--cuda", "layers", "--out", str(tmp_path)])
    assert done.returncode == 2
    assert f"needs MLX's CUDA backend (this machine: {backend()})" in done.stderr
    assert not (tmp_path / "cuda.json").exists()


def test_run_keeps_the_next_sitecustomize(tmp_path):
    # `moefuse run` puts its own sitecustomize first; a user's (or a
    # distribution's) later on the path still runs, and a broken one is
    # reported as Python reports it, the command going on
    user = tmp_path / "user"
    user.mkdir()
    # a mark in this process's builtins (the environment would be inherited
    # from `moefuse run`'s own process, which runs the user's sitecustomize too)
    (user / "sitecustomize.py").write_text("import builtins\nbuiltins.USER_SITE_RAN = 'yes'\n")
    code = (
        "import builtins as b, sys; "
        "print(getattr(b, 'USER_SITE_RAN', 'no'), 'wrapt' in sys.modules)"
    )
    done = run(["moefuse", "run", "--", sys.executable, "-c", code], env={"PYTHONPATH": str(user)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["yes", "True"]  # the user's ran, and ours
    (user / "sitecustomize.py").write_text("raise KeyError('broken')\n")
    done = run(
        ["moefuse", "run", "--", sys.executable, "-c", "print('went on')"],
        env={"PYTHONPATH": str(user)},
    )
    assert done.returncode == 0 and done.stdout.strip() == "went on"
    assert "Error in sitecustomize" in done.stderr and "KeyError: 'broken'" in done.stderr


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], {"warmup": True, "bound": True, "starts": 4, "rounds": 2}),
        (
            ["--no-server-warmup", "--no-server-bound", "--server-starts", "0"],
            {"warmup": False, "bound": False, "starts": 0, "rounds": 2},
        ),
        (["--quick", "--server-rounds", "1"], {"warmup": False, "rounds": 1, "loop": True}),
        (["--no-server-loop"], {"loop": False}),
        (["--server-app", "mlx_vlm"], {"app": "mlx_vlm.server", "server_args": None}),
        (
            ["--server-args", "--decode-concurrency 8 --prompt-concurrency 2"],
            {"server_args": ["--decode-concurrency", "8", "--prompt-concurrency", "2"]},
        ),
        (["--server-args=--trust-remote-code"], {"server_args": ["--trust-remote-code"]}),
    ],
)
def test_server_bench_options_reach_the_benchmark(monkeypatch, tmp_path, flags, expected):
    from moefuse_runtime import cli, server_bench

    seen = {}
    monkeypatch.setattr(server_bench, "run", lambda out, **kwargs: seen.update(kwargs))
    assert cli.main(["bench", "--server", "--out", str(tmp_path), *flags]) == 0
    seen["app"] = seen["app"].name
    assert {key: seen[key] for key in expected} == expected
    if "app" not in expected:
        assert seen["app"] == "mlx_lm.server"


def test_server_bench_serves_a_model_directory_given(monkeypatch, tmp_path):
    from moefuse_runtime import cli, server_bench

    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    seen = {}
    monkeypatch.setattr(server_bench, "run", lambda out, **kwargs: seen.update(kwargs))
    flags = ["--server-model", str(model)]
    assert cli.main(["bench", "--server", "--out", str(tmp_path), *flags]) == 0
    assert seen["model_dir"] == str(model.resolve())


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--server-model", "{tmp}/absent"], "not a directory"),
        (["--server-model", "{tmp}"], "no config.json there"),
        (["--server-model", "{tmp}/m", "--server-preset", "tiny"], "not allowed with argument"),
        (["--server-model", "{tmp}/m", "--server-layers", "2"], "cannot apply to --server-model"),
    ],
)
def test_server_bench_refuses_a_model_it_cannot_serve(tmp_path, flags, message):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    args = [flag.format(tmp=tmp_path) for flag in flags]
    done = run(["moefuse", "bench", "--server", "--out", str(tmp_path / "out"), *args])
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()  # refused before anything ran
