// int8_linear W8A8 prefill (many activation rows) on AVX-512 VNNI: a GEMM micro-kernel over
// weights prepacked once into a VNNI panel layout.
//
// Why: the canonical tiles (int8_linear_avx512.h) compute dot products along K (16 int32 lanes
// per output, a horizontal sum at the end) and pay one extra vpdpbusd per weight vector to remove
// the +128 activation shift. Here the vector dimension is the output channel instead: one 64-byte
// load gives 16 channels x 4 values of k, each activation row contributes a 4-byte broadcast, and
// an MR x (16 NV) tile of int32 accumulators (6 x 64: 24 zmm, + 4 weight vectors + 1 broadcast)
// does MR * NV vpdpbusd per MR + NV loads. The shift is removed once per output from column sums
// computed at pack time, and the epilogue is lane-wise (no horizontal sums).
//
// Layout (int8_pack_gemm, at prepare time; the canonical w [N, K] / scale [N, K/G] stay the
// state-dict form):
//   [64-byte header: magic, N, K, G]
//   then ceil(N / 64) panels of 64 output channels (the last one NV = ceil(rest / 16) vectors of
//   16 channels; channels past N are zero), panel p at header + p * panel_bytes(4, K, G):
//     W[K4][16 NV][4]  int8 weights, W[s][c][i] = w[n0 + c, 4 s + i] (0 past K), K4 = ceil(K / 4)
//     C[ng][16 NV]     int32 128 * sum of the channel's weights over group g (the shift to remove)
//     S[ng][16 NV]     fp32 scales of the channel's group g (0 past N)
//   one panel of K = 4096 is 256 KiB: it stays in L2 while the M tiles of a block stream past it.
// Groups: per channel (G = K, any K) or G a multiple of 4 (a group is a whole number of 4-byte
// steps); other groups keep the canonical tiles.
//
// Results: per channel, bit-identical to the canonical AVX-512 tiles (the same exact int32 sum,
// then float(sum) * scale * row_scale + bias, in that order, each rounded to fp32). Per group the
// int32 group sums are the same but are rescaled and added in group order (sum_g float(S_g) *
// scale_g by fma), where the canonical kernel keeps 16 lane partials: equal up to fp32 rounding.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "llmkern/cpu/int8_linear_avx512.h"
#include "llmkern/cpu/int8_linear_common.h"
#include "llmkern/cpu/parallel.h"
#include "llmkern/cpu/store_avx512.h"

