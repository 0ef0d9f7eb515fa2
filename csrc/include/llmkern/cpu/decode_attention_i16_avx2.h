// AVX2 copy of the int16 pieces of the CPU decode-attention kernel (decode_attention_i16.h has the AVX-512 VNNI
// one and the why): an int8 cache with a 16-bit q, q . k and p . v as int16 x int16 products summed in pairs
// (vpmaddwd: 16 exact products into 8 int32 lanes per instruction, then vpaddd), 8 keys per block. Same
// quantization, same rounding (round to nearest even), so the two ISAs' int16 values agree.
//
// Called only from the AVX2 copy of decode_attention_body.h (under `if constexpr (O::W == 8)`). Torch-free.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>

#define LLMKERN_DA2I16 __attribute__((target("avx2,fma,f16c")))

namespace llmkern {
namespace cpu {
namespace da2 {

constexpr float kI16Max = 32767.0f;

// Lanes [0, n) of 8 floats at p (n <= 0: none), the rest 0.
LLMKERN_DA2I16 inline __attribute__((always_inline)) __m256 load8(const float* p, int64_t n) {
  if (n >= 8) return _mm256_loadu_ps(p);
  if (n <= 0) return _mm256_setzero_ps();
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), idx));
}

// 16 fp32 values to int16 (round to nearest even; |x| <= 32767 + rounding, so the saturating pack is exact), in order.
LLMKERN_DA2I16 inline __attribute__((always_inline)) void store16_i16(int16_t* out, __m256 lo, __m256 hi) {
  const __m256i p = _mm256_packs_epi32(_mm256_cvtps_epi32(lo), _mm256_cvtps_epi32(hi));  // 128-bit lanes interleaved
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permute4x64_epi64(p, 0xd8));
}

// As da512::quant_q16: qi[d] = round(x[d] / qs) for d < D, zeros from D to n (a multiple of 16); returns qs =
// max|x| / 32767 (0 for a zero row, NaN when x has a NaN or an infinity).
LLMKERN_DA2I16 __attribute__((noinline)) inline float quant_q16(const float* x, int64_t D, int16_t* qi, int64_t n) {
  const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), inf = _mm256_set1_ps(INFINITY);
  __m256 mx = _mm256_setzero_ps();
  int bad = 0;
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 ax = _mm256_and_ps(load8(x + d, D - d), absm);
    bad |= _mm256_movemask_ps(_mm256_cmp_ps(ax, inf, _CMP_NLT_UQ));  // inf or NaN
    mx = _mm256_max_ps(mx, ax);
  }
  if (bad) {
    for (int64_t d = 0; d < n; ++d) qi[d] = 0;
    return NAN;
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  const float m = std::fmax(_mm_cvtss_f32(m4), _mm_cvtss_f32(_mm_movehdup_ps(m4)));
  const __m256 inv = _mm256_set1_ps(m > 0.0f ? kI16Max / m : 0.0f);
  for (int64_t d = 0; d < n; d += 16)
    store16_i16(qi + d, _mm256_mul_ps(load8(x + d, D - d), inv), _mm256_mul_ps(load8(x + d + 8, D - d - 8), inv));
  return m / kI16Max;
}

