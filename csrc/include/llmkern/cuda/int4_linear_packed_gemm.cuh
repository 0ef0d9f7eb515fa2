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
// CTA: BM = 64 WARPS_M rows of x by BN = 128 weight rows; warps WARPS_M x 4, warp tile 64 m (8 mma column
// blocks) x 32 n (2 weight tiles): each 8-byte x load feeds 2 mmas, each dequantized fragment 8. Weight
// fragments and scales are loaded kPrefetch chunks ahead into registers. 1-D grid in grouped raster order.
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
constexpr int kGemmWarpsN = 4;   // warps along n (2 tiles each)
constexpr int kGemmStages = 4;   // x tiles in flight (one chunk = 32 k each)
constexpr int kPrefetch = 4;     // chunks of weight fragments held in registers ahead of use

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

// A lane's weight fragments and scales of one chunk for its warp's 2 tiles.
struct WChunk {
  uint2 w[2];
  float4 sc[2];
};

// The 4 A registers of one k16 step from one packed word: canonical fp32 q * s + o, rounded once to T.
// Nibble (r, e) of the word (bits 4 r + 16 e) is byte (r / 2) + 2 e of lo (r even) or hi (r odd).
template <typename T>
__device__ __forceinline__ void dequant_word(uint32_t word, const float4& sc, uint32_t (&a)[4]) {
  const uint32_t lo = word & 0x0F0F0F0Fu, hi = (word >> 4) & 0x0F0F0F0Fu;
  const auto dq = [](float q, float s, float o) { return __fadd_rn(__fmul_rn(q, s), o); };
  a[0] = pack2<T>(dq(byte_to_f32<0>(lo), sc.x, sc.y), dq(byte_to_f32<2>(lo), sc.x, sc.y));  // row g,     k 4t, 4t+1
  a[1] = pack2<T>(dq(byte_to_f32<0>(hi), sc.z, sc.w), dq(byte_to_f32<2>(hi), sc.z, sc.w));  // row g + 8
  a[2] = pack2<T>(dq(byte_to_f32<1>(lo), sc.x, sc.y), dq(byte_to_f32<3>(lo), sc.x, sc.y));  // row g,     k 4t+2, +3
  a[3] = pack2<T>(dq(byte_to_f32<1>(hi), sc.z, sc.w), dq(byte_to_f32<3>(hi), sc.z, sc.w));  // row g + 8
}

template <typename T, int WARPS_M, bool kS16>
__global__ void __launch_bounds__(WARPS_M* kGemmWarpsN * 32) packed_gemm_kernel(GemmArgs<T> a) {
  constexpr int kThreads = WARPS_M * kGemmWarpsN * 32;
  constexpr int BM = 64 * WARPS_M;
  constexpr int kMB = 8;  // mma column blocks (8 rows m) per warp
  __shared__ __align__(128) int8_t smem[kGemmStages][BM * kTileRowBytes];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, t = lane % 4;
  const int wm = warp / kGemmWarpsN, wn = warp % kGemmWarpsN;
  int tile_m, tile_n;
  grouped_raster(a.M, a.N, BM, kGemmBN, blockIdx.x, tile_m, tile_n);
  const int m_base = tile_m * BM;
  // This CTA's chunks [kc0, kc0 + KT) (split-K: blockIdx.y's share).
  const int kc0 = a.ws ? blockIdx.y * (a.k_split / kChunkK) : 0;
  const int KT = a.ws ? min(a.K / kChunkK - kc0, a.k_split / kChunkK) : a.K / kChunkK;
  const int KT_all = a.K / kChunkK;  // (the packed layout's chunks per tile)
  const int ntiles = (a.N + kCols - 1) / kCols;
  const int tile0 = tile_n * (kGemmBN / kCols) + 2 * wn;  // this warp's first weight tile

  // x chunk kt -> stage s (zero rows past M).
  auto load_x = [&](int s, int kt) {
#pragma unroll
    for (int i = tid; i < BM * 4; i += kThreads) {
      const int r = i / 4, c = i % 4;
      const int gm = m_base + r;
      const bool ok = gm < a.M;
      const T* src = ok ? a.x + int64_t(gm) * a.ldx + (kc0 + kt) * kChunkK + c * 8 : a.x;
      cp_async16(smem_u32(smem[s] + xswz(r, c)), src, ok ? 16 : 0);
    }
  };
  // Weight fragments + scales of chunk kt for both tiles (zeros for tiles past N).
  auto load_w = [&](int kt, WChunk& wc) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int tile = tile0 + j;
      wc.w[j] = make_uint2(0, 0);
      wc.sc[j] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (tile < ntiles && kt < KT) {
        wc.w[j] = __ldg(a.qp + (int64_t(tile) * KT_all + kc0 + kt) * 32 + lane);
        wc.sc[j] = load_scales<kS16>(a.sp, (int64_t(tile) * a.ngroups + ((kc0 + kt) >> a.group_shift)) * 8 + g);
      }
    }
  };

  float acc[2][kMB][4];
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int mb = 0; mb < kMB; ++mb)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[j][mb][e] = 0.0f;

#pragma unroll
  for (int s = 0; s < kGemmStages - 1; ++s) {
    if (s < KT) load_x(s, s);
    cp_async_commit();
  }
  WChunk wq[kPrefetch];
#pragma unroll
  for (int p = 0; p < kPrefetch; ++p) load_w(p, wq[p]);

  for (int kt0 = 0; kt0 < KT; kt0 += kPrefetch) {
#pragma unroll
    for (int p = 0; p < kPrefetch; ++p) {
      const int kt = kt0 + p;
      if (kt >= KT) break;  // (uniform across the CTA)
      cp_async_wait<kGemmStages - 2>();
      // Chunk kt's x tile landed (this thread's copies); the barrier makes every thread's copies visible and
      // guarantees that every warp is done with the stage refilled next (read in iteration kt - 1).
      __syncthreads();
      const int nk = kt + kGemmStages - 1;
      if (nk < KT) load_x(nk % kGemmStages, nk);
      cp_async_commit();

      uint32_t af[2][2][4];  // [tile][k16 step][reg]
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        dequant_word<T>(wq[p].w[j].x, wq[p].sc[j], af[j][0]);
        dequant_word<T>(wq[p].w[j].y, wq[p].sc[j], af[j][1]);
      }
      load_w(kt + kPrefetch, wq[p]);  // in flight during this chunk's and the next ones' MMAs

      const int8_t* xs = smem[kt % kGemmStages];
#pragma unroll
      for (int mb = 0; mb < kMB; ++mb) {
        const int r = wm * 64 + mb * 8 + g;
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          // x[r][16 s + 4 t .. + 4]: 16-byte chunk 2 s + t / 2, bytes 8 (t % 2) .. + 8
          const uint2 b = *reinterpret_cast<const uint2*>(xs + xswz(r, 2 * s + t / 2) + 8 * (t % 2));
#pragma unroll
          for (int j = 0; j < 2; ++j) {
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
  for (int j = 0; j < 2; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = (tile0 + j) * kCols + g + 8 * h;
      if (n >= a.N) continue;
      const float bias = a.bias ? a.bias[n] : 0.0f;
#pragma unroll
      for (int mb = 0; mb < kMB; ++mb) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int m = m_base + wm * 64 + mb * 8 + 2 * t + e;
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
