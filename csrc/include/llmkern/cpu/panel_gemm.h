// fp32 GEMM micro-kernels over a panel of dequantized weights, shared by the prefill routes of
// int8_linear (int8_linear_f32.h) and int4_linear (int4_linear_avx512_gemm.h, int4_linear_avx2.h).
//
// Panel: w[k * NS + n], the fp32 weights of NS output columns for kc values of k (k-major, so one step
// loads whole column vectors); columns past the valid ones hold 0. One call: MR rows x NV column vectors
// of sums over the panel's K block, x broadcast one value at a time from its MR rows. The sums start from
// the thread's C tile (or 0 on the first K block) and end in it, or on the last K block in y = sum
// (+ bias) stored in the output dtype. One fixed fp32 order per output: results do not depend on M,
// the row's place in the call or the thread count.
//   AVX-512: NS = 48 (3 vectors), MR <= 8: 24 accumulators, enough chains for FMA latency x throughput.
//   AVX2:    NS = 16 (2 vectors), MR <= 6: 12 accumulators + 2 weight vectors + 1 broadcast = 15 of 16 ymm.
#pragma once

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cstdint>

#include "llmkern/cpu/convert.h"
#include "llmkern/cpu/store_avx512.h"

#define LLMKERN_PG_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define LLMKERN_PG_AVX2 __attribute__((target("avx2,fma,f16c")))
#define LLMKERN_PG_UNROLL _Pragma("GCC unroll 16")

namespace llmkern {
namespace cpu {
namespace pgemm {

// v as computed, opaque to the optimizer: `rounded(a * b) + c` stays a multiply and an add, each rounded,
// where GCC (-ffp-contract=fast, its default) would fuse a * b + c into one FMA that rounds once. The
// dequantized panels need the canonical q * scale + offset (two roundings) bit for bit.
LLMKERN_PG_AVX512 inline __attribute__((always_inline)) __m512 rounded(__m512 v) {
  __asm__("" : "+v"(v));
  return v;
}
LLMKERN_PG_AVX2 inline __attribute__((always_inline)) __m256 rounded(__m256 v) {
  __asm__("" : "+x"(v));
  return v;
}

// One micro-kernel call's rows and outputs.
struct Rows {
  const float* x[8];  // row i of x at the panel's first k (fp32)
  float* c;           // C tile rows [MR][NS]
  bool first, last;   // first K block: start from 0; last: write y instead of C
  void* out[8];       // output row i at the panel's first column (last block only)
  const float* bias;  // at the panel's first column, or null
  DType dt;           // the output's dtype
  int64_t ncols;      // valid columns of the panel
};

namespace avx512 {
constexpr int64_t kNS = 48;

template <int MR, int NV>
LLMKERN_PG_AVX512 void micro(const float* w, int64_t kc, const Rows& r) {
  __m512 acc[MR][NV];
  LLMKERN_PG_UNROLL for (int i = 0; i < MR; ++i)
    LLMKERN_PG_UNROLL for (int v = 0; v < NV; ++v)
      acc[i][v] = r.first ? _mm512_setzero_ps() : _mm512_loadu_ps(r.c + i * kNS + 16 * v);
  const float* x[MR];
  LLMKERN_PG_UNROLL for (int i = 0; i < MR; ++i) x[i] = r.x[i];
  for (int64_t k = 0; k < kc; ++k) {
    __m512 wv[NV];
    LLMKERN_PG_UNROLL for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_ps(w + k * kNS + 16 * v);
    LLMKERN_PG_UNROLL for (int i = 0; i < MR; ++i) {
      const __m512 xb = _mm512_set1_ps(x[i][k]);
      LLMKERN_PG_UNROLL for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(xb, wv[v], acc[i][v]);
    }
  }
  const int64_t es = dtype_size(r.dt);
  LLMKERN_PG_UNROLL for (int v = 0; v < NV; ++v) {
    const __mmask16 m = store512::tail16(r.ncols - 16 * v);
    LLMKERN_PG_UNROLL for (int i = 0; i < MR; ++i) {
      if (r.last)
        store512::store16(acc[i][v], r.bias ? r.bias + 16 * v : nullptr, static_cast<char*>(r.out[i]) + 16 * v * es,
                          r.dt, m);
      else
        _mm512_storeu_ps(r.c + i * kNS + 16 * v, acc[i][v]);
    }
  }
}
}  // namespace avx512

namespace avx2 {
constexpr int64_t kNS = 16;

// The last block's sums go through the C tile and out with the portable converters (one row of at most
// 16 values per row: a negligible share of a call).
template <int MR, int NV>
LLMKERN_PG_AVX2 void micro(const float* w, int64_t kc, const Rows& r) {
  __m256 acc[MR][NV];
  LLMKERN_PG_UNROLL for (int i = 0; i < MR; ++i)
    LLMKERN_PG_UNROLL for (int v = 0; v < NV; ++v)
      acc[i][v] = r.first ? _mm256_setzero_ps() : _mm256_loadu_ps(r.c + i * kNS + 8 * v);
  const float* x[MR];
  LLMKERN_PG_UNROLL for (int i = 0; i < MR; ++i) x[i] = r.x[i];
  for (int64_t k = 0; k < kc; ++k) {
    __m256 wv[NV];
    LLMKERN_PG_UNROLL for (int v = 0; v < NV; ++v) wv[v] = _mm256_loadu_ps(w + k * kNS + 8 * v);
    LLMKERN_PG_UNROLL for (int i = 0; i < MR; ++i) {
      const __m256 xb = _mm256_broadcast_ss(x[i] + k);
      LLMKERN_PG_UNROLL for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_fmadd_ps(xb, wv[v], acc[i][v]);
    }
  }
  LLMKERN_PG_UNROLL for (int i = 0; i < MR; ++i) {
    float* c = r.c + i * kNS;
    LLMKERN_PG_UNROLL for (int v = 0; v < NV; ++v) _mm256_storeu_ps(c + 8 * v, acc[i][v]);
    if (r.last)
      for (int64_t n = 0; n < r.ncols; ++n) store_from_f32(r.out[i], n, r.dt, r.bias ? c[n] + r.bias[n] : c[n]);
  }
}
}  // namespace avx2

}  // namespace pgemm
}  // namespace cpu
}  // namespace llmkern
