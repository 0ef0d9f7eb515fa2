// Device helpers shared by the CUDA kernels of kv_cache_append, rotary_embedding, rms_norm and
// decode_attention: dtype codes, scalar loads/stores through fp32, the reference's rotary rounding and
// the int8 quantize-on-write rule. Torch-free.
//
// Dtype codes (the Python adapters' _DTYPE_CODE): 0 float32, 1 bfloat16, 2 float16, 3 int8 (caches only).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "llmkern/cuda/params.h"

// Vector (8/16-byte) memory accesses go through ld_vec / ldg_vec / st_vec so that the host emulation of
// tests/cuda_emu can check their alignment (it defines LLMKERN_ASSERT_ALIGNED); on the GPU a misaligned
// vector access is an illegal-address fault that kills the whole CUDA context.
#ifndef LLMKERN_ASSERT_ALIGNED
#define LLMKERN_ASSERT_ALIGNED(ptr, bytes) ((void)0)
#endif

namespace llmkern {
namespace cuda {

template <class T>
__device__ __forceinline__ T ld_vec(const void* p) {
  LLMKERN_ASSERT_ALIGNED(p, sizeof(T));
  return *static_cast<const T*>(p);
}

template <class T>
__device__ __forceinline__ T ldg_vec(const void* p) {  // read-only path (data not written by this kernel)
  LLMKERN_ASSERT_ALIGNED(p, sizeof(T));
  return __ldg(static_cast<const T*>(p));
}

template <class T>
__device__ __forceinline__ void st_vec(void* p, const T& v) {
  LLMKERN_ASSERT_ALIGNED(p, sizeof(T));
  *static_cast<T*>(p) = v;
}


__device__ __forceinline__ float bf16_bits_to_f32(uint16_t h) { return __uint_as_float(uint32_t(h) << 16); }
__device__ __forceinline__ float f16_bits_to_f32(uint16_t h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ uint16_t f32_to_bf16_bits(float f) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));  // round to nearest even, as torch's .to()
}
__device__ __forceinline__ uint16_t f32_to_f16_bits(float f) { return __half_as_ushort(__float2half_rn(f)); }

// Element i of a float tensor of dtype `dt` as fp32 (exact).
__device__ __forceinline__ float load_f32(const void* p, int64_t i, int dt) {
  if (dt == kBF16) return bf16_bits_to_f32(static_cast<const uint16_t*>(p)[i]);
  if (dt == kF16) return f16_bits_to_f32(static_cast<const uint16_t*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

// fp32 -> dtype `dt` (round to nearest even) stored at element i.
__device__ __forceinline__ void store_f32(void* p, int64_t i, int dt, float v) {
  if (dt == kBF16)
    static_cast<uint16_t*>(p)[i] = f32_to_bf16_bits(v);
  else if (dt == kF16)
    static_cast<uint16_t*>(p)[i] = f32_to_f16_bits(v);
  else
    static_cast<float*>(p)[i] = v;
}

// double -> dtype `dt`, returned as the (exact) fp32 value: through fp32 first, as torch's .to() from
// float64 does (c10's BFloat16/Half are built from a float), so both roundings match the reference.
__device__ __forceinline__ float round_to_dtype(double d, int dt) {
  const float f = __double2float_rn(d);
  if (dt == kBF16) return bf16_bits_to_f32(f32_to_bf16_bits(f));
  if (dt == kF16) return f16_bits_to_f32(f32_to_f16_bits(f));
  return f;
}

// One rotary pair (a, b) at cos c, sin s -> (a c - b s, b c + a s) in float64 (the products of two
// floats are exact there, so an FMA contraction gives the same bits), each rounded to `dt`.
__device__ __forceinline__ void rotate_pair(float& a, float& b, float c, float s, int dt) {
  const double da = a, db = b, dc = c, ds = s;
  const double ra = da * dc - db * ds, rb = db * dc + da * ds;
  a = round_to_dtype(ra, dt);
  b = round_to_dtype(rb, dt);
}

// Element pair i (0 <= i < R/2) of a rotary row: indices of a and b.
__device__ __forceinline__ void rotary_pair_index(int i, int R, bool interleaved, int& ia, int& ib) {
  ia = interleaved ? 2 * i : i;
  ib = interleaved ? 2 * i + 1 : i + R / 2;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The int8 rule of llmkern/ops/quant.py for a row whose max |x| (NaN if any x is NaN) is `amax`:
// scale = amax / 127 (IEEE division), inv = 127 / amax; 0, NaN or inf amax: every q is 0.
struct Int8Rule {
  float scale, inv;
  bool zero;
  __device__ __forceinline__ explicit Int8Rule(float amax) {
    scale = __fdiv_rn(amax, 127.0f);
    zero = !(amax > 0.0f) || !(amax <= 3.402823466e38f);
    inv = zero ? 0.0f : __fdiv_rn(127.0f, amax);  // may be inf for a tiny amax (x * inf: +-inf or NaN)
  }
  __device__ __forceinline__ int8_t quantize(float x) const {
    if (zero) return 0;
    float v = __fmul_rn(x, inv);
    if (v != v) v = 0.0f;  // 0 * inf: the reference's nan_to_num
    v = fminf(fmaxf(v, -127.0f), 127.0f);  // clamp first: rounding +-inf to an int is undefined
    return static_cast<int8_t>(__float2int_rn(v));  // round half to even
  }
};

}  // namespace cuda
}  // namespace llmkern
