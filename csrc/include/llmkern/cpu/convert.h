// Portable (no ISA extension) conversions between fp32 and bf16 / fp16 bit patterns (and fits_f16,
// which takes F16C where the CPU has it).
//
// float -> bf16/fp16 round to nearest even (what torch's .to() does), keep NaN a NaN and give inf
// on overflow; bf16/fp16 -> float is exact. The vector kernels use these for their scalar edges, so
// every ISA stores bit-identical outputs from identical fp32 values.
#pragma once

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cmath>
#include <cstdint>
#include <cstring>

#include "llmkern/cpu/features.h"

namespace llmkern {
namespace cpu {

enum class DType { kF32 = 0, kBF16 = 1, kF16 = 2 };

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1);  // round half to even on the 16 dropped bits
  return static_cast<uint16_t>(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in fp32
    const float v = static_cast<float>(mant) * 0x1p-24f;
    return (h & 0x8000) ? -v : v;
  }
  if (exp == 31) return bits_f32(sign | 0x7f800000u | (mant << 13));  // inf / NaN (payload kept)
  return bits_f32(sign | ((exp + 112) << 23) | (mant << 13));
}

inline uint16_t f32_to_f16(float f) {
  const uint32_t u = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00 | static_cast<uint16_t>((a >> 13) & 0x3ff);  // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00;  // >= 65520 rounds to inf (ties to even: 65504 is odd)
  if (a < 0x38800000u) {
    // Below 2^-14: fp16 subnormal with unit 2^-24. a * 2^24 is exact; RNE of it via the 1.5*2^23
    // trick (exact for values < 2^22), so no dependence on libm. 1024 encodes 2^-14 correctly.
    const float scaled = bits_f32(a) * 0x1p24f;
    const float r = (scaled + 12582912.0f) - 12582912.0f;
    return sign | static_cast<uint16_t>(r);
  }
  // Normal: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits half to even;
  // a mantissa carry correctly bumps the exponent.
  const uint32_t r = a - 0x38000000u + 0xfffu + ((a >> 13) & 1);
  return sign | static_cast<uint16_t>(r >> 13);
}

inline float load_as_f32(const void* p, int64_t i, DType dt) {
  switch (dt) {
    case DType::kBF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::kF16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

inline void store_from_f32(void* p, int64_t i, DType dt, float v) {
  switch (dt) {
    case DType::kBF16: static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); break;
    case DType::kF16: static_cast<uint16_t*>(p)[i] = f32_to_f16(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

inline int64_t dtype_size(DType dt) { return dt == DType::kF32 ? 4 : 2; }

// fits_f16 for v[0, n) with F16C, 8 values per step: the hardware round trip (nearest even, whatever
// MXCSR says; exact back) compared bit for bit (an xor, not a float compare, which DAZ would fool on
// denormals), NaNs refused explicitly (a NaN may survive the round trip bit for bit).
__attribute__((target("avx,f16c"))) inline bool fits_f16_f16c(const float* v, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(v + i);
    const __m256 r = _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const __m256i diff = _mm256_castps_si256(_mm256_xor_ps(r, x));
    if (!_mm256_testz_si256(diff, diff) || _mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q))) return false;
  }
  for (; i < n; ++i)
    if (std::isnan(v[i]) || f32_bits(f16_to_f32(f32_to_f16(v[i]))) != f32_bits(v[i])) return false;
  return true;
}

// Whether every value is exactly an fp16 value (bit for bit after the round trip: -0, subnormals
// and infinities included; NaN never, so a NaN keeps its fp32 payload). The packed weight layouts
// store such scales as fp16, losslessly. (Run on every layer's scales and offsets when a model's
// linears are prepared: F16C where the CPU has it, ~10x the portable loop.)
inline bool fits_f16(const float* v, int64_t n) {
  if (features().f16c) return fits_f16_f16c(v, n);
  for (int64_t i = 0; i < n; ++i)
    if (std::isnan(v[i]) || f32_bits(f16_to_f32(f32_to_f16(v[i]))) != f32_bits(v[i])) return false;
  return true;
}

}  // namespace cpu
}  // namespace llmkern
