"""Cold start of the CUDA kernels: what a new process pays before its first calls.

Runs fresh processes one after another, each: build a Qwen3-30B-A3B-dimension
model (random 4-bit weights, bf16; its layers share one shape), ``install``
it, then call one fused layer at each size class twice, timing each call
(outputs evaluated, GPU synchronized). The processes, in order:

* ``mlx_compiles``: empty caches, kernel preparation off: MLX compiles each
  variant at its first launch (the behaviour before cuda/jit.py);
* ``first_threads``: empty caches: install compiles every variant in
  threads of its own process (NVRTC in-process), for comparison;
* ``first``: empty caches: install compiles every variant (worker processes);
* ``second``, ``third``: the caches ``first`` left.

Reports per process: install seconds and its kernel note, and per size class
the first and second call; outputs of ``mlx_compiles`` and ``third`` compared
bitwise (the same kernels, compiled by MLX and by this package).

    python scripts/bench_kernel_builds.py OUT_DIR [--layers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = (1, 16, 512, 885, 4096)
PROCESSES = ("mlx_compiles", "first_threads", "first", "second", "third")
FRESH = ("mlx_compiles", "first_threads")
"""Processes with caches of their own; the others share one."""


def in_process_compile(spec, arch: str):
    """`jit.compile_spec` with NVRTC called in this process (threads share it)."""
    import ctypes

    from moefuse_runtime.cuda import jit, nvrtc

    compiler = nvrtc.Nvrtc(ctypes.CDLL(jit.nvrtc_library()))
    headers = {"mlx/backend/cuda/device/utils.cuh": jit.UTILS_STAND_IN}
    binary, mangled = compiler.compile(
        spec.mlx_source(), f"mlx::core::cu::{spec.kernel_name}", jit.compile_options(arch), headers
    )
    return jit.Module(binary, mangled)


def child(out: Path, name: str, layers: int) -> None:
    import mlx.core as mx
    import numpy as np

    import moefuse_runtime
    from moefuse_runtime.cuda import jit
    from moefuse_runtime.demo import build_demo_model

    if name == "mlx_compiles":
        jit.prepare = lambda *args, **kwargs: jit.FAILED  # MLX compiles at first launch
    if name == "first_threads":
        jit.compile_spec = in_process_compile
    start = time.perf_counter()
    model = build_demo_model("qwen3-30b-a3b", layers=layers, dtype=mx.bfloat16)
    built = time.perf_counter() - start
    os.environ["MOEFUSE_KERNEL"] = "1"
    report = moefuse_runtime.install(model, reserve_bytes=0)
    block = model.model.layers[0].mlp
    layer = block.switch_mlp
    rng = np.random.default_rng(0)
    calls = {}
    for tokens in SIZES:
        x = mx.array(rng.standard_normal((1, tokens, 2048)).astype(np.float32)).astype(mx.bfloat16)
        picks = np.argsort(rng.random((1, tokens, 128)), axis=-1)[..., :8]
        indices = mx.array(picks.astype(np.uint32))
        mx.eval(x, indices)
        times = []
        for _ in range(2):
            mx.synchronize()
            t = time.perf_counter()
            y = layer(x, indices)
            mx.eval(y)
            mx.synchronize()
            times.append(time.perf_counter() - t)
        np.save(out / f"{name}-{tokens}.npy", np.array(y.astype(mx.float32)))
        calls[tokens] = {"first_s": times[0], "second_s": times[1]}
    result = {
        "process": name,
        "build_s": built,
        "install_s": report.seconds,
        "notes": list(report.notes),
        "calls": calls,
        "arch": jit.kernel_arch(),
    }
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.child:
        child(out, args.child, args.layers)
        return 0
    import numpy as np

    caches = Path(tempfile.mkdtemp(prefix="moefuse-cold-"))
    results = {}
    for name in PROCESSES:
        fresh = caches / (name if name in FRESH else "shared")
        env = {
            **os.environ,
            "MOEFUSE_CACHE_DIR": str(fresh / "moefuse"),
            "MLX_PTX_CACHE_DIR": str(fresh / "mlx"),
        }
        start = time.perf_counter()
        command = [sys.executable, __file__, str(out), "--layers", str(args.layers)]
        subprocess.run([*command, "--child", name], env=env, check=True)
        results[name] = json.loads((out / f"{name}.json").read_text())
        results[name]["process_s"] = time.perf_counter() - start
        calls = results[name]["calls"]
        line = ", ".join(
            f"{t}: {c['first_s'] * 1e3:.1f}/{c['second_s'] * 1e3:.1f} ms" for t, c in calls.items()
        )
        print(f"{name}: install {results[name]['install_s']:.2f} s; first/second call {line}")
        print(f"  {results[name]['notes']}", flush=True)

    def output(name: str, tokens: int):
        return np.load(out / f"{name}-{tokens}.npy")

    same = {t: bool(np.array_equal(output("mlx_compiles", t), output("third", t))) for t in SIZES}
    results["bitwise_mlx_vs_prepared"] = same
    print(f"outputs bitwise equal, MLX's compile vs this package's: {same}")
    for path in out.glob("*.npy"):
        path.unlink()
    (out / "kernel-builds.json").write_text(json.dumps(results, indent=2))
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
