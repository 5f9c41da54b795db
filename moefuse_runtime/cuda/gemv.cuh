// The decode path: quantized GEMVs over the routed experts, one warp per
// output row (OUTS rows per warp for short rows), fp32 sums.
//
// gate_up (SWIGLU): each warp reads row n of the gate half and row n of the
// up half of gate_up_proj for one (token, expert) pair and writes only
// silu(gate) * up. down: the same GEMV without the activation.
// The block's x row is staged once in shared memory, pre-scaled for `qdot`;
// up to eight 16-byte weight loads per lane are in flight before any
// arithmetic. Tuning and measurements: decode.py and docs/kernels.md.
#pragma once

#include "common.cuh"

namespace moefuse {

// Dot product of one 16-byte load of packed BITS-bit weights with the x
// values it covers. Each value is masked in place inside its 16-bit half word
// and read as the float 2^23 + (v << shift): one LOP3 and one FADD instead of
// an integer-to-float conversion (a quarter-rate instruction). xs[i] holds x
// pre-scaled by 2^-shift, so the product is exact to the same rounding.
template <int BITS>
__device__ __forceinline__ float qdot(const uint4& q, const float* xs) {
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

// T: x, scales, biases and output dtype. K: input length, N: outputs per
// pair, X_DIV: pairs sharing one x row (top-k for gate_up, 1 for down).
// Grid: (32 * warps * blocks, pairs); dynamic shared memory: decode.py's
// shared_bytes(K, BITS).
template <typename T, int BITS, int GROUP, int K, int N, bool SWIGLU, int X_DIV, int OUTS>
__device__ void gemv(const T* x, const unsigned* w, const T* scales, const T* biases,
                     const unsigned* indices, T* out) {
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
  // x_scaled holds each value pre-scaled for qdot, laid out so that
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
                    qdot<BITS>(q[b][o][h], xs) +
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
      acc[o][h] = warp_sum(acc[o][h]);
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
}

}  // namespace moefuse
