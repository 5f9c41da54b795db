"""Fixtures shared by the tests."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def gather_path(monkeypatch):
    """Bitwise parity tests hold the gather_qmm path to exact equality; on a
    CUDA machine the decode kernels (a stated tolerance, tests/test_kernels.py)
    would take bf16/fp16 quantized layers. Kernel tests turn them back on."""
    monkeypatch.setenv("MOEFUSE_KERNEL", "0")


@pytest.fixture(autouse=True, scope="session")
def kernel_caches(tmp_path_factory):
    """The compiled-kernel caches (this package's store and MLX's) of a test
    session live in its temporary folder, never in the user's
    (``MOEFUSE_TEST_CACHE_ROOT`` names one that parallel shards share)."""
    shared = os.environ.get("MOEFUSE_TEST_CACHE_ROOT")
    root = Path(shared) if shared else tmp_path_factory.mktemp("kernel-caches")
    saved = {k: os.environ.get(k) for k in ("MOEFUSE_CACHE_DIR", "MLX_PTX_CACHE_DIR")}
    os.environ["MOEFUSE_CACHE_DIR"] = str(root / "moefuse")
    os.environ["MLX_PTX_CACHE_DIR"] = str(root / "mlx")
    yield root
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def cpu_device():
    """Run a test on MLX's CPU device, whatever the machine has: for tests of
    data flow that compare float32 results, which CUDA's TF32 matmuls blur."""
    import mlx.core as mx

    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(previous)


@pytest.fixture
def as_cuda(monkeypatch):
    """Kernel selection and launch arguments as on a CUDA GPU of architecture
    ``as_cuda["value"]`` (sm_90 unless a test sets it) whose name no tile
    table lists (the table is the architecture's, on any machine), the
    kernels on:
    `mx.fast.cuda_kernel` makes stand-ins that a test's fake ``jit.launch``
    may take; nothing runs on a GPU."""
    import mlx.core as mx

    from moefuse_runtime import cuda
    from moefuse_runtime.cuda import decode, device, grouped

    arch = {"value": "sm_90"}
    monkeypatch.setattr(cuda, "backend", lambda: "cuda")
    monkeypatch.setattr(cuda, "device_arch", lambda: arch["value"])
    monkeypatch.setattr(cuda, "device_name", lambda: "")
    monkeypatch.setattr(cuda, "device_limits", device.limits_of)  # the table's, not a driver's
    monkeypatch.setenv("MOEFUSE_KERNEL", "1")
    monkeypatch.setattr(mx.fast, "cuda_kernel", lambda **_: object())
    factories = (decode._kernel, grouped._gemm_kernel, grouped._route_kernel)
    yield arch
    for factory in factories:
        factory.cache_clear()


@pytest.fixture
def launches(as_cuda, monkeypatch) -> list:
    """Every kernel launch, recorded (spec and inputs) instead of run: outputs
    are zeros of the shapes asked for. install prepares nothing."""
    import mlx.core as mx

    from moefuse_runtime import cuda
    from moefuse_runtime.cuda import jit

    launched: list = []

    def fake_launch(spec, kernel, *, inputs, output_shapes, output_dtypes, **call):
        launched.append((spec, inputs))
        return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes, strict=True)]

    monkeypatch.setattr(jit, "launch", fake_launch)
    monkeypatch.setattr(cuda, "prepare_all", lambda specs, arch, **_: jit.BuildReport({}, 0.0))
    return launched


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> Path:
    """A tiny demo model directory, written once per test session."""
    from moefuse_runtime.demo import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("demo") / "model")


def run(args, *, env=None, timeout=300, cwd=None) -> subprocess.CompletedProcess:
    """A subprocess with HF offline and this venv's scripts first on PATH."""
    full_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        **(env or {}),
    }
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd
    )
