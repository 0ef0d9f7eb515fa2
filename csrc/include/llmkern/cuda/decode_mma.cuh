// W4A16 / W8A16 at decode-sized M (2..16 rows, bf16/fp16 x) on tensor cores, reading the canonical
// int4 / int8 layouts (torch-free). "Swap AB": the weights are the 16-row operand of mma.sync m16n8k16 (16 output columns n
// per warp) and x^T is the 8-column operand (8 rows m per mma; two mmas for M 9..16), so no M padding
// to 16 is wasted and the weights are read once whatever M is.
//
// K order inside an mma is free (the dot product does not depend on it) as long as both operands agree.
// Lane (g = lane / 4, t = lane % 4) loads 16 bytes = L consecutive k (int8: L = 16, int4: L = 32) of
// weight rows g and g + 8 at k0 + L t of a 4L-k block, and the L x values of row m = g at the same k.
// mma step s (0 .. L/4 - 1) of the block uses, for "logical" k pair 2t, 2t+1 (A reg0/reg1, B reg0), the
// actual k = k0 + L t + 4 s + {0, 1}: weight pair 2 s of the lane (int4: byte 2 s, low nibble = even k as
// the canonical layout packs it) and x word 2 s; for logical 2t+8, 2t+9 (A reg2/reg3, B reg1), actual
// k0 + L t + 4 s + {2, 3}: pair 2 s + 1 and x word 2 s + 1 (a numpy model of the PTX fragment layouts
// checks this mapping). Dequantization (a lane's L k share one group: int4 G >= 32, int8 G % 16 == 0):
// int4 canonical fp32 q * scale + offset, int8 grouped fp32 q * scale, each rounded once to x's dtype;
// int8 per channel keeps q exact and scales in the epilogue.
//
// CTA: kWarps warps on the same 16 columns, interleaving 64-k blocks; their fp32 fragments are summed in
// shared memory in warp order. Split-K over gridDim.y (fp32 partials ws[split, M, N], summed in order by
// int4_linear::reduce_kernel): deterministic.
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
namespace decode_mma {

enum Fmt : int { kInt8Channel = 0, kInt8Group = 1, kInt4 = 2 };

constexpr int kWarps = 8;
// k per lane and weight row in one block: 16 bytes either way (int8: 16 k, int4: 32 k); a block is the
// 4 lanes' k of a row (int8: 64 k, int4: 128 k) = kLaneK / 4 mma steps.
constexpr int lane_k(int fmt) { return fmt == kInt4 ? 32 : 16; }
constexpr int block_k(int fmt) { return 4 * lane_k(fmt); }
constexpr int kCols = 16;    // output columns (weight rows) per CTA

template <typename T>
struct Args {
  const T* x;  // [M, K], row stride ldx, 16-byte aligned rows
  int64_t ldx;
  int M, N, K;
  const void* w;         // int4: uint8 [N, K / 2]; int8: int8 [N, K]
  const float* scales;   // [N, ngroups] ([N] per channel)
  const float* offsets;  // [N, ngroups] (int4)
  int ngroups, group;
  const float* bias;     // [N] fp32 or null (unsplit only)
  void* out;             // unsplit: T [M, N] row stride ldo; split: fp32 ws [splits, M, N]
  int64_t ldo;
  int split_blocks;      // 64-k blocks per split
};

// Byte kB (0..3) of word w -> the packed pair (dequant(low nibble), dequant(high nibble)) in T.
template <typename T, int kB>
__device__ __forceinline__ uint32_t dq_pair(uint32_t lo, uint32_t hi, float s, float o) {
  const float a = __fadd_rn(__fmul_rn(byte_to_f32<kB>(lo), s), o);
  const float b = __fadd_rn(__fmul_rn(byte_to_f32<kB>(hi), s), o);
  return pack2<T>(a, b);
}

// The 16 packed pairs of a lane's 16 int4 weight bytes (pair j = byte j).
template <typename T>
__device__ __forceinline__ void dq_row4(uint4 w, float s, float o, uint32_t (&p)[16]) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t lo = words[i] & 0x0F0F0F0Fu, hi = (words[i] >> 4) & 0x0F0F0F0Fu;
    p[4 * i + 0] = dq_pair<T, 0>(lo, hi, s, o);
    p[4 * i + 1] = dq_pair<T, 1>(lo, hi, s, o);
    p[4 * i + 2] = dq_pair<T, 2>(lo, hi, s, o);
    p[4 * i + 3] = dq_pair<T, 3>(lo, hi, s, o);
  }
}

// The 8 packed pairs of a lane's 16 int8 weights (pair j = bytes 2j, 2j+1), times s unless per channel.
template <typename T, int kFmt>
__device__ __forceinline__ void dq_row8(uint4 w, float s, uint32_t (&p)[8]) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float f[4];
    s8x4_to_f32(words[i], f[0], f[1], f[2], f[3]);
    if constexpr (kFmt == kInt8Group) {
#pragma unroll
      for (int e = 0; e < 4; ++e) f[e] = __fmul_rn(f[e], s);
    }
    p[2 * i] = pack2<T>(f[0], f[1]);
    p[2 * i + 1] = pack2<T>(f[2], f[3]);
  }
}

// One lane's operands of one block.
template <int MB, int kFmt>
struct Block {
  uint4 wa, wb;  // 16 weight bytes of rows g and g + 8
  float sa, oa, sb, ob;
  uint4 x[MB][lane_k(kFmt) / 8];  // x[m = g + 8 mb][k .. k + lane_k)
};

