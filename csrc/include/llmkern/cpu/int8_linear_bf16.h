// int8_linear W8A16 with bf16 x and several rows on AVX-512 BF16: a bf16 GEMM over dequantized panels.
//
// The lane = k W8A16 tiles (int8_linear_avx512.h) convert every weight to fp32 once per tile of at most
// 4 rows and end every tile with horizontal sums: at M = 128 / 512 on Llama-2-7B shapes they ran at
// 0.44x F.linear bf16 (run 29k). Here, as int4_linear's bf16 prefill: per strip of kBf16NS = 48 weight
// rows and block of at most kBf16KC values of k, a panel of bf16 pairs w[p][48] (pair p = weights of
// k0 + 2p, k0 + 2p + 1) is built once per chunk of x rows, and micro-kernels of 8 rows x 3 vectors run
// vdpbf16ps over it with x packed as [block of 8 rows][K / 2][8] pairs (bf16_pairs_avx512.h).
//   Per-channel scales (group == K): the panel holds q exactly (every int8 value is a bf16 value), and the scale
//   multiplies the fp32 sum at the end: y = scale[n] * sum_k x q (+ bias), the op's definition.
//   Grouped scales (group a multiple of 16: GGUF Q8_0's and Q5_0's 32, Q6_K's 16): the panel holds
//   q * scale rounded to bf16 (nearest even, 2^-9 relative), as int4_linear's bf16 route does with its
//   dequantized weights.
// Sums are fp32 in a fixed order per output (one thread each): results do not depend on the thread count.
// Needs K % 32 == 0 (16 pairs per packing step) and M >= kBf16MinRows (fewer rows: the decode paths).
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
#include "llmkern/cpu/features.h"
#include "llmkern/cpu/int8_linear_common.h"
#include "llmkern/cpu/int8_linear_pack_layout.h"
#include "llmkern/cpu/parallel.h"
#include "llmkern/cpu/store_avx512.h"

#define LLMKERN_I8BF __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")))

namespace llmkern {
namespace cpu {
namespace i8bf {

constexpr int kMR = 8;
constexpr int kNV = static_cast<int>(kBf16NS / 16);

inline bool use_bf16_gemm(const Int8LinearArgs& a, Isa isa) {
  return !a.w8a8 && a.x_dtype == DType::kBF16 && isa == Isa::kAvx512Vnni && a.M >= kBf16MinRows && a.K % 32 == 0 &&
         (a.group == a.K || a.group % 16 == 0) && features().avx512_bf16;
}

// Panel of columns [n0, n0 + ncols) (ncols <= 48) and k in [k0, k0 + kc) (multiples of 32):
// w[p * kBf16NS + n] = (bf16 weight (n0 + n, k0 + 2p), bf16 weight (n0 + n, k0 + 2p + 1)), the weight
// being q (per channel) or q * scale rounded (grouped); columns past ncols in the last vector are 0.
LLMKERN_I8BF inline void unpack_panel(const Int8LinearArgs& a, int64_t n0, int64_t ncols, int64_t k0, int64_t kc,
                                      uint32_t* w) {
  const bool grouped = a.group != a.K;
  const int64_t ng = a.K / a.group;
  for (int64_t v = 0; v * 16 < ncols; ++v) {
    const int64_t rows = std::min<int64_t>(16, ncols - 16 * v);
    i8pk::WeightColumn col(a, k0);
    for (int64_t k = 0; k < kc; k += 32) {
      if (k > 0) {  // (a new column where a 64-value step starts, else 32 bytes on)
        if ((k0 + k) % i8pk::kStep == 0) col = i8pk::WeightColumn(a, k0 + k);
        else col.next(32);
      }
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        if (i >= rows) {
          r[i] = _mm512_setzero_si512();
          continue;
        }
        const int64_t n = n0 + 16 * v + i;
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col.row(n)));
        __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
        __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
        if (grouped) {  // each half's 16 values share one group (group % 16 == 0)
          lo = _mm512_mul_ps(lo, _mm512_set1_ps(a.scale[n * ng + (k0 + k) / a.group]));
          hi = _mm512_mul_ps(hi, _mm512_set1_ps(a.scale[n * ng + (k0 + k + 16) / a.group]));
        }
        r[i] = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // words 0..15 = pairs of k .. k + 31 (lo first)
      }
      bf16pairs::transpose16(r);  // r[j] lane i = pair j of row i
      for (int j = 0; j < 16; ++j) _mm512_storeu_si512(w + (k / 2 + j) * kBf16NS + 16 * v, r[j]);
    }
  }
}

struct MicroOut {
  void* out[kMR];          // output rows at the strip's first column (last K block only)
  const float* colscale;   // per-channel scales at the strip's first column, or null (grouped)
  const float* bias;       // at the strip's first column, or null
  int64_t ncols;           // valid columns of the strip
};

