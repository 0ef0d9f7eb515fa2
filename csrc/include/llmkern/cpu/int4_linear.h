// int4_linear on the CPU: y[M, N] = x[M, K] @ dequant(qweight)^T + bias, canonical int4 weights
// (see int4_linear_common.h for the arithmetic). ISA-independent driver: it picks the path and the
// route, splits the work among OpenMP threads and calls the ISA's pieces. Arguments are trusted:
// the launcher (csrc/cpu/int4_linear.cpp) checks them.
//
// Decode path (M <= decode_max_rows; default kDecodeMaxRowsBf16 / kDecodeMaxRowsF32 by route):
// every thread prepares the rows (in the ISA's nibble order) in its own workspace, then streams its
// contiguous range of whole 32-column chunks of the weights once, prefetching the next tile in
// software; each chunk is reused from L1/L2 by the tiles of <= 4 rows. No barrier, no two threads
// writing one cache line of an output row. One-row calls given the packed decode layout
// (Int4LinearArgs::packed, see int4_linear_common.h) stream that instead: same tiles, same results.
// Prefill path: rows are processed in M chunks (all rows, up to kChunkMaxRows, when x is read in
// place; fewer when rows are first converted to fp32). Per chunk, the threads prepare the rows
// (conversion; group sums X for the portable route) together, then each takes a contiguous range of strips (NS output
// columns; rows are split too when there are fewer strips than threads), transposes the strip's
// scales and offsets once, unpacks each K block of the strip once into a panel and runs the
// micro-kernels over all of its rows, while prefetching the same block of its next strip.
//
// Routes: bf16 x on a CPU with AVX512-BF16 uses bf16 dot products: decode multiplies x by q (exact
// in bf16) and applies scales per group in fp32; prefill multiplies x by the canonical weights
// rounded to bf16 (the weights F.linear in bf16 would use), a plain bf16 GEMM. Everything else uses
// fp32 FMAs (bf16/fp16 x converted to fp32, exactly): decode on exact q with per-group scales, AVX-512
// and AVX2 prefill on the canonical fp32 weights (panel_gemm.h), portable prefill on q per group.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>

#include "llmkern/cpu/features.h"
#include "llmkern/cpu/int4_linear_avx2.h"
#include "llmkern/cpu/int4_linear_avx512.h"
#include "llmkern/cpu/int4_linear_avx512_gemm.h"
#include "llmkern/cpu/int4_linear_common.h"
#include "llmkern/cpu/int4_linear_rows16.h"
#include "llmkern/cpu/int4_linear_rows16_panel.h"
#include "llmkern/cpu/int4_linear_scalar.h"
#include "llmkern/cpu/parallel.h"

