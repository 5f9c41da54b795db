"""Every bad input a user can give ends in a clear error that names it:
API arguments, environment variables, CLI mistakes (one line, exit 2)."""

from __future__ import annotations

import sys

import mlx.core as mx
import pytest
from conftest import run
from helpers import build_family

import moefuse_runtime


@pytest.fixture(scope="module")
def model():
    return build_family("qwen3_moe", quantized=True)


MODEL = object()
"""Stands for the test's model in the rows below."""


@pytest.mark.parametrize(
    ("function", "args", "kwargs", "error", "words"),
    [
        ("install", (None,), {}, TypeError, "install: model must be an mlx.nn.Module"),
        ("install", ("hello",), {}, TypeError, "not str"),
        ("uninstall", (None,), {}, TypeError, "uninstall: model must be"),
        ("plan", (42,), {}, TypeError, "plan: model must be"),
        ("install", (MODEL,), {"enabled": 0}, TypeError, "enabled must be True, False or None"),
        ("install", (MODEL,), {"enabled": "false"}, TypeError, "enabled must be"),
        ("install", (MODEL,), {"dense": "no"}, TypeError, "dense must be True or False"),
        ("install", (MODEL,), {"reserve_bytes": -1}, ValueError, "finite and non-negative"),
        ("install", (MODEL,), {"reserve_bytes": float("inf")}, ValueError, "reserve_bytes"),
        ("install", (MODEL,), {"reserve_bytes": "abc"}, TypeError, "a number of bytes"),
        ("plan", (MODEL,), {"reserve_bytes": -5}, ValueError, "plan: reserve_bytes"),
        ("install", (MODEL,), {"group": "x"}, TypeError, "an mx.distributed.Group"),
    ],
)
def test_bad_arguments_name_the_parameter(model, function, args, kwargs, error, words):
    args = tuple(model if a is MODEL else a for a in args)
    with pytest.raises(error, match=words):
        getattr(moefuse_runtime, function)(*args, **kwargs)
    assert not moefuse_runtime.uninstall(model).unfused  # nothing was fused


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("MOEFUSE_KERNEL", "garbage", "MOEFUSE_KERNEL='garbage' is not understood"),
        ("MOEFUSE_RESERVE_GB", "inf", "MOEFUSE_RESERVE_GB='inf' must be a finite"),
        ("MOEFUSE_RESERVE_GB", "abc", "is not a number of GB"),
        ("EXO_FUSED_MOE", "ture", "EXO_FUSED_MOE='ture' is not understood"),
    ],
)
def test_bad_environment_variables_are_named_on_every_backend(
    model, monkeypatch, name, value, words
):
    monkeypatch.setenv(name, value)
    for call in (moefuse_runtime.install, moefuse_runtime.plan):
        with pytest.raises(ValueError, match=words):
            call(model)


def test_plan_says_what_install_would_do_when_disabled(model, monkeypatch):
    monkeypatch.setenv("EXO_FUSED_MOE", "0")
    report = moefuse_runtime.plan(model)
    assert report.disabled_reason == "disabled by EXO_FUSED_MOE=0"
    assert not report.would_fuse and len(report.skipped) == len(report.layers) > 0


def test_good_arguments_still_work(model):
    report = moefuse_runtime.install(model, enabled=True, reserve_bytes=0, dense=False)
    assert report.fused
    assert moefuse_runtime.install(model, reserve_bytes=1.5e3, group=None).already_fused
    assert moefuse_runtime.uninstall(model).unfused
    mx.eval(model.parameters())


@pytest.fixture(scope="module")
def odd_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    (root / "config-only").mkdir()
    (root / "config-only" / "config.json").write_text("{}")
    (root / "not-a-program").write_text("no shebang, no ELF")
    (root / "not-a-program").chmod(0o755)
    return root


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["demo", "--steps", "-1"], 2, "--steps: must be at least 1, not -1"),
        (["demo", "--steps", "0"], 2, "--steps: must be at least 1"),
        (["demo", "--rounds", "0"], 2, "--rounds: must be at least 1"),
        (["demo", "--steps", "many"], 2, "must be a whole number, not 'many'"),
        (["bench", "--rounds", "0"], 2, "--rounds: must be at least 1"),
        (["bench", "--server", "--server-rounds", "0"], 2, "--server-rounds: must be at"),
        (["bench", "--server", "--server-starts", "-1"], 2, "--server-starts: must be at least 0"),
        (["bench", "--cuda", "model", "--batched-prefill", "8"], 2, "must be SEQUENCESxTOKENS"),
        (["bench", "--server", "--server-args", '"--unclosed'], 2, "No closing quotation"),
        (["bench", "--server", "--server-app", "exo"], 2, "invalid choice: 'exo'"),
        (["bench", "--cuda", "model", "--batched-prefill", "0x948"], 2, "e.g. 8x948, not '0x948'"),
        (["inspect", "{root}/config-only", "--reserve-gb", "inf"], 2, "--reserve-gb: must be"),
        (["inspect", "{root}/config-only"], 2, "no weights (*.safetensors)"),
        (["make-demo-model", "/dev/null"], 2, "exists and is not a directory"),
        (["run", "--", "{root}/not-a-program"], 126, "cannot execute"),
        (["frobnicate"], 2, "invalid choice"),
    ],
)
def test_cli_mistakes_end_in_one_line(odd_paths, args, code, words):
    args = [a.format(root=odd_paths) for a in args]
    done = run([sys.executable, "-m", "moefuse_runtime.cli", *args], timeout=120)
    assert done.returncode == code
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], done.stderr
    assert "Traceback" not in done.stderr
