// attention (prefill) on the CPU: flash-attention over whole sequences, batched or packed varlen
// (llmkern/ops/attention.py has the semantics). Torch-free; the launcher (csrc/cpu/attention.cpp)
// checks the arguments.
//
// Work is cut into units (sequence b, KV head kh, query tile of Tq positions). A unit owns the
// R = Tq * G query rows (G = Hq / Hk, GQA) that read head kh, row r = t * G + g (position t0 + t,
// query head kh * G + g), so every K/V tile is read once for all G heads. It walks the keys that any
// of its rows can see in tiles of kAttnBN keys (tiles no row sees are never touched: causal/window),
// with an online softmax in fp32 (running max m, sum l per row, accumulator rescaled when m grows):
//   S = Qs K^T   register-blocked: MR rows x (NV * W) keys per micro-tile, FMA over D, on a
//                transposed fp32 copy of the key tile Kt [D, kAttnBN] (zero past the tile's keys)
//   P = exp(S - m_new), masked entries 0 (masks only evaluated on tiles that cut through a row range)
//   acc += P V   MR rows x (NV * W) output columns per micro-tile, over an fp32 copy of the value tile.
// Then out = acc / l (0 when l = 0) and lse = m + log l (-inf when l = 0).
// K and V are first copied once per call to fp32 in those tile layouts (attn_pack_kv; bf16 keys and
// values stay bf16 pairs for the vdpbf16ps path on AVX-512 BF16 CPUs, where P is rounded to bf16 for
// P V): 2 * B * Hk * Sk * D floats of scratch, in exchange for no conversion or transposition in the
// inner loops of every query tile.
// Units are scheduled dynamically, the longest (last query tiles: most causal keys) first.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "llmkern/cpu/attention_simd.h"
#include "llmkern/cpu/convert.h"
#include "llmkern/cpu/features.h"