namespace llmkern {
namespace cpu {

// Decode row preparation: x -> xp (the ISA's order) and its group sums xs. scale: the prep may write
// its scaled form (AVX2: see int4_linear_avx2.h); returns whether it did (the others never do).
using I4PrepFn = bool (*)(const void* x, DType dt, int64_t K, int64_t G, void* xp, float* xs, bool scale);
using I4RowFn = void (*)(const void* x, DType dt, int64_t K, float* out);
using I4SumsFn = void (*)(const void* x, DType dt, int64_t K, int64_t G, float* xs);
using I4StoreFn = void (*)(const float* v, const float* bias, void* out, DType dt, int64_t cols);
// dst[g * ns + n] = src[n * ngroups + g] for n < ncols, 0 up to the panel width ns
using I4StripFn = void (*)(const float* src, int64_t ngroups, int64_t ncols, float* dst);
// packs rows [0, rows <= 16) of bf16 x for a route that reads packed rows (XMode::kPack)
using I4PackFn = void (*)(const uint16_t* x, int64_t stride, int64_t rows, int64_t K, uint32_t* dst);
// Unpacks a panel (see int4_linear_common.h) into w; ss / oo: the panel's scales and offsets [g][NS]
// (read by routes that store dequantized weights).
using I4UnpackFn = void (*)(const uint8_t* qw, int64_t row_bytes, int64_t ncols, int64_t k0, int64_t kc, const float* ss,
                            const float* oo, int64_t G, void* w);
// The same panel from the rows16 layout (int4_linear_rows16_panel.h): blocks = the block of the panel's
// first row, block_bytes apart.
using I4UnpackR16Fn = void (*)(const uint8_t* blocks, int64_t block_bytes, int64_t ncols, int64_t k0, int64_t kc,
                               int64_t G, void* w);

// One way of computing (fp32 FMAs or bf16 dot products): decode tiles and prefill micro-kernels.
struct Int4Route {
  DecodeTileFn dec[kDecMaxMB + 1][kDecMaxNB + 1] = {};  // [rows][weight rows]
  // The same tiles reading the packed decode layout: [0] fp16 scales / offsets, [1] fp32.
  DecodeTileFn dec_pk[2][kDecMaxMB + 1][kDecMaxNB + 1] = {};
  I4PrepFn dec_prep = nullptr;
  I4UnpackFn unpack = nullptr;
  I4UnpackR16Fn unpack_r16[3] = {};   // rows16 panels, E = 1, 2, 4 (AVX-512 only)
  MicroFn micro[kMaxMR + 1][4] = {};  // [rows][column vectors]
  int64_t kc = 0;                     // panel depth
  bool prefill_sums = true;           // prefill micro-kernels read the group sums X
  I4PackFn pack = nullptr;            // prefill micro-kernels read x packed (XMode::kPack)
};

struct Int4Kernels {
  int dec_mb_max = 1;
  int dec_nb[kDecMaxMB + 1] = {};  // weight rows of full decode tiles given the tile's rows
  int64_t ns = 0, mr = 0, vec = 0;  // panel width, micro-kernel rows, columns per vector
  Int4Route f32, bf16;
  bool has_bf16 = false;
  I4RowFn row_to_f32 = nullptr;
  I4SumsFn group_sums = nullptr;
  I4StoreFn store_row = nullptr;
  I4StripFn strip_groups = nullptr;
};

// Decode tiles of MB rows for 1, 2, 4 (and 8) weight rows, canonical and packed (fp16 / fp32 scales).
#define LLMKERN_I4_DEC1(tab, FN, MB, E) \
  tab[MB][1] = &FN<MB, 1, E>;           \
  tab[MB][2] = &FN<MB, 2, E>;           \
  tab[MB][4] = &FN<MB, 4, E>;
#define LLMKERN_I4_DEC(route, FN, MB)          \
  LLMKERN_I4_DEC1(route.dec, FN, MB, 0)        \
  LLMKERN_I4_DEC1(route.dec_pk[0], FN, MB, 2)  \
  LLMKERN_I4_DEC1(route.dec_pk[1], FN, MB, 4)
#define LLMKERN_I4_DEC8(route, FN, MB) \
  LLMKERN_I4_DEC(route, FN, MB)        \
  route.dec[MB][8] = &FN<MB, 8, 0>;    \
  route.dec_pk[0][MB][8] = &FN<MB, 8, 2>; \
  route.dec_pk[1][MB][8] = &FN<MB, 8, 4>;
#define LLMKERN_I4_MICRO3(tab, FN, MR) \
  tab[MR][1] = &FN<MR, 1>;             \
  tab[MR][2] = &FN<MR, 2>;             \
  tab[MR][3] = &FN<MR, 3>;

inline Int4Kernels make_scalar_kernels() {
  namespace s = int4_scalar;
  Int4Kernels k;
  k.dec_mb_max = 4;
  for (int mb = 1; mb <= 4; ++mb) k.dec_nb[mb] = 4;
  LLMKERN_I4_DEC(k.f32, s::dec_tile, 1)
  LLMKERN_I4_DEC(k.f32, s::dec_tile, 2)
  LLMKERN_I4_DEC(k.f32, s::dec_tile, 3)
  LLMKERN_I4_DEC(k.f32, s::dec_tile, 4)
  k.f32.dec_prep = &s::dec_prep;
  k.f32.unpack = [](const uint8_t* qw, int64_t rb, int64_t ncols, int64_t k0, int64_t kc, const float*, const float*, int64_t, void* w) {
    s::unpack_panel_f32(qw, rb, ncols, s::kNS, k0, kc, static_cast<float*>(w));
  };
  k.f32.micro[1][1] = &s::micro<1>;
  k.f32.micro[2][1] = &s::micro<2>;
  k.f32.micro[3][1] = &s::micro<3>;
  k.f32.micro[4][1] = &s::micro<4>;
  k.f32.kc = s::kKC;
  k.ns = s::kNS;
  k.mr = s::kMR;
  k.vec = s::kNS;  // one "vector": the whole panel
  k.row_to_f32 = &s::row_to_f32;
  k.group_sums = &group_sums;
  k.store_row = &s::store_row;
  k.strip_groups = [](const float* src, int64_t ngroups, int64_t ncols, float* dst) {
    s::strip_groups(src, ngroups, ncols, s::kNS, dst);
  };
  return k;
}

inline Int4Kernels make_avx2_kernels() {
  namespace v = int4_avx2;
  Int4Kernels k;
  // Decode: 1 row x 8 weight rows, 2 x 2 for two rows, 3 / 4 x 1 for more. 1 x 8 keeps 8 FMA chains
  // (1 x 4: 4, fewer than the FMA latency needs) at the price of reloading the weight words from the
  // stack (8 + 8 + 8 > 16 ymm registers): 5-10% faster than 1 x 4 hot, 7-11% cold at 2 threads. 4 x 1
  // converts each weight once for 4 rows (2 x 2: for 2) in 13 registers: the 4-sequence step's int4
  // layers 12-16% faster than with 2 x 2 (4 x 2 spills: 35% slower). docs/notes/cpu-avx2-int8pack.md.
  k.dec_mb_max = 4;
  k.dec_nb[1] = 8;
  k.dec_nb[2] = 2;
  k.dec_nb[3] = 1;
  k.dec_nb[4] = 1;
  LLMKERN_I4_DEC8(k.f32, v::dec_tile, 1)
  LLMKERN_I4_DEC(k.f32, v::dec_tile, 2)
  LLMKERN_I4_DEC(k.f32, v::dec_tile, 3)
  LLMKERN_I4_DEC(k.f32, v::dec_tile, 4)
  k.f32.dec_prep = &v::dec_prep;
  k.f32.unpack = [](const uint8_t* qw, int64_t rb, int64_t ncols, int64_t k0, int64_t kc, const float* ss,
                    const float* oo, int64_t G, void* w) {
    float* wf = static_cast<float*>(w);
    if (rb < (int64_t(1) << 27)) return v::unpack_panel_f32(qw, rb, ncols, k0, kc, ss, oo, G, wf);  // 8 rb fits int32
    int4_scalar::unpack_panel_f32(qw, rb, ncols, v::kNS, k0, kc, wf);  // q, then dequantized in place
    for (int64_t k = 0; k < kc; ++k)
      for (int64_t n = 0; n < v::kNS; ++n) wf[k * v::kNS + n] = wf[k * v::kNS + n] * ss[(k / G) * v::kNS + n] + oo[(k / G) * v::kNS + n];
  };
#define LLMKERN_I4_MICRO2(MR)           \
  k.f32.micro[MR][1] = &v::micro<MR, 1>; \
  k.f32.micro[MR][2] = &v::micro<MR, 2>;
  LLMKERN_I4_MICRO2(1)
  LLMKERN_I4_MICRO2(2)
  LLMKERN_I4_MICRO2(3)
  LLMKERN_I4_MICRO2(4)
  LLMKERN_I4_MICRO2(5)
  LLMKERN_I4_MICRO2(6)
#undef LLMKERN_I4_MICRO2
  k.f32.kc = v::kKC;
  k.f32.prefill_sums = false;  // dequantized panels: offsets are in the weights
  k.ns = v::kNS;
  k.mr = v::kMR;
  k.vec = 8;
  k.row_to_f32 = &int4_scalar::row_to_f32;
  k.group_sums = &group_sums;
  k.store_row = &v::store_row;
  k.strip_groups = [](const float* src, int64_t ngroups, int64_t ncols, float* dst) {
    int4_scalar::strip_groups(src, ngroups, ncols, v::kNS, dst);
  };
  return k;
}

inline Int4Kernels make_avx512_kernels() {
  namespace v = int4_avx512;
  Int4Kernels k;
  // Decode tiles: 1 x 8 for one row (8 independent accumulator chains), 2 x 4, then 3/4 x 2.
  k.dec_mb_max = 4;
  k.dec_nb[1] = 8;
  k.dec_nb[2] = 4;
  k.dec_nb[3] = 1;
  k.dec_nb[4] = 1;
  LLMKERN_I4_DEC8(k.f32, v::dec_tile_f32, 1)
  LLMKERN_I4_DEC(k.f32, v::dec_tile_f32, 2)
  LLMKERN_I4_DEC(k.f32, v::dec_tile_f32, 3)
  LLMKERN_I4_DEC(k.f32, v::dec_tile_f32, 4)
  k.f32.dec_prep = &v::dec_prep_f32;
  k.f32.unpack = [](const uint8_t* qw, int64_t rb, int64_t ncols, int64_t k0, int64_t kc, const float* ss,
                    const float* oo, int64_t G, void* w) {
    v::unpack_panel_f32(qw, rb, ncols, k0, kc, ss, oo, G, static_cast<float*>(w));
  };
  LLMKERN_I4_MICRO3(k.f32.micro, v::micro_f32, 1)
  LLMKERN_I4_MICRO3(k.f32.micro, v::micro_f32, 2)
  LLMKERN_I4_MICRO3(k.f32.micro, v::micro_f32, 3)
  LLMKERN_I4_MICRO3(k.f32.micro, v::micro_f32, 4)
  LLMKERN_I4_MICRO3(k.f32.micro, v::micro_f32, 5)
  LLMKERN_I4_MICRO3(k.f32.micro, v::micro_f32, 6)
  LLMKERN_I4_MICRO3(k.f32.micro, v::micro_f32, 7)
  LLMKERN_I4_MICRO3(k.f32.micro, v::micro_f32, 8)
  k.f32.unpack_r16[0] = &int4_rows16::unpack_panel_f32<1>;
  k.f32.unpack_r16[1] = &int4_rows16::unpack_panel_f32<2>;
  k.f32.unpack_r16[2] = &int4_rows16::unpack_panel_f32<4>;
  k.f32.kc = v::kKCf32;
  k.f32.prefill_sums = false;  // dequantized panels: offsets are in the weights
  k.has_bf16 = features().avx512_bf16;
  LLMKERN_I4_DEC8(k.bf16, v::dec_tile_bf16, 1)
  LLMKERN_I4_DEC(k.bf16, v::dec_tile_bf16, 2)
  LLMKERN_I4_DEC(k.bf16, v::dec_tile_bf16, 3)
  LLMKERN_I4_DEC(k.bf16, v::dec_tile_bf16, 4)
  k.bf16.dec_prep = &v::dec_prep_bf16;
  k.bf16.unpack = [](const uint8_t* qw, int64_t rb, int64_t ncols, int64_t k0, int64_t kc, const float* ss,
                     const float* oo, int64_t G, void* w) {
    v::unpack_panel_bf16(qw, rb, ncols, k0, kc, ss, oo, G, static_cast<uint32_t*>(w));
  };
  LLMKERN_I4_MICRO3(k.bf16.micro, v::micro_bf16, 1)
  LLMKERN_I4_MICRO3(k.bf16.micro, v::micro_bf16, 2)
  LLMKERN_I4_MICRO3(k.bf16.micro, v::micro_bf16, 3)
  LLMKERN_I4_MICRO3(k.bf16.micro, v::micro_bf16, 4)
  LLMKERN_I4_MICRO3(k.bf16.micro, v::micro_bf16, 5)
  LLMKERN_I4_MICRO3(k.bf16.micro, v::micro_bf16, 6)
  LLMKERN_I4_MICRO3(k.bf16.micro, v::micro_bf16, 7)
  LLMKERN_I4_MICRO3(k.bf16.micro, v::micro_bf16, 8)
  k.bf16.unpack_r16[0] = &int4_rows16::unpack_panel_bf16<1>;
  k.bf16.unpack_r16[1] = &int4_rows16::unpack_panel_bf16<2>;
  k.bf16.unpack_r16[2] = &int4_rows16::unpack_panel_bf16<4>;
  k.bf16.kc = v::kKCbf16;
  k.bf16.prefill_sums = false;  // dequantized panels: offsets are in the weights
  k.bf16.pack = &v::pack_rows_bf16;
  k.ns = v::kNS;
  k.mr = v::kMR;
  k.vec = 16;
  k.row_to_f32 = &v::row_to_f32;
  k.group_sums = &v::group_sums_v;
  k.store_row = &v::store_row;
  k.strip_groups = &v::strip_groups;
  return k;
}

#undef LLMKERN_I4_DEC
#undef LLMKERN_I4_DEC1
#undef LLMKERN_I4_DEC8
#undef LLMKERN_I4_MICRO3

inline const Int4Kernels& int4_kernels_for(Isa isa) {
  static const Int4Kernels k512 = make_avx512_kernels(), k2 = make_avx2_kernels(), ks = make_scalar_kernels();
  switch (isa) {
    case Isa::kAvx512Vnni: return k512;
    case Isa::kAvx2: return k2;
    default: return ks;
  }
}

namespace int4_detail {

inline const void* x_row(const Int4LinearArgs& a, int64_t m) {
  return static_cast<const char*>(a.x) + m * a.x_row_stride * dtype_size(a.x_dtype);
}

inline void* out_row(const Int4LinearArgs& a, int64_t m, int64_t n) {
  return static_cast<char*>(a.out) + (m * a.out_row_stride + n) * dtype_size(a.x_dtype);
}

constexpr int64_t kColChunk = 32;

// Prefetch of a panel block (rows [n0, n0 + ncols), k in [k0, k0 + kc)): per weight row, its
// kc / 128 lines of packed weights; short pieces that no hardware prefetcher anticipates. A cursor:
// next(count) issues the next `count` prefetches, so that the next block's prefetches are spread
// over the current block's micro-kernel calls instead of issued in a burst.
struct BlockPrefetch {
  const uint8_t* qw = nullptr;  // row n0 at byte k0 / 2
  int64_t rb = 0, per_row = 0, rows = 0;
  int64_t n = 0, l = 0;         // next row, next line in it

