// What the decode (gemv.cuh) and tensor-core (grouped_gemm.cuh) kernels
// share: 16-byte asynchronous copies, the tensor-core instructions, warp
// sums and the dequantization of packed affine weights.
//
// MLX compiles these with NVRTC inside `mx.fast.cuda_kernel` (after its own
// mlx/backend/cuda/device/utils.cuh, which brings __nv_bfloat16 and __half);
// moefuse_runtime/cuda/source.py inlines the local #includes.
#pragma once

namespace moefuse {

// std::is_same, which NVRTC's headers here do not bring.
template <typename A, typename B>
struct same_type {
  static constexpr bool value = false;
};
template <typename A>
struct same_type<A, A> {
  static constexpr bool value = true;
};

// ---- copies ---------------------------------------------------------------

// 16 bytes from global to shared memory, asynchronously; zeros when !valid
// (the source is then not read, but must still be a mapped address).
// L2_PREFETCH (128 or 256): the L2 also fetches the aligned 128 or 256 bytes
// around the 16, for a row read a few 16-byte pieces at a time: DRAM then
// serves whole lines instead of one 32-byte sector per request.
template <int L2_PREFETCH = 0>
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  static_assert(L2_PREFETCH == 0 || L2_PREFETCH == 128 || L2_PREFETCH == 256, "L2 prefetch size");
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;
  if constexpr (L2_PREFETCH == 128) {
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(dst),
                 "l"(gmem), "r"(bytes));
  } else if constexpr (L2_PREFETCH == 256) {
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(dst),
                 "l"(gmem), "r"(bytes));
  } else {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
                 "r"(bytes));
  }
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::);
}

template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
}

// ---- tensor cores (sm_80 and newer) ----------------------------------------

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* smem) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a * b for one 16x8x16 tile, fp32 accumulation; T is bf16 or fp16.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                          unsigned b1) {
  if constexpr (same_type<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// ---- reductions -------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// ---- dequantization ---------------------------------------------------------

// Two T values packed in 32 bits, as the tensor cores take them.
template <typename T>
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
  T pair[2] = {static_cast<T>(lo), static_cast<T>(hi)};
  return *reinterpret_cast<unsigned*>(pair);
}

// One packed 32-bit word of affine BITS-bit weights (values along the input
// axis, lowest bits first, as MLX packs them) to T pairs `scale * q + bias`
// with one rounding, as MLX dequantizes. 4 bits: 8 values -> 4 pairs;
// 8 bits: 4 values -> 2 pairs.
//
// 4-bit: each nibble pair is moved into the low 4 bits of the two halves
// (PRMT) and OR-ed into a float16/bfloat16 "magic" number whose last unit
// is 1 (LOP3): 1024 + q (fp16) or 128 + q (bf16), exact; subtracting the
// magic number is exact too, then one FMA applies scale and bias.
// 8-bit: bf16 holds no 128 + q for q >= 128, so bytes go through fp32
// (2^23 + q, exact) and one fp32 FMA, rounded once to T.
template <typename T>
struct Pair;
template <>
struct Pair<__half> {
  using type = __half2;
};
template <>
struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
};

// Values 2p and 2p + 1 of a packed word (p: the pair within the word) as a
// T pair `scale * q + bias`, one rounding: what one thread holds of an mma B
// fragment. `scale_bias` packs the scale (low half) and the bias (high half).
template <typename T, int BITS>
__device__ __forceinline__ unsigned dequant_pair(unsigned q, int p,
                                                 typename Pair<T>::type scale_bias) {
  using T2 = typename Pair<T>::type;
  if constexpr (BITS == 4) {
    constexpr bool FP16 = same_type<T, __half>::value;
    constexpr unsigned MAGIC = FP16 ? 0x64006400u : 0x43004300u;
    // byte p of q in the low half, byte p of q >> 4 in the high half
    const unsigned spread = __byte_perm(q, q >> 4, 0x0400u + 0x0101u * p);
    unsigned v;
    asm("lop3.b32 %0, %1, %2, %3, 0xea;\n" : "=r"(v) : "r"(spread), "r"(0x000f000fu), "r"(MAGIC));
    unsigned magic_bits = MAGIC;
    const T2 magic = *reinterpret_cast<T2*>(&magic_bits);
    const T2 s = {scale_bias.x, scale_bias.x}, b = {scale_bias.y, scale_bias.y};
    // (magic + q) - magic is exact; then one rounding, as MLX's dequantize
    const T2 w = __hfma2(__hsub2(*reinterpret_cast<T2*>(&v), magic), s, b);
    return *reinterpret_cast<const unsigned*>(&w);
  } else {
    const float s = static_cast<float>(scale_bias.x), b = static_cast<float>(scale_bias.y);
    const float lo = __uint_as_float(__byte_perm(q, 0x4B000000u, 0x7540u + 2 * p)) - 8388608.f;
    const float hi = __uint_as_float(__byte_perm(q, 0x4B000000u, 0x7541u + 2 * p)) - 8388608.f;
    return pack2<T>(fmaf(lo, s, b), fmaf(hi, s, b));
  }
}

// A whole packed word: 4 pairs (4-bit) or 2 (8-bit), in order.
template <typename T, int BITS>
__device__ __forceinline__ void dequant_word(unsigned q, T scale, T bias,
                                             unsigned (&out)[BITS == 4 ? 4 : 2]) {
  const typename Pair<T>::type scale_bias = {scale, bias};
#pragma unroll
  for (int p = 0; p < (BITS == 4 ? 4 : 2); ++p) {
    out[p] = dequant_pair<T, BITS>(q, p, scale_bias);
  }
}

}  // namespace moefuse
