// int8_linear W8A16 with 16+ rows on AVX-512, fp32 arithmetic: an fp32 GEMM over dequantized panels.
//
// The lane = k W8A16 tiles (int8_linear_avx512.h) convert every weight to fp32 once per tile of at most
// 4 rows and end every tile with horizontal sums: on SmolLM2's shapes at M = 256 they ran at ~120 GFLOP/s
// against ~170 for F.linear fp32 on float weights (2-core Zen 4). Here, as int4_linear's fp32 prefill
// route: per strip of kF32NS = 48 weight rows and block of at most kF32KC values of k, a panel
// w[k][48] of fp32 dequantized weights q * scale (the reference's dequant(w), exactly) is built once per
// chunk of x rows, and micro-kernels of 8 rows x 3 vectors run FMAs over it, x broadcast from its rows.
// Sums are fp32 in a fixed order per output (one thread each): results do not depend on the thread count.
//
// Takes fp32 x in place, fp16 x (and bf16 x where the bf16 route of int8_linear_bf16.h does not run:
// AVX-512 CPUs without BF16) through fp32 copies of each chunk's rows. Needs K % 16 == 0 (16 values of k
// per unpacking step), the group K or a multiple of 16 (16 values share a scale), M >= kF32MinRows.
#pragma once

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <omp.h>

#include <algorithm>
#include <cstdint>

#include "llmkern/cpu/bf16_pairs_avx512.h"
#include "llmkern/cpu/int8_linear_avx512.h"
#include "llmkern/cpu/int8_linear_common.h"
#include "llmkern/cpu/parallel.h"
#include "llmkern/cpu/store_avx512.h"

#define LLMKERN_I8F __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define LLMKERN_I8F_UNROLL _Pragma("GCC unroll 16")

namespace llmkern {
namespace cpu {
namespace i8f {

constexpr int kMR = 8;
constexpr int kNV = static_cast<int>(kF32NS / 16);

inline bool use_f32_gemm(const Int8LinearArgs& a, Isa isa) {
  return !a.w8a8 && isa == Isa::kAvx512Vnni && a.M >= kF32MinRows && a.K % 16 == 0 &&
         (a.group == a.K || a.group % 16 == 0);
}

// Panel of columns [n0, n0 + ncols) (ncols <= 48) and k in [k0, k0 + kc) (multiples of 16):
// w[k * kF32NS + n] = q[n0 + n, k0 + k] * scale[n0 + n, group of k0 + k] in fp32; columns past ncols in
// the last vector are 0. Rows of 16 values are loaded, dequantized, then turned k-major 16 x 16 at a time.
LLMKERN_I8F inline void unpack_panel(const Int8LinearArgs& a, int64_t n0, int64_t ncols, int64_t k0, int64_t kc,
                                     float* w) {
  const int64_t ng = a.K / a.group;
  for (int64_t v = 0; v * 16 < ncols; ++v) {
    const int64_t rows = std::min<int64_t>(16, ncols - 16 * v);
    for (int64_t k = 0; k < kc; k += 16) {
      __m512i r[16];
      LLMKERN_I8F_UNROLL for (int i = 0; i < 16; ++i) {
        if (i >= rows) {
          r[i] = _mm512_setzero_si512();
          continue;
        }
        const int64_t n = n0 + 16 * v + i;
        const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.w + n * a.K + k0 + k));
        const __m512 s = _mm512_set1_ps(a.scale[n * ng + (k0 + k) / a.group]);  // one group (group % 16 == 0)
        r[i] = _mm512_castps_si512(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), s));
      }
      bf16pairs::transpose16(r);  // r[j] lane i = row i's value at k + j
      LLMKERN_I8F_UNROLL for (int j = 0; j < 16; ++j) _mm512_storeu_si512(w + (k + j) * kF32NS + 16 * v, r[j]);
    }
  }
}

struct MicroOut {
  void* out[kMR];     // output rows at the strip's first column (last K block only)
  const float* bias;  // at the strip's first column, or null
  DType dt;           // the output's (= x's) dtype
  int64_t ncols;      // valid columns of the strip
};

// MR rows x NV vectors of the strip over one K block of kc values (xr[i]: row i at the block's first k):
// accumulators start from C (or 0) and end in C, or on the last block in y = acc (+ bias) in dt.
template <int MR, int NV>
LLMKERN_I8F void micro(const float* w, int64_t kc, const float* const* xr, float* c, bool first, bool last,
                       const MicroOut& o) {
  __m512 acc[MR][NV];
  LLMKERN_I8F_UNROLL for (int i = 0; i < MR; ++i)
    LLMKERN_I8F_UNROLL for (int v = 0; v < NV; ++v)
      acc[i][v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + i * kF32NS + 16 * v);
  const float* x[MR];
  LLMKERN_I8F_UNROLL for (int i = 0; i < MR; ++i) x[i] = xr[i];
  for (int64_t k = 0; k < kc; ++k) {
    __m512 wv[NV];
    LLMKERN_I8F_UNROLL for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_ps(w + k * kF32NS + 16 * v);
    LLMKERN_I8F_UNROLL for (int i = 0; i < MR; ++i) {
      const __m512 xb = _mm512_set1_ps(x[i][k]);
      LLMKERN_I8F_UNROLL for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(xb, wv[v], acc[i][v]);
    }
  }
  const int64_t es = dtype_size(o.dt);
  LLMKERN_I8F_UNROLL for (int v = 0; v < NV; ++v) {
    const __mmask16 m = store512::tail16(o.ncols - 16 * v);
    LLMKERN_I8F_UNROLL for (int i = 0; i < MR; ++i) {
      if (last)
        store512::store16(acc[i][v], o.bias ? o.bias + 16 * v : nullptr, static_cast<char*>(o.out[i]) + 16 * v * es,
                          o.dt, m);
      else
        _mm512_storeu_ps(c + i * kF32NS + 16 * v, acc[i][v]);
    }
  }
}

