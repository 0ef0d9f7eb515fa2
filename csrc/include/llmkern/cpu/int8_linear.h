// int8_linear on the CPU: y[M, N] = x[M, K] @ dequant(w[N, K])^T + bias, W8A16 or W8A8.
//
// The driver here is ISA-independent: it prepares activation rows (W8A8: quantize; W8A16: convert
// bf16/fp16 to fp32), splits the output among OpenMP threads and calls the ISA's micro-tiles
// (MB rows x NB weight rows, a dot product along K each), then applies row scale and bias and
// stores in x's dtype. Arguments are trusted: the launcher (csrc/cpu/int8_linear.cpp) checks them.
//
// Threads: output columns are split into contiguous ranges of whole 32-column chunks (so no two
// threads write one cache line of a row, and every weight row is read by one thread only); when N
// has fewer chunks than threads, rows are split too. Static, the same split for every call shape.
// M is processed in tiles (see int8_linear_common.h) so each weight micro-panel (NB rows x K,
// a few KiB) is reused from L1 for all rows of a tile; the full prefill (GEMM) blocking is separate.
// Decode calls (M <= 8) given the packed decode layout (a.packed) on AVX-512 or AVX2 stream that instead:
// int8_linear_pack.h (bit-identical results). W8A8 calls of more rows given the GEMM layout (a.gemm)
// on AVX-512 run the VNNI GEMM micro-kernels: int8_linear_gemm.h. W8A16 calls of 16+ bf16 rows on
// AVX-512 BF16 CPUs run a bf16 GEMM over dequantized panels: int8_linear_bf16.h; other W8A16 calls of
// 16+ rows on AVX-512 or AVX2 an fp32 GEMM over dequantized panels: int8_linear_f32.h.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>

#include "llmkern/cpu/features.h"
#include "llmkern/cpu/int8_linear_avx2.h"
#include "llmkern/cpu/int8_linear_avx512.h"
#include "llmkern/cpu/int8_linear_bf16.h"
#include "llmkern/cpu/int8_linear_f32.h"
#include "llmkern/cpu/int8_linear_common.h"
#include "llmkern/cpu/int8_linear_gemm.h"
#include "llmkern/cpu/int8_linear_pack.h"
#include "llmkern/cpu/int8_linear_scalar.h"
#include "llmkern/cpu/int8_linear_stream.h"
#include "llmkern/cpu/parallel.h"

