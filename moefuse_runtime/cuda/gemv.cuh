// The decode path: quantized GEMVs over the routed experts, one warp per
// output row (OUTS rows per warp for short rows), fp32 sums.
//
// gate_up (GATE_UP): each warp reads row n of the gate half and row n of the
// up half of gate_up_proj for one (token, expert) pair and writes only
// act(gate, up) (ACT, common.cuh), or with ACT == NONE both. down: the same
// GEMV without the activation. Either adds the projection's bias if given.
// The block's x row is staged once in shared memory (affine 4/8-bit:
// pre-scaled for `qdot`); up to eight units of weights (common.cuh: Packing;
// 16 bytes, or 32 wordwise codes) per lane are in flight before any
// arithmetic. Tuning and measurements: decode.py and docs/kernels.md.
#pragma once

#include "common.cuh"

namespace moefuse {

// Dot product of one unit of codes (common.cuh: Packing) with the plain x
// values it covers, in GROUPS partial sums (nvfp4's 16-value groups split a
// 32-value unit in two): E2M1 or E4M3 codes, or affine codes as integers
// (2^23 + q read as a float, minus 2^23: exact) whose scale and bias the
// caller applies per group.
template <int MODE, int BITS, int GROUPS>
__device__ __forceinline__ void unit_dot(const unsigned* words, const float* xs,
                                         float (&part)[GROUPS]) {
  constexpr int VALS = Packing<BITS>::UNIT_VALS, PER_GROUP = VALS / GROUPS;
#pragma unroll
  for (int i = 0; i < GROUPS; ++i) {
    part[i] = 0.f;
  }
#pragma unroll
  for (int v = 0; v < VALS; ++v) {
    const unsigned code = code_at<BITS>(words, v);
    const float w = MODE == AFFINE ? __uint_as_float(0x4B000000u | code) - 8388608.0f
                    : BITS == 4    ? e2m1(code)
                                   : e4m3(code);
    part[v / PER_GROUP] = fmaf(xs[v], w, part[v / PER_GROUP]);
  }
}

// Dot product of one 16-byte load of affine 4- or 8-bit weights with the x
// values it covers. Each value is masked in place inside its 16-bit half word
// and read as the float 2^23 + (v << shift): one LOP3 and one FADD instead of
// an integer-to-float conversion (a quarter-rate instruction). xs[i] holds x
// pre-scaled by 2^-shift, so the product is exact to the same rounding.
template <int BITS>
__device__ __forceinline__ float qdot(const unsigned* words, const float* xs) {
  constexpr int PER_HALF = 16 / BITS;
  constexpr unsigned MASK = (1u << BITS) - 1u;
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

// One lane's unit of packed words (common.cuh: Packing): one 16-byte load,
// or for wordwise bits BITS words, in 8-byte loads where BITS is even (rows
// and units then start 8-byte aligned).
template <int BITS>
__device__ __forceinline__ void load_unit(unsigned (&q)[Packing<BITS>::UNIT_WORDS],
                                          const unsigned* src) {
  if constexpr (!Packing<BITS>::WORDWISE) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(src));
    q[0] = v.x, q[1] = v.y, q[2] = v.z, q[3] = v.w;
  } else if constexpr (BITS % 2 == 0) {
#pragma unroll
    for (int i = 0; i < BITS; i += 2) {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(src + i));
      q[i] = v.x, q[i + 1] = v.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < BITS; ++i) {
      q[i] = __ldg(src + i);
    }
  }
}

// T: x, bias and output dtype; S: scales' (T for affine, uint8 for the
// float formats). MODE, BITS, GROUP: the weight format (common.cuh). K: input
// length, N: outputs per pair, X_DIV: pairs sharing one x row (top-k for
// gate_up, 1 for down). bias (experts x rows) and global_scale (experts,
// nvfp4) may be null. Grid: (32 * warps * blocks, pairs); dynamic shared
// memory: decode.py's shared_bytes(K, BITS).
template <typename T, int MODE, int BITS, int GROUP, int K, int N, bool GATE_UP, int ACT,
          int ACT_P, int ACT_Q, int X_DIV, int OUTS, typename S>
