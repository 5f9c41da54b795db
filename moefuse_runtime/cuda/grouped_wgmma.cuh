// The tensor-core path on Hopper (sm_90a): grouped_gemm.cuh's GEMM of each
// expert's sorted rows, on warpgroup MMA (wgmma) instead of mma.sync.
//
// A wgmma multiplies a 64-row A (registers or shared memory) by a B of up to
// 256 columns that only shared memory holds, asynchronously, for the four
// warps of a warpgroup. The weights are dequantized in registers, so they
// are A and the product is computed transposed: out^T = W . x^T. Per block:
//
//   fetch   the tile's BM x rows (gathered for gate_up, sorted h rows for
//           down) in the 128-byte swizzled layout wgmma reads as a K-major
//           B (grouped_gemm.cuh's A stages are that layout already), and the
//           block's BN packed weight rows, 16-byte cp.async, STAGES deep;
//   dequant each warp its MT x 16 weight rows of a k-step straight into
//           wgmma A fragments (the layout of mma.m16n8k16's A: row g and
//           row g + 8, values 2t, 2t + 1 and 8 further);
//   mma     per k-step, one m64 n64 k16 wgmma per 64 x rows of the tile and
//           per m-tile (a warpgroup's 64 rows), fp32 accumulators, the next
//           k-step's dequantization overlapping;
//   store   gate_up: a warp's rows g and g + 8 are the gate and the up row
//           of one output column, so act(gate, up) is formed in registers;
//           down: rows g and g + 8 are two columns; each column of the
//           transposed product is one x row, written where grouped_gemm
//           writes it (sorted order, or the pair's place).
//
// 4- and 8-bit codes (every format of common.cuh but the wordwise bits).
// The schedule (route), the tiles and the rounding are grouped_gemm's.
//
// PRODUCER (warp specialization): one more warpgroup does every copy, and
// the others only dequantize and multiply. They hand the stages over
// through mbarriers, `full` (the copies of a stage landed:
// cp.async.mbarrier.arrive) and `empty` (the wgmmas reading it are done),
// instead of a block barrier per k-tile, so a warpgroup waits only for the
// data it reads next, never for the slowest warp of the block. The copying
// warpgroup gives its registers to the computing ones (setmaxnreg), whose
// fragments and accumulators then fit where a block of the same threads
// would spill.
#pragma once

#include "grouped_gemm.cuh"

namespace moefuse {

// ---- warpgroup MMA (sm_90a) -------------------------------------------------

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

template <int PENDING>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(PENDING) : "memory");
}

// Shared-memory writes of the generic proxy (cp.async, st.shared) made
// visible to wgmma's reads, which go through the async proxy.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// The descriptor of a K-major B operand in the 128-byte swizzle: rows of 64
// 16-bit values (128 bytes), 8-row atoms 1,024 bytes apart, the atoms
// 1,024-byte aligned. Fields: start address >> 4 (bits 0-13), stride between
// 8-row atoms >> 4 (bits 32-45), layout 1 = 128-byte swizzle (bits 62-63);
// the leading offset is unused in this layout. A k-step 16 values further
// adds 32 bytes to the start address: the hardware applies the swizzle to
// the address it forms, as grouped_gemm.cuh's `swizzle` does to the chunk.
__device__ __forceinline__ unsigned long long b_descriptor(const void* smem) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  return static_cast<unsigned long long>((address & 0x3FFFFu) >> 4) |
         (static_cast<unsigned long long>(1024 >> 4) << 32) | (1ull << 62);
}

// d += a . b for the warpgroup's 64 rows and 64 columns of one k-step: a
// from registers (4 per thread), b by descriptor. d[4 j + 2 h + e] is row
// g + 8 h of this warp's 16, column 8 j + 2 t + e (mma.sync's layout, per n8).
template <typename T>
__device__ __forceinline__ void wgmma_m64n64k16(float (&d)[32], const unsigned (&a)[4],
                                                unsigned long long b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MOEFUSE_WGMMA_M64N64K16(TYPES)                                                          \
  asm volatile(                                                                                 \
      "{\n.reg .pred accumulate;\nsetp.ne.b32 accumulate, %37, 0;\n"                             \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPES                                       \
      " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, " \
      "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "                      \
      "{%32, %33, %34, %35}, %36, accumulate, 1, 1, 0;\n}\n"                                   \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),     \
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),              \
        "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]),           \
        "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),           \
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),           \
        "+f"(d[31])                                                                             \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "n"(1))
  if constexpr (same_type<T, __half>::value) {
    MOEFUSE_WGMMA_M64N64K16("f16.f16");
  } else {
    MOEFUSE_WGMMA_M64N64K16("bf16.bf16");
  }
