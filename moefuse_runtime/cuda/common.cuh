// What the decode (gemv.cuh) and tensor-core (grouped_gemm.cuh) kernels
// share: 16-byte asynchronous copies, the tensor-core instructions, warp
// sums, the weight formats (packed affine, mxfp4, nvfp4, mxfp8) and the
// gated activations of the epilogues.
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

// 4 or 8 bytes, as cp_async_16 with the L2's 256-byte prefetch (through L1:
// .cg copies only 16): the wordwise packed rows (Packing) whose k-tiles are
// not 16-byte aligned.
template <int BYTES>
__device__ __forceinline__ void cp_async_small(void* smem, const void* gmem, bool valid) {
  static_assert(BYTES == 4 || BYTES == 8, "cp.async.ca copies 4, 8 or 16 bytes");
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global.L2::256B [%0], [%1], %2, %3;\n" ::"r"(dst), "l"(gmem),
               "n"(BYTES), "r"(valid ? BYTES : 0));
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

// ---- packing ----------------------------------------------------------------
//
// Codes are packed along the input axis, lowest bits first, as one bit
// stream per row (MLX). 4- and 8-bit codes never cross a 32-bit word and a
// 16-byte load holds whole codes: the kernels read units of 4 words. 2, 3, 5
// and 6 bits are read "wordwise": units of 32 values, BITS words (3- and
// 5-bit codes cross word boundaries), each code cut out by a funnel shift.
template <int BITS>
struct Packing {
  static constexpr bool WORDWISE = BITS != 4 && BITS != 8;
  static constexpr int UNIT_WORDS = WORDWISE ? BITS : 4;  // words read as one unit
  static constexpr int UNIT_VALS = UNIT_WORDS * 32 / BITS;  // codes per unit
};

