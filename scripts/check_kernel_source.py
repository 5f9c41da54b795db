"""Compile every kernel configuration with nvcc, without a GPU.

MLX builds a `mx.fast.cuda_kernel` at its first call, on the device; a typo
costs a GPU round trip. This script writes the translation unit MLX would
build for each configuration (signature, template constants and launch
bounds as mlx/backend/cuda/custom_kernel.cpp and moefuse_runtime/cuda write
them) and compiles it for sm_90a, printing registers and spills.

    python scripts/check_kernel_source.py MLX_SOURCE_ROOT [--grouped-only]

MLX_SOURCE_ROOT is a checkout of ml-explore/mlx (for device/utils.cuh).
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

from moefuse_runtime.cuda import activations, decode, formats, grouped, source

DTYPES = {mx.bfloat16: "__nv_bfloat16", mx.float16: "__half"}


def translation_unit(name: str, header: str, params: str, template: list, body: str) -> str:
    lines = [
        '#include "mlx/backend/cuda/device/utils.cuh"',
        "#include <cooperative_groups.h>",
        header,
        "namespace mlx::core::cu {",
        "namespace cg = cooperative_groups;",
        f"__global__ void {name}({params}) {{",
    ]
    for key, value in template:
        if key == "T":
            lines.append(f"  using T = {DTYPES[value]};")
        elif isinstance(value, bool):
            lines.append(f"  constexpr bool {key} = {'true' if value else 'false'};")
        else:
            lines.append(f"  constexpr int {key} = {value};")
    return "\n".join([*lines, body, "}", "}"])


def weights(mode: str, bits: int, group: int, dtype, bias: bool) -> formats.QuantizedArrays:
    """Stand-in arrays of one format: only their presence and dtypes matter here."""
    scales = mx.zeros((1,), dtype if mode == "affine" else mx.uint8)
    return formats.QuantizedArrays(
        mx.zeros((1,), mx.uint32),
        scales,
        scales if mode == "affine" else None,
        mx.zeros((1,), dtype) if bias else None,
        mx.zeros((1,), mx.float32) if mode == "nvfp4" else None,
        mode,
        bits,
        group,
    )


def variants():
    """(dtype, weights, activation or None for down): every format and group
    size with SwiGLU and with down; the float formats, and the bias, with
    every activation once (bf16)."""
    for dtype, (mode, (bit_set, groups)) in itertools.product(DTYPES, formats.FORMATS.items()):
        for bits, group, gate_up in itertools.product(bit_set, groups, (True, False)):
            act = activations.KernelActivation(activations.SWIGLU) if gate_up else None
            yield dtype, weights(mode, bits, group, dtype, bias=mode == "mxfp4"), act
    for kind in range(len(activations.NAMES)):
        act = activations.KernelActivation(kind, 7.0, 1.702)
        yield mx.bfloat16, weights("affine", 4, 64, mx.bfloat16, bias=True), act


def gemv_units():
    for dtype, proj, act in variants():
        gate_up = act is not None
        names, arrays, args = proj.inputs()
        inputs = [("x", dtype), *zip(names, (a.dtype for a in arrays), strict=True)]
        params = grouped.kernel_params([*inputs, ("indices", mx.uint32)], dtype)
        template = [
            *proj.template(mx.zeros((1, 2880), dtype), 768, gate_up),
            *(act or activations.KernelActivation(0)).template(),
            ("X_DIV", 8),
            ("OUTS", 2),
        ]
        label = f"gemv {DTYPES[dtype]} {proj.mode} {proj.bits}-bit g{proj.group_size} "
        label += f"act={act.name if act else 'down'} bias={proj.bias is not None}"
        body = decode.GEMV_SOURCE.format(args=args)
        yield (
            label,
            translation_unit(
                "custom_kernel_gemv", source.header("gemv.cuh"), params, template, body
            ),
        )


def table_tilings() -> set[tuple[bool, grouped.Tiling]]:
    """(gate_up?, tiling) of every tiles.json entry."""
    table = json.loads(source.read("tiles.json"))
    return {
        (kind == "gate_up", grouped.Tiling(**e["tiling"]))
        for arch, kinds in table.items()
        if arch != "comment"
        for kind, entries in kinds.items()
        for e in entries
    }


def candidate_tilings() -> set[tuple[bool, grouped.Tiling]]:
    """(gate_up?, tiling) of every candidate of scripts/tune_grouped.py."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tune_grouped import CANDIDATES

    return {(swiglu, grouped.Tiling(*c)) for swiglu, cs in CANDIDATES.items() for c in cs}


