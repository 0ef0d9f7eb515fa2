// Vector operations shared by the CPU attention kernels (decode_attention, attention), one struct per
// ISA with the same static interface, so that one kernel body (decode_attention_body.h) is compiled
// once per ISA with that ISA's target attribute:
//   V            vector of W fp32 lanes
//   load_kv<KT>  W values of a K/V row as fp32 (KT: f32, bf16, f16, int8 values, see KvType), the
//                first n valid and the rest 0 (AVX-512 only ever gets n < W: head dims are multiples of 8)
//   exp          e^x per lane, about 1 ulp, x = -inf (and anything below -87.3) gives exactly 0
//   hsum, hmax   horizontal sum / max
//   hsum_w       the horizontal sums of W vectors, stored as W floats
// Torch-free. The scalar struct (W = 1) is the portable reference path.
#pragma once

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cmath>
#include <cstdint>

#include "llmkern/cpu/convert.h"

#define LLMKERN_ATT512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define LLMKERN_ATT512_INLINE LLMKERN_ATT512 inline __attribute__((always_inline))
#define LLMKERN_ATT2 __attribute__((target("avx2,fma,f16c")))
#define LLMKERN_ATT2_INLINE LLMKERN_ATT2 inline __attribute__((always_inline))
#define LLMKERN_ATTS_INLINE inline __attribute__((always_inline))

