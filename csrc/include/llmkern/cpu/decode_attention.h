// decode_attention on the CPU: each sequence's Sq newest queries attend over its cached keys/values
// (llmkern/ops/decode_attention.py has the semantics). Torch-free; the launcher
// (csrc/cpu/decode_attention.cpp) checks the arguments.
//
// Work is cut into units (sequence b, KV head kh, split s of b's visible keys). A unit handles all
// R = G * Sq query rows that read head kh (G = Hq / Hk: GQA) together, so every K/V row is loaded
// once per unit, and walks its keys in tiles of kDecodeTile with an online softmax in fp32:
// scores of the tile (dot products), a running max m / sum l per row, the accumulator rescaled when
// the max grows, then acc += p V. int8 caches are dequantized on the fly: the key scale multiplies
// the score, the value scale the weight.
// Long contexts are split across threads (split-KV): each split leaves (m, l, acc) in the workspace
// and a second pass merges them exactly: M = max m_s, out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s.
// A sequence with one split normalizes and stores directly.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "llmkern/cpu/attention_simd.h"
#include "llmkern/cpu/convert.h"
#include "llmkern/cpu/features.h"

namespace llmkern {
namespace cpu {

constexpr int kDecodeTile = 32;             // keys per softmax tile (a multiple of every W)
constexpr int64_t kDecodeMinSplit = 128;    // fewest keys worth a split of their own

struct DecodeArgs {
  const void* q = nullptr;  // [B, Sq, Hq, D] in q_dtype: element (b, t, h, d) at b*q_sb + t*q_st + h*q_sh + d
  DType q_dtype = DType::kF32;
  int64_t q_sb = 0, q_st = 0, q_sh = 0;
  int64_t B = 0, Sq = 1, Hq = 0, Hk = 0, D = 0;
  int kv_type = kKvF32;  // KvType; float caches have q's dtype
  // Caches: element (row, col, head, d) at row*s0 + col*s1 + head*s2 + d. Contiguous (block_size 0):
  // row = sequence b, col = token j; paged: row = block_table[b, j / block_size], col = j % block_size.
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t k_s0 = 0, k_s1 = 0, k_s2 = 0, v_s0 = 0, v_s1 = 0, v_s2 = 0;
  const float* k_scale = nullptr;  // int8 only: (row, col, head) at row*ks_s0 + col*ks_s1 + head*ks_s2
  const float* v_scale = nullptr;
  int64_t ks_s0 = 0, ks_s1 = 0, ks_s2 = 0, vs_s0 = 0, vs_s1 = 0, vs_s2 = 0;
  const int32_t* seq_lens = nullptr;     // [B]
  const int32_t* block_table = nullptr;  // [B, *] with row stride bt_stride, or null (contiguous)
  int64_t bt_stride = 0, block_size = 0;
  int64_t capacity = 0;  // most tokens a sequence can hold (Smax, or max_blocks * block_size)
  float scale = 1.0f, softcap = 0.0f;
  int64_t window_left = -1;
  void* out = nullptr;  // contiguous [B, Sq, Hq, D] in q_dtype
  void* ws = nullptr;   // decode_workspace_bytes(...)
  int num_threads = 1;
};

inline int64_t decode_dpad(int64_t D) { return (D + 15) / 16 * 16; }

// Splits per sequence at most: enough units for ~4 per thread, never below kDecodeMinSplit keys each.
inline int64_t decode_max_splits(int64_t B, int64_t Hk, int64_t capacity, int threads) {
  const int64_t pairs = std::max<int64_t>(1, B * Hk), target = 4 * int64_t(threads);
  if (threads <= 1 || pairs >= target) return 1;
  const int64_t want = (target + pairs - 1) / pairs;
  const int64_t most = std::max<int64_t>(1, (capacity + kDecodeMinSplit - 1) / kDecodeMinSplit);
  return std::min(want, most);
}

// Floats of one unit's softmax state [R, Dp] + m [R] + l [R], rounded to 16 (64 bytes).
inline int64_t decode_unit_floats(int64_t R, int64_t D) { return (R * decode_dpad(D) + 2 * R + 15) / 16 * 16; }
// Floats of one thread's scratch: qf [R, Dp], scores [R, tile], key/value scales and pointers.
inline int64_t decode_thread_floats(int64_t R, int64_t D) {
  return (R * decode_dpad(D) + R * kDecodeTile + 6 * kDecodeTile + 15) / 16 * 16;
}

inline int64_t decode_workspace_bytes(int64_t B, int64_t Sq, int64_t Hq, int64_t Hk, int64_t D, int64_t capacity,
                                      int threads) {
  const int64_t R = Hq / Hk * Sq, ns = decode_max_splits(B, Hk, capacity, threads);
  return 4 * (B * Hk * ns * decode_unit_floats(R, D) + int64_t(threads) * decode_thread_floats(R, D)) + 64;
}

}  // namespace cpu
}  // namespace llmkern