// 16 int8 values at p (bytes [0, n) of them; n >= 16, 8 or <= 0: D is a multiple of 8) as int16, the rest 0.
LLMKERN_DA2I16 inline __attribute__((always_inline)) __m256i load16_i8(const int8_t* p, int64_t n) {
  if (n >= 16) return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  if (n <= 0) return _mm256_setzero_si256();
  return _mm256_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// The 8 int8 keys at kp[jj] + off (bytes), D values each, to int16 rows of kb (stride kbs), zeros from D to the
// next multiple of 16.
LLMKERN_DA2I16 __attribute__((noinline)) inline void keys_i16(const char* const* kp, int64_t off, int64_t D, int16_t* kb,
                                                              int64_t kbs) {
  for (int jj = 0; jj < 8; ++jj) {
    const int8_t* k = reinterpret_cast<const int8_t*>(kp[jj] + off);
    for (int64_t c = 0; c < D; c += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(kb + jj * kbs + c), load16_i8(k + c, D - c));
  }
}

// Scores of nr int16 query rows (stride qs, zeros past D up to a multiple of 16) against the 8 int16 keys of kb:
// s[r * ss + jj] = qsc[r] * dot(q_r, key jj), exact in int32 (as da512::qk_i16_rows).
LLMKERN_DA2I16 __attribute__((noinline)) inline void qk_i16_rows(const int16_t* q, int64_t qs, int64_t nr,
                                                                 const int16_t* kb, int64_t kbs, int64_t D,
                                                                 const float* qsc, float* s, int64_t ss) {
  for (int64_t r = 0; r < nr; ++r) {
    __m256i a[8];
#pragma GCC unroll 8
    for (int jj = 0; jj < 8; ++jj) a[jj] = _mm256_setzero_si256();
    const int16_t* qr = q + r * qs;
    for (int64_t c = 0; c < D; c += 16) {
      const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qr + c));
#pragma GCC unroll 8
      for (int jj = 0; jj < 8; ++jj)
        a[jj] = _mm256_add_epi32(
            a[jj], _mm256_madd_epi16(qv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kb + jj * kbs + c))));
    }
    // Horizontal sums of the 8 accumulators into one vector (lane jj = key jj): three rounds of pairwise adds.
    const __m256i h0 = _mm256_hadd_epi32(_mm256_hadd_epi32(a[0], a[1]), _mm256_hadd_epi32(a[2], a[3]));
    const __m256i h1 = _mm256_hadd_epi32(_mm256_hadd_epi32(a[4], a[5]), _mm256_hadd_epi32(a[6], a[7]));
    const __m256i sum =
        _mm256_add_epi32(_mm256_permute2x128_si256(h0, h1, 0x20), _mm256_permute2x128_si256(h0, h1, 0x31));
    _mm256_storeu_ps(s + r * ss, _mm256_mul_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(qsc[r])));
  }
}

// As da512::quant_w16: wq[jj] = round(w[jj] / wsc) for jj < nt, 0 from nt to 32; returns wsc = max|w| / 32767,
// or NaN when a weight is NaN or infinite (wq then unwritten).
LLMKERN_DA2I16 __attribute__((noinline)) inline float quant_w16(const float* w, int nt, int16_t* wq) {
  const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), inf = _mm256_set1_ps(INFINITY);
  __m256 v[4];
  __m256 mx = _mm256_setzero_ps();
  int bad = 0;
  for (int i = 0; i < 4; ++i) {
    v[i] = load8(w + 8 * i, nt - 8 * i);
    const __m256 ax = _mm256_and_ps(v[i], absm);
    bad |= _mm256_movemask_ps(_mm256_cmp_ps(ax, inf, _CMP_NLT_UQ));
    mx = _mm256_max_ps(mx, ax);
  }
  if (bad) return NAN;
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  const float m = std::fmax(_mm_cvtss_f32(m4), _mm_cvtss_f32(_mm_movehdup_ps(m4)));
  const __m256 inv = _mm256_set1_ps(m > 0.0f ? kI16Max / m : 0.0f);
  store16_i16(wq, _mm256_mul_ps(v[0], inv), _mm256_mul_ps(v[1], inv));
  store16_i16(wq + 16, _mm256_mul_ps(v[2], inv), _mm256_mul_ps(v[3], inv));
  return m / kI16Max;
}

