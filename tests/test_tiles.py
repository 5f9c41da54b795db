"""Tile tables per device, the GPU's limits, and the selection that obeys them
(CPU: nothing runs on a GPU here)."""

from __future__ import annotations

import json
import logging

import pytest
from kernel_checks import kernels_on, quantized_layer  # noqa: F401 - kernels_on: autouse

import moefuse_runtime
from moefuse_runtime import cuda
from moefuse_runtime.cuda import device, grouped, tiles
from moefuse_runtime.cuda.device import ARCH_LIMITS, SMALLEST, Limits
from moefuse_runtime.cuda.formats import FORMATS, WeightFormat
from moefuse_runtime.cuda.tiles import Tiling
from moefuse_runtime.layer import kernel_paths

ALL_FORMATS = [WeightFormat(mode, b) for mode, (bits, _) in FORMATS.items() for b in bits]
AFFINE_4 = WeightFormat("affine", 4)
ROWS = [1, 1.5, 2, 4, 7, 12, 12.5, 30, 48, 49, 100, 160, 161, 1000, 1e6]


def test_shipped_tables_parse_and_the_default_fits_every_gpu():
    tables, default = tiles.shipped()
    assert default in tables
    for gate_up in (True, False):
        for weights in ALL_FORMATS:
            for rows in ROWS:
                tiling = tables[default].tiling(rows, gate_up, weights, SMALLEST)
                assert tiling is not None, (gate_up, weights, rows)
                assert tiling.why_not(gate_up, weights.bits, SMALLEST) is None


@pytest.mark.parametrize("arch", sorted(ARCH_LIMITS))
@pytest.mark.parametrize("weights", ALL_FORMATS, ids=str)
def test_selection_never_picks_a_tiling_past_an_architectures_limits(arch, weights):
    limits, bits = ARCH_LIMITS[arch], weights.bits
    table = tiles.table_for("", f"sm_{arch}").name
    found = grouped.buckets(table, (weights, weights), limits)
    assert found is not None  # every architecture takes the tensor cores today
    for gate_up_tiling, down_tiling in found[1]:
        for gate_up, tiling in ((True, gate_up_tiling), (False, down_tiling)):
            assert tiling.shared_bytes(bits) <= limits.shared_per_block
            assert tiling.threads * tiling.min_blocks <= limits.threads_per_sm
            assert tiling.why_not(gate_up, bits, limits) is None


def test_a_tiling_past_the_limits_is_named():
    big = Tiling(128, 256, 2, 4, 4, 1)  # 4 stages of 128 A rows and 256 8-bit B rows
    assert "shared memory" in big.why_not(False, 8, ARCH_LIMITS[89])
    assert big.why_not(False, 8, ARCH_LIMITS[90]) is None
    crowded = Tiling(16, 128, 1, 4, 4, min_blocks=16)
    assert "threads per SM" in crowded.why_not(True, 4, ARCH_LIMITS[89])


def test_tables_are_found_by_name_then_architecture_then_default(caplog):
    default = tiles.shipped()[1]
    assert tiles.table_for("NVIDIA H100 80GB HBM3", "sm_90a").name == "h100"
    assert tiles.table_for("NVIDIA H200", "sm_90a").name == "h200"  # by name
    assert tiles.table_for("NVIDIA GH200 480GB", "sm_90a").name == "h100"  # by architecture
    tiles._warn_unmeasured.cache_clear()
    with caplog.at_level(logging.WARNING, logger="moefuse_runtime"):
        for _ in range(3):
            assert tiles.table_for("NVIDIA GeForce RTX 4090", "sm_89").name == default
    warnings = [r for r in caplog.records if "no measured tile table" in r.message]
    assert len(warnings) == 1 and "RTX 4090" in warnings[0].message  # once


def table_json(bm: int, max_pairs: int = 64) -> dict:
    tiling = {"bm": bm, "bn": 128, "warps_m": 1, "warps_n": 4, "stages": 4, "b_regs": True}
    return {
        "devices": ["Test GPU"],
        "decode": {"max_pairs": max_pairs},
        "gate_up": [{"max_rows_per_expert": None, "tiling": tiling}],
        "down": [{"max_rows_per_expert": None, "tiling": tiling}],
    }