namespace llmkern {
namespace cpu {

constexpr int kAttnBN = 64;    // keys per tile (a multiple of every W * NV below)
constexpr int kAttnRows = 64;  // target query rows per unit (Tq = ceil(kAttnRows / G) positions)

struct AttnArgs {
  DType dtype = DType::kF32;  // of q, k, v and out
  int64_t B = 0, Hq = 0, Hk = 0, D = 0;
  // Batched (cu_q == nullptr): every sequence has Sq queries and Sk keys, token t of sequence b at
  // b * x_sb + t * x_st. Packed: sequence b is tokens cu_q[b]..cu_q[b+1] (cu_k for keys), token i at
  // i * x_st (x_sb unused). Element (token, head h, d) at token offset + h * x_sh + d.
  const int32_t* cu_q = nullptr;
  const int32_t* cu_k = nullptr;
  int64_t Sq = 0, Sk = 0;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_sb = 0, q_st = 0, q_sh = 0, k_sb = 0, k_st = 0, k_sh = 0, v_sb = 0, v_st = 0, v_sh = 0;
  float scale = 1.0f, softcap = 0.0f;
  bool causal = false;
  int64_t window_left = -1, window_right = -1;
  // Outputs, contiguous: out like q ([B, Sq, Hq, D] or [Tq, Hq, D]); lse [B, Hq, Sq] or [Hq, Tq].
  void* out = nullptr;
  float* lse = nullptr;
  int64_t lse_total = 0;  // packed: Tq (lse row stride)
  int num_threads = 1;
  bool bf16_dot = true;  // bf16 inputs: Q K^T by vdpbf16ps where the CPU has AVX-512 BF16
};

inline int64_t attn_dpad(int64_t D) { return (D + 15) / 16 * 16; }
inline int64_t attn_tile_positions(int64_t G) { return std::max<int64_t>(1, (kAttnRows + G - 1) / G); }

// One unit's view of its sequence: where its tokens live and its mask geometry.
struct AttnSeq {
  int64_t Sq = 0, Sk = 0;
  int64_t q_off = 0, k_off = 0, v_off = 0;  // element offsets of token 0 (head 0)
  int64_t out_tok = 0;                      // out token index of query 0 (out is [tokens, Hq, D])
  int64_t lse_off = 0, lse_sh = 0;          // lse element of (head h, query t): lse_off + h * lse_sh + t
};

inline AttnSeq attn_seq(const AttnArgs& a, int64_t b) {
  AttnSeq s;
  if (a.cu_q) {
    const int64_t q0 = a.cu_q[b], k0 = a.cu_k[b];
    s.Sq = a.cu_q[b + 1] - q0;
    s.Sk = a.cu_k[b + 1] - k0;
    s.q_off = q0 * a.q_st;
    s.k_off = k0 * a.k_st;
    s.v_off = k0 * a.v_st;
    s.out_tok = q0;
    s.lse_off = q0;
    s.lse_sh = a.lse_total;
  } else {
    s.Sq = a.Sq;
    s.Sk = a.Sk;
    s.q_off = b * a.q_sb;
    s.k_off = b * a.k_sb;
    s.v_off = b * a.v_sb;
    s.out_tok = b * a.Sq;
    s.lse_off = b * a.Hq * a.Sq;
    s.lse_sh = a.Sq;
  }
  return s;
}

// Keys [*lo, *hi] (inclusive, clamped to [0, Sk - 1]; empty when hi < lo) that query t sees.
inline void attn_row_range(const AttnArgs& a, int64_t Sq, int64_t Sk, int64_t t, int64_t* lo, int64_t* hi) {
  const int64_t diag = t + Sk - Sq;
  int64_t h = a.causal ? diag : (a.window_right >= 0 ? diag + a.window_right : Sk - 1);
  int64_t l = a.window_left >= 0 ? diag - a.window_left : 0;
  *lo = std::max<int64_t>(l, 0);
  *hi = std::min<int64_t>(h, Sk - 1);
}

// Per-thread scratch, in floats: Qs [R, Dp], S [R, BN], acc [R, Dp], m, l [R], rounded to 16.
inline int64_t attn_thread_floats(int64_t R, int64_t D) {
  return (2 * R * attn_dpad(D) + R * kAttnBN + 2 * R + 15) / 16 * 16;
}

inline int64_t attn_key_tiles(int64_t Sk) { return (Sk + kAttnBN - 1) / kAttnBN; }

// K and V of one (sequence, head) in fp32, in the layouts the micro-kernels read (once per call, so
// each query tile reuses them): kt [tiles][D][BN] (a key tile transposed, so a vector holds W keys of
// one d), vt [tiles * BN][Dp]. Zero past Sk and past D: padded keys and columns add exact zeros.
// pairs (bf16 inputs, vdpbf16ps kernel): kt holds [tiles][D/2][BN] 32-bit bf16 pairs (d even low) instead,
// and vt [tiles * BN / 2][Dp] 32-bit pairs of keys (j even low, j + 1 high) per column: the raw bf16 bits.
inline void attn_pack_kv(const AttnArgs& a, const AttnSeq& s, int64_t kh, float* kt, float* vt, bool pairs) {
  const int64_t D = a.D, Dp = attn_dpad(D), n = attn_key_tiles(s.Sk) * kAttnBN;
  for (int64_t j = 0; j < n; ++j) {
    if (pairs) {
      uint32_t* kcol = reinterpret_cast<uint32_t*>(kt) + (j / kAttnBN) * (D / 2) * kAttnBN + j % kAttnBN;
      const uint16_t* kp = static_cast<const uint16_t*>(a.k) + s.k_off + j * a.k_st + kh * a.k_sh;
      for (int64_t d2 = 0; d2 < D / 2; ++d2)
        kcol[d2 * kAttnBN] = j < s.Sk ? uint32_t(kp[2 * d2]) | (uint32_t(kp[2 * d2 + 1]) << 16) : 0u;
      uint16_t* vhalf = reinterpret_cast<uint16_t*>(vt) + (j / 2) * Dp * 2 + (j & 1);  // column d at 2 d
      const uint16_t* vp = static_cast<const uint16_t*>(a.v) + s.v_off + j * a.v_st + kh * a.v_sh;
      for (int64_t d = 0; d < Dp; ++d) vhalf[2 * d] = j < s.Sk && d < D ? vp[d] : uint16_t(0);
      continue;
    }
    float* kcol = kt + (j / kAttnBN) * D * kAttnBN + j % kAttnBN;
    float* vrow = vt + j * Dp;
    if (j < s.Sk) {
      const int64_t kb = s.k_off + j * a.k_st + kh * a.k_sh, vb = s.v_off + j * a.v_st + kh * a.v_sh;
      if (a.dtype == DType::kF32) {
        const float* kp = static_cast<const float*>(a.k) + kb;
        const float* vp = static_cast<const float*>(a.v) + vb;
        for (int64_t d = 0; d < D; ++d) kcol[d * kAttnBN] = kp[d];
        for (int64_t d = 0; d < D; ++d) vrow[d] = vp[d];
      } else {
        for (int64_t d = 0; d < D; ++d) kcol[d * kAttnBN] = load_as_f32(a.k, kb + d, a.dtype);
        for (int64_t d = 0; d < D; ++d) vrow[d] = load_as_f32(a.v, vb + d, a.dtype);
      }
      for (int64_t d = D; d < Dp; ++d) vrow[d] = 0.0f;
    } else {
      for (int64_t d = 0; d < D; ++d) kcol[d * kAttnBN] = 0.0f;
      for (int64_t d = 0; d < Dp; ++d) vrow[d] = 0.0f;
    }
  }
}

// Lane-wise a / b for each ISA's vector type (the ops structs of attention_simd.h have no division).
LLMKERN_ATT512_INLINE __m512 attn_div(__m512 a, __m512 b) { return _mm512_div_ps(a, b); }
LLMKERN_ATT2_INLINE __m256 attn_div(__m256 a, __m256 b) { return _mm256_div_ps(a, b); }
inline float attn_div(float a, float b) { return a / b; }
// Lane-wise (|x| < 0.25 ? small : big); NaN x picks big.
LLMKERN_ATT512_INLINE __m512 attn_pick_small(__m512 x, __m512 small, __m512 big) {
  const __mmask16 m = _mm512_cmp_ps_mask(_mm512_abs_ps(x), _mm512_set1_ps(0.25f), _CMP_LT_OQ);
  return _mm512_mask_blend_ps(m, big, small);
}
LLMKERN_ATT2_INLINE __m256 attn_pick_small(__m256 x, __m256 small, __m256 big) {
  const __m256 ax = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  return _mm256_blendv_ps(big, small, _mm256_cmp_ps(ax, _mm256_set1_ps(0.25f), _CMP_LT_OQ));
}
inline float attn_pick_small(float x, float small, float big) { return std::fabs(x) < 0.25f ? small : big; }

using AttnUnitFn = void (*)(const AttnArgs&, const AttnSeq&, int64_t, int64_t, int64_t, const float*, const float*,
                            float*);

}  // namespace cpu
}  // namespace llmkern

