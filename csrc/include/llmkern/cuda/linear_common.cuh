// Device helpers shared by the int8_linear and int4_linear CUDA kernels (torch-free).
//
// Activation / output dtype codes match the CPU launchers and the Python adapters:
// 0 = float32, 1 = bfloat16, 2 = float16.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace llmkern {
namespace cuda {

enum class XType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// ------------------------------------------------------------------ loads of 8 / 16 activations
// Eight consecutive activations of type T starting at p (16-byte aligned for T = 16-bit, 32 for f32)
// converted to fp32 (exact).
template <typename T>
__device__ __forceinline__ void load8_f32(const T* p, float (&v)[8]);

template <>
__device__ __forceinline__ void load8_f32<float>(const float* p, float (&v)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

// bf16 -> fp32 is a 16-bit shift of the bit pattern (exact).
template <>
__device__ __forceinline__ void load8_f32<__nv_bfloat16>(const __nv_bfloat16* p, float (&v)[8]) {
  const uint4 a = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = __uint_as_float(w[i] << 16);
    v[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
  }
}

template <>
__device__ __forceinline__ void load8_f32<__half>(const __half* p, float (&v)[8]) {
  const uint4 a = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h = *reinterpret_cast<const __half2*>(&w[i]);
    float2 f = __half22float2(h);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

template <typename T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }

// Stores fp32 v (rounded to nearest even) into out[i] of dtype `dt`.
__device__ __forceinline__ void store_out(void* out, int64_t i, XType dt, float v) {
  if (dt == XType::kF32) {
    static_cast<float*>(out)[i] = v;
  } else if (dt == XType::kBF16) {
    static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v);
  } else {
    static_cast<__half*>(out)[i] = __float2half_rn(v);
  }
}

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// Two fp32 -> one 32-bit word of two 16-bit values of T (a at the lower address), rounded to nearest even
// (the A / B register of a 16-bit mma.sync fragment).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&v);
  } else {
    __half2 v = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&v);
  }
}

// ------------------------------------------------------------------ small integer -> fp32, exactly
// u in 0..255 -> float(u): the bit pattern 0x4B0000uu is 2^23 + u; subtracting 2^23 is exact. One
// PRMT picks byte `b` of `w` into the low byte of 0x4B000000 (cheaper than an I2F conversion).
template <int b>
__device__ __forceinline__ float byte_to_f32(uint32_t w) {
  constexpr uint32_t sel = 0x7440u | b;  // result bytes: [w.b, c.byte0(0), c.byte0(0), c.byte3(0x4B)]
  const uint32_t bits = __byte_perm(w, 0x4B000000u, sel);
  return __uint_as_float(bits) - 8388608.0f;
}

// Four int8 (two's complement bytes of w) -> float, exactly: flip the sign bit (u = q + 128), convert,
// subtract 128 (folded into the 2^23 subtraction: exact, every value is an integer below 2^24).
__device__ __forceinline__ void s8x4_to_f32(uint32_t w, float& a, float& b, float& c, float& d) {
  const uint32_t u = w ^ 0x80808080u;
  a = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7440u)) - 8388736.0f;
  b = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7441u)) - 8388736.0f;
  c = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7442u)) - 8388736.0f;
  d = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7443u)) - 8388736.0f;
}

// ------------------------------------------------------------------ swap-AB decode epilogue
// The swap-AB decode kernels (decode_mma.cuh, int4_linear_packed.cuh): kWarps warps each hold, per 8-row block
// mb, an m16n8 fp32 fragment of the same 16 output columns (d0 / d1: column n0 + g, rows m = 8 mb + 2 t / + 1;
// d2 / d3: column n0 + g + 8). Sums them in warp order through `red` (shared memory) and writes the CTA's
// [M, 16] piece: with a split grid (gridDim.y > 1) fp32 partials ws[blockIdx.y, m, n] (summed in order by
// int4_linear::reduce_kernel), else out[m, n] in T plus the fp32 bias. col_scale (or null) scales each column
// first (linear: partials too).
template <typename T, int kWarps, int MB>
__device__ __forceinline__ void swapab_store(float (&red)[kWarps][16][8 * MB], const float (&c)[MB][4], int n0,
                                             int M, int N, const float* col_scale, const float* bias, void* out,
                                             int64_t ldo) {
  constexpr int kM = 8 * MB;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int mb = 0; mb < MB; ++mb) {
    red[warp][g][8 * mb + 2 * t] = c[mb][0];
    red[warp][g][8 * mb + 2 * t + 1] = c[mb][1];
    red[warp][g + 8][8 * mb + 2 * t] = c[mb][2];
    red[warp][g + 8][8 * mb + 2 * t + 1] = c[mb][3];
  }
  __syncthreads();
  const bool split = gridDim.y > 1;
  for (int i = threadIdx.x; i < 16 * kM; i += kWarps * 32) {
    const int nl = i / kM, m = i % kM;
    const int n = n0 + nl;
    if (m >= M || n >= N) continue;
    float v = red[0][nl][m];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) v += red[w][nl][m];
    if (col_scale) v *= __ldg(col_scale + n);
    if (split) {
      static_cast<float*>(out)[(int64_t(blockIdx.y) * M + m) * N + n] = v;
    } else {
      if (bias) v += bias[n];
      static_cast<T*>(out)[int64_t(m) * ldo + n] = from_f32<T>(v);
    }
  }
}

// ------------------------------------------------------------------ warp reductions
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ int warp_sum_int(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace cuda
}  // namespace llmkern