#define LLMKERN_DA_NS da_avx512
#define LLMKERN_DA_OPS OpsAvx512
#define LLMKERN_DA_ATTR LLMKERN_ATT512
#include "llmkern/cpu/decode_attention_body.h"
#undef LLMKERN_DA_NS
#undef LLMKERN_DA_OPS
#undef LLMKERN_DA_ATTR
#define LLMKERN_DA_NS da_avx2
#define LLMKERN_DA_OPS OpsAvx2
#define LLMKERN_DA_ATTR LLMKERN_ATT2
#include "llmkern/cpu/decode_attention_body.h"
#undef LLMKERN_DA_NS
#undef LLMKERN_DA_OPS
#undef LLMKERN_DA_ATTR
#define LLMKERN_DA_NS da_scalar
#define LLMKERN_DA_OPS OpsScalar
#define LLMKERN_DA_ATTR
#include "llmkern/cpu/decode_attention_body.h"
#undef LLMKERN_DA_NS
#undef LLMKERN_DA_OPS
#undef LLMKERN_DA_ATTR

namespace llmkern {
namespace cpu {

using DecodeUnitFn = void (*)(const DecodeArgs&, int64_t, int64_t, int64_t, int64_t, const float*, float*, float*,
                              float*, float*, const void**, const void**, float*, float*);

namespace detail {

// Keys [lo, len) that some query row of sequence b can see (row t sees [pos_t - window, pos_t]).
inline void decode_key_range(const DecodeArgs& a, int64_t len, int64_t* lo, int64_t* hi) {
  *hi = len;
  *lo = (a.window_left >= 0 && len > 0) ? std::max<int64_t>(0, len - a.Sq - a.window_left) : 0;
}

inline int64_t decode_splits_of(int64_t n, int64_t max_splits) {
  return std::max<int64_t>(1, std::min(max_splits, (n + kDecodeMinSplit - 1) / kDecodeMinSplit));
}

// Store rows r of a normalized accumulator: out(b, t, kh * G + g) = acc[r] / l[r] (0 when l is 0).
inline void decode_store(const DecodeArgs& a, int64_t b, int64_t kh, const float* acc, const float* l) {
  const int64_t G = a.Hq / a.Hk, Dp = decode_dpad(a.D);
  for (int64_t r = 0; r < G * a.Sq; ++r) {
    const int64_t t = r / G, h = kh * G + r % G;
    const int64_t o = ((b * a.Sq + t) * a.Hq + h) * a.D;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : (l[r] == 0.0f ? 0.0f : l[r]);  // l NaN -> NaN row
    for (int64_t d = 0; d < a.D; ++d) store_from_f32(a.out, o + d, a.q_dtype, acc[r * Dp + d] * inv);
  }
}

}  // namespace detail

inline void decode_attention(const DecodeArgs& a, Isa isa) {
  if (a.B <= 0) return;
  const DecodeUnitFn fn = isa == Isa::kAvx512Vnni ? &da_avx512::unit : (isa == Isa::kAvx2 ? &da_avx2::unit : &da_scalar::unit);
  const int threads = std::max(1, a.num_threads);
  const int64_t G = a.Hq / a.Hk, R = G * a.Sq, Dp = decode_dpad(a.D);
  const int64_t ns_max = decode_max_splits(a.B, a.Hk, a.capacity, threads);
  const int64_t unit_f = decode_unit_floats(R, a.D), thread_f = decode_thread_floats(R, a.D);
  float* ws = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(a.ws) + 63) / 64 * 64);
  float* units = ws;
  float* scratch = ws + a.B * a.Hk * ns_max * unit_f;
  const int64_t n_units = a.B * a.Hk * ns_max;

#pragma omp parallel num_threads(threads)
  {
    float* my = scratch + omp_get_thread_num() * thread_f;
    float* qf = my;
    float* s = qf + R * Dp;
    float* ksc = s + R * kDecodeTile;
    float* vsc = ksc + kDecodeTile;
    const void** kp = reinterpret_cast<const void**>(vsc + kDecodeTile);  // 8-byte aligned: offsets are even
    const void** vp = kp + kDecodeTile;
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < n_units; ++u) {
      const int64_t b = u / (a.Hk * ns_max), kh = (u / ns_max) % a.Hk, sp = u % ns_max;
      const int64_t len = a.seq_lens[b];
      int64_t lo, hi;
      detail::decode_key_range(a, len, &lo, &hi);
      const int64_t ns = detail::decode_splits_of(hi - lo, ns_max);
      if (sp >= ns) continue;
      // Split sp covers [j0, j1): equal whole tiles, the last split takes the remainder.
      const int64_t per = ((hi - lo + ns - 1) / ns + kDecodeTile - 1) / kDecodeTile * kDecodeTile;
      const int64_t j0 = std::min(hi, lo + sp * per), j1 = std::min(hi, j0 + per);
      // Queries of the unit's rows in fp32, times the softmax scale; the padding [D, Dp) is 0.
      for (int64_t r = 0; r < R; ++r) {
        const int64_t t = r / G, h = kh * G + r % G;
        const int64_t base = b * a.q_sb + t * a.q_st + h * a.q_sh;
        for (int64_t d = 0; d < Dp; ++d) qf[r * Dp + d] = d < a.D ? load_as_f32(a.q, base + d, a.q_dtype) * a.scale : 0.0f;
      }
      float* acc = units + u * unit_f;
      float* m = acc + R * Dp;
      float* l = m + R;
      fn(a, b, kh, j0, j1, qf, acc, m, l, s, kp, vp, ksc, vsc);
      if (ns == 1) detail::decode_store(a, b, kh, acc, l);
    }
    // Merge the splits of every (sequence, head) that had more than one (implicit barrier above).
#pragma omp for schedule(static)
    for (int64_t pair = 0; pair < a.B * a.Hk; ++pair) {
      const int64_t b = pair / a.Hk, kh = pair % a.Hk;
      int64_t lo, hi;
      detail::decode_key_range(a, a.seq_lens[b], &lo, &hi);
      const int64_t ns = detail::decode_splits_of(hi - lo, ns_max);
      if (ns == 1) continue;
      float* first = units + pair * ns_max * unit_f;  // split 0's state receives the merge
      for (int64_t r = 0; r < R; ++r) {
        float M = -INFINITY;
        for (int64_t sp = 0; sp < ns; ++sp) M = std::max(M, first[sp * unit_f + R * Dp + r]);
        float* acc0 = first + r * Dp;
        float L = 0.0f;
        for (int64_t sp = 0; sp < ns; ++sp) {
          const float* st = first + sp * unit_f;
          const float ms = st[R * Dp + r];
          const float w = (ms > -INFINITY) ? std::exp(ms - M) : 0.0f;
          L += w * st[R * Dp + R + r];
          if (sp == 0) {
            for (int64_t d = 0; d < a.D; ++d) acc0[d] *= w;
          } else {
            for (int64_t d = 0; d < a.D; ++d) acc0[d] += w * st[r * Dp + d];
          }
        }
        first[R * Dp + R + r] = L;
      }
      detail::decode_store(a, b, kh, first, first + R * Dp + R);
    }
  }
}

}  // namespace cpu
}  // namespace llmkern
