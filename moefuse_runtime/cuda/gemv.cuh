// The decode path: quantized GEMVs over the routed experts, one warp per
// output row (OUTS rows per warp for short rows), fp32 sums.
//
// gate_up (GATE_UP): each warp reads row n of the gate half and row n of the
// up half of gate_up_proj for one (token, expert) pair and writes only
// act(gate, up) (ACT, common.cuh), or with ACT == NONE both. down: the same
// GEMV without the activation. Either adds the projection's bias if given.
// The block's x row is staged once in shared memory, as floats; up to eight
// units of weights (common.cuh: Packing; 16 bytes, or 32 wordwise codes) per
// lane are in flight before any arithmetic. Affine weights are dequantized
// to T, as MLX's; the float formats' codes times their group's scale. Tilings: decode.py.
#pragma once

#include "common.cuh"

namespace moefuse {

// Dot product of one unit of float-format codes (E2M1 or E4M3) with the
// plain x values it covers, in GROUPS partial sums (nvfp4's 16-value groups
// split a 32-value unit in two), to be scaled per group by the caller.
// Codes are decoded two at a time (common.cuh: e2m1_pair, e4m3_pair): value
// i and value i + PAIRS of each word.
template <int BITS, int GROUPS>
__device__ __forceinline__ void float_dot(const unsigned* words, const float* xs,
                                         float (&part)[GROUPS]) {
  constexpr int WORDS = Packing<BITS>::UNIT_WORDS, PAIRS = 16 / BITS;
#pragma unroll
  for (int i = 0; i < GROUPS; ++i) {
    part[i] = 0.f;
  }
#pragma unroll
  for (int w = 0; w < WORDS; ++w) {
    float& sum = part[w * GROUPS / WORDS];
    const float* x = xs + w * 2 * PAIRS;
#pragma unroll
    for (int i = 0; i < PAIRS; ++i) {
      const unsigned v = words[w] >> (BITS * i);
      const float2 code = __half22float2(BITS == 4 ? e2m1_pair(v) : e4m3_pair(v));
      sum = fmaf(x[i], code.x, sum);
      sum = fmaf(x[i + PAIRS], code.y, sum);
    }
  }
}

// Dot product of one unit of affine codes with the x values it covers, each
// weight dequantized to T first (`scale * q + bias`, one rounding): the
// weights MLX's dequantize and gather_qmm multiply, and the tensor-core
// path's. (Unrounded weights in fp32, scale * sum(x q) + bias * sum(x), put
// the error of a small output near that of the largest: clamping
// activations, which keep only small gate and up values, then doubled the
// error against a float32 evaluation of MLX's weights.)
template <typename T, int BITS>
__device__ __forceinline__ float affine_dot(const unsigned* words, const float* xs,
                                            typename Pair<T>::type scale_bias) {
  constexpr int VALS = Packing<BITS>::UNIT_VALS, PAIRS_PER_WORD = 16 / BITS;
  float acc0 = 0.f, acc1 = 0.f;
#pragma unroll
  for (int p = 0; p < VALS / 2; ++p) {
    unsigned bits;
    if constexpr (Packing<BITS>::WORDWISE) {
      bits = affine_pair<T>(code_at<BITS>(words, 2 * p), code_at<BITS>(words, 2 * p + 1),
                            scale_bias);
    } else {
      bits = dequant_pair<T, BITS>(words[p / PAIRS_PER_WORD], p % PAIRS_PER_WORD, scale_bias);
    }
    const typename Pair<T>::type w = *reinterpret_cast<const typename Pair<T>::type*>(&bits);
    acc0 = fmaf(xs[2 * p], static_cast<float>(w.x), acc0);
    acc1 = fmaf(xs[2 * p + 1], static_cast<float>(w.y), acc1);
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
// memory: decode.py's shared_bytes(K).
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
  constexpr int T_PER_VEC = 16 / (int)sizeof(T);
  constexpr int ROWS = GATE_UP ? 2 * N : N;           // weight rows per expert
  constexpr int HALVES = GATE_UP ? 2 : 1;             // gate and up, or one row
  using Scale = GroupScale<T, MODE>;

  // x is staged once per block (below, once the first weight loads are in
  // flight): every warp of the block reads the same x row.
  // x_scaled holds each value as a float, laid out so that lane v reading
  // float4 j of its unit finds it at [j][v] (no bank conflicts).
  extern __shared__ float moefuse_shared[];
  float4* x_scaled = reinterpret_cast<float4*>(moefuse_shared);
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
#pragma unroll
        for (int j = 0; j < VALS / T_PER_VEC; ++j) {
          const uint4 raw = x_vecs[j];
          const T* t = reinterpret_cast<const T*>(&raw);
          float f[T_PER_VEC];
#pragma unroll
          for (int e = 0; e < T_PER_VEC; ++e) {
            f[e] = static_cast<float>(t[e]);
          }
#pragma unroll
          for (int e = 0; e < T_PER_VEC; e += 4) {
            const int quad = (j * T_PER_VEC + e) / 4;
            x_scaled[quad * VECS + v] = make_float4(f[e], f[e + 1], f[e + 2], f[e + 3]);
          }
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
#pragma unroll
        for (int o = 0; o < OUTS; ++o) {
#pragma unroll
          for (int h = 0; h < HALVES; ++h) {
            if constexpr (MODE == AFFINE) {  // groups hold whole units: one per unit
              acc[o][h] += affine_dot<T, BITS>(q[b][o][h], xs, scale[b][o][h][0]);
            } else {
              float part[LOAD_GROUPS];
              float_dot<BITS, LOAD_GROUPS>(q[b][o][h], xs, part);
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
      out[(size_t)pair * 2 * N + N + n] =
          static_cast<T>(with_bias<T>(second, bias, expert_row + N + n));
    } else {
      const float up = with_bias<T>(second, bias, expert_row + N + n);
      out[(size_t)pair * N + n] = static_cast<T>(activate<T, ACT, ACT_P, ACT_Q>(first, up));
    }
  }
}

}  // namespace moefuse
