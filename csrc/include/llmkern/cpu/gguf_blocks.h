// GGUF 5-bit and K-quant blocks -> llmkern's canonical int4 / int8 tensors or float32 values: the native
// path of llmkern/formats/gguf_kquants.py, whose docstring (and llmkern/formats/README.md) gives the block
// layouts and why each result is exact. Same results bit for bit as that file's numpy path and as
// gguf.quants.dequantize: every value is one fp32 multiply (exact for the canonical scales: at most 17 or
// 19 significant bits) or, for the float types, gguf's own multiply then add / subtract, two roundings
// that a fused multiply-add would make one (the product goes through a volatile, so no compiler flag can
// fuse them).
//
// All functions take R rows of nb blocks each (raw: R * nb * block bytes, contiguous) and write row-major
// outputs; float16 fields must already be checked finite (the Python side names the bad block). Threads
// split rows.
#pragma once

#include <omp.h>

#include <cstdint>
#include <cstring>

#include "llmkern/cpu/convert.h"

namespace llmkern {
namespace cpu {
namespace gguf {

inline float f16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return f16_to_f32(h);
}

// Q4_K / Q5_K's 12 scale bytes -> 6-bit sc[8], m[8] (layout: gguf_kquants._k_scales_mins).
inline void k_scales_mins(const uint8_t* b, uint8_t* sc, uint8_t* m) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = b[j] & 0x3F;
    m[j] = b[j + 4] & 0x3F;
    sc[j + 4] = static_cast<uint8_t>((b[j + 8] & 0x0F) | ((b[j] >> 6) << 4));
    m[j + 4] = static_cast<uint8_t>((b[j + 8] >> 4) | ((b[j + 4] >> 6) << 4));
  }
}

// Q4_K (144 B per 256) -> qweight [R, nb * 128] (low nibble = even k), scales / offsets [R, nb * 8].
inline void q4_k_to_int4(const uint8_t* raw, int64_t R, int64_t nb, uint8_t* qw, float* scales, float* offsets) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* p = raw + (r * nb + b) * 144;
      const float d = f16_at(p), dmin = f16_at(p + 2);
      uint8_t sc[8], m[8];
      k_scales_mins(p + 4, sc, m);
      float* s = scales + (r * nb + b) * 8;
      float* o = offsets + (r * nb + b) * 8;
      for (int j = 0; j < 8; ++j) {
        s[j] = d * static_cast<float>(sc[j]);
        o[j] = -(dmin * static_cast<float>(m[j]));
      }
      uint8_t* q = qw + (r * nb + b) * 128;
      for (int c = 0; c < 4; ++c) {  // chunk c: low nibbles are sub-block 2c, high nibbles 2c + 1
        const uint8_t* x = p + 16 + 32 * c;
        for (int i = 0; i < 16; ++i) {
          const uint8_t e = x[2 * i], od = x[2 * i + 1];
          q[32 * c + i] = static_cast<uint8_t>((e & 0x0F) | ((od & 0x0F) << 4));
          q[32 * c + 16 + i] = static_cast<uint8_t>((e >> 4) | (od & 0xF0));
        }
      }
    }
  }
}

// Q6_K (210 B per 256) -> weight int8 [R, nb * 256] in -32..31, weight_scale [R, nb * 16] = d * sc.
inline void q6_k_to_int8(const uint8_t* raw, int64_t R, int64_t nb, int8_t* w, float* scales) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* p = raw + (r * nb + b) * 210;
      const uint8_t *ql = p, *qh = p + 128;
      int8_t sc[16];
      std::memcpy(sc, p + 192, 16);
      const float d = f16_at(p + 208);
      for (int j = 0; j < 16; ++j) scales[(r * nb + b) * 16 + j] = d * static_cast<float>(sc[j]);
      int8_t* out = w + (r * nb + b) * 256;
      for (int h = 0; h < 2; ++h)
        for (int t = 0; t < 4; ++t)
          for (int l = 0; l < 32; ++l) {  // element 128 h + 32 t + l
            const uint8_t lb = ql[64 * h + 32 * (t % 2) + l];
            const int low = t < 2 ? (lb & 0x0F) : (lb >> 4);
            const int high = (qh[32 * h + l] >> (2 * t)) & 3;
            out[128 * h + 32 * t + l] = static_cast<int8_t>((low | (high << 4)) - 32);
          }
    }
  }
}

inline uint32_t u32_at(const uint8_t* p) {
  uint32_t h;
  std::memcpy(&h, p, 4);
  return h;
}

// Element i of a Q5_0 / Q5_1 block: low 4 bits from qs (low nibbles first), bit 4 = bit i of qh (the u32 h).
inline int q5_value(uint32_t h, const uint8_t* qs, int i) {
  const int low = i < 16 ? (qs[i] & 0x0F) : (qs[i - 16] >> 4);
  return low | static_cast<int>(((h >> i) & 1u) << 4);
}

// Q5_0 (22 B per 32) -> weight int8 [R, nb * 32] in -16..15, weight_scale [R, nb] = d.
inline void q5_0_to_int8(const uint8_t* raw, int64_t R, int64_t nb, int8_t* w, float* scales) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < R; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* p = raw + (r * nb + b) * 22;
      scales[r * nb + b] = f16_at(p);
      const uint32_t h = u32_at(p + 2);
      for (int i = 0; i < 32; ++i) w[(r * nb + b) * 32 + i] = static_cast<int8_t>(q5_value(h, p + 6, i) - 16);
    }
}

// Q5_1 (24 B per 32) -> float32 [R, nb * 32] = d * q + m (gguf's product, then its sum).
inline void q5_1_to_f32(const uint8_t* raw, int64_t R, int64_t nb, float* out) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < R; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* p = raw + (r * nb + b) * 24;
      const float d = f16_at(p), m = f16_at(p + 2);
      const uint32_t h = u32_at(p + 4);
      for (int i = 0; i < 32; ++i) {
        const volatile float prod = d * static_cast<float>(q5_value(h, p + 8, i));
        out[(r * nb + b) * 32 + i] = prod + m;
      }
    }
}

// Q5_K (176 B per 256) -> float32 [R, nb * 256] = (d * sc) * q - dmin * m.
inline void q5_k_to_f32(const uint8_t* raw, int64_t R, int64_t nb, float* out) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < R; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* p = raw + (r * nb + b) * 176;
      const float d = f16_at(p), dmin = f16_at(p + 2);
      uint8_t sc[8], m[8];
      k_scales_mins(p + 4, sc, m);
      const uint8_t *qh = p + 16, *qs = p + 48;
      float* o = out + (r * nb + b) * 256;
      for (int s = 0; s < 8; ++s) {  // sub-block s: nibbles of chunk s / 2 (low for even s), bit s of qh
        const float scale = d * static_cast<float>(sc[s]), minimum = dmin * static_cast<float>(m[s]);
        for (int l = 0; l < 32; ++l) {
          const uint8_t x = qs[32 * (s / 2) + l];
          const int q = (s % 2 ? x >> 4 : x & 0x0F) | (((qh[l] >> s) & 1) << 4);
          const volatile float prod = scale * static_cast<float>(q);
          o[32 * s + l] = prod - minimum;
        }
      }
    }
}

}  // namespace gguf
}  // namespace cpu
}  // namespace llmkern
