// Integer pieces of the CPU decode-attention kernel for an int8 cache with 16-bit (bf16 / f16) queries on
// AVX-512 VNNI CPUs: q . k and p . v as int16 x int16 dot products (vpdpwssd: 32 products per instruction, exact,
// int32 sums) instead of converting every int8 value to fp32 before its FMA (2 conversions per 16 values; on a
// Zen 4 host the int8 cache was slower than the bf16 one that reads twice the bytes).
//
// Precision: q is quantized per row to int16 (scale max|q| / 32767) and the softmax weights times the value
// scales per (row, tile of 32 keys) likewise; both errors are 2^-16 of the row's / tile's largest value. For q
// that is below a 16-bit q's own rounding (2^-9 relative for bf16) only where the row's values are not far below
// its largest: a row with an outlier channel (most values under 2^-7 of the largest; detail::q16_fine in
// decode_attention.h) sends its sequence to the fp32 path. An fp32 q keeps the fp32 path (its 1e-5 contract
// would not hold: emulated, int16 q and weights give 2-7e-5 relative error on the tests' shapes).
//
// Called only from the AVX-512 copy of decode_attention_body.h (under `if constexpr (O::W == 16)`), not inlined:
// the caller's target lacks avx512vnni. Torch-free.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>

#define LLMKERN_DA512VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#define LLMKERN_DA512VNNI_INLINE LLMKERN_DA512VNNI inline __attribute__((always_inline))

namespace llmkern {
namespace cpu {
namespace da512 {

constexpr float kI16Max = 32767.0f;

// Row quantization of a 16-bit query row already read as fp32: qi[d] = round(x[d] / qs) for d < D, zeros
// from D to n (a multiple of 32 >= D); returns qs = max|x| / 32767 (0 for a zero row, NaN when x has a NaN or
// an infinity: every score of the row is then NaN, as the fp32 path's would be).
LLMKERN_DA512VNNI __attribute__((noinline)) inline float quant_q16(const float* x, int64_t D, int16_t* qi, int64_t n) {
  const auto mask = [](int64_t left) LLMKERN_DA512VNNI {
    return left >= 16 ? __mmask16(0xffff) : (left <= 0 ? __mmask16(0) : static_cast<__mmask16>((1u << left) - 1));
  };
  __m512 mx = _mm512_setzero_ps();
  __mmask16 bad = 0;
  for (int64_t d = 0; d < D; d += 16) {
    const __m512 ax = _mm512_abs_ps(_mm512_maskz_loadu_ps(mask(D - d), x + d));
    bad |= _mm512_cmp_ps_mask(ax, _mm512_set1_ps(INFINITY), _CMP_NLT_UQ);  // inf or NaN
    mx = _mm512_max_ps(mx, ax);
  }
  if (bad) {
    for (int64_t d = 0; d < n; ++d) qi[d] = 0;
    return NAN;
  }
  const float m = _mm512_reduce_max_ps(mx);
  const __m512 inv = _mm512_set1_ps(m > 0.0f ? kI16Max / m : 0.0f);
  for (int64_t d = 0; d < n; d += 16)  // |x * inv| <= 32767 (+ rounding): the saturating narrowing is exact
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(qi + d),
                        _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(
                            _mm512_mul_ps(_mm512_maskz_loadu_ps(mask(D - d), x + d), inv))));
  return m / kI16Max;
}

// The 16 int8 keys at kp[jj] + off (bytes), D values each, sign-extended to int16 rows of kb (stride kbs
// elements), zeros from D to the next multiple of 32 (masked loads: nothing past a key's D is read).
LLMKERN_DA512VNNI __attribute__((noinline)) inline void keys_i16(const char* const* kp, int64_t off, int64_t D,
                                                                 int16_t* kb, int64_t kbs) {
  for (int jj = 0; jj < 16; ++jj) {
    const int8_t* k = reinterpret_cast<const int8_t*>(kp[jj] + off);
    for (int64_t c = 0; c < D; c += 32) {
      const __mmask32 m = D - c >= 32 ? ~__mmask32(0) : (__mmask32(1) << (D - c)) - 1;
      _mm512_storeu_si512(kb + jj * kbs + c, _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, k + c)));
    }
  }
}

