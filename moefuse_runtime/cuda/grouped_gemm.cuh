// The tensor-core path of a fused MoE layer: (token, expert) pairs grouped by
// expert, each group a GEMM against that expert's packed weights (affine,
// mxfp4, nvfp4 or mxfp8: common.cuh).
//
// `route` sorts the pairs by expert (a counting sort in one block) and cuts
// each expert's run of sorted rows into tiles of BM rows: a tile is (expert,
// first sorted row, end). `grouped_gemm` runs one block per (tile, BN output
// columns):
//
//   fetch   A rows (gathered x rows for gate_up, sorted h rows for down) and
//           the packed weight rows of the tile, 16-byte cp.async, STAGES deep
//           (weights with a 256-byte L2 prefetch: a row is read 16 or 32
//           bytes per k-tile, which DRAM serves poorly one sector at a time);
//   dequant the packed k-tile once per block into bf16/fp16 in shared memory
//           (each thread dequantizes the chunks it fetched itself), or, with
//           B_REGS, each warp straight into its mma B fragments (no
//           dequantized tile: 5x less shared-memory traffic, which bounds
//           the kernel at few rows per expert);
//   mma     ldmatrix + mma.sync m16n8k16, fp32 accumulators;
//   store   gate_up: act(gate, up) of matching columns (a block holds BN/2
//           gate rows and the same BN/2 up rows; ACT == NONE: both), in
//           sorted row order; down: each row back to its pair's place;
//           either with the projection's bias added if it has one.
//
// Experts with no rows have no tiles; each expert's weights are read once
// per tile of its rows. The grid is one-dimensional (tiles x column tiles),
// so no pair count meets the 65,535 limit of a grid's y and z.
#pragma once

#include "common.cuh"

namespace moefuse {

constexpr int GEMM_BK = 64;  // k per pipeline stage: one 128-byte row of bf16 in shared memory
constexpr int SCALE_RING = 4;  // k-tiles of scales and biases in registers

// Upper bound on the tiles of `pairs` sorted rows over E experts: each
// non-empty expert adds at most one partial tile. The Python launcher sizes
// the schedule with the same formula (grouped.py: max_tiles).
__device__ __forceinline__ int max_tiles(int pairs, int experts, int bm) {
  return (pairs + bm - 1) / bm + min(experts, pairs);
}

// Exclusive prefix sum of v over the block's threads, in thread order, and
// the block's total. Every thread of the block calls it.
__device__ __forceinline__ int block_exclusive_scan(int v, int& total) {
  __shared__ int warp_totals[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  int inclusive = v;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int u = __shfl_up_sync(0xffffffffu, inclusive, offset);
    inclusive += lane >= offset ? u : 0;
  }
  if (lane == 31) {
    warp_totals[warp] = inclusive;
  }
  __syncthreads();
  if (warp == 0) {
    int sum = lane < warps ? warp_totals[lane] : 0;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const int u = __shfl_up_sync(0xffffffffu, sum, offset);
      sum += lane >= offset ? u : 0;
    }
    warp_totals[lane] = sum;
  }
  __syncthreads();
  const int exclusive = (warp > 0 ? warp_totals[warp - 1] : 0) + inclusive - v;
  total = warp_totals[warps - 1];
  __syncthreads();  // warp_totals is reused by the next call
  return exclusive;
}

// Expert e's tiles of BM sorted rows from `start`, into tiles[first...].
template <int BM>
__device__ __forceinline__ void write_tiles(int4* tiles, int first, int e, int start, int rows) {
  for (int j = 0; j * BM < rows; ++j) {
    tiles[first + j] = make_int4(e, start + j * BM, start + min((j + 1) * BM, rows), 0);
  }
}