  BlockPrefetch() = default;
  BlockPrefetch(const Int4LinearArgs& a, int64_t n0, int64_t ncols, int64_t k0, int64_t kc)
      : qw(a.qweight + n0 * (a.K / 2) + k0 / 2), rb(a.K / 2), per_row((kc + 127) / 128), rows(ncols) {}
  // rows16 (the blocks of rows n0 .. n0 + ncols, bb bytes each): per block, one contiguous span
  BlockPrefetch(const uint8_t* rows16, int64_t e, int64_t bb, int64_t n0, int64_t ncols, int64_t k0, int64_t kc,
                int64_t G) {
    int64_t lo, hi;
    int4_rows16::group_span(k0, kc, G, e, bb, &lo, &hi);
    qw = rows16 + n0 / 16 * bb + lo;
    rb = bb;
    per_row = (hi - lo + 63) / 64;
    rows = (ncols + 15) / 16;
  }

  int64_t total() const { return rows * per_row; }

  // always_inline: GCC 12 deletes calls of a function of only prefetches (it finds it "pure").
  inline __attribute__((always_inline)) void next(int64_t count) {
    for (; count > 0 && n < rows; --count) {
      __builtin_prefetch(qw + n * rb + 64 * l, 0, 3);
      if (++l == per_row) l = 0, ++n;
    }
  }
};

// Threads worth starting: waking a thread costs ~1.5 us, which a tiny layer does not win back.
// Decode from memory gains from a second thread even at 83 KB of weights (SmolLM2 k/v projection,
// cold: 4.5 us on 1 thread, 3.4 us on 2; from cache 2.6 vs 3.0 us), so the bar is low.
constexpr int64_t kMinBytesPerThread = 32 << 10;  // decode: weight bytes streamed per thread
constexpr int64_t kMinMacsPerThread = 1 << 20;    // prefill: multiply-adds per thread

inline int useful_threads(int num_threads, int64_t work, int64_t per_thread) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, work / per_thread)));
}