#undef MOEFUSE_WGMMA_M64N64K16
#else
  __trap();  // tiles.py never picks a wgmma tiling below or above sm_90
#endif
}

// Keeps the compiler from moving accesses of the accumulators across the
// wgmma instructions that own them while they run (CUTLASS's
// warpgroup_fence_operand).
__device__ __forceinline__ void hold(float& v) {
  asm volatile("" : "+f"(v)::"memory");
}

// ---- mbarriers (the PRODUCER hand-over) -------------------------------------

__device__ __forceinline__ unsigned shared_address(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbarrier_init(unsigned long long* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(shared_address(bar)),
               "r"(count)
               : "memory");
}

// Arrives once this thread's cp.asyncs issued so far have landed (.noinc:
// the arrival is one of the barrier's expected count).
__device__ __forceinline__ void mbarrier_arrive_copies(unsigned long long* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(
                   shared_address(bar))
               : "memory");
}

__device__ __forceinline__ void mbarrier_arrive(unsigned long long* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(shared_address(bar))
               : "memory");
}

// The copying warpgroup's registers per thread, and the rest of a block's
// 64K (one block per SM) spread over the computing warpgroups, in setmaxnreg's
// units of 8 and up to its 256. A register file quarter (one SM
// sub-partition) then holds one copying warp and WARPS / 4 computing ones.
constexpr int COPY_REGISTERS = 72;

__host__ __device__ constexpr int compute_registers(int warps) {
  const int even = (65536 - 128 * COPY_REGISTERS) / (32 * warps) / 8 * 8;
  return even < 256 ? even : 256;
}

template <int REGISTERS>
__device__ __forceinline__ void registers_down() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGISTERS));
#endif
}

template <int REGISTERS>
__device__ __forceinline__ void registers_up() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGISTERS));
#endif
}

// Waits until the barrier's phase of this parity has completed (acquire):
// the n-th completion of a barrier ends phase n, of parity n % 2; a phase
// before the first (parity 1 at the start) counts as completed. TRAP (the
// copying warpgroup's waits): 2^26 tries (seconds: each may suspend the
// warp for a while; a k-tile takes microseconds) can only be a hand-over
// that never comes, and the wait traps, a launch error for the caller,
// rather than a GPU that never finishes.
template <bool TRAP = false>
__device__ __forceinline__ void mbarrier_wait(unsigned long long* bar, unsigned parity) {
  unsigned done = 0;
  for (int tries = 0; !done; ++tries) {
    asm volatile(
        "{\n.reg .pred complete;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 complete, [%1], %2;\n"
        "selp.u32 %0, 1, 0, complete;\n}\n"
        : "=r"(done)
        : "r"(shared_address(bar)), "r"(parity)
        : "memory");
    if (TRAP && !done && tries == (1 << 26)) {
      __trap();
    }
  }
}

// out = act(x @ W[e]^T + bias[e]) for the tiles of `tiles`, as grouped_gemm
// (same parameters and outputs). Block: WARPS warps (whole warpgroups), each
// MT = BN / (16 WARPS) m-tiles of 16 weight rows, and with PRODUCER one
// copying warpgroup after them; grid: tiles x column tiles; dynamic shared
// memory: tiles.py's Tiling.shared_bytes(), 1,024 bytes of it for alignment.
template <typename T, int MODE, int BITS, int GROUP, int K, int N, bool GATE_UP, int ACT,
          int ACT_P, int ACT_Q, int TOP_K, int BM, int BN, int WARPS, int STAGES, bool OVERLAP,
          bool PRODUCER, typename S>
