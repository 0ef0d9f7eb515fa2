// Embedding rows gathered from a quantized table (canonical int8 / int4 layouts, llmkern/formats/README.md, and
// int5, a GGUF Q5 table as stored)
// and dequantized into the activations' dtype: the decode step's lookup for llmkern.nn.QuantizedEmbedding.
//
// Each output value is what the reference computes for the dequantized table, then cast:
//   int8: float(q) * scale                      (one fp32 multiply)
//   int4 / int5: float(q) * scale + offset      (an fp32 multiply, then an fp32 add: never fused)
// cast to bf16 / fp16 with round-to-nearest-even (as torch's .to(dtype)). A row is H values: a few
// microseconds per token, so plain scalar code.
#pragma once

#include <algorithm>
#include <cstdint>

#include "llmkern/cpu/convert.h"
#include "llmkern/cpu/int8_linear_pack_layout.h"

namespace llmkern {
namespace cpu {

// The value v as it stands, hidden from the compiler: keeps `q * s` rounded to fp32 before `+ o`
// (GCC contracts a * b + c into an FMA by default, -ffp-contract=fast).
inline float rounded_f32(float v) {
  asm("" : "+x"(v));
  return v;
}

// out[b, :] = dequant(row tokens[b]) for b < B. w: int8 [V, H]; scale: fp32 [V, H / G] (G = H: per row).
// Token ids must be in [0, V) (the caller checks them).
inline void embed_rows_int8(const int8_t* w, const float* scale, int64_t H, int64_t G, const int64_t* tokens,
                            int64_t B, DType dt, void* out) {
  const int64_t ng = H / G;
  for (int64_t b = 0; b < B; ++b) {
    const int8_t* q = w + tokens[b] * H;
    const float* s = scale + tokens[b] * ng;
    for (int64_t h = 0; h < H; ++h) store_from_f32(out, b * H + h, dt, static_cast<float>(q[h]) * s[h / G]);
  }
}

// The same, with the int8 rows read from an int8_linear packed decode layout (its header first: packed with
// K = H and this G; int8_linear_pack_layout.h; w8a8: W8A8's, which stores w + 128 as uint8, so that flipping the
// top bit gives w): the table of a tied lm_head that released its int8 weight (llmkern.nn.QuantizedEmbedding.
// tie_to). The scales are the canonical ones.
inline void embed_rows_int8_packed(const uint8_t* packed, const float* scale, int64_t H, int64_t G, int64_t E,
                                   bool w8a8, const int64_t* tokens, int64_t B, DType dt, void* out) {
  const int64_t ng = H / G;
  const uint8_t flip = w8a8 ? 0x80 : 0x00;
  for (int64_t b = 0; b < B; ++b) {
    const float* s = scale + tokens[b] * ng;
    for (int64_t h0 = 0; h0 < H; h0 += i8pk::kStep) {  // a 64-value step's bytes are contiguous
      const int8_t* q = i8pk::row_ptr(packed, H, G, E, tokens[b], h0);
      const int64_t hn = std::min<int64_t>(i8pk::kStep, H - h0);
      for (int64_t h = h0; h < h0 + hn; ++h) {
        const int8_t v = static_cast<int8_t>(static_cast<uint8_t>(q[h - h0]) ^ flip);
        store_from_f32(out, b * H + h, dt, static_cast<float>(v) * s[h / G]);
      }
    }
  }
}

// int4: qweight uint8 [V, H / 2] (low nibble = even h), scales / offsets fp32 [V, H / G].
inline void embed_rows_int4(const uint8_t* qw, const float* scales, const float* offsets, int64_t H, int64_t G,
                            const int64_t* tokens, int64_t B, DType dt, void* out) {
  const int64_t ng = H / G;
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* q = qw + tokens[b] * (H / 2);
    const float* s = scales + tokens[b] * ng;
    const float* o = offsets + tokens[b] * ng;
    for (int64_t h = 0; h < H; ++h) {
      const int nib = (q[h / 2] >> (4 * (h & 1))) & 15;
      store_from_f32(out, b * H + h, dt, rounded_f32(static_cast<float>(nib) * s[h / G]) + o[h / G]);
    }
  }
}

// int5 (a GGUF Q5_1 / Q5_K table as stored): codes uint8 [V, H] (0..31), scales / offsets fp32 [V, H / G]; the same
// arithmetic as int4 with a byte per code.
inline void embed_rows_int5(const uint8_t* codes, const float* scales, const float* offsets, int64_t H, int64_t G,
                            const int64_t* tokens, int64_t B, DType dt, void* out) {
  const int64_t ng = H / G;
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* q = codes + tokens[b] * H;
    const float* s = scales + tokens[b] * ng;
    const float* o = offsets + tokens[b] * ng;
    for (int64_t h = 0; h < H; ++h)
      store_from_f32(out, b * H + h, dt, rounded_f32(static_cast<float>(q[h]) * s[h / G]) + o[h / G]);
  }
}

}  // namespace cpu
}  // namespace llmkern
