// int8_linear's AVX-512 kernels over the packed decode layout (int8_linear_pack_layout.h).
//
// Results are bit-identical to the canonical AVX-512 tiles (int8_linear_avx512.h) for the same
// mode: the same fp32 operations in the same order, only the addresses differ. W8A8 stores the
// weights shifted to u8 (w + 128) and multiplies them by the signed activations with vpdpbusd:
//   sum (w + 128) q = sum w q + 128 sum q
// The correction 128 sum q depends on x only: it is computed once per call per 64-byte step (or per
// group / per row for larger groups) as a vector of 16 lane sums, and every weight row starts its
// accumulator at minus that vector. The lanes then hold exactly the int32 values the canonical
// kernel forms (it shifts the activations instead and subtracts 128 * sum w per weight vector),
// so the fp32 rescaling that follows is the same, without the per-weight-vector extra vpdpbusd.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "llmkern/cpu/convert.h"
#include "llmkern/cpu/int8_linear_avx512.h"
#include "llmkern/cpu/int8_linear_common.h"
#include "llmkern/cpu/int8_linear_pack_layout.h"

namespace llmkern {
namespace cpu {
namespace i8pk {

namespace k512 {
using avx512::dpbusd;

#define LLMKERN_PK_PREFETCH_SETUP                                        \
  const uint8_t* pf = p + kPrefetch;                                      \
  auto prefetch_to = [&](const uint8_t* upto) {                           \
    for (; pf < upto + kPrefetch; pf += 64) _mm_prefetch(reinterpret_cast<const char*>(pf), _MM_HINT_T0); \
  };

// Scales of one step's S record: up to 32 values (8 rows x up to 4 groups) in two fp32 vectors.
template <int E>
LLMKERN_AVX512_INLINE void load_scales(const uint8_t* p, int64_t count, __m512& s0, __m512& s1) {
  const int64_t c0 = count < 16 ? count : 16, c1 = count - c0;
  if (E == 2) {
    s0 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(avx512::tail16(c0), p));
    s1 = c1 > 0 ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(avx512::tail16(c1), p + 32)) : _mm512_setzero_ps();
  } else {
    s0 = _mm512_maskz_loadu_ps(avx512::tail16(c0), p);
    s1 = c1 > 0 ? _mm512_maskz_loadu_ps(avx512::tail16(c1), p + 64) : _mm512_setzero_ps();
  }
}

// A step's scales as fp32 values in memory, for broadcast loads (a load-port op each, where a
// register permute would take a vector shuffle slot the weight conversion needs): E = 4 reads the
// record in place, E = 2 converts it once into buf.
template <int E>
LLMKERN_AVX512_INLINE const float* scales_f32(const uint8_t* p, int64_t count, float* buf) {
  if (E == 4) return reinterpret_cast<const float*>(p);
  const int64_t c0 = count < 16 ? count : 16, c1 = count - c0;
  _mm512_store_ps(buf, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(avx512::tail16(c0), p)));
  if (c1 > 0) _mm512_store_ps(buf + 16, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(avx512::tail16(c1), p + 32)));
  return buf;
}

LLMKERN_AVX512_INLINE __m512 bcast(const float* s, int i) {
  float v;
  std::memcpy(&v, s + i, 4);
  return _mm512_set1_ps(v);
}

// Chunk c (16 values) of a step's int8 weight row at w, as fp32.
LLMKERN_AVX512_INLINE __m512 w_chunk(const int8_t* w, int64_t c) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16 * c))));
}

// Scale value i (0..31) of a step's record as a splat.
LLMKERN_AVX512_INLINE __m512 splat(__m512 s0, __m512 s1, int i) {
  return _mm512_permutex2var_ps(s0, _mm512_set1_epi32(i), s1);
}

