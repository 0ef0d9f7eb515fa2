// int4_linear CUDA kernels (torch-free): y[M, N] = x[M, K] @ dequant(qweight)^T (+ bias), W4A16.
// Semantics: llmkern/ops/int4_linear.py; canonical layout (llmkern/formats/README.md): qweight uint8
// [N, K / 2] (byte j of row n: q[n, 2j] low nibble, q[n, 2j + 1] high nibble), scales and offsets fp32
// [N, K / G], G in {32, 64, 128}, dequant(q) = q * scale + offset.
//
// Kernels (launchers: csrc/cuda/int4_linear.cu):
// - gemv_kernel     any M (rows in blocks of MR), fp32 math. Each warp streams kCols weight rows with
//                   16-byte loads (32 weights = one chunk, inside one group since G % 32 == 0),
//                   unpacks the nibbles to fp32 exactly and accumulates per chunk
//                   scale * sum(x * q) + offset * sum(x) (= sum(x * (q * scale + offset)) up to fp32
//                   rounding), warp-reduces. Split-K over gridDim.z: each split writes fp32 partials
//                   ws[split, M, N] and reduce_kernel sums them in split order (deterministic), adds
//                   the bias and casts; with one split the kernel stores the output directly.
// - dequant_kernel  qweight -> x's dtype (canonical fp32 q * scale, then + offset, rounded once), for
//                   the large-M route (the adapter multiplies with cuBLAS through torch).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "llmkern/cuda/linear_common.cuh"

namespace llmkern {
namespace cuda {
namespace int4_linear {

constexpr int kWarps = 4;
constexpr int kCols = 2;  // weight rows per warp
constexpr int kColsPerCta = kWarps * kCols;
constexpr int kChunkK = 32;  // k per 16-byte chunk of a qweight row

struct GemvArgs {
  const void* x;  // [M, K] of T, row stride ldx, 16-byte aligned rows
  int64_t ldx;
  int M, K, N;
  const uint8_t* qw;     // [N, K / 2]
  const float* scales;   // [N, ngroups]
  const float* offsets;  // [N, ngroups]
  int ngroups, group;
  const float* bias;     // [N] fp32 or null (only read when splits == 1)
  void* out;             // splits == 1: [M, N] in out_dtype, row stride ldo; else fp32 ws [splits, M, N]
  int64_t ldo;
  XType out_dtype;
  int split_chunks;      // chunks (32 k) per split
};

// Eight nibbles of w (k order: low nibble of byte 0, high nibble of byte 0, low of byte 1, ...) -> fp32.
__device__ __forceinline__ void nib8_to_f32(uint32_t w, float* q) {
  const uint32_t lo = w & 0x0F0F0F0Fu, hi = (w >> 4) & 0x0F0F0F0Fu;
  q[0] = byte_to_f32<0>(lo);
  q[1] = byte_to_f32<0>(hi);
  q[2] = byte_to_f32<1>(lo);
  q[3] = byte_to_f32<1>(hi);
  q[4] = byte_to_f32<2>(lo);
  q[5] = byte_to_f32<2>(hi);
  q[6] = byte_to_f32<3>(lo);
  q[7] = byte_to_f32<3>(hi);
}

// Weights (16 bytes = 32 nibbles), scale and offset of chunk `ch` of each of the warp's rows.
__device__ __forceinline__ void load_chunk(const GemvArgs& a, const uint8_t* const (&wrow)[kCols],
                                           const float* const (&srow)[kCols], const float* const (&orow)[kCols],
                                           int ch, uint4 (&wv)[kCols], float (&s)[kCols], float (&o)[kCols]) {
  const int k = ch * kChunkK;
  const int g = k / a.group;
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    wv[c] = __ldg(reinterpret_cast<const uint4*>(wrow[c] + k / 2));
    s[c] = __ldg(srow[c] + g);
    o[c] = __ldg(orow[c] + g);
  }
}

// acc[i][c] += scale * sum(x * q) + offset * sum(x) over the 32 k of one chunk starting at k.
template <typename T, int MR>
__device__ __forceinline__ void chunk_fma(const T* const (&xrow)[MR], int k, const uint4 (&wv)[kCols],
                                          const float (&s)[kCols], const float (&o)[kCols],
                                          float (&acc)[MR][kCols]) {
  // sum of x over the chunk, per row (the offset's coefficient)
  float sx[MR];
#pragma unroll
  for (int i = 0; i < MR; ++i) {
    float t = 0.0f;
#pragma unroll
    for (int j = 0; j < kChunkK; j += 8) {
      float xv[8];
      load8_f32<T>(xrow[i] + k + j, xv);
#pragma unroll
      for (int e = 0; e < 8; ++e) t += xv[e];
    }
    sx[i] = t;
  }
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    float q[kChunkK];
    nib8_to_f32(wv[c].x, q);
    nib8_to_f32(wv[c].y, q + 8);
    nib8_to_f32(wv[c].z, q + 16);
    nib8_to_f32(wv[c].w, q + 24);
#pragma unroll
    for (int i = 0; i < MR; ++i) {
      float d = 0.0f;
#pragma unroll
      for (int j = 0; j < kChunkK; j += 8) {
        float xv[8];
        load8_f32<T>(xrow[i] + k + j, xv);
#pragma unroll
        for (int e = 0; e < 8; ++e) d = fmaf(xv[e], q[j + e], d);
      }
      acc[i][c] = fmaf(s[c], d, fmaf(o[c], sx[i], acc[i][c]));
    }
  }
}

// Grid (ceil(N / kColsPerCta), ceil(M / MR), splits), kWarps * 32 threads.
template <typename T, int MR>
__global__ void __launch_bounds__(kWarps * 32) gemv_kernel(GemvArgs a) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int n0 = (blockIdx.x * kWarps + warp) * kCols;
  const int m0 = blockIdx.y * MR;
  if (n0 >= a.N) return;  // whole warp leaves together
  const T* x = static_cast<const T*>(a.x);
  const int row_bytes = a.K / 2;
  const uint8_t* wrow[kCols];
  const float* srow[kCols];
  const float* orow[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    const int n = min(n0 + c, a.N - 1);  // out-of-range columns compute row N-1 and are not stored
    wrow[c] = a.qw + int64_t(n) * row_bytes;
    srow[c] = a.scales + int64_t(n) * a.ngroups;
    orow[c] = a.offsets + int64_t(n) * a.ngroups;
  }
  const T* xrow[MR];
#pragma unroll
  for (int i = 0; i < MR; ++i) xrow[i] = x + int64_t(min(m0 + i, a.M - 1)) * a.ldx;
  float acc[MR][kCols];
#pragma unroll
  for (int i = 0; i < MR; ++i)
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[i][c] = 0.0f;

