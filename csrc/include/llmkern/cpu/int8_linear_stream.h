// int8_linear's "stream" route: W8A16 decode calls (1-8 activation rows; AVX2 with per-channel scales or
// groups of 128+: 1-4; AVX-512: as many as keep x in L1) read the canonical tensors (w [N, K] int8
// row-major, scale [N, K/G] fp32) directly, with software prefetch, so that a module need not hold the
// packed decode copy (int8_linear_pack_layout.h) beside them.
//
// Why it can: a block of 8 weight rows is 8 K contiguous bytes, and a thread's blocks one contiguous range.
// Groups of 16 / 32 / 64 are read a weight row at a time, in order (AVX-512 rows_block, also for one
// activation row; AVX2 row_by_row for one row), prefetching 48 lines ahead; the other kernels read a block
// step by step (64 values of k of each of
// the 8 rows), which no hardware prefetcher follows when rows are short, so each step prefetches, for every
// row, the line it will read kStreamAhead steps later. Both into L2 (prefetcht1; prefetcht0 was 2x slower at
// K = 576, its misses held in L1's few fill buffers). Cold, 2 threads, M = 1 (docs/notes/cpu-memory.md),
// against the packed copy: AVX-512 0.96-1.25x at K = 4096-14336 (per channel 1.04-1.15x), 0.91-1.12x at
// K = 2048, 0.74-1.18x at K = 576 / 1536; AVX2 0.84-0.94x at K = 2048-14336. Int8Linear's preparer packs rows
// shorter than kStreamMinK and streams longer ones: their weights are held once instead of twice.
//
// Results are bit-identical to the canonical tiles and to the packed kernels: per output the same fp32
// operations in the same order (16-value (AVX-512) / 8-value (AVX2) FMA chains per group from the group's
// start, then acc * scale + running sum per group, then the horizontal sum), only the addresses differ.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>

#include "llmkern/cpu/features.h"
#include "llmkern/cpu/int8_linear_common.h"
#include "llmkern/cpu/int8_linear_pack.h"
#include "llmkern/cpu/int8_linear_scalar.h"
#include "llmkern/cpu/parallel.h"

