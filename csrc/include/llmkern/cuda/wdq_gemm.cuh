// Weight-dequantizing tensor-core GEMM (torch-free) for W8A16 and W4A16 at larger M, 16-bit x:
//   y[M, N] = x[M, K] @ dequant(w)^T (+ bias), x and y bf16 or fp16, fp32 accumulation.
//
// Per pipeline stage (kMmaStages = 3): the x tile [BM][32 elements] comes in by cp.async (zero-filled
// outside M / K); the weight tile [BN][32 k] is loaded from global into registers kWDepth - 1 iterations
// before it is dequantized (a ring of kWDepth register buffers), dequantized in registers and stored to shared
// memory as 16-bit values; both tiles use the 64-byte-row swizzled layout of mma_common.cuh and are read with
// ldmatrix.x4 into mma.sync m16n8k16 fragments.
// Split-K (Args::ws set): CTA (tile, blockIdx.y = split) sums k in [split * k_split, + k_split) and writes
// its fp32 partial (channel scale applied, no bias) to ws[split, M, N]; a reduction kernel sums the splits in
// order, adds the bias and casts (deterministic).
// Weight formats (kFmt):
//   kInt8Channel  int8 [N, K], scale [N]: the tile holds q itself (exact in bf16/fp16), the epilogue
//                 multiplies by the channel scale;
//   kInt8Group    int8 [N, K], scale [N, K / G] (G % 16 == 0): the tile holds x_dtype(q * scale);
//   kInt4         canonical int4, scales/offsets [N, K / G]: the tile holds x_dtype(q * scale + offset)
//                 (fp32 multiply, fp32 add, one rounding; the Triton kernel's dequantization).
// Requirements (checked by the launchers): K % 16 == 0 (int4: K % 32 == 0), 16-byte aligned rows.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "llmkern/cuda/linear_common.cuh"
#include "llmkern/cuda/mma_common.cuh"

namespace llmkern {
namespace cuda {
namespace wdq {

enum Fmt : int { kInt8Channel = 0, kInt8Group = 1, kInt4 = 2 };

constexpr int kBK = kTileRowBytes / 2;  // 32 k (16-bit elements) per stage: two m16n8k16 steps

template <typename T>
struct Args {
  const T* x;  // [M, K], row stride ldx
  int64_t ldx;
  int M, N, K;
  const void* w;         // int8 [N, K] or uint8 [N, K / 2] (int4)
  const float* scale;    // [N] (kInt8Channel) or [N, ngroups]
  const float* offset;   // [N, ngroups] (kInt4)
  int ngroups, group;
  const float* bias;     // [N] fp32 or null
  T* out;                // [M, N], row stride ldo
  int64_t ldo;
  float* ws = nullptr;   // split-K: fp32 partials [gridDim.y, M, N] (out untouched); null: one split
  int k_split = 0;       // k per split (a multiple of kSplitKUnit), when ws is set
};

// Split-K ranges are multiples of this many k (one wgmma stage, two mma.sync stages), so that no k tile of either
// GEMM straddles two splits.
constexpr int kSplitKUnit = 64;
// Weight-piece register buffers: a piece is loaded kWDepth - 1 iterations before it is dequantized. (The first
// GPU run measured one global-load latency per k tile when the loads were issued in the iteration that
// dequantized them: ~1.2 us per tile, docs/notes/gpu-run-2026-11-29.md.)
constexpr int kWDepth = 3;

// The raw bytes of one weight piece (16 consecutive k of one row) and its group's scale / offset.
template <int kFmt>
struct Piece {
  uint4 raw;  // int8: 16 bytes; int4: 8 bytes in raw.x, raw.y
  float s, o;
};

// Where one thread's piece of every k tile comes from: row n's weights, scales, offsets at the piece's k offset
// (0 or 16) within the tile; set up once per CTA, so that a tile's load is its k tile index times a stride.
template <int kFmt>
struct PieceSrc {
  const uint8_t* w;   // the row's bytes at k = k_first (int4: 2 values per byte)
  const float* s;     // the row's scales (kInt8Channel: unused)
  const float* o;     // the row's offsets (kInt4)
  int k_first;        // k of the piece in the CTA's first k tile
  bool ok;            // n < N
};

template <typename T, int kFmt>
__device__ __forceinline__ PieceSrc<kFmt> piece_src(const Args<T>& a, int n, int k_first) {
  PieceSrc<kFmt> q;
  q.ok = n < a.N;
  const int64_t row = q.ok ? n : 0;
  constexpr int kBytesPerK2 = kFmt == kInt4 ? 1 : 2;  // bytes per 2 k
  q.w = static_cast<const uint8_t*>(a.w) + (row * a.K + k_first) * kBytesPerK2 / 2;
  q.s = a.scale + row * a.ngroups;
  q.o = kFmt == kInt4 ? a.offset + row * a.ngroups : nullptr;
  q.k_first = k_first;
  return q;
}

// The piece of the CTA's k tile kt (k = k_first + kt * kBK); zeros past N / K or when `live` is false (a tile
// past the CTA's range: read by nothing).
template <typename T, int kFmt>
__device__ __forceinline__ void load_piece(const Args<T>& a, const PieceSrc<kFmt>& q, int kt, bool live,
                                           Piece<kFmt>& p) {
  p.raw = make_uint4(0, 0, 0, 0);
  p.s = 0.0f;
  p.o = 0.0f;
  const int k = q.k_first + kt * kBK;
  if (!(live && q.ok && k < a.K)) return;  // zeros: contributes nothing
  if constexpr (kFmt == kInt4) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(q.w + kt * (kBK / 2)));
    p.raw.x = v.x;
    p.raw.y = v.y;
    const int grp = k >> (__ffs(a.group) - 1);  // (int4 groups are 32, 64 or 128: a shift, not a division)
    p.s = __ldg(q.s + grp);
    p.o = __ldg(q.o + grp);
  } else {
    p.raw = __ldg(reinterpret_cast<const uint4*>(q.w + kt * kBK));
    if constexpr (kFmt == kInt8Group) p.s = __ldg(q.s + k / a.group);
  }
}

// Dequantizes a piece into 8 words (16 values of T) for shared memory.
template <typename T, int kFmt>
__device__ __forceinline__ void dequant_piece(const Piece<kFmt>& p, uint32_t (&out)[8]) {
  float f[16];
  if constexpr (kFmt == kInt4) {
    const uint32_t w[2] = {p.raw.x, p.raw.y};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const uint32_t lo = w[i] & 0x0F0F0F0Fu, hi = (w[i] >> 4) & 0x0F0F0F0Fu;
      f[8 * i + 0] = byte_to_f32<0>(lo);
      f[8 * i + 1] = byte_to_f32<0>(hi);
      f[8 * i + 2] = byte_to_f32<1>(lo);
      f[8 * i + 3] = byte_to_f32<1>(hi);
      f[8 * i + 4] = byte_to_f32<2>(lo);
      f[8 * i + 5] = byte_to_f32<2>(hi);
      f[8 * i + 6] = byte_to_f32<3>(lo);
      f[8 * i + 7] = byte_to_f32<3>(hi);
    }
#pragma unroll
    for (int j = 0; j < 16; ++j) f[j] = __fadd_rn(__fmul_rn(f[j], p.s), p.o);
  } else {
    s8x4_to_f32(p.raw.x, f[0], f[1], f[2], f[3]);
    s8x4_to_f32(p.raw.y, f[4], f[5], f[6], f[7]);
    s8x4_to_f32(p.raw.z, f[8], f[9], f[10], f[11]);
    s8x4_to_f32(p.raw.w, f[12], f[13], f[14], f[15]);
    if constexpr (kFmt == kInt8Group) {
#pragma unroll
      for (int j = 0; j < 16; ++j) f[j] = __fmul_rn(f[j], p.s);
    }
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) out[j] = pack2<T>(f[2 * j], f[2 * j + 1]);
}