// The routing of one call, in one block (a counting sort by expert):
//   order[s]  the pair at sorted row s (pairs grouped by expert, experts in
//             order; within an expert, the order the atomics gave: every
//             row's result is independent of its neighbours in a tile, so
//             the kernels' outputs do not depend on it);
//   tiles_a   {expert, first sorted row, end row, 0} per BM_A rows, experts
//             in order, then {-1, 0, 0, 0} up to max_tiles (gate_up's);
//   tiles_b   the same per BM_B rows (down's).
// Expert ids past E are counted as expert E - 1: wrong rows rather than
// reads out of bounds (SwitchGLU's own gather has no check either).
// Each pair takes its row with a shared-memory atomic of its own: the lanes
// of a warp on one expert serialize there, in hardware, rather than meet
// first in a __match_any_sync per pair.
template <int E, int BM_A, int BM_B>
__device__ void route(const unsigned* experts, int pairs, unsigned* order, int* tiles_a,
                      int* tiles_b) {
  __shared__ int next_row[E];  // counts, then each expert's next free sorted row
  const int tid = threadIdx.x;
  for (int e = tid; e < E; e += blockDim.x) {
    next_row[e] = 0;
  }
  __syncthreads();
  for (int i = tid; i < pairs; i += blockDim.x) {
    atomicAdd(&next_row[min(experts[i], E - 1u)], 1);
  }
  __syncthreads();
  int rows_before = 0, tiles_before_a = 0, tiles_before_b = 0;
  for (int base = 0; base < E; base += blockDim.x) {
    const int e = base + tid;
    const int rows = e < E ? next_row[e] : 0;
    int total;
    const int start = rows_before + block_exclusive_scan(rows, total);
    rows_before += total;
    const int first_a = tiles_before_a + block_exclusive_scan((rows + BM_A - 1) / BM_A, total);
    tiles_before_a += total;
    const int first_b = tiles_before_b + block_exclusive_scan((rows + BM_B - 1) / BM_B, total);
    tiles_before_b += total;
    if (e < E) {
      next_row[e] = start;
      write_tiles<BM_A>(reinterpret_cast<int4*>(tiles_a), first_a, e, start, rows);
      write_tiles<BM_B>(reinterpret_cast<int4*>(tiles_b), first_b, e, start, rows);
    }
  }
  for (int t = tiles_before_a + tid; t < max_tiles(pairs, E, BM_A); t += blockDim.x) {
    reinterpret_cast<int4*>(tiles_a)[t] = make_int4(-1, 0, 0, 0);
  }
  for (int t = tiles_before_b + tid; t < max_tiles(pairs, E, BM_B); t += blockDim.x) {
    reinterpret_cast<int4*>(tiles_b)[t] = make_int4(-1, 0, 0, 0);
  }
  __syncthreads();
  for (int i = tid; i < pairs; i += blockDim.x) {
    order[atomicAdd(&next_row[min(experts[i], E - 1u)], 1)] = i;
  }
}

// Offset, in 16-byte chunks, of chunk `chunk` of row `row` in a tile whose
// rows are 8 chunks (GEMM_BK values) long: XOR-swizzled so that the 8 rows
// one ldmatrix reads sit in 8 different bank groups.
__device__ __forceinline__ int swizzle(int row, int chunk) {
  return row * 8 + (chunk ^ (row & 7));
}

// The same for packed weight rows of CHUNKS (2 or 4) chunks per stage: the
// 8 consecutive rows one B fragment reads sit in 8 different bank groups.
template <int CHUNKS>
__device__ __forceinline__ int q_swizzle(int row, int chunk) {
  return row * CHUNKS + (chunk ^ ((row / (8 / CHUNKS)) % CHUNKS));
}

// out = act(x @ W[e]^T + bias[e]) for the tiles of `tiles`; see the top of
// this file. T: activation dtype; S: scales' (T for affine, uint8 for the
// float formats). MODE, BITS, GROUP: the weight format (common.cuh).
// N: outputs per pair (gate_up: the width, weights hold 2N rows). ACT,
// ACT_P, ACT_Q: gate_up's activation (common.cuh). TOP_K: pairs per x row
// (gate_up's gather). B_REGS: dequantize into mma fragments rather than a
// shared tile (above). bias (experts x rows) and global_scale (experts,
// nvfp4) may be null. Block: 32 * WARPS_M * WARPS_N threads; grid: tiles x
// column tiles. Dynamic shared memory: grouped.py's shared_bytes().
template <typename T, int MODE, int BITS, int GROUP, int K, int N, bool GATE_UP, int ACT,
          int ACT_P, int ACT_Q, int TOP_K, int BM, int BN, int WARPS_M, int WARPS_N, int STAGES,
          bool B_REGS, typename S>
