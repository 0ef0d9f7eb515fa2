// int4_linear decode with 1..16 rows (bf16 x) or 1..8 rows (fp32 x; fp16 x converted to fp32 by the caller)
// on the "rows16" layout: one output row per vector lane. (The prefill reads it too:
// int4_linear_rows16_panel.h.)
//
// The lane = k decode tiles (int4_linear_avx512.h) end every tile with a horizontal sum per output
// and rescale every 128 weights with a permute; with several rows of x that bookkeeping is ~30% of
// the time (docs/notes/cpu-int4-decode-compute.md). Here a vector holds 16 weight rows instead:
//
//   layout, per block of 16 weight rows (rows past N are zero), per group g of G values of k:
//     G / 8 chunks of 64 bytes: chunk c, 32-bit lane r (row 16 b + r), k0 = g G + 8 c:
//       bits 4t..4t+3 = q[k0 + 2t], bits 16 + 4t..16 + 4t + 3 = q[k0 + 2t + 1]   (t = 0..3)
//     then the 16 rows' scales, then their offsets, E bytes each (fp16 when every one is an fp16
//     value, else fp32).
//   A block is contiguous (K/2 + 2 E K/G bytes per row, as the other packed layouts).
//
//   E = 1, "factored" (GGUF Q4_K imports: scale = d * sc, offset = -dmin * m with fp16 d, dmin per 256 k
//   and 6-bit sc, m per 32): the groups come in super-blocks of kSuper = 8, each led by the 16 rows'
//   scale factors then offset factors (fp32, 128 bytes); a group's 16 scales and 16 offsets are then
//   one byte each, integer codes c with scale = c * factor exactly (fp32). K/2 + 2 K/G + 8 K/(8 G) bytes
//   per row: 4.75 bits per weight at G = 32 against 5 (fp16) and 6 (fp32). Used only when every scale
//   and offset factors so (factor_run), and the kernel's fp32 product c * factor then equals the
//   canonical value bit for bit, so outputs equal the E = 4 layout's exactly.
//
//   kernel: for t = 0..3, (chunk >> 4t) & 0x000F000F | 0x43004300 gives each lane the bf16 pair
//   (128 + q[k], 128 + q[k + 1]) exactly (8 significant bits); one vdpbf16ps with the broadcast x
//   pair (x[k], x[k + 1]) adds x . (128 + q) for 16 rows. Per group the 16 sums S meet the scales
//   and offsets: y += s S + (o - 128 s) X(g), X(g) the group's sum of x, so y = sum x (q s + o).
//   No horizontal sums, no permutes.
//   fp32 x: (chunk >> (4t + 16h)) through a vpermps table of 0..15 gives q[k0 + 2t + h] as fp32 for 16
//   rows, one FMA with the broadcast x[k0 + 2t + h]; per group y += s S + o X(g) (S = sum x q exactly
//   as fp32 sums go, no 128 offset).
//
// Rounding: S carries 128 X(g) besides sum x q, so its fp32 rounding error is ~2^-24 * 128 * sum|x|
// per group (and o - 128 s is rounded once): far below the bf16 output's. Denormal bf16 x count as 0
// in the products (DAZ) but not in X(g): < 2^-118 per value. Results do not depend on the thread
// count (each output is one thread's fixed-order sum).
#pragma once

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "llmkern/cpu/features.h"
#include "llmkern/cpu/int4_linear_common.h"
#include "llmkern/cpu/store_avx512.h"

#define LLMKERN_R16_ATTR __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")))
#define LLMKERN_R16_F32_ATTR __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

