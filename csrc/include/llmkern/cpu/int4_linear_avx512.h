// int4_linear with AVX-512 (F/BW/VL, the "avx512_vnni" ISA level): decode tiles, row preparation
// and vector stores. The prefill panels and micro-kernels are in int4_linear_avx512_gemm.h.
//
// Decode streams each weight row once, 64 bytes (128 values of k) per step, as 16 32-bit lanes:
// lane j holds the 8 nibbles of k = 8j..8j+7. Nibble t of every lane is one shift (and mask) away,
// so the activations are stored permuted once per call to match (value t of lane j at 16t + j),
// and no shuffle touches the weights. Lane j's values all lie in group (128b + 8j) / G, so a step's
// 16 lane sums are rescaled at once by a vector of their groups' scales (one FMA per 128 weights);
// the offsets meet the group sums X in a separate short dot product over groups.
//
// Two routes:
//   fp32 (any x dtype): q = vpermps(d >> 4t) from a table of 0..15 (the permute reads the low 4
//     index bits, so no mask), fp32 FMA with x -> 8 FMAs per 128 weights and row.
//   bf16 (bf16 x, CPU with AVX512-BF16): vpsrlw by 4u puts nibbles u and 4 + u of each lane in the
//     low bits of its two 16-bit halves; vpermw looks their bf16 values up (q exact), and vdpbf16ps
//     multiplies them with the matching x pair -> 4 dot products per 128 weights and row. bf16 x
//     denormals count as 0 there (the instruction's DAZ); they change a sum by < 2^-126.
#pragma once

// GCC 12 warns that the intrinsics' own _mm*_undefined_*() placeholders "may be used
// uninitialized" wherever they are inlined; the warning is located in the intrinsic headers.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cstdint>

#include "llmkern/cpu/int4_linear_common.h"
#include "llmkern/cpu/store_avx512.h"

#define LLMKERN_I4_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#define LLMKERN_I4_AVX512_INLINE LLMKERN_I4_AVX512 inline __attribute__((always_inline))
#define LLMKERN_I4_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16,avx2,fma,f16c")))
#define LLMKERN_I4_UNROLL _Pragma("GCC unroll 8")

namespace llmkern {
namespace cpu {
namespace int4_avx512 {

// bf16 bit patterns of 0..15, twice (vpermw reads 5 index bits; bit 4 is the next nibble's).
alignas(64) inline const uint16_t kBf16Nibble[32] = {
    0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0, 0x4100, 0x4110, 0x4120,
    0x4130, 0x4140, 0x4150, 0x4160, 0x4170, 0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0,
    0x40C0, 0x40E0, 0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};

LLMKERN_I4_AVX512_INLINE __mmask16 tail16(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << n) - 1);
}

// 16 values from x + k as fp32 (mask selects the valid ones, the rest read as 0).
LLMKERN_I4_AVX512_INLINE __m512 load16(const void* x, DType dt, int64_t k, __mmask16 mask) {
  if (dt == DType::kF32) return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(x) + k);
  const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(x) + k);
  if (dt == DType::kF16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));  // bf16: exact
}

// The epilogue stores (store_avx512.h, shared with the W4A8 kernel).
using store512::store16;
using store512::store_row;
using store512::to_bf16;

LLMKERN_I4_AVX512 inline void row_to_f32(const void* x, DType dt, int64_t K, float* out) {
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = tail16(K - k);
    _mm512_mask_storeu_ps(out + k, m, load16(x, dt, k, m));
  }
}

// X(g) of a row: fp32 lane sums of 16 values, summed per group; zeros up to groups_padded(K).
LLMKERN_I4_AVX512 inline void group_sums_v(const void* x, DType dt, int64_t K, int64_t G, float* xs) {
  const int64_t ng = K / G;
  for (int64_t g = 0; g < ng; ++g) {
    __m512 s = _mm512_setzero_ps();
    for (int64_t k = g * G; k < (g + 1) * G; k += 16) s = _mm512_add_ps(s, load16(x, dt, k, 0xffff));
    xs[g] = _mm512_reduce_add_ps(s);
  }
  for (int64_t g = ng; g < groups_padded(K); ++g) xs[g] = 0.0f;
}

// ------------------------------------------------------------------------------ row preparation

