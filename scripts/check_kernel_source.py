"""Compile every kernel configuration with nvcc for every architecture, no GPU.

MLX builds an ``mx.fast.cuda_kernel`` at its first launch, on the device; a
typo or a spill would cost a GPU round trip. This script writes the
translation unit MLX would build for each variant (`jit.KernelSpec.mlx_source`:
signature, template constants and launch bounds exactly as the launchers
give them), with the stand-in of MLX's device/utils.cuh that the package's
own compiles use, and compiles them with nvcc for each architecture as MLX's
NVRTC would (``sm_XXa`` from sm_90 on), several variants per translation
unit. Per architecture it prints each variant's registers, spills and
shared memory (static from ptxas, dynamic from the launcher), and checks the
dynamic shared memory against the architecture's limit (cuda/device.py).

    python scripts/check_kernel_source.py [--arch sm_80 sm_86 ...] [--candidates]
        [--filter TEXT ...] [--jobs N]

The variants: the decode kernels for every format, dtype and activation
kind (with ``--candidates`` also at each outputs-per-warp `moefuse tune`
times); the tensor-core kernels for every tiling of tiles.json (with
``--candidates`` also `moefuse tune`'s) and every format and dtype; the
route kernel; the Hopper (wgmma) tilings on sm_90 alone. Exit status 1 if
any variant fails to compile, needs more shared memory than its
architecture has or more registers than an SM holds for its block (with a
copying warpgroup, also fewer than would keep a second block off its SM), or (a
tiling of the shipped tables, at the weight formats its entry holds for)
spills more than 16 bytes; a candidate's spill is reported.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx

from moefuse_runtime.cuda import activations, decode, device, formats, grouped, jit, tiles, tune
from moefuse_runtime.cuda.formats import WeightFormat

ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120", "sm_121")
"""What MLX's CUDA backend builds for (A100, RTX 30/A10, RTX 40/L40, H100/H200,
B200, RTX 50, GB10)."""

SPILL_LIMIT = 16
REGISTERS_PER_SM = 65536
"""Every architecture's register file: a block whose threads need more cannot launch."""
UNIT_SIZE = 24
"""Variants per translation unit: the compiler's start-up is paid once per unit."""


class Variant(NamedTuple):
    label: str
    spec: jit.KernelSpec
    shared: int
    """Dynamic shared memory in bytes."""
    candidate: bool = False
    """Only a `moefuse tune` candidate: a spill there is reported, not a
    problem (tune times it, and a spill only slows it down)."""
    threads: int = 256
    """Threads per block: their registers must fit an SM's 64K."""


GATE_UP_ROWS = 2 * 768
"""The stand-in gate_up's output rows (gate and up of width 768: N = 768)."""
DOWN_ROWS = 2880
"""The stand-in down's output rows (N = 2880: a partial last column tile)."""


def weights(
    mode: str, bits: int, group: int, dtype, bias: bool, gate_up: bool
) -> formats.QuantizedArrays:
    """Stand-in arrays of one format: their presence and dtypes, and the weight's
    output rows, which set the kernel's N (a template constant: with N = 0 the
    compiler may drop the whole kernel, and its registers say nothing)."""
    rows = GATE_UP_ROWS if gate_up else DOWN_ROWS
    scales = mx.zeros((1, 1, 1), dtype if mode == "affine" else mx.uint8)
    return formats.QuantizedArrays(
        mx.zeros((1, rows, 1), mx.uint32),
        scales,
        scales if mode == "affine" else None,
        mx.zeros((1, 1), dtype) if bias else None,
        mx.zeros((1,), mx.float32) if mode == "nvfp4" else None,
        mode,
        bits,
        group,
    )


def formats_and_activations() -> Iterator[tuple]:
    """(dtype, weights, activation or None for down): every format and group
    size with SwiGLU and with down, in both dtypes; every activation kind
    once (bf16, affine 4-bit with a bias)."""
    for dtype, (mode, (bit_set, groups)) in itertools.product(
        formats.KERNEL_DTYPES, formats.FORMATS.items()
    ):
        for bits, group, gate_up in itertools.product(bit_set, groups, (True, False)):
            act = activations.KernelActivation(activations.SWIGLU) if gate_up else None
            proj = weights(mode, bits, group, dtype, bias=mode == "mxfp4", gate_up=gate_up)
            yield dtype, proj, act
    for kind in range(len(activations.NAMES)):
        act = activations.KernelActivation(kind, 7.0, 1.702)
        yield mx.bfloat16, weights("affine", 4, 64, mx.bfloat16, bias=True, gate_up=True), act


