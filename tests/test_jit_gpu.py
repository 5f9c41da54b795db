"""Kernel builds on the GPU: MLX generates the source `KernelSpec` predicts, and
launches the module this package filed in its cache (lent GPU only)."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import pytest
from kernel_checks import SWIGLU_ACT, quantized_layer

from moefuse_runtime.cuda import decode, grouped, jit
from moefuse_runtime.cuda.formats import QuantizedArrays
from moefuse_runtime.memory import backend

pytestmark = pytest.mark.skipif(backend() != "cuda", reason="MLX's CUDA backend (lent GPU)")


def generated_source(capfd, kernel, spec: jit.KernelSpec, inputs: list[mx.array]) -> str:
    """What MLX prints as the source it builds (nothing is launched)."""
    capfd.readouterr()
    kernel(
        inputs=inputs,
        template=list(spec.template),
        grid=(32, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(1,)] * len(spec.outputs),
        output_dtypes=[d for _, d in spec.outputs],
        verbose=True,
    )
    return capfd.readouterr().out


def stand_in(spec: jit.KernelSpec) -> list[mx.array]:
    return [mx.zeros((1,) * ndim, dtype) for _, dtype, ndim in spec.inputs]


def test_mlx_builds_the_predicted_route_source(capfd):
    spec = grouped.route_spec(128, (16, 64))
    text = generated_source(capfd, grouped._route_kernel(), spec, stand_in(spec))
    assert f"```\n{spec.mlx_source()}\n```" in text


@pytest.mark.parametrize("mode", ["affine", "mxfp4", "nvfp4"])
def test_mlx_builds_the_predicted_kernel_sources(capfd, mode):
    layer = quantized_layer(256, 128, 8, mode=mode, global_scale=True)
    proj = QuantizedArrays.of(layer.up_proj)
    gemv = decode.gemv_spec(proj, mx.bfloat16, 256, SWIGLU_ACT, 4, 1)
    names, _, args = proj.inputs()
    kernel = decode._kernel(True, decode.shared_bytes(256), tuple(names), args)
    assert f"```\n{gemv.mlx_source()}\n```" in generated_source(capfd, kernel, gemv, stand_in(gemv))
    tiling = grouped.Tiling(16, 128, 1, 4, 4, min_blocks=4, b_regs=True)
    gemm = grouped.gemm_spec(proj, mx.bfloat16, 256, SWIGLU_ACT, 4, tiling)
    names = tuple(n for n, _, _ in gemm.inputs)
    kernel = grouped._gemm_kernel(
        gemm.name, gemm.header, tiling.shared_bytes(4), names, gemm.source
    )
    assert f"```\n{gemm.mlx_source()}\n```" in generated_source(capfd, kernel, gemm, stand_in(gemm))


def test_mlx_launches_the_module_filed_in_its_cache(monkeypatch, tmp_path):
    # A module compiled from another body, filed under this spec's name: MLX
    # runs it, so it reads the cache rather than compiling the source itself.
    monkeypatch.setenv("MOEFUSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(jit, "_prepared", set())
    header = f"// probe {tmp_path}\n"  # a module name no earlier run has used
    spec = jit.KernelSpec(
        "moefuse_probe",
        (("x", mx.float32, 1),),
        (("out", mx.float32),),
        (),
        header,
        "out[threadIdx.x] = x[threadIdx.x] + 1.0f;",
    )
    other = dataclasses.replace(spec, source="out[threadIdx.x] = 7.0f;")
    module = jit.compile_spec(other, jit.kernel_arch())
    jit.write_mlx_cache(spec, module)
    kernel = mx.fast.cuda_kernel(
        name="moefuse_probe",
        input_names=["x"],
        output_names=["out"],
        source=spec.source,
        header=header,
    )
    (out,) = kernel(
        inputs=[mx.zeros((32,))],
        grid=(32, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(32,)],
        output_dtypes=[mx.float32],
    )
    assert out.tolist() == [7.0] * 32
