"""The activation table (cuda/activations.py) against the modules themselves.

Every class the kernels' epilogue computes is instantiated (where its
package is installed) and its own output, in float32, compared with the
formula the table gives it, on values past every limit. The GPU tests hold
the kernels to the same modules (test_formats.py).
"""

from __future__ import annotations

import importlib

import mlx.core as mx
import numpy as np
import pytest

from moefuse_runtime.cuda import activations

EXAMPLE_ARGS = {
    "SwigluOAI": {"alpha": 1.5, "limit": 6.0},
    "ClampedSwiGLU": {"limit": 3.0},
    "DeepseekV41SwiGLU": {"limit": 4.0},
    "LimitedSwiGLU": {"limit": 4.0},
    "SiTU": {"beta": 2.0, "linear_beta": 3.0},
}
"""Constructor arguments for the classes that take some."""


def instances():
    for module_name, class_name in activations.KNOWN:
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except ImportError:
            continue
        yield pytest.param(
            cls(**EXAMPLE_ARGS.get(class_name, {})), id=f"{module_name}.{class_name}"
        )


@pytest.mark.parametrize("module", list(instances()))
def test_formula_is_the_modules_own(module):
    spec = activations.kernel_activation(module)
    assert spec.kind != activations.NONE
    rng = np.random.default_rng(0)
    up, gate = (rng.normal(0, 4, (64, 33)).astype(np.float32) for _ in range(2))
    got = np.array(module(mx.array(up), mx.array(gate)))
    np.testing.assert_allclose(spec.reference(up, gate), got, rtol=2e-5, atol=2e-5)


def test_every_mlx_lm_class_exists():
    # mlx-lm pins the classes the table names (mlx-vlm's are checked where
    # it is installed whole: the parametrized test above takes each).
    lm = [key for key in activations.KNOWN if key[0].startswith("mlx_lm.")]
    assert len(lm) == 7
    for module_name, class_name in lm:
        assert getattr(importlib.import_module(module_name), class_name)


def test_limits_without_a_formula_fall_back_to_the_module():
    from mlx_lm.models.deepseek_v41 import DeepseekV41SwiGLU
    from mlx_lm.models.step3p5 import ClampedSwiGLU

    assert activations.kernel_activation(DeepseekV41SwiGLU(0.0)).p == 0.0  # no limit: plain
    assert activations.kernel_activation(ClampedSwiGLU(-1.0)).kind == activations.NONE


def test_parameters_travel_as_float_bits():
    spec = activations.KernelActivation(activations.OAI, 7.0, 1.702)
    assert spec.template() == [("ACT", 5), ("ACT_P", 0x40E00000), ("ACT_Q", 0x3FD9DB23)]
