// rms_norm on the CPU, optionally fused with the residual add (llmkern/ops/rms_norm.py has the semantics).
//
// Per row of N: h = x + residual rounded once to x's dtype (an fp32 add of two values that fp32 holds
// exactly is correctly rounded, so rounding it to bf16/fp16 gives the reference's float64 -> dtype bits),
// y = h * (1 / sqrt(sum(h^2) / N + eps)) * weight in float64, rounded once to x's dtype. float64 costs
// nothing here (a decode row is 576 values) and keeps fp32 results within ~1 ulp of the float64
// reference, bf16 ones almost always bit-exact.
//
// Two passes over a row and no scratch buffer: pass 1 forms h (stored into the h output when there is a
// residual) and the sum of squares; pass 2 reads h back (exact: it is a value of x's dtype) for y.
// Two row functions with the same arithmetic: portable C++ (scalar ISA, and AVX2 machines) and
// AVX-512 (16 values per step: dtype conversions in registers, the float64 sum of squares and
// h * inv * w in 8-lane double vectors, rounding double -> fp32 -> dtype as round_to_dtype does).
// The per-element dtype switch and scalar conversions of the portable row cost ~10x the memory
// traffic. OpenMP splits the rows only when they carry enough bytes to pay for waking threads
// (a decode step's single row never does).
#pragma once

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "llmkern/cpu/convert.h"
#include "llmkern/cpu/features.h"
#include "llmkern/cpu/rotary.h"  // round_to_dtype: double -> dtype as torch's .to() rounds

namespace llmkern {
namespace cpu {

struct RmsNormArgs {
  // Row m of x / residual starts at element m * stride (last dim contiguous).
  const void* x = nullptr;
  DType x_dtype = DType::kF32;
  int64_t x_stride = 0;
  const void* residual = nullptr;  // null: no residual (h = x, nothing stored to h)
  DType r_dtype = DType::kF32;
  int64_t r_stride = 0;
  const void* weight = nullptr;  // [N]
  DType w_dtype = DType::kF32;
  void* y = nullptr;  // [M, N] contiguous, x_dtype
  void* h = nullptr;  // [M, N] contiguous, x_dtype; used only with residual
  int64_t M = 0, N = 0;
  double eps = 0.0;
  int num_threads = 1;
  Isa isa = Isa::kScalar;  // kAvx512Vnni: the AVX-512 row; anything else: the portable row
};

inline void rms_norm_row(const RmsNormArgs& a, int64_t m) {
  const int64_t N = a.N;
  const DType dt = a.x_dtype;
  const void* hrow;  // h of this row in x's dtype, with its element offset
  int64_t hoff;
  // 4 partial sums: independent chains the compiler can overlap (order differs from the reference's
  // by float64 rounding only, ~1e-16 relative).
  double ss[4] = {0.0, 0.0, 0.0, 0.0};
  if (a.residual) {
    const int64_t xo = m * a.x_stride, ro = m * a.r_stride;
    hoff = m * N;
    for (int64_t n = 0; n < N; ++n) {
      const float s = load_as_f32(a.x, xo + n, dt) + load_as_f32(a.residual, ro + n, a.r_dtype);
      store_from_f32(a.h, hoff + n, dt, s);  // fp32 -> dtype rounds like the reference's double -> dtype
      const double hv = load_as_f32(a.h, hoff + n, dt);
      ss[n & 3] += hv * hv;  // exact square in double
    }
    hrow = a.h;
  } else {
    hoff = m * a.x_stride;
    for (int64_t n = 0; n < N; ++n) {
      const double hv = load_as_f32(a.x, hoff + n, dt);
      ss[n & 3] += hv * hv;
    }
    hrow = a.x;
  }
  const double inv = 1.0 / std::sqrt((ss[0] + ss[1] + ss[2] + ss[3]) / static_cast<double>(N) + a.eps);
  const int64_t yoff = m * N;
  for (int64_t n = 0; n < N; ++n) {
    const double v = static_cast<double>(load_as_f32(hrow, hoff + n, dt)) * inv *
                     static_cast<double>(load_as_f32(a.weight, n, a.w_dtype));  // the reference's order
    store_from_f32(a.y, yoff + n, dt, round_to_dtype(v, dt));
  }
}

#define LLMKERN_RMS512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define LLMKERN_RMS512_INLINE LLMKERN_RMS512 inline __attribute__((always_inline))

namespace rms512 {

// Up to 16 values of dtype dt at p + i (lanes outside m read as 0) as fp32.
LLMKERN_RMS512_INLINE __m512 load(const void* p, int64_t i, DType dt, __mmask16 m) {
  switch (dt) {
    case DType::kBF16: {
      const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i);
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    case DType::kF16: return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i));
    default: return _mm512_maskz_loadu_ps(m, static_cast<const float*>(p) + i);
  }
}

// fp32 -> 16-bit dtype bits, rounded half to even as f32_to_bf16 / f32_to_f16 do (NaN stays NaN).
LLMKERN_RMS512_INLINE __m256i to16(__m512 v, DType dt) {
  if (dt == DType::kF16) return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512i u = _mm512_castps_si512(v);
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}

// 16-bit dtype bits -> fp32 (exact).
LLMKERN_RMS512_INLINE __m512 from16(__m256i h, DType dt) {
  if (dt == DType::kF16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Store fp32 v (already a value of dt) to p + i as dt.
LLMKERN_RMS512_INLINE void store(void* p, int64_t i, DType dt, __m512 v, __mmask16 m) {
  if (dt == DType::kF32) _mm512_mask_storeu_ps(static_cast<float*>(p) + i, m, v);
  else _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p) + i, m, to16(v, dt));
}

LLMKERN_RMS512_INLINE __m512d lo_pd(__m512 v) { return _mm512_cvtps_pd(_mm512_castps512_ps256(v)); }
LLMKERN_RMS512_INLINE __m512d hi_pd(__m512 v) { return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))); }

