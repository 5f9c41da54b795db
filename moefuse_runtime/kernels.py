"""The CUDA decode path: gate_up + SwiGLU, and down, as two custom kernels.

At one token a MoE layer reads each active expert's packed weights once and
does almost no arithmetic, so it should run at memory speed. MLX's
``gather_qmm`` reaches 6-31% of the H100's streaming bandwidth there; these
kernels 38-46% (Qwen3-30B-A3B) to 62-68% (Mixtral) (GPU time,
docs/kernels.md). They are quantized GEMVs over the routed experts: one warp
per output row (four for short down rows), x staged once per block in
shared memory, up to eight 16-byte weight loads in flight per lane, fp32
sums:

* ``gate_up``: each warp reads row ``n`` of the gate half and row ``n`` of the
  up half of ``gate_up_proj`` for one (token, expert) pair and writes only
  ``silu(gate) * up``; the two halves are never written to memory.
* ``down``: the same GEMV without the activation, on ``down_proj``.

The two launches run under mx.compile: a decode step's wall time is mostly
host work per op, which a compiled call replays without Python. Only affine
4- and 8-bit weights with group sizes 32/64/128 and the plain `SwiGLU`
activation take this path, and only for few (token, expert) pairs (decode);
everything else, and every other backend, keeps ``gather_qmm``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwiGLU

from .config import KERNEL_ENV, env_flag
from .memory import backend

KERNEL_BITS = (4, 8)
KERNEL_GROUP_SIZES = (32, 64, 128)
KERNEL_DTYPES = (mx.bfloat16, mx.float16)
"""Scale (and activation) dtypes of the kernels; float32 models stay exact on gather_qmm."""

MIN_MAX_PAIRS, MAX_MAX_PAIRS = 32, 128
"""The kernels take up to max(32, min(128, experts)) (token, expert) pairs; more
go to gather_qmm, which reads an expert once for all the tokens routed to it.
Measured on an H100 (docs/kernels.md): the kernels won at every count tried,
up to 128 pairs over 128 experts (Qwen3-30B-A3B) and 32 pairs over 8 experts
(Mixtral), i.e. up to about one pair per expert, or four on few experts."""


def max_pairs_for(experts: int) -> int:
    return max(MIN_MAX_PAIRS, min(MAX_MAX_PAIRS, experts))


GATE_UP_TILING = DOWN_TILING = (1, 8)
SHORT_ROW_TILING = (4, 8)
"""(outputs per warp, warps per block), the best of those profiled on an
H100 (docs/kernels.md). A down row that is at most one 16-byte load per lane
(Qwen3-30B-A3B's width 768 at 4 bits) takes SHORT_ROW_TILING, four rows per
warp: 9.1-9.3 us instead of 10.1. Long rows keep one per warp: Mixtral's
down took 130 us with four, 52 us with one."""


def down_tiling_for(down: QuantizedSwitchLinear) -> tuple[int, int]:
    """The down kernel's tiling for this projection's rows."""
    loads_per_row = down["weight"].shape[-1] // 4  # 4 packed uint32 per 16-byte load
    return SHORT_ROW_TILING if loads_per_row <= 32 else DOWN_TILING


_HEADER = r"""
// Dot product of one 16-byte load of packed BITS-bit weights with the x
// values it covers. Each value is masked in place inside its 16-bit half word
// and read as the float 2^23 + (v << shift): one LOP3 and one FADD instead of
// an integer-to-float conversion (a quarter-rate instruction). xs[i] holds x
// pre-scaled by 2^-shift, so the product is exact to the same rounding.
template <int BITS>
__device__ __forceinline__ float moefuse_qdot(const uint4& q, const float* xs) {
  constexpr int PER_HALF = 16 / BITS;
  constexpr unsigned MASK = (1u << BITS) - 1u;
  const unsigned words[4] = {q.x, q.y, q.z, q.w};
  float acc0 = 0.f, acc1 = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const unsigned h = (i & 1) ? (words[i >> 1] >> 16) : words[i >> 1];
#pragma unroll
    for (int j = 0; j < PER_HALF; ++j) {
      const float v =
          __uint_as_float(0x4B000000u | (h & (MASK << (BITS * j)))) - 8388608.0f;
      if (i & 1) {
        acc1 = fmaf(xs[i * PER_HALF + j], v, acc1);
      } else {
        acc0 = fmaf(xs[i * PER_HALF + j], v, acc0);
      }
    }
  }
  return acc0 + acc1;
}

