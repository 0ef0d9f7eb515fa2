// int8_linear's AVX2 kernels over the packed decode layout (int8_linear_pack_layout.h).
//
// Why: the canonical AVX2 tiles (int8_linear_avx2.h) stream 4 weight rows and a separate fp32
// scale array without software prefetch; cold, a SmolLM2 lm_head (49152 x 576, Q8_0 groups of 32)
// read at ~13 GB/s that way, 2.4 of a 6.3 ms decode step on an AVX2-only CPU. The packed layout
// is one sequential stream per thread with the scales inline (fp16 where exact), prefetched ahead.
//
// Results are bit-identical to the canonical AVX2 tiles for the same mode: each output's lane sums
// cover the same k in the same order (8-value fp32 chunks, 32-byte int8 chunks from each group's
// start; the per-channel fp32 tail of K % 8 values summed in scalar code into lane 0), and the
// same fp32 operations rescale them. W8A8: the layout stores w + 128 as u8 (the AVX-512 kernel's
// encoding); XOR 0x80 gives w back, and the canonical sign trick (|w| times q * sign(w), vpmaddubsw
// then vpmaddwd with ones) keeps every pair sum exact. Integer lane sums are exact, so where the
// canonical code puts a scalar tail (G = 16: the whole group) into lane 0, any exact sum is the same.
// Weight rows are processed 8 at a time per 64-value step: 8 independent accumulator chains.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "llmkern/cpu/convert.h"
#include "llmkern/cpu/int8_linear_avx2.h"
#include "llmkern/cpu/int8_linear_common.h"
#include "llmkern/cpu/int8_linear_pack_layout.h"

namespace llmkern {
namespace cpu {
namespace i8pk {
namespace k256 {

using avx2::hsum_epi32;
using avx2::hsum_ps;

// Chunk c (8 values) of a step's int8 weight row at w, as fp32.
LLMKERN_AVX2_INLINE __m256 w_chunk(const int8_t* w, int64_t c) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + 8 * c))));
}

// Scale i of a step's S record (E-byte values), as a float and as a splat (fp16 -> fp32 is exact).
template <int E>
LLMKERN_AVX2_INLINE float scale_at(const uint8_t* sp, int64_t i) {
  if constexpr (E == 2) {
    uint16_t hv;
    std::memcpy(&hv, sp + 2 * i, 2);
    return f16_to_f32(hv);
  } else {
    float v;
    std::memcpy(&v, sp + 4 * i, 4);
    return v;
  }
}
template <int E>
LLMKERN_AVX2_INLINE __m256 scale_splat(const uint8_t* sp, int64_t i) {
  if constexpr (E == 2) {
    uint16_t hv;
    std::memcpy(&hv, sp + 2 * i, 2);
    return _mm256_cvtph_ps(_mm_set1_epi16(static_cast<short>(hv)));
  } else {
    return _mm256_set1_ps(scale_at<E>(sp, i));
  }
}

// Prefetches the stream up to kPrefetch bytes past `upto` (pf: the caller's cursor, only moves on).
LLMKERN_AVX2_INLINE void prefetch_to(const uint8_t*& pf, const uint8_t* upto) {
  for (; pf < upto + kPrefetch; pf += 64) _mm_prefetch(reinterpret_cast<const char*>(pf), _MM_HINT_T0);
}

