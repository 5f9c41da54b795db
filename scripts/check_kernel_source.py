"""Compile the decode kernels' CUDA source with nvcc, without a GPU.

MLX builds a `mx.fast.cuda_kernel` at its first call, on the device; a typo
costs a GPU round trip. This script writes the translation unit MLX would
build (its signature and template constants, see mlx/backend/cuda/
custom_kernel.cpp) for each configuration and compiles it for sm_90.

    python scripts/check_kernel_source.py MLX_SOURCE_ROOT

MLX_SOURCE_ROOT is a checkout of ml-explore/mlx (for device/utils.cuh).
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import tempfile
from pathlib import Path

from moefuse_runtime import kernels

CUDA_TYPES = {"bfloat16": "__nv_bfloat16", "float16": "__half", "float32": "float"}


def translation_unit(signature: list[str], constants: dict, source: str) -> str:
    """The file MLX would compile: header, signature, template constants, body."""
    lines = [
        '#include "mlx/backend/cuda/device/utils.cuh"',
        "#include <cooperative_groups.h>",
        kernels._HEADER,
        "namespace mlx::core::cu {",
        "namespace cg = cooperative_groups;",
        f"__global__ void check_kernel({', '.join(signature)}) {{",
        *(f"  {_constant(k, v)};" for k, v in constants.items()),
        source,
        "}",
        "}",
    ]
    return "\n".join(lines)


def _constant(name: str, value) -> str:
    if isinstance(value, str):
        return f"using {name} = {value}"
    if isinstance(value, bool):
        return f"constexpr bool {name} = {str(value).lower()}"
    return f"constexpr int {name} = {value}"


def gemv_unit(t: str, bits: int, group: int, swiglu: bool) -> str:
    signature = [f"const {t}* x", "const uint32_t* w", f"const {t}* scales"]
    signature += [f"const {t}* biases", "const uint32_t* indices", f"{t}* out"]
    constants = {"T": t, "BITS": bits, "GROUP": group, "K": 2880, "N": 768}
    constants |= {"SWIGLU": swiglu, "X_DIV": 8, "OUTS": 2}
    return translation_unit(signature, constants, kernels._GEMV_SOURCE)


def ffn_unit(t: str, bits: int, group: int) -> str:
    signature = [f"const {t}* x", "const uint32_t* w", f"const {t}* scales"]
    signature += [f"const {t}* biases", "const uint32_t* indices", "const uint32_t* down_w"]
    signature += [f"const {t}* down_scales", f"const {t}* down_biases", "const uint32_t* sync"]
    signature += [f"{t}* y", f"{t}* h"]
    constants = {"T": t, "BITS": bits, "GROUP": group, "DOWN_BITS": bits, "DOWN_GROUP": group}
    constants |= {"K": 2880, "N": 768, "X_DIV": 8, "OUTS": 1, "DOWN_OUTS": 2, "WARPS": 8}
    return translation_unit(signature, constants, kernels._FFN_SOURCE)


def main(root: str) -> int:
    failures = 0
    units = {}
    for dtype, bits, group in itertools.product(
        CUDA_TYPES, kernels.KERNEL_BITS, kernels.KERNEL_GROUP_SIZES
    ):
        t = CUDA_TYPES[dtype]
        for swiglu in (True, False):
            units[f"gemv {dtype} {bits}-bit g{group} swiglu={swiglu}"] = gemv_unit(
                t, bits, group, swiglu
            )
        units[f"ffn {dtype} {bits}-bit g{group}"] = ffn_unit(t, bits, group)
    with tempfile.TemporaryDirectory() as tmp:
        for name, unit in units.items():
            source = Path(tmp) / "k.cu"
            source.write_text(unit)
            command = ["nvcc", "-std=c++17", "-arch=sm_90", "-c", "-o", f"{tmp}/k.o"]
            command += [f"-I{root}", "--resource-usage", str(source)]
            done = subprocess.run(command, capture_output=True, text=True)
            status = "ok" if done.returncode == 0 else "FAILED"
            lines = done.stderr.splitlines()
            usage = " ".join(line.strip() for line in lines if "registers" in line)
            print(f"{name}: {status} {usage}", flush=True)
            if done.returncode:
                print(done.stderr)
                failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
