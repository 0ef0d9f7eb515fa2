// The rows16 layout (int4_linear_rows16.h) read by the AVX-512 prefill path, and turned back into the
// canonical tensors.
//
// A prepared Int4Linear on an AVX-512 CPU with BF16 decodes from rows16; when its prefill reads rows16
// too, the module needs no canonical tensors at all (Int4Linear "release": 4.75-6 bits per weight held
// instead of 10.75-12). rows16 already holds what the prefill panel (int4_linear_avx512_gemm.h) wants:
// one 64-byte chunk is 16 weight rows (one per 32-bit lane) x 8 values of k, the canonical path's
// transposed word, only with the nibbles in another order (lane bits 4t: k0 + 2t, bits 16 + 4t:
// k0 + 2t + 1). So a panel vector is a shift and a table permute away, with no transpose, and a group's
// 16 scales and offsets are one vector each. Every panel value is q * scale + offset in fp32 (multiply,
// then add) with the canonical scale and offset (E = 2: fp16 values, exact in fp32; E = 1: code times
// factor, exact by construction), so the panels, and the outputs, are the canonical path's bit for bit.
#pragma once

#include <omp.h>

#include <cstdint>
#include <cstring>

#include "llmkern/cpu/int4_linear_avx512.h"
#include "llmkern/cpu/int4_linear_rows16.h"
#include "llmkern/cpu/panel_gemm.h"