inline void decode(const Int4LinearArgs& a, const Int4Kernels& kk, const Int4Route& rt, const WsLayout& L, char* ws) {
  const int64_t rb = a.K / 2, ng = a.K / a.group, rowb = dec_row_bytes(a.K), gp = groups_padded(a.K);
  const int64_t chunks = (a.N + kColChunk - 1) / kColChunk;
  // Read the packed layout (a.packed_e-byte scales) for one row only: with 2 or 4 rows it measured
  // 5-20% slower than the canonical layout (compute-bound tiles of 2-4 weight rows; NOTES).
  const bool pk = a.packed != nullptr && a.M <= kPkMaxRows;
  const int64_t pkrb = pk ? pk_row_bytes(a.K, a.group, a.packed_e) : 0;
  const int nthreads = useful_threads(a.num_threads, a.N * (pk ? pkrb : rb + 8 * ng), kMinBytesPerThread);
#pragma omp parallel num_threads(nthreads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t c0, c1;
    split_range(chunks, nt, t, &c0, &c1);
    if (c1 > c0) {
      char* mine = ws + L.thread0 + t * L.per_thread;
      char* xp = mine;
      float* xs = reinterpret_cast<float*>(mine + align_up(a.M * rowb, kAlign));
      float* res = xs + align_up(a.M * gp * 4, kAlign) / 4;  // [M][kColChunk]
      int64_t scaled = 0;  // rows written in the scaled form: all of them or none (the tiles read one form)
      for (int64_t m = 0; m < a.M; ++m) scaled += rt.dec_prep(x_row(a, m), a.x_dtype, a.K, a.group, xp + m * rowb, xs + m * gp, true);
      if (scaled > 0 && scaled < a.M) {
        for (int64_t m = 0; m < a.M; ++m) rt.dec_prep(x_row(a, m), a.x_dtype, a.K, a.group, xp + m * rowb, xs + m * gp, false);
        scaled = 0;
      }
      DecodeTile tile;
      tile.K = a.K;
      tile.group = a.group;
      tile.ngroups = ng;
      tile.res_stride = kColChunk;
      tile.x_scaled = scaled > 0;
      for (int64_t n = c0 * kColChunk; n < std::min(a.N, c1 * kColChunk); n += kColChunk) {
        const int64_t cols = std::min(kColChunk, a.N - n);
        for (int64_t m0 = 0; m0 < a.M;) {
          const int mb = static_cast<int>(std::min<int64_t>(kk.dec_mb_max, a.M - m0));
          for (int i = 0; i < mb; ++i) {
            tile.x[i] = xp + (m0 + i) * rowb;
            tile.xs[i] = xs + (m0 + i) * gp;
          }
          for (int64_t c = 0; c < cols;) {
            int nb = kk.dec_nb[mb];
            while (nb > cols - c) nb /= 2;  // tails: 4, 2, 1 weight rows
            tile.qw = a.qweight + (n + c) * rb;
            tile.scale = a.scales + (n + c) * ng;
            tile.offset = a.offsets + (n + c) * ng;
            tile.res = res + m0 * kColChunk + c;
            // Prefetch the weights after this tile, up to the thread's last row (first rows only:
            // the later row tiles find the chunk's weights in cache).
            const int64_t next = n + c + nb, end = std::min(a.N, c1 * kColChunk);
            const int64_t pf_rows = m0 == 0 ? std::min<int64_t>(nb, end - next) : 0;
            tile.pf_qw = a.qweight + next * rb;
            tile.pf_scale = a.scales + next * ng;
            tile.pf_offset = a.offsets + next * ng;
            tile.pf_bytes = pf_rows * rb;
            tile.pf_gbytes = pf_rows * ng * 4;
            if (pk) {
              // The tile's rows lie in one block (tiles start at multiples of their power-of-two
              // height). The thread's blocks are one contiguous stream: the tiles of a block
              // prefetch the next block, each its share (rows j0 .. j0 + nb of 8: the whole block
              // for a tile of 8 rows), so the distance is one block whatever the tile height.
              const int64_t col = n + c, b0 = col & ~(kPkRows - 1), b1 = b0 + kPkRows, j0 = col - b0;
              tile.pk = a.packed + b0 * pkrb;
              tile.pk_rows = std::min(kPkRows, a.N - b0);
              tile.pk_row0 = j0;
              const int64_t next = m0 == 0 && b1 < end ? std::min(kPkRows, end - b1) * pkrb : 0;
              const int64_t lo = next * j0 / kPkRows / 64 * 64, hi = next * (j0 + nb) / kPkRows / 64 * 64;
              tile.pf_qw = a.packed + b1 * pkrb + lo;
              tile.pf_bytes = j0 + nb >= tile.pk_rows ? next - lo : hi - lo;  // the last tile: the rest
              rt.dec_pk[a.packed_e == 2 ? 0 : 1][mb][nb](tile);
            } else {
              rt.dec[mb][nb](tile);
            }
            c += nb;
          }
          m0 += mb;
        }
        for (int64_t m = 0; m < a.M; ++m)
          kk.store_row(res + m * kColChunk, a.bias ? a.bias + n : nullptr, out_row(a, m, n), a.x_dtype, cols);
      }
    }
  }
}