  const int chunks = a.K / kChunkK;
  const int ch_begin = blockIdx.z * a.split_chunks;
  const int ch_end = min(chunks, ch_begin + a.split_chunks);
  // Two chunks per lane and iteration (32 chunks apart), both chunks' weights, scales and offsets
  // loaded before either is used: twice the bytes in flight per warp of a one-chunk loop.
  for (int ch = ch_begin + lane; ch < ch_end; ch += 64) {
    const bool second = ch + 32 < ch_end;
    uint4 wv[2][kCols];
    float s[2][kCols], o[2][kCols];
    load_chunk(a, wrow, srow, orow, ch, wv[0], s[0], o[0]);
    if (second) load_chunk(a, wrow, srow, orow, ch + 32, wv[1], s[1], o[1]);
    chunk_fma<T, MR>(xrow, ch * kChunkK, wv[0], s[0], o[0], acc);
    if (second) chunk_fma<T, MR>(xrow, (ch + 32) * kChunkK, wv[1], s[1], o[1], acc);
  }
  const bool split = gridDim.z > 1;
#pragma unroll
  for (int i = 0; i < MR; ++i) {
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      float v = warp_sum(acc[i][c]);
      const int m = m0 + i, n = n0 + c;
      if (lane == i * kCols + c && m < a.M && n < a.N) {
        if (split) {
          static_cast<float*>(a.out)[(int64_t(blockIdx.z) * a.M + m) * a.N + n] = v;
        } else {
          if (a.bias) v += a.bias[n];
          store_out(a.out, int64_t(m) * a.ldo + n, a.out_dtype, v);
        }
      }
    }
  }
}

// out[m, n] = sum_{s < splits} ws[s, m, n] (in split order) + bias[n], cast to out_dtype (row stride ldo).
__global__ void __launch_bounds__(256) reduce_kernel(const float* __restrict__ ws, int splits, int M, int N,
                                                     const float* __restrict__ bias, void* out, int64_t ldo,
                                                     XType out_dtype) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t MN = int64_t(M) * N;
  if (i >= MN) return;
  float v = 0.0f;
  for (int s = 0; s < splits; ++s) v += ws[s * MN + i];
  const int64_t m = i / N, n = i % N;
  if (bias) v += bias[n];
  store_out(out, m * ldo + n, out_dtype, v);
}

// out[n, k] = T(q * scale + offset) (fp32 multiply, then fp32 add, then one rounding to T); a chunk of
// 32 weights per thread.
template <typename T>
__global__ void __launch_bounds__(256) dequant_kernel(const uint8_t* __restrict__ qw, const float* __restrict__ scales,
                                                      const float* __restrict__ offsets, int ngroups, int group,
                                                      int N, int K, T* __restrict__ out) {
  const int64_t chunk = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t per_row = K / kChunkK;
  if (chunk >= int64_t(N) * per_row) return;
  const int64_t n = chunk / per_row;
  const int k = int(chunk % per_row) * kChunkK;
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(qw + n * (K / 2) + k / 2));
  float q[kChunkK];
  nib8_to_f32(v.x, q);
  nib8_to_f32(v.y, q + 8);
  nib8_to_f32(v.z, q + 16);
  nib8_to_f32(v.w, q + 24);
  const float s = __ldg(scales + n * ngroups + k / group), o = __ldg(offsets + n * ngroups + k / group);
  T* dst = out + n * K + k;
#pragma unroll
  for (int j = 0; j < kChunkK; ++j) dst[j] = from_f32<T>(__fadd_rn(__fmul_rn(q[j], s), o));
}

}  // namespace int4_linear
}  // namespace cuda
}  // namespace llmkern