__device__ void grouped_gemm(const T* x, const unsigned* w, const S* scales, const S* biases,
                             const T* bias, const float* global_scale, const unsigned* order,
                             const int* tiles, T* out) {
  constexpr int BK = GEMM_BK;
  constexpr int THREADS = 32 * WARPS_M * WARPS_N;
  constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  constexpr int MT = WM / 16, NT = WN / 8;           // m16 and n8 tiles per warp
  constexpr int ROWS = GATE_UP ? 2 * N : N;           // weight rows per expert
  constexpr int COLS = GATE_UP ? BN / 2 : BN;         // output columns per block
  constexpr int N_TILES = (N + COLS - 1) / COLS;
  constexpr int WORDS = K * BITS / 32;               // packed words per weight row
  constexpr int GROUPS = K / GROUP;
  // What one thread copies and dequantizes of a row's k-tile: a 16-byte chunk
  // (4 and 8 bits), or the whole k-tile, 2 * BITS words (wordwise bits,
  // common.cuh: Packing), copied in the largest pieces its alignment allows.
  constexpr bool WORDWISE = Packing<BITS>::WORDWISE;
  constexpr int STAGE_WORDS = BK * BITS / 32;        // packed words per row and k-tile
  constexpr int B_CHUNKS = WORDWISE ? 1 : STAGE_WORDS / 4;  // per row and k-tile
  constexpr int B_VALS = BK / B_CHUNKS;              // values per packed chunk
  constexpr int CP_WORDS = !WORDWISE ? 4
                           : WORDS % 4 == 0 && STAGE_WORDS % 4 == 0 ? 4
                           : WORDS % 2 == 0 ? 2 : 1;
  constexpr int Q_STAGE_CHUNKS = BN * STAGE_WORDS / 4;  // 16-byte chunks of a packed stage
  constexpr int KS_PER_CHUNK = (BK / 16) / B_CHUNKS;  // mma k-steps per packed chunk
  constexpr int G_T = BK / GROUP > 0 ? BK / GROUP : 1;  // scale groups per row and k-tile
  constexpr int CHUNK_GROUPS = B_VALS > GROUP ? B_VALS / GROUP : 1;  // per packed chunk
  using Scale = GroupScale<T, MODE>;
  constexpr int KT = (K + BK - 1) / BK;
  constexpr int A_ITERS = (BM * 8 + THREADS - 1) / THREADS;
  constexpr int B_ITERS = (BN * B_CHUNKS + THREADS - 1) / THREADS;
  static_assert(STAGES >= 3, "the loop waits for the stage after the one it computes");
  static_assert(WORDWISE || B_CHUNKS == 2 || B_CHUNKS == 4, "q_swizzle: 2 or 4 chunks per row");
  static_assert(BN * STAGE_WORDS % 4 == 0, "packed stages are whole 16-byte chunks");
  static_assert(!WORDWISE || MODE == AFFINE, "wordwise codes are affine");
  static_assert(MT >= 1 && WM % 16 == 0 && NT % 2 == 0, "warp tile: m16 x (2 n8) multiples");
  static_assert(!GATE_UP || NT % 4 == 0, "gate_up: each warp holds gate and up n8 pairs");
  static_assert(K % 32 == 0 && GROUP % 16 == 0, "k tails are whole 32-value chunks");
  static_assert(THREADS % 8 == 0, "each thread copies one fixed chunk column of A");

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  const int g = lane >> 2, t = lane & 3;  // mma fragment coordinates
  const int tile_id = blockIdx.x / N_TILES, n_tile = blockIdx.x % N_TILES;
  const int4 tile = reinterpret_cast<const int4*>(tiles)[tile_id];
  if (tile.x < 0) {
    return;  // the schedule's upper bound left this one empty
  }
  const int expert = tile.x, row0 = tile.y, rows = tile.z - tile.y;
  const float global = MODE == NVFP4 ? global_factor(global_scale, expert) : 1.f;

  extern __shared__ uint4 smem[];
  uint4* a_smem = smem;                                 // STAGES x BM x 8 chunks
  uint4* q_smem = a_smem + STAGES * BM * 8;             // STAGES x BN x STAGE_WORDS words
  uint4* b_smem = q_smem + STAGES * Q_STAGE_CHUNKS;     // 2 x BN x 8 chunks, dequantized (!B_REGS)

  // Where this thread's copies come from (fixed for the block).
  unsigned a_src[A_ITERS];  // offsets into x (32 bits: fewer registers)
  bool a_ok[A_ITERS];
  const int a_chunk = tid % 8;
#pragma unroll
  for (int j = 0; j < A_ITERS; ++j) {
    const int r = (tid + j * THREADS) / 8;
    a_ok[j] = r < BM && r < rows;
    const int src = !a_ok[j] ? 0 : GATE_UP ? order[row0 + r] / TOP_K : row0 + r;
    a_src[j] = static_cast<unsigned>(src) * K + a_chunk * 8;
  }
  // The expert's weight row behind row r of the block's B tile (gate_up: the
  // first BN/2 are gate rows, the rest the up rows of the same columns), and
  // whether it exists (columns past N read row 0, as zeros or unused).
  auto weight_row = [&](int r, bool& exists) -> size_t {
    const int upper = GATE_UP && r >= BN / 2;
    const int n = n_tile * COLS + r - (upper ? BN / 2 : 0);
    exists = n < N;
    return (size_t)expert * ROWS + (exists ? n + (upper ? N : 0) : 0);
  };
  unsigned q_src[B_ITERS];  // offsets into w, in words (grouped.py: below 2^32)
  size_t s_idx[B_ITERS];
  bool q_ok[B_ITERS];
#pragma unroll
  for (int j = 0; j < B_ITERS; ++j) {
    const int i = tid + j * THREADS;
    const size_t row = weight_row(i / B_CHUNKS, q_ok[j]);
    q_ok[j] = q_ok[j] && i < BN * B_CHUNKS;
    q_src[j] = static_cast<unsigned>(row * WORDS + (i % B_CHUNKS) * 4);
    s_idx[j] = row * GROUPS;
  }

  auto fetch_gmem = [&](int kt) {
    if (kt < KT) {
      uint4* a_stage = a_smem + (kt % STAGES) * BM * 8;
      const bool a_k = kt * BK + a_chunk * 8 < K;
#pragma unroll
      for (int j = 0; j < A_ITERS; ++j) {
        const int r = (tid + j * THREADS) / 8;
        if (r < BM) {
          const bool ok = a_ok[j] && a_k;
          cp_async_16(a_stage + swizzle(r, a_chunk), ok ? x + a_src[j] + kt * BK : x, ok);
        }
      }
      uint4* q_stage = q_smem + (kt % STAGES) * Q_STAGE_CHUNKS;
#pragma unroll
      for (int j = 0; j < B_ITERS; ++j) {
        const int i = tid + j * THREADS;
        if constexpr (WORDWISE) {  // row i's k-tile, unswizzled
          if (i >= BN) {
            continue;
          }
          unsigned* dst = reinterpret_cast<unsigned*>(q_stage) + i * STAGE_WORDS;
          const unsigned* src = w + q_src[j] + kt * STAGE_WORDS;
#pragma unroll
          for (int p = 0; p < STAGE_WORDS; p += CP_WORDS) {
            const bool ok = q_ok[j] && kt * STAGE_WORDS + p + CP_WORDS <= WORDS;
            if constexpr (CP_WORDS == 4) {
              cp_async_16<256>(dst + p, ok ? src + p : w, ok);
            } else {
              cp_async_small<4 * CP_WORDS>(dst + p, ok ? src + p : w, ok);
            }
          }
        } else if (i < BN * B_CHUNKS) {
          const bool ok = q_ok[j] && kt * BK + (i % B_CHUNKS) * B_VALS < K;
          // a row's 16 or 32 bytes per k-tile: the L2 fetches the 256 around
          // them, which the row's next k-tiles read (DRAM serves single
          // sectors poorly)
          cp_async_16<256>(q_stage + q_swizzle<B_CHUNKS>(i / B_CHUNKS, i % B_CHUNKS),
                           ok ? w + q_src[j] + kt * (BK * BITS / 32) : w, ok);
        }
      }
    }
    cp_async_commit();  // empty groups too: the wait counts stay uniform
  };

  // The shared-memory row of this warp's n8 tile j: gate_up warps hold
  // NT/2 gate tiles and the NT/2 up tiles of the same columns.
  auto b_row = [&](int j) {
    if constexpr (GATE_UP) {
      return (j < NT / 2 ? 0 : BN / 2) + wn * (WN / 2) + (j % (NT / 2)) * 8;
    } else {
      return wn * WN + j * 8;
    }
  };

  // Scales and biases ride in registers, SCALE_RING k-tiles deep: tile kt+1's
  // are loaded SCALE_RING - 1 iterations before its dequantization. With few
  // rows per expert an iteration is short, and one iteration of lead left
  // every iteration waiting on a DRAM load.
  Scale scale[SCALE_RING][B_ITERS][CHUNK_GROUPS];
  auto fetch_scales = [&](int kt, int slot) {
#pragma unroll
    for (int j = 0; j < B_ITERS; ++j) {
      const int k = kt * BK + ((tid + j * THREADS) % B_CHUNKS) * B_VALS;
      const bool ok = q_ok[j] && kt < KT;
#pragma unroll
      for (int i = 0; i < CHUNK_GROUPS; ++i) {
        scale[slot][j][i] = ok && k + i * GROUP < K
                                ? group_scale<T, MODE>(scales, biases, s_idx[j] + k / GROUP + i,
                                                      global)
                               : zero_scale<T, MODE>();
      }
    }
  };

  // The packed chunks this thread fetched for k-tile kt, dequantized into
  // b_smem[buffer]: 8 (4-bit) or 4 (8-bit) values per word; word v of a
  // chunk is in its scale group v * (32 / BITS) / GROUP (nvfp4: two groups).
  auto dequant = [&](int kt, int buffer, int slot) {
    const uint4* q_stage = q_smem + (kt % STAGES) * Q_STAGE_CHUNKS;
    uint4* b_tile = b_smem + buffer * BN * 8;
#pragma unroll
    for (int j = 0; j < B_ITERS; ++j) {
      const int i = tid + j * THREADS;
      if constexpr (WORDWISE) {  // row i's whole k-tile: 8 chunks of 8 values
        if (i >= BN) {
          continue;
        }
        const unsigned* row = reinterpret_cast<const unsigned*>(q_stage) + i * STAGE_WORDS;
        unsigned words[STAGE_WORDS];
#pragma unroll
        for (int v = 0; v < STAGE_WORDS; ++v) {
          words[v] = row[v];
        }
#pragma unroll
        for (int c = 0; c < 8; ++c) {
          const Scale sb = scale[slot][j][CHUNK_GROUPS > 1 ? 8 * c / GROUP : 0];
          unsigned pairs[4];
#pragma unroll
          for (int p = 0; p < 4; ++p) {
            const int v = 8 * c + 2 * p;
            pairs[p] = affine_pair<T>(code_at<BITS>(words, v), code_at<BITS>(words, v + 1), sb);
          }
          b_tile[swizzle(i, c)] = make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
        }
      } else if (i < BN * B_CHUNKS) {
        const int r = i / B_CHUNKS, c = i % B_CHUNKS;
        const uint4 q = q_stage[q_swizzle<B_CHUNKS>(r, c)];
        const unsigned words[4] = {q.x, q.y, q.z, q.w};
        auto word_pair = [&](int v, int p) {
          const Scale sb = scale[slot][j][CHUNK_GROUPS > 1 ? v * (32 / BITS) / GROUP : 0];
          return dequant_pair_any<T, MODE, BITS>(words[v], p, sb);
        };
        if constexpr (BITS == 4) {
#pragma unroll
          for (int v = 0; v < 4; ++v) {
            b_tile[swizzle(r, c * 4 + v)] = make_uint4(word_pair(v, 0), word_pair(v, 1),
                                                       word_pair(v, 2), word_pair(v, 3));
          }
        } else {
#pragma unroll
          for (int v = 0; v < 4; v += 2) {
            b_tile[swizzle(r, c * 2 + v / 2)] = make_uint4(word_pair(v, 0), word_pair(v, 1),
                                                           word_pair(v + 1, 0),
                                                           word_pair(v + 1, 1));
          }
        }
      }
    }
  };

  // B_REGS: the scales (affine: {scale, bias} pairs) of the rows the B
  // fragments read (row g of each n8 tile), same ring. The 4 threads of a
  // quad read the same rows, so each holds a quarter of them: thread t the
  // tiles j with j % 4 == t, handed to the others by a shuffle when used.
  constexpr int FRAG_SB = (NT + 3) / 4;  // n8 tiles whose scales this thread holds
  Scale frag_sb[SCALE_RING][FRAG_SB][G_T];
  unsigned frag_s_idx[FRAG_SB];
  bool frag_ok[FRAG_SB];
  if constexpr (B_REGS) {
#pragma unroll
    for (int i = 0; i < FRAG_SB; ++i) {
      const int j = 4 * i + t;
      frag_s_idx[i] = static_cast<unsigned>(weight_row(b_row(j % NT) + g, frag_ok[i]) * GROUPS);
      frag_ok[i] = frag_ok[i] && j < NT;
    }
  }
  auto fetch_frag_scales = [&](int kt, int slot) {
#pragma unroll
    for (int i = 0; i < FRAG_SB; ++i) {
#pragma unroll
      for (int gi = 0; gi < G_T; ++gi) {
        const int k = kt * BK + gi * (BK / G_T);
        const bool ok = frag_ok[i] && kt < KT && k < K;
        frag_sb[slot][i][gi] = ok ? group_scale<T, MODE>(scales, biases, frag_s_idx[i] + k / GROUP,
                                                         global)
                                  : zero_scale<T, MODE>();
      }
    }
  };
  // Tile j's scale of scale group gi, from the quad thread holding it.
  auto frag_scale_bias = [&](int slot, int j, int gi) {
    Scale mine = frag_sb[slot][j / 4][gi];
    const unsigned v = __shfl_sync(0xffffffffu, *reinterpret_cast<unsigned*>(&mine),
                                   (lane & ~3) | (j % 4));
    return *reinterpret_cast<const Scale*>(&v);
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        acc[mt][j][e] = 0.f;
      }
    }
  }

  // This warp's A fragments of k-step ks.
  auto load_a = [&](const uint4* a_stage, int ks, unsigned (&a)[MT][4]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int r = wm * WM + mt * 16 + (lane & 15);
      ldmatrix_x4(a[mt], a_stage + swizzle(r, 2 * ks + (lane >> 4)));
    }
  };

  auto mma_ktile = [&](int kt) {
    const uint4* a_stage = a_smem + (kt % STAGES) * BM * 8;
    const uint4* b_tile = b_smem + (kt & 1) * BN * 8;
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
      unsigned a[MT][4], b[NT][2];
      load_a(a_stage, ks, a);
#pragma unroll
      for (int jp = 0; jp < NT; jp += 2) {
        const int m = lane >> 3;  // which 8x8 matrix this lane addresses
        unsigned r[4];
        ldmatrix_x4(r, b_tile + swizzle(b_row(jp + (m >> 1)) + (lane & 7), 2 * ks + (m & 1)));
        b[jp][0] = r[0];
        b[jp][1] = r[1];
        b[jp + 1][0] = r[2];
        b[jp + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          mma_16816<T>(acc[mt][j], a[mt], b[j][0], b[j][1]);
        }
      }
    }
  };

  // B_REGS: the words of one k-step of this thread's B rows become that
  // k-step's fragments just before its mma (fewer live registers than a
  // whole chunk's: with the quad-shared scales, 95 instead of 133 at BM 16).
  // A fragment holds values 2t, 2t + 1 (and 8 further) of row g: 4-bit, pair
  // t of words 2 ks and 2 ks + 1; 8-bit, pair t % 2 of words 4 ks + t / 2
  // and 4 ks + 2 + t / 2.
  // Wordwise: values v and v + 1 of a row's k-tile, from the one or two
  // words they lie in (v = 2t + 16 kk is a thread's own: one funnel shift).
  auto wordwise_pair = [&](const unsigned* row, int v, auto sb) {
    constexpr unsigned MASK = (1u << BITS) - 1u;
    const int bit = v * BITS, lo = bit >> 5, shift = bit & 31;
    // (2-bit: a pair never crosses a word, which the compiler cannot see)
    const unsigned next = 32 % BITS != 0 && shift + 2 * BITS > 32 ? row[lo + 1] : 0u;
    const unsigned codes = __funnelshift_r(row[lo], next, shift);
    return affine_pair<T>(codes & MASK, (codes >> BITS) & MASK, sb);
  };
  auto mma_ktile_regs = [&](int kt, int slot) {
    const uint4* a_stage = a_smem + (kt % STAGES) * BM * 8;
    const unsigned* q_stage =
        reinterpret_cast<const unsigned*>(q_smem + (kt % STAGES) * Q_STAGE_CHUNKS);
    // A k-step's 16 values share one scale group (groups of 16 or more); a
    // chunk's do too unless groups are shorter than a chunk (nvfp4).
    constexpr int CHUNK_VALS = BK / B_CHUNKS;
    constexpr bool GROUP_PER_KSTEP = BK / G_T < CHUNK_VALS;
#pragma unroll
    for (int c = 0; c < B_CHUNKS; ++c) {
      Scale sb[NT];
#pragma unroll
      for (int kk = 0; kk < KS_PER_CHUNK; ++kk) {
        if (kk == 0 || GROUP_PER_KSTEP) {
          const int gi = (c * CHUNK_VALS + kk * 16) / (BK / G_T);
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            sb[j] = frag_scale_bias(slot, j, gi);
          }
        }
        unsigned b[NT][2];
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          if constexpr (WORDWISE) {
            const unsigned* row = q_stage + (b_row(j) + g) * STAGE_WORDS;
            b[j][0] = wordwise_pair(row, kk * 16 + 2 * t, sb[j]);
            b[j][1] = wordwise_pair(row, kk * 16 + 2 * t + 8, sb[j]);
            continue;
          }
          const unsigned* q = q_stage + 4 * q_swizzle<B_CHUNKS>(b_row(j) + g, c);
          if constexpr (BITS == 4) {
            const uint2 words = *reinterpret_cast<const uint2*>(q + 2 * kk);
            b[j][0] = dequant_pair_any<T, MODE, BITS>(words.x, t, sb[j]);
            b[j][1] = dequant_pair_any<T, MODE, BITS>(words.y, t, sb[j]);
          } else {
            b[j][0] = dequant_pair_any<T, MODE, BITS>(q[t >> 1], t & 1, sb[j]);
            b[j][1] = dequant_pair_any<T, MODE, BITS>(q[2 + (t >> 1)], t & 1, sb[j]);
          }
        }
        unsigned a[MT][4];
        load_a(a_stage, c * KS_PER_CHUNK + kk, a);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            mma_16816<T>(acc[mt][j], a[mt], b[j][0], b[j][1]);
          }
        }
      }
    }
  };

  // Software pipeline. Shared dequantization: k-tile kt+1 is dequantized
  // while kt is multiplied. B_REGS: kt is dequantized as it is multiplied.
  // The loops are unrolled by SCALE_RING so that scale slots are constants.
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    fetch_gmem(s);
  }
  if constexpr (B_REGS) {
#pragma unroll
    for (int s = 0; s < SCALE_RING; ++s) {
      fetch_frag_scales(s, s);
    }
    for (int kt0 = 0; kt0 < KT; kt0 += SCALE_RING) {
#pragma unroll
      for (int u = 0; u < SCALE_RING; ++u) {
        const int kt = kt0 + u;
        if (kt < KT) {
          cp_async_wait<STAGES - 2>();  // k-tile kt has landed
          __syncthreads();              // every thread's copies of kt; kt-1 is done
          fetch_gmem(kt + STAGES - 1);  // into the stage kt-1 used
          mma_ktile_regs(kt, u);
          fetch_frag_scales(kt + SCALE_RING, u);  // the slot tile kt used
        }
      }
    }
  } else {
#pragma unroll
    for (int s = 0; s < SCALE_RING; ++s) {
      fetch_scales(s, s);
    }
    cp_async_wait<STAGES - 2>();
    dequant(0, 0, 0);  // this thread's own chunks: its wait is enough
    for (int kt0 = 0; kt0 < KT; kt0 += SCALE_RING) {
#pragma unroll
      for (int u = 0; u < SCALE_RING; ++u) {
        const int kt = kt0 + u;
        if (kt < KT) {
          cp_async_wait<STAGES - 3>();  // k-tile kt+1 has landed
          __syncthreads();              // kt's A and dequantized B are visible; kt-1 is done
          fetch_gmem(kt + STAGES - 1);  // into the stage kt-1 used
          if (kt + 1 < KT) {
            dequant(kt + 1, (kt + 1) & 1, (u + 1) % SCALE_RING);
          }
          fetch_scales(kt + SCALE_RING, u);  // the slot tile kt's dequantization freed
          mma_ktile(kt);
        }
      }
    }
  }

  // Epilogue: accumulator c[e] of (mt, j) is row g (+8 for e >= 2), column 2t + e % 2.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = wm * WM + mt * 16 + g + 8 * half;
      if (r >= rows) {
        continue;
      }
      const int s = row0 + r;
      constexpr int OUT_N = GATE_UP && ACT == NONE ? 2 * N : N;  // NONE: gate, then up
      T* dst = out + (size_t)(GATE_UP ? s : order[s]) * OUT_N;
      const size_t bias_row = (size_t)expert * ROWS;
      // Stores values for columns col, col + 1 (those below N) at dst + at.
      auto store = [&](int col, int at, const float (&v)[2]) {
        if (N % 2 == 0 && col + 1 < N) {
          *reinterpret_cast<unsigned*>(dst + at) = pack2<T>(v[0], v[1]);
        } else {
          if (col < N) dst[at] = static_cast<T>(v[0]);
          if (col + 1 < N) dst[at + 1] = static_cast<T>(v[1]);
        }
      };
#pragma unroll
      for (int j = 0; j < (GATE_UP ? NT / 2 : NT); ++j) {
        const int col = n_tile * COLS + wn * (GATE_UP ? WN / 2 : WN) + j * 8 + 2 * t;
        // Rounded where the gather_qmm path rounds: each matmul output, its
        // bias, then what the activation rounds (common.cuh).
        float v[2], up[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int n = min(col + e, N - 1);
          v[e] = with_bias<T>(acc[mt][j][2 * half + e], bias, bias_row + n);
          if constexpr (GATE_UP) {
            up[e] = with_bias<T>(acc[mt][j + NT / 2][2 * half + e], bias, bias_row + N + n);
            if constexpr (ACT != NONE) {
              v[e] = activate<T, ACT, ACT_P, ACT_Q>(v[e], up[e]);
            }
          }
        }
        store(col, col, v);
        if constexpr (GATE_UP && ACT == NONE) {
          store(col, N + col, up);
        }
      }
    }
  }
}

}  // namespace moefuse