// MR rows x NV vectors of the strip over one K block of kc values: accumulators start from C (or 0)
// and end in C, or on the last block in y = acc (* colscale) (+ bias), stored as bf16.
template <int MR, int NV>
LLMKERN_I8BF void micro(const uint32_t* w, int64_t kc, const uint32_t* xp, float* c, bool first, bool last,
                        const MicroOut& o) {
  __m512 acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + i * kBf16NS + 16 * v);
  for (int64_t pp = 0; pp < kc / 2; ++pp) {
    __m512i wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_si512(w + pp * kBf16NS + 16 * v);
    for (int i = 0; i < MR; ++i) {
      const __m512i xb = _mm512_set1_epi32(static_cast<int>(xp[pp * 8 + i]));  // x[k], x[k + 1] of row i
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], (__m512bh)xb, (__m512bh)wv[v]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    const __mmask16 m = store512::tail16(o.ncols - 16 * v);
    const __m512 s = o.colscale ? _mm512_maskz_loadu_ps(m, o.colscale + 16 * v) : _mm512_setzero_ps();
    for (int i = 0; i < MR; ++i) {
      if (!last) {
        _mm512_storeu_ps(c + i * kBf16NS + 16 * v, acc[i][v]);
        continue;
      }
      const __m512 y = o.colscale ? _mm512_mul_ps(acc[i][v], s) : acc[i][v];
      store512::store16(y, o.bias ? o.bias + 16 * v : nullptr, static_cast<uint16_t*>(o.out[i]) + 16 * v,
                        DType::kBF16, m);
    }
  }
}

using MicroFn = void (*)(const uint32_t*, int64_t, const uint32_t*, float*, bool, bool, const MicroOut&);

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

// The whole call (use_bf16_gemm(a, isa) true). ws: int8_linear_workspace_bytes(M, K, N, false, num_threads).
// Threads split the columns in whole 16-column vectors (and, with more threads than vectors, the rows in
// blocks of 8); rows go in chunks of bf16_chunk_rows, packed by all threads before each chunk.
inline void int8_linear_bf16(const Int8LinearArgs& a) {
  const MicroFn (&mt)[kMR + 1][kNV + 1] = micro_table();
  const int64_t K = a.K, Mc = bf16_chunk_rows(a.M, K), blk = K / 2 * 8;
  char* ws = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(a.ws) + kAlign - 1) / kAlign * kAlign);
  uint32_t* packed = reinterpret_cast<uint32_t*>(ws);  // [Mc / 8][K / 2][8]
  char* per_thread = ws + bf16_align(bf16_chunk_padded(a.M, K) * K * 2);
  const int64_t tb = bf16_thread_bytes(a.M, K), units = (a.N + 15) / 16;
  // K blocks of equal depth (multiples of 32): K = 576 takes 3 x 192, not 256 + 256 + 64
  const int64_t nblocks = (K + kBf16KC - 1) / kBf16KC;
  const int64_t kcb = std::min<int64_t>(kBf16KC, ((K + nblocks - 1) / nblocks + 31) / 32 * 32);
  const int64_t work = a.M * a.N * K;
  const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(a.num_threads, work >> 20)));
  const float* colscale = a.group == K ? a.scale : nullptr;  // per channel: scale [N]
  const size_t xb = 2;  // bf16
#pragma omp parallel num_threads(nthreads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const GridPart part(units, nt, t);
    const int64_t col0 = part.u0 * 16, col1 = std::min(a.N, part.u1 * 16);
    uint32_t* panel = reinterpret_cast<uint32_t*>(per_thread + t * tb);
    float* ctile = reinterpret_cast<float*>(per_thread + t * tb + bf16_align(kBf16KC / 2 * kBf16NS * 4));
    for (int64_t m0 = 0; m0 < a.M; m0 += Mc) {
      const int64_t m1 = std::min(a.M, m0 + Mc);
#pragma omp for schedule(static)
      for (int64_t b = 0; b < (m1 - m0 + 15) / 16; ++b) {
        const int64_t r = 16 * b, rows = std::min<int64_t>(16, m1 - m0 - r);
        const auto* x = reinterpret_cast<const uint16_t*>(static_cast<const char*>(a.x) + (m0 + r) * a.x_row_stride * xb);
        bf16pairs::pack_rows_bf16(x, a.x_row_stride, rows, K, packed + (r / 8) * blk);
      }  // implicit barrier: the chunk is packed
      int64_t r0, r1;  // this thread's rows of the chunk, whole blocks of 8
      part.rows(m1 - m0, 8, &r0, &r1);
      for (int64_t n0 = col0; n0 < col1 && r1 > r0; n0 += kBf16NS) {
        const int64_t ncols = std::min<int64_t>(kBf16NS, col1 - n0);
        const int nv = static_cast<int>((ncols + 15) / 16);
        MicroOut o;
        o.colscale = colscale ? colscale + n0 : nullptr;
        o.bias = a.bias ? a.bias + n0 : nullptr;
        o.ncols = ncols;
        for (int64_t k0 = 0; k0 < K; k0 += kcb) {
          const int64_t kc = std::min(kcb, K - k0);
          unpack_panel(a, n0, ncols, k0, kc, panel);
          for (int64_t r = r0; r < r1; r += kMR) {
            const int mr = static_cast<int>(std::min<int64_t>(kMR, r1 - r));
            for (int i = 0; i < mr; ++i)
              o.out[i] = static_cast<char*>(a.out) + ((m0 + r + i) * a.out_row_stride + n0) * xb;
            mt[mr][nv](panel, kc, packed + (r / 8) * blk + (k0 / 2) * 8, ctile + (r - r0) * kBf16NS, k0 == 0,
                       k0 + kc >= K, o);
          }
        }
      }
#pragma omp barrier  // the next chunk overwrites the packed rows
    }
  }
}

}  // namespace i8bf
}  // namespace cpu
}  // namespace llmkern