LLMKERN_RMS512 inline void row(const RmsNormArgs& a, int64_t m) {
  const int64_t N = a.N;
  const DType dt = a.x_dtype;
  const void* hrow;
  int64_t hoff;
  __m512d ss0 = _mm512_setzero_pd(), ss1 = _mm512_setzero_pd();
  if (a.residual) {
    const int64_t xo = m * a.x_stride, ro = m * a.r_stride;
    hoff = m * N;
    for (int64_t n = 0; n < N; n += 16) {
      const __mmask16 k = N - n >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (N - n)) - 1);
      const __m512 s = _mm512_add_ps(load(a.x, xo + n, dt, k), load(a.residual, ro + n, a.r_dtype, k));
      __m512 hv;
      if (dt == DType::kF32) {
        hv = s;
        _mm512_mask_storeu_ps(static_cast<float*>(a.h) + hoff + n, k, s);
      } else {
        const __m256i b = to16(s, dt);
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(a.h) + hoff + n, k, b);
        hv = _mm512_maskz_mov_ps(k, from16(b, dt));
      }
      ss0 = _mm512_fmadd_pd(lo_pd(hv), lo_pd(hv), ss0);
      ss1 = _mm512_fmadd_pd(hi_pd(hv), hi_pd(hv), ss1);
    }
    hrow = a.h;
  } else {
    hoff = m * a.x_stride;
    for (int64_t n = 0; n < N; n += 16) {
      const __mmask16 k = N - n >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (N - n)) - 1);
      const __m512 hv = load(a.x, hoff + n, dt, k);
      ss0 = _mm512_fmadd_pd(lo_pd(hv), lo_pd(hv), ss0);
      ss1 = _mm512_fmadd_pd(hi_pd(hv), hi_pd(hv), ss1);
    }
    hrow = a.x;
  }
  const double inv = 1.0 / std::sqrt(_mm512_reduce_add_pd(_mm512_add_pd(ss0, ss1)) / static_cast<double>(N) + a.eps);
  const __m512d iv = _mm512_set1_pd(inv);
  const int64_t yoff = m * N;
  for (int64_t n = 0; n < N; n += 16) {
    const __mmask16 k = N - n >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (N - n)) - 1);
    const __m512 hv = load(hrow, hoff + n, dt, k), wv = load(a.weight, n, a.w_dtype, k);
    // (h * inv) * w in double, the reference's order, then double -> fp32 (one rounding, RNE)
    const __m256 y0 = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_mul_pd(lo_pd(hv), iv), lo_pd(wv)));
    const __m256 y1 = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_mul_pd(hi_pd(hv), iv), hi_pd(wv)));
    const __m512 y = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(y0)), _mm256_castps_pd(y1), 1));
    store(a.y, yoff + n, dt, y, k);  // fp32 -> dtype: the second rounding of round_to_dtype
  }
}

}  // namespace rms512

inline void rms_norm(const RmsNormArgs& a) {
  if (a.M <= 0) return;
  // Bytes read and written per call; below ~64 KiB a thread team costs more than it saves.
  const int64_t bytes = a.M * a.N * dtype_size(a.x_dtype) * (a.residual ? 4 : 2);
  const int threads = bytes >= (int64_t(64) << 10) && a.M > 1 ? std::max(1, a.num_threads) : 1;
  void (*row)(const RmsNormArgs&, int64_t) = a.isa == Isa::kAvx512Vnni ? &rms512::row : &rms_norm_row;
  if (threads == 1) {  // no OpenMP region at all: a decode step is one short row
    for (int64_t m = 0; m < a.M; ++m) row(a, m);
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t m = 0; m < a.M; ++m) row(a, m);
}

}  // namespace cpu
}  // namespace llmkern
