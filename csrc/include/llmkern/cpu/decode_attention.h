// decode_attention on the CPU: each sequence's Sq newest queries attend over its cached keys/values
// (llmkern/ops/decode_attention.py has the semantics). Torch-free; the launcher
// (csrc/cpu/decode_attention.cpp) checks the arguments.
//
// Work is cut into units (sequence b, split s of b's visible keys). A unit handles every KV head and
// all Hk * R query rows (R = G * Sq, G = Hq / Hk: GQA) together: it walks its keys in tiles of
// kDecodeTile whole token rows (all heads of a token are contiguous in the cache), so a thread reads
// K and V as two sequential streams and every K/V row is loaded once for the G query heads that share
// it. Per tile: scores (dot products, W keys at a time), a running max m / sum l per row with an online
// softmax in fp32, the accumulator rescaled when the max grows, then acc += p V. int8 caches are
// dequantized on the fly: the key scale multiplies the score, the value scale the weight (with a 16-bit q on
// AVX-512 VNNI or AVX2 the dot products are int16 ones: decode_attention_i16.h, _i16_avx2.h).
// Long contexts are split across threads (split-KV): each split leaves (m, l, acc) in the workspace
// and a second pass merges them exactly, per (sequence, KV head): M = max m_s,
// out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s. A sequence with one split stores directly.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "llmkern/cpu/attention_simd.h"
#include "llmkern/cpu/convert.h"
#include "llmkern/cpu/decode_attention_avx512.h"
#include "llmkern/cpu/decode_attention_i16.h"
#include "llmkern/cpu/decode_attention_i16_avx2.h"
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
  bool bf16_dot = true;  // bf16 q and cache on AVX-512 BF16 CPUs: scores by vdpbf16ps (decode_bf16_pairs)
  bool i16_dot = true;   // 16-bit q with an int8 cache, AVX-512 VNNI / AVX2: int16 dot products (decode_i16_dot)
};

// Whether the scores of `a` come from AVX-512 BF16 dot products on raw bf16 pairs (da512::qk_bf16_rows): bf16 q
// with a bf16 cache, on the AVX-512 path of a CPU that has AVX512_BF16, unless a.bf16_dot is off. The unit's qf
// rows then hold q's raw bf16 values (2 * Dp of them per row, zeros past D) instead of fp32 q * scale.
inline bool decode_bf16_pairs(const DecodeArgs& a, Isa isa) {
  return a.bf16_dot && isa == Isa::kAvx512Vnni && a.q_dtype == DType::kBF16 && a.kv_type == kKvBF16 &&
         features().avx512_bf16;
}

// Whether q . k and p . v of `a` are int16 dot products (decode_attention_i16.h, _i16_avx2.h): a bf16 or f16 q with
// an int8 cache, on the AVX-512 VNNI or AVX2 path, unless a.i16_dot is off. The unit's qf rows then hold q quantized
// to int16 (2 * Dp of them per row, zeros past D) and its extra scratch their scales.
inline bool decode_i16_dot(const DecodeArgs& a, Isa isa) {
  return a.i16_dot && isa != Isa::kScalar && a.q_dtype != DType::kF32 && a.kv_type == kKvI8;
}

// The int16 pieces of one ISA, for the body's `if constexpr` branches (the AVX-512 copy handles 16 keys per block,
// the AVX2 copy 8: the body's W).
struct DecodeI16Avx512 {
  static constexpr Isa kIsa = Isa::kAvx512Vnni;
  static constexpr auto keys = &da512::keys_i16;
  static constexpr auto qk = &da512::qk_i16_rows;
  static constexpr auto quant_w = &da512::quant_w16;
  static constexpr auto pv = &da512::pv_i16_rows;
};
struct DecodeI16Avx2 {
  static constexpr Isa kIsa = Isa::kAvx2;
  static constexpr auto keys = &da2::keys_i16;
  static constexpr auto qk = &da2::qk_i16_rows;
  static constexpr auto quant_w = &da2::quant_w16;
  static constexpr auto pv = &da2::pv_i16_rows;
};

inline int64_t decode_dpad(int64_t D) { return (D + 15) / 16 * 16; }

