// AVX-512 stores of fp32 results into an output dtype (fp32, bf16, fp16), bit for bit as the portable
// converters of convert.h round (nearest even, NaN stays a NaN): shared by the linear kernels' epilogues.
#pragma once

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cstdint>

#include "llmkern/cpu/convert.h"

#define LLMKERN_STORE512_INLINE \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"))) inline __attribute__((always_inline))

namespace llmkern {
namespace cpu {
namespace store512 {

LLMKERN_STORE512_INLINE __mmask16 tail16(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << n) - 1);
}

// Rounds 16 fp32 values to bf16 exactly as f32_to_bf16 (nearest even, NaN stays a quiet NaN).
LLMKERN_STORE512_INLINE __m256i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

// out[n] = v + bias[n] in dt for the lanes in mask (out, bias at the vector's first column).
LLMKERN_STORE512_INLINE void store16(__m512 v, const float* bias, void* out, DType dt, __mmask16 mask) {
  if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias));
  if (dt == DType::kF32) _mm512_mask_storeu_ps(out, mask, v);
  else if (dt == DType::kBF16) _mm256_mask_storeu_epi16(out, mask, to_bf16(v));
  else _mm256_mask_storeu_epi16(out, mask, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// out[0, cols) = v[0, cols) + bias[0, cols) (bias may be null), in dt.
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"))) inline void store_row(
    const float* v, const float* bias, void* out, DType dt, int64_t cols) {
  const int64_t es = dtype_size(dt);
  for (int64_t n = 0; n < cols; n += 16) {
    const __mmask16 m = tail16(cols - n);
    store16(_mm512_maskz_loadu_ps(m, v + n), bias ? bias + n : nullptr, static_cast<char*>(out) + n * es, dt, m);
  }
}

}  // namespace store512
}  // namespace cpu
}  // namespace llmkern