__device__ void grouped_wgmma(const T* x, const unsigned* w, const S* scales, const S* biases,
                              const T* bias, const float* global_scale, const unsigned* order,
                              const int* tiles, T* out) {
  constexpr int BK = GEMM_BK;
  constexpr int THREADS = 32 * WARPS;
  constexpr int MT = BN / (16 * WARPS);              // m-tiles of 16 weight rows per warp
  constexpr int REPS = BM / 64;                      // wgmma n64 per m-tile and k-step
  constexpr int ROWS = GATE_UP ? 2 * N : N;          // weight rows per expert
  constexpr int COLS = GATE_UP ? BN / 2 : BN;        // output columns per block
  constexpr int N_TILES = (N + COLS - 1) / COLS;
  constexpr int WORDS = K * BITS / 32;               // packed words per weight row
  constexpr int GROUPS = K / GROUP;
  constexpr int STAGE_WORDS = BK * BITS / 32;        // packed words per row and k-tile
  constexpr int B_CHUNKS = STAGE_WORDS / 4;          // 16-byte chunks per row and k-tile
  constexpr int Q_STAGE_CHUNKS = BN * B_CHUNKS;
  constexpr int KS_PER_CHUNK = (BK / 16) / B_CHUNKS;  // k-steps per packed chunk
  constexpr int G_T = BK / GROUP > 0 ? BK / GROUP : 1;  // scale groups per row and k-tile
  constexpr int KT = (K + BK - 1) / BK;
  // Copies run LEAD k-tiles ahead. With OVERLAP a k-tile's wgmmas still run
  // while the next k-tile starts (its barrier, copies, first fragments), so
  // the stage they read is refilled one k-tile later.
  // (PRODUCER: as far ahead as the released stages allow, the same bound.)
  constexpr int LEAD = STAGES - 1 - (OVERLAP ? 1 : 0);
  constexpr int COPIERS = PRODUCER ? 128 : THREADS;  // the threads that copy
  constexpr int A_ITERS = (BM * 8 + COPIERS - 1) / COPIERS;
  constexpr int B_ITERS = (Q_STAGE_CHUNKS + COPIERS - 1) / COPIERS;
  using Scale = GroupScale<T, MODE>;
  static_assert(BITS == 4 || BITS == 8, "wgmma path: 4- and 8-bit codes");
  static_assert(BM % 64 == 0 && BM <= 256 && WARPS % 4 == 0, "warpgroups, n64 wgmmas");
  static_assert(MT >= 1 && MT * 16 * WARPS == BN, "whole m-tiles per warp");
  static_assert(LEAD >= 2, "the loop waits for the stage after the one it computes");
  static_assert(K % 32 == 0 && GROUP % 16 == 0, "k tails are whole 32-value chunks");

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;  // fragment coordinates
  const int tile_id = blockIdx.x / N_TILES, n_tile = blockIdx.x % N_TILES;
  const int4 tile = reinterpret_cast<const int4*>(tiles)[tile_id];
  if (tile.x < 0) {
    return;  // the schedule's upper bound left this one empty
  }
  const int expert = tile.x, row0 = tile.y, rows = tile.z - tile.y;
  const float global = MODE == NVFP4 ? global_factor(global_scale, expert) : 1.f;

  // wgmma reads 1,024-byte swizzle atoms: the stages start on such a boundary.
  extern __shared__ uint4 smem[];
  const unsigned base = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const unsigned skip = (1024u - (base & 1023u)) & 1023u;
  uint4* x_smem = smem + skip / 16;                  // STAGES x BM x 8 chunks
  uint4* q_smem = x_smem + STAGES * BM * 8;          // STAGES x BN x B_CHUNKS chunks
  // PRODUCER: STAGES `full` then STAGES `empty` barriers
  auto* full = reinterpret_cast<unsigned long long*>(q_smem + STAGES * Q_STAGE_CHUNKS);
  auto* empty = full + STAGES;

  // The expert's weight row behind row r of the block's packed tile (gate_up:
  // the first BN/2 are gate rows, the rest the up rows of the same columns),
  // and whether it exists (columns past N read row 0, as zeros).
  auto weight_row = [&](int r, bool& exists) -> unsigned {
    const int upper = GATE_UP && r >= BN / 2;
    const int n = n_tile * COLS + r - (upper ? BN / 2 : 0);
    exists = n < N;
    return static_cast<unsigned>(expert * ROWS + (exists ? n + (upper ? N : 0) : 0));
  };

  // Where this thread's copies come from (fixed for the block; planned by
  // the threads that copy: all, or the PRODUCER warpgroup's).
  const int copier = PRODUCER ? tid - THREADS : tid;
  unsigned x_src[A_ITERS];  // offsets into x
  bool x_ok[A_ITERS];
  const int x_chunk = copier % 8;
  unsigned q_src[B_ITERS];  // offsets into w, in words (grouped.py: below 2^32)
  bool q_ok[B_ITERS];
  auto plan_copies = [&]() {
#pragma unroll
    for (int j = 0; j < A_ITERS; ++j) {
      const int r = (copier + j * COPIERS) / 8;
      x_ok[j] = r < BM && r < rows;
      const int src = !x_ok[j] ? 0 : GATE_UP ? order[row0 + r] / TOP_K : row0 + r;
      x_src[j] = static_cast<unsigned>(src) * K + x_chunk * 8;
    }
#pragma unroll
    for (int j = 0; j < B_ITERS; ++j) {
      const int i = copier + j * COPIERS;
      const unsigned row = weight_row(i / B_CHUNKS, q_ok[j]);
      q_ok[j] = q_ok[j] && i < Q_STAGE_CHUNKS;
      q_src[j] = row * WORDS + (i % B_CHUNKS) * 4;
    }
  };
  if constexpr (!PRODUCER) {
    plan_copies();
  }

  auto fetch = [&](int kt) {
    if (kt < KT) {
      uint4* x_stage = x_smem + (kt % STAGES) * BM * 8;
      const bool x_k = kt * BK + x_chunk * 8 < K;
#pragma unroll
      for (int j = 0; j < A_ITERS; ++j) {
        const int r = (copier + j * COPIERS) / 8;
        if (r < BM) {
          const bool ok = x_ok[j] && x_k;
          cp_async_16(x_stage + swizzle(r, x_chunk), ok ? x + x_src[j] + kt * BK : x, ok);
        }
      }
      uint4* q_stage = q_smem + (kt % STAGES) * Q_STAGE_CHUNKS;
#pragma unroll
      for (int j = 0; j < B_ITERS; ++j) {
        const int i = copier + j * COPIERS;
        if (i < Q_STAGE_CHUNKS) {
          const bool ok = q_ok[j] && kt * BK + (i % B_CHUNKS) * (BK / B_CHUNKS) < K;
          cp_async_16<256>(q_stage + q_swizzle<B_CHUNKS>(i / B_CHUNKS, i % B_CHUNKS),
                           ok ? w + q_src[j] + kt * STAGE_WORDS : w, ok);
        }
      }
    }
    cp_async_commit();  // empty groups too: the wait counts stay uniform
  };

  // This thread's weight rows of the packed tile: rows g and g + 8 of m-tile
  // mt, its 16-row unit u = warp + WARPS mt (gate_up: the gate and the up row
  // of column 8 u + g; down: columns 16 u + g and 16 u + 8 + g).
  auto unit_of = [&](int mt) { return warp + WARPS * mt; };
  int tile_rows[MT][2];
  unsigned s_idx[MT][2];
  bool s_ok[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int u = unit_of(mt);
    tile_rows[mt][0] = GATE_UP ? 8 * u + g : 16 * u + g;
    tile_rows[mt][1] = GATE_UP ? BN / 2 + 8 * u + g : 16 * u + 8 + g;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      s_idx[mt][h] = weight_row(tile_rows[mt][h], s_ok[mt][h]) * GROUPS;
    }
  }
  // Their scales, SCALE_RING k-tiles ahead. Affine: {scale, bias} per group.
  // The float formats: a k-tile's G_T (at most 4) scale bytes of a row in
  // one register, lowest first, read where used (G_T floats per row would
  // spill nvfp4's 32-row-per-warp tiles). A missing group holds byte 0: its
  // codes were copied as zeros, so any scale gives the same zero products.
  constexpr bool BYTES = MODE != AFFINE;
  static_assert(!BYTES || G_T <= 4, "a k-tile's scale bytes fit one register");
  using Held = typename pick_type<BYTES, unsigned, Scale>::type;
  Held sb[SCALE_RING][MT][2][BYTES ? 1 : G_T];
  auto fetch_scales = [&](int kt, int slot) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int gi = 0; gi < G_T; ++gi) {
          const int k = kt * BK + gi * (BK / G_T);
          const bool ok = s_ok[mt][h] && kt < KT && k < K;
          if constexpr (BYTES) {
            const unsigned byte = ok ? static_cast<unsigned>(scales[s_idx[mt][h] + k / GROUP]) : 0u;
            sb[slot][mt][h][0] = (gi ? sb[slot][mt][h][0] : 0u) | byte << (8 * gi);
          } else {
            sb[slot][mt][h][gi] =
                ok ? group_scale<T, MODE>(scales, biases, s_idx[mt][h] + k / GROUP, global)
                   : zero_scale<T, MODE>();
          }
        }
      }
    }
  };
  auto scale_of = [&](int slot, int mt, int h, int gi) -> Scale {
    if constexpr (BYTES) {
      return byte_scale<MODE>((sb[slot][mt][h][0] >> (8 * gi)) & 0xFFu, global);
    } else {
      return sb[slot][mt][h][gi];
    }
  };

  // The A fragment of k-step ks of a packed stage (grouped_gemm.cuh's B_REGS
  // fragments, one per row): 4-bit, pair t of words 2 ks and 2 ks + 1 of the
  // k-step's chunk; 8-bit, pair t % 2 of words t / 2 and 2 + t / 2.
  auto fragment = [&](const unsigned* q_stage, int ks, int slot, int mt, unsigned (&a)[4]) {
    const int c = ks / KS_PER_CHUNK, kk = ks % KS_PER_CHUNK;
    const int gi = ks * 16 / (BK / G_T);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const Scale s = scale_of(slot, mt, h, gi);
      const unsigned* q = q_stage + 4 * q_swizzle<B_CHUNKS>(tile_rows[mt][h], c);
      if constexpr (BITS == 4) {
        const uint2 words = *reinterpret_cast<const uint2*>(q + 2 * kk);
        a[h] = dequant_pair_any<T, MODE, BITS>(words.x, t, s);
        a[2 + h] = dequant_pair_any<T, MODE, BITS>(words.y, t, s);
      } else {
        a[h] = dequant_pair_any<T, MODE, BITS>(q[t >> 1], t & 1, s);
        a[2 + h] = dequant_pair_any<T, MODE, BITS>(q[2 + (t >> 1)], t & 1, s);
      }
    }
  };

  float acc[MT][REPS][32];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int r = 0; r < REPS; ++r) {
#pragma unroll
      for (int e = 0; e < 32; ++e) {
        acc[mt][r][e] = 0.f;
      }
    }
  }

  // One k-tile: each k-step's fragment is dequantized while the previous
  // k-step's wgmmas run (one commit group per k-step). At its end the
  // previous k-tile's wgmmas are done (OVERLAP), or its own.
  auto mma_ktile = [&](int kt, int slot) {
    const uint4* x_stage = x_smem + (kt % STAGES) * BM * 8;
    const unsigned* q_stage =
        reinterpret_cast<const unsigned*>(q_smem + (kt % STAGES) * Q_STAGE_CHUNKS);
    unsigned a[BK / 16][MT][4];
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        fragment(q_stage, ks, slot, mt, a[ks][mt]);
      }
      wgmma_fence();
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int r = 0; r < REPS; ++r) {
          // rows 64 r of the x tile, 16 values (32 bytes) into the k-tile;
          // none there (a tile's last rows): nothing to multiply or store
          if (r == 0 || 64 * r < rows) {
            wgmma_m64n64k16<T>(acc[mt][r], a[ks][mt],
                               b_descriptor(x_stage + r * 64 * 8) + 2 * ks);
          }
        }
      }
      wgmma_commit();
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int r = 0; r < REPS; ++r) {
#pragma unroll
        for (int e = 0; e < 32; ++e) {
          hold(acc[mt][r][e]);
        }
      }
    }
    wgmma_wait<OVERLAP ? BK / 16 : 0>();
  };

  if constexpr (PRODUCER) {
    if (tid == 0) {
#pragma unroll
      for (int s = 0; s < STAGES; ++s) {
        mbarrier_init(&full[s], 128);      // the copying warpgroup's threads
        mbarrier_init(&empty[s], WARPS);   // one arrival per computing warp
      }
    }
    __syncthreads();  // the barriers are initialized; the block's last barrier
    if (warp >= WARPS) {
      // The copying warpgroup: stage kt % STAGES once the wgmmas of the
      // k-tile STAGES before it are done, then arrive when the copies land.
      registers_down<COPY_REGISTERS>();
      plan_copies();
      for (int kt = 0; kt < KT; ++kt) {
        const int stage = kt % STAGES;
        if (kt >= STAGES) {
          mbarrier_wait<true>(&empty[stage], (kt / STAGES - 1) & 1);
        }
        fetch(kt);
        mbarrier_arrive_copies(&full[stage]);
      }
      // Stay until the computing warpgroups release their last stage: should
      // they wait for a hand-over that never comes, this wait traps.
      const int last = OVERLAP ? KT - 2 : KT - 1;
      if (last >= 0) {
        mbarrier_wait<true>(&empty[last % STAGES], (last / STAGES) & 1);
      }
      return;
    }
    registers_up<compute_registers(WARPS)>();
  } else {
#pragma unroll
    for (int s = 0; s < LEAD; ++s) {
      fetch(s);
    }
  }