// fp32 route: xp[128b + 16t + j] = x[128b + 8j + t] (0 past K). The 128 values of a block, read as
// a 16 x 8 matrix (row j = x[8j .. 8j+7]), are transposed: two-source permutes pick column t.
LLMKERN_I4_AVX512 inline bool dec_prep_f32(const void* x, DType dt, int64_t K, int64_t G, void* xp_, float* xs, bool /*scale*/) {
  float* xp = static_cast<float*>(xp_);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i stride8 = _mm512_slli_epi32(iota, 3);  // 8j: lane j of column t is element 8j + t
  for (int64_t b = 0; b < align_up(K, 128); b += 128) {
    __m512 v[8];  // v[r] = x[b + 16r .. b + 16r + 15]
    LLMKERN_I4_UNROLL for (int r = 0; r < 8; ++r) {
      const int64_t k = b + 16 * r;
      v[r] = k < K ? load16(x, dt, k, tail16(K - k)) : _mm512_setzero_ps();
    }
    LLMKERN_I4_UNROLL for (int t = 0; t < 8; ++t) {
      // Element e = 8j + t of the block is in v[j / 2]: the pair (v[2c], v[2c+1]) serves lanes
      // 4c..4c+3, and a two-source permute reads the low 5 bits of e, i.e. e - 32c.
      const __m512i e = _mm512_add_epi32(stride8, _mm512_set1_epi32(t));
      __m512 col = _mm512_permutex2var_ps(v[0], e, v[1]);
      LLMKERN_I4_UNROLL for (int c = 1; c < 4; ++c)
        col = _mm512_mask_mov_ps(col, static_cast<__mmask16>(0xfu << (4 * c)), _mm512_permutex2var_ps(v[2 * c], e, v[2 * c + 1]));
      _mm512_storeu_ps(xp + b + 16 * t, col);
    }
  }
  group_sums_v(x, dt, K, G, xs);
  return false;
}

// bf16 route: xp[128b + 32u + 2j + h] = x[128b + 8j + u + 4h] as bf16 bits (0 past K).
inline bool dec_prep_bf16(const void* x, DType dt, int64_t K, int64_t G, void* xp_, float* xs, bool /*scale*/) {
  const uint16_t* xb = static_cast<const uint16_t*>(x);
  uint16_t* xp = static_cast<uint16_t*>(xp_);
  for (int64_t b = 0; b < align_up(K, 128); b += 128)
    for (int u = 0; u < 4; ++u)
      for (int j = 0; j < 16; ++j)
        for (int h = 0; h < 2; ++h) {
          const int64_t k = b + 8 * j + u + 4 * h;
          xp[b + 32 * u + 2 * j + h] = k < K ? xb[k] : 0;
        }
  group_sums_v(x, dt, K, G, xs);
  return false;
}

// ------------------------------------------------------------------------------------ decode

// Lane j of block b lies in group (128b + 8j) / G: index of that group among the block's first.
LLMKERN_I4_AVX512_INLINE __m512i lane_groups(int64_t G) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return _mm512_srlv_epi32(iota, _mm512_set1_epi32(__builtin_ctzll(static_cast<uint64_t>(G)) - 3));
}

// Scales or offsets from element i of p (canonical fp32, packed fp16 or fp32) for the lanes in m, 0 elsewhere.
template <int E>
LLMKERN_I4_AVX512_INLINE __m512 load_groups16(const void* p, int64_t i, __mmask16 m) {
  if constexpr (E == 2) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i));
  else return _mm512_maskz_loadu_ps(m, static_cast<const float*>(p) + i);
}

// accf[i][j] += the block's lane sums times their groups' scales (the step's scales: sp).
template <int MB, int NB, int E>
LLMKERN_I4_AVX512_INLINE void rescale(__m512 (&accf)[MB][NB], const __m512 (&acc)[MB][NB], const DecodeTile& t,
                                      const StepPtrs& sp, int64_t bytes, __m512i gidx) {
  const int gs = __builtin_ctzll(static_cast<uint64_t>(t.group));  // G is a power of two
  const int64_t gv = (2 * bytes + t.group - 1) >> gs;
  LLMKERN_I4_UNROLL for (int j = 0; j < NB; ++j) {
    const __m512 s = _mm512_permutexvar_ps(gidx, load_groups16<E>(sp.s, j * sp.sstride, tail16(gv)));
    LLMKERN_I4_UNROLL for (int i = 0; i < MB; ++i) accf[i][j] = _mm512_fmadd_ps(acc[i][j], s, accf[i][j]);
  }
}

// accf[i][j] += offsets . X over all groups, then the lane sums are the tile's results.
template <int MB, int NB, int E>
LLMKERN_I4_AVX512_INLINE void finish(__m512 (&accf)[MB][NB], const DecodeTile& t) {
  const void* offs = offsets_ptr<E>(t);
  for (int64_t g = 0; g < t.ngroups; g += 16) {
    const __mmask16 m = tail16(t.ngroups - g);
    __m512 xs[MB];
    LLMKERN_I4_UNROLL for (int i = 0; i < MB; ++i) xs[i] = _mm512_loadu_ps(t.xs[i] + g);  // padded
    LLMKERN_I4_UNROLL for (int j = 0; j < NB; ++j) {
      const __m512 o = load_groups16<E>(offs, j * t.ngroups + g, m);
      LLMKERN_I4_UNROLL for (int i = 0; i < MB; ++i) accf[i][j] = _mm512_fmadd_ps(xs[i], o, accf[i][j]);
    }
  }
  LLMKERN_I4_UNROLL for (int i = 0; i < MB; ++i)
    LLMKERN_I4_UNROLL for (int j = 0; j < NB; ++j) t.res[i * t.res_stride + j] = _mm512_reduce_add_ps(accf[i][j]);
}

