// int8_linear with AVX-512 (F/BW/VL) + VNNI: the "avx512_vnni" ISA.
//
// W8A8: vpdpbusd multiplies unsigned by signed bytes, so activations are stored shifted to u8
// (q + 128, in 1..255) and the shift is removed exactly per group with the weights' byte sums:
//   sum (q + 128) * w = sum q * w + 128 * sum w
// The weight sum costs one more vpdpbusd (ones x w) per weight vector, shared by the MB rows of a
// tile. Lanes wrap modulo 2^32 and the subtraction unwraps them, so every lane is the exact int32
// partial dot product (|lane| <= 127 * 128 * G / 16).
// W8A16: weights sign-extended to int32 and converted to fp32, multiplied into fp32 lane sums.
// Scales: per channel, the lanes are summed once (W8A8: in int32, exact) and scaled; per group, the
// scale is applied lane-wise at each group end (acc_f += float(acc_g) * scale_g) and the 16 lanes
// are summed once per output; W8A8 groups of 4..32 bytes get a path of their own (see below).
#pragma once

// GCC 12 warns that the intrinsics' own _mm*_undefined_*() placeholders "may be used
// uninitialized" wherever they are inlined; the warning is located in the intrinsic headers.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cstdint>

#include "llmkern/cpu/int8_linear_common.h"
#include "llmkern/cpu/int8_linear_scalar.h"

#define LLMKERN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#define LLMKERN_AVX512_INLINE LLMKERN_AVX512 inline __attribute__((always_inline))

namespace llmkern {
namespace cpu {
namespace avx512 {

// 16 activations from k (mask selects the valid ones, the rest read as 0) as fp32.
LLMKERN_AVX512_INLINE __m512 load16(const void* x, DType dt, int64_t k, __mmask16 mask) {
  if (dt == DType::kF32) return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(x) + k);
  const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(x) + k);
  if (dt == DType::kF16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));  // bf16: exact
}

LLMKERN_AVX512_INLINE __mmask16 tail16(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }
LLMKERN_AVX512_INLINE __mmask64 tail64(int64_t n) { return n >= 64 ? ~__mmask64(0) : (__mmask64(1) << n) - 1; }

LLMKERN_AVX512_INLINE int32_t hsum_epi32(__m512i v) {
  __m256i s = _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
  __m128i r = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  r = _mm_add_epi32(r, _mm_shuffle_epi32(r, _MM_SHUFFLE(1, 0, 3, 2)));
  r = _mm_add_epi32(r, _mm_shuffle_epi32(r, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(r);
}

LLMKERN_AVX512 inline void row_to_f32(const void* x, DType dt, int64_t K, float* out) {
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? __mmask16(0xffff) : tail16(K - k);
    _mm512_mask_storeu_ps(out + k, m, load16(x, dt, k, m));
  }
}

// The rule of int8_linear_common.h, vectorized; q stored as u8 = q + 128 for vpdpbusd.
// cvtps2dq rounds half to even in the default MXCSR mode, like the scalar path.
LLMKERN_AVX512 inline void quantize_row(const void* x, DType dt, int64_t K, void* q_out, float* scale) {
  uint8_t* q = static_cast<uint8_t*>(q_out);
  __m512 amax = _mm512_setzero_ps();
  __mmask16 bad = 0;
  const __m512 big = _mm512_set1_ps(FLT_MAX);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? __mmask16(0xffff) : tail16(K - k);
    const __m512 a = _mm512_abs_ps(load16(x, dt, k, m));
    bad |= _mm512_cmp_ps_mask(a, big, _CMP_NLE_UQ);  // NaN or inf
    amax = _mm512_max_ps(amax, a);
  }
  const RowQuant p = row_quant_params(_mm512_reduce_max_ps(amax), bad != 0);
  *scale = p.scale;
  if (p.saturate) return scalar::quantize_values(x, dt, K, p, 128, q);  // rows of magnitude < 3e-37
  const __m512 inv = _mm512_set1_ps(p.inv);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127), off = _mm512_set1_epi32(128);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? __mmask16(0xffff) : tail16(K - k);
    __m512i qi = _mm512_setzero_si512();
    if (!p.zero) {
      const __m512 v = _mm512_mul_ps(load16(x, dt, k, m), inv);
      qi = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(v), lo), hi);
    }
    _mm512_mask_cvtepi32_storeu_epi8(q + k, m, _mm512_add_epi32(qi, off));
  }
}