// As da512::pv_i16 with 16-column chunks: acc rows [0, NR) columns [0, 16 * NC) (stored where < dp; values past
// nc read as 0) += wsc[r] * sum_jj wq[r * 32 + jj] * v[jj] over np key pairs. vpunpck{l,h}wd work inside 128-bit
// lanes: "lo" sums hold columns 0-3 and 8-11 of each 16, "hi" 4-7 and 12-15; the flush puts them in order.
template <int NR, int NC>
LLMKERN_DA2I16 __attribute__((noinline)) void pv_i16(float* acc, int64_t Dp, const int16_t* wq, const float* wsc,
                                                     const char* const* vp, int64_t off, int np, int64_t nc, int64_t dp) {
  __m256i lo[NR * NC], hi[NR * NC];
#pragma GCC unroll 16
  for (int i = 0; i < NR * NC; ++i) lo[i] = hi[i] = _mm256_setzero_si256();
  for (int p = 0; p < np; ++p) {
    const int8_t* va = reinterpret_cast<const int8_t*>(vp[2 * p] + off);
    const int8_t* vb = reinterpret_cast<const int8_t*>(vp[2 * p + 1] + off);
    __m256i xl[NC], xh[NC];
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) {
      const __m256i A = load16_i8(va + 16 * c, nc - 16 * c), B = load16_i8(vb + 16 * c, nc - 16 * c);
      xl[c] = _mm256_unpacklo_epi16(A, B);
      xh[c] = _mm256_unpackhi_epi16(A, B);
    }
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      int32_t pair;
      __builtin_memcpy(&pair, wq + r * 32 + 2 * p, 4);
      const __m256i w = _mm256_set1_epi32(pair);
#pragma GCC unroll 4
      for (int c = 0; c < NC; ++c) {
        lo[r * NC + c] = _mm256_add_epi32(lo[r * NC + c], _mm256_madd_epi16(xl[c], w));
        hi[r * NC + c] = _mm256_add_epi32(hi[r * NC + c], _mm256_madd_epi16(xh[c], w));
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r) {
    const __m256 sc = _mm256_set1_ps(wsc[r]);
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) {
      const __m256 fl = _mm256_cvtepi32_ps(lo[r * NC + c]), fh = _mm256_cvtepi32_ps(hi[r * NC + c]);
      float* o = acc + r * Dp + 16 * c;
      if (16 * c < dp)
        _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_permute2f128_ps(fl, fh, 0x20), sc, _mm256_loadu_ps(o)));
      if (16 * c + 8 < dp)
        _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(_mm256_permute2f128_ps(fl, fh, 0x31), sc, _mm256_loadu_ps(o + 8)));
    }
  }
}

// As da512::pv_i16_rows: rows four at a time (16 columns per pass; one or two rows: 32).
LLMKERN_DA2I16 __attribute__((noinline)) inline void pv_i16_rows(float* acc, int64_t Dp, int64_t R, const int16_t* wq,
                                                                 const float* wsc, const char* const* vp, int64_t off,
                                                                 int nt, int64_t D) {
  const int np = (nt + 1) / 2;
  for (int64_t r = 0; r < R; r += 4) {
    const int64_t nr = R - r < 4 ? R - r : 4;
    float* ar = acc + r * Dp;
    const int16_t* wr = wq + r * 32;
    const float* sr = wsc + r;
    const int64_t step = nr <= 2 ? 32 : 16;
    for (int64_t c0 = 0; c0 < D; c0 += step) {
      const int64_t nc = D - c0, dp = Dp - c0;
      switch (nr) {
        case 1: pv_i16<1, 2>(ar + c0, Dp, wr, sr, vp, off + c0, np, nc, dp); break;
        case 2: pv_i16<2, 2>(ar + c0, Dp, wr, sr, vp, off + c0, np, nc, dp); break;
        case 3: pv_i16<3, 1>(ar + c0, Dp, wr, sr, vp, off + c0, np, nc, dp); break;
        default: pv_i16<4, 1>(ar + c0, Dp, wr, sr, vp, off + c0, np, nc, dp);
      }
    }
  }
}

}  // namespace da2
}  // namespace cpu
}  // namespace llmkern