// out lane i = sum of the 16 lanes of v_i (the transpose-and-add tree of OpsAvx512::hsum16, on int32: exact).
LLMKERN_DA512VNNI_INLINE __m512i hsum16_epi32(const __m512i* v) {
  __m512i t[8], u[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit block: [v2i, v2i+1, v2i, v2i+1] partials
    t[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
                            _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per block: [v4i, v4i+1, v4i+2, v4i+3] partials
    u[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(t[2 * i], t[2 * i + 1]),
                            _mm512_unpackhi_epi64(t[2 * i], t[2 * i + 1]));
  const __m512i x0 = _mm512_add_epi32(_mm512_shuffle_i32x4(u[0], u[1], 0x88), _mm512_shuffle_i32x4(u[0], u[1], 0xdd));
  const __m512i x1 = _mm512_add_epi32(_mm512_shuffle_i32x4(u[2], u[3], 0x88), _mm512_shuffle_i32x4(u[2], u[3], 0xdd));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(x0, x1, 0x88), _mm512_shuffle_i32x4(x0, x1, 0xdd));
}

// Scores of nr int16 query rows (row stride qs elements, zeros past D up to a multiple of 32) against the 16
// int16 keys of kb (keys_i16): s[r * ss + jj] = qsc[r] * dot(q_r, key jj). The integer dot is exact: |sum| <=
// 256 * 32767 * 127 < 2^31 for D <= 256.
LLMKERN_DA512VNNI __attribute__((noinline)) inline void qk_i16_rows(const int16_t* q, int64_t qs, int64_t nr,
                                                                    const int16_t* kb, int64_t kbs, int64_t D,
                                                                    const float* qsc, float* s, int64_t ss) {
  for (int64_t r = 0; r < nr; ++r) {
    __m512i a[16];
#pragma GCC unroll 16
    for (int jj = 0; jj < 16; ++jj) a[jj] = _mm512_setzero_si512();
    const int16_t* qr = q + r * qs;
    for (int64_t c = 0; c < D; c += 32) {
      const __m512i qv = _mm512_loadu_si512(qr + c);
#pragma GCC unroll 16
      for (int jj = 0; jj < 16; ++jj) a[jj] = _mm512_dpwssd_epi32(a[jj], qv, _mm512_loadu_si512(kb + jj * kbs + c));
    }
    _mm512_storeu_ps(s + r * ss, _mm512_mul_ps(_mm512_cvtepi32_ps(hsum16_epi32(a)), _mm512_set1_ps(qsc[r])));
  }
}

// Softmax weights of one row's tile (w[0..nt), fp32, the value scales already in) to int16: wq[jj] =
// round(w[jj] / wsc) for jj < nt, 0 from nt to 32; returns wsc = max|w| / 32767 (0 when all are 0), or NaN when
// a weight is NaN or infinite (wq then unwritten): the row's output becomes NaN, as the fp32 path's would.
LLMKERN_DA512VNNI __attribute__((noinline)) inline float quant_w16(const float* w, int nt, int16_t* wq) {
  const __mmask16 m0 = nt >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << nt) - 1);
  const __mmask16 m1 = nt >= 32 ? __mmask16(0xffff) : (nt <= 16 ? 0 : static_cast<__mmask16>((1u << (nt - 16)) - 1));
  const __m512 w0 = _mm512_maskz_loadu_ps(m0, w), w1 = _mm512_maskz_loadu_ps(m1, w + 16);
  const float mx = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(w0), _mm512_abs_ps(w1)));
  // A NaN lane may be dropped by vmaxps (it returns the second operand): test every lane instead.
  const __mmask16 bad0 = _mm512_cmp_ps_mask(_mm512_abs_ps(w0), _mm512_set1_ps(INFINITY), _CMP_NLT_UQ);
  const __mmask16 bad1 = _mm512_cmp_ps_mask(_mm512_abs_ps(w1), _mm512_set1_ps(INFINITY), _CMP_NLT_UQ);
  if (bad0 | bad1) return NAN;
  const __m512 inv = _mm512_set1_ps(mx > 0.0f ? kI16Max / mx : 0.0f);
  // Round to nearest (the MXCSR default); |w * inv| <= 32767 (+ rounding) so the narrowing cannot saturate badly.
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(wq),
                      _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(w0, inv))));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(wq + 16),
                      _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(w1, inv))));
  return mx / kI16Max;
}