namespace llmkern {
namespace cpu {
namespace i8gm {

constexpr int64_t kNV = 4;            // 16-channel vectors per full panel
constexpr int64_t kPanel = 16 * kNV;  // channels per full panel
constexpr int kMR = 6;                // activation rows per micro-tile
constexpr int64_t kHeader = 64;
constexpr uint32_t kMagic = 0x4d47384c;  // "L8GM"

// Rows from which a W8A8 call with the GEMM layout uses it. Measured (docs/notes/cpu-w8a8-gemm.md,
// 4096 x 4096, 1 thread, cold weights): the GEMM is 1.3-1.4x the packed decode layout at M = 2 and
// 1.5-2.2x from M = 4 (per channel, G = 32, G = 128); at M = 1 the two tie (0.99-1.13x), and the
// decode layout keeps one-row calls.
#ifndef LLMKERN_I8GM_MIN_ROWS
#define LLMKERN_I8GM_MIN_ROWS 2
#endif
constexpr int64_t kMinRows = LLMKERN_I8GM_MIN_ROWS;

// Activation bytes of one M block: every panel of the thread's range passes once per block (from
// DRAM, then from L2 for the block's other tiles), while the block's rows are re-read from L2/L3 per
// panel. Measured (Zen 5, 1 thread, M = 128 / 512, K = 4096 / 11008): 2 - 16 MiB within ~3% of each
// other, 1 MiB 3-10% and 512 KiB 5-20% slower (more passes over the weights; streaming the rows from
// L3 costs less). 4 MiB keeps a block well inside the 32 MiB L3 for long prompts.
#ifndef LLMKERN_I8GM_BLOCK_BYTES
#define LLMKERN_I8GM_BLOCK_BYTES (4 << 20)
#endif

struct Header {
  uint32_t magic;
  uint32_t reserved;
  int64_t N, K, G;
};

inline int64_t k4(int64_t K) { return (K + 3) / 4; }
inline bool group_ok(int64_t K, int64_t G) { return G >= 1 && K % G == 0 && (G == K || G % 4 == 0); }
inline int64_t panel_bytes(int64_t nv, int64_t K, int64_t G) { return 16 * nv * (4 * k4(K) + 8 * (K / G)); }
inline int64_t npanels(int64_t N) { return (N + kPanel - 1) / kPanel; }
inline int64_t panel_nv(int64_t N, int64_t p) { return std::min(kNV, (N - p * kPanel + 15) / 16); }
inline int64_t packed_bytes(int64_t N, int64_t K, int64_t G) {
  if (N <= 0) return kHeader;
  return kHeader + (npanels(N) - 1) * panel_bytes(kNV, K, G) + panel_bytes(panel_nv(N, npanels(N) - 1), K, G);
}

// Packs canonical weights (w [N, K] int8, scale [N, K/G] fp32) into packed_bytes(N, K, G) bytes at out.
inline void int8_pack_gemm(const int8_t* w, const float* scale, int64_t N, int64_t K, int64_t G, uint8_t* out) {
  std::memset(out, 0, kHeader);
  const Header h{kMagic, 0u, N, K, G};
  std::memcpy(out, &h, sizeof(h));
  const int64_t ng = K / G, ks = k4(K), P = npanels(N);
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < P; ++p) {
    const int64_t nv = panel_nv(N, p), nc = 16 * nv, n0 = p * kPanel;
    uint8_t* W = out + kHeader + p * panel_bytes(kNV, K, G);
    int32_t* C = reinterpret_cast<int32_t*>(W + 4 * ks * nc);
    float* S = reinterpret_cast<float*>(C + ng * nc);
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t n = n0 + c;
      for (int64_t s = 0; s < ks; ++s)
        for (int64_t i = 0; i < 4; ++i) {
          const int64_t k = 4 * s + i;
          W[(s * nc + c) * 4 + i] = n < N && k < K ? static_cast<uint8_t>(w[n * K + k]) : 0;
        }
      for (int64_t g = 0; g < ng; ++g) {
        int32_t sum = 0;
        if (n < N)
          for (int64_t k = g * G; k < (g + 1) * G; ++k) sum += w[n * K + k];
        C[g * nc + c] = 128 * sum;
        S[g * nc + c] = n < N ? scale[n * ng + g] : 0.0f;
      }
    }
  }
}

// One micro-tile's arguments: MR rows [m0, m0 + MR) x the panel's 16 NV channels from n0.
struct Tile {
  const uint8_t* x[kMR];   // u8 activation rows (q + 128, quantize_row), readable to 4 K4 bytes
  const float* row_scale;  // [MR]
  const uint8_t* panel;    // W, then C and S (layout above)
  int64_t ks, ng, gs;      // K4, groups, 4-byte steps per group (ng == 1: gs = ks)
  const float* bias;       // [16 NV] from n0, or null
  void* out;               // element (m0, n0) of the output
  int64_t out_stride;      // elements
  DType dt;
  int64_t ncols;           // valid channels of the panel (the rest is not stored)
};

// Keeps GCC from contracting a*b + c into an fma where the canonical kernel rounds twice.
LLMKERN_AVX512_INLINE __m512 no_contract(__m512 v) {
  __asm__("" : "+v"(v));
  return v;
}

// acc[i][j] = sum over 4-byte steps [s0, s1) of (q[i] + 128) * w (16 channels of vector j per lane).
template <int MR, int NV>
LLMKERN_AVX512_INLINE void dot_steps(__m512i (&acc)[MR][NV], const uint8_t* const* xr, const uint8_t* W, int64_t s0,
                                     int64_t s1) {
  LLMKERN_UNROLL for (int i = 0; i < MR; ++i)
    LLMKERN_UNROLL for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_setzero_si512();
  const uint8_t* wp = W + s0 * 64 * NV;
  for (int64_t s = s0; s < s1; ++s, wp += 64 * NV) {
    __m512i wv[NV];
    LLMKERN_UNROLL for (int j = 0; j < NV; ++j) wv[j] = _mm512_loadu_si512(wp + 64 * j);
    LLMKERN_UNROLL for (int i = 0; i < MR; ++i) {
      int32_t xw;
      std::memcpy(&xw, xr[i] + 4 * s, 4);  // bytes past K meet zero weights
      const __m512i xb = _mm512_set1_epi32(xw);
      LLMKERN_UNROLL for (int j = 0; j < NV; ++j) avx512::dpbusd(acc[i][j], xb, wv[j]);
    }
  }
}

// y = res * row_scale + bias for rows [0, MR) of the tile (res: MR x NV vectors), two roundings as in
// the canonical driver (compute_block), stored in x's dtype.
template <int MR, int NV>
LLMKERN_AVX512_INLINE void store_rows(const Tile& t, int row0, const __m512 (&res)[MR][NV]) {
  LLMKERN_UNROLL for (int j = 0; j < NV; ++j) {
    const int64_t n = 16 * j, left = t.ncols - n;
    if (left <= 0) break;
    const __mmask16 m = store512::tail16(left);
    const int64_t es = dtype_size(t.dt);
    LLMKERN_UNROLL for (int i = 0; i < MR; ++i) {
      const __m512 v = no_contract(_mm512_mul_ps(res[i][j], _mm512_set1_ps(t.row_scale[row0 + i])));
      // + bias, rounded to x's dtype bit for bit as store_from_f32 (convert.h)
      store512::store16(v, t.bias ? t.bias + n : nullptr, static_cast<char*>(t.out) + ((row0 + i) * t.out_stride + n) * es,
                        t.dt, m);
    }
  }
}

// Per channel: one exact int32 sum per output, float(sum) * scale.
template <int MR, int NV>
LLMKERN_AVX512 void tile_channel(const Tile& t) {
  const int64_t nc = 16 * NV;
  const int32_t* C = reinterpret_cast<const int32_t*>(t.panel + 4 * t.ks * nc);
  const float* S = reinterpret_cast<const float*>(C + nc);
  __m512i acc[MR][NV];
  dot_steps<MR, NV>(acc, t.x, t.panel, 0, t.ks);
  __m512 res[MR][NV];
  LLMKERN_UNROLL for (int j = 0; j < NV; ++j) {
    const __m512i corr = _mm512_loadu_si512(C + 16 * j);
    const __m512 sc = _mm512_loadu_ps(S + 16 * j);
    LLMKERN_UNROLL for (int i = 0; i < MR; ++i)
      res[i][j] = no_contract(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][j], corr)), sc));
  }
  store_rows<MR, NV>(t, 0, res);
}