namespace llmkern {
namespace cpu {
namespace int4_rows16 {

constexpr int kMaxMB = 4;     // rows of x per tile
constexpr int kBlocks = 2;    // 16-row blocks per tile: 2 x 4 x 2 accumulators
constexpr int64_t kMinRows = 1;  // every decode row count: at M = 1 too it beat the packed lane = k layout
                                 // (1-16% cold, docs/notes/cpu-int4-decode-compute.md)

constexpr int64_t kSuper = 8;  // groups per super-block of the factored layout (E = 1)

inline int64_t group_bytes(int64_t G, int64_t E) { return 8 * G + 32 * E; }
inline int64_t super_bytes(int64_t G) { return 128 + kSuper * group_bytes(G, 1); }  // E = 1: factors + 8 groups
inline int64_t block_bytes(int64_t K, int64_t G, int64_t E) {
  return E == 1 ? (K / G / kSuper) * super_bytes(G) : (K / G) * group_bytes(G, E);
}
inline int64_t packed_bytes(int64_t N, int64_t K, int64_t G, int64_t E) { return (N + 15) / 16 * block_bytes(K, G, E); }
// Byte offset of group g (its nibble chunks) in a block.
inline int64_t group_offset(int64_t g, int64_t G, int64_t E) {
  return E == 1 ? (g / kSuper) * super_bytes(G) + 128 + (g % kSuper) * group_bytes(G, 1) : g * group_bytes(G, E);
}
// Whether the factored layout can hold K / G groups (whole super-blocks).
inline bool factored_fits(int64_t K, int64_t G) { return (K / G) % kSuper == 0; }

// v[0..n) (one row's scales or offsets of one super-block) as codes c[i] in 0..255 times one fp32 factor f
// with float(c[i]) * f == v[i] exactly (sign of zero included): true if such f exists. All values must
// share one sign bit (the factor carries it). Q4_K's d * sc factors with f = d and the largest sc (63 when
// llama.cpp chose d = max / 63, tried first; other quantizers pick other d); anything else usually fails
// at the first candidate test, and the caller gives up on the whole matrix at the first failure.
inline bool factor_run(const float* v, int64_t n, float* f, uint8_t* c) {
  const bool neg = std::signbit(v[0]);
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    if (std::signbit(v[i]) != neg || !std::isfinite(v[i])) return false;
    amax = std::max(amax, std::fabs(v[i]));
  }
  if (amax == 0.0f) {
    *f = neg ? -1.0f : 1.0f;
    std::memset(c, 0, n);
    return true;
  }
  for (int t = 0; t < 255; ++t) {
    const int k = t < 63 ? 63 - t : t + 1;  // 63, 62, ..., 1, then 64 .. 255
    const float d = amax / static_cast<float>(k);
    if (!(d * static_cast<float>(k) == amax) || d == 0.0f) continue;
    bool ok = true;
    for (int64_t i = 0; i < n && ok; ++i) {
      const float a = std::fabs(v[i]), r = std::nearbyint(a / d);
      ok = r <= 255.0f && r * d == a;
      c[i] = static_cast<uint8_t>(ok ? r : 0.0f);
    }
    if (ok) {
      *f = neg ? -d : d;
      return true;
    }
  }
  return false;
}

// Whether every row's scales and offsets factor per super-block (factor_run): the factored layout's condition.
inline bool factors_ok(const float* scales, const float* offsets, int64_t N, int64_t ng) {
  std::atomic<bool> bad{false};  // the first failure stops every thread (weights that do not factor: ~1 row each)
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    float f;
    uint8_t c[kSuper];
    for (int64_t sb = 0; sb < ng / kSuper && !bad.load(std::memory_order_relaxed); ++sb)
      if (!factor_run(scales + n * ng + sb * kSuper, kSuper, &f, c) || !factor_run(offsets + n * ng + sb * kSuper, kSuper, &f, c))
        bad.store(true, std::memory_order_relaxed);
  }
  return !bad.load();
}

// 4 nibbles at bits 0, 8, 16, 24 of u -> bits 0, 4, 8, 12 (the other bits of u must be 0).
inline uint32_t compress_nibbles(uint32_t u) {
  u = (u | (u >> 4)) & 0x00FF00FFu;
  return (u | (u >> 8)) & 0x0000FFFFu;
}

// Canonical weights (qweight [N, K/2], low nibble = even k; scales / offsets fp32 [N, K/G]) -> the
// rows16 layout with E-byte scales (E = 2 only when every scale and offset is an fp16 value).
// Threads over blocks of 16 rows (done once per prepared module, on its first call of several rows).
// compress_nibbles on 16 lanes.
LLMKERN_R16_F32_ATTR inline __m512i compress_nibbles16(__m512i u) {
  u = _mm512_and_si512(_mm512_or_si512(u, _mm512_srli_epi32(u, 4)), _mm512_set1_epi32(0x00FF00FF));
  return _mm512_and_si512(_mm512_or_si512(u, _mm512_srli_epi32(u, 8)), _mm512_set1_epi32(0xFFFF));
}

// One whole block of 16 rows (row 0 at qw, its scales / offsets at s / o, rows ng apart) into dst with
// AVX-512: per chunk, the 16 rows' 4 bytes gathered into the lanes and their nibbles compressed as
// compress_nibbles does, one 64-byte store; scales and offsets gathered, fp16 by vcvtps2ph (nearest
// even, as f32_to_f16; E = 2 only for exact fp16 values anyway). The same bytes as pack's scalar rows,
// ~5x faster (preparing SmolLM2's linears: 31 -> 14 ms of the first prefill with the F16C fits_f16).
// Byte offsets r * rb must fit int32: the caller keeps K <= 2^27.
LLMKERN_R16_F32_ATTR inline void pack_block_avx512(const uint8_t* qw, const float* s, const float* o, int64_t ng,
                                                   int64_t rb, int64_t G, int64_t E, uint8_t* dst) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i idx_q = _mm512_mullo_epi32(iota, _mm512_set1_epi32(static_cast<int>(rb)));
  const __m512i idx_s = _mm512_mullo_epi32(iota, _mm512_set1_epi32(static_cast<int>(ng)));
  const __m512i m0f = _mm512_set1_epi32(0x0F0F0F0F);
  for (int64_t g = 0; g < ng; ++g) {
    uint8_t* gp = dst + group_offset(g, G, E);
    for (int64_t c = 0; c < G / 8; ++c) {
      const __m512i u = _mm512_i32gather_epi32(idx_q, qw + (g * G + 8 * c) / 2, 1);
      const __m512i lo = compress_nibbles16(_mm512_and_si512(u, m0f));
      const __m512i hi = compress_nibbles16(_mm512_and_si512(_mm512_srli_epi32(u, 4), m0f));
      _mm512_storeu_si512(gp + c * 64, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
    if (E == 1) continue;  // (pack writes the factored scales)
    const __m512 sv = _mm512_i32gather_ps(idx_s, s + g, 4), ov = _mm512_i32gather_ps(idx_s, o + g, 4);
    if (E == 2) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(gp + 8 * G), _mm512_cvtps_ph(sv, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(gp + 8 * G + 32), _mm512_cvtps_ph(ov, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
      _mm512_storeu_ps(gp + 8 * G, sv);
      _mm512_storeu_ps(gp + 8 * G + 64, ov);
    }
  }
}

// E = 1 needs factors_ok(scales, offsets, N, K / G) and factored_fits(K, G) (the binding checks both).
inline void pack(const uint8_t* qw, const float* scales, const float* offsets, int64_t N, int64_t K, int64_t G,
                 int64_t E, uint8_t* out) {
  const int64_t ng = K / G, rb = K / 2, nblocks = (N + 15) / 16, bb = block_bytes(K, G, E);
  auto put = [E](uint8_t* dst, float v) {
    if (E == 2) {
      const uint16_t h = f32_to_f16(v);
      std::memcpy(dst, &h, 2);
    } else {
      std::memcpy(dst, &v, 4);
    }
  };
  const bool vec = features().avx512f && features().avx512bw && K <= (int64_t(1) << 27);
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nblocks; ++b) {
    if (E == 1) {  // factors at each super-block's head (lane r: scales, 16 + r: offsets), one-byte codes per group
      for (int r = 0; r < 16; ++r) {
        const int64_t n = 16 * b + r;
        for (int64_t sb = 0; sb < ng / kSuper; ++sb) {
          uint8_t* sp = out + b * bb + sb * super_bytes(G);
          float fs = 1.0f, fo = 1.0f;
          uint8_t cs[kSuper] = {}, co[kSuper] = {};
          if (n < N) {  // (rows past N: codes 0)
            factor_run(scales + n * ng + sb * kSuper, kSuper, &fs, cs);
            factor_run(offsets + n * ng + sb * kSuper, kSuper, &fo, co);
          }
          std::memcpy(sp + 4 * r, &fs, 4);
          std::memcpy(sp + 64 + 4 * r, &fo, 4);
          for (int64_t i = 0; i < kSuper; ++i) {
            uint8_t* gp = sp + 128 + i * group_bytes(G, 1);
            gp[8 * G + r] = cs[i];
            gp[8 * G + 16 + r] = co[i];
          }
        }
      }
    }
    if (vec && 16 * b + 16 <= N) {  // whole blocks; the tail block (rows past N are zero) below
      pack_block_avx512(qw + 16 * b * rb, scales + 16 * b * ng, offsets + 16 * b * ng, ng, rb, G, E, out + b * bb);
      continue;
    }
    for (int r = 0; r < 16; ++r) {
      const int64_t n = 16 * b + r;
      for (int64_t g = 0; g < ng; ++g) {
        uint8_t* gp = out + b * bb + group_offset(g, G, E);
        for (int64_t c = 0; c < G / 8; ++c) {
          // canonical bytes t = 0..3 of k0 = g G + 8 c: (q[k0 + 2t] low nibble, q[k0 + 2t + 1] high)
          uint32_t u = 0;
          if (n < N) std::memcpy(&u, qw + n * rb + (g * G + 8 * c) / 2, 4);
          const uint32_t w = compress_nibbles(u & 0x0F0F0F0Fu) | (compress_nibbles((u >> 4) & 0x0F0F0F0Fu) << 16);
          std::memcpy(gp + c * 64 + 4 * r, &w, 4);
        }
        if (E == 1) continue;
        put(gp + 8 * G + r * E, n < N ? scales[n * ng + g] : 0.0f);
        put(gp + 8 * G + (16 + r) * E, n < N ? offsets[n * ng + g] : 0.0f);
      }
    }
  }
}

struct Ctx {
  const uint8_t* pk;
  int64_t K, G, ng, N, bbytes;
  const void* x;      // bf16 or fp32 rows
  int64_t x_stride;   // elements
  const float* X;     // [M][ng] group sums of x
  const float* bias;
  void* out;
  int64_t out_stride;  // elements
  DType dt;
};

template <int E>
LLMKERN_R16_F32_ATTR inline __m512 load16f(const uint8_t* p) {
  if constexpr (E == 1) return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  else if constexpr (E == 2) return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  else return _mm512_loadu_ps(reinterpret_cast<const float*>(p));
}

// The 16 rows' scales and offsets of group g of the block at bp (E = 1: codes times the super-block's
// factors, an exact product: the canonical values).
template <int E>
LLMKERN_R16_F32_ATTR inline void scales16(const uint8_t* bp, int64_t g, int64_t G, __m512& s, __m512& o) {
  const uint8_t* gp = bp + group_offset(g, G, E);
  s = load16f<E>(gp + 8 * G);
  o = load16f<E>(gp + 8 * G + 16 * E);
  if constexpr (E == 1) {
    const float* f = reinterpret_cast<const float*>(bp + (g / kSuper) * super_bytes(G));
    s = _mm512_mul_ps(s, _mm512_loadu_ps(f));
    o = _mm512_mul_ps(o, _mm512_loadu_ps(f + 16));
  }
}

// y rows m0 .. m0 + MB - 1, columns of blocks b0 .. b0 + NJ - 1 (+ bias) in the output dtype; the
// columns past N are not written.
template <int MB, int NJ>
LLMKERN_R16_F32_ATTR void store_tile(const Ctx& c, int64_t b0, int64_t m0, const __m512 (&accf)[MB][NJ]) {
  const int64_t es = c.dt == DType::kF32 ? 4 : 2;
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NJ; ++j) {
      const int64_t n0 = 16 * (b0 + j);
      if (n0 >= c.N) continue;
      char* o = static_cast<char*>(c.out) + ((m0 + i) * c.out_stride + n0) * es;
      store512::store16(accf[i][j], c.bias ? c.bias + n0 : nullptr, o, c.dt, store512::tail16(c.N - n0));
    }
}

// Rows m0 .. m0 + MB - 1 of x against blocks b0 .. b0 + NJ - 1 (16 weight rows each): stores their outputs.
// pf / pf_bytes: the bytes to prefetch meanwhile (the next tile's blocks), spread over the groups.
template <int MB, int NJ, int E>
LLMKERN_R16_ATTR void tile(const Ctx& c, int64_t b0, int64_t m0, const uint8_t* pf, int64_t pf_bytes) {
  const __m512i low4 = _mm512_set1_epi32(0x000F000F), c128 = _mm512_set1_epi32(0x43004300);
  const __m512 m128 = _mm512_set1_ps(-128.0f);
  const int64_t chunks = c.G / 8;
  const int64_t pf_lines = (pf_bytes + 63) / 64, pf_per = (pf_lines + c.ng - 1) / c.ng;
  __m512 accf[MB][NJ];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NJ; ++j) accf[i][j] = _mm512_setzero_ps();
  const uint16_t* xr[MB];
  for (int i = 0; i < MB; ++i) xr[i] = static_cast<const uint16_t*>(c.x) + (m0 + i) * c.x_stride;
  for (int64_t g = 0; g < c.ng; ++g) {
    for (int64_t l = g * pf_per, end = std::min(pf_lines, l + pf_per); l < end; ++l) __builtin_prefetch(pf + 64 * l, 0, 3);
    const uint8_t* gp[NJ];
    for (int j = 0; j < NJ; ++j) gp[j] = c.pk + (b0 + j) * c.bbytes + group_offset(g, c.G, E);
    __m512 acc[MB][NJ];
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NJ; ++j) acc[i][j] = _mm512_setzero_ps();
    for (int64_t ch = 0; ch < chunks; ++ch) {
      __m512i v[NJ];
      for (int j = 0; j < NJ; ++j) v[j] = _mm512_loadu_si512(gp[j] + 64 * ch);
      const int64_t k0 = g * c.G + 8 * ch;
#pragma GCC unroll 4
      for (int t = 0; t < 4; ++t) {
        __m512i q[NJ];
        // (v >> 4t) & 0x000F000F | 0x43004300: ternary logic (a & b) | c = 0xEA
        for (int j = 0; j < NJ; ++j) q[j] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v[j], 4 * t), low4, c128, 0xEA);
        for (int i = 0; i < MB; ++i) {
          uint32_t pair;
          std::memcpy(&pair, xr[i] + k0 + 2 * t, 4);  // x[k], x[k + 1]
          const __m512i xb = _mm512_set1_epi32(static_cast<int>(pair));
          for (int j = 0; j < NJ; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xb, (__m512bh)q[j]);
        }
      }
    }
    for (int j = 0; j < NJ; ++j) {
      __m512 s, o;
      scales16<E>(c.pk + (b0 + j) * c.bbytes, g, c.G, s, o);
      o = _mm512_fmadd_ps(m128, s, o);  // o - 128 s
      for (int i = 0; i < MB; ++i) {
        accf[i][j] = _mm512_fmadd_ps(acc[i][j], s, accf[i][j]);
        accf[i][j] = _mm512_fmadd_ps(o, _mm512_set1_ps(c.X[(m0 + i) * c.ng + g]), accf[i][j]);
      }
    }
  }
  store_tile<MB, NJ>(c, b0, m0, accf);
}

