// Pieces shared by the prefill attention kernels (attention.cuh for sm_80+, attention_sm90.cuh for sm_90a).
// Torch-free, no inline asm (the CPU emulator compiles it as is).
#pragma once

#include <cuda_runtime.h>

#include <cmath>

namespace llmkern {
namespace cuda {
namespace attn_common {

// A row's softmax denominator, spread over the 4 threads of a quad (fragment rows): their sum.
__device__ __forceinline__ float quad_sum(float l) {
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  return l;
}
// 1 / l for out = O / l; 0 for a row that saw no key (l == 0: out 0); NaN stays NaN.
__device__ __forceinline__ float inv_denominator(float l) { return l > 0.0f ? 1.0f / l : (l == 0.0f ? 0.0f : l); }
// lse = m ln 2 + ln l (natural log of the softmax denominator of the scaled, capped scores; m is the running
// max in the units the exponent multiplies by `mult`); -inf for a row with no key; NaN stays NaN.
__device__ __forceinline__ float row_lse(float l, float m, float mult) {
  return l > 0.0f ? m * mult * 0.69314718055994531f + logf(l) : (l == 0.0f ? -INFINITY : l);
}

}  // namespace attn_common
}  // namespace cuda
}  // namespace llmkern