namespace llmkern {
namespace cpu {
namespace i8st {

using i8pk::kRows;
using i8pk::kStep;
using i8pk::nsteps;

constexpr int64_t kStreamAhead = 48;    // steps (512 weight bytes each) prefetched ahead
constexpr int64_t kStreamMinK = 2048;   // Int8Linear packs rows shorter than this (_STREAM_MIN_K, ops/int8_linear.py)
constexpr int64_t kMaxRows = 8;

// Whether a call reads the canonical tensors through the stream kernels (no packed copy given): groups the
// packed layout takes (per channel, 16, 32, multiples of 64), up to 8 rows (AVX2 per channel or G >= 128: 4,
// the packed route's limit there: each row converts every weight again).
// AVX-512: also M K fp32 values within kL1X bytes: its kernels read x once per weight row (grouped) or block
// (the others), and beyond L1 the tiles are faster (K = 4096, 2 threads, cold: M = 3 1.2x, M = 4 1.25x).
constexpr int64_t kL1X = 32 << 10;
inline bool use_stream(const Int8LinearArgs& a, Isa isa) {
  if (a.packed || a.w8a8 || a.M < 1 || (isa != Isa::kAvx512Vnni && isa != Isa::kAvx2) || !i8pk::group_ok(a.K, a.group))
    return false;
  const bool grouped = a.K / a.group > 1 && a.group <= 64;
  // (AVX-512 per channel or G >= 128 steps through the block's 8 rows together: at K = 576 half the packed
  // kernel's speed and no faster than the tiles, so short rows keep the tiles)
  if (isa == Isa::kAvx512Vnni)
    return a.M <= kMaxRows && (a.M == 1 || a.M * a.K * 4 <= kL1X) && (grouped || a.K >= kStreamMinK);
  return a.M <= (grouped ? kMaxRows : i8pk::kAvx2W8A16MaxRows);
}

// The thread's read position as a step index t over its blocks [b0, b1): block t / ns, step t % ns.
// Prefetches (L2) what step t reads: each of the block's 8 weight rows' 64 bytes and, at the step where a
// row's next line of scales starts (16 groups; per channel: the block's first step), that line.
inline void prefetch_step(const Int8LinearArgs& a, int64_t t, int64_t ns, int64_t b1) {
  const int64_t b = t / ns, s = t % ns;
  if (b >= b1) return;
  const int64_t K = a.K, G = a.group, ng = K / G;
  // (steps per 16 groups: G / 4; per channel, ng = 1: the row's one scale, fetched with the block's first step)
  const bool scales = ng == 1 ? s == 0 : (s * kStep) % (16 * G) < kStep;
  for (int j = 0; j < kRows; ++j) {
    const int64_t n = std::min(b * kRows + j, a.N - 1);
    _mm_prefetch(reinterpret_cast<const char*>(a.w + n * K + s * kStep), _MM_HINT_T1);
    if (scales) _mm_prefetch(reinterpret_cast<const char*>(a.scale + n * ng + s * kStep / G), _MM_HINT_T1);
  }
}

// The block's 8 weight rows and scale rows (rows past N repeat row N - 1: read, never stored).
inline void block_rows(const Int8LinearArgs& a, int64_t b, const int8_t** wr, const float** sr) {
  const int64_t n0 = b * kRows, nr = std::min(kRows, a.N - n0), ng = a.K / a.group;
  for (int j = 0; j < kRows; ++j) {
    const int64_t n = n0 + std::min<int64_t>(j, nr - 1);
    wr[j] = a.w + n * a.K;
    sr[j] = a.scale + n * ng;
  }
}

// ------------------------------------------------------------------ AVX-512 (16-value chunks)
namespace k512 {
using i8pk::k512::w_chunk;

// Chunk c (16 values) of a weight row's step at w, as fp32: only its first n values read (the rest 0, as the
// packed layout's zero padding), for a row's short last step.
LLMKERN_AVX512_INLINE __m512 w_chunk_tail(const int8_t* w, int64_t c, int64_t n) {
  const __m128i v = _mm_maskz_loadu_epi8(static_cast<__mmask16>(avx512::tail16(std::min<int64_t>(16, n - 16 * c))), w + 16 * c);
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v));
}

// One activation row x against block b for GM 0 (per channel) and 128 (G a multiple of 64 above 64): one
// chain per weight row across the steps of the row / of a group (the packed w8a16_block's operations).
// res[j] for the block's 8 weight rows.
template <int GM>
LLMKERN_AVX512 void block(const Int8LinearArgs& a, int64_t b, int64_t b1, const float* x, float* res) {
  const int64_t K = a.K, ns = nsteps(K), spg = GM == 128 ? a.group / kStep : ns;  // steps per chain
  const int8_t* wr[kRows];
  const float* sr[kRows];
  block_rows(a, b, wr, sr);
  __m512 acc[kRows], accf[kRows];
  LLMKERN_UNROLL for (int j = 0; j < kRows; ++j) {
    acc[j] = _mm512_setzero_ps();
    accf[j] = _mm512_setzero_ps();
  }
  for (int64_t s = 0; s < ns; ++s) {
    const int64_t k = s * kStep, n = std::min(kStep, K - k);
    prefetch_step(a, b * ns + s + kStreamAhead, ns, b1);
    if (n == kStep) {
      __m512 xv[4];
      LLMKERN_UNROLL for (int c = 0; c < 4; ++c) xv[c] = _mm512_loadu_ps(x + k + 16 * c);
      LLMKERN_UNROLL for (int j = 0; j < kRows; ++j)
        LLMKERN_UNROLL for (int c = 0; c < 4; ++c) acc[j] = _mm512_fmadd_ps(xv[c], w_chunk(wr[j] + k, c), acc[j]);
    } else {  // per channel, short last step: full chunks then one masked chunk (as canonical)
      for (int64_t c = 0; 16 * c < n; ++c) {
        const __m512 xv = _mm512_maskz_loadu_ps(avx512::tail16(std::min<int64_t>(16, n - 16 * c)), x + k + 16 * c);
        LLMKERN_UNROLL for (int j = 0; j < kRows; ++j) acc[j] = _mm512_fmadd_ps(xv, w_chunk_tail(wr[j] + k, c, n), acc[j]);
      }
    }
    if ((s + 1) % spg == 0 || s + 1 == ns) {  // a chain ends: its scale
      if constexpr (GM == 0) {
        LLMKERN_UNROLL for (int j = 0; j < kRows; ++j) res[j] = _mm512_reduce_add_ps(acc[j]) * sr[j][0];
      } else {
        const int64_t g = s / spg;
        LLMKERN_UNROLL for (int j = 0; j < kRows; ++j) {
          accf[j] = _mm512_fmadd_ps(acc[j], _mm512_set1_ps(sr[j][g]), accf[j]);
          acc[j] = _mm512_setzero_ps();
        }
      }
    }
  }
  if constexpr (GM != 0) {
    LLMKERN_UNROLL for (int j = 0; j < kRows; ++j) res[j] = _mm512_reduce_add_ps(accf[j]);
  }
}

// MR (1..8) activation rows against block b, groups of 16 / 32 / 64, weight row by weight row (per output
// the packed w8a16_block's operations; the packed w8a16_rows_block's order): each 16-value weight chunk
// converted once for all MR rows. Row j is K contiguous bytes read in order, and the prefetch runs
// kStreamAhead * 64 bytes ahead along the block's address range. Also for one row: 1.5-1.8x faster than
// interleaving the 8 rows per step (as w8a16_block does) at K = 576 (hardware prefetch follows one row).
// Each weight row re-reads the MR rows of x: use_stream keeps MR K fp32 values within L1.
template <int GM, int MR>
LLMKERN_AVX512 void rows_block(const Int8LinearArgs& a, int64_t b, int64_t b1, const float* const* x, float* res) {
  constexpr int cpg = GM / 16;
  const int64_t K = a.K, ns = nsteps(K);
  const int8_t* wr[kRows];
  const float* sr[kRows];
  block_rows(a, b, wr, sr);
  const int8_t* end = a.w + std::min(b1 * kRows, a.N) * K;  // the thread's last weight byte + 1
  for (int j = 0; j < kRows; ++j) {
    __m512 accf[MR];
    LLMKERN_UNROLL for (int m = 0; m < MR; ++m) accf[m] = _mm512_setzero_ps();
    for (int64_t s = 0; s < ns; ++s) {
      const int64_t k = s * kStep, n = std::min(kStep, K - k);
      const int8_t* ahead = wr[j] + k + kStreamAhead * kStep;
      if (ahead < end) _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T1);
      if (s % (16 * GM / kStep) == 0) _mm_prefetch(reinterpret_cast<const char*>(sr[j] + k / GM + 16), _MM_HINT_T1);
      const int8_t* w = wr[j] + k;
      const float* sp = sr[j] + k / GM;
      if (n == kStep) {
        __m512 wv[4];
        LLMKERN_UNROLL for (int c = 0; c < 4; ++c) wv[c] = w_chunk(w, c);
        LLMKERN_UNROLL for (int g = 0; g < 4 / cpg; ++g) {
          const __m512 sv = _mm512_set1_ps(sp[g]);
          LLMKERN_UNROLL for (int m = 0; m < MR; ++m) {
            __m512 acc = _mm512_setzero_ps();
            LLMKERN_UNROLL for (int c = g * cpg; c < (g + 1) * cpg; ++c)
              acc = _mm512_fmadd_ps(_mm512_loadu_ps(x[m] + k + 16 * c), wv[c], acc);
            accf[m] = _mm512_fmadd_ps(acc, sv, accf[m]);
          }
        }
      } else {
        const int e = static_cast<int>(n / GM);
        for (int g = 0; g < e; ++g) {
          const __m512 sv = _mm512_set1_ps(sp[g]);
          LLMKERN_UNROLL for (int m = 0; m < MR; ++m) {
            __m512 acc = _mm512_setzero_ps();
            for (int c = g * cpg; c < (g + 1) * cpg; ++c) acc = _mm512_fmadd_ps(_mm512_loadu_ps(x[m] + k + 16 * c), w_chunk(w, c), acc);
            accf[m] = _mm512_fmadd_ps(acc, sv, accf[m]);
          }
        }
      }
    }
    LLMKERN_UNROLL for (int m = 0; m < MR; ++m) res[m * kRows + j] = _mm512_reduce_add_ps(accf[m]);
  }
}

template <int GM>
LLMKERN_AVX512 void run_range(const Int8LinearArgs& a, const float* const* x, int64_t b0, int64_t b1) {
  const int64_t ns = nsteps(a.K);
  for (int64_t t = b0 * ns; t < b0 * ns + kStreamAhead; ++t) prefetch_step(a, t, ns, b1);
  float res[kMaxRows * kRows];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * kRows, nr = std::min(kRows, a.N - n0);
    if constexpr (GM == 0 || GM == 128) {  // each activation row in turn (later rows read the block from L1/L2)
      for (int64_t m = 0; m < a.M; ++m) {
        block<GM>(a, b, b1, x[m], res);
        i8pk::store_block_row(a, m, n0, nr, res, 1.0f);
      }
    } else {
      switch (a.M) {
        case 1: rows_block<GM, 1>(a, b, b1, x, res); break;  // (see rows_block)
        case 2: rows_block<GM, 2>(a, b, b1, x, res); break;
        case 3: rows_block<GM, 3>(a, b, b1, x, res); break;
        case 4: rows_block<GM, 4>(a, b, b1, x, res); break;
        case 5: rows_block<GM, 5>(a, b, b1, x, res); break;
        case 6: rows_block<GM, 6>(a, b, b1, x, res); break;
        case 7: rows_block<GM, 7>(a, b, b1, x, res); break;
        default: rows_block<GM, 8>(a, b, b1, x, res); break;
      }
      for (int64_t m = 0; m < a.M; ++m) i8pk::store_block_row(a, m, n0, nr, res + m * kRows, 1.0f);
    }
  }
}
}  // namespace k512