// fp32 x: q[k] as fp32 through a vpermps table, one FMA per k and row of x (see the top).
template <int MB, int NJ, int E>
LLMKERN_R16_F32_ATTR void tile_f32(const Ctx& c, int64_t b0, int64_t m0, const uint8_t* pf, int64_t pf_bytes) {
  const __m512 tab = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int64_t chunks = c.G / 8;
  const int64_t pf_lines = (pf_bytes + 63) / 64, pf_per = (pf_lines + c.ng - 1) / c.ng;
  __m512 accf[MB][NJ];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NJ; ++j) accf[i][j] = _mm512_setzero_ps();
  const float* xr[MB];
  for (int i = 0; i < MB; ++i) xr[i] = static_cast<const float*>(c.x) + (m0 + i) * c.x_stride;
  for (int64_t g = 0; g < c.ng; ++g) {
    for (int64_t l = g * pf_per, end = std::min(pf_lines, l + pf_per); l < end; ++l) __builtin_prefetch(pf + 64 * l, 0, 3);
    const uint8_t* gp[NJ];
    for (int j = 0; j < NJ; ++j) gp[j] = c.pk + (b0 + j) * c.bbytes + group_offset(g, c.G, E);
    __m512 acc[MB][NJ];
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NJ; ++j) acc[i][j] = _mm512_setzero_ps();
    for (int64_t ch = 0; ch < chunks; ++ch) {
      __m512i v[NJ];
      for (int j = 0; j < NJ; ++j) v[j] = _mm512_loadu_si512(gp[j] + 64 * ch);
      const int64_t k0 = g * c.G + 8 * ch;
#pragma GCC unroll 8
      for (int e = 0; e < 8; ++e) {  // k = k0 + e: nibble e / 2 of half e % 2
        const int sh = 4 * (e / 2) + 16 * (e % 2);
        __m512 q[NJ];
        for (int j = 0; j < NJ; ++j) q[j] = _mm512_permutexvar_ps(_mm512_srli_epi32(v[j], sh), tab);  // low 4 index bits
        for (int i = 0; i < MB; ++i) {
          const __m512 xb = _mm512_set1_ps(xr[i][k0 + e]);
          for (int j = 0; j < NJ; ++j) acc[i][j] = _mm512_fmadd_ps(xb, q[j], acc[i][j]);
        }
      }
    }
    for (int j = 0; j < NJ; ++j) {
      __m512 s, o;
      scales16<E>(c.pk + (b0 + j) * c.bbytes, g, c.G, s, o);
      for (int i = 0; i < MB; ++i) {
        accf[i][j] = _mm512_fmadd_ps(acc[i][j], s, accf[i][j]);
        accf[i][j] = _mm512_fmadd_ps(o, _mm512_set1_ps(c.X[(m0 + i) * c.ng + g]), accf[i][j]);
      }
    }
  }
  store_tile<MB, NJ>(c, b0, m0, accf);
}

