// Rotary (RoPE) helpers shared by the CPU kv_cache_append (fused rotary) and rotary_embedding kernels.
//
// Computed like the reference, bit for bit: a * cos - b * sin in float64 (the products of two floats
// are exact there), then rounded to the tensor's dtype the way torch's .to() does.
#pragma once

#include <cstdint>

#include "llmkern/cpu/convert.h"

namespace llmkern {
namespace cpu {

// double -> `dt`, returned as float (exact): through fp32 first, as torch's .to() from float64 does
// (c10's BFloat16/Half are built from a float), so the two roundings match the reference bit for bit.
inline float round_to_dtype(double d, DType dt) {
  const float f = static_cast<float>(d);
  switch (dt) {
    case DType::kBF16: return bf16_to_f32(f32_to_bf16(f));
    case DType::kF16: return f16_to_f32(f32_to_f16(f));
    default: return f;
  }
}

// x[0..R) fp32 rotated in place at one position (cs: that position's cos | sin row, R wide), each
// result rounded to dt. interleaved: pairs (x[2i], x[2i+1]) (GPT-J), else (x[i], x[i + R/2]) (NeoX).
inline void rotate_row(float* x, const float* cs, int64_t R, bool interleaved, DType dt) {
  const int64_t half = R / 2;
  for (int64_t i = 0; i < half; ++i) {
    const int64_t ia = interleaved ? 2 * i : i, ib = interleaved ? 2 * i + 1 : i + half;
    const double a = x[ia], b = x[ib], c = cs[i], s = cs[half + i];
    const double ra = a * c - b * s, rb = b * c + a * s;  // products exact in double
    x[ia] = round_to_dtype(ra, dt);
    x[ib] = round_to_dtype(rb, dt);
  }
}

}  // namespace cpu
}  // namespace llmkern