// acc rows [0, NR) (stride Dp floats) columns [0, 32 * NC) (only those < dp are stored; values past nc read as
// 0) += wsc[r] * sum_jj wq[r * 32 + jj] * v[jj] over the np key pairs (2 np keys) of int8 value rows at vp[jj] +
// off (bytes). Two keys' values are interleaved into int16 pairs (vpmovsxbw, vpunpck{l,h}wd) so that one
// vpdpwssd multiplies both by their broadcast weight pair: per 32 columns of a key pair 2 loads and 4 shuffles,
// then 2 dot products per row. The unpacks work inside 128-bit blocks: the "lo" sums hold columns 0-3, 8-11,
// 16-19, 24-27 of each 32 and the "hi" sums 4-7, 12-15, ...; the flush puts them back in order.
template <int NR, int NC>
LLMKERN_DA512VNNI __attribute__((noinline)) void pv_i16(float* acc, int64_t Dp, const int16_t* wq, const float* wsc,
                                                        const char* const* vp, int64_t off, int np, int64_t nc,
                                                        int64_t dp) {
  __m512i lo[NR * NC], hi[NR * NC];
  __mmask32 m[NC];
#pragma GCC unroll 32
  for (int i = 0; i < NR * NC; ++i) lo[i] = hi[i] = _mm512_setzero_si512();
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c) {
    const int64_t n = nc - 32 * c;
    m[c] = n >= 32 ? ~__mmask32(0) : (n <= 0 ? 0 : (__mmask32(1) << n) - 1);
  }
  for (int p = 0; p < np; ++p) {
    const int8_t* va = reinterpret_cast<const int8_t*>(vp[2 * p] + off);
    const int8_t* vb = reinterpret_cast<const int8_t*>(vp[2 * p + 1] + off);
    __m512i xl[NC], xh[NC];
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) {
      const __m512i A = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m[c], va + 32 * c));
      const __m512i B = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m[c], vb + 32 * c));
      xl[c] = _mm512_unpacklo_epi16(A, B);
      xh[c] = _mm512_unpackhi_epi16(A, B);
    }
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      int32_t pair;
      __builtin_memcpy(&pair, wq + r * 32 + 2 * p, 4);
      const __m512i w = _mm512_set1_epi32(pair);
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) {
        lo[r * NC + c] = _mm512_dpwssd_epi32(lo[r * NC + c], xl[c], w);
        hi[r * NC + c] = _mm512_dpwssd_epi32(hi[r * NC + c], xh[c], w);
      }
    }
  }
  // Columns 0-15 of a 32-column chunk: lo blocks 0, 1 and hi blocks 0, 1 interleaved by 4; 16-31: blocks 2, 3.
  const __m512i i0 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i i1 = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) {
    const __m512 sc = _mm512_set1_ps(wsc[r]);
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) {
      const __m512 fl = _mm512_cvtepi32_ps(lo[r * NC + c]), fh = _mm512_cvtepi32_ps(hi[r * NC + c]);
      float* o = acc + r * Dp + 32 * c;
      if (32 * c < dp) _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_permutex2var_ps(fl, i0, fh), sc, _mm512_loadu_ps(o)));
      if (32 * c + 16 < dp)
        _mm512_storeu_ps(o + 16, _mm512_fmadd_ps(_mm512_permutex2var_ps(fl, i1, fh), sc, _mm512_loadu_ps(o + 16)));
    }
  }
}

// acc rows [0, R) (stride Dp) += wsc[r] * sum_jj wq[r * 32 + jj] * v[jj] over the nt value rows at vp[jj] + off
// (bytes), D values each: rows four at a time (64 columns per pass; one or two rows: 128). An odd nt reads the
// pair partner vp[nt], which the caller points at a valid row (its weight is 0).
LLMKERN_DA512VNNI __attribute__((noinline)) inline void pv_i16_rows(float* acc, int64_t Dp, int64_t R,
                                                                    const int16_t* wq, const float* wsc,
                                                                    const char* const* vp, int64_t off, int nt,
                                                                    int64_t D) {
  const int np = (nt + 1) / 2;
  for (int64_t r = 0; r < R; r += 4) {
    const int64_t nr = R - r < 4 ? R - r : 4;
    float* ar = acc + r * Dp;
    const int16_t* wr = wq + r * 32;
    const float* sr = wsc + r;
    const int64_t step = nr <= 2 ? 128 : 64;
    for (int64_t c0 = 0; c0 < D; c0 += step) {
      const int64_t nc = D - c0, dp = Dp - c0;
      switch (nr) {
        case 1: pv_i16<1, 4>(ar + c0, Dp, wr, sr, vp, off + c0, np, nc, dp); break;
        case 2: pv_i16<2, 4>(ar + c0, Dp, wr, sr, vp, off + c0, np, nc, dp); break;
        case 3: pv_i16<3, 2>(ar + c0, Dp, wr, sr, vp, off + c0, np, nc, dp); break;
        default: pv_i16<4, 2>(ar + c0, Dp, wr, sr, vp, off + c0, np, nc, dp);
      }
    }
  }
}

}  // namespace da512
}  // namespace cpu
}  // namespace llmkern