// GM: 16 / 32 / 64 (the group; every step holds 64 / G whole groups, the last maybe fewer),
// 128 (G a multiple of 64 above 64: runtime G), 0 (per channel).
template <int E, int GM>
LLMKERN_AVX512 void w8a16_block(const uint8_t*& p, const float* x, int64_t K, int64_t G, float* res) {
  const int64_t ns = nsteps(K);
  __m512 accf[kRows], acc[kRows];
  LLMKERN_UNROLL for (int j = 0; j < kRows; ++j) {
    accf[j] = _mm512_setzero_ps();
    acc[j] = _mm512_setzero_ps();
  }
  const int64_t spg = GM == 128 ? G / kStep : 1;  // steps per group
  // fp16 scales of small groups: converted one step ahead (so the broadcast loads do not wait on
  // the store that wrote them)
  alignas(64) float buf[2][32];
  constexpr bool kAhead = E == 2 && (GM == 16 || GM == 32 || GM == 64);
  if constexpr (kAhead) scales_f32<E>(p + kRows * kStep, kRows * (std::min(kStep, K) / (GM ? GM : 1)), buf[0]);
  LLMKERN_PK_PREFETCH_SETUP
  for (int64_t s = 0, sg = 0; s < ns; ++s) {
    const int64_t k = s * kStep, n = std::min(kStep, K - k);
    const int64_t e = GM == 0 ? (s + 1 == ns) : (GM == 128 ? (++sg == spg) : n / GM);
    const int64_t rec = kRows * kStep + kRows * E * e;
    prefetch_to(p + rec);
    const int8_t* w = reinterpret_cast<const int8_t*>(p);
    const uint8_t* sp = p + kRows * kStep;
    if constexpr (GM == 16 || GM == 32 || GM == 64) {
      const float* sc = kAhead ? buf[s & 1] : reinterpret_cast<const float*>(sp);
      if (kAhead && s + 1 < ns)
        scales_f32<E>(p + rec + kRows * kStep, kRows * (std::min(kStep, K - k - kStep) / (GM ? GM : 1)), buf[(s + 1) & 1]);
      constexpr int cpg = GM / 16;  // 16-value chunks per group
      const int chunks = static_cast<int>(n / 16);  // n is a multiple of G here
      __m512 xv[4];
      LLMKERN_UNROLL for (int c = 0; c < 4; ++c) xv[c] = c < chunks ? _mm512_loadu_ps(x + k + 16 * c) : _mm512_setzero_ps();
      if (chunks == 4) {
        LLMKERN_UNROLL for (int j = 0; j < kRows; ++j)
          LLMKERN_UNROLL for (int g = 0; g < 4 / cpg; ++g) {
            __m512 a = _mm512_setzero_ps();
            LLMKERN_UNROLL for (int c = g * cpg; c < (g + 1) * cpg; ++c) {
              const __m512 wv = w_chunk(w + j * kStep, c);
              a = _mm512_fmadd_ps(xv[c], wv, a);
            }
            accf[j] = _mm512_fmadd_ps(a, bcast(sc, j * (4 / cpg) + g), accf[j]);
          }
      } else {  // short last step: its n / G groups
        for (int j = 0; j < kRows; ++j)
          for (int g = 0; g < static_cast<int>(e); ++g) {
            __m512 a = _mm512_setzero_ps();
            for (int c = g * cpg; c < (g + 1) * cpg; ++c) {
              const __m512 wv = w_chunk(w + j * kStep, c);
              a = _mm512_fmadd_ps(xv[c], wv, a);
            }
            accf[j] = _mm512_fmadd_ps(a, bcast(sc, j * static_cast<int>(e) + g), accf[j]);
          }
      }
    } else {  // GM 0 / 128: one chain per row across steps
      if (n == kStep) {
        __m512 xv[4];
        LLMKERN_UNROLL for (int c = 0; c < 4; ++c) xv[c] = _mm512_loadu_ps(x + k + 16 * c);
        LLMKERN_UNROLL for (int j = 0; j < kRows; ++j)
          LLMKERN_UNROLL for (int c = 0; c < 4; ++c) {
            const __m512 wv = w_chunk(w + j * kStep, c);
            acc[j] = _mm512_fmadd_ps(xv[c], wv, acc[j]);
          }
      } else {  // per channel, short last step: full chunks then one masked chunk (as canonical)
        for (int64_t c = 0; 16 * c < n; ++c) {
          const __m512 xv = _mm512_maskz_loadu_ps(avx512::tail16(std::min<int64_t>(16, n - 16 * c)), x + k + 16 * c);
          LLMKERN_UNROLL for (int j = 0; j < kRows; ++j) {
            const __m512 wv = w_chunk(w + j * kStep, c);
            acc[j] = _mm512_fmadd_ps(xv, wv, acc[j]);
          }
        }
      }
      if (e) {
        if constexpr (GM == 0) {
          LLMKERN_UNROLL for (int j = 0; j < kRows; ++j) {
            float sc;
            if (E == 2) {
              uint16_t hv;
              std::memcpy(&hv, sp + 2 * j, 2);
              sc = f16_to_f32(hv);
            } else {
              std::memcpy(&sc, sp + 4 * j, 4);
            }
            res[j] = _mm512_reduce_add_ps(acc[j]) * sc;
          }
        } else {
          const float* sc = scales_f32<E>(sp, kRows, buf[0]);
          LLMKERN_UNROLL for (int j = 0; j < kRows; ++j) {
            accf[j] = _mm512_fmadd_ps(acc[j], bcast(sc, j), accf[j]);
            acc[j] = _mm512_setzero_ps();
          }
          sg = 0;
        }
      }
    }
    p += rec;
  }
  if constexpr (GM != 0) {
    LLMKERN_UNROLL for (int j = 0; j < kRows; ++j) res[j] = _mm512_reduce_add_ps(accf[j]);
  }
}

