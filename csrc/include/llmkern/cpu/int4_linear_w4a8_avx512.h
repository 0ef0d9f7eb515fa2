// W4A8 int4_linear tiles with AVX-512 VNNI (see int4_linear_w4a8_common.h for the arithmetic and
// the weight layout).
//
// Per chunk (16 rows x 8 values of k, 64 bytes) and weight block: one load, the two nibble halves
// (and, shift + and), then per activation row two vpdpbusd whose signed operand is the row's 4
// activation bytes broadcast from memory ({1to16}: no broadcast instruction, no register). Per group:
// the int32 sums are converted once, scaled (scale * D + offset * A) and weighted by the group's
// activation scale into fp32 accumulators.
#pragma once

#include "llmkern/cpu/int4_linear_w4a8_common.h"
#include "llmkern/cpu/int8_linear_avx512.h"  // LLMKERN_AVX512, quantize_row, tail64, dpbusd
#include "llmkern/cpu/store_avx512.h"

namespace llmkern {
namespace cpu {
namespace w4a8_avx512 {

// acc += vpdpbusd(w u8, broadcast of the 4 signed bytes at a). asm: GCC 12 otherwise copies the
// accumulator around the intrinsic, and the embedded broadcast saves a register per row.
LLMKERN_AVX512_INLINE void dpbusd_bcast(__m512i& acc, __m512i w, const int8_t* a) {
  __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*reinterpret_cast<const int32_t*>(a)));
}

constexpr int64_t kPrefetch = 1024;

template <int E>
LLMKERN_AVX512_INLINE __m512 load_scales(const uint8_t* p) {
  if (E == 2) return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_loadu_ps(p);
}

// MR rows x NR blocks. Two int32 accumulators (low / high nibbles) per output vector when the tile
// has few of them (MR * NR <= 4): vpdpbusd has a latency of several cycles, and one chain per vector
// would stall on it in the one-row decode tile.
template <int MR, int NR, int E>
LLMKERN_AVX512 void tile(const W4A8Tile& t) {
  constexpr bool kDual = MR * NR <= 4;
  const int64_t G = t.G, gb = w4a8_group_bytes(G, E), chunks = G / 8;
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  __m512 accf[MR][NR];
  LLMKERN_UNROLL for (int i = 0; i < MR; ++i) LLMKERN_UNROLL for (int j = 0; j < NR; ++j) accf[i][j] = _mm512_setzero_ps();
  const uint8_t* wp[NR];
  LLMKERN_UNROLL for (int j = 0; j < NR; ++j) wp[j] = t.w + j * t.block_bytes;
  for (int64_t g = 0; g < t.ngroups; ++g) {
    __m512i acc[MR][NR], acc2[MR][NR];
    LLMKERN_UNROLL for (int i = 0; i < MR; ++i) LLMKERN_UNROLL for (int j = 0; j < NR; ++j) {
      acc[i][j] = _mm512_setzero_si512();
      if (kDual) acc2[i][j] = _mm512_setzero_si512();
    }
    const int64_t k0 = g * G;
    for (int64_t c = 0; c < chunks; ++c) {
      __m512i lo[NR], hi[NR];
      LLMKERN_UNROLL for (int j = 0; j < NR; ++j) {
        // The next tiles read further along each block: a software prefetch kPrefetch bytes ahead keeps
        // several streams fed at once (decode reads every block from memory exactly once).
        _mm_prefetch(reinterpret_cast<const char*>(wp[j] + c * 64 + kPrefetch), _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(wp[j] + c * 64);
        lo[j] = _mm512_and_si512(v, m4);
        hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
      }
      LLMKERN_UNROLL for (int i = 0; i < MR; ++i) {
        const int8_t* a = t.q[i] + k0 + 8 * c;
        if constexpr (NR == 1) {  // each activation word is used once: broadcast it inside the vpdpbusd
          dpbusd_bcast(acc[i][0], lo[0], a);
          dpbusd_bcast(kDual ? acc2[i][0] : acc[i][0], hi[0], a + 4);
        } else {  // used by NR blocks: one broadcast load into a register, not one load per block
          int32_t wl, wh;
          std::memcpy(&wl, a, 4);
          std::memcpy(&wh, a + 4, 4);
          const __m512i al = _mm512_set1_epi32(wl), ah = _mm512_set1_epi32(wh);
          LLMKERN_UNROLL for (int j = 0; j < NR; ++j) {
            avx512::dpbusd(acc[i][j], lo[j], al);
            avx512::dpbusd(kDual ? acc2[i][j] : acc[i][j], hi[j], ah);
          }
        }
      }
    }
    LLMKERN_UNROLL for (int j = 0; j < NR; ++j) {
      const __m512 s = load_scales<E>(wp[j] + 8 * G), o = load_scales<E>(wp[j] + 8 * G + kW4A8Rows * E);
      LLMKERN_UNROLL for (int i = 0; i < MR; ++i) {
        const __m512i d = kDual ? _mm512_add_epi32(acc[i][j], acc2[i][j]) : acc[i][j];
        const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, _mm512_mul_ps(o, _mm512_set1_ps(t.asum[i][g])));
        accf[i][j] = _mm512_fmadd_ps(v, _mm512_set1_ps(t.sx[i][g]), accf[i][j]);
      }
      wp[j] += gb;
    }
  }
  LLMKERN_UNROLL for (int i = 0; i < MR; ++i) LLMKERN_UNROLL for (int j = 0; j < NR; ++j)
    _mm512_storeu_ps(t.res + i * t.res_stride + j * kW4A8Rows, accf[i][j]);
}

// Row quantization (int8_linear's rule, per row or per group of G; the AVX-512 quantizer stores
// q + 128), then per group: the bytes flipped to the signed q, and A = (sum of the stored bytes) -
// 128 G, exact via vpsadbw.
LLMKERN_AVX512 inline void prep_row(const void* x, DType dt, int64_t K, int64_t G, bool per_group, int8_t* q, float* sx,
                                    float* asum) {
  if (per_group) {
    for (int64_t g = 0; g < K / G; ++g)
      avx512::quantize_row(static_cast<const char*>(x) + g * G * dtype_size(dt), dt, G, q + g * G, sx + g);
  } else {
    avx512::quantize_row(x, dt, K, q, sx);
    for (int64_t g = 1; g < K / G; ++g) sx[g] = sx[0];
  }
  uint8_t* u = reinterpret_cast<uint8_t*>(q);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80)), zero = _mm512_setzero_si512();
  const __mmask64 m = avx512::tail64(G < 64 ? G : 64);
  for (int64_t g = 0; g < K / G; ++g) {
    __m512i s = _mm512_setzero_si512();
    for (int64_t k = g * G; k < (g + 1) * G; k += 64) {
      const __m512i v = _mm512_maskz_loadu_epi8(m, u + k);
      s = _mm512_add_epi64(s, _mm512_sad_epu8(v, zero));
      _mm512_mask_storeu_epi8(u + k, m, _mm512_xor_si512(v, flip));
    }
    asum[g] = static_cast<float>(_mm512_reduce_add_epi64(s) - 128 * G);
  }
}

}  // namespace w4a8_avx512
}  // namespace cpu
}  // namespace llmkern
