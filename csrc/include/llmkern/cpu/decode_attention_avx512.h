// AVX-512 pieces of the CPU decode-attention kernel that only the AVX-512 copy of
// decode_attention_body.h calls (from `if constexpr (O::W == 16)` branches, so the AVX2 and scalar
// copies never instantiate them). Torch-free.
//
// qk3x8: scores of 3 query rows against 8 keys in one pass. With GQA groups of 3 (SmolLM2: Hq 9, Hk 3)
// the per-row kernel (qk_block16) loads every key chunk 3 times, once per row, and converts it 3 times
// for bf16/f16/int8 caches; here each chunk is loaded and converted once and feeds 3 FMAs
// (24 accumulators + 3 query chunks + 1 key chunk = 28 of the 32 zmm registers).
#pragma once

#include <cstdint>

#include "llmkern/cpu/attention_simd.h"

namespace llmkern {
namespace cpu {
namespace da512 {

using V = __m512;

// out[i] = horizontal sum of v_i, i < 8 (a transpose-and-add tree, as OpsAvx512::hsum16).
LLMKERN_ATT512_INLINE void hsum8(V v0, V v1, V v2, V v3, V v4, V v5, V v6, V v7, float* out) {
  const V t0 = _mm512_add_ps(_mm512_unpacklo_ps(v0, v1), _mm512_unpackhi_ps(v0, v1));
  const V t1 = _mm512_add_ps(_mm512_unpacklo_ps(v2, v3), _mm512_unpackhi_ps(v2, v3));
  const V t2 = _mm512_add_ps(_mm512_unpacklo_ps(v4, v5), _mm512_unpackhi_ps(v4, v5));
  const V t3 = _mm512_add_ps(_mm512_unpacklo_ps(v6, v7), _mm512_unpackhi_ps(v6, v7));
  const auto pd = [](V a, V b) LLMKERN_ATT512 {
    const __m512d x = _mm512_castps_pd(a), y = _mm512_castps_pd(b);
    return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  };
  // u0: in each 128-bit block l, the block-l partial sums of v0..v3; u1: of v4..v7.
  const V u0 = pd(t0, t1), u1 = pd(t2, t3);
  // x blocks: [u0 b0+b1, u0 b2+b3, u1 b0+b1, u1 b2+b3]
  const V x = _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, 0x88), _mm512_shuffle_f32x4(u0, u1, 0xdd));
  // y blocks 0, 1: [x0 + x1, x2 + x3] = sums of v0..v3, of v4..v7
  const V y = _mm512_add_ps(_mm512_shuffle_f32x4(x, x, 0x08), _mm512_shuffle_f32x4(x, x, 0x0d));
  _mm256_storeu_ps(out, _mm512_castps512_ps256(y));
}

// s_r[jj] = dot(q_r, key jj) for r < 3 and the 8 keys at kp[jj] + off (bytes), D values each; the q rows
// are fp32 with zero padding to a multiple of 16.
template <int KT>
LLMKERN_ATT512 inline void qk3x8(const float* q0, const float* q1, const float* q2, const char* const* kp, int64_t off,
                                 int64_t D, float* s0, float* s1, float* s2) {
#define LLMKERN_DA_K(i) \
  const char* k##i = kp[i] + off; \
  V a##i = _mm512_setzero_ps(), b##i = _mm512_setzero_ps(), e##i = _mm512_setzero_ps();
  LLMKERN_DA_K(0) LLMKERN_DA_K(1) LLMKERN_DA_K(2) LLMKERN_DA_K(3) LLMKERN_DA_K(4) LLMKERN_DA_K(5) LLMKERN_DA_K(6)
  LLMKERN_DA_K(7)
#undef LLMKERN_DA_K
  for (int64_t c = 0; c < D; c += 16) {
    const V x0 = _mm512_loadu_ps(q0 + c), x1 = _mm512_loadu_ps(q1 + c), x2 = _mm512_loadu_ps(q2 + c);
    const int n = static_cast<int>(D - c);
#define LLMKERN_DA_F(i)                                          \
  {                                                              \
    const V kv = OpsAvx512::template load_kv<KT>(k##i, c, n);    \
    a##i = _mm512_fmadd_ps(x0, kv, a##i);                        \
    b##i = _mm512_fmadd_ps(x1, kv, b##i);                        \
    e##i = _mm512_fmadd_ps(x2, kv, e##i);                        \
  }
    LLMKERN_DA_F(0) LLMKERN_DA_F(1) LLMKERN_DA_F(2) LLMKERN_DA_F(3) LLMKERN_DA_F(4) LLMKERN_DA_F(5) LLMKERN_DA_F(6)
    LLMKERN_DA_F(7)
#undef LLMKERN_DA_F
  }
  hsum8(a0, a1, a2, a3, a4, a5, a6, a7, s0);
  hsum8(b0, b1, b2, b3, b4, b5, b6, b7, s1);
  hsum8(e0, e1, e2, e3, e4, e5, e6, e7, s2);
}

// acc rows [0, NR) (stride Dp, NC * 16 values each) += sum_jj p[r * ps + jj] * v[jj] over the nt value
// rows at vp[jj] + off (bytes): all NR x NC accumulators stay in registers for the whole tile, and each
// key's NC value chunks are loaded once and each weight broadcast once (per chunk, the generic pv_rows
// reloads the weight for every chunk: 7 loads per 12 FMAs here against 16 per 12 there, for 3 x 4).
template <int KT, int NR, int NC>
LLMKERN_ATT512 inline void pv_regs(float* acc, int64_t Dp, const float* p, int64_t ps, const char* const* vp,
                                   int64_t off, int nt) {
  V a[NR * NC];
#pragma GCC unroll 32
  for (int i = 0; i < NR * NC; ++i) a[i] = _mm512_loadu_ps(acc + (i / NC) * Dp + (i % NC) * 16);
  for (int jj = 0; jj < nt; ++jj) {
    const char* v = vp[jj] + off;
    V x[NC];
#pragma GCC unroll 32
    for (int c = 0; c < NC; ++c) x[c] = OpsAvx512::template load_kv<KT>(v, c * 16, 16);
#pragma GCC unroll 32
    for (int r = 0; r < NR; ++r) {
      const V w = _mm512_set1_ps(p[r * ps + jj]);
#pragma GCC unroll 32
      for (int c = 0; c < NC; ++c) a[r * NC + c] = _mm512_fmadd_ps(w, x[c], a[r * NC + c]);
    }
  }
#pragma GCC unroll 32
  for (int i = 0; i < NR * NC; ++i) _mm512_storeu_ps(acc + (i / NC) * Dp + (i % NC) * 16, a[i]);
}

#define LLMKERN_DA512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))

// Scores of bf16 queries against a bf16 cache by AVX-512 BF16 dot products: s[r * ss + jj] = scale * dot(q_r, key jj)
// for rows r < nr (raw bf16, row stride qs elements, zeros from D up to a multiple of 32) and the 16 keys at
// kp[jj] + off (bytes), D values each. vdpbf16ps multiplies raw bf16 pairs exactly and adds them into fp32 lanes
// (two fused steps, RNE; bf16 subnormals count as 0, as its DAZ / FTZ): no conversion of the keys, half the
// instructions of fp32 FMAs, and the exact query (the fp32 path's q * scale rounds; here the scale comes after).
// A call per (16-key block, KV head), not inlined: the caller's target lacks avx512bf16.
LLMKERN_DA512BF16 __attribute__((noinline)) inline void qk_bf16_rows(const uint16_t* q, int64_t qs, int64_t nr,
                                                                     const char* const* kp, int64_t off, int64_t D,
                                                                     float scale, float* s, int64_t ss) {
#define LLMKERN_DA_K(i) const char* k##i = kp[i] + off;
  LLMKERN_DA_K(0) LLMKERN_DA_K(1) LLMKERN_DA_K(2) LLMKERN_DA_K(3) LLMKERN_DA_K(4) LLMKERN_DA_K(5) LLMKERN_DA_K(6)
  LLMKERN_DA_K(7) LLMKERN_DA_K(8) LLMKERN_DA_K(9) LLMKERN_DA_K(10) LLMKERN_DA_K(11) LLMKERN_DA_K(12)
  LLMKERN_DA_K(13) LLMKERN_DA_K(14) LLMKERN_DA_K(15)
#undef LLMKERN_DA_K
  const V sc = _mm512_set1_ps(scale);
  for (int64_t r = 0; r < nr; ++r) {
    V a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0, a9 = a0,
      a10 = a0, a11 = a0, a12 = a0, a13 = a0, a14 = a0, a15 = a0;
    const uint16_t* qr = q + r * qs;
    for (int64_t c = 0; c < D; c += 32) {
      const __m512bh qv = (__m512bh)_mm512_loadu_si512(qr + c);
      // A key's last chunk past D: masked to zeros (the next head's values, or the row's end, must not meet q's
      // zero padding: 0 x inf would be NaN).
      const __mmask32 m = D - c >= 32 ? ~__mmask32(0) : (__mmask32(1) << (D - c)) - 1;
#define LLMKERN_DA_F(i) a##i = _mm512_dpbf16_ps(a##i, qv, (__m512bh)_mm512_maskz_loadu_epi16(m, k##i + 2 * c));
      LLMKERN_DA_F(0) LLMKERN_DA_F(1) LLMKERN_DA_F(2) LLMKERN_DA_F(3) LLMKERN_DA_F(4) LLMKERN_DA_F(5) LLMKERN_DA_F(6)
      LLMKERN_DA_F(7) LLMKERN_DA_F(8) LLMKERN_DA_F(9) LLMKERN_DA_F(10) LLMKERN_DA_F(11) LLMKERN_DA_F(12)
      LLMKERN_DA_F(13) LLMKERN_DA_F(14) LLMKERN_DA_F(15)
#undef LLMKERN_DA_F
    }
    float* sr = s + r * ss;
    OpsAvx512::hsum16(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, sr);
    _mm512_storeu_ps(sr, _mm512_mul_ps(_mm512_loadu_ps(sr), sc));
  }
}

}  // namespace da512
}  // namespace cpu
}  // namespace llmkern