// Scale g of a weight row's E-byte scales at sp, as a splat (E = 2: vcvtph2ps of the broadcast fp16
// value, the exact conversion scales_f32 makes).
template <int E>
LLMKERN_AVX512_INLINE __m512 row_scale(const uint8_t* sp, int g) {
  if constexpr (E == 2) {
    uint16_t hv;
    std::memcpy(&hv, sp + 2 * g, 2);
    return _mm512_cvtph_ps(_mm256_set1_epi16(static_cast<short>(hv)));
  } else {
    return bcast(reinterpret_cast<const float*>(sp), g);
  }
}

// W8A16 of MR >= 2 activation rows over one block, for groups inside a step (GM 16 / 32 / 64): weight
// row by weight row, each 16-value chunk of a step loaded and converted to fp32 once for all MR rows
// (w8a16_block, called once per row, converts it MR times: per step and weight row 8 + 6 MR vector ops
// instead of 14 MR). The weight row's accumulators (one per activation row) stay in registers across
// the steps, which are kRows * kStep + kRows * E * (64 / GM) bytes apart (the last may be short).
// For each activation row the fp32 operations and their order are w8a16_block's: the same bits.
// x: MR fp32 rows; res[m * kRows + j]: activation row m, weight row j. pf: the caller's prefetch cursor.
template <int E, int GM, int MR>
LLMKERN_AVX512 void w8a16_rows_block(const uint8_t* p, const float* const* x, int64_t K, float* res,
                                     const uint8_t*& pf) {
  static_assert(GM == 16 || GM == 32 || GM == 64, "groups inside a step");
  constexpr int cpg = GM / 16;                                     // 16-value chunks per group
  constexpr int64_t full_rec = kRows * kStep + kRows * E * (kStep / GM);  // bytes of a full step
  const int64_t ns = nsteps(K), bb = block_bytes(K, GM, E);
  for (int j = 0; j < kRows; ++j) {
    // the stream kPrefetch bytes ahead of this row's share of the block
    for (const uint8_t* upto = p + (j + 1) * bb / kRows + kPrefetch; pf < upto; pf += 64)
      _mm_prefetch(reinterpret_cast<const char*>(pf), _MM_HINT_T0);
    __m512 accf[MR];
    LLMKERN_UNROLL for (int m = 0; m < MR; ++m) accf[m] = _mm512_setzero_ps();
    for (int64_t s = 0; s < ns; ++s) {
      const uint8_t* ps = p + s * full_rec;
      const int64_t k = s * kStep, n = std::min(kStep, K - k);  // n: a multiple of GM
      const int e = static_cast<int>(n / GM);
      const int8_t* w = reinterpret_cast<const int8_t*>(ps) + j * kStep;
      const uint8_t* sp = ps + kRows * kStep + E * j * e;  // this row's e scales
      if (n == kStep) {  // compile-time loops: the 4 converted chunks stay in registers
        __m512 wv[4];
        LLMKERN_UNROLL for (int c = 0; c < 4; ++c) wv[c] = w_chunk(w, c);
        LLMKERN_UNROLL for (int g = 0; g < 4 / cpg; ++g) {
          const __m512 sv = row_scale<E>(sp, g);
          LLMKERN_UNROLL for (int m = 0; m < MR; ++m) {
            __m512 a = _mm512_setzero_ps();
            LLMKERN_UNROLL for (int c = g * cpg; c < (g + 1) * cpg; ++c)
              a = _mm512_fmadd_ps(_mm512_loadu_ps(x[m] + k + 16 * c), wv[c], a);
            accf[m] = _mm512_fmadd_ps(a, sv, accf[m]);
          }
        }
      } else {  // a short last step: its e groups
        for (int g = 0; g < e; ++g) {
          const __m512 sv = row_scale<E>(sp, g);
          LLMKERN_UNROLL for (int m = 0; m < MR; ++m) {
            __m512 a = _mm512_setzero_ps();
            for (int c = g * cpg; c < (g + 1) * cpg; ++c) a = _mm512_fmadd_ps(_mm512_loadu_ps(x[m] + k + 16 * c), w_chunk(w, c), a);
            accf[m] = _mm512_fmadd_ps(a, sv, accf[m]);
          }
        }
      }
    }
    LLMKERN_UNROLL for (int m = 0; m < MR; ++m) res[m * kRows + j] = _mm512_reduce_add_ps(accf[m]);
  }
}