def grouped_units(tilings: set[tuple[bool, grouped.Tiling]]):
    for (gate_up, tiling), (dtype, proj, act) in itertools.product(
        sorted(tilings, key=str), list(variants())
    ):
        if tiling.why_not(gate_up, proj.bits) or gate_up != (act is not None):
            continue
        template = [
            *proj.template(mx.zeros((1, 2880), dtype), 90 if gate_up else 2880, gate_up),
            *(act or activations.KernelActivation(0)).template(),
            ("TOP_K", 4),
            ("BM", tiling.bm),
            ("BN", tiling.bn),
            ("WARPS_M", tiling.warps_m),
            ("WARPS_N", tiling.warps_n),
            ("STAGES", tiling.stages),
            ("B_REGS", tiling.b_regs),
        ]
        names, arrays, args = proj.inputs()
        inputs = [
            ("x", dtype),
            *zip(names, (a.dtype for a in arrays), strict=True),
            ("order", mx.uint32),
            ("tiles", mx.int32),
        ]
        params = grouped.kernel_params(inputs, dtype)
        header = source.header("grouped_gemm.cuh")
        if tiling.min_blocks > 1:
            header += grouped._launch_bounds(grouped.GEMM_NAME, template, tiling, params)
        name = grouped.kernel_name(grouped.GEMM_NAME, template)
        label = f"grouped {DTYPES[dtype]} {proj.mode} {proj.bits}-bit g{proj.group_size} "
        label += f"act={act.name if act else 'down'} bias={proj.bias is not None} {tiling}"
        body = grouped.GEMM_SOURCE.format(args=args)
        yield label, translation_unit(name, header, params, template, body)
    params = "const uint32_t* experts, const __grid_constant__ Shape experts_shape, "
    params += "uint32_t* order, int32_t* tiles_a, int32_t* tiles_b"
    body = grouped.ROUTE_SOURCE
    yield (
        "route",
        translation_unit(
            "custom_kernel_route",
            source.header("grouped_gemm.cuh"),
            params,
            [("E", 128), ("BM_A", 16), ("BM_B", 64)],
            body,
        ),
    )


def compile_unit(root: str, tmp: str, text: str) -> subprocess.CompletedProcess:
    unit = Path(tmp) / "k.cu"
    unit.write_text(text)
    command = ["nvcc", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-c"]
    command += ["-o", f"{tmp}/k.o", f"-I{root}", "--resource-usage", str(unit)]
    return subprocess.run(command, capture_output=True, text=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mlx_root")
    parser.add_argument("--grouped-only", action="store_true")
    parser.add_argument(
        "--candidates",
        action="store_true",
        help="the tilings scripts/tune_grouped.py sweeps, not tiles.json's",
    )
    parser.add_argument(
        "--filter", nargs="*", default=[], help="only configurations whose label has all of these"
    )
    args = parser.parse_args()
    units = list(grouped_units(candidate_tilings() if args.candidates else table_tilings()))
    if not args.grouped_only:
        units = list(gemv_units()) + units
    units = [(label, text) for label, text in units if all(f in label for f in args.filter)]
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for label, text in units:
            done = compile_unit(args.mlx_root, tmp, text)
            lines = done.stderr.splitlines()
            usage = " ".join(
                line.split("info    : ")[-1].strip()
                for line in lines
                if "registers" in line or "spill" in line
            )
            print(f"{label}: {'ok' if done.returncode == 0 else 'FAILED'} {usage}", flush=True)
            if done.returncode:
                print(done.stderr)
                failures += 1
    print(f"{len(units) - failures}/{len(units)} configurations compile")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
