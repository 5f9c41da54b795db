"""Probe: does a SwitchLinear-layout gather_mm run for one expert tensor size?

    python scripts/probe_large_gather.py EXPERTS OUT IN DTYPE TOKENS TOPK [sorted] [q4]

One size per process (an illegal memory access poisons the CUDA context).
The weight is (experts, out, in) and used transposed, as SwitchLinear does;
the routing hits the last experts, whose offsets are the largest. Used to
find where MLX's CUDA gather_mm fails, since a fused gate_up is twice as tall.
"""

import sys

import mlx.core as mx

experts, out_dims, in_dims = (int(a) for a in sys.argv[1:4])
dtype = getattr(mx, sys.argv[4])
tokens, top_k = int(sys.argv[5]), int(sys.argv[6])
w = mx.full((experts, out_dims, in_dims), 1e-3, dtype=dtype)
quantized = None
if "q4" in sys.argv[7:]:  # 4-bit affine, group 64: the gather_qmm path
    quantized = mx.quantize(w, 64, 4)
    mx.eval(quantized)
    w = None
x = mx.ones((1, tokens, 1, 1, in_dims), dtype=dtype)
idx = (experts - 1 - mx.arange(tokens * top_k) % experts).reshape(1, tokens, top_k)
if "sorted" in sys.argv[7:]:  # SwitchGLU's path at >= 64 pairs: one row per pair, sorted
    x = mx.ones((tokens * top_k, 1, in_dims), dtype=dtype)
    idx = mx.sort(idx.flatten())
is_sorted = "sorted" in sys.argv[7:]
if quantized is None:
    y = mx.gather_mm(
        x, w.swapaxes(-1, -2), rhs_indices=idx.astype(mx.uint32), sorted_indices=is_sorted
    )
    nbytes = w.nbytes
else:
    y = mx.gather_qmm(
        x, *quantized, rhs_indices=idx.astype(mx.uint32), transpose=True, sorted_indices=is_sorted
    )
    nbytes = quantized[0].nbytes
mx.eval(y)
expected = in_dims * 1e-3
print(f"bytes={nbytes} ok={abs(y[..., -1].max().item() - expected) < 0.05 * expected}")
