// kv_cache_append on the CPU: write new keys/values into a cache by slot, optionally rotating q/k
// (fused rotary) and quantizing to int8 (llmkern/ops/kv_cache_append.py has the semantics).
//
// One pass per token: rotate k's heads into a small fp32 row buffer and store k and v rows into the cache
// (cast, or quantize with a per-(token, head) scale), then rotate q in place. The work is memory
// bound (a few flops per byte), but the portable row code (a dtype switch per element, float64 rotation
// one pair at a time) costs more than the bytes; with the AVX-512 ISA the rows are loaded, rotated
// (rotate_row_avx512, bit-exact with rotate_row) and stored 16 / 8 values per step. OpenMP splits the
// tokens when there are enough of them to pay for the threads.
//
// Rotary is computed like the reference, bit for bit (llmkern/cpu/rotary.h).
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "llmkern/cpu/convert.h"
#include "llmkern/cpu/features.h"
#include "llmkern/cpu/int8_linear_common.h"
#include "llmkern/cpu/rotary.h"  // round_to_dtype, rotate_row (shared with rotary_embedding)

namespace llmkern {
namespace cpu {

struct AppendArgs {
  // k, v, q: element (b, s, h, d) at b*s0 + s*s1 + h*s2 + d; tokens t = b * S + s (slot_mapping order).
  const void* k = nullptr;
  const void* v = nullptr;
  DType kv_dtype = DType::kF32;
  int64_t k_s0 = 0, k_s1 = 0, k_s2 = 0, v_s0 = 0, v_s1 = 0, v_s2 = 0;
  int64_t B = 0, S = 0, Hk = 0, D = 0;
  const int64_t* slots = nullptr;  // [B * S], -1 = skip
  void* k_cache = nullptr;         // [num_slots, Hk, D] contiguous, cache_type (KvType codes: 0..3)
  void* v_cache = nullptr;
  int cache_type = 0;
  float* k_scale = nullptr;  // int8: [num_slots, Hk]
  float* v_scale = nullptr;
  // Fused rotary (cos_sin null: off).
  const float* cos_sin = nullptr;  // [max_pos, R]: cos | sin
  int64_t R = 0;
  const int64_t* positions = nullptr;  // [B * S]
  bool interleaved = false;
  void* q = nullptr;  // in place, q_dtype, [B, S, Hq, D] with strides q_s0..2; null: no q
  DType q_dtype = DType::kF32;
  int64_t q_s0 = 0, q_s1 = 0, q_s2 = 0, Hq = 0;
  int num_threads = 1;
  Isa isa = Isa::kScalar;  // kAvx512Vnni: vectorized rotation
};

// Store one row of D fp32 values into a cache row (cast, or the int8 rule of llmkern/ops/quant.py).
inline void store_row(const float* x, int64_t D, void* cache, int cache_type, int64_t row, float* scale) {
  if (cache_type != 3) {
    const DType dt = static_cast<DType>(cache_type);
    for (int64_t d = 0; d < D; ++d) store_from_f32(cache, row * D + d, dt, x[d]);
    return;
  }
  int8_t* q = static_cast<int8_t*>(cache) + row * D;
  float amax = 0.0f;
  bool nan = false;
  for (int64_t d = 0; d < D; ++d) {
    const float a = std::fabs(x[d]);
    nan |= a != a;
    amax = a > amax ? a : amax;
  }
  if (nan) amax = NAN;
  scale[row] = amax / 127.0f;  // IEEE division, NaN / inf pass through like the reference's
  if (!(amax > 0.0f) || !(amax <= FLT_MAX)) {  // 0, NaN or inf: every q is 0 (the reference's nan_to_num)
    std::memset(q, 0, D);
    return;
  }
  const float inv = 127.0f / amax;  // may be inf for a tiny amax: x * inv is then +-inf or NaN (0 * inf)
  for (int64_t d = 0; d < D; ++d) {
    float v = x[d] * inv;
    if (v != v) v = 0.0f;
    v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);  // clamp first: rounding +-inf is undefined
    q[d] = static_cast<int8_t>(quant_round(v));
  }
}

namespace kv512 {

// The int8 rule of store_row on one row of D <= 256 fp32 values, 16 lanes at a time, bit for bit:
// the same max (exact in any order), the same IEEE scale and multiply, NaN -> 0, clamp, and the same
// round-half-even by adding and subtracting 1.5 * 2^23.
LLMKERN_ROT512 inline void store_row_int8(const float* x, int64_t D, int8_t* q, float* scale) {
  __m512 vmax = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (int64_t i = 0; i < D; i += 16) {
    const __mmask16 m = D - i >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (D - i)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));  // a NaN lane keeps vmax (flagged above)
  }
  const float amax = nan ? NAN : _mm512_reduce_max_ps(vmax);
  *scale = amax / 127.0f;
  if (!(amax > 0.0f) || !(amax <= FLT_MAX)) {
    std::memset(q, 0, D);
    return;
  }
  const __m512 inv = _mm512_set1_ps(127.0f / amax), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
  const __m512 magic = _mm512_set1_ps(12582912.0f);
  for (int64_t i = 0; i < D; i += 16) {
    const __mmask16 m = D - i >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (D - i)) - 1);
    __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), inv);
    v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), v);  // NaN (0 * inf) -> 0
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    v = _mm512_sub_ps(_mm512_add_ps(v, magic), magic);
    _mm_mask_storeu_epi8(q + i, m, _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(v)));
  }
}

}  // namespace kv512

