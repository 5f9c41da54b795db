"""Where the clamping activations' extra error on the decode path comes from.

    python3 docs/kernels/tools/diag_clamped_decode.py

tests/test_formats.py's layer (hidden 2880, width 96, 7 experts, 4-bit g32)
with ClampedSwiGLU(2) and DeepseekV41SwiGLU(3), 8 pairs. Stage by stage
against gather_qmm's path and float32: gate and up (the NONE kernel), the
epilogue's h against the module on the same bf16 gate and up, down's output
on the same h; then the whole layer for several seeds.
"""

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).parents[3] / "tests"))
from kernel_checks import quantized_layer, reference, relative_error  # noqa: E402
from mlx_lm.models.deepseek_v41 import DeepseekV41SwiGLU  # noqa: E402
from mlx_lm.models.step3p5 import ClampedSwiGLU  # noqa: E402

import moefuse_runtime  # noqa: E402
from moefuse_runtime.cuda.activations import NONE, KernelActivation  # noqa: E402
from moefuse_runtime.cuda.decode import flat_uint32, gather_qmv  # noqa: E402
from moefuse_runtime.cuda.formats import QuantizedArrays  # noqa: E402


def f32(a):
    return np.array(a.astype(mx.float32))


def stages(name, module, seed):
    layer = quantized_layer(2880, 96, 7, group_size=32)
    layer.activation = module
    mx.random.seed(seed)
    x = mx.random.normal((1, 2, 2880)).astype(mx.bfloat16)
    indices = mx.random.randint(0, 7, (1, 2, 4)).astype(mx.uint32)
    ref = reference(layer, x, indices)
    moefuse_runtime.install(layer, reserve_bytes=0)
    kernels = layer.kernels
    flat = flat_uint32(indices)
    gate_up = QuantizedArrays.of(layer.gate_up_proj)
    down = QuantizedArrays.of(layer.down_proj)
    x2 = x.reshape(-1, 2880)
    # gate and up: the kernel (NONE) and gather_qmm
    gu_kernel = gather_qmv(x2, gate_up, flat, activation=KernelActivation(NONE), x_div=4)
    gu_gather = layer.gate_up_proj(mx.expand_dims(x, (-2, -3)), indices).reshape(8, -1)
    g_k, u_k = mx.split(gu_kernel, 2, axis=-1)
    # h: epilogue vs module on the kernel's own gate and up
    h_epilogue = kernels.decode.gate_up(x, flat, 4, gate_up)
    h_module = module(u_k, g_k)
    g_g, u_g = mx.split(gu_gather, 2, axis=-1)
    h_gather = module(u_g, g_g)
    y_kernel = gather_qmv(h_epilogue, down, flat, activation=None, x_div=1)
    y_on_gather_h = gather_qmv(h_gather, down, flat, activation=None, x_div=1)
    y_gather_down = layer.down_proj(mx.expand_dims(h_gather.reshape(1, 2, 4, -1), -2), indices)
    out = layer(x, indices)
    layer.kernels = None
    expected = layer(x, indices)
    layer.kernels = kernels
    r = ref.reshape(8, -1)
    print(f"{name} seed {seed}:")
    print(
        f"  gate/up kernel vs gather_qmm: {np.mean(f32(gu_kernel) != f32(gu_gather)):.4f} differ,"
        f" max |d| {np.abs(f32(gu_kernel) - f32(gu_gather)).max():.4g}"
    )
    d = f32(h_epilogue) != f32(h_module)
    h_diff = np.abs(f32(h_epilogue) - f32(h_module)).max()
    print(f"  h epilogue vs module (same gate/up): {d.mean():.4f} differ, max |d| {h_diff:.4g}")
    print(f"  h kernel vs h gather: {np.mean(f32(h_epilogue) != f32(h_gather)):.4f} differ")
    print(
        f"  y: kernel {relative_error(y_kernel, r):.5f}, down kernel on gather's h "
        f"{relative_error(y_on_gather_h, r):.5f}, gather_qmm down on gather's h "
        f"{relative_error(y_gather_down.reshape(8, -1), r):.5f}"
    )
    errors = relative_error(out, ref), relative_error(expected, ref)
    print(f"  layer: kernels {errors[0]:.5f}, gather_qmm {errors[1]:.5f}", flush=True)


for seed in (1, 2, 3):
    stages("clamped(2)", ClampedSwiGLU(2.0), seed)
    stages("deepseek_v41(3)", DeepseekV41SwiGLU(3.0), seed)
