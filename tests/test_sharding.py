"""Fusion on real mx.distributed ranks: 2 processes under ``mlx.launch``.

Each test launches tests/dist_worker.py on 2 ring-backend ranks over
127.0.0.1 and reads one JSON line per rank and check. A rank that fails
fails the test with the ranks' output; a hang is cut at TIMEOUT seconds.
"""

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import families
import pytest

HERE = Path(__file__).resolve().parent
TIMEOUT = 240
RANKS = 2
LAUNCH = "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"
METAL_ONLY = {"muse_spark"}  # its forward needs a Metal kernel (see test_families)


def _model_class(family):
    return importlib.import_module(f"mlx_lm.models.{family}").Model


def _has_pipeline(family):
    from mlx_lm.models.pipeline import PipelineMixin

    return any(isinstance(m, PipelineMixin) for _, m in families.build(family).named_modules())


SHARDED = [f for f in families.discover() if hasattr(_model_class(f), "shard")]
PIPELINED = [f for f in families.discover() if _has_pipeline(f)]


def free_port():
    """A port with the next one free too (the ring backend takes one per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as t:
                t.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def launch(tmp_path, check, family_names, quantized=False, dense=False, vlm=False):
    """Run one check on 2 ranks; return {rank: [records]}."""
    command = (
        [
            sys.executable,
            "-c",
            LAUNCH,
            "--backend",
            "ring",
            "-n",
            str(RANKS),
            "-p",
            str(free_port()),
            "--",
            sys.executable,
            str(HERE / "dist_worker.py"),
            check,
            "--out",
            str(tmp_path),
            "--families",
            *family_names,
        ]
        + (["--quantized"] if quantized else [])
        + (["--dense"] if dense else [])
        + (["--vlm"] if vlm else [])
    )
    process = subprocess.Popen(
        command,
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"ranks did not finish in {TIMEOUT} s:\n{output[-5000:]}")
    assert process.returncode == 0, f"a rank failed:\n{output[-5000:]}"
    records = {}
    for rank in range(RANKS):
        path = tmp_path / f"rank{rank}.jsonl"
        assert path.exists(), f"rank {rank} wrote nothing:\n{output[-5000:]}"
        lines = path.read_text().splitlines()
        records[rank] = [json.loads(line) for line in lines]
    return records


def _vlm_sharded() -> list[str]:
    """mlx-vlm language models with their own shard(), that build here."""
    try:
        import vlm_families
    except ImportError:  # mlx-vlm is pinned in requirements-test.txt
        return []
    return [
        f
        for f in vlm_families.buildable()
        if hasattr(vlm_families.language_model_class(f), "shard")
    ]


VLM_SHARDED = _vlm_sharded()


def test_discovery_finds_sharded_and_pipelined_families():
    assert {"qwen3_moe", "deepseek_v3", "gpt_oss", "glm4_moe", "minimax"} <= set(SHARDED)
    assert {"qwen3_moe", "deepseek_v3"} <= set(PIPELINED)


@pytest.mark.parametrize("quantized", [False, True], ids=["float32", "4bit"])
def test_tensor_parallel_both_orders(tmp_path, quantized):
    names = [f for f in SHARDED if f not in METAL_ONLY]
    records = launch(tmp_path, "tensor", names, quantized)
    for rank, rows in records.items():
        assert len(rows) == 3 * len(names), rows
        for row in rows:
            assert row["ok"], f"rank {rank}: {row}"
            assert row["total"] >= 1
            expected = 0 if row["check"] == "uninstall-after-shard" else row["total"]
            assert row["fused"] == expected, f"rank {rank}: {row}"
            if row["check"] == "shard-then-install":
                assert row["notes"] == [f"verdicts agreed across {RANKS} ranks"]


@pytest.mark.parametrize("quantized", [False, True], ids=["float32", "4bit"])
def test_vlm_tensor_parallel_both_orders(tmp_path, quantized):
    # mlx-vlm's language models with a shard() of their own, as mlx_vlm's
    # sharded_load calls it: both orders bitwise, then uninstall.
    pytest.importorskip("mlx_vlm", reason="mlx-vlm is pinned in requirements-test.txt")
    names = [f for f in VLM_SHARDED if f not in METAL_ONLY]
    assert {"qwen3_vl_moe", "deepseek_v3", "gpt_oss"} <= set(names), names
    records = launch(tmp_path, "tensor", names, quantized, vlm=True)
    for rank, rows in records.items():
        assert len(rows) == 3 * len(names), rows
        for row in rows:
            assert row["ok"], f"rank {rank}: {row}"
            expected = 0 if row["check"] == "uninstall-after-shard" else row["total"]
            assert row["total"] >= 1 and row["fused"] == expected, f"rank {rank}: {row}"


def test_pipeline_parallel_fuses_own_layers(tmp_path):
    names = [f for f in PIPELINED if f not in METAL_ONLY]
    records = launch(tmp_path, "pipeline", names, quantized=True)
    totals = {}
    for rank, rows in records.items():
        assert len(rows) == 2 * len(names)
        for row in rows:
            assert row["ok"] and row["fused"] == row["total"], f"rank {rank}: {row}"
            if row["check"] == "pipeline-then-install":
                totals.setdefault(row["family"], []).append(row["total"])
    # The ranks hold different layers, and together all of the model's.
    for family, per_rank in totals.items():
        assert sum(per_rank) == sum(
            1 for _ in __import__("moefuse_runtime").find_switch_glus(families.build(family))
        ), family


def test_group_agrees_on_every_verdict(tmp_path):
    records = launch(tmp_path, "agreement", ["qwen3_moe", "deepseek_v3"], quantized=True)
    for family in ("qwen3_moe", "deepseek_v3"):
        rows = {
            (r["rank"], r["check"]): r
            for rank in records
            for r in records[rank]
            if r["family"] == family
        }
        # With the group: rank 1 lacks headroom, so neither rank fuses.
        assert rows[(0, "agreement-group")]["fused"] == 0
        assert rows[(1, "agreement-group")]["fused"] == 0
        assert rows[(0, "agreement-group")]["reasons"] == [
            "rank 1 could not fuse this layer (verdicts agreed across ranks)"
        ]
        assert "headroom" in rows[(1, "agreement-group")]["reasons"][0]
        # Without it the ranks would run different paths (still exact).
        assert rows[(0, "agreement-local")]["fused"] == rows[(0, "agreement-local")]["total"]
        assert rows[(1, "agreement-local")]["fused"] == 0
        assert all(r["ok"] for r in rows.values())


def test_a_fault_on_one_rank_is_its_verdict(tmp_path):
    # rank 1 raises while checking its first layer and while probing the
    # headroom of its second: both ranks finish (bounded by launch's timeout),
    # leave those layers unfused, name the rank and the reason, and compute as
    # the unfused sharded model
    records = launch(tmp_path, "fault", ["qwen3_moe"], quantized=True)
    rows = {rank: records[rank][0] for rank in records}
    assert all(row["ok"] for row in rows.values())
    assert rows[0]["fused"] == rows[1]["fused"] == rows[0]["total"] - 2
    faulted = rows[1]["skipped"]
    assert any("failed while checking (RuntimeError: injected in checking)" in r for r in faulted)
    assert any("failed while checking (OSError: injected in the probe)" in r for r in faulted)
    assert (
        rows[0]["skipped"]
        == ["rank 1 could not fuse this layer (verdicts agreed across ranks)"] * 2
    )


def test_sharding_the_stacked_tensor_as_one_segment_is_caught(tmp_path):
    """The bug of mlx-lm's load-time attempt (PR #1032), reproduced on purpose:
    rank 0 gets all of gate, rank 1 all of up. The parity check must see it."""
    records = launch(tmp_path, "segments", ["qwen3_moe"], quantized=True)
    for rows in records.values():
        by_check = {r["check"]: r for r in rows}
        assert by_check["segments-1"]["ok"] is False
        assert by_check["segments-2"]["ok"] is True


def test_tensor_parallel_with_dense_mlps_both_orders(tmp_path):
    """Dense MLPs are sharded by shard_linear, which replaces the modules: the
    guard unfuses them too, and re-fuses them after the model's own shard()."""
    names = ["qwen3_moe", "deepseek_v3", "glm4_moe", "minimax"]
    records = launch(tmp_path, "tensor", names, quantized=True, dense=True)
    for rank, rows in records.items():
        for row in rows:
            assert row["ok"], f"rank {rank}: {row}"
            if row["check"] != "uninstall-after-shard":
                assert row["fused"] == row["total"], f"rank {rank}: {row}"
                assert row["dense_fused"] == row["dense_total"], f"rank {rank}: {row}"
        assert sum(r["dense_total"] for r in rows if "dense_total" in r) > 0


def test_dense_models_tensor_parallel_both_orders(tmp_path):
    """Dense-only families whose Model has shard(): every MLP fused on both ranks."""
    names = [f for f in families.discover_dense() if hasattr(_model_class(f), "shard")]
    assert {"llama", "qwen2", "qwen3", "ministral3"} <= set(names)
    for quantized in (False, True):
        out = tmp_path / ("4bit" if quantized else "float")
        out.mkdir()
        records = launch(out, "tensor", names, quantized, dense=True)
        for rank, rows in records.items():
            for row in rows:
                assert row["ok"], f"rank {rank}: {row}"
                if row["check"] != "uninstall-after-shard":
                    assert row["dense_fused"] == row["dense_total"] > 0, f"rank {rank}: {row}"