using MicroFn = void (*)(const float*, int64_t, const float* const*, float*, bool, bool, const MicroOut&);

template <int MR>
inline void fill_row(MicroFn (&t)[kMR + 1][kNV + 1]) {
  t[MR][1] = &micro<MR, 1>;
  t[MR][2] = &micro<MR, 2>;
  t[MR][3] = &micro<MR, 3>;
}

inline const MicroFn (&micro_table())[kMR + 1][kNV + 1] {
  static const auto table = [] {
    struct T { MicroFn f[kMR + 1][kNV + 1] = {}; } t;
    fill_row<1>(t.f); fill_row<2>(t.f); fill_row<3>(t.f); fill_row<4>(t.f);
    fill_row<5>(t.f); fill_row<6>(t.f); fill_row<7>(t.f); fill_row<8>(t.f);
    return t;
  }();
  return table.f;
}

// The whole call (use_f32_gemm(a, isa) true). ws: int8_linear_workspace_bytes(M, K, N, false, num_threads).
// Threads split the columns in whole 16-column vectors (and, with more threads than vectors, the rows in
// blocks of 8); rows go in chunks of f32_chunk_rows, which non-fp32 x has converted by all threads first.
inline void int8_linear_f32(const Int8LinearArgs& a) {
  const MicroFn (&mt)[kMR + 1][kNV + 1] = micro_table();
  const int64_t K = a.K, Mc = f32_chunk_rows(a.M, K);
  char* ws = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(a.ws) + kAlign - 1) / kAlign * kAlign);
  float* xf = reinterpret_cast<float*>(ws);  // [Mc][K] fp32 copies of a chunk's rows (x not fp32)
  char* per_thread = ws + bf16_align(f32_chunk_padded(a.M, K) * K * 4);
  const int64_t tb = f32_thread_bytes(a.M, K), units = (a.N + 15) / 16;
  // K blocks of equal depth (multiples of 16): K = 576 takes 4 x 144, not 4 x 128 + 64
  const int64_t nblocks = (K + kF32KC - 1) / kF32KC;
  const int64_t kcb = std::min<int64_t>(kF32KC, ((K + nblocks - 1) / nblocks + 15) / 16 * 16);
  const int64_t work = a.M * a.N * K;
  const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(a.num_threads, work >> 20)));
  const bool convert = a.x_dtype != DType::kF32;
  const int64_t es = dtype_size(a.x_dtype);
#pragma omp parallel num_threads(nthreads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const GridPart part(units, nt, t);
    const int64_t col0 = part.u0 * 16, col1 = std::min(a.N, part.u1 * 16);
    float* panel = reinterpret_cast<float*>(per_thread + t * tb);
    float* ctile = reinterpret_cast<float*>(per_thread + t * tb + bf16_align(kF32KC * kF32NS * 4));
    for (int64_t m0 = 0; m0 < a.M; m0 += Mc) {
      const int64_t m1 = std::min(a.M, m0 + Mc);
      if (convert) {
#pragma omp for schedule(static)
        for (int64_t m = m0; m < m1; ++m) avx512::row_to_f32(x_row(a, m), a.x_dtype, K, xf + (m - m0) * K);
      }  // implicit barrier: the chunk is converted
      int64_t r0, r1;  // this thread's rows of the chunk, whole blocks of 8
      part.rows(m1 - m0, kMR, &r0, &r1);
      for (int64_t n0 = col0; n0 < col1 && r1 > r0; n0 += kF32NS) {
        const int64_t ncols = std::min<int64_t>(kF32NS, col1 - n0);
        const int nv = static_cast<int>((ncols + 15) / 16);
        MicroOut o;
        o.bias = a.bias ? a.bias + n0 : nullptr;
        o.dt = a.x_dtype;
        o.ncols = ncols;
        for (int64_t k0 = 0; k0 < K; k0 += kcb) {
          const int64_t kc = std::min(kcb, K - k0);
          unpack_panel(a, n0, ncols, k0, kc, panel);
          for (int64_t r = r0; r < r1; r += kMR) {
            const int mr = static_cast<int>(std::min<int64_t>(kMR, r1 - r));
            const float* xr[kMR];
            for (int i = 0; i < mr; ++i) {
              const int64_t m = m0 + r + i;
              xr[i] = (convert ? xf + (m - m0) * K : static_cast<const float*>(x_row(a, m))) + k0;
              o.out[i] = static_cast<char*>(a.out) + (m * a.out_row_stride + n0) * es;
            }
            mt[mr][nv](panel, kc, xr, ctile + (r - r0) * kF32NS, k0 == 0, k0 + kc >= K, o);
          }
        }
      }
      if (convert) {
#pragma omp barrier  // the next chunk overwrites the converted rows
      }
    }
  }
}

}  // namespace i8f
}  // namespace cpu
}  // namespace llmkern