// Code v of a run of packed words (v is a constant once loops unroll, and
// so is the shift; a code that crosses into words[lo + 1] takes one
// funnel shift).
template <int BITS>
__device__ __forceinline__ unsigned code_at(const unsigned* words, int v) {
  constexpr unsigned MASK = (1u << BITS) - 1u;
  const int bit = v * BITS, lo = bit / 32, shift = bit % 32;
  if (shift + BITS <= 32) {
    return (words[lo] >> shift) & MASK;
  }
  return __funnelshift_r(words[lo], words[lo + 1], shift) & MASK;
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

// 1024 (fp16) or 128 (bf16) in both halves of a T pair: its last unit is 1.
template <typename T>
constexpr unsigned MAGIC_PAIR = same_type<T, __half>::value ? 0x64006400u : 0x43004300u;

// A T pair `scale * q + bias` from magic_pair() + q in each half: the
// subtraction is exact, then one rounding, as MLX's dequantize.
template <typename T>
__device__ __forceinline__ unsigned from_magic(unsigned v, typename Pair<T>::type scale_bias) {
  using T2 = typename Pair<T>::type;
  unsigned magic_bits = MAGIC_PAIR<T>;
  const T2 magic = *reinterpret_cast<T2*>(&magic_bits);
  const T2 s = {scale_bias.x, scale_bias.x}, b = {scale_bias.y, scale_bias.y};
  const T2 w = __hfma2(__hsub2(*reinterpret_cast<T2*>(&v), magic), s, b);
  return *reinterpret_cast<const unsigned*>(&w);
}

// Two affine codes below 128 (2 to 6 bits) as a T pair `scale * q + bias`.
template <typename T>
__device__ __forceinline__ unsigned affine_pair(unsigned lo, unsigned hi,
                                                typename Pair<T>::type scale_bias) {
  return from_magic<T>(lo | (hi << 16) | MAGIC_PAIR<T>, scale_bias);
}

// Values 2p and 2p + 1 of a packed word (p: the pair within the word) as a
// T pair `scale * q + bias`, one rounding: what one thread holds of an mma B
// fragment. `scale_bias` packs the scale (low half) and the bias (high half).
template <typename T, int BITS>
__device__ __forceinline__ unsigned dequant_pair(unsigned q, int p,
                                                 typename Pair<T>::type scale_bias) {
  using T2 = typename Pair<T>::type;
  if constexpr (BITS == 4) {
    constexpr unsigned MAGIC = MAGIC_PAIR<T>;
    // byte p of q in the low half, byte p of q >> 4 in the high half
    const unsigned spread = __byte_perm(q, q >> 4, 0x0400u + 0x0101u * p);
    unsigned v;
    asm("lop3.b32 %0, %1, %2, %3, 0xea;\n" : "=r"(v) : "r"(spread), "r"(0x000f000fu), "r"(MAGIC));
    return from_magic<T>(v, scale_bias);
  } else {
    const float s = static_cast<float>(scale_bias.x), b = static_cast<float>(scale_bias.y);
    const float lo = __uint_as_float(__byte_perm(q, 0x4B000000u, 0x7540u + 2 * p)) - 8388608.f;
    const float hi = __uint_as_float(__byte_perm(q, 0x4B000000u, 0x7541u + 2 * p)) - 8388608.f;
    return pack2<T>(fmaf(lo, s, b), fmaf(hi, s, b));
  }
}

// ---- weight formats -----------------------------------------------------------
//
// MODE (MLX's quantization modes): AFFINE, `scale * q + bias` per group with
// scales and biases in the activation dtype; MXFP4 / MXFP8, E2M1 / E4M3 codes
// times a power-of-two E8M0 scale byte per 32 values; NVFP4, E2M1 codes times
// an E4M3 scale byte per 16 values, and optionally a per-expert float32
// global scale g (MLX: value * scale * g / (448 * 6)). Codes are packed
// along the input axis, lowest bits first, as for affine.
enum Mode { AFFINE = 0, MXFP4 = 1, NVFP4 = 2, MXFP8 = 3 };

template <bool C, typename A, typename B>
struct pick_type {
  using type = A;
};
template <typename A, typename B>
struct pick_type<false, A, B> {
  using type = B;
};

// Two float codes as an exact __half2, one in the low half and one in the
// high half: E2M1 codes in bits 0-3 and 16-19 of v, E4M3 bytes in bits 0-7
// and 16-23 (other bits ignored). Each code's sign goes to the half's sign
// bit and its exponent and mantissa bits into the half's, shifted so that
// the half reads 2^-14 (E2M1) or 2^-8 (E4M3) times the code's value, its
// subnormals included (a half's are exact); one HMUL2 scales both back.
// Four bit operations and a multiply per pair, against a table lookup and
// an fmaf per code. An E4M3 NaN byte (S.1111.111) reads as +-480, as e4m3()
// below reads it: quantized weights hold none.
__device__ __forceinline__ __half2 e2m1_pair(unsigned v) {
  const unsigned bits = ((v << 12) & 0x80008000u) | ((v << 9) & 0x0E000E00u);
  return __hmul2(*reinterpret_cast<const __half2*>(&bits), __half2half2(__ushort_as_half(0x7400)));
}

__device__ __forceinline__ __half2 e4m3_pair(unsigned v) {
  const unsigned bits = ((v << 8) & 0x80008000u) | ((v << 7) & 0x3F803F80u);
  return __hmul2(*reinterpret_cast<const __half2*>(&bits), __half2half2(__ushort_as_half(0x5C00)));
}

// The value of an E4M3 byte (bias 7; exponent 0: subnormals m / 8 * 2^-6).
__device__ __forceinline__ float e4m3(unsigned c) {
  const unsigned e = (c >> 3) & 15u, m = c & 7u;
  const float magnitude =
      e ? __uint_as_float(((e + 120u) << 23) | (m << 20)) : static_cast<float>(m) * 0.001953125f;
  return (c & 0x80u) ? -magnitude : magnitude;
}

// The value of an E8M0 scale byte: 2^(s - 127) (0: 2^-127, a subnormal).
__device__ __forceinline__ float e8m0(unsigned s) {
  return __uint_as_float(s ? (s & 0xFFu) << 23 : 0x00400000u);
}

// The scale a float format's scale byte c stands for (NVFP4: times the
// expert's global factor).
template <int MODE>
__device__ __forceinline__ float byte_scale(unsigned c, float global) {
  return MODE == NVFP4 ? e4m3(c) * global : e8m0(c);
}

// What a kernel holds per scale group: affine, {scale, bias} as a T pair;
// the float formats, the scale as a float (the global scale folded in).
template <typename T, int MODE>
using GroupScale = typename pick_type<MODE == AFFINE, typename Pair<T>::type, float>::type;

template <typename T, int MODE, typename S>
__device__ __forceinline__ GroupScale<T, MODE> group_scale(const S* scales, const S* biases,
                                                           unsigned i, float global) {
  if constexpr (MODE == AFFINE) {
    return {scales[i], biases[i]};
  } else {
    return byte_scale<MODE>(scales[i], global);
  }
}

template <typename T, int MODE>
__device__ __forceinline__ GroupScale<T, MODE> zero_scale() {
  if constexpr (MODE == AFFINE) {
    const T zero = static_cast<T>(0.f);
    return {zero, zero};
  } else {
    return 0.f;
  }
}

// The per-expert factor of nvfp4's optional global scale (1 without one).
__device__ __forceinline__ float global_factor(const float* global_scale, unsigned expert) {
  return global_scale ? global_scale[expert] * (1.f / (448.f * 6.f)) : 1.f;
}

// Values 2p and 2p + 1 of a packed word as a T pair, in any format.
template <typename T, int MODE, int BITS>
__device__ __forceinline__ unsigned dequant_pair_any(unsigned q, int p,
                                                     GroupScale<T, MODE> scale) {
  if constexpr (MODE == AFFINE) {
    return dequant_pair<T, BITS>(q, p, scale);
  } else {
    // nibble 2p (byte p) or byte 2p of q in the low half, 2p + 1 in the high
    const float2 w = __half22float2(
        BITS == 4 ? e2m1_pair(__byte_perm(q, q >> 4, 0x0400u + 0x0101u * p))
                  : e4m3_pair(__byte_perm(q, 0u, 0x0100u + 0x0202u * p)));
    return pack2<T>(w.x * scale, w.y * scale);
  }
}

// ---- gated activations ---------------------------------------------------------
//
// act(gate, up) of the SwitchGLU activations the epilogues know, with up to
// two float parameters P and Q passed as their bit patterns (template
// constants): cuda/activations.py maps each module class to one of these
// and states its math. gate and up arrive rounded to T, as the matmul
// outputs the module sees. NONE: the kernel writes gate and up and MLX runs
// the activation.
enum Act {
  NONE = 0,
  SWIGLU = 1,       // silu(g) * u, silu rounded to T (mlx-lm's SwiGLU)
  SWIGLU_F32 = 2,   // silu(g) * u in fp32 (PreciseSwiGLU)
  LIMITED = 3,      // silu(min(g, P)) * clip(u, -P, P); P = 0: no limit
  CLAMPED = 4,      // min(silu(g), P) * clip(u, -P, P) (step3p5)
  OAI = 5,          // (clip(u, -P, P) + 1) * g' * sigmoid(Q g'), g' = min(g, P)
  GELU_TANH = 6,    // gelu_approx(g) * u (GeGLU)
  SITU = 7,         // P tanh(g / P) sigmoid(g) * (Q ? Q tanh(u / Q) : u)
};

__device__ __forceinline__ float sigmoid(float v) {
  return 1.f / (1.f + __expf(-v));
}

template <typename T, int ACT, int P, int Q>
__device__ __forceinline__ float activate(float g, float u) {
  const float p = __int_as_float(P), q = __int_as_float(Q);
  if constexpr (ACT == SWIGLU) {  // the expression of the kernels before the table
    return static_cast<float>(static_cast<T>(g / (1.f + __expf(-g)))) * u;
  } else if constexpr (ACT == SWIGLU_F32) {
    return g * sigmoid(g) * u;
  } else if constexpr (ACT == LIMITED) {
    if (p > 0.f) {
      g = fminf(g, p);
      u = fminf(fmaxf(u, -p), p);
    }
    return g * sigmoid(g) * u;
  } else if constexpr (ACT == CLAMPED) {
    return fminf(g * sigmoid(g), p) * fminf(fmaxf(u, -p), p);
  } else if constexpr (ACT == OAI) {
    g = fminf(g, p);
    return (fminf(fmaxf(u, -p), p) + 1.f) * (g * sigmoid(q * g));
  } else if constexpr (ACT == GELU_TANH) {
    return 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g))) * u;
  } else if constexpr (ACT == SITU) {
    return p * tanhf(g / p) * sigmoid(g) * (q > 0.f ? q * tanhf(u / q) : u);
  } else {
    static_assert(ACT == SWIGLU, "activate: an activation with no math (NONE is not one)");
    return 0.f;
  }
}

// A matmul output as the module sees it: rounded to T, plus the projection's
// bias (if any) with one more rounding, as `x + bias[indices]` in T.
template <typename T>
__device__ __forceinline__ float with_bias(float acc, const T* bias, size_t i) {
  const float v = static_cast<float>(static_cast<T>(acc));
  return bias ? static_cast<float>(static_cast<T>(v + static_cast<float>(bias[i]))) : v;
}

}  // namespace moefuse