namespace llmkern {
namespace cpu {

using RowFn = void (*)(const void* x, DType dt, int64_t K, float* out);
using QuantFn = void (*)(const void* x, DType dt, int64_t K, void* q, float* scale);

// What one ISA provides. Tiles are instantiated for mb in 1..mb_max and nb in {1, 2, 4} (and nb 8 for
// mb 1 where the registers allow).
struct IsaKernels {
  int mb_max;
  int nb_wide[5];     // NB of full tiles given the rows a thread has in a tile (1..mb_max)
  TileFn w8a16[5][9];  // [mb][nb]
  TileFn w8a8[5][9];
  RowFn row_to_f32;
  QuantFn quantize_row;
};

template <template <int, int> class T, bool kNB8>
struct TileTable {
  template <int MB>
  static void fill_row(TileFn (&tab)[5][9]) {
    tab[MB][1] = &T<MB, 1>::run;
    tab[MB][2] = &T<MB, 2>::run;
    tab[MB][4] = &T<MB, 4>::run;
    if constexpr (kNB8 && MB == 1) tab[MB][8] = &T<MB, 8>::run;  // single rows: 8 accumulator chains
  }
};

#define LLMKERN_TILE_WRAP(NAME, FN)     \
  template <int MB, int NB>             \
  struct NAME {                         \
    static void run(const Tile& t) { FN<MB, NB>(t); } \
  };
LLMKERN_TILE_WRAP(ScalarW8A16, scalar::tile_w8a16_t)
LLMKERN_TILE_WRAP(ScalarW8A8, scalar::tile_w8a8_t)
LLMKERN_TILE_WRAP(Avx2W8A16, avx2::tile_w8a16)
LLMKERN_TILE_WRAP(Avx2W8A8, avx2::tile_w8a8)
LLMKERN_TILE_WRAP(Avx512W8A16, avx512::tile_w8a16)
LLMKERN_TILE_WRAP(Avx512W8A8, avx512::tile_w8a8)
#undef LLMKERN_TILE_WRAP

template <template <int, int> class A, template <int, int> class B, int MBMAX, bool kNB8>
IsaKernels make_kernels(const int (&nb_wide)[5], RowFn row, QuantFn quant) {
  IsaKernels k{};
  k.mb_max = MBMAX;
  for (int i = 0; i < 5; ++i) k.nb_wide[i] = nb_wide[i];
  TileTable<A, kNB8>::template fill_row<1>(k.w8a16);
  TileTable<B, kNB8>::template fill_row<1>(k.w8a8);
  if constexpr (MBMAX >= 2) {
    TileTable<A, kNB8>::template fill_row<2>(k.w8a16);
    TileTable<B, kNB8>::template fill_row<2>(k.w8a8);
  }
  if constexpr (MBMAX >= 3) {
    TileTable<A, kNB8>::template fill_row<3>(k.w8a16);
    TileTable<B, kNB8>::template fill_row<3>(k.w8a8);
  }
  if constexpr (MBMAX >= 4) {
    TileTable<A, kNB8>::template fill_row<4>(k.w8a16);
    TileTable<B, kNB8>::template fill_row<4>(k.w8a8);
  }
  k.row_to_f32 = row;
  k.quantize_row = quant;
  return k;
}

inline const IsaKernels& kernels_for(Isa isa) {
  // Tile shapes (nb_wide[rows]): measured on Zen 5 with K = N = 4096. One row (decode): 1x8 (AVX-512)
  // or 1x4 (AVX2) keeps 8 / 4 independent accumulator chains. More rows: 4x4 / 2x4, which load each
  // activation vector once per 4 weight rows; per-group tiles of that size spill a few group sums to
  // the stack and are still ~1.3-2x faster than 4x2 / 2x2 (M = 32..128).
  static const IsaKernels k512 = make_kernels<Avx512W8A16, Avx512W8A8, 4, true>(
      {0, 8, 4, 4, 4}, &avx512::row_to_f32, &avx512::quantize_row);
  static const IsaKernels k2 = make_kernels<Avx2W8A16, Avx2W8A8, 2, false>(
      {0, 4, 4, 0, 0}, &scalar::row_to_f32, &scalar::quantize_row);
  static const IsaKernels ks = make_kernels<ScalarW8A16, ScalarW8A8, 4, false>(
      {0, 4, 4, 4, 4}, &scalar::row_to_f32, &scalar::quantize_row);
  switch (isa) {
    case Isa::kAvx512Vnni: return k512;
    case Isa::kAvx2: return k2;
    default: return ks;
  }
}

namespace detail {

// This thread's piece of the output: columns [n0, n1), and part mp of tm row parts of every M tile.
struct Part {
  int64_t n0 = 0, n1 = 0;
  int64_t mp = 0, tm = 1;
  bool active = false;
};

constexpr int64_t kColChunk = 32;

inline Part thread_part(int64_t N, int t, int nt) {
  Part p;
  const int64_t chunks = (N + kColChunk - 1) / kColChunk;
  const int64_t tn = std::min<int64_t>(nt, chunks), tm = std::max<int64_t>(1, nt / tn);
  if (t >= tn * tm) return p;
  int64_t c0, c1;
  split_range(chunks, tn, t % tn, &c0, &c1);
  p.n0 = c0 * kColChunk;
  p.n1 = std::min(N, c1 * kColChunk);
  p.mp = t / tn;
  p.tm = tm;
  p.active = p.n1 > p.n0;
  return p;
}

// Outputs of rows [r0, r1) (activation row pointers x_rows[r - r0]) and columns [n0, n1).
inline void compute_block(const Int8LinearArgs& a, const IsaKernels& kk, const void* const* x_rows,
                          const float* row_scale, int64_t r0, int64_t r1, int64_t n0, int64_t n1) {
  const int64_t ngroups = a.K / a.group;
  const int64_t rows = r1 - r0;
  if (rows <= 0 || n1 <= n0) return;
  const int nbw = kk.nb_wide[std::min<int64_t>(rows, kk.mb_max)];
  float res[4 * kResStride];
  Tile t;
  t.K = a.K;
  t.group = a.group;
  t.ngroups = ngroups;
  t.res = res;
  for (int64_t n = n0; n < n1;) {
    int nb = nbw;  // full tiles, then 4, 2, 1 columns for the tail (all instantiated for every mb)
    while (nb > n1 - n) nb /= 2;
    t.w = a.w + n * a.K;
    t.scale = a.scale + n * ngroups;
    for (int64_t m = r0; m < r1;) {
      const int mb = static_cast<int>(std::min<int64_t>(kk.mb_max, r1 - m));
      for (int i = 0; i < mb; ++i) t.x[i] = x_rows[m - r0 + i];
      (a.w8a8 ? kk.w8a8 : kk.w8a16)[mb][nb](t);
      for (int i = 0; i < mb; ++i) {
        const float rs = row_scale ? row_scale[m + i] : 1.0f;
        for (int j = 0; j < nb; ++j) {
          float v = res[i * kResStride + j];
          if (row_scale) v *= rs;
          if (a.bias) v += a.bias[n + j];
          store_from_f32(a.out, (m + i) * a.out_row_stride + n + j, a.x_dtype, v);
        }
      }
      m += mb;
    }
    n += nb;
  }
}

}  // namespace detail

// Which kernel a call runs: the first route that takes it, in this order; kTiles takes anything.
enum class Int8Route { kPacked, kStream, kGemmW8A8, kGemmBf16, kGemmF32, kTiles };

inline Int8Route int8_linear_route(const Int8LinearArgs& a, Isa isa) {
  if (i8pk::use_packed(a, isa)) return Int8Route::kPacked;
  if (i8st::use_stream(a, isa)) return Int8Route::kStream;
  if (i8gm::use_gemm(a, isa)) return Int8Route::kGemmW8A8;
  if (i8bf::use_bf16_gemm(a, isa)) return Int8Route::kGemmBf16;
  if (i8f::use_f32_gemm(a, isa)) return Int8Route::kGemmF32;
  return Int8Route::kTiles;
}

inline const char* int8_route_name(Int8Route r) {
  switch (r) {
    case Int8Route::kPacked: return "packed";
    case Int8Route::kStream: return "stream";
    case Int8Route::kGemmW8A8: return "gemm_w8a8";
    case Int8Route::kGemmBf16: return "gemm_bf16";
    case Int8Route::kGemmF32: return "gemm_f32";
    default: return "tiles";
  }
}

// A call on released weights (a.w null: an Int8Linear that let go of its int8 weight tensor, llmkern/ops/
// int8_linear.py): the packed decode layout and the canonical scales alone (W8A16), or those and the W8A8 GEMM
// layout (W8A8). Calls the packed kernels take run them, as with the weight; W8A8 calls past them the GEMM
// layout's micro-kernels, as with the weight; W8A16's GEMM routes build their panels from the packed layout
// (i8pk::WeightColumn: the same values, so the same bits). Every other call runs the packed kernels, as many
// rows at a time as they take (a row's result does not depend on the others; each ISA's packed kernels give
// its canonical tiles' bits). isa: AVX-512 or AVX2 (the launcher's choice: the packed kernels exist for those).
inline void int8_linear_released(const Int8LinearArgs& a, Isa isa) {
  if (!i8pk::use_packed(a, isa) && i8gm::use_gemm(a, isa)) return i8gm::int8_linear_gemm(a);
  if (i8bf::use_bf16_gemm(a, isa)) return i8bf::int8_linear_bf16(a);
  if (i8f::use_f32_gemm(a, isa)) return i8f::int8_linear_f32(a, isa);
  const int64_t es = dtype_size(a.x_dtype);
  for (int64_t m0 = 0; m0 < a.M;) {
    Int8LinearArgs c = a;  // rows m0 .. m0 + c.M - 1
    c.M = std::min<int64_t>(a.M - m0, i8pk::kMaxRows);
    while (c.M > 1 && !i8pk::use_packed(c, isa)) --c.M;
    c.x = static_cast<const char*>(a.x) + m0 * a.x_row_stride * es;
    c.out = static_cast<char*>(a.out) + m0 * a.out_row_stride * es;
    i8pk::int8_linear_packed(c, isa);
    m0 += c.M;
  }
}

// Runs the whole op. Workspace: int8_linear_workspace_bytes(M, K, N, w8a8, num_threads) bytes at a.ws.
inline void int8_linear(const Int8LinearArgs& a, Isa isa) {
  if (a.M <= 0 || a.N <= 0) return;
  if (!a.w) return int8_linear_released(a, isa);
  switch (int8_linear_route(a, isa)) {
    case Int8Route::kPacked: return i8pk::int8_linear_packed(a, isa);
    case Int8Route::kStream: return i8st::int8_linear_stream(a, isa);
    case Int8Route::kGemmW8A8: return i8gm::int8_linear_gemm(a);
    case Int8Route::kGemmBf16: return i8bf::int8_linear_bf16(a);
    case Int8Route::kGemmF32: return i8f::int8_linear_f32(a, isa);
    case Int8Route::kTiles: break;
  }
  const IsaKernels& kk = kernels_for(isa);
  const int64_t Kp = kpad(a.K);
  char* ws = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(a.ws) + kAlign - 1) / kAlign * kAlign);
  const int64_t Mt = a.w8a8 ? w8a8_tile_rows(a.M, a.K) : w8a16_tile_rows(a.M, a.K);
  const bool convert = !a.w8a8 && a.x_dtype != DType::kF32;  // fp32 rows are read in place

#pragma omp parallel num_threads(std::max(1, a.num_threads))
  {
    const detail::Part part = detail::thread_part(a.N, omp_get_thread_num(), omp_get_num_threads());
    const void* rows[kMaxTileRows];  // activation row pointers of one M tile
    float* row_scale = nullptr;
    if (a.w8a8) {
      row_scale = reinterpret_cast<float*>(ws + a.M * Kp);
#pragma omp for schedule(static)
      for (int64_t m = 0; m < a.M; ++m) kk.quantize_row(x_row(a, m), a.x_dtype, a.K, ws + m * Kp, row_scale + m);
    }
    for (int64_t m0 = 0; m0 < a.M; m0 += Mt) {
      const int64_t m1 = std::min(a.M, m0 + Mt);
      if (convert) {
#pragma omp for schedule(static)
        for (int64_t m = m0; m < m1; ++m)
          kk.row_to_f32(x_row(a, m), a.x_dtype, a.K, reinterpret_cast<float*>(ws) + (m - m0) * Kp);
      }
      for (int64_t m = m0; m < m1; ++m) {
        if (a.w8a8) rows[m - m0] = ws + m * Kp;
        else if (convert) rows[m - m0] = reinterpret_cast<float*>(ws) + (m - m0) * Kp;
        else rows[m - m0] = x_row(a, m);
      }
      if (part.active) {
        int64_t r0, r1;
        split_range(m1 - m0, part.tm, part.mp, &r0, &r1);
        detail::compute_block(a, kk, rows + r0, row_scale, m0 + r0, m0 + r1, part.n0, part.n1);
      }
      if (convert) {
#pragma omp barrier  // the next tile overwrites the converted rows
      }
    }
  }
}

}  // namespace cpu
}  // namespace llmkern
