// int8_linear W8A16 with 16+ rows on AVX-512 or AVX2, fp32 arithmetic: an fp32 GEMM over dequantized panels.
//
// The lane = k W8A16 tiles (int8_linear_avx512.h) convert every weight to fp32 once per tile of at most
// 4 rows and end every tile with horizontal sums: on SmolLM2's shapes at M = 256 they ran at ~120 GFLOP/s
// against ~170 for F.linear fp32 on float weights (2-core Zen 4). Here, as int4_linear's fp32 prefill
// route: per strip of NS weight rows (AVX-512 48, AVX2 16) and block of at most kc values of k, a panel
// w[k][NS] of fp32 dequantized weights q * scale (the reference's dequant(w), exactly) is built once per
// chunk of x rows, up to kF32SpanBlocks blocks at a time (a K span), and each group of kF32GroupBlocks blocks of
// rows runs through the span's panels in order with the micro-kernels of panel_gemm.h (8 rows x 3 vectors; AVX2
// 6 x 2).
// Sums are fp32 in a fixed order per output (one thread each): results do not depend on the thread count.
//
// Takes fp32 x in place, fp16 x (and bf16 x where the bf16 route of int8_linear_bf16.h does not run:
// AVX2, AVX-512 CPUs without BF16) through fp32 copies of each chunk's rows. Needs K % 16 == 0 (16 values of k
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
#include "llmkern/cpu/int8_linear_pack_layout.h"
#include "llmkern/cpu/int8_linear_scalar.h"
#include "llmkern/cpu/panel_gemm.h"
#include "llmkern/cpu/parallel.h"

#define LLMKERN_I8F __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define LLMKERN_I8F2 __attribute__((target("avx2,fma,f16c")))
#define LLMKERN_I8F_UNROLL _Pragma("GCC unroll 16")

namespace llmkern {
namespace cpu {
namespace i8f {

inline bool use_f32_gemm(const Int8LinearArgs& a, Isa isa) {
  return !a.w8a8 && (isa == Isa::kAvx512Vnni || isa == Isa::kAvx2) && a.M >= kF32MinRows && a.K % 16 == 0 &&
         (a.group == a.K || a.group % 16 == 0);
}

// Panel of columns [n0, n0 + ncols) (ncols <= 48) and k in [k0, k0 + kc) (multiples of 16):
// w[k * 48 + n] = q[n0 + n, k0 + k] * scale[n0 + n, group of k0 + k] in fp32; columns past ncols in
// the last vector are 0. Rows of 16 values are loaded, dequantized, then turned k-major 16 x 16 at a time.
LLMKERN_I8F inline void unpack_panel_avx512(const Int8LinearArgs& a, int64_t n0, int64_t ncols, int64_t k0, int64_t kc,
                                            float* w) {
  constexpr int64_t NS = pgemm::avx512::kNS;
  const int64_t ng = a.K / a.group;
  for (int64_t v = 0; v * 16 < ncols; ++v) {
    const int64_t rows = std::min<int64_t>(16, ncols - 16 * v);
    i8pk::WeightColumn col(a, k0);
    for (int64_t k = 0; k < kc; k += 16) {
      if (k > 0) {  // (a new column where a 64-value step starts, else 16 bytes on)
        if ((k0 + k) % i8pk::kStep == 0) col = i8pk::WeightColumn(a, k0 + k);
        else col.next(16);
      }
      __m512i r[16];
      LLMKERN_I8F_UNROLL for (int i = 0; i < 16; ++i) {
        if (i >= rows) {
          r[i] = _mm512_setzero_si512();
          continue;
        }
        const int64_t n = n0 + 16 * v + i;
        const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(col.row(n)));
        const __m512 s = _mm512_set1_ps(a.scale[n * ng + (k0 + k) / a.group]);  // one group (group % 16 == 0)
        r[i] = _mm512_castps_si512(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), s));
      }
      bf16pairs::transpose16(r);  // r[j] lane i = row i's value at k + j
      LLMKERN_I8F_UNROLL for (int j = 0; j < 16; ++j) _mm512_storeu_si512(w + (k + j) * NS + 16 * v, r[j]);
    }
  }
}

