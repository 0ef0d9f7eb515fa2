// int4_linear with AVX2 + FMA + F16C: the "avx2" ISA. The same two paths as AVX-512 with 8 lanes:
// - decode: 32 bytes (64 values of k) per step as 8 32-bit lanes, lane j = k 8j .. 8j+7, x rows
//   permuted once to match (value t of lane j at 8t + j); rescaled per step by a vector of the
//   lanes' group scales; offsets . X at the end. Nibble t of a lane is taken as d & (15 << 4t)
//   = q * 16^t (t < 7; t = 7: d >> 28 = q), one integer op instead of a shift and a mask: the
//   conversion is what bounds this path (4 -> 3 vector ops per 8 weights, 1.2-1.3x at one thread).
//   The prep multiplies value t of the row by 16^-t (exact: a power of two), so x' q' = x q
//   exactly and every FMA rounds what it rounded before: the same bits. Where that scaling could
//   leave the normal range (a value 0 < |x| < 2^-102), the prep writes the plain row instead and
//   the tiles shift and mask as before (DecodeTile::x_scaled).
// - prefill: fp32 panels [k][16] of dequantized weights and panel_gemm.h's 6 x 2-vector micro-kernels
//   (12 accumulators of the 16 ymm registers; C through the thread's C tile).
// fp32 arithmetic only (bf16/fp16 x are converted to fp32).
#pragma once

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cmath>
#include <cstdint>
#include <cstring>

#include "llmkern/cpu/int4_linear_common.h"
#include "llmkern/cpu/int4_linear_scalar.h"
#include "llmkern/cpu/panel_gemm.h"

#define LLMKERN_I4_AVX2 __attribute__((target("avx2,fma,f16c")))
#define LLMKERN_I4_AVX2_INLINE LLMKERN_I4_AVX2 inline __attribute__((always_inline))
#define LLMKERN_I4_UNROLL2 _Pragma("GCC unroll 8")

namespace llmkern {
namespace cpu {
namespace int4_avx2 {

LLMKERN_I4_AVX2_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Lanes [0, n) of 8 set (a maskload / maskstore mask).
LLMKERN_I4_AVX2_INLINE __m256i lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// 8 columns: out = v + bias in dt (full vectors only; tails go through the portable store).
LLMKERN_I4_AVX2_INLINE void store8(__m256 v, const float* bias, void* out, DType dt) {
  if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias));
  if (dt == DType::kF32) {
    _mm256_storeu_ps(static_cast<float*>(out), v);
  } else if (dt == DType::kF16) {
    _mm_storeu_si128(static_cast<__m128i*>(out), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {  // bf16, as f32_to_bf16: nearest even, NaN stays a quiet NaN
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan);
    r = _mm256_srli_epi32(r, 16);
    r = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), _MM_SHUFFLE(3, 1, 2, 0));
    _mm_storeu_si128(static_cast<__m128i*>(out), _mm256_castsi256_si128(r));
  }
}

LLMKERN_I4_AVX2 inline void store_row(const float* v, const float* bias, void* out, DType dt, int64_t cols) {
  const int64_t es = dtype_size(dt);
  int64_t n = 0;
  for (; n + 8 <= cols; n += 8) store8(_mm256_loadu_ps(v + n), bias ? bias + n : nullptr, static_cast<char*>(out) + n * es, dt);
  if (n < cols) int4_scalar::store_row(v + n, bias ? bias + n : nullptr, static_cast<char*>(out) + n * es, dt, cols - n);
}

// ------------------------------------------------------------------------------------ decode

// Scaled form (scale and every nonzero |x| >= 2^-102, so x 16^-6 is still a normal float): value t
// of every lane multiplied by 16^-t for t = 1..6 (t = 0 and 7 read q itself). Else the plain form.
inline bool dec_prep(const void* x, DType dt, int64_t K, int64_t G, void* xp_, float* xs, bool scale) {
  float* xp = static_cast<float*>(xp_);
  permute_row_f32(x, dt, K, 8, xp);
  group_sums(x, dt, K, G, xs);
  const int64_t Kp = align_up(K, 128);
  if (!scale) return false;
  for (int64_t i = 0; i < Kp; ++i) {
    const float v = std::fabs(xp[i]);
    if (v != 0.0f && v < 0x1p-102f) return false;  // (NaN compares false: it stays NaN when scaled)
  }
  for (int64_t b = 0; b < Kp; b += 64)
    for (int t = 1; t < 7; ++t) {
      const float f = std::ldexp(1.0f, -4 * t);
      for (int j = 0; j < 8; ++j) xp[b + 8 * t + j] *= f;
    }
  return true;
}

