"""What the CUDA kernel tests share: layers, a float32 reference, tolerances.

The kernels sum in fp32 in another order than gather_qmm, so they are held
to a stated tolerance, not bitwise equality: relative error against a float32
evaluation of the same dequantized weights within ``TOLERANCE`` of the dtype,
and never more than ``GATHER_SLACK`` times the error of MLX's own gather_qmm
path on the same inputs.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from helpers import switch_glu

import moefuse_runtime
from moefuse_runtime.cuda.activations import SWIGLU, KernelActivation
from moefuse_runtime.cuda.formats import FORMATS
from moefuse_runtime.memory import backend

TOLERANCE = {mx.bfloat16: 1.5e-2, mx.float16: 2e-3}
GATHER_SLACK = 1.5

SWIGLU_ACT = KernelActivation(SWIGLU)
"""gate_up's activation in the tests that call a kernel directly."""

needs_cuda = pytest.mark.skipif(
    backend() != "cuda", reason="the CUDA kernels run on MLX's CUDA backend only (lent GPU)"
)


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch):
    """The kernel tests run with the kernels on (conftest turns them off)."""
    monkeypatch.setenv("MOEFUSE_KERNEL", "1")


def quantized_layer(
    dims,
    width,
    experts,
    *,
    bits=4,
    group_size=64,
    dtype=mx.bfloat16,
    quantize_down=True,
    seed=0,
    mode="affine",
    bias=False,
    global_scale=False,
    down_mode=None,
):
    """A SwitchGLU quantized in ``mode`` (bits and group size of the float
    modes are their own); ``bias``: random Linear biases; ``down_mode``:
    down in another mode than gate and up."""
    layer = switch_glu(dims, width, experts, seed=seed, bias=bias)
    layer.set_dtype(dtype)
    for name in ("gate_proj", "up_proj", "down_proj")[: 3 if quantize_down else 2]:
        name_mode = down_mode if name == "down_proj" and down_mode else mode
        proj = layer[name]
        if bias:
            proj.bias = (mx.random.normal(proj.bias.shape) * 0.5).astype(dtype)
        if name_mode == "affine":
            layer[name] = proj.to_quantized(group_size=group_size, bits=bits)
        else:
            (fp_bits,), (fp_group,) = FORMATS[name_mode]
            # gate and up must share a global scale to fuse (mlx-lm computes
            # one per projection): the per-expert scale goes on down only
            per_expert = global_scale and name_mode == "nvfp4" and name == "down_proj"
            layer[name] = proj.to_quantized(fp_group, fp_bits, name_mode, global_scale=per_expert)
    mx.eval(layer.parameters())
    return layer


def dense_weight(proj) -> np.ndarray:
    if "scales" not in proj:
        return np.array(proj.weight.astype(mx.float32))
    mode, scale = getattr(proj, "mode", "affine"), proj.get("global_scale")
    args = (proj.group_size, proj.bits)
    if scale is None:
        w = mx.dequantize(proj.weight, proj.scales, proj.get("biases"), *args, mode=mode)
    else:  # per expert (nvfp4): dequantize takes one scalar
        w = mx.stack(
            [
                mx.dequantize(
                    proj.weight[e], proj.scales[e], None, *args, mode=mode, global_scale=scale[e]
                )
                for e in range(scale.size)
            ]
        )
    return np.array(w.astype(mx.float32))


def dense_bias(proj) -> np.ndarray:
    bias = proj.get("bias")
    return 0.0 if bias is None else np.array(bias.astype(mx.float32))


def reference(layer, x, indices) -> np.ndarray:
    """float32 SwitchGLU on the dequantized weights, one expert at a time,
    with the layer's own activation module (run on float32 arrays)."""
    names = ("gate_proj", "up_proj", "down_proj")
    gate, up, down = (dense_weight(layer[k]) for k in names)
    gate_b, up_b, down_b = (dense_bias(layer[k]) for k in names)
    idx = np.array(indices).reshape(-1)
    top_k = indices.shape[-1]
    xs = np.array(x.astype(mx.float32)).reshape(-1, x.shape[-1])[np.arange(idx.size) // top_k]
    y = np.zeros((idx.size, down.shape[1]), np.float32)
    for e in np.unique(idx):
        rows = idx == e
        g = xs[rows] @ gate[e].T + (gate_b[e] if np.ndim(gate_b) else 0.0)
        u = xs[rows] @ up[e].T + (up_b[e] if np.ndim(up_b) else 0.0)
        h = np.array(layer.activation(mx.array(u), mx.array(g)).astype(mx.float32))
        y[rows] = h @ down[e].T + (down_b[e] if np.ndim(down_b) else 0.0)
    return y.reshape(*indices.shape, -1)


def relative_error(y, ref) -> float:
    """‖y - ref‖ / ‖ref‖; either may be an mx.array or a numpy array."""
    y, ref = (np.array(a.astype(mx.float32)) if isinstance(a, mx.array) else a for a in (y, ref))
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def compare(layer, x, indices, dtype, path: str):
    """Kernel (``path``: 'decode' or 'grouped') and gather_qmm outputs of
    ``layer`` against float32; returns both errors."""
    ref = reference(layer, x, indices)
    report = moefuse_runtime.install(layer, reserve_bytes=0)
    assert report.fused, str(report)  # e.g. no headroom: too many test processes on one GPU
    kernels = layer.kernels
    assert kernels.pick(x, indices) is getattr(kernels, path)
    out = layer(x, indices)
    layer.kernels = None  # the same fused layer on gather_qmm
    expected = layer(x, indices)
    layer.kernels = kernels
    assert out.shape == expected.shape and out.dtype == expected.dtype == dtype
    kernel_error, gather_error = relative_error(out, ref), relative_error(expected, ref)
    assert kernel_error < TOLERANCE[dtype], (kernel_error, gather_error)
    assert kernel_error <= GATHER_SLACK * gather_error + 1e-4, (kernel_error, gather_error)
    return kernel_error, gather_error


def compiled_call_follows_new_weights(path: str, tokens: int):
    """The compiled FFN of kernel ``path`` ('decode' or 'grouped') takes the
    layer's arrays as inputs: the same kernels bitwise as uncompiled, and new
    weights are used, not the ones it was traced with. Returns the kernels."""
    import dataclasses

    layer = quantized_layer(1024, 256, 16)
    moefuse_runtime.install(layer, reserve_bytes=0)
    compiled = getattr(layer.kernels, path)
    uncompiled = dataclasses.replace(compiled, compiled=False)
    x = mx.random.normal((1, tokens, 1024)).astype(mx.bfloat16)
    indices = mx.random.randint(0, 16, (1, tokens, 4)).astype(mx.uint32)
    gate_up = layer.gate_up_proj
    before = compiled(layer, gate_up, x, indices)
    assert mx.array_equal(before, uncompiled(layer, gate_up, x, indices)).item()
    layer.down_proj.scales = layer.down_proj.scales * 2
    after = compiled(layer, gate_up, x, indices)
    assert mx.array_equal(after, uncompiled(layer, gate_up, x, indices)).item()
    assert not mx.array_equal(after, before).item()
    return compiled