// W8A16, one activation row x (fp32) against the block at p: res[j] for its 8 weight rows.
// GM: 16 / 32 / 64 (the group; every full step holds 64 / G whole groups), 128 (G a multiple of 64
// above 64: runtime G), 0 (per channel).
template <int E, int GM>
LLMKERN_AVX2 void w8a16_block(const uint8_t* p, const float* x, int64_t K, int64_t G, float* res,
                              const uint8_t*& pf) {
  const int64_t ns = nsteps(K);
  __m256 acc[kRows], accf[kRows];
  LLMKERN_UNROLL for (int j = 0; j < kRows; ++j) {
    acc[j] = _mm256_setzero_ps();
    accf[j] = _mm256_setzero_ps();
  }
  const int64_t spg = GM == 128 ? G / kStep : 1;  // steps per group
  for (int64_t s = 0, sg = 0; s < ns; ++s) {
    const int64_t k = s * kStep, n = std::min(kStep, K - k);
    const int64_t e = GM == 0 ? (s + 1 == ns) : (GM == 128 ? (++sg == spg) : n / GM);
    const int64_t rec = kRows * kStep + kRows * E * e;
    prefetch_to(pf, p + rec);
    const int8_t* w = reinterpret_cast<const int8_t*>(p);
    const uint8_t* sp = p + kRows * kStep;
    if constexpr (GM == 16 || GM == 32 || GM == 64) {
      constexpr int cpg = GM / 8;  // 8-value chunks per group
      if (n == kStep) {
        LLMKERN_UNROLL for (int j = 0; j < kRows; ++j)
          LLMKERN_UNROLL for (int g = 0; g < kStep / GM; ++g) {
            __m256 a = _mm256_setzero_ps();
            LLMKERN_UNROLL for (int c = g * cpg; c < (g + 1) * cpg; ++c)
              a = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8 * c), w_chunk(w + j * kStep, c), a);
            accf[j] = _mm256_fmadd_ps(a, scale_splat<E>(sp, j * (kStep / GM) + g), accf[j]);
          }
      } else {  // a short last step: its e groups (n is a multiple of G)
        for (int j = 0; j < kRows; ++j)
          for (int64_t g = 0; g < e; ++g) {
            __m256 a = _mm256_setzero_ps();
            for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c)
              a = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8 * c), w_chunk(w + j * kStep, c), a);
            accf[j] = _mm256_fmadd_ps(a, scale_splat<E>(sp, j * e + g), accf[j]);
          }
      }
    } else {  // GM 0 / 128: one chain per weight row across the steps (of the row / of a group)
      if (n == kStep) {
        LLMKERN_UNROLL for (int c = 0; c < kStep / 8; ++c) {
          const __m256 xv = _mm256_loadu_ps(x + k + 8 * c);
          LLMKERN_UNROLL for (int j = 0; j < kRows; ++j) acc[j] = _mm256_fmadd_ps(xv, w_chunk(w + j * kStep, c), acc[j]);
        }
      } else {  // per channel, short last step: full chunks, then the canonical scalar tail into lane 0
        const int64_t full = n / 8;
        for (int64_t c = 0; c < full; ++c) {
          const __m256 xv = _mm256_loadu_ps(x + k + 8 * c);
          LLMKERN_UNROLL for (int j = 0; j < kRows; ++j) acc[j] = _mm256_fmadd_ps(xv, w_chunk(w + j * kStep, c), acc[j]);
        }
        if (n > 8 * full) {
          for (int j = 0; j < kRows; ++j) {
            float t = 0.0f;
            for (int64_t kk = 8 * full; kk < n; ++kk) t += x[k + kk] * static_cast<float>(w[j * kStep + kk]);
            acc[j] = _mm256_add_ps(acc[j], _mm256_setr_ps(t, 0, 0, 0, 0, 0, 0, 0));
          }
        }
      }
      if (e) {
        if constexpr (GM == 0) {
          LLMKERN_UNROLL for (int j = 0; j < kRows; ++j) res[j] = hsum_ps(acc[j]) * scale_at<E>(sp, j);
        } else {
          LLMKERN_UNROLL for (int j = 0; j < kRows; ++j) {
            accf[j] = _mm256_fmadd_ps(acc[j], scale_splat<E>(sp, j), accf[j]);
            acc[j] = _mm256_setzero_ps();
          }
          sg = 0;
        }
      }
    }
    p += rec;
  }
  if constexpr (GM != 0) {
    LLMKERN_UNROLL for (int j = 0; j < kRows; ++j) res[j] = hsum_ps(accf[j]);
  }
}

// Exact int32 lane sums (lane l: bytes 4l..4l+3) of w * q over 32 bytes: the canonical sign trick.
LLMKERN_AVX2_INLINE __m256i dot32(__m256i w, __m256i q, __m256i ones16) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(q, w)), ones16);
}

// 32 weight bytes (half 0 or 1 of a step) of row j of the step at p, signed again (w + 128 -> w).
LLMKERN_AVX2_INLINE __m256i wrow(const uint8_t* p, __m256i flip, int j, int half) {
  return _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + j * kStep + 32 * half)), flip);
}