// ------------------------------------------------------------------------------------- W8A16
// Each layout (per channel / per group) is its own function with accumulators local to it: that,
// and LLMKERN_UNROLL, is what keeps GCC 12 from spilling the accumulator arrays to the stack.

// acc[i][j] = lane sums of x[i][k] * w[j][k] over k in [k0, k1).
template <int MB, int NB>
LLMKERN_AVX512_INLINE void w8a16_range(__m512 (&acc)[MB][NB], const float* const (&xr)[MB],
                                       const int8_t* const (&wr)[NB], int64_t k0, int64_t k1) {
  LLMKERN_UNROLL for (int i = 0; i < MB; ++i)
    LLMKERN_UNROLL for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = k0;
  for (; k + 16 <= k1; k += 16) {
    __m512 xv[MB];
    LLMKERN_UNROLL for (int i = 0; i < MB; ++i) xv[i] = _mm512_loadu_ps(xr[i] + k);
    LLMKERN_UNROLL for (int j = 0; j < NB; ++j) {
      const __m128i wb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[j] + k));
      const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(wb));
      LLMKERN_UNROLL for (int i = 0; i < MB; ++i) acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  if (k < k1) {  // masked tail: elements past k1 read as 0 on both sides
    const __mmask16 m = tail16(k1 - k);
    __m512 xv[MB];
    LLMKERN_UNROLL for (int i = 0; i < MB; ++i) xv[i] = _mm512_maskz_loadu_ps(m, xr[i] + k);
    LLMKERN_UNROLL for (int j = 0; j < NB; ++j) {
      const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, wr[j] + k)));
      LLMKERN_UNROLL for (int i = 0; i < MB; ++i) acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
}

template <int MB, int NB>
LLMKERN_AVX512 void tile_w8a16_channel(const Tile& t, const float* const (&xr)[MB], const int8_t* const (&wr)[NB]) {
  __m512 acc[MB][NB];
  w8a16_range<MB, NB>(acc, xr, wr, 0, t.K);
  LLMKERN_UNROLL for (int i = 0; i < MB; ++i)
    LLMKERN_UNROLL for (int j = 0; j < NB; ++j) t.res[i * kResStride + j] = _mm512_reduce_add_ps(acc[i][j]) * t.scale[j];
}

template <int MB, int NB>
LLMKERN_AVX512 void tile_w8a16_grouped(const Tile& t, const float* const (&xr)[MB], const int8_t* const (&wr)[NB]) {
  __m512 accf[MB][NB];
  LLMKERN_UNROLL for (int i = 0; i < MB; ++i)
    LLMKERN_UNROLL for (int j = 0; j < NB; ++j) accf[i][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < t.ngroups; ++g) {
    __m512 acc[MB][NB];
    w8a16_range<MB, NB>(acc, xr, wr, g * t.group, (g + 1) * t.group);
    LLMKERN_UNROLL for (int j = 0; j < NB; ++j) {
      const __m512 s = _mm512_set1_ps(t.scale[j * t.ngroups + g]);
      LLMKERN_UNROLL for (int i = 0; i < MB; ++i) accf[i][j] = _mm512_fmadd_ps(acc[i][j], s, accf[i][j]);
    }
  }
  LLMKERN_UNROLL for (int i = 0; i < MB; ++i)
    LLMKERN_UNROLL for (int j = 0; j < NB; ++j) t.res[i * kResStride + j] = _mm512_reduce_add_ps(accf[i][j]);
}

template <int MB, int NB>
LLMKERN_AVX512 void tile_w8a16(const Tile& t) {
  const float* xr[MB];
  const int8_t* wr[NB];
  for (int i = 0; i < MB; ++i) xr[i] = static_cast<const float*>(t.x[i]);
  for (int j = 0; j < NB; ++j) wr[j] = t.w + j * t.K;
  if (t.ngroups == 1) tile_w8a16_channel<MB, NB>(t, xr, wr);
  else tile_w8a16_grouped<MB, NB>(t, xr, wr);
}