__device__ __forceinline__ float moefuse_warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}
"""

# Template constants: T (x, scales, biases and output dtype), BITS, GROUP,
# K (input length), N (outputs per pair), SWIGLU, X_DIV (pairs sharing one x
# row: top-k for gate_up, 1 for down), OUTS (outputs per warp: their loads are
# in flight together). Grid: (32 * warps, pairs); a block holds WARPS warps.
# Dynamic shared memory: `shared_bytes(K, BITS)`.
_SOURCE = r"""
  constexpr int VALS = 128 / BITS;                    // weights per 16-byte load
  constexpr int VECS = K / VALS;                      // 16-byte loads per row
  constexpr int ITERS = (VECS + 31) / 32;
  constexpr int GROUPS = K / GROUP;
  constexpr int PER_HALF = 16 / BITS;
  constexpr int T_PER_VEC = 16 / (int)sizeof(T);
  constexpr int ROWS = SWIGLU ? 2 * N : N;            // weight rows per expert
  constexpr int HALVES = SWIGLU ? 2 : 1;              // gate and up, or one row

  // x is staged once per block (below, once the first weight loads are in
  // flight): every warp of the block reads the same x row.
  // x_scaled holds each value pre-scaled for moefuse_qdot, laid out so that
  // lane v reading float4 j of its load finds it at [j][v] (no bank
  // conflicts); x_sums[v] is the plain sum of the values under load v.
  extern __shared__ float moefuse_shared[];
  float4* x_scaled = reinterpret_cast<float4*>(moefuse_shared);
  float* x_sums = moefuse_shared + K;
  const int pair = blockIdx.y;
  const T* x_row = x + (size_t)(pair / X_DIV) * K;

  const int lane = threadIdx.x & 31;
  const int n0 = (blockIdx.x * (blockDim.x / 32) + (threadIdx.x / 32)) * OUTS;
  const bool active = n0 < N;  // uniform across the warp
  const size_t expert_row = (size_t)indices[pair] * ROWS;
  const uint4* w_vecs = reinterpret_cast<const uint4*>(w);

  // acc[o][h]: output n0 + o, gate (h = 0) or up (h = 1) row.
  float acc[OUTS][HALVES];
#pragma unroll
  for (int o = 0; o < OUTS; ++o) {
#pragma unroll
    for (int h = 0; h < HALVES; ++h) {
      acc[o][h] = 0.f;
    }
  }
  // Loads are issued a batch of iterations at a time, before any arithmetic,
  // so that each warp keeps up to 8 16-byte loads per lane in flight. The
  // first batch is issued before x is staged: its latency overlaps staging.
  constexpr int BATCH_WANTED = 8 / (OUTS * HALVES) > 0 ? 8 / (OUTS * HALVES) : 1;
  constexpr int BATCH = BATCH_WANTED < ITERS ? BATCH_WANTED : ITERS;
