// int8_linear with AVX2 + FMA: the "avx2" ISA. Row preparation (fp32 conversion, W8A8 quantization
// with q stored as int8) is the portable code of int8_linear_scalar.h.
//
// W8A8: vpmaddubsw multiplies unsigned by signed bytes and adds pairs into int16 with saturation.
// It stays exact with the sign trick: |w| (u8, at most 128) times q * sign(w) (s8, |q| <= 127), so a
// pair sum is at most 2 * 128 * 127 = 32512 < 32767; vpmaddwd with ones then widens pairs to int32.
// W8A16: weights sign-extended to int32 and converted to fp32, multiplied into fp32 lane sums.
// Group tails shorter than a vector (K or G not a multiple of 32 / 8) are summed in scalar code and
// added into lane 0, keeping every lane exact (W8A8) or one fp32 sum (W8A16).
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

#define LLMKERN_AVX2 __attribute__((target("avx2,fma,f16c")))
#define LLMKERN_AVX2_INLINE LLMKERN_AVX2 inline __attribute__((always_inline))

namespace llmkern {
namespace cpu {
namespace avx2 {

LLMKERN_AVX2_INLINE float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

LLMKERN_AVX2_INLINE int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// ------------------------------------------------------------------------------------- W8A16

// acc[i][j] = lane sums of x[i][k] * w[j][k] over k in [k0, k1); the scalar tail goes to lane 0.
template <int MB, int NB>
LLMKERN_AVX2_INLINE void w8a16_range(__m256 (&acc)[MB][NB], const float* const (&xr)[MB],
                                     const int8_t* const (&wr)[NB], int64_t k0, int64_t k1) {
  LLMKERN_UNROLL for (int i = 0; i < MB; ++i)
    LLMKERN_UNROLL for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t k = k0;
  for (; k + 8 <= k1; k += 8) {
    __m256 xv[MB];
    LLMKERN_UNROLL for (int i = 0; i < MB; ++i) xv[i] = _mm256_loadu_ps(xr[i] + k);
    LLMKERN_UNROLL for (int j = 0; j < NB; ++j) {
      const __m128i wb = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr[j] + k));
      const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(wb));
      LLMKERN_UNROLL for (int i = 0; i < MB; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  if (k < k1) {
    LLMKERN_UNROLL for (int i = 0; i < MB; ++i)
      LLMKERN_UNROLL for (int j = 0; j < NB; ++j) {
        float s = 0.0f;
        for (int64_t kk = k; kk < k1; ++kk) s += xr[i][kk] * static_cast<float>(wr[j][kk]);
        acc[i][j] = _mm256_add_ps(acc[i][j], _mm256_setr_ps(s, 0, 0, 0, 0, 0, 0, 0));
      }
  }
}

// Separate functions per layout with local accumulators keep GCC from spilling (see the AVX-512 file).
template <int MB, int NB>
LLMKERN_AVX2 void tile_w8a16_channel(const Tile& t, const float* const (&xr)[MB], const int8_t* const (&wr)[NB]) {
  __m256 acc[MB][NB];
  w8a16_range<MB, NB>(acc, xr, wr, 0, t.K);
  LLMKERN_UNROLL for (int i = 0; i < MB; ++i)
    LLMKERN_UNROLL for (int j = 0; j < NB; ++j) t.res[i * kResStride + j] = hsum_ps(acc[i][j]) * t.scale[j];
}

template <int MB, int NB>
LLMKERN_AVX2 void tile_w8a16_grouped(const Tile& t, const float* const (&xr)[MB], const int8_t* const (&wr)[NB]) {
  __m256 accf[MB][NB];
  LLMKERN_UNROLL for (int i = 0; i < MB; ++i)
    LLMKERN_UNROLL for (int j = 0; j < NB; ++j) accf[i][j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < t.ngroups; ++g) {
    __m256 acc[MB][NB];
    w8a16_range<MB, NB>(acc, xr, wr, g * t.group, (g + 1) * t.group);
    LLMKERN_UNROLL for (int j = 0; j < NB; ++j) {
      const __m256 s = _mm256_set1_ps(t.scale[j * t.ngroups + g]);
      LLMKERN_UNROLL for (int i = 0; i < MB; ++i) accf[i][j] = _mm256_fmadd_ps(acc[i][j], s, accf[i][j]);
    }
  }
  LLMKERN_UNROLL for (int i = 0; i < MB; ++i)
    LLMKERN_UNROLL for (int j = 0; j < NB; ++j) t.res[i * kResStride + j] = hsum_ps(accf[i][j]);
}

template <int MB, int NB>
LLMKERN_AVX2 void tile_w8a16(const Tile& t) {
  const float* xr[MB];
  const int8_t* wr[NB];
  for (int i = 0; i < MB; ++i) xr[i] = static_cast<const float*>(t.x[i]);
  for (int j = 0; j < NB; ++j) wr[j] = t.w + j * t.K;
  if (t.ngroups == 1) tile_w8a16_channel<MB, NB>(t, xr, wr);
  else tile_w8a16_grouped<MB, NB>(t, xr, wr);
}

// -------------------------------------------------------------------------------------- W8A8

// acc[i][j] = exact int32 lane sums of q[i][k] * w[j][k] over k in [k0, k1); scalar tail in lane 0.
template <int MB, int NB>
LLMKERN_AVX2_INLINE void w8a8_range(__m256i (&acc)[MB][NB], const int8_t* const (&xr)[MB],
                                    const int8_t* const (&wr)[NB], int64_t k0, int64_t k1) {
  const __m256i ones16 = _mm256_set1_epi16(1);
  LLMKERN_UNROLL for (int i = 0; i < MB; ++i)
    LLMKERN_UNROLL for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_setzero_si256();
  int64_t k = k0;
  for (; k + 32 <= k1; k += 32) {
    __m256i xv[MB];
    LLMKERN_UNROLL for (int i = 0; i < MB; ++i) xv[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr[i] + k));
    LLMKERN_UNROLL for (int j = 0; j < NB; ++j) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[j] + k));
      const __m256i wabs = _mm256_abs_epi8(wv);  // -128 -> 0x80, read as u8 128
      LLMKERN_UNROLL for (int i = 0; i < MB; ++i) {
        const __m256i p16 = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xv[i], wv));
        acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(p16, ones16));
      }
    }
  }
  if (k < k1) {
    LLMKERN_UNROLL for (int i = 0; i < MB; ++i)
      LLMKERN_UNROLL for (int j = 0; j < NB; ++j) {
        int32_t s = 0;
        for (int64_t kk = k; kk < k1; ++kk) s += int32_t(xr[i][kk]) * int32_t(wr[j][kk]);
        acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_setr_epi32(s, 0, 0, 0, 0, 0, 0, 0));
      }
  }
}

