"""Host time of one fused MoE layer and one MoE block per decode step.

A decode step's wall time on CUDA is partly Python building MLX's lazy graph;
this times only that: the call of a fused layer (``switch_mlp(x, indices)``)
and of its block (``mlp(x)``, compiled on the kernels for <= 16 tokens), and
of mlx-lm's own block unfused and with its SwitchGLU a broadcast of its input
(the server benchmark's FFN-free bound), with nothing evaluated, on a
Qwen3-30B-A3B-dimension layer (random 4-bit weights, bf16), at decode
batches of 1, 16, 32 and 64 sequences. Medians of
``--repeats`` rounds of ``--calls`` calls each, in microseconds per call.

    python scripts/bench_host_path.py OUT.json [--calls 200] [--repeats 9]
        [--encode] [--emulate-cuda] [--baseline CHECKOUT --rounds 5]

``--encode`` (on the GPU) also times what MLX adds on the host: 48 blocks
chained as in a decode step, their graph built (``build_us``) and handed to
``mx.async_eval`` (``launch_us``: MLX encodes each kernel and launches its
CUDA graphs), the GPU's own time excluded (each step is synchronized
outside the timing); per block, medians of ``--repeats`` steps.

``--emulate-cuda`` runs on any machine: the package selects and calls its
kernel paths as on an sm_90 GPU, and each launch returns zeros instead of
running (MLX's encoding of the kernels is not in the figure): the host work
that is this package's. ``--baseline CHECKOUT`` times another checkout of
the package too (``git worktree add CHECKOUT COMMIT``), each in fresh
processes, the two alternating for ``--rounds`` rounds: medians per
checkout and the ratio baseline / this one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SEQUENCES = (1, 16, 32, 64)
ROOT = Path(__file__).resolve().parents[1]


def per_call_us(fn, calls: int, repeats: int) -> float:
    import mlx.core as mx

    for _ in range(10):
        fn()
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
        mx.synchronize()
    return statistics.median(rounds)


STEP_LAYERS = 48


def encode_us(block, x, repeats: int) -> dict:
    """Host time per block of a decode step's ``STEP_LAYERS`` chained blocks:
    building their graph, and MLX encoding and launching it."""
    import mlx.core as mx

    build, launch = [], []
    for i in range(repeats + 3):
        mx.synchronize()
        start = time.perf_counter()
        y = x
        for _ in range(STEP_LAYERS):
            y = block(y)
        built = time.perf_counter()
        mx.async_eval(y)
        launched = time.perf_counter()
        mx.synchronize()
        if i >= 3:
            build.append((built - start) / STEP_LAYERS * 1e6)
            launch.append((launched - built) / STEP_LAYERS * 1e6)
    return {"build_us": statistics.median(build), "launch_us": statistics.median(launch)}


def emulate_cuda() -> None:
    """Kernel paths chosen and called as on an sm_90 GPU, launches returning zeros."""
    import mlx.core as mx

    from moefuse_runtime import cuda
    from moefuse_runtime.cuda import jit

    def launch(spec, kernel, *, output_shapes, output_dtypes, **_):
        return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes, strict=True)]

    cuda.backend = lambda: "cuda"
    cuda.device_arch = lambda: "sm_90"
    cuda.prepare_all = lambda specs, arch, **_: jit.BuildReport({}, 0.0)
    jit.launch = launch
    mx.fast.cuda_kernel = lambda **_: None


def use_checkout(checkout: str) -> None:
    """Import moefuse_runtime from ``checkout``, not from the installed copy
    (an editable install's finder would otherwise win)."""
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path.insert(0, checkout)


def measure(calls: int, repeats: int, emulate: bool, encode: bool = False) -> dict:
    """One process's figures for the package it imports."""
    import mlx.core as mx

    if emulate:
        emulate_cuda()
    import moefuse_runtime
    from moefuse_runtime.demo import build_demo_model

    # in inference mode, as mlx-lm's loaders leave a model (a baseline
    # checkout's demo model may not be): only then do blocks run compiled
    model = build_demo_model("qwen3-30b-a3b", layers=1, dtype=mx.bfloat16).eval()
    unfused = build_demo_model("qwen3-30b-a3b", layers=1, dtype=mx.bfloat16).model.layers[0].mlp
    unfused.eval()
    report = moefuse_runtime.install(model, reserve_bytes=0)
    block = model.model.layers[0].mlp
    layer = block.switch_mlp
    result: dict = {
        "install": report.summary(),
        "compute_path": report.layers[0].compute_path,
        "package": os.path.dirname(moefuse_runtime.__file__),
        "emulated_cuda": emulate,
    }
    inputs = {}
    for seqs in SEQUENCES:
        x = mx.random.normal((seqs, 1, 2048)).astype(mx.bfloat16)
        indices = mx.random.randint(0, 128, (seqs, 1, 8)).astype(mx.uint32)
        mx.eval(x, indices, layer(x, indices), block(x))
        inputs[seqs] = x
        result[str(seqs)] = {
            "layer_us": per_call_us(lambda x=x, i=indices: layer(x, i), calls, repeats),
            "block_us": per_call_us(lambda x=x: block(x), calls, repeats),
            "unfused_block_us": per_call_us(lambda x=x: unfused(x), calls, repeats),
        }
        if encode:
            result[str(seqs)]["encode"] = {
                "fused": encode_us(block, x, repeats),
                "unfused": encode_us(unfused, x, repeats),
            }
    # the server benchmark's bound: mlx-lm's block with its SwitchGLU a
    # broadcast (not in checkouts older than the server benchmark's bound)
    try:
        from moefuse_runtime.server_bench import ffn_free
    except ImportError:
        return result
    ffn_free("mlx_lm")
    for seqs, x in inputs.items():
        result[str(seqs)]["ffn_free_block_us"] = per_call_us(lambda x=x: unfused(x), calls, repeats)
        if encode:
            result[str(seqs)]["encode"]["ffn_free"] = encode_us(unfused, x, repeats)
    return result


def compare(args) -> dict:
    """This checkout and ``args.baseline`` in alternating fresh processes."""
    runs: dict[str, list[dict]] = {"current": [], "baseline": []}
    for _ in range(args.rounds):
        for name, checkout in (("baseline", args.baseline), ("current", str(ROOT))):
            command = [
                sys.executable,
                __file__,
                "-",
                "--checkout",
                checkout,
                "--calls",
                str(args.calls),
                "--repeats",
                str(args.repeats),
            ]
            if args.emulate_cuda:
                command.append("--emulate-cuda")
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(done.stdout))
    summary: dict = {}
    for seqs in map(str, SEQUENCES):
        row = summary[seqs] = {}
        for part in ("layer_us", "block_us"):
            medians = {k: statistics.median(r[seqs][part] for r in v) for k, v in runs.items()}
            row[part] = medians
            row[part.replace("_us", "_ratio")] = medians["baseline"] / medians["current"]
        print(
            f"{seqs} sequences: layer {row['layer_us']['baseline']:.1f} -> "
            f"{row['layer_us']['current']:.1f} us, block {row['block_us']['baseline']:.1f} "
            f"-> {row['block_us']['current']:.1f} us per call",
            flush=True,
        )
    return {"rounds": runs, "medians": summary, "baseline": args.baseline}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON file to write ('-': print it)")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--encode", action="store_true")
    parser.add_argument("--emulate-cuda", action="store_true")
    parser.add_argument("--baseline", help="another checkout of the package to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--checkout", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("MOEFUSE_KERNEL", "1")
    if args.checkout:
        use_checkout(args.checkout)
    if args.baseline:
        result = compare(args)
    else:
        result = measure(args.calls, args.repeats, args.emulate_cuda, args.encode)
    text = json.dumps(result, indent=2)
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