// The same for AVX2's 16-column strips: 8 rows x 8 values of k per step, through an 8 x 8 transpose.
LLMKERN_I8F2 inline void unpack_panel_avx2(const Int8LinearArgs& a, int64_t n0, int64_t ncols, int64_t k0, int64_t kc,
                                           float* w) {
  constexpr int64_t NS = pgemm::avx2::kNS;
  const int64_t ng = a.K / a.group;
  for (int64_t v = 0; v < NS / 8; ++v) {
    const int64_t rows = std::min<int64_t>(8, ncols - 8 * v);
    i8pk::WeightColumn col(a, k0);
    for (int64_t k = 0; k < kc; k += 8) {
      if (k > 0) {  // (a new column where a 64-value step starts, else 8 bytes on)
        if ((k0 + k) % i8pk::kStep == 0) col = i8pk::WeightColumn(a, k0 + k);
        else col.next(8);
      }
      __m256 r[8];
      LLMKERN_I8F_UNROLL for (int i = 0; i < 8; ++i) {
        if (i >= rows) {
          r[i] = _mm256_setzero_ps();
          continue;
        }
        const int64_t n = n0 + 8 * v + i;
        const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(col.row(n)));
        const __m256 s = _mm256_set1_ps(a.scale[n * ng + (k0 + k) / a.group]);
        r[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), s);
      }
      __m256 t[8], u[8];  // rows -> columns: r[j] = value k + j of rows 0..7
      LLMKERN_I8F_UNROLL for (int i = 0; i < 4; ++i) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
      }
      LLMKERN_I8F_UNROLL for (int h = 0; h < 2; ++h) {  // rows 4h .. 4h + 3
        u[4 * h] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0x44);
        u[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0xee);
        u[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
        u[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xee);
      }
      LLMKERN_I8F_UNROLL for (int j = 0; j < 4; ++j) {
        r[j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x20);
        r[4 + j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x31);
      }
      LLMKERN_I8F_UNROLL for (int j = 0; j < 8; ++j) _mm256_storeu_ps(w + (k + j) * NS + 8 * v, r[j]);
    }
  }
}

using UnpackFn = void (*)(const Int8LinearArgs&, int64_t, int64_t, int64_t, int64_t, float*);
using MicroFn = void (*)(const float*, int64_t, const pgemm::Rows&);

// One ISA's panel width, vector width, micro-kernel rows, panel depth and kernels
// (micro[rows][column vectors]).
struct Route {
  int64_t ns = 0, vec = 0, mr = 0, kc = 0;
  UnpackFn unpack = nullptr;
  MicroFn micro[9][4] = {};
};

#define LLMKERN_I8F_ROW2(r, NSP, MR)     \
  r.micro[MR][1] = &NSP::micro<MR, 1>; \
  r.micro[MR][2] = &NSP::micro<MR, 2>;
#define LLMKERN_I8F_ROW3(r, NSP, MR) \
  LLMKERN_I8F_ROW2(r, NSP, MR)       \
  r.micro[MR][3] = &NSP::micro<MR, 3>;

inline const Route& route_for(Isa isa) {
  static const Route r512 = [] {
    Route r;
    r.ns = pgemm::avx512::kNS;
    r.vec = 16;
    r.mr = 8;
    r.kc = kF32KC;  // 24 KiB panel: stays in L1 across the micro-kernel calls
    r.unpack = &unpack_panel_avx512;
    LLMKERN_I8F_ROW3(r, pgemm::avx512, 1) LLMKERN_I8F_ROW3(r, pgemm::avx512, 2) LLMKERN_I8F_ROW3(r, pgemm::avx512, 3)
    LLMKERN_I8F_ROW3(r, pgemm::avx512, 4) LLMKERN_I8F_ROW3(r, pgemm::avx512, 5) LLMKERN_I8F_ROW3(r, pgemm::avx512, 6)
    LLMKERN_I8F_ROW3(r, pgemm::avx512, 7) LLMKERN_I8F_ROW3(r, pgemm::avx512, 8)
    return r;
  }();
  static const Route r2 = [] {
    Route r;
    r.ns = pgemm::avx2::kNS;
    r.vec = 8;
    r.mr = 6;
    r.kc = 2 * kF32KC;  // 16 KiB panel
    r.unpack = &unpack_panel_avx2;
    LLMKERN_I8F_ROW2(r, pgemm::avx2, 1) LLMKERN_I8F_ROW2(r, pgemm::avx2, 2) LLMKERN_I8F_ROW2(r, pgemm::avx2, 3)
    LLMKERN_I8F_ROW2(r, pgemm::avx2, 4) LLMKERN_I8F_ROW2(r, pgemm::avx2, 5) LLMKERN_I8F_ROW2(r, pgemm::avx2, 6)
    return r;
  }();
  return isa == Isa::kAvx512Vnni ? r512 : r2;
}
#undef LLMKERN_I8F_ROW2
#undef LLMKERN_I8F_ROW3

static_assert(2 * kF32KC * 16 <= kF32KC * kF32NS, "the AVX2 panel fits a K block's panel slot");