// Splits per sequence at most, never below kDecodeMinSplit keys each: one unit per thread when the
// sequences divide evenly that way (B = 1: `threads` splits), else ~2 units per thread so that dynamic
// scheduling evens them out (B = 3, 2 threads: 6 units, not 3). Each unit starts with a tile it cannot
// prefetch behind compute, converts its queries and adds a merge: one unit per thread instead of two
// measured 1-5% faster (SmolLM2 and Llama-3 B1, L 512-4096, 2 threads, cold, interleaved A/B), four
// per thread slower still (SmolLM2 B1 L1024: ~72 vs ~62 us).
inline int64_t decode_max_splits(int64_t B, int64_t capacity, int threads) {
  const int64_t seqs = std::max<int64_t>(1, B), T = threads;
  if (threads <= 1 || seqs >= 2 * T) return 1;
  int64_t want = (T + seqs - 1) / seqs;
  if ((seqs * want) % T) want = (2 * T + seqs - 1) / seqs;
  const int64_t most = std::max<int64_t>(1, (capacity + kDecodeMinSplit - 1) / kDecodeMinSplit);
  return std::min(want, most);
}

// Floats of one unit's softmax state [R, Dp] + m [R] + l [R], rounded to 16 (64 bytes).
inline int64_t decode_unit_floats(int64_t R, int64_t D) { return (R * decode_dpad(D) + 2 * R + 15) / 16 * 16; }
// Floats of one thread's scratch for RA rows of Hk heads: qf [RA, Dp], scores [RA, tile], key/value
// scales [Hk, tile] each, key/value row pointers [tile] each (8 bytes: 2 floats), kf [16, Dp]: one
// block of keys converted to fp32 (int8/bf16/f16 caches), then the int16 path's extra (decode_i16_dot):
// q scales [RA], weight scales [RA], int16 weights [RA, tile] (tile / 2 floats a row).
inline int64_t decode_thread_floats(int64_t RA, int64_t Hk, int64_t D) {
  return (RA * decode_dpad(D) + RA * kDecodeTile + 2 * Hk * kDecodeTile + 4 * kDecodeTile + 16 * decode_dpad(D) +
          2 * RA + RA * kDecodeTile / 2 + 15) /
         16 * 16;
}