// -------------------------------------------------------------------------------------- W8A8

// acc += vpdpbusd(a u8, b s8), in place. Written in asm because GCC 12 copies every accumulator of
// an unrolled tile to a fresh register around _mm512_dpbusd_epi32 (two extra moves per product).
LLMKERN_AVX512_INLINE void dpbusd(__m512i& acc, __m512i a, __m512i b) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
}

// acc[i][j] = exact int32 lane sums of q[i][k] * w[j][k] over k in [k0, k1) (shift removed).
template <int MB, int NB>
LLMKERN_AVX512_INLINE void w8a8_range(__m512i (&acc)[MB][NB], const uint8_t* const (&xr)[MB],
                                      const int8_t* const (&wr)[NB], int64_t k0, int64_t k1) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i ws[NB];
  LLMKERN_UNROLL for (int j = 0; j < NB; ++j) {
    ws[j] = _mm512_setzero_si512();
    LLMKERN_UNROLL for (int i = 0; i < MB; ++i) acc[i][j] = _mm512_setzero_si512();
  }
  int64_t k = k0;
  for (; k + 64 <= k1; k += 64) {
    __m512i xv[MB];
    LLMKERN_UNROLL for (int i = 0; i < MB; ++i) xv[i] = _mm512_loadu_si512(xr[i] + k);
    LLMKERN_UNROLL for (int j = 0; j < NB; ++j) {
      const __m512i wv = _mm512_loadu_si512(wr[j] + k);
      dpbusd(ws[j], ones, wv);
      LLMKERN_UNROLL for (int i = 0; i < MB; ++i) dpbusd(acc[i][j], xv[i], wv);
    }
  }
  if (k < k1) {  // masked tail: the bytes past k1 read as 0 on both sides
    const __mmask64 m = tail64(k1 - k);
    __m512i xv[MB];
    LLMKERN_UNROLL for (int i = 0; i < MB; ++i) xv[i] = _mm512_maskz_loadu_epi8(m, xr[i] + k);
    LLMKERN_UNROLL for (int j = 0; j < NB; ++j) {
      const __m512i wv = _mm512_maskz_loadu_epi8(m, wr[j] + k);
      dpbusd(ws[j], ones, wv);
      LLMKERN_UNROLL for (int i = 0; i < MB; ++i) dpbusd(acc[i][j], xv[i], wv);
    }
  }
  LLMKERN_UNROLL for (int j = 0; j < NB; ++j) {
    const __m512i shift = _mm512_slli_epi32(ws[j], 7);  // 128 * sum w, per lane
    LLMKERN_UNROLL for (int i = 0; i < MB; ++i) acc[i][j] = _mm512_sub_epi32(acc[i][j], shift);
  }
}

// Per-channel scales (one group): exact int32 row sums, one conversion to float.
template <int MB, int NB>
LLMKERN_AVX512 void tile_w8a8_channel(const Tile& t, const uint8_t* const (&xr)[MB], const int8_t* const (&wr)[NB]) {
  __m512i acc[MB][NB];
  w8a8_range<MB, NB>(acc, xr, wr, 0, t.K);
  LLMKERN_UNROLL for (int i = 0; i < MB; ++i)
    LLMKERN_UNROLL for (int j = 0; j < NB; ++j)
      t.res[i * kResStride + j] = static_cast<float>(hsum_epi32(acc[i][j])) * t.scale[j];
}

