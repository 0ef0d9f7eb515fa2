// kv_cache_append on CUDA: write new keys/values into a cache by slot, optionally rotating q/k (fused
// rotary) and quantizing to int8 (llmkern/ops/kv_cache_append.py has the semantics). Torch-free.
//
// One warp per row of D values (a q head to rotate in place, a k head or a v head of one token); a
// block of kWarps warps takes kWarps consecutive rows of one token. A row is staged in fp32 in shared
// memory (16-byte loads when the row is 16-byte aligned), rotated there (float64 products, rounded like
// the reference: bit-exact), then stored: a raw 16-byte copy when the cache has the input's dtype and
// nothing is rotated, else cast (round to nearest even) or quantized to int8 with a per-(token, head)
// scale (the rule of llmkern/ops/quant.py, bit-exact).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "llmkern/cuda/kv_rotary_common.cuh"
#include "llmkern/cuda/params.h"

namespace llmkern {
namespace cuda {

constexpr int kAppendWarps = 4;
constexpr int kAppendMaxD = 256;


// Row of D elements of dtype dt at p (element offset `base`) -> fp32 in `row` (lane-strided).
__device__ __forceinline__ void load_row_f32(const void* p, int64_t base, int dt, int D, float* row, int lane) {
  const int esz = dtype_bytes(dt);
  const char* src = static_cast<const char*>(p) + base * esz;
  if ((reinterpret_cast<uintptr_t>(src) & 15) == 0 && (D * esz) % 16 == 0) {
    const int chunks = D * esz / 16, per = 16 / esz;
    for (int c = lane; c < chunks; c += 32) {
      const uint4 u = ld_vec<uint4>(src + 16 * c);
      const uint32_t w[4] = {u.x, u.y, u.z, u.w};
      float* dst = row + c * per;
      if (dt == kF32) {
#pragma unroll
        for (int i = 0; i < 4; ++i) dst[i] = __uint_as_float(w[i]);
      } else if (dt == kBF16) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          dst[2 * i] = bf16_bits_to_f32(uint16_t(w[i] & 0xffffu));
          dst[2 * i + 1] = bf16_bits_to_f32(uint16_t(w[i] >> 16));
        }
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          dst[2 * i] = f16_bits_to_f32(uint16_t(w[i] & 0xffffu));
          dst[2 * i + 1] = f16_bits_to_f32(uint16_t(w[i] >> 16));
        }
      }
    }
    return;
  }
  for (int d = lane; d < D; d += 32) row[d] = load_f32(p, base + d, dt);
}

// fp32 row -> D elements of dtype dt (float types only) at element offset `base` of p.
__device__ __forceinline__ void store_row_f32(void* p, int64_t base, int dt, int D, const float* row, int lane) {
  const int esz = dtype_bytes(dt);
  char* dst = static_cast<char*>(p) + base * esz;
  if ((reinterpret_cast<uintptr_t>(dst) & 15) == 0 && (D * esz) % 16 == 0) {
    const int chunks = D * esz / 16, per = 16 / esz;
    for (int c = lane; c < chunks; c += 32) {
      const float* s = row + c * per;
      uint32_t w[4];
      if (dt == kF32) {
#pragma unroll
        for (int i = 0; i < 4; ++i) w[i] = __float_as_uint(s[i]);
      } else if (dt == kBF16) {
#pragma unroll
        for (int i = 0; i < 4; ++i) w[i] = uint32_t(f32_to_bf16_bits(s[2 * i])) | (uint32_t(f32_to_bf16_bits(s[2 * i + 1])) << 16);
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) w[i] = uint32_t(f32_to_f16_bits(s[2 * i])) | (uint32_t(f32_to_f16_bits(s[2 * i + 1])) << 16);
      }
      st_vec(dst + 16 * c, make_uint4(w[0], w[1], w[2], w[3]));
    }
    return;
  }
  for (int d = lane; d < D; d += 32) store_f32(p, base + d, dt, row[d]);
}