using TileFn = void (*)(const Ctx&, int64_t, int64_t, const uint8_t*, int64_t);

template <int E>
inline TileFn tile_for(bool f32, int mb, int nj) {
  static const TileFn tab[kMaxMB][kBlocks] = {{&tile<1, 1, E>, &tile<1, 2, E>},
                                              {&tile<2, 1, E>, &tile<2, 2, E>},
                                              {&tile<3, 1, E>, &tile<3, 2, E>},
                                              {&tile<4, 1, E>, &tile<4, 2, E>}};
  static const TileFn tab32[kMaxMB][kBlocks] = {{&tile_f32<1, 1, E>, &tile_f32<1, 2, E>},
                                                {&tile_f32<2, 1, E>, &tile_f32<2, 2, E>},
                                                {&tile_f32<3, 1, E>, &tile_f32<3, 2, E>},
                                                {&tile_f32<4, 1, E>, &tile_f32<4, 2, E>}};
  return f32 ? tab32[mb - 1][nj - 1] : tab[mb - 1][nj - 1];
}

// y[M, N] = x[M, K] (bf16 or fp32 = dt, rows at x_stride elements) @ dequant(w)^T (+ bias) in dt, w in
// X[g] = sum of x[off + g G .. off + (g + 1) G) (fp32 or bf16 x), g < K / G: 16 lanes side by side, then
// one reduction per group (a scalar chain of K dependent adds was ~5% of a one-row 576-wide call).
LLMKERN_R16_F32_ATTR inline void group_sums(const void* x, int64_t off, bool f32, int64_t K, int64_t G, float* X) {
  for (int64_t g = 0; g < K / G; ++g) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = off + g * G; k < off + (g + 1) * G; k += 16) {
      const __m512 v = f32 ? _mm512_loadu_ps(static_cast<const float*>(x) + k)
                           : _mm512_castsi512_ps(_mm512_slli_epi32(
                                 _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                                     reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + k))), 16));
      acc = _mm512_add_ps(acc, v);
    }
    X[g] = _mm512_reduce_add_ps(acc);
  }
}

