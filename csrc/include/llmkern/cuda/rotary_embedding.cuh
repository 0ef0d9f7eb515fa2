// rotary_embedding on CUDA (llmkern/ops/rotary_embedding.py has the semantics). Torch-free.
//
// One warp per row (a q or k head of one token), kRotWarps rows per CTA. Lane i takes the rotary pairs
// i, i + 32, ...: NeoX pairs (x[i], x[i + R/2]) are read as two coalesced scalars, GPT-J pairs
// (x[2i], x[2i+1]) as one 2-element vector. Each pair is rotated in float64 (exact products) and rounded
// like the reference (bit-exact: llmkern/cuda/kv_rotary_common.cuh); dims R..D-1 are copied.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "llmkern/cuda/kv_rotary_common.cuh"
#include "llmkern/cuda/params.h"

namespace llmkern {
namespace cuda {

constexpr int kRotWarps = 4;

__device__ __forceinline__ void load_pair(const void* p, int64_t i, int dt, float& a, float& b) {
  if (dt == kF32) {
    const float2 u = ld_vec<float2>(static_cast<const float*>(p) + i);
    a = u.x, b = u.y;
  } else {
    const uint32_t w = ld_vec<uint32_t>(static_cast<const uint16_t*>(p) + i);
    a = dt == kBF16 ? bf16_bits_to_f32(uint16_t(w & 0xffffu)) : f16_bits_to_f32(uint16_t(w & 0xffffu));
    b = dt == kBF16 ? bf16_bits_to_f32(uint16_t(w >> 16)) : f16_bits_to_f32(uint16_t(w >> 16));
  }
}

__device__ __forceinline__ void store_pair(void* p, int64_t i, int dt, float a, float b) {
  if (dt == kF32) {
    st_vec(static_cast<float*>(p) + i, make_float2(a, b));
  } else {
    const uint16_t x = dt == kBF16 ? f32_to_bf16_bits(a) : f32_to_f16_bits(a);
    const uint16_t y = dt == kBF16 ? f32_to_bf16_bits(b) : f32_to_f16_bits(b);
    st_vec(static_cast<uint16_t*>(p) + i, uint32_t(x) | (uint32_t(y) << 16));
  }
}

__global__ void __launch_bounds__(kRotWarps * 32) rotary_embedding_kernel(const RotaryParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRotWarps + (threadIdx.x >> 5);
  const int64_t H = p.Hq + p.Hk;
  if (row >= p.T * H) return;
  const int64_t t = row / H, hh = row % H;
  const bool is_q = hh < p.Hq;
  const int64_t h = is_q ? hh : hh - p.Hq;
  const void* src = is_q ? p.q : p.k;
  void* dst = is_q ? p.q_out : p.k_out;
  const int dt = is_q ? p.q_dtype : p.k_dtype;
  const int64_t in = t * (is_q ? p.q_st : p.k_st) + h * (is_q ? p.q_sh : p.k_sh);
  const int64_t out = (t * (is_q ? p.Hq : p.Hk) + h) * p.D;
  const float* cs = p.cos_sin + p.positions[t] * p.R;
  const int R = static_cast<int>(p.R), half = R / 2;
  // Pair loads as one vector need the pair's first element at an even offset of an aligned row.
  const bool vec_pairs = p.interleaved && (in % 2) == 0 &&
                         (reinterpret_cast<uintptr_t>(src) % (2 * dtype_bytes(dt))) == 0;
  const bool vec_out = p.interleaved && (out % 2) == 0 && (reinterpret_cast<uintptr_t>(dst) % (2 * dtype_bytes(dt))) == 0;
  for (int i = lane; i < half; i += 32) {
    int ia, ib;
    rotary_pair_index(i, R, p.interleaved, ia, ib);
    float a, b;
    if (vec_pairs) {
      load_pair(src, in + ia, dt, a, b);
    } else {
      a = load_f32(src, in + ia, dt);
      b = load_f32(src, in + ib, dt);
    }
    rotate_pair(a, b, cs[i], cs[half + i], dt);
    if (vec_out) {
      store_pair(dst, out + ia, dt, a, b);
    } else {
      store_f32(dst, out + ia, dt, a);
      store_f32(dst, out + ib, dt, b);
    }
  }
  // Dims R..D-1 pass through unchanged (raw bits).
  const int esz = dtype_bytes(dt);
  for (int64_t d = R + lane; d < p.D; d += 32) {
    if (esz == 4)
      static_cast<uint32_t*>(dst)[out + d] = static_cast<const uint32_t*>(src)[in + d];
    else
      static_cast<uint16_t*>(dst)[out + d] = static_cast<const uint16_t*>(src)[in + d];
  }
}

inline cudaError_t launch_rotary_embedding(const RotaryParams& p, cudaStream_t stream) {
  const int64_t rows = p.T * (p.Hq + p.Hk);
  if (rows <= 0) return cudaSuccess;
  const int64_t blocks = (rows + kRotWarps - 1) / kRotWarps;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  rotary_embedding_kernel<<<static_cast<unsigned>(blocks), kRotWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace llmkern