template <int MB, int NB, int E = 0>
LLMKERN_I4_AVX512 void dec_tile_f32(const DecodeTile& t) {
  const int64_t rb = t.K / 2;
  const __m512i gidx = lane_groups(t.group);
  const __m512 tab = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 accf[MB][NB];
  LLMKERN_I4_UNROLL for (int i = 0; i < MB; ++i)
    LLMKERN_I4_UNROLL for (int j = 0; j < NB; ++j) accf[i][j] = _mm512_setzero_ps();
  for (int64_t b = 0; b * 64 < rb; ++b) {
    const int64_t bytes = rb - b * 64 < 64 ? rb - b * 64 : 64;
    const __mmask16 dm = tail16(bytes / 4);
    dec_prefetch_any<E>(t, b, (rb + 63) / 64, NB);
    const StepPtrs sp = step_ptrs<E>(t, b * 64);
    __m512i d[NB];
    LLMKERN_I4_UNROLL for (int j = 0; j < NB; ++j) d[j] = _mm512_maskz_loadu_epi32(dm, sp.q + j * sp.qstride);
    __m512 acc[MB][NB];
    LLMKERN_I4_UNROLL for (int i = 0; i < MB; ++i)
      LLMKERN_I4_UNROLL for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
    LLMKERN_I4_UNROLL for (int tt = 0; tt < 8; ++tt) {
      __m512 xv[MB];
      LLMKERN_I4_UNROLL for (int i = 0; i < MB; ++i) xv[i] = _mm512_loadu_ps(static_cast<const float*>(t.x[i]) + b * 128 + 16 * tt);
      LLMKERN_I4_UNROLL for (int j = 0; j < NB; ++j) {
        const __m512 q = _mm512_permutexvar_ps(_mm512_srli_epi32(d[j], 4 * tt), tab);  // reads 4 index bits
        LLMKERN_I4_UNROLL for (int i = 0; i < MB; ++i) acc[i][j] = _mm512_fmadd_ps(xv[i], q, acc[i][j]);
      }
    }
    rescale<MB, NB, E>(accf, acc, t, sp, bytes, gidx);
  }
  finish<MB, NB, E>(accf, t);
}

template <int MB, int NB, int E = 0>
LLMKERN_I4_BF16 void dec_tile_bf16(const DecodeTile& t) {
  const int64_t rb = t.K / 2;
  const __m512i tab = _mm512_load_si512(kBf16Nibble), gidx = lane_groups(t.group);
  __m512 accf[MB][NB];
  LLMKERN_I4_UNROLL for (int i = 0; i < MB; ++i)
    LLMKERN_I4_UNROLL for (int j = 0; j < NB; ++j) accf[i][j] = _mm512_setzero_ps();
  for (int64_t b = 0; b * 64 < rb; ++b) {
    const int64_t bytes = rb - b * 64 < 64 ? rb - b * 64 : 64;
    const __mmask16 dm = tail16(bytes / 4);
    dec_prefetch_any<E>(t, b, (rb + 63) / 64, NB);
    const StepPtrs sp = step_ptrs<E>(t, b * 64);
    __m512i d[NB];
    LLMKERN_I4_UNROLL for (int j = 0; j < NB; ++j) d[j] = _mm512_maskz_loadu_epi32(dm, sp.q + j * sp.qstride);
    __m512 acc[MB][NB];
    LLMKERN_I4_UNROLL for (int i = 0; i < MB; ++i)
      LLMKERN_I4_UNROLL for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
    LLMKERN_I4_UNROLL for (int u = 0; u < 4; ++u) {
      __m512i xv[MB];
      LLMKERN_I4_UNROLL for (int i = 0; i < MB; ++i)
        xv[i] = _mm512_loadu_si512(static_cast<const uint16_t*>(t.x[i]) + b * 128 + 32 * u);
      LLMKERN_I4_UNROLL for (int j = 0; j < NB; ++j) {
        const __m512i q = _mm512_permutexvar_epi16(_mm512_srli_epi16(d[j], 4 * u), tab);
        LLMKERN_I4_UNROLL for (int i = 0; i < MB; ++i)
          acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xv[i], (__m512bh)q);
      }
    }
    rescale<MB, NB, E>(accf, acc, t, sp, bytes, gidx);
  }
  finish<MB, NB, E>(accf, t);
}

}  // namespace int4_avx512
}  // namespace cpu
}  // namespace llmkern