def test_a_users_table_wins(tmp_path, monkeypatch, as_cuda):
    path = tmp_path / "tiles.json"
    path.write_text(json.dumps(table_json(bm=32, max_pairs=48)))
    monkeypatch.setenv("MOEFUSE_TILES", str(path))
    table = tiles.table_for("NVIDIA H100 80GB HBM3", "sm_90")
    assert table.name == f"MOEFUSE_TILES={path}" and table.decode.max_pairs == 48
    layer = quantized_layer(128, 64, 128)
    moefuse_runtime.install(layer, reserve_bytes=0)
    assert layer.kernels.decode.max_pairs == 48
    assert layer.kernels.grouped.table == table.name
    reachable = layer.kernels.grouped.reachable_tilings(128, (AFFINE_4, AFFINE_4))
    assert {t.bm for pair in reachable for t in pair} == {32}


@pytest.mark.parametrize(
    ("text", "words"),
    [("not json", "Expecting value"), ('{"gate_up": []}', "KeyError"), ("{}", "KeyError")],
)
def test_a_bad_users_table_is_an_error_naming_it(tmp_path, monkeypatch, text, words):
    path = tmp_path / "bad.json"
    path.write_text(text)
    tiles.user_table.cache_clear()
    monkeypatch.setenv("MOEFUSE_TILES", str(path))
    with pytest.raises(ValueError, match="MOEFUSE_TILES"):
        moefuse_runtime.install(quantized_layer(128, 64, 4))
    with pytest.raises(ValueError, match=words):
        tiles.user_table(str(path))


def test_a_table_needs_a_last_entry_for_any_rows():
    data = table_json(bm=16)
    data["down"][0]["max_rows_per_expert"] = 12
    with pytest.raises(ValueError, match="down needs a last entry"):
        tiles.parse("test", data)


@pytest.mark.parametrize(
    ("where", "change", "words"),
    [
        (0, {"modes": ["affine"]}, "down needs a last entry for any rows, bits, modes"),
        (0, {"group_sizes": [64]}, "down needs a last entry for any rows, bits, modes"),
        (0, {"modes": ["int4"]}, "unknown modes"),
    ],
)
def test_a_tables_modes_are_checked(where, change, words):
    data = table_json(bm=16)
    data["down"][where].update(change)
    with pytest.raises(ValueError, match=words):
        tiles.parse("test", data)


def test_an_entry_holds_for_its_modes_and_bits_alone():
    entry = tiles.Entry(None, Tiling(16, 128, 1, 4, 4), bits=(4,), modes=("affine", "mxfp4"))
    assert entry.holds(1e6, AFFINE_4) and entry.holds(1, WeightFormat("mxfp4", 4))
    assert not entry.holds(1, WeightFormat("nvfp4", 4))  # same bits, another mode
    assert not entry.holds(1, WeightFormat("affine", 8))
    anything = {"max_rows_per_expert": None, "tiling": entry.json()["tiling"]}
    kinds = {kind: [entry.json(), anything] for kind in ("gate_up", "down")}
    assert tiles.parse("read back", kinds).gate_up[0] == entry


def test_an_entry_for_some_group_sizes_holds_for_those_alone():
    entry = tiles.Entry(None, Tiling(16, 128, 1, 4, 4), bits=(4,), group_sizes=(64, 128))
    assert entry.holds(1, WeightFormat("affine", 4, 64))
    assert entry.holds(1, WeightFormat("affine", 4, 128))
    assert not entry.holds(1, WeightFormat("affine", 4, 32))
    assert not entry.holds(1, WeightFormat("affine", 4))  # a format of no group size
    assert tiles.Entry(None, entry.tiling).holds(1, WeightFormat("affine", 4, 32))
    anything = {"max_rows_per_expert": None, "tiling": entry.json()["tiling"]}
    kinds = {kind: [entry.json(), anything] for kind in ("gate_up", "down")}
    assert entry.json()["group_sizes"] == [64, 128]
    assert tiles.parse("read back", kinds).down[0] == entry


