"""The CUDA kernels on mlx-vlm's SwitchGLU, on the GPU.

Apart from test_vlm.py so that it needs only mlx-vlm's switch_layers module:
the lent GPU machine has no package index for mlx-vlm's dependencies, so it
runs this file with that module's package (mlx_vlm/models/switch_layers.py,
activations.py, linear.py) under an empty mlx_vlm/__init__.py.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("mlx_vlm.models.switch_layers", reason="mlx-vlm: requirements-test.txt")

from kernel_checks import TOLERANCE, needs_cuda, reference, relative_error  # noqa: E402
from vlm_layers import call_args, vlm_layer  # noqa: E402

import moefuse_runtime  # noqa: E402


@needs_cuda
@pytest.mark.parametrize("tokens", [1, 40], ids=["decode", "tensor-cores"])
def test_cuda_kernels_on_the_gpu(tokens, monkeypatch):
    # Both kernel paths on an mlx-vlm layer, then its own weighted sum and
    # shared experts: within the kernels' tolerance of a float32 evaluation.
    monkeypatch.setenv("MOEFUSE_KERNEL", "1")
    layer = vlm_layer(dims=1024, width=256, dtype=mx.bfloat16)
    x, indices, weights, shared = (
        a.astype(mx.bfloat16) if a.dtype == mx.float32 else a
        for a in call_args(tokens, batch=1 if tokens == 1 else 2, dims=1024)
    )
    routed = reference(layer, x, indices)
    combined = (routed * np.array(weights.astype(mx.float32))[..., None]).sum(axis=-2)
    combined += np.array(shared.astype(mx.float32))
    moefuse_runtime.install(layer, reserve_bytes=0)
    path = layer.kernels.decode if tokens == 1 else layer.kernels.grouped
    assert layer.kernels.pick(x, indices) is path
    assert relative_error(layer(x, indices), routed) < TOLERANCE[mx.bfloat16]
    assert relative_error(layer(x, indices, weights, shared), combined) < TOLERANCE[mx.bfloat16]