// Weight bytes, scale and offset of row n at k (zeros outside [0, N) x [0, K)).
template <int kFmt>
__device__ __forceinline__ void load_row(const void* w, const float* scales, const float* offsets, int n, int N,
                                         int k, int K, int ngroups, int group, uint4& wv, float& s, float& o) {
  wv = make_uint4(0, 0, 0, 0);
  s = o = 0.0f;
  if (n >= N || k >= K) return;
  if constexpr (kFmt == kInt4) {
    wv = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint8_t*>(w) + int64_t(n) * (K / 2) + k / 2));
    s = __ldg(scales + int64_t(n) * ngroups + k / group);
    o = __ldg(offsets + int64_t(n) * ngroups + k / group);
  } else {
    wv = __ldg(reinterpret_cast<const uint4*>(static_cast<const int8_t*>(w) + int64_t(n) * K + k));
    if constexpr (kFmt == kInt8Group) s = __ldg(scales + int64_t(n) * ngroups + k / group);
  }
}

template <typename T, int MB, int kFmt>
__device__ __forceinline__ void load_block(const Args<T>& a, int n0, int g, int t, int kb, Block<MB, kFmt>& b) {
  constexpr int kX = lane_k(kFmt) / 8;
  const int k = kb * block_k(kFmt) + lane_k(kFmt) * t;
  const bool kok = k < a.K;
  load_row<kFmt>(a.w, a.scales, a.offsets, n0 + g, a.N, k, a.K, a.ngroups, a.group, b.wa, b.sa, b.oa);
  load_row<kFmt>(a.w, a.scales, a.offsets, n0 + g + 8, a.N, k, a.K, a.ngroups, a.group, b.wb, b.sb, b.ob);
#pragma unroll
  for (int mb = 0; mb < MB; ++mb) {
    const int m = g + 8 * mb;
#pragma unroll
    for (int j = 0; j < kX; ++j) b.x[mb][j] = make_uint4(0, 0, 0, 0);
    if (kok && m < a.M) {
      const uint4* p = reinterpret_cast<const uint4*>(a.x + int64_t(m) * a.ldx + k);
#pragma unroll
      for (int j = 0; j < kX; ++j) b.x[mb][j] = __ldg(p + j);
    }
  }
}

template <typename T, int MB, int kFmt>
__device__ __forceinline__ void mma_block(const Block<MB, kFmt>& b, float (&c)[MB][4]) {
  constexpr int kPairs = lane_k(kFmt) / 2;  // packed weight pairs per row = x words per row
  uint32_t pa[kPairs], pb[kPairs];
  if constexpr (kFmt == kInt4) {
    dq_row4<T>(b.wa, b.sa, b.oa, pa);
    dq_row4<T>(b.wb, b.sb, b.ob, pb);
  } else {
    dq_row8<T, kFmt>(b.wa, b.sa, pa);
    dq_row8<T, kFmt>(b.wb, b.sb, pb);
  }
#pragma unroll
  for (int s = 0; s < kPairs / 2; ++s) {  // mma steps of the block
    const uint32_t afr[4] = {pa[2 * s], pb[2 * s], pa[2 * s + 1], pb[2 * s + 1]};
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
      // x words 2s, 2s+1 of the lane's row: uint4 (2s) / 4, components (2s) % 4 and (2s) % 4 + 1.
      const uint4& xv = b.x[mb][s / 2];
      const uint32_t x0 = (s % 2 == 0) ? xv.x : xv.z;
      const uint32_t x1 = (s % 2 == 0) ? xv.y : xv.w;
      if constexpr (std::is_same<T, __nv_bfloat16>::value) mma_bf16(c[mb], afr, x0, x1);
      else mma_f16(c[mb], afr, x0, x1);
    }
  }
}

// Grid (ceil(N / kCols), splits), kWarps * 32 threads. MB = 1 for M <= 8, 2 for M <= 16.
template <typename T, int MB, int kFmt>
__global__ void __launch_bounds__(kWarps * 32) decode_mma_kernel(Args<T> a) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int n0 = blockIdx.x * kCols;
  const int blocks = (a.K + block_k(kFmt) - 1) / block_k(kFmt);
  const int kb0 = blockIdx.y * a.split_blocks;
  const int kb1 = min(blocks, kb0 + a.split_blocks);

  float c[MB][4];
#pragma unroll
  for (int mb = 0; mb < MB; ++mb)
#pragma unroll
    for (int e = 0; e < 4; ++e) c[mb][e] = 0.0f;

  // Two blocks per iteration, both loaded before either is dequantized (bytes in flight).
  for (int kb = kb0 + warp; kb < kb1; kb += 2 * kWarps) {
    Block<MB, kFmt> b0, b1;
    const bool second = kb + kWarps < kb1;
    load_block<T, MB, kFmt>(a, n0, g, t, kb, b0);
    if (second) load_block<T, MB, kFmt>(a, n0, g, t, kb + kWarps, b1);
    mma_block<T, MB, kFmt>(b0, c);
    if (second) mma_block<T, MB, kFmt>(b1, c);
  }

  __shared__ float red[kWarps][kCols][8 * MB];
  swapab_store<T, kWarps, MB>(red, c, n0, a.M, a.N, kFmt == kInt8Channel ? a.scales : nullptr, a.bias, a.out, a.ldo);
}

}  // namespace decode_mma
}  // namespace cuda
}  // namespace llmkern