#pragma unroll
  for (int base = 0; base < ITERS; base += BATCH) {
    uint4 q[BATCH][OUTS][HALVES];
    T scale[BATCH][OUTS][HALVES];
    T bias[BATCH][OUTS][HALVES];
#pragma unroll
    for (int b = 0; b < BATCH; ++b) {
      const int v = lane + 32 * (base + b);
      if (active && base + b < ITERS && (VECS % 32 == 0 || v < VECS)) {
        const int g = v * VALS / GROUP;
#pragma unroll
        for (int o = 0; o < OUTS; ++o) {
#pragma unroll
          for (int h = 0; h < HALVES; ++h) {
            const size_t row = expert_row + h * N + min(n0 + o, N - 1);
            q[b][o][h] = __ldg(w_vecs + row * VECS + v);
            scale[b][o][h] = scales[row * GROUPS + g];
            bias[b][o][h] = biases[row * GROUPS + g];
          }
        }
      }
    }
    if (base == 0) {  // every thread of the block gets here: one barrier
      for (int v = threadIdx.x; v < VECS; v += blockDim.x) {
        const uint4* x_vecs = reinterpret_cast<const uint4*>(x_row + v * VALS);
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < VALS / T_PER_VEC; ++j) {
          const uint4 raw = x_vecs[j];
          const T* t = reinterpret_cast<const T*>(&raw);
          float f[T_PER_VEC];
#pragma unroll
          for (int e = 0; e < T_PER_VEC; ++e) {
            const int i = j * T_PER_VEC + e;
            const float value = static_cast<float>(t[e]);
            sum += value;
            f[e] = value * __int_as_float((127 - BITS * (i % PER_HALF)) << 23);
          }
#pragma unroll
          for (int e = 0; e < T_PER_VEC; e += 4) {
            const int quad = (j * T_PER_VEC + e) / 4;
            x_scaled[quad * VECS + v] = make_float4(f[e], f[e + 1], f[e + 2], f[e + 3]);
          }
        }
        x_sums[v] = sum;
      }
      __syncthreads();
    }
#pragma unroll
    for (int b = 0; b < BATCH; ++b) {
      const int v = lane + 32 * (base + b);
      if (active && base + b < ITERS && (VECS % 32 == 0 || v < VECS)) {
        float xs[VALS];
#pragma unroll
        for (int j = 0; j < VALS / 4; ++j) {
          const float4 f = x_scaled[j * VECS + v];
          xs[4 * j] = f.x;
          xs[4 * j + 1] = f.y;
          xs[4 * j + 2] = f.z;
          xs[4 * j + 3] = f.w;
        }
        const float x_sum = x_sums[v];
#pragma unroll
        for (int o = 0; o < OUTS; ++o) {
#pragma unroll
          for (int h = 0; h < HALVES; ++h) {
            acc[o][h] += static_cast<float>(scale[b][o][h]) *
                    moefuse_qdot<BITS>(q[b][o][h], xs) +
                static_cast<float>(bias[b][o][h]) * x_sum;
          }
        }
      }
    }
  }
  if (!active) {
    return;
  }
#pragma unroll
  for (int o = 0; o < OUTS; ++o) {
#pragma unroll
    for (int h = 0; h < HALVES; ++h) {
      acc[o][h] = moefuse_warp_sum(acc[o][h]);
    }
  }
  if (lane < OUTS && n0 + lane < N) {
    float result = 0.f;
#pragma unroll
    for (int o = 0; o < OUTS; ++o) {
      if (o == lane) {
        if constexpr (SWIGLU) {
          // Rounded where the gather_qmm path rounds: its two matmul
          // outputs, silu(gate), and the product.
          const float gate = static_cast<float>(static_cast<T>(acc[o][0]));
          const float up = static_cast<float>(static_cast<T>(acc[o][HALVES - 1]));
          const float silu = static_cast<float>(static_cast<T>(gate / (1.f + __expf(-gate))));
          result = silu * up;
        } else {
          result = acc[o][0];
        }
      }
    }
    out[(size_t)pair * N + n0 + lane] = static_cast<T>(result);
  }
"""


def shared_bytes(k: int, bits: int) -> int:
    """Dynamic shared memory of one block: x pre-scaled (fp32) and its sums."""
    return 4 * (k + k // (128 // bits))


MAX_SHARED_BYTES = 200 * 1024
"""Below the H100's 227 KiB per block, leaving room for two blocks per SM."""


@cache
def _kernel(swiglu: bool, shared: int):
    return mx.fast.cuda_kernel(
        name="moefuse_gate_up_swiglu" if swiglu else "moefuse_down",
        input_names=["x", "w", "scales", "biases", "indices"],
        output_names=["out"],
        source=_SOURCE,
        header=_HEADER,
        shared_memory=shared,
    )


