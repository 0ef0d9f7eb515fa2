// silu_mul: out[m, i] = silu(gu[m, i]) * gu[m, I + i], the SwiGLU activation of a fused gate/up
// projection's output, for the decode-step program (csrc/cpu/decode_step.cpp).
//
// Rounding follows what `F.silu(g) * u` does in torch: for 16-bit dtypes silu(g) is rounded to the
// dtype before the product, which is rounded again; fp32 stays fp32. silu(x) = x / (1 + exp(-x)) with
// one exp implementation for every ISA (range reduction by ln2, degree-7 polynomial, fused
// multiply-adds in the same order), so the AVX-512, AVX2 and scalar paths store bit-identical
// results. Its error against float64 is a few fp32 ulps (torch's own Sleef exp differs from it in the
// last bit or two, so results are close to, not bit-equal with, the module path's F.silu(g) * u).
// Every dtype has a vector path (16-bit values are widened to fp32, rounded back with the same
// nearest-even rule as convert.h's scalar converters). Single-threaded: a decode step's rows are a
// few thousand values.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "llmkern/cpu/convert.h"
#include "llmkern/cpu/features.h"
#include "llmkern/cpu/store_avx512.h"

namespace llmkern {
namespace cpu {

struct SiluMulArgs {
  const void* gu = nullptr;  // [M, 2 I] rows at element stride gu_stride: gate values then up values
  int64_t gu_stride = 0;
  void* out = nullptr;  // [M, I] rows at element stride out_stride
  int64_t out_stride = 0;
  int64_t M = 0, I = 0;
  DType dtype = DType::kF32;  // of gu and out
  Isa isa = Isa::kScalar;
};

namespace silu_detail {

// exp(y) = 2^n * p(r), n = nearest(y / ln2), r = y - n ln2 (ln2 in two parts), p degree 7 (Taylor
// coefficients; |r| <= ln2/2 bounds the truncation at ~3e-9 relative). y is clamped to [-87, 88] so
// that 2^n stays a normal float; silu only needs exp(-x) for 1 + exp(-x), where that clamp changes
// nothing visible (x / (1 + e^88) is below 1e-36).
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kLo = -87.0f, kHi = 88.0f;
constexpr float kC[8] = {1.0f, 1.0f, 0.5f, 1.0f / 6, 1.0f / 24, 1.0f / 120, 1.0f / 720, 1.0f / 5040};

inline float exp_scalar(float y) {
  y = std::fmin(std::fmax(y, kLo), kHi);
  const float n = std::nearbyint(y * kLog2e);
  float r = std::fma(n, -kLn2Hi, y);
  r = std::fma(n, -kLn2Lo, r);
  float p = kC[7];
  for (int i = 6; i >= 0; --i) p = std::fma(p, r, kC[i]);
  return p * bits_f32(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
}

inline float silu_scalar(float x) { return x / (1.0f + exp_scalar(-x)); }

inline float round_to(float v, DType dt) {
  if (dt == DType::kBF16) return bf16_to_f32(f32_to_bf16(v));
  if (dt == DType::kF16) return f16_to_f32(f32_to_f16(v));
  return v;
}

inline float load(const void* p, int64_t i, DType dt) {
  if (dt == DType::kF32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  return dt == DType::kBF16 ? bf16_to_f32(h) : f16_to_f32(h);
}

inline void store(void* p, int64_t i, DType dt, float v) {
  if (dt == DType::kF32) static_cast<float*>(p)[i] = v;
  else static_cast<uint16_t*>(p)[i] = dt == DType::kBF16 ? f32_to_bf16(v) : f32_to_f16(v);
}

// One element, scalar: the reference order every vector path reproduces.
inline void element(const SiluMulArgs& a, const void* g, const void* u, void* o, int64_t i) {
  const float s = round_to(silu_scalar(load(g, i, a.dtype)), a.dtype);
  store(o, i, a.dtype, s * load(u, i, a.dtype));
}

#define LLMKERN_SILU512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define LLMKERN_SILU2 __attribute__((target("avx2,fma,f16c")))

LLMKERN_SILU512 inline __m512 exp16(__m512 y) {
  y = _mm512_min_ps(_mm512_max_ps(y, _mm512_set1_ps(kLo)), _mm512_set1_ps(kHi));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(y, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-kLn2Hi), y);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(-kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kC[7]);
  for (int i = 6; i >= 0; --i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kC[i]));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

LLMKERN_SILU512 inline __m512 silu16(__m512 x) {
  return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

// 16 bf16 / fp16 values -> fp32 (exact).
LLMKERN_SILU512 inline __m512 widen_h16(__m256i h, DType dt) {
  if (dt == DType::kBF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

// fp32 -> bf16 / fp16 bits, rounded as f32_to_bf16 / f32_to_f16 (nearest even; NaN stays NaN).
LLMKERN_SILU512 inline __m256i round_h16(__m512 v, DType dt) {
  return dt == DType::kBF16 ? store512::to_bf16(v) : _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// 16 values of a 16-bit row as fp32, lanes outside m read as 0.
LLMKERN_SILU512 inline __m512 load_h16(const uint16_t* p, __mmask16 m, DType dt) {
  return widen_h16(_mm256_maskz_loadu_epi16(m, p), dt);
}

// A 16-bit row: silu(g) rounded to the dtype, times u, rounded again (as `element`), 16 at a time.
LLMKERN_SILU512 inline void row512_h16(const uint16_t* g, const uint16_t* u, uint16_t* o, int64_t I, DType dt) {
  for (int64_t i = 0; i < I; i += 16) {
    const __mmask16 m = store512::tail16(I - i);
    const __m512 s = widen_h16(round_h16(silu16(load_h16(g + i, m, dt)), dt), dt);
    _mm256_mask_storeu_epi16(o + i, m, round_h16(_mm512_mul_ps(s, load_h16(u + i, m, dt)), dt));
  }
}

LLMKERN_SILU512 inline void row512(const float* g, const float* u, float* o, int64_t I) {
  int64_t i = 0;
  for (; i + 16 <= I; i += 16) {
    _mm512_storeu_ps(o + i, _mm512_mul_ps(silu16(_mm512_loadu_ps(g + i)), _mm512_loadu_ps(u + i)));
  }
  for (; i < I; ++i) o[i] = silu_scalar(g[i]) * u[i];
}

LLMKERN_SILU2 inline __m256 exp8(__m256 y) {
  y = _mm256_min_ps(_mm256_max_ps(y, _mm256_set1_ps(kLo)), _mm256_set1_ps(kHi));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(y, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-kLn2Hi), y);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(-kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kC[7]);
  for (int i = 6; i >= 0; --i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kC[i]));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

LLMKERN_SILU2 inline __m256 silu8(__m256 x) {
  return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

LLMKERN_SILU2 inline __m256 widen_h8(__m128i h, DType dt) {
  if (dt == DType::kBF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

// fp32 -> bf16 / fp16 bits as f32_to_bf16 / f32_to_f16 (see store512::to_bf16 for the bf16 rule).
LLMKERN_SILU2 inline __m128i round_h8(__m256 v, DType dt) {
  if (dt == DType::kF16) return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan);
  r = _mm256_srli_epi32(r, 16);  // 0 .. 0xffff: packus (signed 32 -> unsigned 16) keeps it exactly
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

// A 16-bit row, 8 at a time (as `element`; the tail goes through `element`'s scalar helpers).
LLMKERN_SILU2 inline int64_t row256_h16(const uint16_t* g, const uint16_t* u, uint16_t* o, int64_t I, DType dt) {
  int64_t i = 0;
  for (; i + 8 <= I; i += 8) {
    const __m128i gh = _mm_loadu_si128(reinterpret_cast<const __m128i*>(g + i));
    const __m128i uh = _mm_loadu_si128(reinterpret_cast<const __m128i*>(u + i));
    const __m256 s = widen_h8(round_h8(silu8(widen_h8(gh, dt)), dt), dt);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + i), round_h8(_mm256_mul_ps(s, widen_h8(uh, dt)), dt));
  }
  return i;  // elements done
}

LLMKERN_SILU2 inline void row256(const float* g, const float* u, float* o, int64_t I) {
  int64_t i = 0;
  for (; i + 8 <= I; i += 8) {
    _mm256_storeu_ps(o + i, _mm256_mul_ps(silu8(_mm256_loadu_ps(g + i)), _mm256_loadu_ps(u + i)));
  }
  for (; i < I; ++i) o[i] = silu_scalar(g[i]) * u[i];
}

}  // namespace silu_detail

inline void silu_mul(const SiluMulArgs& a) {
  const int64_t esz = a.dtype == DType::kF32 ? 4 : 2;
  for (int64_t m = 0; m < a.M; ++m) {
    const char* g = static_cast<const char*>(a.gu) + m * a.gu_stride * esz;
    const char* u = g + a.I * esz;
    char* o = static_cast<char*>(a.out) + m * a.out_stride * esz;
    if (a.dtype == DType::kF32 && a.isa == Isa::kAvx512Vnni) {
      silu_detail::row512(reinterpret_cast<const float*>(g), reinterpret_cast<const float*>(u),
                          reinterpret_cast<float*>(o), a.I);
    } else if (a.dtype == DType::kF32 && a.isa == Isa::kAvx2) {
      silu_detail::row256(reinterpret_cast<const float*>(g), reinterpret_cast<const float*>(u),
                          reinterpret_cast<float*>(o), a.I);
    } else if (a.isa == Isa::kAvx512Vnni) {
      silu_detail::row512_h16(reinterpret_cast<const uint16_t*>(g), reinterpret_cast<const uint16_t*>(u),
                              reinterpret_cast<uint16_t*>(o), a.I, a.dtype);
    } else {
      int64_t i = 0;
      if (a.isa == Isa::kAvx2)
        i = silu_detail::row256_h16(reinterpret_cast<const uint16_t*>(g), reinterpret_cast<const uint16_t*>(u),
                                    reinterpret_cast<uint16_t*>(o), a.I, a.dtype);
      for (; i < a.I; ++i) silu_detail::element(a, g, u, o, i);
    }
  }
}

}  // namespace cpu
}  // namespace llmkern