#define LLMKERN_ATT512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))

#define LLMKERN_AT_BF16DP 0
#define LLMKERN_AT_NS at_avx512
#define LLMKERN_AT_OPS OpsAvx512
#define LLMKERN_AT_ATTR LLMKERN_ATT512
#define LLMKERN_AT_MR 6
#define LLMKERN_AT_NV 4
#include "llmkern/cpu/attention_body.h"
#undef LLMKERN_AT_NS
#undef LLMKERN_AT_ATTR
#undef LLMKERN_AT_BF16DP
#define LLMKERN_AT_BF16DP 1
#define LLMKERN_AT_NS at_avx512bf16
#define LLMKERN_AT_ATTR LLMKERN_ATT512BF16
#include "llmkern/cpu/attention_body.h"
#undef LLMKERN_AT_BF16DP
#define LLMKERN_AT_BF16DP 0
#undef LLMKERN_AT_NS
#undef LLMKERN_AT_OPS
#undef LLMKERN_AT_ATTR
#undef LLMKERN_AT_MR
#undef LLMKERN_AT_NV
#define LLMKERN_AT_NS at_avx2
#define LLMKERN_AT_OPS OpsAvx2
#define LLMKERN_AT_ATTR LLMKERN_ATT2
#define LLMKERN_AT_MR 6
#define LLMKERN_AT_NV 2
#include "llmkern/cpu/attention_body.h"
#undef LLMKERN_AT_NS
#undef LLMKERN_AT_OPS
#undef LLMKERN_AT_ATTR
#undef LLMKERN_AT_MR
#undef LLMKERN_AT_NV
#define LLMKERN_AT_NS at_scalar
#define LLMKERN_AT_OPS OpsScalar
#define LLMKERN_AT_ATTR
#define LLMKERN_AT_MR 4
#define LLMKERN_AT_NV 4
#include "llmkern/cpu/attention_body.h"
#undef LLMKERN_AT_NS
#undef LLMKERN_AT_OPS
#undef LLMKERN_AT_ATTR
#undef LLMKERN_AT_MR
#undef LLMKERN_AT_NV
#undef LLMKERN_AT_BF16DP