class QuantizedArrays(NamedTuple):
    """What the kernels read of a quantized projection: arrays and format.

    Arrays rather than the module, so that a compiled call takes them as
    inputs (a module's arrays captured by mx.compile would be constants,
    stale once the layer's weights change).
    """

    weight: mx.array
    scales: mx.array
    biases: mx.array
    bits: int
    group_size: int

    @classmethod
    def of(cls, proj: QuantizedSwitchLinear) -> QuantizedArrays:
        return cls(proj["weight"], proj["scales"], proj["biases"], proj.bits, proj.group_size)


def gather_qmv(
    x: mx.array,
    proj: QuantizedArrays,
    indices: mx.array,
    *,
    swiglu: bool,
    x_div: int,
    init_value: float | None = None,
    outs: int = 1,
    warps: int = 8,
) -> mx.array:
    """``out[p] = proj(x[p // x_div])`` for expert ``indices[p]``, one row per pair.

    With ``swiglu``, ``proj`` is ``gate_up_proj`` and the result is
    ``silu(gate) * up`` (half its outputs). ``x`` is (rows, K), ``indices``
    flat uint32; returns (pairs, N). ``init_value`` pre-fills the output
    (tests poison it with NaN to prove every element is written). x rows are
    read in 16-byte loads: MLX passes row-contiguous copies, whose rows start
    16-byte aligned since ``why_not_kernel`` asks K to fill whole loads.
    """
    k = x.shape[-1]
    n = proj.weight.shape[-2] // (2 if swiglu else 1)
    blocks = math.ceil(n / (warps * outs))
    (out,) = _kernel(swiglu, shared_bytes(k, proj.bits))(
        inputs=[x, proj.weight, proj.scales, proj.biases, indices],
        template=[
            ("T", x.dtype),
            ("BITS", proj.bits),
            ("GROUP", proj.group_size),
            ("K", k),
            ("N", n),
            ("SWIGLU", swiglu),
            ("X_DIV", x_div),
            ("OUTS", outs),
        ],
        grid=(32 * warps * blocks, indices.size, 1),
        threadgroup=(32 * warps, 1, 1),
        output_shapes=[(indices.size, n)],
        output_dtypes=[x.dtype],
        init_value=init_value,
    )
    return out