// W8A8, one quantized activation row xq (int8, zero-padded to kpad(K)) against the block at p
// (weights stored as w + 128): res[j] for its 8 weight rows, before the row scale.
template <int E, int GM>
LLMKERN_AVX2 void w8a8_block(const uint8_t* p, const int8_t* xq, int64_t K, int64_t G, float* res,
                             const uint8_t*& pf) {
  const int64_t ns = nsteps(K);
  const __m256i ones16 = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256i acc[kRows];
  __m256 accf[kRows];
  LLMKERN_UNROLL for (int j = 0; j < kRows; ++j) {
    acc[j] = _mm256_setzero_si256();
    accf[j] = _mm256_setzero_ps();
  }
  const int64_t spg = GM == 128 ? G / kStep : 1;
  for (int64_t s = 0, sg = 0; s < ns; ++s) {
    const int64_t k = s * kStep, n = std::min(kStep, K - k);
    const int64_t e = GM == 0 ? (s + 1 == ns) : (GM == 128 ? (++sg == spg) : n / GM);
    const int64_t rec = kRows * kStep + kRows * E * e;
    prefetch_to(pf, p + rec);
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + k));
    const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + k + 32));
    const uint8_t* sp = p + kRows * kStep;
    if constexpr (GM == 16) {  // canonical: each group's sum (a scalar tail) in lane 0
      for (int j = 0; j < kRows; ++j)
        for (int64_t g = 0; g < e; ++g) {
          const __m256i d = dot32(wrow(p, flip, j, static_cast<int>(g / 2)), g / 2 ? x1 : x0, ones16);
          const __m128i h = g % 2 ? _mm256_extracti128_si256(d, 1) : _mm256_castsi256_si128(d);
          __m128i t = _mm_add_epi32(h, _mm_shuffle_epi32(h, _MM_SHUFFLE(1, 0, 3, 2)));
          t = _mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(2, 3, 0, 1)));
          const __m256i v = _mm256_setr_epi32(_mm_cvtsi128_si32(t), 0, 0, 0, 0, 0, 0, 0);
          accf[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), scale_splat<E>(sp, j * e + g), accf[j]);
        }
    } else if constexpr (GM == 32) {
      for (int j = 0; j < kRows; ++j)
        for (int64_t g = 0; g < e; ++g) {
          const __m256i d = dot32(wrow(p, flip, j, static_cast<int>(g)), g ? x1 : x0, ones16);
          accf[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), scale_splat<E>(sp, j * e + g), accf[j]);
        }
    } else if constexpr (GM == 64) {
      LLMKERN_UNROLL for (int j = 0; j < kRows; ++j) {
        const __m256i d = _mm256_add_epi32(dot32(wrow(p, flip, j, 0), x0, ones16), dot32(wrow(p, flip, j, 1), x1, ones16));
        accf[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), scale_splat<E>(sp, j), accf[j]);
      }
    } else {  // GM 0 / 128: lane sums across the steps (zero padding adds nothing)
      LLMKERN_UNROLL for (int j = 0; j < kRows; ++j)
        acc[j] = _mm256_add_epi32(acc[j], _mm256_add_epi32(dot32(wrow(p, flip, j, 0), x0, ones16), dot32(wrow(p, flip, j, 1), x1, ones16)));
      if (e) {
        if constexpr (GM == 0) {
          LLMKERN_UNROLL for (int j = 0; j < kRows; ++j)
            res[j] = static_cast<float>(hsum_epi32(acc[j])) * scale_at<E>(sp, j);
        } else {
          LLMKERN_UNROLL for (int j = 0; j < kRows; ++j) {
            accf[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[j]), scale_splat<E>(sp, j), accf[j]);
            acc[j] = _mm256_setzero_si256();
          }
          sg = 0;
        }
      }
    }
    p += rec;
  }
  if constexpr (GM != 0) {
    LLMKERN_UNROLL for (int j = 0; j < kRows; ++j) res[j] = hsum_ps(accf[j]);
  }
}

// Activation rows of a packed call, prepared once: fp32 rows (W8A16) or int8 rows and their scales (W8A8).
struct Rows {
  const void* x[kMaxRows];
  float scale[kMaxRows];
};

// W8A16 of MR (2..4) activation rows x over the block at p, groups inside a step (GM 16 / 32 / 64):
// step by step (the step's x values stay in L1 for all 8 weight rows; for K = 4096, weight row by
// weight row re-read x from L2 and measured 0.93x canonical), two weight rows at a time, each 8-value
// weight chunk converted once for all MR rows (w8a16_block, once per row, converts it MR times): 2 MR
// independent FMA chains in registers; the running sums (accf) go through memory at each group's end.
// Per output the same fp32 operations in the same order as w8a16_block (and the canonical tiles): the
// same bits. res[m * kRows + j]: activation row m, weight row j.
template <int E, int GM, int MR>
LLMKERN_AVX2 void w8a16_rows_block(const uint8_t* p, const float* const* x, int64_t K, float* res,
                                   const uint8_t*& pf) {
  static_assert(GM == 16 || GM == 32 || GM == 64, "groups inside a step");
  constexpr int cpg = GM / 8;  // 8-value chunks per group
  const int64_t ns = nsteps(K);
  alignas(32) float accf[kRows][MR][8];
  for (int j = 0; j < kRows; ++j)
    for (int m = 0; m < MR; ++m) _mm256_store_ps(accf[j][m], _mm256_setzero_ps());
  for (int64_t s = 0; s < ns; ++s) {
    const int64_t k = s * kStep, e = std::min(kStep, K - k) / GM;  // this step's groups
    const int64_t rec = kRows * kStep + kRows * E * e;
    prefetch_to(pf, p + rec);
    const int8_t* w = reinterpret_cast<const int8_t*>(p);
    const uint8_t* sp = p + kRows * kStep;
    for (int j = 0; j < kRows; j += 2) {
      for (int64_t g = 0; g < e; ++g) {
        __m256 acc[2][MR];
        LLMKERN_UNROLL for (int r = 0; r < 2; ++r)
          LLMKERN_UNROLL for (int m = 0; m < MR; ++m) acc[r][m] = _mm256_setzero_ps();
        LLMKERN_UNROLL for (int c = 0; c < cpg; ++c) {
          const int64_t cc = g * cpg + c;
          const __m256 w0 = w_chunk(w + j * kStep, cc), w1 = w_chunk(w + (j + 1) * kStep, cc);
          LLMKERN_UNROLL for (int m = 0; m < MR; ++m) {
            const __m256 xv = _mm256_loadu_ps(x[m] + k + 8 * cc);
            acc[0][m] = _mm256_fmadd_ps(xv, w0, acc[0][m]);
            acc[1][m] = _mm256_fmadd_ps(xv, w1, acc[1][m]);
          }
        }
        LLMKERN_UNROLL for (int r = 0; r < 2; ++r) {
          const __m256 sv = scale_splat<E>(sp, (j + r) * e + g);
          LLMKERN_UNROLL for (int m = 0; m < MR; ++m)
            _mm256_store_ps(accf[j + r][m], _mm256_fmadd_ps(acc[r][m], sv, _mm256_load_ps(accf[j + r][m])));
        }
      }
    }
    p += rec;
  }
  for (int j = 0; j < kRows; ++j)
    for (int m = 0; m < MR; ++m) res[m * kRows + j] = hsum_ps(_mm256_load_ps(accf[j][m]));
}

