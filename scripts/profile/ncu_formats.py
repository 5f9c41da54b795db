"""Fused MoE layers of profile_formats.py's cases at one token, for Nsight Compute.

    ncu --kernel-name regex:moefuse --section SpeedOfLight --section Occupancy \\
        --section LaunchStats --section WarpStateStats --section SchedulerStats \\
        --section MemoryWorkloadAnalysis \\
        python3 scripts/profile/ncu_formats.py "qwen3 affine 4-bit g64" "qwen3 mxfp4"

Each named case (a label of profile_formats.CASES): one warm-up call and one
profiled call of the installed layer at one token, so the decode kernels
(gate_up with its activation, then down) appear twice per case, in order.
"""

import os
import sys

import mlx.core as mx

sys.path.insert(0, os.path.dirname(__file__))
import profile_formats  # noqa: E402

import moefuse_runtime  # noqa: E402


def main(labels: list[str]) -> int:
    cases = {case[0]: case for case in profile_formats.CASES}
    for label in labels:
        _, shape, quant, extra = cases[label]
        hidden, experts, top_k, _ = shape
        layer = profile_formats.make_layer(shape, quant, **extra)
        moefuse_runtime.install(layer, reserve_bytes=0)
        x = mx.random.normal((1, hidden)).astype(mx.bfloat16)
        indices = profile_formats.routing(1, experts, top_k)
        for _ in range(2):
            mx.eval(layer(x, indices))
        mx.synchronize()
        print(f"{label}: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