def why_not_kernel(proj: nn.Module) -> str | None:
    """Why this expert projection cannot run on the decode kernels, or None."""
    if not isinstance(proj, QuantizedSwitchLinear):
        return f"{type(proj).__name__} is not quantized"
    if proj.mode != "affine" or proj.bits not in KERNEL_BITS:
        return f"{proj.mode} {proj.bits}-bit (kernels: affine {KERNEL_BITS}-bit)"
    if proj.group_size not in KERNEL_GROUP_SIZES:
        return f"group size {proj.group_size} (kernels: {KERNEL_GROUP_SIZES})"
    if "bias" in proj or proj.get("biases") is None:
        return "bias term (kernels have none)"
    if proj["scales"].dtype not in KERNEL_DTYPES:
        return f"{proj['scales'].dtype} scales"
    k = proj["weight"].shape[-1] * 32 // proj.bits
    if k % (128 // proj.bits):
        return f"input size {k} does not fill whole 16-byte loads"
    if shared_bytes(k, proj.bits) > MAX_SHARED_BYTES:
        return f"input size {k} does not fit in shared memory"
    return None


@dataclass(frozen=True)
class DecodeKernels:
    """The kernel path of one fused layer: always gate_up, down when it qualifies.

    A tiling is (outputs per warp, warps per block), see `gather_qmv`. With
    both kernels the call runs under mx.compile (``compiled``): at decode
    sizes the layer's wall time is mostly host work per op, and a compiled
    call replays its graph without running Python per op (docs/kernels.md).
    """

    down: bool
    max_pairs: int = MIN_MAX_PAIRS
    gate_up_tiling: tuple[int, int] = GATE_UP_TILING
    down_tiling: tuple[int, int] = DOWN_TILING
    compiled: bool = True

    def takes(self, layer: nn.Module, x: mx.array, indices: mx.array) -> bool:
        return indices.size <= self.max_pairs and x.dtype == layer.gate_up_proj["scales"].dtype

    def __call__(self, layer: nn.Module, x: mx.array, indices: mx.array) -> mx.array:
        gate_up = QuantizedArrays.of(layer.gate_up_proj)
        if not self.down:
            h = self.gate_up(x, _flat_uint32(indices), indices.shape[-1], gate_up)
            h = h.reshape(*indices.shape, 1, h.shape[-1])
            return layer.down_proj(h, indices).squeeze(-2)
        down = QuantizedArrays.of(layer.down_proj)
        if not self.compiled:
            return self.ffn(x, indices, gate_up, down)
        formats = (gate_up.bits, gate_up.group_size, down.bits, down.group_size)
        return _compiled_ffn(self, formats)(x, indices, gate_up[:3], down[:3])

    def gate_up(
        self, x: mx.array, flat: mx.array, top_k: int, gate_up: QuantizedArrays
    ) -> mx.array:
        """silu(gate) * up for each (token, expert) pair: (pairs, width)."""
        outs, warps = self.gate_up_tiling
        x = x.reshape(-1, x.shape[-1])
        return gather_qmv(x, gate_up, flat, swiglu=True, x_div=top_k, outs=outs, warps=warps)

    def ffn(
        self, x: mx.array, indices: mx.array, gate_up: QuantizedArrays, down: QuantizedArrays
    ) -> mx.array:
        """The whole FFN on the two kernels: (..., top_k, hidden), as SwitchGLU."""
        flat = _flat_uint32(indices)
        h = self.gate_up(x, flat, indices.shape[-1], gate_up)
        outs, warps = self.down_tiling
        y = gather_qmv(h, down, flat, swiglu=False, x_div=1, outs=outs, warps=warps)
        return y.reshape(*indices.shape, y.shape[-1])

    @property
    def path(self) -> str:
        down = "kernel" if self.down else "gather_qmm"
        return f"cuda kernels <= {self.max_pairs} pairs (gate_up+swiglu, down: {down})"


def _flat_uint32(indices: mx.array) -> mx.array:
    flat = indices.reshape(-1)
    return flat if flat.dtype == mx.uint32 else flat.astype(mx.uint32)


@cache
def _compiled_ffn(kernels: DecodeKernels, formats: tuple[int, int, int, int]):
    """`DecodeKernels.ffn` under mx.compile, one per tiling and weight format
    (shared by the layers that have them); the arrays are its inputs."""
    gate_up_format, down_format = formats[:2], formats[2:]

    def ffn(x, indices, gate_up, down):
        gate_up = QuantizedArrays(*gate_up, *gate_up_format)
        return kernels.ffn(x, indices, gate_up, QuantizedArrays(*down, *down_format))

    return mx.compile(ffn)


def kernels_for(layer: nn.Module) -> tuple[DecodeKernels | None, str]:
    """The decode kernels a fused layer should use here, or None and why not."""
    if backend() != "cuda":
        return None, f"gather_qmm ({backend()})"
    if not env_flag(KERNEL_ENV, default=True):
        return None, f"gather_qmm ({KERNEL_ENV}=0)"
    if type(layer.activation) is not SwiGLU:
        return None, f"gather_qmm ({type(layer.activation).__name__} activation)"
    reason = why_not_kernel(layer.gate_up_proj)
    if reason:
        return None, f"gather_qmm ({reason})"
    experts = layer.gate_up_proj["weight"].shape[0]
    down = why_not_kernel(layer.down_proj) is None and (
        layer.down_proj["scales"].dtype == layer.gate_up_proj["scales"].dtype
    )  # the down kernel reads its input (gate_up's output) in the scales' dtype
    tiling = down_tiling_for(layer.down_proj) if down else DOWN_TILING
    kernels = DecodeKernels(down, max_pairs_for(experts), down_tiling=tiling)
    return kernels, kernels.path