namespace llmkern {
namespace cpu {

// Element type of a KV cache (the launcher's codes).
enum KvType : int { kKvF32 = 0, kKvBF16 = 1, kKvF16 = 2, kKvI8 = 3 };

inline int64_t kv_elem_size(int kt) { return kt == kKvF32 ? 4 : (kt == kKvI8 ? 1 : 2); }

// Cephes expf constants: e^x = 2^n * e^r, n = round(x / ln 2), r = x - n ln 2 (ln 2 split in two).
constexpr float kExpHi = 88.3762626647949f, kExpLo = -87.3365447505531f;
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpP0 = 1.9875691500E-4f, kExpP1 = 1.3981999507E-3f, kExpP2 = 8.3334519073E-3f;
constexpr float kExpP3 = 4.1665795894E-2f, kExpP4 = 1.6666665459E-1f, kExpP5 = 5.0000001201E-1f;

struct OpsAvx512 {
  using V = __m512;
  static constexpr int W = 16;
  static LLMKERN_ATT512_INLINE V zero() { return _mm512_setzero_ps(); }
  static LLMKERN_ATT512_INLINE V set1(float x) { return _mm512_set1_ps(x); }
  static LLMKERN_ATT512_INLINE V load(const float* p) { return _mm512_loadu_ps(p); }
  static LLMKERN_ATT512_INLINE void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static LLMKERN_ATT512_INLINE V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static LLMKERN_ATT512_INLINE V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static LLMKERN_ATT512_INLINE V add(V a, V b) { return _mm512_add_ps(a, b); }
  static LLMKERN_ATT512_INLINE V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static LLMKERN_ATT512_INLINE V max(V a, V b) { return _mm512_max_ps(a, b); }
  static LLMKERN_ATT512_INLINE float hsum(V v) { return _mm512_reduce_add_ps(v); }
  static LLMKERN_ATT512_INLINE float hmax(V v) { return _mm512_reduce_max_ps(v); }
  // out[i] = hsum(v[i]) for W vectors at once: a transpose-and-add tree (45 ops, ~3 per vector
  // against ~8 for one hsum each).
  // hsum_w on 16 values instead of an array: a [16] array of accumulators is kept in memory by GCC (too
  // big to scalarize: a store per FMA and a 1 KiB memset per call); 16 named registers are not.
  static LLMKERN_ATT512_INLINE void hsum16(V v0, V v1, V v2, V v3, V v4, V v5, V v6, V v7, V v8, V v9, V v10, V v11,
                                           V v12, V v13, V v14, V v15, float* out) {
    const V t0 = _mm512_add_ps(_mm512_unpacklo_ps(v0, v1), _mm512_unpackhi_ps(v0, v1));
    const V t1 = _mm512_add_ps(_mm512_unpacklo_ps(v2, v3), _mm512_unpackhi_ps(v2, v3));
    const V t2 = _mm512_add_ps(_mm512_unpacklo_ps(v4, v5), _mm512_unpackhi_ps(v4, v5));
    const V t3 = _mm512_add_ps(_mm512_unpacklo_ps(v6, v7), _mm512_unpackhi_ps(v6, v7));
    const V t4 = _mm512_add_ps(_mm512_unpacklo_ps(v8, v9), _mm512_unpackhi_ps(v8, v9));
    const V t5 = _mm512_add_ps(_mm512_unpacklo_ps(v10, v11), _mm512_unpackhi_ps(v10, v11));
    const V t6 = _mm512_add_ps(_mm512_unpacklo_ps(v12, v13), _mm512_unpackhi_ps(v12, v13));
    const V t7 = _mm512_add_ps(_mm512_unpacklo_ps(v14, v15), _mm512_unpackhi_ps(v14, v15));
    const auto pd = [](V a, V b) LLMKERN_ATT512 {
      const __m512d x = _mm512_castps_pd(a), y = _mm512_castps_pd(b);
      return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    };
    const V u0 = pd(t0, t1), u1 = pd(t2, t3), u2 = pd(t4, t5), u3 = pd(t6, t7);
    const V x0 = _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, 0x88), _mm512_shuffle_f32x4(u0, u1, 0xdd));
    const V x1 = _mm512_add_ps(_mm512_shuffle_f32x4(u2, u3, 0x88), _mm512_shuffle_f32x4(u2, u3, 0xdd));
    _mm512_storeu_ps(out, _mm512_add_ps(_mm512_shuffle_f32x4(x0, x1, 0x88), _mm512_shuffle_f32x4(x0, x1, 0xdd)));
  }
  static LLMKERN_ATT512_INLINE void hsum_w(const V* v, float* out) {
    V t[8], u[4];
    for (int i = 0; i < 8; ++i)  // per 128-bit block: [v2i, v2i+1, v2i, v2i+1] partials
      t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; ++i) {  // per block: [v4i, v4i+1, v4i+2, v4i+3] partials
      const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
      u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    const V x0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xdd));
    const V x1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xdd));
    _mm512_storeu_ps(out, _mm512_add_ps(_mm512_shuffle_f32x4(x0, x1, 0x88), _mm512_shuffle_f32x4(x0, x1, 0xdd)));
  }
  static LLMKERN_ATT512_INLINE __mmask16 mask(int n) {
    return n >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << n) - 1);
  }
  template <int KT>
  static LLMKERN_ATT512_INLINE V load_kv(const void* p, int64_t i, int n) {
    const __mmask16 m = mask(n);
    if constexpr (KT == kKvF32) return _mm512_maskz_loadu_ps(m, static_cast<const float*>(p) + i);
    if constexpr (KT == kKvBF16) {
      const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i);
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    if constexpr (KT == kKvF16) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i));
    if constexpr (KT == kKvI8) {
      const __m128i b = _mm_maskz_loadu_epi8(m, static_cast<const int8_t*>(p) + i);
      return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
    }
  }
  static LLMKERN_ATT512_INLINE V exp(V x) {
    const __mmask16 under = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpLo), _CMP_LT_OQ);
    // Constant first: min/max return their second operand when either is NaN, so NaN stays NaN.
    x = _mm512_min_ps(_mm512_set1_ps(kExpHi), x);
    x = _mm512_max_ps(_mm512_set1_ps(kExpLo), x);
    const V n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
    V y = _mm512_set1_ps(kExpP0);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kExpP1));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kExpP2));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kExpP3));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kExpP4));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kExpP5));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_mov_ps(static_cast<__mmask16>(~under), _mm512_scalef_ps(y, n));
  }
};

