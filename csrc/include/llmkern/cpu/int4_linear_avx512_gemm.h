// int4_linear prefill with AVX-512: weight panels unpacked once and micro-kernels over many rows.
//
// Panel: 48 weight rows (3 vectors of 16 output columns) x kc values of k, stored k-major so that a
// micro-kernel step loads whole column vectors:
//   fp32 route (any x):        w[k][48]   = w[n, k] = q * scale + offset in fp32    (kc = 128, 24 KiB)
//   bf16 route (bf16 x, BF16): w[k/2][48] = bf16 pair (w[n, k], w[n, k+1]) of the dequantized
//                              weights w = q * scale + offset, rounded to bf16  (kc = 256, 24 KiB)
// The canonical bytes are [n][k/2]; 16 rows x 64 bytes are loaded as a 16 x 16 matrix of 32-bit
// words and transposed, after which word d of every row (8 nibbles, k = 8d .. 8d+7) sits in one
// vector with one lane per row: each nibble is a shift and a 16-entry table permute (vpermps reads
// the low 4 index bits) away.
//
// Micro-kernels: MR <= 8 rows x NV <= 3 column vectors = 24 accumulators, independent chains
// enough to cover the 4-6 cycle latency of FMA / vdpbf16ps at 2 per cycle; x is broadcast from its
// row (one fp32 value) or from the packed rows (a bf16 pair; 8 rows' pairs are 32 contiguous bytes).
// Both routes: a plain GEMM over the K block from C (or 0) to C in the thread's C tile; the last K
// block adds the bias and stores y in x's dtype.
#pragma once

#include "llmkern/cpu/bf16_pairs_avx512.h"
#include "llmkern/cpu/int4_linear_avx512.h"
#include "llmkern/cpu/panel_gemm.h"

