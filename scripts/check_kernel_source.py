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


def translation_unit(dtype: str, bits: int, group: int, swiglu: bool) -> str:
    t = CUDA_TYPES[dtype]
    constants = {"BITS": bits, "GROUP": group, "K": 2880, "N": 768, "X_DIV": 8, "OUTS": 2}
    lines = [
        '#include "mlx/backend/cuda/device/utils.cuh"',
        "#include <cooperative_groups.h>",
        kernels._HEADER,
        "namespace mlx::core::cu {",
        "namespace cg = cooperative_groups;",
        f"__global__ void check_kernel(const {t}* x, const uint32_t* w, const {t}* scales,",
        f"    const {t}* biases, const uint32_t* indices, {t}* out) {{",
        *(f"  constexpr int {k} = {v};" for k, v in constants.items()),
        f"  constexpr bool SWIGLU = {'true' if swiglu else 'false'};",
        f"  using T = {t};",
        kernels._SOURCE,
        "}",
        "}",
    ]
    return "\n".join(lines)


def main(root: str) -> int:
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for dtype, bits, group, swiglu in itertools.product(
            CUDA_TYPES, kernels.KERNEL_BITS, kernels.KERNEL_GROUP_SIZES, (True, False)
        ):
            source = Path(tmp) / "k.cu"
            source.write_text(translation_unit(dtype, bits, group, swiglu))
            command = ["nvcc", "-std=c++17", "-arch=sm_90", "-c", "-o", f"{tmp}/k.o"]
            command += [f"-I{root}", "--resource-usage", str(source)]
            done = subprocess.run(command, capture_output=True, text=True)
            status = "ok" if done.returncode == 0 else "FAILED"
            lines = done.stderr.splitlines()
            usage = " ".join(line.strip() for line in lines if "registers" in line)
            print(f"{dtype} {bits}-bit g{group} swiglu={swiglu}: {status} {usage}")
            if done.returncode:
                print(done.stderr)
                failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