// Weight panels come from the rows16 layout where it is bound and the route unpacks it (AVX-512), else
// from the canonical tensors: the same panels (int4_linear_rows16_panel.h).
inline void prefill(const Int4LinearArgs& a, const Int4Kernels& kk, const Int4Route& rt, bool convert, const WsLayout& L,
                    char* ws) {
  const int64_t rb = a.K / 2, ng = a.K / a.group, G = a.group, NS = kk.ns;
  const I4UnpackR16Fn r16 = a.rows16 ? rt.unpack_r16[a.rows16_e == 1 ? 0 : a.rows16_e == 2 ? 1 : 2] : nullptr;
  const int64_t bb = r16 ? int4_rows16::block_bytes(a.K, G, a.rows16_e) : 0;
  const XMode mode = rt.pack ? XMode::kPack : convert ? XMode::kConvert : XMode::kInPlace;
  // Columns are split among threads in whole vectors (not whole strips: 4096 columns are 85 1/3
  // strips of 48, and a strip more on one thread costs 2%).
  const int64_t units = (a.N + kk.vec - 1) / kk.vec, Mc = chunk_rows(a.M, a.K, mode);
  const bool prep = mode != XMode::kInPlace || rt.prefill_sums;  // rows to prepare per chunk
  const int64_t kpad = align_up(a.K, 16), gp = groups_padded(a.K), blk = a.K / 2 * 8;
  float* conv = reinterpret_cast<float*>(ws + L.conv);  // kConvert: [Mc][kpad] fp32 rows
  uint32_t* packed = reinterpret_cast<uint32_t*>(ws + L.conv);  // kPack: [Mc / 8][K / 2][8] pairs
  float* xs = reinterpret_cast<float*>(ws + L.xs);      // [Mc][gp] group sums
  const int64_t xsize = convert ? 4 : dtype_size(a.x_dtype);
  const int nthreads = useful_threads(a.num_threads, a.M * a.N * a.K, kMinMacsPerThread);
  // K blocks of equal depth (a multiple of G, at most the route's kc): K = 576 takes 3 x 192, not
  // 256 + 256 + 64 (a short block costs a whole block's overheads).
  const int64_t nblocks = (a.K + rt.kc - 1) / rt.kc;
  const int64_t kcb = std::min(rt.kc, align_up((a.K + nblocks - 1) / nblocks, G));
  // One K block's panel (kcb values of NS columns: at most 4 bytes a value, fp32; bf16 pairs take half) and the K
  // span held at once.
  const int64_t block_bytes = align_up(kcb * NS * 4, kAlign);
  const int64_t span = std::max<int64_t>(1, kSpanBytes / block_bytes) * kcb;
#pragma omp parallel num_threads(nthreads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const GridPart part(units, nt, t);
    const int64_t col0 = part.u0 * kk.vec, col1 = std::min(a.N, part.u1 * kk.vec);  // this thread's columns
    char* mine = ws + L.thread0 + t * L.per_thread;
    void* panel = mine;
    float* ss = reinterpret_cast<float*>(mine + kPanelRegion);
    float* oo = ss + strip_group_bytes(a.K) / 4;  // ss, oo: [K / G][NS] of the current strip
    float* ctile = oo + strip_group_bytes(a.K) / 4;  // [rows of this thread][NS]
    for (int64_t m0 = 0; m0 < a.M; m0 += Mc) {
      const int64_t m1 = std::min(a.M, m0 + Mc);
      if (prep) {
        // 16 rows per step: the packing transposes 16 rows x 16 pairs at a time
#pragma omp for schedule(static)
        for (int64_t b = 0; b < (m1 - m0 + 15) / 16; ++b) {
          const int64_t r = 16 * b, rows = std::min<int64_t>(16, m1 - m0 - r);
          if (mode == XMode::kPack)
            rt.pack(static_cast<const uint16_t*>(x_row(a, m0 + r)), a.x_row_stride, rows, a.K, packed + (r / 8) * blk);
          for (int64_t i = r; i < r + rows; ++i) {
            if (mode == XMode::kConvert) kk.row_to_f32(x_row(a, m0 + i), a.x_dtype, a.K, conv + i * kpad);
            if (rt.prefill_sums) kk.group_sums(x_row(a, m0 + i), a.x_dtype, a.K, G, xs + i * gp);
          }
        }  // implicit barrier: the chunk's rows are ready
      }
      int64_t r0, r1;  // this thread's rows of the chunk, in whole blocks of 8 (the packed row blocks)
      part.rows(m1 - m0, 8, &r0, &r1);
      for (int64_t n0 = col0; n0 < col1 && r1 > r0; n0 += NS) {
        const int64_t ncols = std::min(NS, col1 - n0), nv = (ncols + kk.vec - 1) / kk.vec;
        if (!r16) {  // (rows16 panels read each group's scales and offsets from the block)
          kk.strip_groups(a.scales + n0 * ng, ng, ncols, ss);
          kk.strip_groups(a.offsets + n0 * ng, ng, ncols, oo);
        }
        // K spans of whole K blocks (panel bytes each: kcb values x NS columns, fp32 or bf16 pairs)
        for (int64_t ks = 0; ks < a.K; ks += span) {
          const int64_t ke = std::min(a.K, ks + span);
          for (int64_t k0 = ks; k0 < ke; k0 += kcb) {
            const int64_t kc = std::min(kcb, a.K - k0);
            void* pk = static_cast<char*>(panel) + (k0 - ks) / kcb * block_bytes;
            if (r16) r16(a.rows16 + n0 / 16 * bb, bb, ncols, k0, kc, G, pk);  // (n0: a multiple of kk.vec = 16)
            else rt.unpack(a.qweight + n0 * rb, rb, ncols, k0, kc, ss + (k0 / G) * NS, oo + (k0 / G) * NS, G, pk);
          }
          // The same span of the thread's next strip, prefetched a slice per micro-kernel call.
          BlockPrefetch pf;
          if (n0 + NS < col1) {
            const int64_t nc = std::min(NS, col1 - n0 - NS);
            pf = r16 ? BlockPrefetch(a.rows16, a.rows16_e, bb, n0 + NS, nc, ks, ke - ks, G)
                     : BlockPrefetch(a, n0 + NS, nc, ks, ke - ks);
          }
          const int64_t calls = (r1 - r0 + kk.mr - 1) / kk.mr * ((ke - ks + kcb - 1) / kcb);
          const int64_t per_call = (pf.total() + calls - 1) / calls;
          Micro mi;
          mi.dt = a.x_dtype;
          mi.bias = a.bias ? a.bias + n0 : nullptr;
          mi.ncols = ncols;
          // Groups of kGroupBlocks row blocks (packed rows: a group starts at a block start) take each K block of the
          // span in turn, in order: each C tile carries its sums between blocks (one fp32 order per output, as a K
          // block at a time over all rows did), and a block's panel serves the group's row blocks from L1.
          const int64_t rg = kGroupBlocks * kk.mr;
          for (int64_t g = r0; g < r1; g += rg) {
            const int64_t ge = std::min(r1, g + rg);
            for (int64_t k0 = ks; k0 < ke; k0 += kcb) {
              const int64_t kc = std::min(kcb, a.K - k0);
              const Panel p{static_cast<char*>(panel) + (k0 - ks) / kcb * block_bytes, ss + (k0 / G) * NS,
                            oo + (k0 / G) * NS, kc, G};
              mi.first = k0 == 0;
              mi.last = k0 + kc >= a.K;
              for (int64_t r = g; r < ge; r += kk.mr) {
                const int mr = static_cast<int>(std::min<int64_t>(kk.mr, ge - r));
                mi.c = ctile + (r - r0) * NS;
                for (int i = 0; i < mr; ++i) {
                  const int64_t m = m0 + r + i;
                  if (mode == XMode::kConvert) mi.x[i] = reinterpret_cast<const char*>(conv + (r + i) * kpad) + k0 * 4;
                  else mi.x[i] = static_cast<const char*>(x_row(a, m)) + k0 * xsize;
                  mi.xs[i] = xs + (r + i) * gp + k0 / G;
                  mi.out[i] = out_row(a, m, n0);
                }
                if (mode == XMode::kPack) mi.x[0] = packed + (r / 8) * blk + (k0 / 2) * 8;
                pf.next(per_call);
                rt.micro[mr][nv](p, mi);
              }
            }
          }
        }
      }
      if (prep) {
#pragma omp barrier  // the next chunk overwrites the prepared rows
      }
    }
  }
}

}  // namespace int4_detail

