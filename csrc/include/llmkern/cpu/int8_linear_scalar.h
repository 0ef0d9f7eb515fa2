// int8_linear, portable C++ (no ISA extension): the "scalar" ISA, and the row preparation the AVX2
// path shares (activations to fp32, W8A8 row quantization with q stored as int8).
#pragma once

#include <cstdint>
#include <cmath>

#include "llmkern/cpu/int8_linear_common.h"

namespace llmkern {
namespace cpu {
namespace scalar {

// x row [K] (dtype dt) -> out [K] fp32.
inline void row_to_f32(const void* x, DType dt, int64_t K, float* out) {
  for (int64_t k = 0; k < K; ++k) out[k] = load_as_f32(x, k, dt);
}

// q[k] = the quantized x[k] + offset (offset 128 gives the u8 encoding of the AVX-512 kernels).
inline void quantize_values(const void* x, DType dt, int64_t K, const RowQuant& p, int offset, uint8_t* q) {
  for (int64_t k = 0; k < K; ++k) {
    const float v = load_as_f32(x, k, dt);
    int qi = 0;
    if (p.saturate) qi = v > 0.0f ? 127 : (v < 0.0f ? -127 : 0);
    else if (!p.zero) qi = quant_round(v * p.inv);
    q[k] = static_cast<uint8_t>(qi + offset);
  }
}

// x row [K] -> q [K] int8 (the quantization rule of int8_linear_common.h), *scale = row scale.
inline void quantize_row(const void* x, DType dt, int64_t K, void* q_out, float* scale) {
  float amax = 0.0f;
  bool nonfinite = false;
  for (int64_t k = 0; k < K; ++k) {
    const float a = std::fabs(load_as_f32(x, k, dt));
    nonfinite |= !(a <= FLT_MAX);  // NaN compares false
    amax = a > amax ? a : amax;
  }
  const RowQuant p = row_quant_params(amax, nonfinite);
  *scale = p.scale;
  quantize_values(x, dt, K, p, 0, static_cast<uint8_t*>(q_out));
}

// Any t.mb x t.nb (the table points every shape here).
inline void tile_w8a16(const Tile& t, int mb, int nb) {
  const int64_t G = t.group;
  for (int i = 0; i < mb; ++i) {
    const float* x = static_cast<const float*>(t.x[i]);
    for (int j = 0; j < nb; ++j) {
      const int8_t* w = t.w + j * t.K;
      const float* s = t.scale + j * t.ngroups;
      float total = 0.0f;
      for (int64_t g = 0; g < t.ngroups; ++g) {
        float acc = 0.0f;  // this group's dot product, fp32
        for (int64_t k = g * G; k < (g + 1) * G; ++k) acc += x[k] * static_cast<float>(w[k]);
        total += acc * s[g];
      }
      t.res[i * kResStride + j] = total;
    }
  }
}

inline void tile_w8a8(const Tile& t, int mb, int nb) {
  const int64_t G = t.group;
  for (int i = 0; i < mb; ++i) {
    const int8_t* x = static_cast<const int8_t*>(t.x[i]);
    for (int j = 0; j < nb; ++j) {
      const int8_t* w = t.w + j * t.K;
      const float* s = t.scale + j * t.ngroups;
      float total = 0.0f;
      for (int64_t g = 0; g < t.ngroups; ++g) {
        int32_t acc = 0;  // exact: G <= kMaxW8A8Group keeps |acc| < 2^31
        for (int64_t k = g * G; k < (g + 1) * G; ++k) acc += int32_t(x[k]) * int32_t(w[k]);
        total += static_cast<float>(acc) * s[g];
      }
      t.res[i * kResStride + j] = total;
    }
  }
}

template <int MB, int NB>
void tile_w8a16_t(const Tile& t) { tile_w8a16(t, MB, NB); }
template <int MB, int NB>
void tile_w8a8_t(const Tile& t) { tile_w8a8(t, MB, NB); }

}  // namespace scalar
}  // namespace cpu
}  // namespace llmkern