namespace llmkern {
namespace cpu {
namespace int4_rows16 {

constexpr int64_t kPanelNS = 48;  // panel width: int4_avx512::kNS (3 blocks of 16 rows)

// fp32 panel w[k * kPanelNS + n] = q[n0 + n, k0 + k] * scale + offset for the blocks that hold columns
// n < ncols; blocks: the rows16 block of row n0 (n0 % 16 == 0), bb bytes apart. k0 and kc are multiples
// of G (the prefill's K blocks are whole groups).
template <int E>
LLMKERN_I4_AVX512 void unpack_panel_f32(const uint8_t* blocks, int64_t bb, int64_t ncols, int64_t k0, int64_t kc,
                                        int64_t G, void* panel) {
  float* w = static_cast<float*>(panel);
  const __m512 tab = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t v = 0; v * 16 < ncols; ++v) {
    const uint8_t* bp = blocks + v * bb;
    for (int64_t g = k0 / G; g < (k0 + kc) / G; ++g) {
      __m512 s, o;
      scales16<E>(bp, g, G, s, o);
      const uint8_t* gp = bp + group_offset(g, G, E);
      for (int64_t ch = 0; ch < G / 8; ++ch) {
        const __m512i q8 = _mm512_loadu_si512(gp + 64 * ch);
        float* dst = w + (g * G + 8 * ch - k0) * kPanelNS + 16 * v;
        LLMKERN_I4_UNROLL for (int e = 0; e < 8; ++e) {  // k = k0 + e: nibble e / 2 of half e % 2
          const __m512 q = _mm512_permutexvar_ps(_mm512_srli_epi32(q8, 4 * (e / 2) + 16 * (e % 2)), tab);
          _mm512_storeu_ps(dst + e * kPanelNS, _mm512_add_ps(pgemm::rounded(_mm512_mul_ps(q, s)), o));
        }
      }
    }
  }
}

// bf16 pair panel (int4_avx512::unpack_panel_bf16's): word w[p * kPanelNS + n] = (bf16(w[n, k]),
// bf16(w[n, k + 1])), k = k0 + 2p, from rows16 blocks as unpack_panel_f32.
template <int E>
LLMKERN_I4_BF16 void unpack_panel_bf16(const uint8_t* blocks, int64_t bb, int64_t ncols, int64_t k0, int64_t kc,
                                       int64_t G, void* panel) {
  uint32_t* w = static_cast<uint32_t*>(panel);
  const __m512 tab = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // cvtne2ps2bf16(b, a) puts a's 16 values in words 0..15 and b's in 16..31: interleave to pairs.
  const __m512i pairs = _mm512_setr_epi32(16 << 16 | 0, 17 << 16 | 1, 18 << 16 | 2, 19 << 16 | 3, 20 << 16 | 4,
                                          21 << 16 | 5, 22 << 16 | 6, 23 << 16 | 7, 24 << 16 | 8, 25 << 16 | 9,
                                          26 << 16 | 10, 27 << 16 | 11, 28 << 16 | 12, 29 << 16 | 13,
                                          30 << 16 | 14, 31 << 16 | 15);
  for (int64_t v = 0; v * 16 < ncols; ++v) {
    const uint8_t* bp = blocks + v * bb;
    for (int64_t g = k0 / G; g < (k0 + kc) / G; ++g) {
      __m512 s, o;
      scales16<E>(bp, g, G, s, o);
      const uint8_t* gp = bp + group_offset(g, G, E);
      for (int64_t ch = 0; ch < G / 8; ++ch) {
        const __m512i q8 = _mm512_loadu_si512(gp + 64 * ch);
        uint32_t* dst = w + (g * G + 8 * ch - k0) / 2 * kPanelNS + 16 * v;
        LLMKERN_I4_UNROLL for (int t = 0; t < 4; ++t) {  // pair (k0 + 2t, k0 + 2t + 1): bits 4t and 16 + 4t
          const __m512 lo = _mm512_permutexvar_ps(_mm512_srli_epi32(q8, 4 * t), tab);
          const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(q8, 4 * t + 16), tab);
          const __m512 wl = _mm512_add_ps(pgemm::rounded(_mm512_mul_ps(lo, s)), o);
          const __m512 wh = _mm512_add_ps(pgemm::rounded(_mm512_mul_ps(hi, s)), o);
          const __m512i bf = (__m512i)_mm512_cvtne2ps_pbh(wh, wl);
          _mm512_storeu_si512(dst + t * kPanelNS, _mm512_permutexvar_epi16(pairs, bf));
        }
      }
    }
  }
}

// Bytes [lo, hi) of every block that the groups of k in [k0, k0 + kc) occupy (E = 1: with the factors at
// the head of a super-block that starts there), for the prefill's prefetch of the next strip.
inline void group_span(int64_t k0, int64_t kc, int64_t G, int64_t E, int64_t bb, int64_t* lo, int64_t* hi) {
  const int64_t g0 = k0 / G, g1 = (k0 + kc) / G;
  *lo = group_offset(g0, G, E) - (E == 1 && g0 % kSuper == 0 ? 128 : 0);
  *hi = std::min(bb, group_offset(g1, G, E));
}

// The rows16 layout at pk (E-byte scales) -> canonical qweight [N, K/2], scales and offsets fp32 [N, K/G]:
// the tensors it was packed from, bit for bit (E = 2: fp16 values widened exactly; E = 1: code times factor,
// the product pack checked to be exact). Threads over blocks of 16 rows.
inline void unpack_canonical(const uint8_t* pk, int64_t N, int64_t K, int64_t G, int64_t E, uint8_t* qw,
                             float* scales, float* offsets) {
  const int64_t ng = K / G, rb = K / 2, bb = block_bytes(K, G, E);
  auto get = [E](const uint8_t* p) {
    if (E == 2) {
      uint16_t h;
      std::memcpy(&h, p, 2);
      return f16_to_f32(h);
    }
    float v;
    std::memcpy(&v, p, 4);
    return v;
  };
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < (N + 15) / 16; ++b) {
    const uint8_t* bp = pk + b * bb;
    for (int r = 0; r < 16 && 16 * b + r < N; ++r) {
      const int64_t n = 16 * b + r;
      for (int64_t g = 0; g < ng; ++g) {
        const uint8_t* gp = bp + group_offset(g, G, E);
        for (int64_t c = 0; c < G / 8; ++c) {
          // lane r: bits 4t = q[k0 + 2t], bits 16 + 4t = q[k0 + 2t + 1] -> canonical byte t = (low, high)
          uint32_t w;
          std::memcpy(&w, gp + 64 * c + 4 * r, 4);
          uint8_t* dst = qw + n * rb + (g * G + 8 * c) / 2;
          for (int t = 0; t < 4; ++t)
            dst[t] = static_cast<uint8_t>(((w >> (4 * t)) & 15) | (((w >> (16 + 4 * t)) & 15) << 4));
        }
        if (E == 1) {
          const float* f = reinterpret_cast<const float*>(bp + (g / kSuper) * super_bytes(G));
          float fs, fo;
          std::memcpy(&fs, f + r, 4);
          std::memcpy(&fo, f + 16 + r, 4);
          scales[n * ng + g] = static_cast<float>(gp[8 * G + r]) * fs;
          offsets[n * ng + g] = static_cast<float>(gp[8 * G + 16 + r]) * fo;
        } else {
          scales[n * ng + g] = get(gp + 8 * G + r * E);
          offsets[n * ng + g] = get(gp + 8 * G + (16 + r) * E);
        }
      }
    }
  }
}

}  // namespace int4_rows16
}  // namespace cpu
}  // namespace llmkern
