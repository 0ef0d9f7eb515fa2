// W4A8 int4_linear tiles with AVX2 (see int4_linear_w4a8_common.h for the arithmetic and the layout).
//
// AVX2 has no vpdpbusd: vpmaddubsw multiplies the u8 nibbles by the signed activation bytes and adds
// pairs into int16 (|q0 a0 + q1 a1| <= 2 * 15 * 127: no saturation), the low- and high-nibble pairs
// are added in int16 (<= 7620), and vpmaddwd by ones widens to the same int32 sums of 4 products
// that vpdpbusd gives. A block's 16 rows are two halves of 8 (one ymm each), done one after the other
// (16 ymm registers hold MR <= 2 rows' accumulators for one half).
#pragma once

#include "llmkern/cpu/int4_linear_w4a8_common.h"
#include "llmkern/cpu/int8_linear_avx2.h"  // LLMKERN_AVX2, the intrinsics header

namespace llmkern {
namespace cpu {
namespace w4a8_avx2 {

template <int E>
LLMKERN_AVX2_INLINE __m256 load_scales8(const uint8_t* p) {
  if (E == 2) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
}

LLMKERN_AVX2_INLINE __m256i bcast4(const int8_t* a) {
  int32_t v;
  std::memcpy(&v, a, 4);
  return _mm256_set1_epi32(v);
}

// MR rows x NR blocks, each block as two halves of 8 rows.
template <int MR, int NR, int E>
LLMKERN_AVX2 void tile(const W4A8Tile& t) {
  const int64_t G = t.G, gb = w4a8_group_bytes(G, E), chunks = G / 8;
  const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int j = 0; j < NR; ++j) {
    for (int h = 0; h < 2; ++h) {
      const uint8_t* wp = t.w + j * t.block_bytes + 32 * h;
      __m256 accf[MR];
      LLMKERN_UNROLL for (int i = 0; i < MR; ++i) accf[i] = _mm256_setzero_ps();
      for (int64_t g = 0; g < t.ngroups; ++g) {
        __m256i acc[MR];
        LLMKERN_UNROLL for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_si256();
        const int64_t k0 = g * G;
        for (int64_t c = 0; c < chunks; ++c) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + c * 64));
          const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
          LLMKERN_UNROLL for (int i = 0; i < MR; ++i) {
            const int8_t* a = t.q[i] + k0 + 8 * c;
            const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, bcast4(a)), _mm256_maddubs_epi16(hi, bcast4(a + 4)));
            acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(p, ones));
          }
        }
        const __m256 s = load_scales8<E>(wp - 32 * h + 8 * G + 8 * h * E);
        const __m256 o = load_scales8<E>(wp - 32 * h + 8 * G + (kW4A8Rows + 8 * h) * E);
        LLMKERN_UNROLL for (int i = 0; i < MR; ++i) {
          const __m256 u = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i]), s, _mm256_mul_ps(o, _mm256_set1_ps(t.asum[i][g])));
          accf[i] = _mm256_fmadd_ps(u, _mm256_set1_ps(t.sx[i][g]), accf[i]);
        }
        wp += gb;
      }
      LLMKERN_UNROLL for (int i = 0; i < MR; ++i)
        _mm256_storeu_ps(t.res + i * t.res_stride + j * kW4A8Rows + 8 * h, accf[i]);
    }
  }
}

}  // namespace w4a8_avx2
}  // namespace cpu
}  // namespace llmkern