// W8A16, groups inside a step, M >= 2: rows in passes of up to 4 through w8a16_rows_block.
template <int E, int GM>
LLMKERN_AVX2 void run_range_rows(const Int8LinearArgs& a, const uint8_t* blocks, int64_t b0, int64_t b1, const Rows& r) {
  const int64_t bb = block_bytes(a.K, a.group, E);
  const uint8_t* pf = blocks + b0 * bb;
  float res[4 * kRows];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * kRows, nr = std::min(kRows, a.N - n0);
    for (int64_t m0 = 0; m0 < a.M; m0 += 4) {  // later passes read the block from L1/L2
      const float* x[4];
      const int64_t mr = std::min<int64_t>(4, a.M - m0);
      for (int64_t i = 0; i < mr; ++i) x[i] = static_cast<const float*>(r.x[m0 + i]);
      const uint8_t* p = blocks + b * bb;
      if (mr == 4) w8a16_rows_block<E, GM, 4>(p, x, a.K, res, pf);
      else if (mr == 3) w8a16_rows_block<E, GM, 3>(p, x, a.K, res, pf);
      else if (mr == 2) w8a16_rows_block<E, GM, 2>(p, x, a.K, res, pf);
      else {
        w8a16_block<E, GM>(p, x[0], a.K, a.group, res, pf);
      }
      for (int64_t i = 0; i < mr; ++i) store_block_row(a, m0 + i, n0, nr, res + i * kRows, 1.0f);
    }
  }
}

// Blocks [b0, b1): every activation row in turn against each block (rows after the first read it
// from L1/L2), then row scale, bias and the store, as the canonical driver does.
template <int E, int GM>
LLMKERN_AVX2 void run_range(const Int8LinearArgs& a, const uint8_t* blocks, int64_t b0, int64_t b1, const Rows& r) {
  if constexpr (GM == 16 || GM == 32 || GM == 64) {
    if (!a.w8a8 && a.M >= 2) return run_range_rows<E, GM>(a, blocks, b0, b1, r);
  }
  const int64_t bb = block_bytes(a.K, a.group, E);
  const uint8_t* pf = blocks + b0 * bb;
  float res[kRows];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * kRows, nr = std::min(kRows, a.N - n0);
    for (int64_t m = 0; m < a.M; ++m) {
      if (a.w8a8) w8a8_block<E, GM>(blocks + b * bb, static_cast<const int8_t*>(r.x[m]), a.K, a.group, res, pf);
      else w8a16_block<E, GM>(blocks + b * bb, static_cast<const float*>(r.x[m]), a.K, a.group, res, pf);
      store_block_row(a, m, n0, nr, res, a.w8a8 ? r.scale[m] : 1.0f);
    }
  }
}

template <int E>
inline void run_range_g(const Int8LinearArgs& a, const uint8_t* blocks, int64_t b0, int64_t b1, const Rows& r) {
  with_group_mode(a.K, a.group, [&](auto gm) { run_range<E, decltype(gm)::value>(a, blocks, b0, b1, r); });
}

}  // namespace k256
}  // namespace i8pk
}  // namespace cpu
}  // namespace llmkern