// The whole call (use_f32_gemm(a, isa) true). ws: int8_linear_workspace_bytes(M, K, N, false, num_threads).
// Threads split the columns in whole 16-column vectors (and, with more threads than vectors, the rows in
// blocks of the micro-kernel's rows); rows go in chunks of f32_chunk_rows, which non-fp32 x has converted
// by all threads first.
inline void int8_linear_f32(const Int8LinearArgs& a, Isa isa) {
  const Route& rt = route_for(isa);
  const int64_t K = a.K, Mc = f32_chunk_rows(a.M, K), NS = rt.ns;
  char* ws = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(a.ws) + kAlign - 1) / kAlign * kAlign);
  float* xf = reinterpret_cast<float*>(ws);  // [Mc][K] fp32 copies of a chunk's rows (x not fp32)
  char* per_thread = ws + bf16_align(f32_chunk_padded(a.M, K) * K * 4);
  const int64_t tb = f32_thread_bytes(a.M, K), units = (a.N + 15) / 16;
  // K blocks of near-equal depth in steps of 16: K = 576 with kc 128 takes 128 + 4 x 112, not 4 x 128 + 64
  // (a short block costs a whole block's C-tile traffic and unpacking overhead)
  const int64_t steps = K / 16, nblocks = (K + rt.kc - 1) / rt.kc;
  const auto kc_of = [&](int64_t b) { return 16 * (steps / nblocks + (b < steps % nblocks ? 1 : 0)); };  // <= rt.kc
  constexpr int64_t kSlot = kF32KC * kF32NS;  // floats of one K block's panel slot (AVX2's 2 kF32KC x 16 fit)
  const int64_t work = a.M * a.N * K;
  const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(a.num_threads, work >> 20)));
  const bool convert = a.x_dtype != DType::kF32;
  const int64_t es = dtype_size(a.x_dtype);
  void (*const to_f32)(const void*, DType, int64_t, float*) =
      isa == Isa::kAvx512Vnni ? &avx512::row_to_f32 : &scalar::row_to_f32;
#pragma omp parallel num_threads(nthreads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const GridPart part(units, nt, t);
    const int64_t col0 = part.u0 * 16, col1 = std::min(a.N, part.u1 * 16);
    float* panel = reinterpret_cast<float*>(per_thread + t * tb);  // kF32SpanBlocks slots of kF32KC x kF32NS
    float* ctile = reinterpret_cast<float*>(per_thread + t * tb + bf16_align(kF32SpanBlocks * kF32KC * kF32NS * 4));
    for (int64_t m0 = 0; m0 < a.M; m0 += Mc) {
      const int64_t m1 = std::min(a.M, m0 + Mc);
      if (convert) {
#pragma omp for schedule(static)
        for (int64_t m = m0; m < m1; ++m) to_f32(x_row(a, m), a.x_dtype, K, xf + (m - m0) * K);
      }  // implicit barrier: the chunk is converted
      int64_t r0, r1;  // this thread's rows of the chunk, whole micro-kernel blocks
      part.rows(m1 - m0, rt.mr, &r0, &r1);
      for (int64_t n0 = col0; n0 < col1 && r1 > r0; n0 += NS) {
        const int64_t ncols = std::min<int64_t>(NS, col1 - n0);
        const int nv = static_cast<int>((ncols + rt.vec - 1) / rt.vec);
        pgemm::Rows rw;
        rw.bias = a.bias ? a.bias + n0 : nullptr;
        rw.dt = a.x_dtype;
        rw.ncols = ncols;
        // K spans of up to kF32SpanBlocks K blocks [b0, b1), from k = s0: every block's panel unpacked into its
        // slot, then each group of kF32GroupBlocks row blocks runs through the span's blocks in order, a block's
        // panel serving the group's row blocks from L1 (each C tile carries its sums between blocks and spans:
        // one fp32 order per output, as a K block at a time over all rows did).
        for (int64_t b0 = 0, s0 = 0; b0 < nblocks;) {
          const int64_t b1 = std::min(nblocks, b0 + kF32SpanBlocks);
          int64_t s1 = s0;
          for (int64_t b = b0; b < b1; ++b) {
            rt.unpack(a, n0, ncols, s1, kc_of(b), panel + (b - b0) * kSlot);
            s1 += kc_of(b);
          }
          const int64_t rg = kF32GroupBlocks * rt.mr;
          for (int64_t g = r0; g < r1; g += rg) {
            const int64_t ge = std::min(r1, g + rg);
            for (int64_t b = b0, k0 = s0; b < b1; k0 += kc_of(b), ++b) {
              const int64_t kc = kc_of(b);
              rw.first = k0 == 0;
              rw.last = k0 + kc >= K;
              for (int64_t r = g; r < ge; r += rt.mr) {
                const int mr = static_cast<int>(std::min<int64_t>(rt.mr, ge - r));
                for (int i = 0; i < mr; ++i) {
                  const int64_t m = m0 + r + i;
                  rw.x[i] = (convert ? xf + (m - m0) * K : static_cast<const float*>(x_row(a, m))) + k0;
                  rw.out[i] = static_cast<char*>(a.out) + (m * a.out_row_stride + n0) * es;
                }
                rw.c = ctile + (r - r0) * NS;
                rt.micro[mr][nv](panel + (b - b0) * kSlot, kc, rw);
              }
            }
          }
          b0 = b1;
          s0 = s1;
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