// xq: signed activations, 64 nsteps bytes (zero tail); corr: per accumulation unit (step for
// G <= 64, group for larger G, the row for per channel) minus 128 x the lane sums of xq.
template <int E, int GM>
LLMKERN_AVX512 void w8a8_block(const uint8_t*& p, const int8_t* xq, const __m512i* corr, int64_t K, int64_t G,
                               float* res) {
  const int64_t ns = nsteps(K);
  __m512 accf[kRows];
  __m512i acc[kRows];
  LLMKERN_UNROLL for (int j = 0; j < kRows; ++j) accf[j] = _mm512_setzero_ps();
  const int64_t spg = GM == 128 ? G / kStep : 1;
  if (GM == 0 || GM == 128) {
    LLMKERN_UNROLL for (int j = 0; j < kRows; ++j) acc[j] = corr[0];
  }
  int64_t unit = 0;
  LLMKERN_PK_PREFETCH_SETUP
  for (int64_t s = 0, sg = 0; s < ns; ++s) {
    const int64_t k = s * kStep, n = std::min(kStep, K - k);
    const int64_t e = GM == 0 ? (s + 1 == ns) : (GM == 128 ? (++sg == spg) : n / GM);
    const int64_t rec = kRows * kStep + kRows * E * e;
    prefetch_to(p + rec);
    const __m512i xv = _mm512_loadu_si512(xq + k);
    const uint8_t* sp = p + kRows * kStep;
    if constexpr (GM == 16 || GM == 32 || GM == 64) {
      __m512 s0, s1;
      load_scales<E>(sp, kRows * e, s0, s1);
      constexpr int gps = 64 / GM;  // groups per full step; lane l is in group l / (16 / gps)
      const __m512i c = corr[s];
      const __mmask16 lanes = avx512::tail16(n / 4);
      LLMKERN_UNROLL for (int j = 0; j < kRows; ++j) {
        __m512i a = c;
        dpbusd(a, _mm512_loadu_si512(p + j * kStep), xv);
        const int base = j * static_cast<int>(e);
        const __m512i idx = _mm512_add_epi32(
            _mm512_set1_epi32(base),
            _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), 4 / gps == 1 ? 2 : (gps == 2 ? 3 : 4)));
        const __m512 sv = n == kStep ? _mm512_permutex2var_ps(s0, idx, s1)
                                     : _mm512_maskz_permutex2var_ps(lanes, s0, idx, s1);
        accf[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), sv, accf[j]);
      }
    } else {
      LLMKERN_UNROLL for (int j = 0; j < kRows; ++j) dpbusd(acc[j], _mm512_loadu_si512(p + j * kStep), xv);
      if (e) {
        if constexpr (GM == 0) {
          LLMKERN_UNROLL for (int j = 0; j < kRows; ++j) {
            float sc;
            if (E == 2) {
              uint16_t hv;
              std::memcpy(&hv, sp + 2 * j, 2);
              sc = f16_to_f32(hv);
            } else {
              std::memcpy(&sc, sp + 4 * j, 4);
            }
            res[j] = static_cast<float>(avx512::hsum_epi32(acc[j])) * sc;
          }
        } else {
          __m512 s0, s1;
          load_scales<E>(sp, kRows, s0, s1);
          ++unit;
          const __m512i c = unit < K / G ? corr[unit] : _mm512_setzero_si512();
          LLMKERN_UNROLL for (int j = 0; j < kRows; ++j) {
            accf[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[j]), splat(s0, s1, j), accf[j]);
            acc[j] = c;
          }
          sg = 0;
        }
      }
    }
    p += rec;
  }
  if constexpr (GM != 0) {
    LLMKERN_UNROLL for (int j = 0; j < kRows; ++j) res[j] = _mm512_reduce_add_ps(accf[j]);
  }
}
#undef LLMKERN_PK_PREFETCH_SETUP