__device__ void gemv(const T* x, const unsigned* w, const S* scales, const S* biases,
                     const T* bias, const float* global_scale, const unsigned* indices, T* out) {
  using Packed = Packing<BITS>;
  constexpr int UNIT_WORDS = Packed::UNIT_WORDS;
  constexpr int VALS = Packed::UNIT_VALS;             // weights per unit (one lane's load)
  constexpr int VECS = K / VALS;                      // units per row
  constexpr int ITERS = (VECS + 31) / 32;
  constexpr int GROUPS = K / GROUP;
  constexpr int LOAD_GROUPS = VALS > GROUP ? VALS / GROUP : 1;  // scale groups per unit
  constexpr bool QDOT = MODE == AFFINE && !Packed::WORDWISE;    // affine 4 or 8 bits
  constexpr int PER_HALF = 16 / BITS;
  constexpr int T_PER_VEC = 16 / (int)sizeof(T);
  constexpr int ROWS = GATE_UP ? 2 * N : N;           // weight rows per expert
  constexpr int HALVES = GATE_UP ? 2 : 1;             // gate and up, or one row
  using Scale = GroupScale<T, MODE>;

  // x is staged once per block (below, once the first weight loads are in
  // flight): every warp of the block reads the same x row.
  // x_scaled holds each value (QDOT: pre-scaled for qdot), laid out so
  // that lane v reading float4 j of its unit finds it at [j][v] (no bank
  // conflicts); x_sums[v] is the plain sum of the values under unit v.
  extern __shared__ float moefuse_shared[];
  float4* x_scaled = reinterpret_cast<float4*>(moefuse_shared);
  float* x_sums = moefuse_shared + K;
  const int pair = blockIdx.y;
  const T* x_row = x + (size_t)(pair / X_DIV) * K;

  const int lane = threadIdx.x & 31;
  const int n0 = (blockIdx.x * (blockDim.x / 32) + (threadIdx.x / 32)) * OUTS;
  const bool active = n0 < N;  // uniform across the warp
  const unsigned expert = indices[pair];
  const size_t expert_row = (size_t)expert * ROWS;
  const float global = MODE == NVFP4 ? global_factor(global_scale, expert) : 1.f;

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
    unsigned q[BATCH][OUTS][HALVES][UNIT_WORDS];
    Scale scale[BATCH][OUTS][HALVES][LOAD_GROUPS];
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
            load_unit<BITS>(q[b][o][h], w + (row * VECS + v) * UNIT_WORDS);
#pragma unroll
            for (int i = 0; i < LOAD_GROUPS; ++i) {
              scale[b][o][h][i] =
                  group_scale<T, MODE>(scales, biases, row * GROUPS + g + i, global);
            }
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
            f[e] = QDOT ? value * __int_as_float((127 - BITS * (i % PER_HALF)) << 23) : value;
          }
#pragma unroll
          for (int e = 0; e < T_PER_VEC; e += 4) {
            const int quad = (j * T_PER_VEC + e) / 4;
            x_scaled[quad * VECS + v] = make_float4(f[e], f[e + 1], f[e + 2], f[e + 3]);
          }
        }
        if constexpr (MODE == AFFINE) {  // the bias term's; the float formats have none
          x_sums[v] = sum;
        }
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
        const float x_sum = MODE == AFFINE ? x_sums[v] : 0.f;
#pragma unroll
        for (int o = 0; o < OUTS; ++o) {
#pragma unroll
          for (int h = 0; h < HALVES; ++h) {
            if constexpr (MODE == AFFINE) {  // groups hold whole units: one per unit
              const Scale sb = scale[b][o][h][0];
              float dot;
              if constexpr (QDOT) {
                dot = qdot<BITS>(q[b][o][h], xs);
              } else {
                float part[1];
                unit_dot<MODE, BITS, 1>(q[b][o][h], xs, part);
                dot = part[0];
              }
              acc[o][h] += static_cast<float>(sb.x) * dot + static_cast<float>(sb.y) * x_sum;
            } else {
              float part[LOAD_GROUPS];
              unit_dot<MODE, BITS, LOAD_GROUPS>(q[b][o][h], xs, part);
#pragma unroll
              for (int i = 0; i < LOAD_GROUPS; ++i) {
                acc[o][h] = fmaf(scale[b][o][h][i], part[i], acc[o][h]);
              }
            }
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
    const int n = n0 + lane;
    float first = 0.f, second = 0.f;
#pragma unroll
    for (int o = 0; o < OUTS; ++o) {
      if (o == lane) {
        first = acc[o][0];
        second = acc[o][HALVES - 1];
      }
    }
    // Rounded where the gather_qmm path rounds: each matmul output, then
    // its bias, then (activate) what the activation rounds.
    first = with_bias<T>(first, bias, expert_row + n);
    if constexpr (!GATE_UP) {
      out[(size_t)pair * N + n] = static_cast<T>(first);
    } else if constexpr (ACT == NONE) {
      out[(size_t)pair * 2 * N + n] = static_cast<T>(first);
      out[(size_t)pair * 2 * N + N + n] = static_cast<T>(with_bias<T>(second, bias, expert_row + N + n));
    } else {
      const float up = with_bias<T>(second, bias, expert_row + N + n);
      out[(size_t)pair * N + n] = static_cast<T>(activate<T, ACT, ACT_P, ACT_Q>(first, up));
    }
  }
}

}  // namespace moefuse