def label_of(kind: str, dtype, proj, act) -> str:
    name = jit.TYPE_STRINGS[dtype]
    return f"{kind} {name} {proj.mode} {proj.bits}-bit g{proj.group_size} " + (
        f"act={act.name if act else 'down'} bias={proj.bias is not None}"
    )


def decode_variants(candidates: bool = False) -> Iterator[Variant]:
    """The decode kernels at the shipped tables' tilings (`tiles.Decode`), and
    with ``candidates`` at every outputs-per-warp and block size `moefuse
    tune` times (`tune.DECODE_TILINGS`; labelled ``outs=``)."""
    settings = tiles.Decode()
    for dtype, proj, act in formats_and_activations():
        k = 2880  # a multiple of every format's load unit
        shipped = settings.gate_up_tiling if act else settings.short_row_tiling
        tried = {shipped, *(tune.DECODE_TILINGS if candidates else ())}
        # the warps per block set the launch, not the kernel: one variant per
        # outputs per warp, checked at its largest block
        for outs in sorted({o for o, _ in tried}):
            warps = max(w for o, w in tried if o == outs)
            spec = decode.gemv_spec(proj, dtype, k, act, 8 if act else 1, outs)
            label = label_of("gemv", dtype, proj, act)
            candidate = outs != shipped[0]
            if candidate:
                label += f" outs={outs}"
            yield Variant(label, spec, decode.shared_bytes(k), candidate, 32 * warps)


def tensor_core_variants(
    tilings: set[tuple[bool, tiles.Tiling]], shipped: set[tuple[bool, tiles.Tiling, WeightFormat]]
) -> Iterator[Variant]:
    roomiest = device.ARCH_LIMITS[90]  # the most shared memory, and wgmma
    for (gate_up, tiling), (dtype, proj, act) in itertools.product(
        sorted(tilings, key=str), list(formats_and_activations())
    ):
        if gate_up != (act is not None) or tiling.why_not(gate_up, proj.bits, roomiest):
            continue  # the other kernel's, or no GPU could take it
        if not tune.tried(tiling, proj.bits):
            continue  # a candidate `moefuse tune` leaves out at these bits
        spec = grouped.gemm_spec(proj, dtype, 2880 if gate_up else 768, act, 4, tiling)
        label = f"{label_of('grouped', dtype, proj, act)} {tiling}"
        candidate = (gate_up, tiling, proj.format) not in shipped
        yield Variant(label, spec, tiling.shared_bytes(proj.bits), candidate, tiling.threads)
    route = grouped.route_spec(128, (16, 64))
    yield Variant("route", route, 0, threads=grouped.ROUTE_THREADS)


def shipped_tilings() -> set[tuple[bool, tiles.Tiling, WeightFormat]]:
    """(gate_up, tiling, format) of every shipped table entry, for the
    formats it holds for (an entry of affine 4-bit weights never runs nvfp4
    or 8-bit ones)."""
    tables, _ = tiles.shipped()
    every = [
        WeightFormat(mode, b, g)
        for mode, (bits, groups) in formats.FORMATS.items()
        for b in bits
        for g in groups
    ]
    return {
        (gate_up, entry.tiling, weights)
        for table in tables.values()
        for gate_up, entries in ((True, table.gate_up), (False, table.down))
        for entry in entries
        for weights in every
        if entry.holds(0, weights)
    }


def table_tilings(candidates: bool) -> set[tuple[bool, tiles.Tiling]]:
    tables, _ = tiles.shipped()
    found = {
        (gate_up, entry.tiling)
        for table in tables.values()
        for gate_up, entries in ((True, table.gate_up), (False, table.down))
        for entry in entries
    }
    if candidates:
        tried = tune.CANDIDATES + tune.WIDE + tune.WGMMA
        found |= {(gate_up, t) for t in tried for gate_up in (True, False)}
    return found


