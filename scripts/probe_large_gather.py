"""Probe: does gather_mm run on one expert tensor of a given size? (one process)

    python scripts/probe_large_gather.py EXPERTS OUT IN [dtype]

Exit 0 and print the output's checksum, or crash. Used to find the size at
which MLX's CUDA gather_mm fails, since a fused gate_up is twice as tall.
"""

import sys

import mlx.core as mx

experts, out_dims, in_dims = (int(a) for a in sys.argv[1:4])
dtype = getattr(mx, sys.argv[4]) if len(sys.argv) > 4 else mx.bfloat16
w = mx.zeros((experts, in_dims, out_dims), dtype=dtype) + 1e-3
x = mx.ones((1, 1, 1, in_dims), dtype=dtype)
idx = mx.array([[experts - 1]], dtype=mx.uint32)
y = mx.gather_mm(x, w, rhs_indices=idx)
mx.eval(y)
print(f"elements={w.size} bytes={w.nbytes} ok sum={y.astype(mx.float32).sum().item():.4f}")