// Raw copy of `bytes` bytes (a row of the same dtype): bit-exact, NaN payloads included.
__device__ __forceinline__ void copy_row(char* dst, const char* src, int bytes, int lane) {
  if (((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & 15) == 0 && bytes % 16 == 0) {
    for (int c = lane; c < bytes / 16; c += 32) st_vec(dst + 16 * c, ld_vec<uint4>(src + 16 * c));
  } else if (((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & 1) == 0 && bytes % 2 == 0) {
    for (int c = lane; c < bytes / 2; c += 32)
      st_vec(dst + 2 * c, ld_vec<uint16_t>(src + 2 * c));
  } else {
    for (int c = lane; c < bytes; c += 32) dst[c] = src[c];
  }
}

// Rotate row[0..R) in place (pairs split among the lanes; each pair is read and written by one lane).
__device__ __forceinline__ void rotate_row(float* row, const float* cs, int R, bool interleaved, int dt, int lane) {
  const int half = R / 2;
  for (int i = lane; i < half; i += 32) {
    int ia, ib;
    rotary_pair_index(i, R, interleaved, ia, ib);
    float a = row[ia], b = row[ib];
    rotate_pair(a, b, cs[i], cs[half + i], dt);
    row[ia] = a;
    row[ib] = b;
  }
}

__global__ void __launch_bounds__(kAppendWarps * 32) kv_cache_append_kernel(KvAppendParams p) {
  __shared__ float rows[kAppendWarps][kAppendMaxD];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = blockIdx.x / p.blocks_per_token;
  const int64_t item = (blockIdx.x % p.blocks_per_token) * kAppendWarps + warp;
  if (item >= p.rows_per_token) return;  // whole warps only: no block-level sync below
  const int64_t b = t / p.S, s = t % p.S;
  const int D = static_cast<int>(p.D);
  const int R = static_cast<int>(p.R);
  const bool rot = p.cos_sin != nullptr;
  const int64_t nq = p.q ? p.Hq : 0;
  float* row = rows[warp];
  const float* cs = rot ? p.cos_sin + p.positions[t] * p.R : nullptr;

  if (item < nq) {  // q head: rotated in place, even for padding tokens (slot -1), as the reference does
    const int64_t base = b * p.q_s0 + s * p.q_s1 + item * p.q_s2;
    load_row_f32(p.q, base, p.q_dtype, R, row, lane);
    __syncwarp();
    rotate_row(row, cs, R, p.interleaved, p.q_dtype, lane);
    __syncwarp();
    store_row_f32(p.q, base, p.q_dtype, R, row, lane);
    return;
  }
  const int64_t slot = p.slots[t];
  if (slot < 0) return;
  const bool is_v = item - nq >= p.Hk;
  const int64_t h = is_v ? item - nq - p.Hk : item - nq;
  const void* src = is_v ? p.v : p.k;
  const int64_t base = is_v ? b * p.v_s0 + s * p.v_s1 + h * p.v_s2 : b * p.k_s0 + s * p.k_s1 + h * p.k_s2;
  void* cache = is_v ? p.v_cache : p.k_cache;
  const int64_t dst = slot * p.Hk + h;  // row of the cache seen as [num_slots, Hk, D]
  const bool rotate = rot && !is_v;
  if (!rotate && p.cache_type == p.kv_dtype) {  // same dtype, nothing rotated: a plain copy
    const int esz = dtype_bytes(p.kv_dtype);
    copy_row(static_cast<char*>(cache) + dst * D * esz, static_cast<const char*>(src) + base * esz, D * esz, lane);
    return;
  }
  load_row_f32(src, base, p.kv_dtype, D, row, lane);
  __syncwarp();
  if (rotate) {
    rotate_row(row, cs, R, p.interleaved, p.kv_dtype, lane);  // rounded to k's dtype, as the reference
    __syncwarp();
  }
  if (p.cache_type != kI8) {
    store_row_f32(cache, dst * D, p.cache_type, D, row, lane);
    return;
  }
  float amax = 0.0f;
  bool nan = false;
  for (int d = lane; d < D; d += 32) {
    const float a = fabsf(row[d]);
    nan |= a != a;
    amax = fmaxf(amax, a);
  }
  amax = warp_max(amax);
  nan = __any_sync(0xffffffffu, nan);
  const Int8Rule rule(nan ? __int_as_float(0x7fc00000) : amax);
  int8_t* qrow = static_cast<int8_t*>(cache) + dst * D;
  for (int d = lane; d < D; d += 32) qrow[d] = rule.quantize(row[d]);
  if (lane == 0) (is_v ? p.v_scale : p.k_scale)[dst] = rule.scale;
}

// Launch on `stream` (p.rows_per_token / p.blocks_per_token are filled in here). No allocation.
inline cudaError_t launch_kv_cache_append(KvAppendParams p, cudaStream_t stream) {
  const int64_t T = p.B * p.S;
  if (T <= 0) return cudaSuccess;
  p.rows_per_token = (p.q ? p.Hq : 0) + 2 * p.Hk;
  p.blocks_per_token = (p.rows_per_token + kAppendWarps - 1) / kAppendWarps;
  const int64_t blocks = T * p.blocks_per_token;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  kv_cache_append_kernel<<<static_cast<unsigned>(blocks), kAppendWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace llmkern
