// Rotary (RoPE) helpers shared by the CPU kv_cache_append (fused rotary) and rotary_embedding kernels.
//
// Computed like the reference, bit for bit: a * cos - b * sin in float64 (the products of two floats
// are exact there), then rounded to the tensor's dtype the way torch's .to() does.
#pragma once

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cstdint>

#include "llmkern/cpu/convert.h"

namespace llmkern {
namespace cpu {

// double -> `dt`, returned as float (exact): through fp32 first, as torch's .to() from float64 does
// (c10's BFloat16/Half are built from a float), so the two roundings match the reference bit for bit.
inline float round_to_dtype(double d, DType dt) {
  const float f = static_cast<float>(d);
  switch (dt) {
    case DType::kBF16: return bf16_to_f32(f32_to_bf16(f));
    case DType::kF16: return f16_to_f32(f32_to_f16(f));
    default: return f;
  }
}

// x[0..R) fp32 rotated in place at one position (cs: that position's cos | sin row, R wide), each
// result rounded to dt. interleaved: pairs (x[2i], x[2i+1]) (GPT-J), else (x[i], x[i + R/2]) (NeoX).
inline void rotate_row(float* x, const float* cs, int64_t R, bool interleaved, DType dt) {
  const int64_t half = R / 2;
  for (int64_t i = 0; i < half; ++i) {
    const int64_t ia = interleaved ? 2 * i : i, ib = interleaved ? 2 * i + 1 : i + half;
    const double a = x[ia], b = x[ib], c = cs[i], s = cs[half + i];
    const double ra = a * c - b * s, rb = b * c + a * s;  // products exact in double
    x[ia] = round_to_dtype(ra, dt);
    x[ib] = round_to_dtype(rb, dt);
  }
}

#define LLMKERN_ROT512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

// fp32 lanes rounded to dt and back (exact), as bf16_to_f32(f32_to_bf16(f)) / f16_to_f32(f32_to_f16(f)).
LLMKERN_ROT512 inline __m256 round8_to_dtype(__m256 f, DType dt) {
  if (dt == DType::kF16) return _mm256_cvtph_ps(_mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  if (dt != DType::kBF16) return f;
  const __m256i u = _mm256_castps_si256(f);
  const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                                          _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
  const __m256i keep = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  const __m256i nan = _mm256_or_si256(u, _mm256_set1_epi32(0x00400000));  // quiet NaN (f32_to_bf16's | 0x40)
  const __m256 isnan = _mm256_cmp_ps(f, f, _CMP_UNORD_Q);
  return _mm256_blendv_ps(_mm256_castsi256_ps(_mm256_and_si256(r, keep)), _mm256_castsi256_ps(_mm256_and_si256(nan, keep)),
                          isnan);
}

// rotate_row with AVX-512, bit for bit the same: NeoX pairs 8 at a time in float64 lanes (products of
// two floats are exact in double, so the same one rounding per result), then double -> fp32 -> dt.
// Interleaved (GPT-J) rows and the tail of a half that is not a multiple of 8 take rotate_row's loop.
LLMKERN_ROT512 inline void rotate_row_avx512(float* x, const float* cs, int64_t R, bool interleaved, DType dt) {
  if (interleaved) {
    rotate_row(x, cs, R, interleaved, dt);
    return;
  }
  const int64_t half = R / 2;
  int64_t i = 0;
  for (; i + 8 <= half; i += 8) {
    const __m512d a = _mm512_cvtps_pd(_mm256_loadu_ps(x + i)), b = _mm512_cvtps_pd(_mm256_loadu_ps(x + half + i));
    const __m512d c = _mm512_cvtps_pd(_mm256_loadu_ps(cs + i)), s = _mm512_cvtps_pd(_mm256_loadu_ps(cs + half + i));
    const __m512d ra = _mm512_sub_pd(_mm512_mul_pd(a, c), _mm512_mul_pd(b, s));
    const __m512d rb = _mm512_add_pd(_mm512_mul_pd(b, c), _mm512_mul_pd(a, s));
    _mm256_storeu_ps(x + i, round8_to_dtype(_mm512_cvtpd_ps(ra), dt));
    _mm256_storeu_ps(x + half + i, round8_to_dtype(_mm512_cvtpd_ps(rb), dt));
  }
  for (; i < half; ++i) {
    const double a = x[i], b = x[half + i], c = cs[i], s = cs[half + i];
    const double ra = a * c - b * s, rb = b * c + a * s;
    x[i] = round_to_dtype(ra, dt);
    x[half + i] = round_to_dtype(rb, dt);
  }
}

// Rows of D values in any float dtype <-> fp32, 16 lanes at a time (kv_cache_append, rotary_embedding).
namespace rot512 {

// n values of dtype dt at src + off -> fp32 dst (exact).
LLMKERN_ROT512 inline void load_row(const void* src, int64_t off, DType dt, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (n - i)) - 1);
    __m512 v;
    if (dt == DType::kF32) {
      v = _mm512_maskz_loadu_ps(m, static_cast<const float*>(src) + off + i);
    } else {
      const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(src) + off + i);
      v = dt == DType::kF16 ? _mm512_cvtph_ps(h) : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    _mm512_mask_storeu_ps(dst + i, m, v);
  }
}

// fp32 src -> n values of dtype dt at dst + off, rounded half to even like store_from_f32 (NaN stays NaN).
LLMKERN_ROT512 inline void store_row_f(const float* src, void* dst, int64_t off, DType dt, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(m, src + i);
    if (dt == DType::kF32) {
      _mm512_mask_storeu_ps(static_cast<float*>(dst) + off + i, m, v);
      continue;
    }
    __m256i h;
    if (dt == DType::kF16) {
      h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      const __m512i u = _mm512_castps_si512(v);
      __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                     _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)))), 16);
      r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                                _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
      h = _mm512_cvtepi32_epi16(r);
    }
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(dst) + off + i, m, h);
  }
}

}  // namespace rot512

}  // namespace cpu
}  // namespace llmkern
