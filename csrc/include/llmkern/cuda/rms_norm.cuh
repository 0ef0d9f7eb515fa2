// rms_norm on CUDA, optionally fused with the residual add (llmkern/ops/rms_norm.py has the semantics).
// Torch-free.
//
// One CTA of kRmsThreads threads per row. Pass 1 forms h = x + residual rounded once to x's dtype (the
// fp32 sum of two values that fp32 holds exactly, correctly rounded, then rounded to bf16/fp16: the
// reference's bits) and stores it, and sums h^2 in fp32; a block reduction gives inv = 1 / sqrt(mean + eps).
// Pass 2 re-reads h (the values this thread wrote, or x) and stores y = h * inv * weight rounded to x's
// dtype. Rows go through 16-byte vectors when every row pointer is 16-byte aligned and N fills whole
// vectors, else element by element.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "llmkern/cuda/kv_rotary_common.cuh"
#include "llmkern/cuda/params.h"

namespace llmkern {
namespace cuda {

constexpr int kRmsThreads = 256;

// VE elements at element offset i of p (dtype dt) -> fp32; VE = 16 / dtype size when vectorized, or 1.
template <int VE>
__device__ __forceinline__ void load_vec(const void* p, int64_t i, int dt, float* x) {
  if (VE == 1) {
    x[0] = load_f32(p, i, dt);
  } else if (dt == kF32) {
    const float4 u = ld_vec<float4>(static_cast<const float*>(p) + i);
    x[0] = u.x, x[1] = u.y, x[2] = u.z, x[3] = u.w;
  } else {
    const uint4 u = ld_vec<uint4>(static_cast<const uint16_t*>(p) + i);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      x[2 * k] = dt == kBF16 ? bf16_bits_to_f32(uint16_t(w[k] & 0xffffu)) : f16_bits_to_f32(uint16_t(w[k] & 0xffffu));
      x[2 * k + 1] = dt == kBF16 ? bf16_bits_to_f32(uint16_t(w[k] >> 16)) : f16_bits_to_f32(uint16_t(w[k] >> 16));
    }
  }
}

template <int VE>
__device__ __forceinline__ void store_vec(void* p, int64_t i, int dt, const float* x) {
  if (VE == 1) {
    store_f32(p, i, dt, x[0]);
  } else if (dt == kF32) {
    st_vec(static_cast<float*>(p) + i, make_float4(x[0], x[1], x[2], x[3]));
  } else {
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint16_t a = dt == kBF16 ? f32_to_bf16_bits(x[2 * k]) : f32_to_f16_bits(x[2 * k]);
      const uint16_t b = dt == kBF16 ? f32_to_bf16_bits(x[2 * k + 1]) : f32_to_f16_bits(x[2 * k + 1]);
      w[k] = uint32_t(a) | (uint32_t(b) << 16);
    }
    st_vec(static_cast<uint16_t*>(p) + i, make_uint4(w[0], w[1], w[2], w[3]));
  }
}

// fp32 value rounded to dtype dt and back (exact).
__device__ __forceinline__ float round_f32_to(float v, int dt) {
  if (dt == kBF16) return bf16_bits_to_f32(f32_to_bf16_bits(v));
  if (dt == kF16) return f16_bits_to_f32(f32_to_f16_bits(v));
  return v;
}

// VE: elements per access of x/h/y (and of residual, which then has x's element size). The weight is
// read element by element (it is small and stays in cache).
template <int VE>
__global__ void __launch_bounds__(kRmsThreads) rms_norm_kernel(const RmsNormParams p) {
  __shared__ float s_part[kRmsThreads / 32];
  const int64_t m = blockIdx.x;
  const int64_t N = p.N;
  const int64_t xo = m * p.x_stride, ro = m * p.r_stride, yo = m * N;
  float ss = 0.0f;
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * VE; i < N; i += static_cast<int64_t>(kRmsThreads) * VE) {
    float x[VE];
    load_vec<VE>(p.x, xo + i, p.x_dtype, x);
    if (p.residual) {
      float r[VE];
      load_vec<VE>(p.residual, ro + i, p.r_dtype, r);
#pragma unroll
      for (int e = 0; e < VE; ++e) x[e] = round_f32_to(x[e] + r[e], p.x_dtype);
      store_vec<VE>(p.h, yo + i, p.x_dtype, x);
    }
#pragma unroll
    for (int e = 0; e < VE; ++e) ss = fmaf(x[e], x[e], ss);
  }
  ss = warp_sum(ss);
  if ((threadIdx.x & 31) == 0) s_part[threadIdx.x >> 5] = ss;
  __syncthreads();
  float tot = 0.0f;
#pragma unroll
  for (int w = 0; w < kRmsThreads / 32; ++w) tot += s_part[w];
  const float inv = 1.0f / sqrtf(tot / static_cast<float>(N) + p.eps);
  const void* hsrc = p.residual ? p.h : p.x;
  const int64_t ho = p.residual ? yo : xo;
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * VE; i < N; i += static_cast<int64_t>(kRmsThreads) * VE) {
    float x[VE];
    load_vec<VE>(hsrc, ho + i, p.x_dtype, x);  // this thread's own h stores (same i), or x
#pragma unroll
    for (int e = 0; e < VE; ++e) x[e] = x[e] * inv * load_f32(p.weight, i + e, p.w_dtype);
    store_vec<VE>(p.y, yo + i, p.x_dtype, x);
  }
}

inline cudaError_t launch_rms_norm(const RmsNormParams& p, cudaStream_t stream) {
  if (p.M <= 0 || p.N <= 0) return cudaSuccess;
  const int esz = dtype_bytes(p.x_dtype), ve = 16 / esz;
  auto aligned = [](const void* q) { return (reinterpret_cast<uintptr_t>(q) & 15) == 0; };
  bool vec = p.N % ve == 0 && aligned(p.x) && aligned(p.y) && (p.x_stride * esz) % 16 == 0;
  if (p.residual)
    vec = vec && p.r_dtype == p.x_dtype && aligned(p.residual) && aligned(p.h) && (p.r_stride * esz) % 16 == 0;
  const unsigned grid = static_cast<unsigned>(p.M);
  if (!vec)
    rms_norm_kernel<1><<<grid, kRmsThreads, 0, stream>>>(p);
  else if (ve == 4)
    rms_norm_kernel<4><<<grid, kRmsThreads, 0, stream>>>(p);
  else
    rms_norm_kernel<8><<<grid, kRmsThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace llmkern