def test_the_h100_table_takes_two_blocks_per_sm_for_down_at_group_64_and_128_alone():
    # BM 128 x BN 128 at two blocks per SM was the fastest down above 128 rows
    # per expert (moefuse tune, H100) and spills at g32 (scripts/check_kernel_source.py)
    table, h90 = tiles.table_for("NVIDIA H100 80GB HBM3", "sm_90a"), ARCH_LIMITS[90]
    for group in (64, 128):
        two = table.tiling(512, False, WeightFormat("affine", 4, group), h90)
        assert (two.wgmma, two.bm, two.bn, two.min_blocks) == (True, 128, 128, 2)
        assert table.tiling(128, False, WeightFormat("affine", 4, group), h90).bm == 64
    wide = table.tiling(512, False, WeightFormat("affine", 4, 32), h90)
    assert (wide.wgmma, wide.bm, wide.bn, wide.warps_n) == (True, 128, 256, 16)
    for weights in (WeightFormat("affine", 4, 64), WeightFormat("affine", 4, 32)):
        gate_up = table.tiling(512, True, weights, h90)  # gate_up keeps BN 256
        assert (gate_up.bm, gate_up.bn, gate_up.warps_n) == (128, 256, 16)


def test_the_h200_table_takes_the_widest_wgmma_tiling_for_affine_4_bit_alone():
    # BM 128 x BN 256 over 4 warpgroups was fastest above 32 rows per expert,
    # and spills for nvfp4 (scripts/check_kernel_source.py): affine 4-bit only
    table, h90 = tiles.table_for("NVIDIA H200", "sm_90a"), ARCH_LIMITS[90]
    for gate_up in (True, False):
        wide = table.tiling(512, gate_up, AFFINE_4, h90)
        assert (wide.wgmma, wide.bm, wide.bn, wide.warps_n) == (True, 128, 256, 16)
        for mode in ("mxfp4", "nvfp4"):
            other = table.tiling(512, gate_up, WeightFormat(mode, 4), h90)
            assert (other.wgmma, other.bm, other.bn) == (True, 64, 128)
        eight = table.tiling(512, gate_up, WeightFormat("affine", 8), h90)
        assert not eight.wgmma  # the h100 table's entries for other bits
        few = table.tiling(1, gate_up, AFFINE_4, h90)
        assert not few.wgmma and few.bm == 16


def test_a_gpu_no_tiling_fits_keeps_gather_qmm_above_decode(as_cuda, monkeypatch):
    tiny = Limits(shared_per_block=8 * 1024, threads_per_sm=1536)
    monkeypatch.setattr(cuda, "device_limits", lambda arch: tiny)
    layer = quantized_layer(128, 64, 16)
    moefuse_runtime.install(layer, reserve_bytes=0)
    assert layer.kernels.grouped is None
    assert "no tiling of tile table 'h100' fits this GPU (8192 bytes" in kernel_paths(layer)[1]


def test_decode_rows_past_the_gpus_shared_memory_keep_gather_qmm(as_cuda):
    # the decode kernels stage x as fp32: K = 28,672 needs 112 KB, past an
    # RTX 4090's 99 KB per block and within an H100's 227 KB
    layer = quantized_layer(28672, 64, 4)
    moefuse_runtime.install(layer, reserve_bytes=0)
    as_cuda["value"] = "sm_89"
    assert "per block here" in kernel_paths(layer)[1]
    as_cuda["value"] = "sm_90"
    assert kernel_paths(layer)[0] is not None


def test_decode_range_follows_the_table():
    settings = tiles.shipped()[0]["h100"].decode
    # against the tensor cores half a pair per expert, one where they are
    # missing; 32 pairs at least, 128 at most
    assert [settings.max_pairs_for(e, True) for e in (8, 64, 128, 256, 512)] == [
        32,
        32,
        64,
        128,
        128,
    ]
    assert [settings.max_pairs_for(e, False) for e in (8, 64, 128, 256)] == [32, 64, 128, 128]


def test_the_limits_come_from_the_driver_where_it_answers(monkeypatch):
    def no_driver(ordinal):
        raise OSError("libcuda.so.1: cannot open shared object file")

    monkeypatch.setattr(device, "_ask_driver", no_driver)
    device._driver_limits.cache_clear()
    try:
        assert device.device_limits("sm_89") == ARCH_LIMITS[89]
        monkeypatch.setattr(device, "_ask_driver", lambda ordinal: Limits(1000, 512))
        device._driver_limits.cache_clear()
        assert device.device_limits("sm_89") == Limits(1000, 512)
    finally:
        device._driver_limits.cache_clear()
    assert device.limits_of("sm_1000") == SMALLEST  # an unknown architecture