template <int MB, int NB>
LLMKERN_AVX512 void tile_w8a8_grouped(const Tile& t, const uint8_t* const (&xr)[MB], const int8_t* const (&wr)[NB]) {
  __m512 accf[MB][NB];
  LLMKERN_UNROLL for (int i = 0; i < MB; ++i)
    LLMKERN_UNROLL for (int j = 0; j < NB; ++j) accf[i][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < t.ngroups; ++g) {
    __m512i acc[MB][NB];
    w8a8_range<MB, NB>(acc, xr, wr, g * t.group, (g + 1) * t.group);
    LLMKERN_UNROLL for (int j = 0; j < NB; ++j) {
      const __m512 s = _mm512_set1_ps(t.scale[j * t.ngroups + g]);
      LLMKERN_UNROLL for (int i = 0; i < MB; ++i)
        accf[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][j]), s, accf[i][j]);
    }
  }
  LLMKERN_UNROLL for (int i = 0; i < MB; ++i)
    LLMKERN_UNROLL for (int j = 0; j < NB; ++j) t.res[i * kResStride + j] = _mm512_reduce_add_ps(accf[i][j]);
}

// Groups of 4, 8, 16 or 32 (GGUF Q8_0): one 64-byte step covers 64 / G whole groups and a 32-bit
// lane never straddles two groups, so each step is unshifted and rescaled lane-wise with a vector
// of each lane's group scale (instead of one half-empty masked step per group).
template <int MB, int NB>
LLMKERN_AVX512 void tile_w8a8_small_groups(const Tile& t, const uint8_t* const (&xr)[MB],
                                           const int8_t* const (&wr)[NB]) {
  const __m512i c128 = _mm512_set1_epi8(static_cast<char>(0x80));  // u8 128
  const int64_t G = t.group;
  // lane l (bytes 4l..4l+3 of a step) belongs to group l / (G / 4) of the step
  const __m512i lane_group = _mm512_srlv_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32(__builtin_ctzll(static_cast<uint64_t>(G / 4))));
  __m512 accf[MB][NB];
  LLMKERN_UNROLL for (int i = 0; i < MB; ++i)
    LLMKERN_UNROLL for (int j = 0; j < NB; ++j) accf[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < t.K; k += 64) {
    const int64_t n = t.K - k < 64 ? t.K - k : 64;  // bytes in this step, a multiple of G
    const __mmask64 m = tail64(n);
    const __mmask16 sm = tail16(n / G);
    __m512i xv[MB];
    LLMKERN_UNROLL for (int i = 0; i < MB; ++i) xv[i] = _mm512_maskz_loadu_epi8(m, xr[i] + k);
    LLMKERN_UNROLL for (int j = 0; j < NB; ++j) {
      const __m512i wv = _mm512_maskz_loadu_epi8(m, wr[j] + k);
      __m512i shift = _mm512_setzero_si512();
      dpbusd(shift, c128, wv);  // 128 * sum w, per lane
      const __m512i unshift = _mm512_sub_epi32(_mm512_setzero_si512(), shift);
      const __m512 s = _mm512_permutexvar_ps(lane_group, _mm512_maskz_loadu_ps(sm, t.scale + j * t.ngroups + k / G));
      LLMKERN_UNROLL for (int i = 0; i < MB; ++i) {
        __m512i a = unshift;  // start at -128 * sum w: the sum below is then exactly sum q * w
        dpbusd(a, xv[i], wv);
        accf[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), s, accf[i][j]);
      }
    }
  }
  LLMKERN_UNROLL for (int i = 0; i < MB; ++i)
    LLMKERN_UNROLL for (int j = 0; j < NB; ++j) t.res[i * kResStride + j] = _mm512_reduce_add_ps(accf[i][j]);
}

template <int MB, int NB>
LLMKERN_AVX512 void tile_w8a8(const Tile& t) {
  const uint8_t* xr[MB];
  const int8_t* wr[NB];
  for (int i = 0; i < MB; ++i) xr[i] = static_cast<const uint8_t*>(t.x[i]);
  for (int j = 0; j < NB; ++j) wr[j] = t.w + j * t.K;
  if (t.ngroups == 1) tile_w8a8_channel<MB, NB>(t, xr, wr);
  else if (t.group < 64 && 64 % t.group == 0 && t.group % 4 == 0) tile_w8a8_small_groups<MB, NB>(t, xr, wr);
  else tile_w8a8_grouped<MB, NB>(t, xr, wr);
}

}  // namespace avx512
}  // namespace cpu
}  // namespace llmkern
