"""``moefuse tune``: its logic and its file format on the CPU, with a stand-in
timer (the GPU run: docs/benchmarks.md)."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import run
from kernel_checks import kernels_on, quantized_layer  # noqa: F401 - kernels_on: autouse

import moefuse_runtime
from moefuse_runtime.cuda import decode, grouped, jit, tiles, tune
from moefuse_runtime.cuda.device import ARCH_LIMITS, Limits
from moefuse_runtime.cuda.formats import WeightFormat
from moefuse_runtime.cuda.tiles import Tiling

SHAPE = tune.Shape("test", hidden=256, experts=64, top_k=4, width=128)
AFFINE_4 = WeightFormat("affine", 4, 64)  # SHAPE's format


FAST_FEW = Tiling(16, 128, 1, 4, 4, 4, True)
FAST_MANY = Tiling(64, 128, 1, 4, 4, 1, True)


def fake_timer(calls: list):
    """FAST_FEW wins up to 8 rows per expert, FAST_MANY above, the others
    by their shape (no ties); BN 256 at BM 16 fails."""

    def timer(shape, tokens, gate_up, tiling):
        calls.append((tokens, gate_up, tiling))
        if tiling.bn == 256 and tiling.bm == 16:
            raise RuntimeError("launch failed")
        rows = tokens * shape.top_k / shape.experts
        if tiling == (FAST_FEW if rows <= 8 else FAST_MANY):
            return 1e-3
        return 2e-3 + tiling.bm * 1e-6 + tiling.stages * 1e-7 + tiling.min_blocks * 1e-8

    return timer


def test_candidates_fit_the_gpu_and_suit_the_density():
    rtx = ARCH_LIMITS[89]
    for rows in (0.5, 2, 16, 64, 512):
        for gate_up in (True, False):
            chosen = tune.candidates_for(rows, gate_up, 8, rtx)
            assert chosen
            assert all(
                t.why_not(gate_up, 8, rtx) is None and tune.suits(t.bm, rows) for t in chosen
            )
    big = Tiling(64, 128, 1, 4, 4, 1, True)  # 64 KB at 8 bits
    small_gpu = Limits(shared_per_block=40 * 1024, threads_per_sm=1536)
    assert big in tune.candidates_for(64, False, 8, ARCH_LIMITS[90])
    assert big not in tune.candidates_for(64, False, 8, small_gpu)


def test_the_wide_tilings_are_tried_where_they_fit_and_do_not_spill():
    # BM 128 x BN 256 (8 warps, a shared dequantized tile): dense prefill, up
    # to 6-bit weights (8-bit spills), where their 136-176 KiB fit
    wide = set(tune.WIDE)
    assert wide <= set(tune.candidates_for(128, True, 4, ARCH_LIMITS[90]))
    assert wide <= set(tune.candidates_for(128, False, 4, ARCH_LIMITS[80]))
    assert set(tune.candidates_for(128, False, 6, ARCH_LIMITS[80])) & wide == {tune.WIDE[0]}
    assert not wide & set(tune.candidates_for(128, True, 8, ARCH_LIMITS[90]))
    assert not wide & set(tune.candidates_for(128, True, 4, ARCH_LIMITS[89]))  # 99 KB
    assert not wide & set(tune.candidates_for(2, True, 4, ARCH_LIMITS[90]))  # sparse


def test_the_hopper_tilings_are_tried_on_sm_90_alone():
    # wgmma exists on sm_90 only; the kernel reads 4- and 8-bit codes; BM 64+
    hopper = set(tune.WGMMA)
    assert hopper <= set(tune.candidates_for(256, True, 4, ARCH_LIMITS[90]))
    assert hopper <= set(tune.candidates_for(256, False, 8, ARCH_LIMITS[90]))
    for arch in (80, 86, 89, 100, 120, 121):
        assert not hopper & set(tune.candidates_for(256, True, 4, ARCH_LIMITS[arch]))
    assert not hopper & set(tune.candidates_for(256, True, 3, ARCH_LIMITS[90]))
    assert not hopper & set(tune.candidates_for(2, True, 4, ARCH_LIMITS[90]))  # sparse


def test_measure_keeps_every_timing_and_the_fastest():
    calls: list = []
    seen = {}

    def progress(items, total):
        seen["total"] = total
        return items

    points = tune.measure(SHAPE, (32, 256), ARCH_LIMITS[90], fake_timer(calls), progress)
    assert seen["total"] == len(calls) > 0
    by = {(p.tokens, p.gate_up): p for p in points}
    assert by[(32, True)].best() == FAST_FEW  # 2 rows per expert
    assert by[(256, False)].best() == FAST_MANY  # 16 rows per expert
    failed = [r for p in points for r in p.results.values() if isinstance(r, str)]
    assert failed and all("launch failed" in r for r in failed)


def test_the_table_merges_counts_and_reads_back(tmp_path, monkeypatch, as_cuda):
    points = tune.measure(SHAPE, (16, 32, 64, 128, 512), ARCH_LIMITS[90], fake_timer([]))
    base = tiles.table_for("NVIDIA H100 80GB HBM3", "sm_90")
    table = tune.table(SHAPE, points, "Test GPU", "sm_90a", base)
    gate_up = table["gate_up"]
    # 1, 2, 4 and 8 rows per expert: BM 16 (BM 64 does not suit 8 rows);
    # 32: BM 64, for any count above; then the base table's entries
    assert [(e["max_rows_per_expert"], e["tiling"]["bm"]) for e in gate_up[:2]] == [
        (8.0, 16),
        (None, 64),
    ]
    assert gate_up[0]["bits"] == [4] and gate_up[0]["modes"] == ["affine"]
    assert gate_up[0]["group_sizes"] == [64]  # what was measured
    assert gate_up[2:] == json.loads(
        json.dumps(tune.table(SHAPE, points, "x", "sm_90", base)["gate_up"][2:])
    )
    assert table["devices"] == ["Test GPU"] and table["archs"] == ["sm_90"]
    assert len(table["timings"]) == len(points)
    path = tmp_path / "table.json"
    tune.write(path, table)
    parsed = tiles.parse("tuned", json.loads(path.read_text()))
    h90 = ARCH_LIMITS[90]
    assert parsed.tiling(3, True, AFFINE_4, h90).bm == 16
    assert parsed.tiling(8.5, True, AFFINE_4, h90).bm == 64
    for other in (WeightFormat("affine", 8), WeightFormat("mxfp4", 4)):  # the base's
        assert parsed.tiling(3, True, other, h90) == base.tiling(3, True, other, h90)
        assert parsed.tiling(40, True, other, h90) == base.tiling(40, True, other, h90)
    monkeypatch.setenv("MOEFUSE_TILES", str(path))
    layer = quantized_layer(256, 128, 64)
    moefuse_runtime.install(layer, reserve_bytes=0)
    tilings = layer.kernels.grouped.reachable_tilings(64, (AFFINE_4, AFFINE_4))
    assert {pair[0].bm for pair in tilings} == {16, 64}


def test_a_table_tuned_at_prefill_sizes_keeps_its_base_below_them(as_cuda):
    # 512 and 2,048 tokens: 32 and 128 rows per expert; below 32 rows the
    # base table's affine 4-bit entries stay (not BM 64 tiles at 1 row)
    points = tune.measure(SHAPE, (512, 2048), ARCH_LIMITS[90], fake_timer([]))
    base = tiles.table_for("NVIDIA H200", "sm_90")
    table = tiles.parse("tuned", tune.table(SHAPE, points, "Test GPU", "sm_90a", base))
    h90 = ARCH_LIMITS[90]
    for gate_up in (True, False):
        for rows in (1, 2, 8):
            assert table.tiling(rows, gate_up, AFFINE_4, h90) == base.tiling(
                rows, gate_up, AFFINE_4, h90
            )
        for rows in (32, 128, 1e4):
            assert table.tiling(rows, gate_up, AFFINE_4, h90) == FAST_MANY
        # another format, or the same at a group size not measured: the base's
        for other in (WeightFormat("nvfp4", 4, 16), WeightFormat("affine", 4, 32)):
            for rows in (1, 32, 1e4):
                assert table.tiling(rows, gate_up, other, h90) == base.tiling(
                    rows, gate_up, other, h90
                )


def fake_decode_timers(crossover: int | None, failing_path_at: int | None = None):
    """Decode tilings: (2, 8) fastest for gate_up, (4, 4) for down, (1, 4)
    fails. Paths: the decode kernels faster below ``crossover`` tokens."""

    def tiling_timer(shape, tokens, gate_up, tiling):
        if tiling == (1, 4):
            raise RuntimeError("launch failed")
        best = (2, 8) if gate_up else (4, 4)
        return 1e-5 * tokens * (1 if tiling == best else 2 + tiling[0] / 10 + tiling[1] / 100)

    def path_timer(shape, tokens, path):
        if tokens == failing_path_at:
            raise RuntimeError("out of memory")
        decode_wins = crossover is None or tokens < crossover
        return 1e-4 * tokens * (1 if (path == "decode") == decode_wins else 2)

    return tiling_timer, path_timer


def test_tune_measures_the_decode_tilings_and_where_the_tensor_cores_win(as_cuda):
    seen = {}

    def progress(items, total):
        seen["total"] = total
        return items

    points = tune.measure_decode(SHAPE, *fake_decode_timers(crossover=16), progress)
    assert seen["total"] == len(tune.DECODE_TOKENS) * 2 * len(tune.DECODE_TILINGS) + len(
        tune.BOUNDARY_TOKENS
    ) * len(tune.PATHS)
    assert tune.fastest_decode_tiling(points, True) == (2, 8)
    assert tune.fastest_decode_tiling(points, False) == (4, 4)  # (1, 4) failed: out
    assert tune.boundary(points, SHAPE) == 8 * SHAPE.top_k / SHAPE.experts  # up to 8 tokens
    base = tiles.table_for("NVIDIA H100 80GB HBM3", "sm_90")
    table = tune.table(
        SHAPE,
        tune.measure(SHAPE, (512,), ARCH_LIMITS[90], fake_timer([])),
        "Test GPU",
        "sm_90a",
        base,
        points,
    )
    decode = tiles.parse("tuned", json.loads(json.dumps(table))).decode
    assert tune.short_rows(SHAPE, base.decode)  # width 128 at 4 bits: 4 loads a row
    assert (decode.gate_up_tiling, decode.short_row_tiling) == ((2, 8), (4, 4))
    assert decode.down_tiling == base.decode.down_tiling
    assert decode.pairs_per_expert == 0.5 and decode.max_pairs >= 32
    assert decode.max_pairs_for(SHAPE.experts, True) == max(decode.min_pairs, 32)
    assert {r["kernel"] for r in table["decode_timings"]["tilings"]} == {"gate_up", "down"}
    assert len(table["decode_timings"]["paths"]) == len(tune.BOUNDARY_TOKENS)


@pytest.mark.parametrize(
    ("crossover", "failing", "expected"),
    [(1, None, 0.0), (None, None, 32 * 4 / 64), (4, 1, None), (16, 4, 2 * 4 / 64)],
)
def test_the_decode_range_ends_where_the_tensor_cores_first_win(crossover, failing, expected):
    # the tensor cores win from the first count: no decode range past min_pairs;
    # decode wins everywhere: the largest count; a path failing at the fewest
    # count: unknown (the base's stays); failing later: the range ends there
    points = tune.measure_decode(SHAPE, *fake_decode_timers(crossover, failing))
    assert tune.boundary(points, SHAPE) == expected


def test_the_gpu_timer_launches_the_kernels_it_times(launches):
    # on the CPU with launches recorded, not run: each timer launches what
    # it names, and a forced path leaves the layer's own kernels in place
    timer = tune.GpuTimer()
    timer.ROUNDS = timer.BATCH = 1
    assert timer.decode(SHAPE, 4, True, (2, 8)) > 0
    assert {(s.name, dict(s.template)["OUTS"]) for s, _ in launches} == {
        (decode.GEMV_NAMES[True], 2)
    }
    layer = timer._layer(SHAPE)
    installed = layer.kernels
    for path, names in (
        ("decode", set(decode.GEMV_NAMES.values())),
        ("tensor_cores", {grouped.GEMM_NAME, grouped.ROUTE_NAME}),
    ):
        launches.clear()
        assert timer.path(SHAPE, 4, path) > 0
        assert {s.name for s, _ in launches} == names
        assert layer.kernels is installed


def test_the_gpu_timer_prepares_every_kernel_it_will_launch(launches, monkeypatch):
    # compiled ahead, in parallel, before the first timing: exactly the
    # variants the candidates' and the decode tilings' timings launch
    prepared: list = []

    def prepare_all(specs, arch):
        prepared.extend(specs)
        return jit.BuildReport({}, 0.0)

    monkeypatch.setattr(jit, "prepare_all", prepare_all)
    timer = tune.GpuTimer()
    timer.ROUNDS = timer.BATCH = 1
    planned = tune.plan(SHAPE, [16, 512], ARCH_LIMITS[90])
    assert {t.wgmma for *_, t in planned} == {False, True}
    timer.prepare(SHAPE, planned, decode=True)
    launches.clear()
    for count, _, gate_up, tiling in planned:
        timer(SHAPE, count, gate_up, tiling)
    for tiling in tune.DECODE_TILINGS:
        for gate_up in (True, False):
            timer.decode(SHAPE, 1, gate_up, tiling)
    assert set(prepared) == {spec for spec, _ in launches}


def test_shape_of_a_model_directory(demo_model):
    shape = tune.shape_of_model(demo_model)
    config = json.loads((demo_model / "config.json").read_text())
    assert (shape.hidden, shape.experts, shape.top_k, shape.bits) == (
        config["hidden_size"],
        config["num_experts"],
        config["num_experts_per_tok"],
        config["quantization"]["bits"],
    )
    assert shape.width == config["moe_intermediate_size"]


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["tune"], 1, "moefuse tune: needs MLX's CUDA backend (this machine: cpu)"),
        (["tune", "--bits", "0"], 2, "--bits: must be at least 1"),
        (["tune", "--preset", "nope"], 2, "invalid choice"),
    ],
)
def test_tune_on_the_cpu_says_what_it_needs(args, code, words):
    done = run([sys.executable, "-m", "moefuse_runtime.cli", *args], timeout=120)
    assert done.returncode == code
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], done.stderr


def test_the_compile_check_covers_every_decode_tiling_tune_times():
    # scripts/check_kernel_source.py --candidates compiles each outputs-per-warp
    # tune times, at its largest block; the shipped one is not a candidate
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import check_kernel_source as check

    shipped = tiles.Decode().gate_up_tiling
    label = "gemv bfloat16_t affine 4-bit g64 act=swiglu bias=False"
    found = {
        dict(v.spec.template)["OUTS"]: v
        for v in check.decode_variants(candidates=True)
        if v.label.startswith(label)
    }
    assert set(found) == {shipped[0]} | {outs for outs, _ in tune.DECODE_TILINGS}
    for outs, variant in found.items():
        warps = max(w for o, w in {shipped, *tune.DECODE_TILINGS} if o == outs)
        assert variant.threads == 32 * warps
        assert variant.candidate == (outs != shipped[0])
    assert [v.label for v in check.decode_variants() if v.label.startswith(label)] == [label]


HANGING_TUNE = """
import sys, time
import moefuse_runtime.memory
from moefuse_runtime import cli
from moefuse_runtime.cuda import device, jit, tune