// Runs the whole op. Workspace: int4_linear_workspace_bytes(M, K, N, num_threads, decode_max_rows).
inline void int4_linear(const Int4LinearArgs& a, Isa isa) {
  if (a.M <= 0 || a.N <= 0) return;
  const Int4Kernels& kk = int4_kernels_for(isa);
  const WsLayout L = int4_ws_layout(a.M, a.K, a.N, a.num_threads, a.decode_max_rows);
  char* ws = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(a.ws) + kAlign - 1) / kAlign * kAlign);
  const bool bf16 = a.x_dtype == DType::kBF16 && a.bf16_dot && kk.has_bf16;
  const Int4Route& rt = bf16 ? kk.bf16 : kk.f32;
  const int64_t dmax = a.decode_max_rows >= 0 ? a.decode_max_rows : bf16 ? kDecodeMaxRowsBf16 : kDecodeMaxRowsF32;
  if (a.M <= dmax && a.rows16 && a.M >= int4_rows16::kMinRows && isa == Isa::kAvx512Vnni) {
    // rows16 decode: bf16 x as it is (bf16 dot products), fp32 x as it is, other x (fp16, bf16 without the dot
    // products: then dmax is the fp32 route's) converted to fp32 rows first (M = 4 fp16 rows on 4096 x 4096: 0.82
    // ms against 1.39 on the canonical decode tiles). Every decode call of a released weight (no canonical
    // tensors; the launcher then runs AVX-512) comes here. Workspace: the group sums [M][K / G], then the
    // converted rows [M][align_up(K, 16)]: within dec_thread_bytes(M, K), which the workspace holds for M <= dmax.
    const void* x = a.x;
    int64_t stride = a.x_row_stride;
    float* X = reinterpret_cast<float*>(ws);
    if (!bf16 && a.x_dtype != DType::kF32) {
      float* conv = reinterpret_cast<float*>(ws + align_up(a.M * (a.K / a.group) * 4, kAlign));
      stride = align_up(a.K, 16);
      for (int64_t m = 0; m < a.M; ++m) kk.row_to_f32(int4_detail::x_row(a, m), a.x_dtype, a.K, conv + m * stride);
      x = conv;
    }
    int4_rows16::decode(x, stride, !bf16, a.M, a.K, a.N, a.group, a.rows16, a.rows16_e, a.bias, a.out,
                        a.out_row_stride, a.x_dtype, X, a.num_threads);
  } else if (a.M <= dmax) {
    int4_detail::decode(a, kk, rt, L, ws);
  } else {
    int4_detail::prefill(a, kk, rt, !bf16 && a.x_dtype != DType::kF32, L, ws);
  }
}

}  // namespace cpu
}  // namespace llmkern
