// AVX-512 pieces shared by the bf16 GEMM routes of int4_linear (int4_linear_avx512_gemm.h) and
// int8_linear (int8_linear_bf16.h): a 16 x 16 transpose of 32-bit words, and the packing of bf16
// activation rows into blocks of 8 rows of (k, k + 1) pairs, the order their micro-kernels broadcast.
#pragma once

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cstdint>

#define LLMKERN_BP_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define LLMKERN_BP_UNROLL _Pragma("GCC unroll 16")

namespace llmkern {
namespace cpu {
namespace bf16pairs {

// r[n] = 16 words of row n -> r[d] = word d of rows 0..15 (lane n).
LLMKERN_BP_AVX512 inline __attribute__((always_inline)) void transpose16(__m512i (&r)[16]) {
  __m512i t[16];
  // pairs of rows interleaved by word
  LLMKERN_BP_UNROLL for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // then by 64-bit halves: r[4i + c] holds, per 128-bit lane L, rows 4i..4i+3 of word 4L + c
  LLMKERN_BP_UNROLL for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // and a 4 x 4 transpose of the 128-bit lanes: word 4L + c comes from lane L of r[c], r[4+c], r[8+c], r[12+c]
  LLMKERN_BP_UNROLL for (int c = 0; c < 4; ++c) {
    const __m512i a0 = _mm512_shuffle_i32x4(r[c], r[4 + c], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i a1 = _mm512_shuffle_i32x4(r[c], r[4 + c], _MM_SHUFFLE(3, 2, 3, 2));
    const __m512i b0 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i b1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], _MM_SHUFFLE(3, 2, 3, 2));
    t[c] = _mm512_shuffle_i32x4(a0, b0, _MM_SHUFFLE(2, 0, 2, 0));
    t[4 + c] = _mm512_shuffle_i32x4(a0, b0, _MM_SHUFFLE(3, 1, 3, 1));
    t[8 + c] = _mm512_shuffle_i32x4(a1, b1, _MM_SHUFFLE(2, 0, 2, 0));
    t[12 + c] = _mm512_shuffle_i32x4(a1, b1, _MM_SHUFFLE(3, 1, 3, 1));
  }
  LLMKERN_BP_UNROLL for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// Rows [0, rows) (rows <= 16; bf16, row stride `stride` elements; K a multiple of 32) packed for the
// bf16 micro-kernels: dst[(i / 8) * blk + p * 8 + i % 8] = pair p of row i (32 bits), p < K / 2, with
// blk = K / 2 * 8 words per block of 8 rows; rows past `rows` (to the next multiple of 8) are zero.
LLMKERN_BP_AVX512 inline void pack_rows_bf16(const uint16_t* x, int64_t stride, int64_t rows, int64_t K,
                                             uint32_t* dst) {
  const int64_t pairs = K / 2, blk = pairs * 8;
  for (int64_t p = 0; p < pairs; p += 16) {
    __m512i r[16];
    LLMKERN_BP_UNROLL for (int i = 0; i < 16; ++i)
      r[i] = i < rows ? _mm512_loadu_si512(x + i * stride + 2 * p) : _mm512_setzero_si512();
    transpose16(r);  // r[j] lane i = pair p + j of row i
    LLMKERN_BP_UNROLL for (int j = 0; j < 16; ++j) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (p + j) * 8), _mm512_castsi512_si256(r[j]));
      if (rows > 8) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + blk + (p + j) * 8), _mm512_extracti64x4_epi64(r[j], 1));
    }
  }
}

}  // namespace bf16pairs
}  // namespace cpu
}  // namespace llmkern
