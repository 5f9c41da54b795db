"""Host time per fused-layer call on CUDA, by kernel-source form (MLX CUDA).

    python3 docs/kernels/tools/host_cost.py OUT.json

MLX hashes a custom kernel's whole source (the header the launchers pass)
at every launch (custom_kernel.cpp: std::hash of source_ for the module name). Per
source form, one Qwen3-30B-A3B 4-bit layer, N calls: Python graph-build
time per call, host encode time per call (mx.async_eval), and wall per call
with the GPU, at 1 token (decode kernels) and 32 tokens (tensor cores).
Forms: the header inlined (`source.header`), inlined without comments, and
an #include of the file by absolute path (`source.kernel_header`, what the
launchers pass since). A broadcast is the floor.
"""

import json
import re
import sys
import time
from functools import cache

import mlx.core as mx

import moefuse_runtime
from moefuse_runtime import bench
from moefuse_runtime.cuda import decode, grouped, source

CALLS = 200
_inline = source.header.__wrapped__


def stripped(name):
    text = re.sub(r"//[^\n]*", "", _inline(name))
    return re.sub(r"\n\s*\n+", "\n", re.sub(r"^[ \t]+", "", text, flags=re.M))


def included(name):
    path = source.resources.files("moefuse_runtime.cuda").joinpath(name)
    return f'#include "{path}"\n'


FORMS = {"inline": _inline, "stripped": stripped, "include": included}


def use(form):
    source.kernel_header = cache(FORMS[form])
    for fn in (grouped._route_kernel, grouped._gemm_kernel, grouped._compiled_ffn,
               decode._kernel, decode._compiled_ffn):  # fmt: skip
        fn.cache_clear()


def cost(fn, x, idx):
    mx.eval([fn(x, idx) for _ in range(3)])
    mx.synchronize()
    t0 = time.perf_counter()
    outs = [fn(x, idx) for _ in range(CALLS)]
    t1 = time.perf_counter()
    mx.async_eval(outs)
    t2 = time.perf_counter()
    mx.synchronize()
    t3 = time.perf_counter()
    return {"build_us": 1e6 * (t1 - t0) / CALLS, "encode_us": 1e6 * (t2 - t1) / CALLS,
            "wall_us": 1e6 * (t3 - t0) / CALLS}  # fmt: skip


def main(out):
    layer = bench.make_layer(2048, 128, 768, "4bit", seed=0)
    moefuse_runtime.install(layer, reserve_bytes=0)
    results = {}
    for tokens in (1, 32):
        x = mx.random.normal((tokens, 2048)).astype(mx.bfloat16)
        idx = mx.random.randint(0, 128, (tokens, 8)).astype(mx.uint32)
        results[f"broadcast {tokens}"] = cost(
            lambda x, i: mx.broadcast_to(x[..., None, :], (*i.shape, 2048)) * 1, x, idx
        )
        for _round in range(2):
            for form in FORMS:
                use(form)
                try:
                    r = cost(layer, x, idx)
                except Exception as e:  # noqa: BLE001
                    r = {"error": str(e)[:300]}
                results.setdefault(f"{form} {tokens}", []).append(r)
    for k, v in results.items():
        print(k, json.dumps(v))
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
