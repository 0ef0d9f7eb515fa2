// W4A8 int4_linear on the CPU: the ISA-independent driver (arithmetic and weight layout:
// int4_linear_w4a8_common.h). Arguments are trusted: the launcher (csrc/cpu/int4_linear_w4a8.cpp)
// checks them.
//
// 1. Every row is quantized (signed int8 and its scales, per row or per group) and its group sums A
//    are taken, into the workspace: threads share the rows of a prefill call; in a decode call
//    (M <= 4) each thread prepares all rows into its own copy, with no barrier after it.
// 2. Each thread takes a contiguous range of 16-row weight blocks (rows of x are split too when
//    there are fewer blocks than threads) and walks it in panels of blocks small enough to stay in
//    L2; within a panel, tiles of MR rows x NR blocks run over all of K, so a panel is read from
//    memory once for all rows (prefill) and a decode call (M <= 4) streams every block once.
// 3. The bias is added to each tile's fp32 results (already weighted by the activation scales), and
//    they are stored in x's dtype (bf16 / fp16 rounded once, to nearest even).
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>

#include "llmkern/cpu/features.h"
#include "llmkern/cpu/int4_linear_w4a8_avx2.h"
#include "llmkern/cpu/int4_linear_w4a8_avx512.h"
#include "llmkern/cpu/int4_linear_w4a8_common.h"
#include "llmkern/cpu/parallel.h"