template <int MB, int NB>
LLMKERN_AVX2 void tile_w8a8_channel(const Tile& t, const int8_t* const (&xr)[MB], const int8_t* const (&wr)[NB]) {
  __m256i acc[MB][NB];
  w8a8_range<MB, NB>(acc, xr, wr, 0, t.K);
  LLMKERN_UNROLL for (int i = 0; i < MB; ++i)
    LLMKERN_UNROLL for (int j = 0; j < NB; ++j)
      t.res[i * kResStride + j] = static_cast<float>(hsum_epi32(acc[i][j])) * t.scale[j];
}

template <int MB, int NB>
LLMKERN_AVX2 void tile_w8a8_grouped(const Tile& t, const int8_t* const (&xr)[MB], const int8_t* const (&wr)[NB]) {
  __m256 accf[MB][NB];
  LLMKERN_UNROLL for (int i = 0; i < MB; ++i)
    LLMKERN_UNROLL for (int j = 0; j < NB; ++j) accf[i][j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < t.ngroups; ++g) {
    __m256i acc[MB][NB];
    w8a8_range<MB, NB>(acc, xr, wr, g * t.group, (g + 1) * t.group);
    LLMKERN_UNROLL for (int j = 0; j < NB; ++j) {
      const __m256 s = _mm256_set1_ps(t.scale[j * t.ngroups + g]);
      LLMKERN_UNROLL for (int i = 0; i < MB; ++i)
        accf[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i][j]), s, accf[i][j]);
    }
  }
  LLMKERN_UNROLL for (int i = 0; i < MB; ++i)
    LLMKERN_UNROLL for (int j = 0; j < NB; ++j) t.res[i * kResStride + j] = hsum_ps(accf[i][j]);
}

template <int MB, int NB>
LLMKERN_AVX2 void tile_w8a8(const Tile& t) {
  const int8_t* xr[MB];
  const int8_t* wr[NB];
  for (int i = 0; i < MB; ++i) xr[i] = static_cast<const int8_t*>(t.x[i]);
  for (int j = 0; j < NB; ++j) wr[j] = t.w + j * t.K;
  if (t.ngroups == 1) tile_w8a8_channel<MB, NB>(t, xr, wr);
  else tile_w8a8_grouped<MB, NB>(t, xr, wr);
}

}  // namespace avx2
}  // namespace cpu
}  // namespace llmkern