namespace llmkern {
namespace cpu {

// Runs the attention of `a` with `ws` (ws_floats floats, from the caller) as its scratch: packed K/V
// and per-thread tiles. Returns 0 when it ran, else (ws too small, e.g. ws_floats 0 to ask) the number
// of floats it needs, without running. The kernel allocates nothing big itself.
inline size_t attention(const AttnArgs& a, Isa isa, float* ws, size_t ws_floats) {
  if (a.B <= 0) return 0;
  // bf16 on AVX-512 BF16 CPUs: Q K^T and P V by vdpbf16ps on raw bf16 pairs (D is a multiple of 8, so even).
  const bool pairs = a.bf16_dot && isa == Isa::kAvx512Vnni && a.dtype == DType::kBF16 && features().avx512_bf16;
  const AttnUnitFn fn = pairs ? &at_avx512bf16::unit
                              : (isa == Isa::kAvx512Vnni ? &at_avx512::unit
                                                         : (isa == Isa::kAvx2 ? &at_avx2::unit : &at_scalar::unit));
  const int64_t G = a.Hq / a.Hk, Tq = attn_tile_positions(G);
  // Units (b, kh, tile), latest query tiles first (they see the most keys when causal).
  std::vector<int64_t> tiles_of(a.B);
  int64_t max_tiles = 0;
  for (int64_t b = 0; b < a.B; ++b) {
    const AttnSeq s = attn_seq(a, b);
    tiles_of[b] = (s.Sq + Tq - 1) / Tq;
    max_tiles = std::max(max_tiles, tiles_of[b]);
  }
  std::vector<int64_t> units;  // b * max_tiles + tile
  units.reserve(a.B * max_tiles);
  for (int64_t tile = max_tiles - 1; tile >= 0; --tile)
    for (int64_t b = 0; b < a.B; ++b)
      if (tile < tiles_of[b]) units.push_back(b * max_tiles + tile);
  const int64_t n_units = static_cast<int64_t>(units.size()) * a.Hk;
  if (n_units == 0) return 0;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(a.num_threads, n_units)));
  const int64_t R = Tq * G, thread_f = attn_thread_floats(R, a.D), Dp = attn_dpad(a.D);
  // Packed K/V: sequence b's head kh at (key_first[b] * Hk + kh * padded keys of b) * D (or * Dp).
  std::vector<int64_t> key_first(a.B + 1, 0);
  for (int64_t b = 0; b < a.B; ++b) key_first[b + 1] = key_first[b] + attn_key_tiles(attn_seq(a, b).Sk) * kAttnBN;
  const int64_t keys = key_first[a.B] * a.Hk;
  // Uninitialized on purpose (every float is written before it is read): no memset of the K/V copy.
  // The caller keeps the workspace between calls (llmkern/ops/attention.py), so layer after layer
  // does not pay fresh pages (faults and zeroing: ~20% of an MHA 2048-token call).
  const size_t need = static_cast<size_t>(thread_f * threads + keys * (a.D + Dp) + 16);
  if (ws == nullptr || ws_floats < need) return need;
  float* raw = ws;
  float* base = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(raw) + 63) / 64 * 64);
  float* kt_all = base + thread_f * threads;
  float* vt_all = kt_all + keys * a.D;

#pragma omp parallel num_threads(threads)
  {
    float* my = base + omp_get_thread_num() * thread_f;
#pragma omp for schedule(dynamic, 1)
    for (int64_t pair = 0; pair < a.B * a.Hk; ++pair) {
      const int64_t b = pair / a.Hk, kh = pair % a.Hk, nb = key_first[b + 1] - key_first[b];
      const int64_t at = key_first[b] * a.Hk + kh * nb;
      attn_pack_kv(a, attn_seq(a, b), kh, kt_all + at * a.D, vt_all + at * Dp, pairs);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < n_units; ++u) {
      const int64_t bt = units[u / a.Hk], kh = u % a.Hk;
      const int64_t b = bt / max_tiles, tile = bt % max_tiles;
      const AttnSeq s = attn_seq(a, b);
      const int64_t t0 = tile * Tq, nt = std::min(Tq, s.Sq - t0);
      const int64_t nb = key_first[b + 1] - key_first[b], at = key_first[b] * a.Hk + kh * nb;
      fn(a, s, kh, t0, nt, kt_all + at * a.D, vt_all + at * Dp, my);
    }
  }
  return 0;
}

}  // namespace cpu
}  // namespace llmkern