// CTA tile BM x BN, warps WARPS_M x WARPS_N (warp tile (16 MT) x (8 NT)); 1-D grid of
// ceil(M / BM) * ceil(N / BN) CTAs in grouped raster order.
template <typename T, int BM, int BN, int WARPS_M, int WARPS_N, int kFmt>
__global__ void __launch_bounds__(WARPS_M* WARPS_N * 32, 1) wdq_mma_kernel(Args<T> a) {
  constexpr int kThreads = WARPS_M * WARPS_N * 32;
  constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  constexpr int MT = WM / 16, NT = WN / 8;
  constexpr int kPieces = BN * 2 / kThreads;  // weight pieces (16 k of one row) per thread per stage
  static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tile");
  static_assert((BM * 4) % kThreads == 0 && (BN * 2) % kThreads == 0, "loader");
  __shared__ __align__(128) int8_t smem[kMmaStages][(BM + BN) * kTileRowBytes];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  int tile_m, tile_n;
  grouped_raster(a.M, a.N, BM, BN, blockIdx.x, tile_m, tile_n);
  const int m_base = tile_m * BM, n_base = tile_n * BN;
  // This CTA's k tiles [kt0, kt0 + KT) (split-K: blockIdx.y's share; a split range is whole k tiles).
  const int KT_all = (a.K + kBK - 1) / kBK;
  const int kt0 = a.ws ? blockIdx.y * (a.k_split / kBK) : 0;
  const int KT = a.ws ? min(KT_all - kt0, a.k_split / kBK) : KT_all;

  // x tile of stage s <- k tile kt, asynchronously (copies set up once: TileCopies).
  TileCopies<T, BM * 4 / kThreads, 4, kThreads> xc;
  xc.init(a.x, a.ldx, a.M, a.K, m_base, kt0 * kBK, tid, [](int r, int c) { return swz(r, c); });
  auto load_x = [&](int s, int kt) { xc.issue(smem_u32(smem[s]), kt * kBK, a.x); };
  // This thread's weight pieces: row n_base + idx / 2, k offset (idx % 2) * 16 of each tile (idx = tid + i kThreads).
  PieceSrc<kFmt> wsrc[kPieces];
#pragma unroll
  for (int i = 0; i < kPieces; ++i) {
    const int idx = tid + i * kThreads;
    wsrc[i] = piece_src<T, kFmt>(a, n_base + idx / 2, kt0 * kBK + (idx % 2) * 16);
  }
  // Weight pieces of this CTA's k tile kt -> registers (zeros past its range: read by nothing).
  auto load_w = [&](int kt, Piece<kFmt> (&p)[kPieces]) {
#pragma unroll
    for (int i = 0; i < kPieces; ++i) load_piece<T, kFmt>(a, wsrc[i], kt, kt < KT, p[i]);
  };
  // Registers -> dequantized 16-bit weight tile of stage s (row r = idx / 2, chunks 2h and 2h + 1).
  auto store_w = [&](int s, const Piece<kFmt> (&p)[kPieces]) {
    int8_t* sb = smem[s] + BM * kTileRowBytes;
#pragma unroll
    for (int i = 0; i < kPieces; ++i) {
      const int idx = tid + i * kThreads;
      const int r = idx / 2, h = idx % 2;
      uint32_t v[8];
      dequant_piece<T, kFmt>(p[i], v);
      *reinterpret_cast<uint4*>(sb + swz(r, 2 * h)) = make_uint4(v[0], v[1], v[2], v[3]);
      *reinterpret_cast<uint4*>(sb + swz(r, 2 * h + 1)) = make_uint4(v[4], v[5], v[6], v[7]);
    }
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  // pw[kt % kWDepth]: the raw pieces of k tile kt, loaded kWDepth - 1 iterations before iteration kt -
  // (kMmaStages - 1) dequantizes them into their stage.
  Piece<kFmt> pw[kWDepth][kPieces];
#pragma unroll
  for (int s = 0; s < kMmaStages - 1; ++s) {
    if (s < KT) {
      load_x(s, s);
      load_w(s, pw[0]);
      store_w(s, pw[0]);
    }
    cp_async_commit();
  }
#pragma unroll
  for (int d = 0; d < kWDepth - 1; ++d) load_w(kMmaStages - 1 + d, pw[(kMmaStages - 1 + d) % kWDepth]);

  // Unrolled by kWDepth so that every ring index is a compile-time constant (registers, not local memory); as
  // kWDepth == kMmaStages, so is every stage index (kt % kMmaStages == u).
  static_assert(kWDepth == kMmaStages, "stage indices from the unrolled loop");
  for (int kb = 0; kb < KT; kb += kWDepth) {
#pragma unroll
    for (int u = 0; u < kWDepth; ++u) {
      const int kt = kb + u;
      if (kt >= KT) break;  // (uniform across the CTA)
      cp_async_wait<kMmaStages - 2>();
      // x tile kt landed (this thread's copies); the barrier makes every thread's copies and weight
      // stores of tile kt visible, and guarantees every warp is done with the stage refilled below.
      __syncthreads();
      const int nk = kt + kMmaStages - 1;
      const bool refill = nk < KT;
      if (refill) load_x((u + kMmaStages - 1) % kMmaStages, nk);
      cp_async_commit();
      // The pieces of tile nk + kWDepth - 1 go into the buffer tile nk - 1 left (stored last iteration); they
      // are in flight during this and the next kWDepth - 2 iterations' MMAs.
      if (nk + kWDepth - 1 < KT) load_w(nk + kWDepth - 1, pw[(u + kMmaStages - 1 + kWDepth - 1) % kWDepth]);
      const int8_t* sa = smem[u];
      const int8_t* sb = smem[u] + BM * kTileRowBytes;
#pragma unroll
      for (int ks = 0; ks < 2; ++ks) {  // two k16 steps of 32 bytes
        uint32_t af[MT][4], bf[NT][2];
        load_frags<MT, NT>(sa, sb, wm * WM, wn * WN, ks, lane, af, bf);
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            if constexpr (std::is_same<T, __nv_bfloat16>::value) mma_bf16(acc[i][j], af[i], bf[j][0], bf[j][1]);
            else mma_f16(acc[i][j], af[i], bf[j][0], bf[j][1]);
          }
      }
      // The stage being refilled was last read in iteration kt - 1, before this iteration's barrier.
      if (refill) store_w((u + kMmaStages - 1) % kMmaStages, pw[(u + kMmaStages - 1) % kWDepth]);
    }
  }
  cp_async_wait<0>();

  const int col0 = n_base + wn * WN + 2 * (lane % 4);
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = m_base + wm * WM + i * 16 + lane / 4 + h * 8;
      if (m >= a.M) continue;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int n = col0 + j * 8 + e;
          if (n >= a.N) continue;
          float v = acc[i][j][h * 2 + e];
          if constexpr (kFmt == kInt8Channel) v *= __ldg(a.scale + n);
          if (a.ws) {  // split-K partial: the reduction adds the bias
            a.ws[(int64_t(blockIdx.y) * a.M + m) * a.N + n] = v;
            continue;
          }
          if (a.bias) v += a.bias[n];
          a.out[int64_t(m) * a.ldo + n] = from_f32<T>(v);
        }
      }
    }
  }
}

}  // namespace wdq
}  // namespace cuda
}  // namespace llmkern