inline int64_t decode_workspace_bytes(int64_t B, int64_t Sq, int64_t Hq, int64_t Hk, int64_t D, int64_t capacity,
                                      int threads) {
  const int64_t RA = Hq * Sq, ns = decode_max_splits(B, capacity, threads);
  return 4 * (B * ns * decode_unit_floats(RA, D) + int64_t(threads) * decode_thread_floats(RA, Hk, D)) + 64;
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

using DecodeUnitFn = void (*)(const DecodeArgs&, int64_t, int64_t, int64_t, const float*, float*, float*, float*,
                              float*, const char**, const char**, float*, float*, float*, float*);

namespace detail {

// Keys [lo, len) that some query row of sequence b can see (row t sees [pos_t - window, pos_t]).
inline void decode_key_range(const DecodeArgs& a, int64_t len, int64_t* lo, int64_t* hi) {
  *hi = len;
  *lo = (a.window_left >= 0 && len > 0) ? std::max<int64_t>(0, len - a.Sq - a.window_left) : 0;
}

inline int64_t decode_splits_of(int64_t n, int64_t max_splits) {
  return std::max<int64_t>(1, std::min(max_splits, (n + kDecodeMinSplit - 1) / kDecodeMinSplit));
}

// Store the R rows of KV head kh, normalized: out(b, t, kh * G + g) = acc[r] / l[r] (0 when l is 0);
// acc and l point at the head's first row.
inline void decode_store(const DecodeArgs& a, int64_t b, int64_t kh, const float* acc, const float* l) {
  const int64_t G = a.Hq / a.Hk, Dp = decode_dpad(a.D);
  for (int64_t r = 0; r < G * a.Sq; ++r) {
    const int64_t t = r / G, h = kh * G + r % G;
    const int64_t o = ((b * a.Sq + t) * a.Hq + h) * a.D;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : (l[r] == 0.0f ? 0.0f : l[r]);  // l NaN -> NaN row
    for (int64_t d = 0; d < a.D; ++d) store_from_f32(a.out, o + d, a.q_dtype, acc[r * Dp + d] * inv);
  }
}

// Whether int16 holds the q row qi (quant_q16: +-32767 at the row's largest magnitude) about as well as the
// row's 16-bit source does: at least half of its D values quantize to magnitude >= 256, i.e. lie within 2^7 of
// the largest, so the grid's step (largest / 32767) is at most 2^-8 of the row's median magnitude, finer than
// bf16's own spacing there. A row with an outlier channel (the rest far below it) fails: its small values would
// keep only a few bits, and keys that are zero on the outlier channel see only those (2.4% output error at
// 2000x the rest, found by fuzzing); it takes the fp32 path. Zero and NaN / inf rows (quantized to zeros) fail too.
inline bool q16_fine(const int16_t* qi, int64_t D) {
  int64_t big = 0;
  for (int64_t d = 0; d < D; ++d) big += (qi[d] >= 256) | (qi[d] <= -256);
  return 2 * big >= D;
}

}  // namespace detail

inline void decode_attention(const DecodeArgs& a, Isa isa) {
  if (a.B <= 0) return;
  const DecodeUnitFn fn = isa == Isa::kAvx512Vnni ? &da_avx512::unit : (isa == Isa::kAvx2 ? &da_avx2::unit : &da_scalar::unit);
  const int threads = std::max(1, a.num_threads);
  const int64_t G = a.Hq / a.Hk, R = G * a.Sq, RA = a.Hk * R, Dp = decode_dpad(a.D);
  const int64_t ns_max = decode_max_splits(a.B, a.capacity, threads);
  const int64_t unit_f = decode_unit_floats(RA, a.D), thread_f = decode_thread_floats(RA, a.Hk, a.D);
  float* ws = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(a.ws) + 63) / 64 * 64);
  float* units = ws;
  float* scratch = ws + a.B * ns_max * unit_f;
  const int64_t n_units = a.B * ns_max;
  // Unit state: acc [RA, Dp], then m [RA], then l [RA]; head kh's rows start at row kh * R.
  const int64_t m_off = RA * Dp, l_off = RA * Dp + RA;
  const bool pairs = decode_bf16_pairs(a, isa), i16 = decode_i16_dot(a, isa);
  DecodeArgs a_fp32 = a;  // the same call on the fp32 path (a sequence whose q rows int16 cannot hold)
  a_fp32.i16_dot = false;

  // One unit: its queries in fp32 (times the softmax scale, zero padding [D, Dp)), the unit kernel, and
  // the normalized store when the sequence has a single split.
  const auto run_unit = [&](int64_t u, float* my) {
    const int64_t b = u / ns_max, sp = u % ns_max;
    const int64_t len = a.seq_lens[b];
    int64_t lo, hi;
    detail::decode_key_range(a, len, &lo, &hi);
    const int64_t ns = detail::decode_splits_of(hi - lo, ns_max);
    if (sp >= ns) return;
    float* qf = my;
    float* s = qf + RA * Dp;
    float* ksc = s + RA * kDecodeTile;
    float* vsc = ksc + a.Hk * kDecodeTile;
    const char** kp = reinterpret_cast<const char**>(vsc + a.Hk * kDecodeTile);  // 8-byte aligned: offsets are even
    const char** vp = kp + kDecodeTile;
    float* kf = reinterpret_cast<float*>(vp + kDecodeTile);
    float* ex = kf + 16 * Dp;  // int16 path: q scales [RA], weight scales [RA], int16 weights [RA, tile]
    // Split sp covers [j0, j1): equal whole tiles, the last split takes the remainder.
    const int64_t per = ((hi - lo + ns - 1) / ns + kDecodeTile - 1) / kDecodeTile * kDecodeTile;
    const int64_t j0 = std::min(hi, lo + sp * per), j1 = std::min(hi, j0 + per);
    // A row whose int16 grid is coarse for most of its values (an outlier channel: detail::q16_fine) sends the
    // whole sequence to the fp32 path; every unit of sequence b sees the same rows, so its splits agree on it.
    bool unit_i16 = i16;
    for (int64_t rr = 0; rr < RA; ++rr) {
      const int64_t kh = rr / R, r = rr % R, t = r / G, h = kh * G + r % G;
      const int64_t base = b * a.q_sb + t * a.q_st + h * a.q_sh;
      if (pairs) {  // raw bf16, row stride 2 * Dp elements (>= D rounded up to 32, the dot's chunk)
        uint16_t* qb = reinterpret_cast<uint16_t*>(qf + rr * Dp);
        for (int64_t d = 0; d < 2 * Dp; ++d) qb[d] = d < a.D ? static_cast<const uint16_t*>(a.q)[base + d] : 0;
        continue;
      }
      if (unit_i16) {  // int16, row stride 2 * Dp elements; the row's scale (times the softmax scale) in ex[rr]
        float* x = kf;  // the key block scratch ([16, Dp] >= D floats), free until the unit starts
        for (int64_t d = 0; d < a.D; ++d) x[d] = load_as_f32(a.q, base + d, a.q_dtype);
        int16_t* qi = reinterpret_cast<int16_t*>(qf + rr * Dp);
        ex[rr] = (isa == Isa::kAvx512Vnni ? da512::quant_q16(x, a.D, qi, 2 * Dp) : da2::quant_q16(x, a.D, qi, 2 * Dp)) *
                 a.scale;
        if (detail::q16_fine(qi, a.D)) continue;
        unit_i16 = false;
        rr = -1;  // start over: every row in fp32
        continue;
      }
      for (int64_t d = 0; d < Dp; ++d) qf[rr * Dp + d] = d < a.D ? load_as_f32(a.q, base + d, a.q_dtype) * a.scale : 0.0f;
    }
    float* st = units + u * unit_f;
    fn(i16 && !unit_i16 ? a_fp32 : a, b, j0, j1, qf, st, st + m_off, st + l_off, s, kp, vp, ksc, vsc, kf, ex);
    if (ns == 1)
      for (int64_t kh = 0; kh < a.Hk; ++kh) detail::decode_store(a, b, kh, st + kh * R * Dp, st + l_off + kh * R);
  };
  // Merge the splits of (sequence, KV head) pair when it had more than one.
  const auto merge_pair = [&](int64_t pair) {
    const int64_t b = pair / a.Hk, kh = pair % a.Hk;
    int64_t lo, hi;
    detail::decode_key_range(a, a.seq_lens[b], &lo, &hi);
    const int64_t ns = detail::decode_splits_of(hi - lo, ns_max);
    if (ns == 1) return;
    float* first = units + b * ns_max * unit_f;  // split 0's state receives the merge
    for (int64_t r = kh * R; r < (kh + 1) * R; ++r) {
      float M = -INFINITY;
      for (int64_t sp = 0; sp < ns; ++sp) M = std::max(M, first[sp * unit_f + m_off + r]);
      float* acc0 = first + r * Dp;
      float L = 0.0f;
      for (int64_t sp = 0; sp < ns; ++sp) {
        const float* st = first + sp * unit_f;
        const float ms = st[m_off + r];
        const float w = (ms > -INFINITY) ? std::exp(ms - M) : 0.0f;
        L += w * st[l_off + r];
        if (sp == 0) {
          for (int64_t d = 0; d < a.D; ++d) acc0[d] *= w;
        } else {
          for (int64_t d = 0; d < a.D; ++d) acc0[d] += w * st[r * Dp + d];
        }
      }
      first[l_off + r] = L;
    }
    detail::decode_store(a, b, kh, first + kh * R * Dp, first + l_off + kh * R);
  };
  // Units that have keys (or a zero-length sequence's single unit, which stores zeros); a call with one
  // such unit (B = 1 with a short context: the runtime's common case) or one thread runs on the calling
  // thread, without an OpenMP region (its fork and barriers cost ~2 us with 2 threads).
  int64_t work = 0;
  bool any_split = false;
  for (int64_t b = 0; b < a.B && work <= threads; ++b) {
    int64_t lo, hi;
    detail::decode_key_range(a, a.seq_lens[b], &lo, &hi);
    const int64_t ns = detail::decode_splits_of(hi - lo, ns_max);
    work += ns;
    any_split = any_split || ns > 1;
  }
  if (threads == 1 || work <= 1) {
    for (int64_t u = 0; u < n_units; ++u) run_unit(u, scratch);
    if (any_split)
      for (int64_t pair = 0; pair < a.B * a.Hk; ++pair) merge_pair(pair);
    return;
  }
  const int team = static_cast<int>(std::min<int64_t>(threads, work));
#pragma omp parallel num_threads(team)
  {
    float* my = scratch + omp_get_thread_num() * thread_f;
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < n_units; ++u) run_unit(u, my);
    // (implicit barrier above)
#pragma omp for schedule(static)
    for (int64_t pair = 0; pair < a.B * a.Hk; ++pair) merge_pair(pair);
  }
}

}  // namespace cpu
}  // namespace llmkern