// ------------------------------------------------------------------ AVX2 (8-value chunks)
namespace k256 {
using i8pk::k256::hsum_ps;
using i8pk::k256::w_chunk;

// One activation row x against block b for GM 0 (per channel) and 128: one chain per weight row across the
// steps of the row / of a group (the packed AVX2 w8a16_block's operations; per channel, the canonical scalar
// tail of K % 8 values into lane 0).
template <int GM>
LLMKERN_AVX2 void block(const Int8LinearArgs& a, int64_t b, int64_t b1, const float* x, float* res) {
  const int64_t K = a.K, ns = nsteps(K), spg = GM == 128 ? a.group / kStep : ns;
  const int8_t* wr[kRows];
  const float* sr[kRows];
  block_rows(a, b, wr, sr);
  __m256 acc[kRows], accf[kRows];
  LLMKERN_UNROLL for (int j = 0; j < kRows; ++j) {
    acc[j] = _mm256_setzero_ps();
    accf[j] = _mm256_setzero_ps();
  }
  for (int64_t s = 0; s < ns; ++s) {
    const int64_t k = s * kStep, n = std::min(kStep, K - k);
    prefetch_step(a, b * ns + s + kStreamAhead, ns, b1);
    if (n == kStep) {
      LLMKERN_UNROLL for (int c = 0; c < kStep / 8; ++c) {
        const __m256 xv = _mm256_loadu_ps(x + k + 8 * c);
        LLMKERN_UNROLL for (int j = 0; j < kRows; ++j) acc[j] = _mm256_fmadd_ps(xv, w_chunk(wr[j] + k, c), acc[j]);
      }
    } else {  // per channel, short last step: full chunks, then the canonical scalar tail into lane 0
      const int64_t full = n / 8;
      for (int64_t c = 0; c < full; ++c) {
        const __m256 xv = _mm256_loadu_ps(x + k + 8 * c);
        LLMKERN_UNROLL for (int j = 0; j < kRows; ++j) acc[j] = _mm256_fmadd_ps(xv, w_chunk(wr[j] + k, c), acc[j]);
      }
      if (n > 8 * full) {
        for (int j = 0; j < kRows; ++j) {
          float t = 0.0f;
          for (int64_t kk = 8 * full; kk < n; ++kk) t += x[k + kk] * static_cast<float>(wr[j][k + kk]);
          acc[j] = _mm256_add_ps(acc[j], _mm256_setr_ps(t, 0, 0, 0, 0, 0, 0, 0));
        }
      }
    }
    if ((s + 1) % spg == 0 || s + 1 == ns) {
      if constexpr (GM == 0) {
        LLMKERN_UNROLL for (int j = 0; j < kRows; ++j) res[j] = hsum_ps(acc[j]) * sr[j][0];
      } else {
        const int64_t g = s / spg;
        LLMKERN_UNROLL for (int j = 0; j < kRows; ++j) {
          accf[j] = _mm256_fmadd_ps(acc[j], _mm256_set1_ps(sr[j][g]), accf[j]);
          acc[j] = _mm256_setzero_ps();
        }
      }
    }
  }
  if constexpr (GM != 0) {
    LLMKERN_UNROLL for (int j = 0; j < kRows; ++j) res[j] = hsum_ps(accf[j]);
  }
}

// One activation row x against block b, groups of 16 / 32 / 64, weight row by weight row (each row read in
// order, prefetched 48 lines ahead, as AVX-512's rows_block; per output the packed w8a16_block's operations):
// 1.2-1.4x faster than stepping through the 8 rows together.
template <int GM>
LLMKERN_AVX2 void row_by_row(const Int8LinearArgs& a, int64_t b, int64_t b1, const float* x, float* res) {
  constexpr int cpg = GM / 8;
  const int64_t K = a.K, ns = nsteps(K);
  const int8_t* wr[kRows];
  const float* sr[kRows];
  block_rows(a, b, wr, sr);
  const int8_t* end = a.w + std::min(b1 * kRows, a.N) * K;
  for (int j = 0; j < kRows; ++j) {
    __m256 accf = _mm256_setzero_ps();
    for (int64_t s = 0; s < ns; ++s) {
      const int64_t k = s * kStep, n = std::min(kStep, K - k);
      const int8_t* ahead = wr[j] + k + kStreamAhead * kStep;
      if (ahead < end) _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T1);
      if (s % (16 * GM / kStep) == 0) _mm_prefetch(reinterpret_cast<const char*>(sr[j] + k / GM + 16), _MM_HINT_T1);
      const int8_t* w = wr[j] + k;
      const float* sp = sr[j] + k / GM;
      if (n == kStep) {
        LLMKERN_UNROLL for (int g = 0; g < kStep / GM; ++g) {
          __m256 acc = _mm256_setzero_ps();
          LLMKERN_UNROLL for (int c = g * cpg; c < (g + 1) * cpg; ++c)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8 * c), w_chunk(w, c), acc);
          accf = _mm256_fmadd_ps(acc, _mm256_set1_ps(sp[g]), accf);
        }
      } else {
        for (int64_t g = 0; g < n / GM; ++g) {
          __m256 acc = _mm256_setzero_ps();
          for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8 * c), w_chunk(w, c), acc);
          accf = _mm256_fmadd_ps(acc, _mm256_set1_ps(sp[g]), accf);
        }
      }
    }
    res[j] = hsum_ps(accf);
  }
}