// Per group, rows [row0, row0 + MR) with MR <= 3: the int32 group sums and the fp32 running sums
// both stay in registers (2 x 12 + 4 weight vectors + 1 broadcast of 32 zmm).
template <int MR, int NV>
LLMKERN_AVX512_INLINE void tile_grouped_rows(const Tile& t, int row0) {
  const int64_t nc = 16 * NV;
  const int32_t* C = reinterpret_cast<const int32_t*>(t.panel + 4 * t.ks * nc);
  const float* S = reinterpret_cast<const float*>(C + t.ng * nc);
  __m512 res[MR][NV];
  LLMKERN_UNROLL for (int i = 0; i < MR; ++i)
    LLMKERN_UNROLL for (int j = 0; j < NV; ++j) res[i][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < t.ng; ++g) {
    __m512i acc[MR][NV];
    dot_steps<MR, NV>(acc, t.x + row0, t.panel, g * t.gs, (g + 1) * t.gs);
    LLMKERN_UNROLL for (int j = 0; j < NV; ++j) {
      const __m512i corr = _mm512_loadu_si512(C + g * nc + 16 * j);
      const __m512 sc = _mm512_loadu_ps(S + g * nc + 16 * j);
      LLMKERN_UNROLL for (int i = 0; i < MR; ++i)
        res[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][j], corr)), sc, res[i][j]);
    }
  }
  store_rows<MR, NV>(t, row0, res);
}

// Per group: the tile's rows in chunks of up to 3 (each chunk re-reads the panel slice from L1).
template <int MR, int NV>
LLMKERN_AVX512 void tile_grouped(const Tile& t) {
  if constexpr (MR <= 3) {
    tile_grouped_rows<MR, NV>(t, 0);
  } else {
    tile_grouped_rows<3, NV>(t, 0);
    tile_grouped_rows<MR - 3, NV>(t, 3);
  }
}

template <int MR, int NV>
void gemm_tile(const Tile& t) {
  if (t.ng == 1) tile_channel<MR, NV>(t);
  else tile_grouped<MR, NV>(t);
}

using TileFn = void (*)(const Tile&);

template <int MR>
struct TileRow {
  static void fill(TileFn (&tab)[kMR + 1][kNV + 1]) {
    tab[MR][1] = &gemm_tile<MR, 1>;
    tab[MR][2] = &gemm_tile<MR, 2>;
    tab[MR][3] = &gemm_tile<MR, 3>;
    tab[MR][4] = &gemm_tile<MR, 4>;
  }
};