struct OpsAvx2 {
  using V = __m256;
  static constexpr int W = 8;
  static LLMKERN_ATT2_INLINE V zero() { return _mm256_setzero_ps(); }
  static LLMKERN_ATT2_INLINE V set1(float x) { return _mm256_set1_ps(x); }
  static LLMKERN_ATT2_INLINE V load(const float* p) { return _mm256_loadu_ps(p); }
  static LLMKERN_ATT2_INLINE void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static LLMKERN_ATT2_INLINE V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static LLMKERN_ATT2_INLINE V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static LLMKERN_ATT2_INLINE V add(V a, V b) { return _mm256_add_ps(a, b); }
  static LLMKERN_ATT2_INLINE V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static LLMKERN_ATT2_INLINE V max(V a, V b) { return _mm256_max_ps(a, b); }
  static LLMKERN_ATT2_INLINE float hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static LLMKERN_ATT2_INLINE float hmax(V v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // out[i] = hsum(v[i]) for W vectors at once (transpose-and-add tree, see OpsAvx512::hsum_w).
  static LLMKERN_ATT2_INLINE void hsum_w(const V* v, float* out) {
    V t[4], u[2];
    for (int i = 0; i < 4; ++i)
      t[i] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 2; ++i) {
      const __m256d a = _mm256_castps_pd(t[2 * i]), b = _mm256_castps_pd(t[2 * i + 1]);
      u[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)), _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)));
    }
    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(u[0], u[1], 0x20), _mm256_permute2f128_ps(u[0], u[1], 0x31)));
  }
  // Head dims are multiples of 8: every load is a full vector (n == 8).
  template <int KT>
  static LLMKERN_ATT2_INLINE V load_kv(const void* p, int64_t i, int /*n*/) {
    if constexpr (KT == kKvF32) return _mm256_loadu_ps(static_cast<const float*>(p) + i);
    if constexpr (KT == kKvBF16) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    if constexpr (KT == kKvF16)
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
    if constexpr (KT == kKvI8) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(p) + i));
      return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    }
  }
  static LLMKERN_ATT2_INLINE V exp(V x) {
    const V under = _mm256_cmp_ps(x, _mm256_set1_ps(kExpLo), _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_set1_ps(kExpHi), x);  // NaN stays NaN (see OpsAvx512::exp)
    x = _mm256_max_ps(_mm256_set1_ps(kExpLo), x);
    const V n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
    V y = _mm256_set1_ps(kExpP0);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpP1));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpP2));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpP3));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpP4));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpP5));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    // 2^n with n in [-126, 127] (x was clamped): the exponent field built directly.
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
  }
};

struct OpsScalar {
  using V = float;
  static constexpr int W = 1;
  static LLMKERN_ATTS_INLINE V zero() { return 0.0f; }
  static LLMKERN_ATTS_INLINE V set1(float x) { return x; }
  static LLMKERN_ATTS_INLINE V load(const float* p) { return *p; }
  static LLMKERN_ATTS_INLINE void store(float* p, V v) { *p = v; }
  static LLMKERN_ATTS_INLINE V fma(V a, V b, V c) { return a * b + c; }
  static LLMKERN_ATTS_INLINE V mul(V a, V b) { return a * b; }
  static LLMKERN_ATTS_INLINE V add(V a, V b) { return a + b; }
  static LLMKERN_ATTS_INLINE V sub(V a, V b) { return a - b; }
  static LLMKERN_ATTS_INLINE V max(V a, V b) { return a > b ? a : b; }
  static LLMKERN_ATTS_INLINE float hsum(V v) { return v; }
  static LLMKERN_ATTS_INLINE float hmax(V v) { return v; }
  static LLMKERN_ATTS_INLINE void hsum_w(const V* v, float* out) { out[0] = v[0]; }
  template <int KT>
  static LLMKERN_ATTS_INLINE V load_kv(const void* p, int64_t i, int /*n*/) {
    if constexpr (KT == kKvF32) return static_cast<const float*>(p)[i];
    if constexpr (KT == kKvBF16) return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    if constexpr (KT == kKvF16) return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    if constexpr (KT == kKvI8) return static_cast<float>(static_cast<const int8_t*>(p)[i]);
  }
  static LLMKERN_ATTS_INLINE V exp(V x) { return x < kExpLo ? 0.0f : std::exp(x); }
};

}  // namespace cpu
}  // namespace llmkern