// the rows16 layout at pk with E-byte scales (E = 1: factored). x: fp32 rows (x_f32) or bf16 (needs AVX-512
// BF16), out in out_dtype (any: fp16 x arrives converted to fp32). X: workspace for the group sums (M K / G
// floats). Threads split tiles of kBlocks blocks.
inline void decode(const void* x, int64_t x_stride, bool x_f32, int64_t M, int64_t K, int64_t N, int64_t G,
                   const uint8_t* pk, int64_t E, const float* bias, void* out, int64_t out_stride, DType out_dtype,
                   float* X, int num_threads) {
  const int64_t ng = K / G;
  const bool f32 = x_f32;
  for (int64_t m = 0; m < M; ++m) group_sums(x, m * x_stride, f32, K, G, X + m * ng);
  Ctx c{pk, K, G, ng, N, block_bytes(K, G, E), x, x_stride, X, bias, out, out_stride, out_dtype};
  const int64_t nblocks = (N + 15) / 16, tiles = (nblocks + kBlocks - 1) / kBlocks;
  const int64_t tile_bytes = kBlocks * c.bbytes;
  const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, tiles * tile_bytes / (32 << 10))));
#pragma omp parallel num_threads(nthreads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t t0 = tiles * t / nt, t1 = tiles * (t + 1) / nt;
    for (int64_t tl = t0; tl < t1; ++tl) {
      const int64_t b0 = tl * kBlocks;
      const int nj = static_cast<int>(std::min<int64_t>(kBlocks, nblocks - b0));
      // The next tile's blocks are prefetched during this tile's first rows (the later row chunks
      // find this tile's blocks in cache).
      const int64_t nb_next = tl + 1 < t1 ? std::min<int64_t>(kBlocks, nblocks - b0 - kBlocks) : 0;
      for (int64_t m0 = 0; m0 < M; m0 += kMaxMB) {
        const int mb = static_cast<int>(std::min<int64_t>(kMaxMB, M - m0));
        const uint8_t* pf = pk + (b0 + kBlocks) * c.bbytes;
        const int64_t pf_bytes = m0 == 0 ? nb_next * c.bbytes : 0;
        (E == 1 ? tile_for<1>(f32, mb, nj) : E == 2 ? tile_for<2>(f32, mb, nj) : tile_for<4>(f32, mb, nj))(c, b0, m0, pf, pf_bytes);
      }
    }
  }
}

}  // namespace int4_rows16
}  // namespace cpu
}  // namespace llmkern