inline const TileFn (&tiles())[kMR + 1][kNV + 1] {
  static const auto tab = [] {
    struct T {
      TileFn f[kMR + 1][kNV + 1];
    } t{};
    TileRow<1>::fill(t.f);
    TileRow<2>::fill(t.f);
    TileRow<3>::fill(t.f);
    TileRow<4>::fill(t.f);
    TileRow<5>::fill(t.f);
    TileRow<6>::fill(t.f);
    return t;
  }();
  return tab.f;
}

// Whether a call reads the GEMM layout (W8A8, AVX-512, M >= kMinRows; see int8_linear.h).
inline bool use_gemm(const Int8LinearArgs& a, Isa isa) {
  return a.gemm && a.w8a8 && isa == Isa::kAvx512Vnni && a.M >= kMinRows;
}

// The whole W8A8 call from the GEMM layout. ws: int8_linear_workspace_bytes(M, K, N, true) bytes
// (quantized u8 rows of kpad(K) >= 4 K4 bytes, then the row scales).
//
// Threads: the ceil(N / 64) panels are split into contiguous ranges (a panel's output columns are
// 256 / 128 bytes of a row, so threads never share a cache line of the output when rows are
// 64-byte aligned); when there are fewer panels than threads, the M tiles are split too.
// Per thread: M blocks of LLMKERN_I8GM_BLOCK_BYTES of activations; within a block, each panel in
// turn (from DRAM once per block, then from L2) times every 6-row tile of the block, full K per
// tile: keeping a K slice of the panel in L1 instead (partial sums parked between K blocks) measured
// 0-15% slower, and prefetching the next panel during the current one 0-22% slower at 1 thread.
// Int32 lanes may wrap while summing (q + 128) w; subtracting C unwraps them: the result is the exact
// sum q w, |sum| <= 127 * 128 * kMaxW8A8Group < 2^31.
inline void int8_linear_gemm(const Int8LinearArgs& a) {
  const int64_t Kp = kpad(a.K);
  uint8_t* ws = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(a.ws) + kAlign - 1) / kAlign * kAlign);
  float* row_scale = reinterpret_cast<float*>(ws + a.M * Kp);
  const int64_t P = npanels(a.N), T = (a.M + kMR - 1) / kMR;
  const int64_t ng = a.K / a.group, ks = k4(a.K);
  const int64_t blk = std::max<int64_t>(1, (LLMKERN_I8GM_BLOCK_BYTES) / Kp / kMR);  // tiles per M block
  const uint8_t* panels = a.gemm + kHeader;
  const int64_t pb = panel_bytes(kNV, a.K, a.group);
  const TileFn(&tab)[kMR + 1][kNV + 1] = tiles();
  const int64_t esize = dtype_size(a.x_dtype);
#pragma omp parallel num_threads(std::max(1, a.num_threads))
  {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < a.M; ++m)
      avx512::quantize_row(static_cast<const char*>(a.x) + m * a.x_row_stride * esize, a.x_dtype, a.K, ws + m * Kp,
                           row_scale + m);  // implicit barrier: every row is ready below
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t tn = std::min<int64_t>(nt, P), tm = std::min<int64_t>(T, std::max<int64_t>(1, nt / tn));
    if (t < tn * tm) {
      int64_t p0, p1, t0, t1;
      split_range(P, tn, t % tn, &p0, &p1);
      split_range(T, tm, t / tn, &t0, &t1);
      Tile tile;
      tile.ks = ks;
      tile.ng = ng;
      tile.gs = ng == 1 ? ks : a.group / 4;
      tile.dt = a.x_dtype;
      tile.out_stride = a.out_row_stride;
      for (int64_t b0 = t0; b0 < t1; b0 += blk) {
        const int64_t b1 = std::min(t1, b0 + blk);
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t n0 = p * kPanel, nv = panel_nv(a.N, p);
          tile.panel = panels + p * pb;
          tile.bias = a.bias ? a.bias + n0 : nullptr;
          tile.ncols = std::min(kPanel, a.N - n0);
          for (int64_t tt = b0; tt < b1; ++tt) {
            const int64_t m0 = tt * kMR, mr = std::min<int64_t>(kMR, a.M - m0);
            for (int64_t i = 0; i < mr; ++i) tile.x[i] = ws + (m0 + i) * Kp;
            tile.row_scale = row_scale + m0;
            tile.out = static_cast<char*>(a.out) + (m0 * a.out_row_stride + n0) * esize;
            tab[mr][nv](tile);
          }
        }
      }
    }
  }
}

}  // namespace i8gm
}  // namespace cpu
}  // namespace llmkern