def compile_unit(arch: str, include: Path, variants: list[Variant], tmp: Path) -> dict:
    """One translation unit of several variants for one architecture: per
    kernel name, ptxas's registers, spills and static shared memory, or the
    compiler's errors."""
    number = jit.arch_number(arch)
    target = jit.nvrtc_arch(arch).removeprefix("sm_")
    text = "".join(v.spec.mlx_source() for v in variants)
    unit = tmp / f"{arch}-{abs(hash(text))}.cu"
    unit.write_text(text)
    command = ["nvcc", "-std=c++17", f"-gencode=arch=compute_{target},code=sm_{target}", "-c"]
    command += [
        "-o",
        str(unit.with_suffix(".o")),
        f"-I{include}",
        f"-I{jit.mlx_root() / 'include'}",
    ]
    command += ["--resource-usage", str(unit)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr[-3000:], "arch": number}
    return parse_ptxas(done.stdout + done.stderr)


_ENTRY = re.compile(r"Function properties for (\S+)|Compiling entry function '(\S+)'")


def parse_ptxas(text: str) -> dict:
    """Per mangled kernel name: registers, spill bytes, static shared memory."""
    usage: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        entry = _ENTRY.search(line)
        if entry:
            current = usage.setdefault(entry.group(1) or entry.group(2), {})
            continue
        if current is None:
            continue
        if m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
            current["spills"] = max(int(m.group(1)), int(m.group(2)))
        if m := re.search(r"Used (\d+) registers", line):
            current["registers"] = int(m.group(1))
        if m := re.search(r"(\d+) bytes smem", line):
            current["smem"] = int(m.group(1))
    return usage


def check(arch: str, variants: list[Variant], include: Path, jobs: int) -> int:
    """Compile and report one architecture's variants; the number of problems."""
    limits = device.limits_of(arch)
    fitting = [v for v in variants if v.shared <= limits.shared_per_block]
    if len(fitting) < len(variants):
        print(
            f"{arch}: {len(variants) - len(fitting)} variants need more shared memory than "
            f"{limits.shared_per_block} bytes: the selection never takes them here"
        )
    if not limits.warpgroup_mma:
        fitting = [v for v in fitting if v.spec.name != grouped.WGMMA_NAME]
    variants = fitting
    units = [variants[i : i + UNIT_SIZE] for i in range(0, len(variants), UNIT_SIZE)]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(lambda u: compile_unit(arch, include, u, Path(tmp)), units))
    problems = 0
    for unit, result in zip(units, results, strict=True):
        if "error" in result:
            problems += len(unit)
            print(f"{arch}: a unit of {len(unit)} variants FAILED to compile:\n{result['error']}")
            continue
        for label, spec, dynamic, candidate, threads in unit:
            usage = next((u for name, u in result.items() if spec.kernel_name in name), None)
            if usage is None:
                problems += 1
                print(f"{arch} {label}: no ptxas report")
                continue
            shared = dynamic + usage.get("smem", 0)
            spills = usage.get("spills", 0) > SPILL_LIMIT
            registers = usage.get("registers", 0) * threads > REGISTERS_PER_SM
            if dict(spec.template).get("PRODUCER"):
                # setmaxnreg moves registers within one block per SM: a second
                # block beside it could leave its warpgroups waiting for them
                registers |= 2 * usage.get("registers", 0) * threads <= REGISTERS_PER_SM
            bad = (spills and not candidate) or shared > limits.shared_per_block or registers
            problems += bad
            print(
                f"{arch} {label}: {usage.get('registers')} registers, "
                f"{usage.get('spills', 0)} bytes spilled, {shared} bytes shared "
                f"(of {limits.shared_per_block})"
                f"{' PROBLEM' if bad else ' (a tune candidate)' if spills else ''}",
                flush=True,
            )
    print(f"{arch}: {len(variants) - problems}/{len(variants)} variants fine")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=list(ARCHS))
    parser.add_argument("--candidates", action="store_true", help="moefuse tune's tilings too")
    parser.add_argument("--filter", nargs="*", default=[], help="labels with all of these")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    tilings, shipped = table_tilings(args.candidates), shipped_tilings()
    variants = [*decode_variants(args.candidates), *tensor_core_variants(tilings, shipped)]
    variants = [v for v in variants if all(f in v.label for f in args.filter)]
    unique = list({v.spec.kernel_name: v for v in variants}.values())
    with tempfile.TemporaryDirectory() as include:
        stand_in = Path(include) / "mlx" / "backend" / "cuda" / "device" / "utils.cuh"
        stand_in.parent.mkdir(parents=True)
        stand_in.write_text(jit.UTILS_STAND_IN)
        problems = sum(check(arch, unique, Path(include), args.jobs) for arch in args.arch)
    print(f"{problems} problems over {len(args.arch)} architectures x {len(unique)} variants")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