namespace llmkern {
namespace cpu {

using W4A8PrepFn = void (*)(const void* x, DType dt, int64_t K, int64_t G, bool per_group, int8_t* q, float* sx,
                            float* asum);
// out[0, cols) = v + bias (bias may be null) in dt
using W4A8StoreFn = void (*)(const float* v, const float* bias, void* out, DType dt, int64_t cols);

struct W4A8Kernels {
  W4A8TileFn tile[2][kW4A8MaxMR + 1][5] = {};  // [E == 4][rows][blocks 1, 2, 4]
  int mr_max = 1;
  int nr[kW4A8MaxMR + 1] = {};  // blocks per full tile, given its rows
  W4A8PrepFn prep = nullptr;
  W4A8StoreFn store = nullptr;
};

namespace w4a8_detail {

template <int MR, int NR, int E>
void scalar_tile(const W4A8Tile& t) {
  w4a8_scalar::tile_any<E>(t, MR, NR);
}

inline void scalar_store(const float* v, const float* bias, void* out, DType dt, int64_t cols) {
  for (int64_t c = 0; c < cols; ++c) store_from_f32(out, c, dt, bias ? v[c] + bias[c] : v[c]);
}

#define LLMKERN_W4A8_TILES(k, NS, MR, NR)                   \
  k.tile[0][MR][NR] = &NS::tile<MR, NR, 2>;                 \
  k.tile[1][MR][NR] = &NS::tile<MR, NR, 4>;
#define LLMKERN_W4A8_SCALAR(k, MR, NR)                      \
  k.tile[0][MR][NR] = &scalar_tile<MR, NR, 2>;              \
  k.tile[1][MR][NR] = &scalar_tile<MR, NR, 4>;

inline W4A8Kernels make_avx512() {
  W4A8Kernels k;
  // One row: 4 blocks (8 dependency chains with the dual accumulators); 2-4 rows x 2 blocks, also the
  // prefill tile. 4 x 2 beat 8 x 1 by 20-40% (4096 x 4096, M = 8..64, 1 thread): with two blocks each
  // activation word is broadcast into a register once for both, instead of one broadcast load per
  // vpdpbusd, and the loads, not the vpdpbusd, were the limit.
  k.mr_max = 4;
  const int nr[] = {0, 4, 2, 2, 2};
  for (int i = 0; i <= 4; ++i) k.nr[i] = nr[i];
  LLMKERN_W4A8_TILES(k, w4a8_avx512, 1, 1) LLMKERN_W4A8_TILES(k, w4a8_avx512, 1, 2) LLMKERN_W4A8_TILES(k, w4a8_avx512, 1, 4)
  LLMKERN_W4A8_TILES(k, w4a8_avx512, 2, 1) LLMKERN_W4A8_TILES(k, w4a8_avx512, 2, 2)
  LLMKERN_W4A8_TILES(k, w4a8_avx512, 3, 1) LLMKERN_W4A8_TILES(k, w4a8_avx512, 3, 2)
  LLMKERN_W4A8_TILES(k, w4a8_avx512, 4, 1) LLMKERN_W4A8_TILES(k, w4a8_avx512, 4, 2)
  k.prep = &w4a8_avx512::prep_row;
  k.store = &store512::store_row;  // vector stores: with short K the epilogue is a good part of a tile
  return k;
}

inline W4A8Kernels make_avx2() {
  W4A8Kernels k;
  k.mr_max = 4;
  const int nr[] = {0, 1, 1, 1, 1};
  for (int i = 0; i <= 4; ++i) k.nr[i] = nr[i];
  LLMKERN_W4A8_TILES(k, w4a8_avx2, 1, 1) LLMKERN_W4A8_TILES(k, w4a8_avx2, 2, 1)
  LLMKERN_W4A8_TILES(k, w4a8_avx2, 3, 1) LLMKERN_W4A8_TILES(k, w4a8_avx2, 4, 1)
  k.prep = &w4a8_scalar::prep_row;
  k.store = &scalar_store;
  return k;
}

inline W4A8Kernels make_scalar() {
  W4A8Kernels k;
  k.mr_max = 4;
  const int nr[] = {0, 1, 1, 1, 1};
  for (int i = 0; i <= 4; ++i) k.nr[i] = nr[i];
  LLMKERN_W4A8_SCALAR(k, 1, 1) LLMKERN_W4A8_SCALAR(k, 2, 1) LLMKERN_W4A8_SCALAR(k, 3, 1) LLMKERN_W4A8_SCALAR(k, 4, 1)
  k.prep = &w4a8_scalar::prep_row;
  k.store = &scalar_store;
  return k;
}

#undef LLMKERN_W4A8_TILES
#undef LLMKERN_W4A8_SCALAR

// Blocks per panel: about 256 KiB of weights (half of a 512 KiB-1 MiB L2), at least 4.
inline int64_t panel_blocks(int64_t block_bytes) {
  return std::max<int64_t>(4, (int64_t(256) << 10) / std::max<int64_t>(block_bytes, 1));
}

}  // namespace w4a8_detail

inline const W4A8Kernels& w4a8_kernels_for(Isa isa) {
  static const W4A8Kernels k512 = w4a8_detail::make_avx512(), k2 = w4a8_detail::make_avx2(),
                           ks = w4a8_detail::make_scalar();
  switch (isa) {
    case Isa::kAvx512Vnni: return k512;
    case Isa::kAvx2: return k2;
    default: return ks;
  }
}

// Runs the whole op. Workspace: int4_w4a8_workspace_bytes(M, K, group, num_threads) bytes at a.ws.
inline void int4_linear_w4a8(const Int4W4A8Args& a, Isa isa) {
  if (a.M <= 0 || a.N <= 0) return;
  const W4A8Kernels& kk = w4a8_kernels_for(isa);
  const int64_t K = a.K, G = a.group, ng = K / G, Kp = w4a8_row_bytes(K);
  const int64_t nblk = w4a8_blocks(a.N), bb = w4a8_block_bytes(K, G, a.e);
  char* ws = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(a.ws) + kAlign - 1) / kAlign * kAlign);
  const bool priv = a.M <= kW4A8PrivateRows;  // decode: each thread's own prepared rows (see the workspace)
  const int64_t copy_bytes = w4a8_rows_bytes(a.M, K, G);
  const int ei = a.e == 2 ? 0 : 1;
  const int64_t esize = dtype_size(a.x_dtype);

#pragma omp parallel num_threads(std::max(1, a.num_threads))
  {
    const int nt = omp_get_num_threads(), t = omp_get_thread_num();
    char* rows = ws + (priv ? t * copy_bytes : 0);
    int8_t* qrows = reinterpret_cast<int8_t*>(rows);                                         // [M][Kp]
    float* sx = reinterpret_cast<float*>(rows + w4a8_q_bytes(a.M, K));                      // [M][ng]
    float* asum = reinterpret_cast<float*>(rows + w4a8_q_bytes(a.M, K) + w4a8_sx_bytes(a.M, ng));  // [M][ng]
    const auto prep = [&](int64_t m) {
      kk.prep(static_cast<const char*>(a.x) + m * a.x_row_stride * esize, a.x_dtype, K, G, a.group_scales,
              qrows + m * Kp, sx + m * ng, asum + m * ng);
    };
    if (priv) {
      for (int64_t m = 0; m < a.M; ++m) prep(m);  // this thread's copy: no barrier needed
    } else {
#pragma omp for schedule(static)
      for (int64_t m = 0; m < a.M; ++m) prep(m);
      // (implicit barrier: every row is prepared before any tile reads it)
    }
    // Threads split whole pairs of blocks (32 output columns: a full 64-byte line of a bf16 output row,
    // so no two threads write one line) when there are enough of them, else single blocks.
    const int64_t unit = nblk >= 2 * nt ? 2 : 1, nunits = (nblk + unit - 1) / unit;
    const int64_t tn = std::min<int64_t>(nt, nunits), tm = std::max<int64_t>(1, nt / tn);
    if (t < tn * tm) {
      int64_t b0, b1, r0, r1;
      split_range(nunits, tn, t % tn, &b0, &b1);
      b0 *= unit;
      b1 = std::min(nblk, b1 * unit);
      split_range(a.M, tm, t / tn, &r0, &r1);
      const int64_t panel = w4a8_detail::panel_blocks(bb);
      alignas(64) float res[kW4A8MaxMR * 4 * kW4A8Rows];
      W4A8Tile tl;
      tl.block_bytes = bb;
      tl.ngroups = ng;
      tl.G = G;
      tl.res = res;
      tl.res_stride = 4 * kW4A8Rows;
      for (int64_t pb = b0; pb < b1; pb += panel) {
        const int64_t pe = std::min(b1, pb + panel);
        for (int64_t m = r0; m < r1;) {
          const int mr = static_cast<int>(std::min<int64_t>(kk.mr_max, r1 - m));
          for (int i = 0; i < mr; ++i) {
            tl.q[i] = qrows + (m + i) * Kp;
            tl.asum[i] = asum + (m + i) * ng;
            tl.sx[i] = sx + (m + i) * ng;
          }
          for (int64_t b = pb; b < pe;) {
            int nr = kk.nr[mr];
            while (nr > pe - b) nr /= 2;  // tails: 4 -> 2 -> 1 blocks (all instantiated)
            tl.w = a.w + b * bb;
            kk.tile[ei][mr][nr](tl);
            const int64_t n0 = b * kW4A8Rows, cols = std::min<int64_t>(nr * kW4A8Rows, a.N - n0);
            for (int i = 0; i < mr; ++i)
              kk.store(res + i * tl.res_stride, a.bias ? a.bias + n0 : nullptr,
                       static_cast<char*>(a.out) + ((m + i) * a.out_row_stride + n0) * esize, a.x_dtype, cols);
            b += nr;
          }
          m += mr;
        }
      }
    }
  }
}

}  // namespace cpu
}  // namespace llmkern
