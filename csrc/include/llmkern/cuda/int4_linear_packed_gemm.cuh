// W4A16 GEMM for larger M (bf16 / fp16 x, M > 16) reading the prepacked int4 layout of int4_linear_packed.cuh,
// weights dequantized in registers straight into mma.sync m16n8k16 A fragments (torch-free):
//   y[M, N] = x[M, K] @ dequant(w)^T (+ bias), fp32 accumulation.
//
// Swap AB as in the decode kernel: the accumulator is y^T; a weight tile (16 rows n) is the A operand and 8
// rows m of x are the B operand. A lane's packed uint2 of a chunk (32 k) is its A fragments for the chunk's
// two k16 steps (no shared memory, no ldmatrix for weights); dequantization is the canonical fp32
// q * scale + offset rounded once to x's dtype (as wdq_gemm.cuh and the Triton kernel), so the two GEMMs
// multiply the same 16-bit weights. x tiles come in by cp.async (kStages-deep ring); a lane reads its B words
// x[m][16 s + 4 t .. + 4] (the packed k order) with one 8-byte shared load.
//
// CTA: BM rows of x by BN = 128 weight rows (8 tiles of 16). Every warp covers all BM rows, so each weight is
// dequantized once per CTA: BM = 64, 4 warps of 2 tiles (8 mma column blocks: an 8-byte x load feeds 2 mmas);
// BM = 128, 8 warps of 1 tile (16 column blocks). (Until session 16 BM = 128 ran 2 x 4 warps of 64 rows: both
// warp rows dequantized each weight, and dequantization was ~30% of the loop's instructions.) Weight fragments
// and scales are loaded kPrefetch chunks ahead into registers; x tiles by cp.async from per-thread source
// pointers set up once. 1-D grid in grouped raster order.
// Split-K (GemmArgs::ws set): blockIdx.y sums the chunks of k in [split * k_split, + k_split) and writes its fp32
// partial (no bias) to ws[split, M, N]; the launcher's reduction sums the splits in order.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "llmkern/cuda/int4_linear_packed.cuh"
#include "llmkern/cuda/linear_common.cuh"
#include "llmkern/cuda/mma_common.cuh"