namespace kv2 {

// store_row's int8 rule on AVX2, 8 lanes at a time (the tail by the scalar rule): bit for bit the same.
__attribute__((target("avx2"))) inline void store_row_int8(const float* x, int64_t D, int8_t* q, float* scale) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 vmax = _mm256_setzero_ps();
  int nan = 0;
  int64_t i = 0;
  for (; i + 8 <= D; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    nan |= _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    vmax = _mm256_max_ps(_mm256_andnot_ps(sign, v), vmax);  // a NaN lane keeps vmax (flagged above)
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float amax = 0.0f;
  for (float l : lanes) amax = l > amax ? l : amax;
  for (; i < D; ++i) {
    const float a = std::fabs(x[i]);
    nan |= a != a;
    amax = a > amax ? a : amax;
  }
  if (nan) amax = NAN;
  *scale = amax / 127.0f;
  if (!(amax > 0.0f) || !(amax <= FLT_MAX)) {
    std::memset(q, 0, D);
    return;
  }
  const float inv = 127.0f / amax;
  const __m256 vinv = _mm256_set1_ps(inv), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  const __m256 magic = _mm256_set1_ps(12582912.0f);
  alignas(32) int32_t r[8];
  for (i = 0; i + 8 <= D; i += 8) {
    __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i), vinv);
    v = _mm256_and_ps(v, _mm256_cmp_ps(v, v, _CMP_ORD_Q));  // NaN (0 * inf) -> 0
    v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
    v = _mm256_sub_ps(_mm256_add_ps(v, magic), magic);
    _mm256_store_si256(reinterpret_cast<__m256i*>(r), _mm256_cvttps_epi32(v));
    for (int j = 0; j < 8; ++j) q[i + j] = static_cast<int8_t>(r[j]);
  }
  for (; i < D; ++i) {
    float v = x[i] * inv;
    if (v != v) v = 0.0f;
    v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
    q[i] = static_cast<int8_t>(quant_round(v));
  }
}

}  // namespace kv2

inline void kv_cache_append(const AppendArgs& a) {
  const int64_t T = a.B * a.S;
  if (T <= 0) return;
  const int64_t D = a.D, esz = dtype_size(a.kv_dtype);
  const bool rot = a.cos_sin != nullptr;
  const bool v512 = a.isa == Isa::kAvx512Vnni;  // vector row loads, rotation and stores
  // Threads only when the tokens carry enough bytes to pay for waking them (~ tens of KiB).
  const int64_t bytes = T * (2 * a.Hk + (a.q ? a.Hq : 0)) * D * esz;
  const int threads = bytes >= (int64_t(64) << 10) ? std::max(1, a.num_threads) : 1;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    const int64_t b = t / a.S, s = t % a.S;
    const int64_t slot = a.slots[t];
    const float* cs = rot ? a.cos_sin + a.positions[t] * a.R : nullptr;
    float row[256];
    for (int which = 0; which < 2 && slot >= 0; ++which) {
      const void* src = which ? a.v : a.k;
      const int64_t s0 = which ? a.v_s0 : a.k_s0, s1 = which ? a.v_s1 : a.k_s1, s2 = which ? a.v_s2 : a.k_s2;
      void* cache = which ? a.v_cache : a.k_cache;
      float* scale = which ? a.v_scale : a.k_scale;
      const bool rotate_k = rot && which == 0;
      for (int64_t h = 0; h < a.Hk; ++h) {
        const int64_t base = b * s0 + s * s1 + h * s2, dst = slot * a.Hk + h;
        if (!rotate_k && a.cache_type == static_cast<int>(a.kv_dtype)) {  // same dtype: a plain copy, bit-exact
          std::memcpy(static_cast<char*>(cache) + dst * D * esz, static_cast<const char*>(src) + base * esz, D * esz);
          continue;
        }
        if (v512) {
          rot512::load_row(src, base, a.kv_dtype, row, D);
          if (rotate_k) rotate_row_avx512(row, cs, a.R, a.interleaved, a.kv_dtype);
          if (a.cache_type != 3) {  // cast into the float cache (exact when it is k's dtype: rotated values are)
            rot512::store_row_f(row, cache, dst * D, static_cast<DType>(a.cache_type), D);
          } else {
            kv512::store_row_int8(row, D, static_cast<int8_t*>(cache) + dst * D, scale + dst);
          }
          continue;
        } else {
          for (int64_t d = 0; d < D; ++d) row[d] = load_as_f32(src, base + d, a.kv_dtype);
          if (rotate_k) rotate_row(row, cs, a.R, a.interleaved, a.kv_dtype);
        }
        if (a.cache_type == 3 && a.isa == Isa::kAvx2) {
          kv2::store_row_int8(row, D, static_cast<int8_t*>(cache) + dst * D, scale + dst);
          continue;
        }
        store_row(row, D, cache, a.cache_type, dst, scale);
      }
    }
    // q last: a q that is k (or v) itself, rotated in place, must not be read as k after its rotation.
    if (rot && a.q) {  // q is rotated even for padding tokens (slot -1), as the reference does
      for (int64_t h = 0; h < a.Hq; ++h) {
        const int64_t base = b * a.q_s0 + s * a.q_s1 + h * a.q_s2;
        if (v512) {
          rot512::load_row(a.q, base, a.q_dtype, row, a.R);
          rotate_row_avx512(row, cs, a.R, a.interleaved, a.q_dtype);
          rot512::store_row_f(row, a.q, base, a.q_dtype, a.R);
          continue;
        }
        for (int64_t d = 0; d < a.R; ++d) row[d] = load_as_f32(a.q, base + d, a.q_dtype);
        rotate_row(row, cs, a.R, a.interleaved, a.q_dtype);
        for (int64_t d = 0; d < a.R; ++d) store_from_f32(a.q, base + d, a.q_dtype, row[d]);
      }
    }
  }
}

}  // namespace cpu
}  // namespace llmkern