namespace llmkern {
namespace cpu {
namespace int4_avx512 {

constexpr int64_t kNS = 48, kKCf32 = 128, kKCbf16 = 256, kMR = 8;
static_assert(kNS <= kMaxNS && kMR <= kMaxMR && kKCbf16 <= kMaxKC && kKCf32 * kNS * 4 <= kPanelBytes, "panel fits the workspace");

using bf16pairs::transpose16;      // (shared with int8_linear's bf16 GEMM: bf16_pairs_avx512.h)
using bf16pairs::pack_rows_bf16;

// 16 weight rows (rows >= nrows read as 0), `bytes` bytes from byte `off` of each, transposed.
LLMKERN_I4_AVX512_INLINE void load_words(const uint8_t* qw, int64_t rb, int64_t nrows, int64_t off, int64_t bytes,
                                         __m512i (&r)[16]) {
  const __mmask16 dm = tail16(bytes / 4);
  LLMKERN_I4_UNROLL for (int n = 0; n < 16; ++n)
    r[n] = n < nrows ? _mm512_maskz_loadu_epi32(dm, qw + n * rb + off) : _mm512_setzero_si512();
  transpose16(r);
}

// Scales or offsets of a strip: dst[g * NS + n] = src[n * ngroups + g] for rows n < ncols, 0 for
// ncols <= n < NS (NS = kNS); 16 rows x 16 groups at a time through the word transpose.
LLMKERN_I4_AVX512 inline void strip_groups(const float* src, int64_t ngroups, int64_t ncols, float* dst) {
  for (int64_t v = 0; v * 16 < kNS; ++v) {
    for (int64_t g = 0; g < ngroups; g += 16) {
      const __mmask16 m = tail16(ngroups - g);
      __m512i r[16];
      LLMKERN_I4_UNROLL for (int n = 0; n < 16; ++n)
        r[n] = 16 * v + n < ncols ? _mm512_maskz_loadu_epi32(m, src + (16 * v + n) * ngroups + g) : _mm512_setzero_si512();
      transpose16(r);
      for (int64_t j = 0; j < 16 && g + j < ngroups; ++j) _mm512_storeu_si512(dst + (g + j) * kNS + 16 * v, r[j]);
    }
  }
}

static_assert(kMR == 8, "packed x: one micro-kernel call reads one block of 8 rows");

// fp32 panel of dequantized weights: w[k * kNS + n] = q[n0 + n, k0 + k] * scale + offset in fp32 (multiply,
// then add: the canonical value, exactly), for the vectors that hold columns < ncols.
LLMKERN_I4_AVX512 inline void unpack_panel_f32(const uint8_t* qw, int64_t rb, int64_t ncols, int64_t k0, int64_t kc,
                                               const float* ss, const float* oo, int64_t G, float* w) {
  const __m512 tab = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int gs = __builtin_ctzll(static_cast<uint64_t>(G));
  for (int64_t v = 0; v * 16 < ncols; ++v) {
    for (int64_t c = 0; c * 128 < kc; ++c) {
      const int64_t bytes = kc / 2 - 64 * c < 64 ? kc / 2 - 64 * c : 64;
      __m512i r[16];
      load_words(qw + 16 * v * rb, rb, ncols - 16 * v, k0 / 2 + 64 * c, bytes, r);
      for (int64_t d = 0; d < bytes / 4; ++d) {
        const int64_t g = (128 * c + 8 * d) >> gs;  // the word's 8 values of k lie in one group
        const __m512 sv = _mm512_loadu_ps(ss + g * kNS + 16 * v), ov = _mm512_loadu_ps(oo + g * kNS + 16 * v);
        float* dst = w + (128 * c + 8 * d) * kNS + 16 * v;
        LLMKERN_I4_UNROLL for (int t = 0; t < 8; ++t) {
          const __m512 q = _mm512_permutexvar_ps(_mm512_srli_epi32(r[d], 4 * t), tab);
          _mm512_storeu_ps(dst + t * kNS, _mm512_add_ps(pgemm::rounded(_mm512_mul_ps(q, sv)), ov));
        }
      }
    }
  }
}

// bf16 pair panel of dequantized weights: word w[p * kNS + n] = (bf16(w[n, k]), bf16(w[n, k + 1])),
// k = k0 + 2p, with w = q * scale + offset in fp32 (multiply, then add: the canonical value) rounded
// to bf16 (nearest even; vcvtne2ps2bf16 flushes fp32 denormals, |w| < 2^-126, to 0).
LLMKERN_I4_BF16 inline void unpack_panel_bf16(const uint8_t* qw, int64_t rb, int64_t ncols, int64_t k0, int64_t kc,
                                              const float* ss, const float* oo, int64_t G, uint32_t* w) {
  const __m512 tab = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // cvtne2ps2bf16(b, a) puts a's 16 values in words 0..15 and b's in 16..31: interleave to pairs.
  const __m512i pairs = _mm512_setr_epi32(16 << 16 | 0, 17 << 16 | 1, 18 << 16 | 2, 19 << 16 | 3, 20 << 16 | 4,
                                          21 << 16 | 5, 22 << 16 | 6, 23 << 16 | 7, 24 << 16 | 8, 25 << 16 | 9,
                                          26 << 16 | 10, 27 << 16 | 11, 28 << 16 | 12, 29 << 16 | 13,
                                          30 << 16 | 14, 31 << 16 | 15);
  const int gs = __builtin_ctzll(static_cast<uint64_t>(G));
  for (int64_t v = 0; v * 16 < ncols; ++v) {
    for (int64_t c = 0; c * 128 < kc; ++c) {
      const int64_t bytes = kc / 2 - 64 * c < 64 ? kc / 2 - 64 * c : 64;
      __m512i r[16];
      load_words(qw + 16 * v * rb, rb, ncols - 16 * v, k0 / 2 + 64 * c, bytes, r);
      for (int64_t d = 0; d < bytes / 4; ++d) {
        const int64_t g = (128 * c + 8 * d) >> gs;  // the word's 8 values of k lie in one group
        const __m512 s = _mm512_loadu_ps(ss + g * kNS + 16 * v), o = _mm512_loadu_ps(oo + g * kNS + 16 * v);
        uint32_t* dst = w + (64 * c + 4 * d) * kNS + 16 * v;
        LLMKERN_I4_UNROLL for (int b = 0; b < 4; ++b) {  // byte b of the word: pair 4d + b
          const __m512 lo = _mm512_permutexvar_ps(_mm512_srli_epi32(r[d], 8 * b), tab);
          const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(r[d], 8 * b + 4), tab);
          const __m512 wl = _mm512_add_ps(pgemm::rounded(_mm512_mul_ps(lo, s)), o);
          const __m512 wh = _mm512_add_ps(pgemm::rounded(_mm512_mul_ps(hi, s)), o);
          const __m512i bf = (__m512i)_mm512_cvtne2ps_pbh(wh, wl);
          _mm512_storeu_si512(dst + b * kNS, _mm512_permutexvar_epi16(pairs, bf));
        }
      }
    }
  }
}

// Dequantized fp32 panel: panel_gemm.h's fp32 GEMM tile over the K block from C (or 0) to C (or y).
// (Folding each group's sums with its scale and offset instead, from panels of q, measured 1.04-1.05x
// slower at G = 32, the same at G = 128.)
static_assert(kNS == pgemm::avx512::kNS && kMR <= 8, "the shared micro-kernels' panel width and rows");
template <int MR, int NV>
LLMKERN_I4_AVX512 void micro_f32(const Panel& p, const Micro& m) {
  pgemm::avx512::micro<MR, NV>(static_cast<const float*>(p.w), p.kc, gemm_rows<MR>(m));
}

// Dequantized bf16 panel: a plain bf16 GEMM tile, MR x NV vectors of fp32 sums over the K block,
// started from C (or 0) and ended in C (or y).
template <int MR, int NV>
LLMKERN_I4_BF16 void micro_bf16(const Panel& p, const Micro& m) {
  const uint32_t* w = static_cast<const uint32_t*>(p.w);
  const uint32_t* xp = static_cast<const uint32_t*>(m.x[0]);  // packed: pair pp of row i at pp * 8 + i
  __m512 acc[MR][NV];
  LLMKERN_I4_UNROLL for (int i = 0; i < MR; ++i)
    LLMKERN_I4_UNROLL for (int v = 0; v < NV; ++v)
      acc[i][v] = m.first ? _mm512_setzero_ps() : _mm512_loadu_ps(m.c + i * kNS + 16 * v);
  for (int64_t pp = 0; pp < p.kc / 2; ++pp) {
    __m512i wv[NV];
    LLMKERN_I4_UNROLL for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_si512(w + pp * kNS + 16 * v);
    LLMKERN_I4_UNROLL for (int i = 0; i < MR; ++i) {
      const __m512i xb = _mm512_set1_epi32(static_cast<int>(xp[pp * 8 + i]));  // x[k], x[k + 1]
      LLMKERN_I4_UNROLL for (int v = 0; v < NV; ++v)
        acc[i][v] = _mm512_dpbf16_ps(acc[i][v], (__m512bh)xb, (__m512bh)wv[v]);
    }
  }
  const int64_t es = dtype_size(m.dt);
  LLMKERN_I4_UNROLL for (int i = 0; i < MR; ++i)
    LLMKERN_I4_UNROLL for (int v = 0; v < NV; ++v) {
      if (m.last)
        store16(acc[i][v], m.bias ? m.bias + 16 * v : nullptr, static_cast<char*>(m.out[i]) + 16 * v * es, m.dt,
                tail16(m.ncols - 16 * v));
      else
        _mm512_storeu_ps(m.c + i * kNS + 16 * v, acc[i][v]);
    }
}

}  // namespace int4_avx512
}  // namespace cpu
}  // namespace llmkern