namespace llmkern {
namespace cuda {
namespace int4_packed {

constexpr int kGemmBN = 128;     // weight rows per CTA (8 tiles)
constexpr int kGemmStages = 4;   // x tiles in flight (one chunk = 32 k each)
constexpr int kPrefetch = 4;     // chunks of weight fragments held in registers ahead of use
static_assert(kPrefetch == kGemmStages, "the main loop's stage indices are its unrolled chunk index");

// Weight tiles per warp and threads of the CTA for BM rows of x (see above).
constexpr int gemm_tiles_per_warp(int BM) { return BM == 64 ? 2 : 1; }
constexpr int gemm_threads(int BM) { return kGemmBN / kCols / gemm_tiles_per_warp(BM) * 32; }

template <typename T>
struct GemmArgs {
  const T* x;  // [M, K], row stride ldx, 16-byte aligned rows
  int64_t ldx;
  int M, N, K;
  const uint2* qp;   // packed weights
  const void* sp;    // packed scales
  int ngroups;
  int group_shift;   // log2(G / 32)
  const float* bias; // [N] fp32 or null
  T* out;            // [M, N], row stride ldo
  int64_t ldo;
  float* ws = nullptr;  // split-K: fp32 partials [gridDim.y, M, N] (out untouched); null: one split
  int k_split = 0;      // k per split (a multiple of kChunkK), when ws is set
};

// Byte offset of 16-byte chunk c (0..3) of row r in the [rows][64 B] x tile. The lanes of one 8-byte load
// phase read rows g = 0..3 (or 4..7) at chunks {2 s, 2 s + 1}; XORing the chunk with 2 ((r >> 1) & 1) puts
// rows 0 / 2 (and 1 / 3) on different chunk pairs: the 8 (row, chunk) pairs hit 8 distinct 16-byte bank groups.
__device__ __forceinline__ int xswz(int r, int c) { return r * kTileRowBytes + ((c ^ (((r >> 1) & 1) << 1)) << 4); }

// A lane's weight fragments and scales of one chunk for its warp's TW tiles.
template <int TW>
struct WChunk {
  uint2 w[TW];
  float4 sc[TW];
};

// The 4 A registers of one k16 step from one packed word: canonical fp32 q * s + o, rounded once to T.
// Nibble (r, e) of the word (bits 4 r + 16 e) is byte (r / 2) + 2 e of lo (r even) or hi (r odd).
// kS16 (every scale an fp16 value): q * s is exact in fp32 (4 x 11 significant bits), so one fma rounds exactly
// what the canonical multiply-then-add rounds: the same bits in one instruction instead of two.
template <typename T, bool kS16>
__device__ __forceinline__ void dequant_word(uint32_t word, const float4& sc, uint32_t (&a)[4]) {
  const uint32_t lo = word & 0x0F0F0F0Fu, hi = (word >> 4) & 0x0F0F0F0Fu;
  const auto dq = [](float q, float s, float o) {
    if constexpr (kS16) return __fmaf_rn(q, s, o);
    else return __fadd_rn(__fmul_rn(q, s), o);
  };
  a[0] = pack2<T>(dq(byte_to_f32<0>(lo), sc.x, sc.y), dq(byte_to_f32<2>(lo), sc.x, sc.y));  // row g,     k 4t, 4t+1
  a[1] = pack2<T>(dq(byte_to_f32<0>(hi), sc.z, sc.w), dq(byte_to_f32<2>(hi), sc.z, sc.w));  // row g + 8
  a[2] = pack2<T>(dq(byte_to_f32<1>(lo), sc.x, sc.y), dq(byte_to_f32<3>(lo), sc.x, sc.y));  // row g,     k 4t+2, +3
  a[3] = pack2<T>(dq(byte_to_f32<1>(hi), sc.z, sc.w), dq(byte_to_f32<3>(hi), sc.z, sc.w));  // row g + 8
}

template <typename T, int BM, bool kS16>
__global__ void __launch_bounds__(gemm_threads(BM)) packed_gemm_kernel(GemmArgs<T> a) {
  static_assert(BM == 64 || BM == 128, "64- or 128-row tiles");
  constexpr int kThreads = gemm_threads(BM);
  constexpr int TW = gemm_tiles_per_warp(BM);  // weight tiles per warp
  constexpr int kMB = BM / 8;                   // mma column blocks (8 rows m) per warp: all of the CTA's rows
  constexpr int kStageBytes = BM * kTileRowBytes;
  constexpr int kXCopies = BM * 4 / kThreads;   // 16-byte x copies per thread per chunk
  static_assert(BM * 4 % kThreads == 0, "whole copies per thread");
  __shared__ __align__(128) int8_t smem[kGemmStages * kStageBytes];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, t = lane % 4;
  int tile_m, tile_n;
  grouped_raster(a.M, a.N, BM, kGemmBN, blockIdx.x, tile_m, tile_n);
  const int m_base = tile_m * BM;
  // This CTA's chunks [kc0, kc0 + KT) (split-K: blockIdx.y's share).
  const int kc0 = a.ws ? blockIdx.y * (a.k_split / kChunkK) : 0;
  const int KT = a.ws ? min(a.K / kChunkK - kc0, a.k_split / kChunkK) : a.K / kChunkK;
  const int KT_all = a.K / kChunkK;  // (the packed layout's chunks per tile)
  const int ntiles = (a.N + kCols - 1) / kCols;
  const int tile0 = tile_n * (kGemmBN / kCols) + TW * warp;  // this warp's first weight tile

  // x: this thread's copies of every chunk, row r = i / 4, 16-byte piece c = i % 4 (i = tid + n kThreads): source
  // pointers at chunk 0 of the range, advanced one chunk per load (rows past M copy nothing: 0 source bytes from
  // a.x, which never moves); destinations in stage 0. (Not mma_common.cuh's TileCopies: K % 32 == 0 needs no K
  // bound here, and TileCopies' bound took the 128-row tile past 128 registers into a spill.)
  const T* xsrc[kXCopies];
  int xstep[kXCopies], xbytes[kXCopies];
  uint32_t xdst[kXCopies];
  const uint32_t smem0 = smem_u32(smem);
#pragma unroll
  for (int n = 0; n < kXCopies; ++n) {
    const int i = tid + n * kThreads, r = i / 4, c = i % 4, gm = m_base + r;
    const bool ok = gm < a.M;
    xsrc[n] = ok ? a.x + int64_t(gm) * a.ldx + int64_t(kc0) * kChunkK + c * 8 : a.x;
    xstep[n] = ok ? kChunkK : 0;
    xbytes[n] = ok ? 16 : 0;
    xdst[n] = smem0 + xswz(r, c);
  }
  // The next chunk's x tile -> stage s (a compile-time constant in the main loop).
  auto load_x = [&](int s) {
#pragma unroll
    for (int n = 0; n < kXCopies; ++n) {
      cp_async16(xdst[n] + s * kStageBytes, xsrc[n], xbytes[n]);
      xsrc[n] += xstep[n];
    }
  };
  // Weights: lane's word of chunk kc0 of each tile (tiles past N read nothing and stay zero), scales of each
  // tile's group rows g / g + 8 (sp's group stride 8 entries).
  const uint2* wsrc[TW];
  int64_t ssrc[TW];
  bool wok[TW];
#pragma unroll
  for (int j = 0; j < TW; ++j) {
    const int tile = tile0 + j;
    wok[j] = tile < ntiles;
    wsrc[j] = a.qp + (int64_t(wok[j] ? tile : 0) * KT_all + kc0) * 32 + lane;
    ssrc[j] = int64_t(wok[j] ? tile : 0) * a.ngroups * 8 + g;
  }
  // Weight fragments + scales of chunk kt (0 <= kt; past KT: zeros, nothing read).
  auto load_w = [&](int kt, WChunk<TW>& wc) {
#pragma unroll
    for (int j = 0; j < TW; ++j) {
      wc.w[j] = make_uint2(0, 0);
      wc.sc[j] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (wok[j] && kt < KT) {
        wc.w[j] = __ldg(wsrc[j] + int64_t(kt) * 32);
        wc.sc[j] = load_scales<kS16>(a.sp, ssrc[j] + int64_t((kc0 + kt) >> a.group_shift) * 8);
      }
    }
  };

  float acc[TW][kMB][4];
#pragma unroll
  for (int j = 0; j < TW; ++j)
#pragma unroll
    for (int mb = 0; mb < kMB; ++mb)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[j][mb][e] = 0.0f;

#pragma unroll
  for (int s = 0; s < kGemmStages - 1; ++s) {
    if (s < KT) load_x(s);
    cp_async_commit();
  }
  WChunk<TW> wq[kPrefetch];
#pragma unroll
  for (int p = 0; p < kPrefetch; ++p) load_w(p, wq[p]);

  // This lane's B words x[r][16 s + 4 t .. + 4] of rows r = 8 mb + g: 16-byte piece 2 s + t / 2, bytes 8 (t % 2)
  // .. + 8; offsets within a stage (xswz's XOR depends on bit 1 of r, i.e. of g: the same for every mb).
  const int xb0 = xswz(g, t / 2) + 8 * (t % 2), xb1 = xswz(g, 2 + t / 2) + 8 * (t % 2);

  for (int kt0 = 0; kt0 < KT; kt0 += kPrefetch) {
#pragma unroll
    for (int p = 0; p < kPrefetch; ++p) {  // chunk kt0 + p lives in stage p (kt0 is a multiple of kGemmStages)
      const int kt = kt0 + p;
      if (kt >= KT) break;  // (uniform across the CTA)
      cp_async_wait<kGemmStages - 2>();
      // Chunk kt's x tile landed (this thread's copies); the barrier makes every thread's copies visible and
      // guarantees that every warp is done with the stage refilled next (read in iteration kt - 1).
      __syncthreads();
      if (kt + kGemmStages - 1 < KT) load_x((p + kGemmStages - 1) % kGemmStages);
      cp_async_commit();

      uint32_t af[TW][2][4];  // [tile][k16 step][reg]
#pragma unroll
      for (int j = 0; j < TW; ++j) {
        dequant_word<T, kS16>(wq[p].w[j].x, wq[p].sc[j], af[j][0]);
        dequant_word<T, kS16>(wq[p].w[j].y, wq[p].sc[j], af[j][1]);
      }
      load_w(kt + kPrefetch, wq[p]);  // in flight during this chunk's and the next ones' MMAs

#pragma unroll
      for (int mb = 0; mb < kMB; ++mb) {
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          const int off = (s ? xb1 : xb0) + p * kStageBytes + mb * 8 * kTileRowBytes;  // (xb*: this lane's)
          const uint2 b = *reinterpret_cast<const uint2*>(smem + off);
#pragma unroll
          for (int j = 0; j < TW; ++j) {
            if constexpr (std::is_same<T, __nv_bfloat16>::value) mma_bf16(acc[j][mb], af[j][s], b.x, b.y);
            else mma_f16(acc[j][mb], af[j][s], b.x, b.y);
          }
        }
      }
    }
  }
  cp_async_wait<0>();

  // acc[j][mb]: d0 / d1 -> (n = row g of tile j, m = 8 mb + 2 t / + 1), d2 / d3 -> row g + 8.
#pragma unroll
  for (int j = 0; j < TW; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = (tile0 + j) * kCols + g + 8 * h;
      if (n >= a.N) continue;
      const float bias = a.bias ? a.bias[n] : 0.0f;
#pragma unroll
      for (int mb = 0; mb < kMB; ++mb) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int m = m_base + mb * 8 + 2 * t + e;
          if (m >= a.M) continue;
          if (a.ws) a.ws[(int64_t(blockIdx.y) * a.M + m) * a.N + n] = acc[j][mb][2 * h + e];  // (bias: the reduction)
          else a.out[int64_t(m) * a.ldo + n] = from_f32<T>(acc[j][mb][2 * h + e] + bias);
        }
      }
    }
  }
}

}  // namespace int4_packed
}  // namespace cuda
}  // namespace llmkern