// 1 <= n scales or offsets (the first 8) from element i of p (canonical fp32, packed fp16 or fp32), 0 past n.
template <int E>
LLMKERN_I4_AVX2_INLINE __m256 load_groups8(const void* p, int64_t i, int64_t n) {
  if constexpr (E == 2) {
    const uint16_t* h = static_cast<const uint16_t*>(p) + i;
    if (n >= 8) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)));
    // n < 8 (at most 2 per step for the scales): inserts, not a copy loop (GCC turns that into a
    // memcpy library call: 8x slower decode, measured)
    __m128i v = _mm_setzero_si128();
    v = _mm_insert_epi16(v, h[0], 0);  // n >= 1
    if (n > 1) v = _mm_insert_epi16(v, h[1], 1);
    if (n > 2) v = _mm_insert_epi16(v, h[2], 2);
    if (n > 3) v = _mm_insert_epi16(v, h[3], 3);
    if (n > 4) v = _mm_insert_epi16(v, h[4], 4);
    if (n > 5) v = _mm_insert_epi16(v, h[5], 5);
    if (n > 6) v = _mm_insert_epi16(v, h[6], 6);
    return _mm256_cvtph_ps(v);
  } else {
    return _mm256_maskload_ps(static_cast<const float*>(p) + i, lanes(n));
  }
}

// E: weights in the canonical arrays (0) or the packed layout with E-byte scales (2, 4): the same
// arithmetic on the same values either way. kScaled: the rows are in dec_prep's scaled form.
template <int MB, int NB, int E, bool kScaled>
LLMKERN_I4_AVX2 void dec_tile_x(const DecodeTile& t) {
  const int64_t rb = t.K / 2, G = t.group;
  const void* offs = offsets_ptr<E>(t);
  const __m256i nib = _mm256_set1_epi32(15);
  // lane j of block b lies in group (64b + 8j) / G: index among the block's first group
  const __m256i gidx = _mm256_srlv_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                         _mm256_set1_epi32(__builtin_ctzll(static_cast<uint64_t>(G)) - 3));
  __m256 accf[MB][NB];
  LLMKERN_I4_UNROLL2 for (int i = 0; i < MB; ++i)
    LLMKERN_I4_UNROLL2 for (int j = 0; j < NB; ++j) accf[i][j] = _mm256_setzero_ps();
  for (int64_t b = 0; b * 32 < rb; ++b) {
    const int64_t bytes = rb - b * 32 < 32 ? rb - b * 32 : 32;
    const __m256i dm = lanes(bytes / 4);
    if (b % 2 == 0) dec_prefetch_any<E>(t, b / 2, (rb + 63) / 64, NB);  // one prefetch step per 64 bytes
    const StepPtrs sp = step_ptrs<E>(t, b * 32);
    __m256i d[NB];
    LLMKERN_I4_UNROLL2 for (int j = 0; j < NB; ++j)
      d[j] = _mm256_maskload_epi32(reinterpret_cast<const int*>(sp.q + j * sp.qstride), dm);
    __m256 acc[MB][NB];
    LLMKERN_I4_UNROLL2 for (int i = 0; i < MB; ++i)
      LLMKERN_I4_UNROLL2 for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_setzero_ps();
    LLMKERN_I4_UNROLL2 for (int tt = 0; tt < 8; ++tt) {
      __m256 xv[MB];
      LLMKERN_I4_UNROLL2 for (int i = 0; i < MB; ++i) xv[i] = _mm256_loadu_ps(static_cast<const float*>(t.x[i]) + b * 64 + 8 * tt);
      LLMKERN_I4_UNROLL2 for (int j = 0; j < NB; ++j) {
        // q (plain) or q 16^tt (scaled; tt = 7: d >> 28 is q, the sign bit would make d & mask negative)
        const __m256i qi = !kScaled ? _mm256_and_si256(_mm256_srli_epi32(d[j], 4 * tt), nib)
                           : tt == 7 ? _mm256_srli_epi32(d[j], 28)
                                     : _mm256_and_si256(d[j], _mm256_set1_epi32(15 << (4 * tt)));
        const __m256 q = _mm256_cvtepi32_ps(qi);
        LLMKERN_I4_UNROLL2 for (int i = 0; i < MB; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], q, acc[i][j]);
      }
    }
    const int gs = __builtin_ctzll(static_cast<uint64_t>(G));  // G is a power of two
    const int64_t gv = (2 * bytes + G - 1) >> gs;
    LLMKERN_I4_UNROLL2 for (int j = 0; j < NB; ++j) {
      const __m256 s = _mm256_permutevar8x32_ps(load_groups8<E>(sp.s, j * sp.sstride, gv), gidx);
      LLMKERN_I4_UNROLL2 for (int i = 0; i < MB; ++i) accf[i][j] = _mm256_fmadd_ps(acc[i][j], s, accf[i][j]);
    }
  }
  for (int64_t g = 0; g < t.ngroups; g += 8) {
    const int64_t n = t.ngroups - g;
    LLMKERN_I4_UNROLL2 for (int j = 0; j < NB; ++j) {
      const __m256 o = load_groups8<E>(offs, j * t.ngroups + g, n);
      LLMKERN_I4_UNROLL2 for (int i = 0; i < MB; ++i)
        accf[i][j] = _mm256_fmadd_ps(_mm256_loadu_ps(t.xs[i] + g), o, accf[i][j]);  // xs padded
    }
  }
  LLMKERN_I4_UNROLL2 for (int i = 0; i < MB; ++i)
    LLMKERN_I4_UNROLL2 for (int j = 0; j < NB; ++j) t.res[i * t.res_stride + j] = hsum(accf[i][j]);
}