// MR (2..4) activation rows against block b (the packed AVX2 w8a16_rows_block's operations): step by
// step, two weight rows at a time, each 8-value weight chunk converted once for all MR rows; the running
// sums go through memory at each group's end.
template <int GM, int MR>
LLMKERN_AVX2 void rows_block(const Int8LinearArgs& a, int64_t b, int64_t b1, const float* const* x, float* res) {
  constexpr int cpg = GM / 8;
  const int64_t K = a.K, ns = nsteps(K);
  const int8_t* wr[kRows];
  const float* sr[kRows];
  block_rows(a, b, wr, sr);
  alignas(32) float accf[kRows][MR][8];
  for (int j = 0; j < kRows; ++j)
    for (int m = 0; m < MR; ++m) _mm256_store_ps(accf[j][m], _mm256_setzero_ps());
  for (int64_t s = 0; s < ns; ++s) {
    const int64_t k = s * kStep, e = std::min(kStep, K - k) / GM;
    prefetch_step(a, b * ns + s + kStreamAhead, ns, b1);
    for (int j = 0; j < kRows; j += 2) {
      for (int64_t g = 0; g < e; ++g) {
        __m256 acc[2][MR];
        LLMKERN_UNROLL for (int r = 0; r < 2; ++r)
          LLMKERN_UNROLL for (int m = 0; m < MR; ++m) acc[r][m] = _mm256_setzero_ps();
        LLMKERN_UNROLL for (int c = 0; c < cpg; ++c) {
          const int64_t cc = g * cpg + c;
          const __m256 w0 = w_chunk(wr[j] + k, cc), w1 = w_chunk(wr[j + 1] + k, cc);
          LLMKERN_UNROLL for (int m = 0; m < MR; ++m) {
            const __m256 xv = _mm256_loadu_ps(x[m] + k + 8 * cc);
            acc[0][m] = _mm256_fmadd_ps(xv, w0, acc[0][m]);
            acc[1][m] = _mm256_fmadd_ps(xv, w1, acc[1][m]);
          }
        }
        LLMKERN_UNROLL for (int r = 0; r < 2; ++r) {
          const __m256 sv = _mm256_set1_ps(sr[j + r][k / GM + g]);
          LLMKERN_UNROLL for (int m = 0; m < MR; ++m)
            _mm256_store_ps(accf[j + r][m], _mm256_fmadd_ps(acc[r][m], sv, _mm256_load_ps(accf[j + r][m])));
        }
      }
    }
  }
  for (int j = 0; j < kRows; ++j)
    for (int m = 0; m < MR; ++m) res[m * kRows + j] = hsum_ps(_mm256_load_ps(accf[j][m]));
}