moefuse_runtime.memory.backend = lambda: "cuda"
jit.device_arch, jit.device_name = lambda: "sm_89", lambda: "a GPU of no table"
device.device_limits = device.limits_of
tune.CANDIDATE_SECONDS = 1.0


class Timer:  # the third candidate's kernel never finishes
    calls = 0

    def prepare(self, shape, planned, decode):
        return jit.BuildReport({}, 0.0)

    def __call__(self, shape, tokens, gate_up, tiling):
        Timer.calls += 1
        if Timer.calls == 3:
            time.sleep(120)
        return 1e-3


tune.GpuTimer = Timer
sys.exit(cli.main(["tune", "--preset", "qwen3-30b-a3b", "--tokens", "64", "--out", sys.argv[1]]))
"""


def test_a_kernel_that_never_finishes_stops_tune_with_what_was_measured(tmp_path):
    # it cannot be interrupted from Python: the watchdog writes the timings
    # so far beside the table and ends the process instead of waiting forever
    out = tmp_path / "tiles.json"
    done = run([sys.executable, "-c", HANGING_TUNE, str(out)], timeout=60)
    assert done.returncode == 3, done.stderr
    assert "has run for 1 s" in done.stderr and "tiles.partial.json" in done.stderr
    assert not out.exists()
    partial = json.loads((tmp_path / "tiles.partial.json").read_text())
    assert partial["hung"].startswith("64 tokens, gate_up, Tiling(")
    (point,) = partial["tensor_cores"]
    timed = [v for v in point["tflops"].values() if isinstance(v, float)]
    assert len(timed) == 2  # the two candidates before it


@pytest.mark.parametrize(("registers", "problems"), [(168, 0), (80, 1)])
def test_the_compile_check_keeps_a_copying_warpgroup_alone_on_its_sm(
    registers, problems, monkeypatch, capsys
):
    # setmaxnreg hands registers over within one block per SM: a copying
    # warpgroup's kernel whose launch registers would let a second block in
    # is a problem (84 x 384 x 2 fits an SM's 64K, 168 x 384 x 2 does not)
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import check_kernel_source as check

    producer = next(
        v
        for v in check.tensor_core_variants(check.table_tilings(True), check.shipped_tilings())
        if dict(v.spec.template).get("PRODUCER")
    )
    assert producer.threads == 384
    usage = {producer.spec.kernel_name: {"registers": registers}}
    monkeypatch.setattr(check, "compile_unit", lambda *args: usage)
    assert check.check("sm_90", [producer], Path("."), 1) == problems
    assert ("PROBLEM" in capsys.readouterr().out) == bool(problems)