template <int MB, int NB, int E = 0>
void dec_tile(const DecodeTile& t) {
  if (t.x_scaled) dec_tile_x<MB, NB, E, true>(t);
  else dec_tile_x<MB, NB, E, false>(t);
}

// ----------------------------------------------------------------------------------- prefill

constexpr int64_t kNS = 16, kKC = 128, kMR = 6;

// fp32 panel of dequantized weights w[k * kNS + n] = q[n0 + n, k0 + k] * scale + offset (multiply, then
// add: the canonical value) for k < kc (a multiple of 8), 0 for ncols <= n < kNS (their scales and offsets
// in ss / oo [g][kNS] are 0) (qw: row n0 at byte 0, rows rb bytes apart): the 4-byte words (8 values of
// k, one group: G >= 32) of 8 rows gathered into the lanes, then nibble t of every lane is value k + t.
// Lane offsets 8 rb must fit int32 (the caller takes the portable unpack otherwise).
LLMKERN_I4_AVX2 inline void unpack_panel_f32(const uint8_t* qw, int64_t rb, int64_t ncols, int64_t k0, int64_t kc,
                                             const float* ss, const float* oo, int64_t G, float* w) {
  const __m256i nib = _mm256_set1_epi32(15);
  const __m256i vidx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(static_cast<int>(rb)));
  const int gs = __builtin_ctzll(static_cast<uint64_t>(G));
  for (int64_t v = 0; v < kNS / 8; ++v) {
    float* dst = w + 8 * v;
    const int64_t cols = ncols - 8 * v;
    if (cols <= 0) {
      for (int64_t k = 0; k < kc; ++k) _mm256_storeu_ps(dst + k * kNS, _mm256_setzero_ps());
      continue;
    }
    const __m256i m = lanes(cols);  // rows past ncols: not read, 0
    const uint8_t* base = qw + 8 * v * rb + k0 / 2;
    for (int64_t k = 0; k < kc; k += 8) {
      const __m256i d = _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), reinterpret_cast<const int*>(base + k / 2),
                                                    vidx, m, 1);
      const __m256 sv = _mm256_loadu_ps(ss + (k >> gs) * kNS + 8 * v), ov = _mm256_loadu_ps(oo + (k >> gs) * kNS + 8 * v);
      LLMKERN_I4_UNROLL2 for (int t = 0; t < 8; ++t) {
        const __m256 q = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(d, 4 * t), nib));
        _mm256_storeu_ps(dst + (k + t) * kNS, _mm256_add_ps(pgemm::rounded(_mm256_mul_ps(q, sv)), ov));
      }
    }
  }
}

// Micro-kernel: panel_gemm.h's AVX2 fp32 GEMM tile (MR <= 6 rows x NV <= 2 vectors: 12 accumulators)
// over the dequantized panel, from C (or 0) to C (or y). It replaced per-group folds of q panels
// (each group's sums times its scale, plus X times its offset, through the C tile).
static_assert(kNS == pgemm::avx2::kNS && kMR <= 8, "the shared micro-kernels' panel width and rows");
template <int MR, int NV>
LLMKERN_I4_AVX2 void micro(const Panel& p, const Micro& m) {
  pgemm::avx2::micro<MR, NV>(static_cast<const float*>(p.w), p.kc, gemm_rows<MR>(m));
}

}  // namespace int4_avx2
}  // namespace cpu
}  // namespace llmkern