template <int GM>
LLMKERN_AVX2 void run_range(const Int8LinearArgs& a, const float* const* x, int64_t b0, int64_t b1) {
  const int64_t ns = nsteps(a.K);
  for (int64_t t = b0 * ns; t < b0 * ns + kStreamAhead; ++t) prefetch_step(a, t, ns, b1);
  float res[4 * kRows];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * kRows, nr = std::min(kRows, a.N - n0);
    if constexpr (GM == 0 || GM == 128) {  // each activation row in turn (at most 4: use_stream)
      for (int64_t m = 0; m < a.M; ++m) {
        block<GM>(a, b, b1, x[m], res);
        i8pk::store_block_row(a, m, n0, nr, res, 1.0f);
      }
    } else {
      for (int64_t m0 = 0; m0 < a.M; m0 += 4) {  // passes of up to 4 rows (later passes read the block from L1/L2)
        const float* const* xs = x + m0;
        const int64_t mr = std::min<int64_t>(4, a.M - m0);
        if (mr == 4) rows_block<GM, 4>(a, b, b1, xs, res);
        else if (mr == 3) rows_block<GM, 3>(a, b, b1, xs, res);
        else if (mr == 2) rows_block<GM, 2>(a, b, b1, xs, res);
        else row_by_row<GM>(a, b, b1, xs[0], res);
        for (int64_t i = 0; i < mr; ++i) i8pk::store_block_row(a, m0 + i, n0, nr, res + i * kRows, 1.0f);
      }
    }
  }
}
}  // namespace k256

// A call taken by use_stream. ws: int8_linear_workspace_bytes(M, K, N, false, num_threads) (16-bit x rows
// converted to fp32 there, as the packed route does).
inline void int8_linear_stream(const Int8LinearArgs& a, Isa isa) {
  char* ws = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(a.ws) + kAlign - 1) / kAlign * kAlign);
  const void* xv[kMaxRows];
  i8pk::detail::f32_rows(a, ws, isa == Isa::kAvx512Vnni ? &avx512::row_to_f32 : &scalar::row_to_f32, xv);
  const float* x[kMaxRows];
  for (int64_t m = 0; m < a.M; ++m) x[m] = static_cast<const float*>(xv[m]);
  i8pk::detail::over_blocks(a, [&](int64_t b0, int64_t b1) {
    auto go = [&](auto gm) {
      constexpr int GM = decltype(gm)::value;
      if (isa == Isa::kAvx512Vnni) k512::run_range<GM>(a, x, b0, b1);
      else k256::run_range<GM>(a, x, b0, b1);
    };
    i8pk::with_group_mode(a.K, a.group, go);
  });
}

}  // namespace i8st
}  // namespace cpu
}  // namespace llmkern