// Signed row and correction vectors from the u8-encoded (q + 128) row of quantize_row.
LLMKERN_AVX512 inline void w8a8_prepare_row(const uint8_t* qu, int64_t K, int64_t G, int8_t* xq, __m512i* corr) {
  const int64_t ns = nsteps(K), ng = K / G;
  const __m512i c128 = _mm512_set1_epi8(static_cast<char>(0x80));
  const bool per_step = ng > 1 && G <= 64;
  const int64_t spg = ng == 1 ? ns : G / kStep;  // steps per unit for larger groups / per channel
  __m512i run = _mm512_setzero_si512();
  for (int64_t s = 0; s < ns; ++s) {
    const int64_t n = std::min(kStep, K - s * kStep);
    const __m512i v = _mm512_xor_si512(_mm512_maskz_loadu_epi8(avx512::tail64(n), qu + s * kStep), c128);
    const __m512i q = _mm512_maskz_mov_epi8(avx512::tail64(n), v);  // zero tail
    _mm512_storeu_si512(xq + s * kStep, q);
    __m512i sum = _mm512_setzero_si512();
    dpbusd(sum, c128, q);  // 128 * lane sums of q
    if (per_step) {
      corr[s] = _mm512_sub_epi32(_mm512_setzero_si512(), sum);
    } else {
      run = _mm512_sub_epi32(run, sum);
      if ((s + 1) % spg == 0 || s + 1 == ns) {
        corr[s / spg] = run;
        run = _mm512_setzero_si512();
      }
    }
  }
}

// Activation rows of a packed call, prepared once: W8A16 fp32 row pointers; W8A8 signed rows,
// their correction vectors and row scales.
struct Rows {
  const void* x[kMaxRows];
  const __m512i* corr[kMaxRows];
  float scale[kMaxRows];
};

// W8A16 blocks [b0, b1) of M = MR >= 2 rows with w8a16_rows_block (groups inside a step).
template <int E, int GM, int MR>
LLMKERN_AVX512 void run_range_rows(const Int8LinearArgs& a, const uint8_t* blocks, int64_t b0, int64_t b1,
                                   const Rows& r) {
  const int64_t bb = block_bytes(a.K, a.group, E);
  const float* x[MR];
  for (int m = 0; m < MR; ++m) x[m] = static_cast<const float*>(r.x[m]);
  float res[MR * kRows];
  const uint8_t* pf = blocks + b0 * bb + kPrefetch;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * kRows, nr = std::min(kRows, a.N - n0);
    w8a16_rows_block<E, GM, MR>(blocks + b * bb, x, a.K, res, pf);
    for (int64_t m = 0; m < MR; ++m) store_block_row(a, m, n0, nr, res + m * kRows, 1.0f);
  }
}

template <int E, int GM>
LLMKERN_AVX512 void run_range(const Int8LinearArgs& a, const uint8_t* blocks, int64_t b0, int64_t b1, const Rows& r) {
  if constexpr (GM == 16 || GM == 32 || GM == 64) {
    if (!a.w8a8 && a.M >= 2) {  // several rows: convert each weight chunk once for all of them
      switch (a.M) {
        case 2: return run_range_rows<E, GM, 2>(a, blocks, b0, b1, r);
        case 3: return run_range_rows<E, GM, 3>(a, blocks, b0, b1, r);
        case 4: return run_range_rows<E, GM, 4>(a, blocks, b0, b1, r);
        case 5: return run_range_rows<E, GM, 5>(a, blocks, b0, b1, r);
        case 6: return run_range_rows<E, GM, 6>(a, blocks, b0, b1, r);
        case 7: return run_range_rows<E, GM, 7>(a, blocks, b0, b1, r);
        case 8: return run_range_rows<E, GM, 8>(a, blocks, b0, b1, r);
        default: break;
      }
    }
  }
  const int64_t bb = block_bytes(a.K, a.group, E);
  float res[kRows];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * kRows, nr = std::min(kRows, a.N - n0);
    for (int64_t m = 0; m < a.M; ++m) {  // rows after the first read the block from L1/L2
      const uint8_t* p = blocks + b * bb;
      if (a.w8a8) w8a8_block<E, GM>(p, static_cast<const int8_t*>(r.x[m]), r.corr[m], a.K, a.group, res);
      else w8a16_block<E, GM>(p, static_cast<const float*>(r.x[m]), a.K, a.group, res);
      store_block_row(a, m, n0, nr, res, a.w8a8 ? r.scale[m] : 1.0f);
    }
  }
}

template <int E>
inline void run_range_g(const Int8LinearArgs& a, const uint8_t* blocks, int64_t b0, int64_t b1, const Rows& r) {
  with_group_mode(a.K, a.group, [&](auto gm) { run_range<E, decltype(gm)::value>(a, blocks, b0, b1, r); });
}

}  // namespace k512

}  // namespace i8pk
}  // namespace cpu
}  // namespace llmkern