#pragma unroll
  for (int s = 0; s < SCALE_RING; ++s) {
    fetch_scales(s, s);
  }
  for (int kt0 = 0; kt0 < KT; kt0 += SCALE_RING) {
#pragma unroll
    for (int u = 0; u < SCALE_RING; ++u) {
      const int kt = kt0 + u;
      if (kt < KT) {
        if constexpr (PRODUCER) {
          mbarrier_wait(&full[kt % STAGES], (kt / STAGES) & 1);  // k-tile kt landed
          fence_proxy_async();  // the copies are visible to wgmma
          mma_ktile(kt, u);
          // Release the stage whose wgmmas mma_ktile waited for (OVERLAP:
          // the previous k-tile's), once every lane's reads of it are done.
          const int done = OVERLAP ? kt - 1 : kt;
          if (done >= 0) {
            fence_proxy_async();
            __syncwarp();
            if (lane == 0) {
              mbarrier_arrive(&empty[done % STAGES]);
            }
          }
        } else {
          cp_async_wait<LEAD - 1>();  // this thread's copies of k-tile kt have landed
          fence_proxy_async();        // and are visible to wgmma
          __syncthreads();            // every thread's; the wgmmas of k-tile
                                      // kt + LEAD - STAGES are done
          fetch(kt + LEAD);           // into the stage that k-tile used
          mma_ktile(kt, u);
        }
        fetch_scales(kt + SCALE_RING, u);  // the slot tile kt used
      }
    }
  }
  wgmma_wait<0>();

  // Epilogue: acc[mt][r][4 j + 2 h + e] is weight row tile_rows[mt][h] and
  // x row 64 r + 8 j + 2 t + e of the tile; `store` writes one x row's pair.
  const size_t bias_row = (size_t)expert * ROWS;
  auto store = [&](int mt, int row, float lo, float hi) {
    const int s = row0 + row;
    // Rounded where the gather_qmm path rounds (common.cuh: with_bias).
    if constexpr (GATE_UP) {
      const int n = n_tile * COLS + 8 * unit_of(mt) + g;
      if (n >= N) {
        return;
      }
      const float gate = with_bias<T>(lo, bias, bias_row + n);
      const float up = with_bias<T>(hi, bias, bias_row + N + n);
      if constexpr (ACT == NONE) {
        out[(size_t)s * 2 * N + n] = static_cast<T>(gate);
        out[(size_t)s * 2 * N + N + n] = static_cast<T>(up);
      } else {
        out[(size_t)s * N + n] = static_cast<T>(activate<T, ACT, ACT_P, ACT_Q>(gate, up));
      }
    } else {
      const int n = n_tile * COLS + 16 * unit_of(mt) + g;
      T* dst = out + (size_t)order[s] * N;
      if (n < N) {
        dst[n] = static_cast<T>(with_bias<T>(lo, bias, bias_row + n));
      }
      if (n + 8 < N) {
        dst[n + 8] = static_cast<T>(with_bias<T>(hi, bias, bias_row + n + 8));
      }
    }
  };
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int r = 0; r < REPS; ++r) {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int row = 64 * r + 8 * j + 2 * t + e;
          if (row < rows) {
            store(mt, row, acc[mt][r][4 * j + e], acc[mt][r][4 * j + 2 + e]);
          }
        }
      }
    }
  }
}

}  // namespace moefuse
