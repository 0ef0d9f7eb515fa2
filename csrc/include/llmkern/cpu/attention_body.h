// One ISA's prefill-attention work unit; included once per ISA by attention.h with
//   LLMKERN_AT_NS    namespace of this copy (avx512 / avx2 / scalar)
//   LLMKERN_AT_OPS   the vector ops struct (attention_simd.h)
//   LLMKERN_AT_ATTR  the target attribute matching those ops
//   LLMKERN_AT_MR    query rows per register micro-tile
//   LLMKERN_AT_NV    vectors per micro-tile row (MR * NV accumulators must fit the register file)
//   LLMKERN_AT_BF16DP 1: bf16 inputs, Q K^T with AVX-512 BF16 dot products (vdpbf16ps) on bf16 pairs
//                    (exact products, fp32 sums, the scale applied to the sums); else 0
// (a template over the ops struct cannot carry a per-ISA target attribute, hence the re-inclusion).
// No include guard on purpose.

namespace llmkern {
namespace cpu {
namespace LLMKERN_AT_NS {

using O = LLMKERN_AT_OPS;
using V = O::V;
constexpr int MR = LLMKERN_AT_MR;
constexpr int NV = LLMKERN_AT_NV;
constexpr int W = O::W;
static_assert(kAttnBN % (NV * W) == 0, "a key tile is a whole number of micro-tiles");

// s [M, BN] (row stride kAttnBN) = q [M, D] (row stride Dp) times the key tile kt [D, BN]: each
// micro-tile keeps M x NV * W scores in registers and does one FMA per (row, key vector, d), so each
// key vector load serves M rows and each broadcast query value NV vectors.
template <int M>
LLMKERN_AT_ATTR inline void qk_block(const float* q, int64_t Dp, const float* kt, int64_t D, float* s) {
  for (int jb = 0; jb < kAttnBN; jb += NV * W) {
    V acc[M][NV];
    for (int i = 0; i < M; ++i)
      for (int v = 0; v < NV; ++v) acc[i][v] = O::zero();
    const float* kp = kt + jb;
    for (int64_t d = 0; d < D; ++d, kp += kAttnBN) {
      V kv[NV];
      for (int v = 0; v < NV; ++v) kv[v] = O::load(kp + v * W);
      for (int i = 0; i < M; ++i) {
        const V qb = O::set1(q[i * Dp + d]);
        for (int v = 0; v < NV; ++v) acc[i][v] = O::fma(qb, kv[v], acc[i][v]);
      }
    }
    for (int i = 0; i < M; ++i)
      for (int v = 0; v < NV; ++v) O::store(s + i * kAttnBN + jb + v * W, acc[i][v]);
  }
}

#if LLMKERN_AT_BF16DP
// qk_block on bf16 pairs: q2 [M, D/2] (row stride Dp) raw bf16 pairs (d even low, d odd high) of the
// queries, kt2 [D/2, BN] the key tile's pairs; one vdpbf16ps does two d per (row, key) lane, so half the
// instructions of the fp32 path. s = scale * q . k.
template <int M>
LLMKERN_AT_ATTR inline void qk_block_bf16(const uint32_t* q2, int64_t Dp, const uint32_t* kt2, int64_t D, float scale,
                                          float* s) {
  static_assert(W == 16, "vdpbf16ps path is AVX-512 only");
  for (int jb = 0; jb < kAttnBN; jb += NV * W) {
    __m512 acc[M][NV];
    for (int i = 0; i < M; ++i)
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
    const uint32_t* kp = kt2 + jb;
    for (int64_t d2 = 0; d2 < D / 2; ++d2, kp += kAttnBN) {
      __m512bh kv[NV];
      for (int v = 0; v < NV; ++v) kv[v] = (__m512bh)_mm512_loadu_si512(kp + v * W);
      for (int i = 0; i < M; ++i) {
        const __m512bh qb = (__m512bh)_mm512_set1_epi32(static_cast<int>(q2[i * Dp + d2]));
        for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], qb, kv[v]);
      }
    }
    const __m512 sc = _mm512_set1_ps(scale);
    for (int i = 0; i < M; ++i)
      for (int v = 0; v < NV; ++v) _mm512_storeu_ps(s + i * kAttnBN + jb + v * W, _mm512_mul_ps(acc[i][v], sc));
  }
}
#endif

// acc [M, Dp] (row stride Dp), columns [c, c + NC * W) += p [M, nk] (row stride kAttnBN) times the
// value tile vt [nk, Dp]: accumulators stay in registers across the nk keys.
template <int M, int NC>
LLMKERN_AT_ATTR inline void pv_block(float* acc, int64_t Dp, const float* p, const float* vt, int nk, int64_t c) {
  V a[M][NC];
  for (int i = 0; i < M; ++i)
    for (int v = 0; v < NC; ++v) a[i][v] = O::load(acc + i * Dp + c + v * W);
  const float* vp = vt + c;
  for (int jj = 0; jj < nk; ++jj, vp += Dp) {
    V vv[NC];
    for (int v = 0; v < NC; ++v) vv[v] = O::load(vp + v * W);
    for (int i = 0; i < M; ++i) {
      const V pb = O::set1(p[i * kAttnBN + jj]);
      for (int v = 0; v < NC; ++v) a[i][v] = O::fma(pb, vv[v], a[i][v]);
    }
  }
  for (int i = 0; i < M; ++i)
    for (int v = 0; v < NC; ++v) O::store(acc + i * Dp + c + v * W, a[i][v]);
}

template <int M>
LLMKERN_AT_ATTR inline void pv_rows(float* acc, int64_t Dp, const float* p, const float* vt, int nk) {
  int64_t c = 0;
  for (; c + NV * W <= Dp; c += NV * W) pv_block<M, NV>(acc, Dp, p, vt, nk, c);
  for (; c < Dp; c += W) pv_block<M, 1>(acc, Dp, p, vt, nk, c);  // Dp is a multiple of 16 >= W
}

#if LLMKERN_AT_BF16DP
// pv_block on bf16 pairs: p2 [M, nk2] (row stride kAttnBN 32-bit words) the weights of keys (2 jj, 2 jj + 1)
// as bf16 pairs, vt2 [nk2, Dp] the value tile's pairs (keys 2 jj low, 2 jj + 1 high, per column d): one
// vdpbf16ps adds two keys' weighted values per (row, column) lane, half the instructions of pv_block.
template <int M, int NC>
LLMKERN_AT_ATTR inline void pv_block_bf16(float* acc, int64_t Dp, const uint32_t* p2, const uint32_t* vt2, int nk2,
                                          int64_t c) {
  __m512 a[M][NC];
  for (int i = 0; i < M; ++i)
    for (int v = 0; v < NC; ++v) a[i][v] = _mm512_loadu_ps(acc + i * Dp + c + v * W);
  const uint32_t* vp = vt2 + c;
  for (int jj = 0; jj < nk2; ++jj, vp += Dp) {
    __m512bh vv[NC];
    for (int v = 0; v < NC; ++v) vv[v] = (__m512bh)_mm512_loadu_si512(vp + v * W);
    for (int i = 0; i < M; ++i) {
      const __m512bh pb = (__m512bh)_mm512_set1_epi32(static_cast<int>(p2[i * kAttnBN + jj]));
      for (int v = 0; v < NC; ++v) a[i][v] = _mm512_dpbf16_ps(a[i][v], pb, vv[v]);
    }
  }
  for (int i = 0; i < M; ++i)
    for (int v = 0; v < NC; ++v) _mm512_storeu_ps(acc + i * Dp + c + v * W, a[i][v]);
}

template <int M>
LLMKERN_AT_ATTR inline void pv_rows_bf16(float* acc, int64_t Dp, const uint32_t* p2, const uint32_t* vt2, int nk2) {
  int64_t c = 0;
  for (; c + NV * W <= Dp; c += NV * W) pv_block_bf16<M, NV>(acc, Dp, p2, vt2, nk2, c);
  for (; c < Dp; c += W) pv_block_bf16<M, 1>(acc, Dp, p2, vt2, nk2, c);
}

// A row's kAttnBN fp32 weights -> kAttnBN / 2 bf16 pairs (nearest even) in the row's first half, in place.
LLMKERN_AT_ATTR inline void weights_to_pairs(float* s) {
  static_assert(kAttnBN == 64, "four vectors of weights per row");
  const __m512 w0 = _mm512_loadu_ps(s), w1 = _mm512_loadu_ps(s + 16), w2 = _mm512_loadu_ps(s + 32),
               w3 = _mm512_loadu_ps(s + 48);
  _mm512_storeu_si512(s, (__m512i)_mm512_cvtne2ps_pbh(w1, w0));  // bf16 0..15 from w0, 16..31 from w1
  _mm512_storeu_si512(s + 16, (__m512i)_mm512_cvtne2ps_pbh(w3, w2));
}
#endif

// The row-count dispatch of a micro-kernel: full MR blocks, then one block of the remaining rows.
#define LLMKERN_AT_ROWS(CALL_M)             \
  {                                         \
    int64_t r = 0;                          \
    for (; r + MR <= R; r += MR) CALL_M(MR); \
    switch (R - r) {                        \
      case 1: CALL_M(1); break;             \
      case 2: if constexpr (MR > 2) CALL_M(2); break; \
      case 3: if constexpr (MR > 3) CALL_M(3); break; \
      case 4: if constexpr (MR > 4) CALL_M(4); break; \
      case 5: if constexpr (MR > 5) CALL_M(5); break; \
      default: break;                       \
    }                                       \
  }

// Online softmax of one row's tile of scores s[0..kAttnBN) (entries past nk or masked are -inf):
// updates the row's running max m and sum l, rescales its accumulator, turns s into the weights.
LLMKERN_AT_ATTR inline void softmax_row(float* s, float* m, float* l, float* acc, int64_t Dp) {
  V mv = O::set1(-INFINITY);
  for (int jj = 0; jj < kAttnBN; jj += W) mv = O::max(mv, O::load(s + jj));
  float mt = O::hmax(mv);
  if (!(mt > -INFINITY)) {  // nothing visible in this tile for this row, or a NaN score
    bool nan = false;
    for (int jj = 0; jj < kAttnBN; ++jj) nan |= s[jj] != s[jj];
    if (nan) *l = NAN;  // a NaN score (NaN in a visible key or query) makes the row NaN, as the reference
    for (int jj = 0; jj < kAttnBN; ++jj) s[jj] = 0.0f;
    return;
  }
  const float mnew = *m > mt ? *m : mt;
  const V mn = O::set1(mnew);
  V sum = O::zero();
  for (int jj = 0; jj < kAttnBN; jj += W) {
    const V p = O::exp(O::sub(O::load(s + jj), mn));
    O::store(s + jj, p);
    sum = O::add(sum, p);
  }
  if (*m != mnew) {
    const float alpha = *m > -INFINITY ? std::exp(*m - mnew) : 0.0f;
    const V av = O::set1(alpha);
    for (int64_t c = 0; c < Dp; c += W) O::store(acc + c, O::mul(O::load(acc + c), av));
    *l *= alpha;
  }
  *l += O::hsum(sum);
  *m = mnew;
}

// s[0..BN) = cap * tanh(s / cap). |x| >= 0.25: tanh(x) = 1 - 2 / (e^(2x) + 1) (exact limits +-1: exp
// saturates at large x and is 0 below -87; NaN stays NaN), a few ulp relative. |x| < 0.25, where that
// form cancels: the odd Taylor series to x^9 (first dropped term < 3e-9 absolute, ~1e-8 relative).
LLMKERN_AT_ATTR inline void softcap_row(float* s, float cap) {
  const V c = O::set1(cap), k = O::set1(1.0f / cap), one = O::set1(1.0f), two = O::set1(2.0f);
  const V c3 = O::set1(-1.0f / 3), c5 = O::set1(2.0f / 15), c7 = O::set1(-17.0f / 315), c9 = O::set1(62.0f / 2835);
  for (int jj = 0; jj < kAttnBN; jj += W) {
    const V x = O::mul(O::load(s + jj), k);
    const V e = O::exp(O::add(x, x));
    const V big = O::sub(one, attn_div(two, O::add(e, one)));
    const V x2 = O::mul(x, x);
    const V poly = O::fma(O::mul(x, x2), O::fma(x2, O::fma(x2, O::fma(x2, c9, c7), c5), c3), x);
    O::store(s + jj, O::mul(c, attn_pick_small(x, poly, big)));
  }
}

// One unit: sequence s, KV head kh, query positions [t0, t0 + nq). kt: the (sequence, head)'s keys
// packed as tiles [ceil(Sk / BN)][D][BN] (fp32, zero past Sk; BF16DP: [..][D/2][BN] bf16 pairs); vt: its values [ceil(Sk / BN) * BN, Dp]
// (fp32, zero past Sk and past D; BF16DP: [ceil(Sk / BN) * BN / 2, Dp] bf16 pairs of consecutive keys).
// ws: attn_thread_floats(nq * G, D) floats of scratch.
// BF16DP rounds the softmax weights P to bf16 for P V (as FlashAttention does on GPUs: 2^-9 relative per
// weight, while the row sums l add the fp32 weights); Q K^T and everything else is as the fp32 path.
LLMKERN_AT_ATTR void unit(const AttnArgs& a, const AttnSeq& sq, int64_t kh, int64_t t0, int64_t nq, const float* kt,
                          const float* vt, float* ws) {
  const int64_t G = a.Hq / a.Hk, R = nq * G, D = a.D, Dp = attn_dpad(D);
  float* qs = ws;
  float* s = qs + R * Dp;
  float* acc = s + R * kAttnBN;
  float* m = acc + R * Dp;
  float* l = m + R;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t t = t0 + r / G, h = kh * G + r % G;
    const int64_t base = sq.q_off + t * a.q_st + h * a.q_sh;
#if LLMKERN_AT_BF16DP
    // Raw bf16 pairs (the scale multiplies the fp32 sums: a scaled query rounded to bf16 would lose bits).
    const uint16_t* qh = static_cast<const uint16_t*>(a.q) + base;
    uint32_t* q2 = reinterpret_cast<uint32_t*>(qs + r * Dp);
    for (int64_t d2 = 0; d2 < D / 2; ++d2) q2[d2] = uint32_t(qh[2 * d2]) | (uint32_t(qh[2 * d2 + 1]) << 16);
    for (int64_t d = 0; d < Dp; ++d) acc[r * Dp + d] = 0.0f;
#else
    for (int64_t d = 0; d < Dp; ++d) {
      qs[r * Dp + d] = d < D ? load_as_f32(a.q, base + d, a.dtype) * a.scale : 0.0f;
      acc[r * Dp + d] = 0.0f;
    }
#endif
    m[r] = -INFINITY;
    l[r] = 0.0f;
  }
  // Keys some row sees: ranges move right with t, so the union is [lo(first row), hi(last row)].
  int64_t lo_first, hi_first, lo_last, hi_last;
  attn_row_range(a, sq.Sq, sq.Sk, t0, &lo_first, &hi_first);
  attn_row_range(a, sq.Sq, sq.Sk, t0 + nq - 1, &lo_last, &hi_last);
  const int64_t j_begin = lo_first / kAttnBN * kAttnBN, j_end = hi_last + 1;  // tile-aligned start
  for (int64_t j0 = j_begin; j0 < j_end; j0 += kAttnBN) {
    const int nk = static_cast<int>(std::min<int64_t>(kAttnBN, sq.Sk - j0));
    // Every row sees every key of the tile: no mask to evaluate.
    const bool full = j0 >= lo_last && j0 + nk - 1 <= hi_first && nk == kAttnBN;
    const float* ktile = kt + (j0 / kAttnBN) * (LLMKERN_AT_BF16DP ? D / 2 : D) * kAttnBN;  // BF16DP: pairs
#if LLMKERN_AT_BF16DP
#define LLMKERN_AT_QK(M_)                                                                                  \
  qk_block_bf16<M_>(reinterpret_cast<const uint32_t*>(qs + r * Dp), Dp, reinterpret_cast<const uint32_t*>(ktile), D, \
                    a.scale, s + r * kAttnBN)
#else
#define LLMKERN_AT_QK(M_) qk_block<M_>(qs + r * Dp, Dp, ktile, D, s + r * kAttnBN)
#endif
    LLMKERN_AT_ROWS(LLMKERN_AT_QK)
#undef LLMKERN_AT_QK
    for (int64_t r = 0; r < R; ++r) {
      float* sr = s + r * kAttnBN;
      if (a.softcap > 0.0f) softcap_row(sr, a.softcap);
      if (!full) {
        int64_t lo, hi;
        attn_row_range(a, sq.Sq, sq.Sk, t0 + r / G, &lo, &hi);
        for (int jj = 0; jj < kAttnBN; ++jj) {
          const int64_t j = j0 + jj;
          if (j < lo || j > hi) sr[jj] = -INFINITY;  // also every j >= Sk (hi <= Sk - 1)
        }
      }
      softmax_row(sr, m + r, l + r, acc + r * Dp, Dp);
    }
#if LLMKERN_AT_BF16DP
    for (int64_t r = 0; r < R; ++r) weights_to_pairs(s + r * kAttnBN);
    // (an odd nk's last pair takes key nk: weight 0, value row 0, both written as such)
    const uint32_t* vt2 = reinterpret_cast<const uint32_t*>(vt) + (j0 / 2) * Dp;
#define LLMKERN_AT_PV(M_) \
  pv_rows_bf16<M_>(acc + r * Dp, Dp, reinterpret_cast<const uint32_t*>(s + r * kAttnBN), vt2, (nk + 1) / 2)
#else
    const float* vtile = vt + j0 * Dp;
#define LLMKERN_AT_PV(M_) pv_rows<M_>(acc + r * Dp, Dp, s + r * kAttnBN, vtile, nk)
#endif
    LLMKERN_AT_ROWS(LLMKERN_AT_PV)
#undef LLMKERN_AT_PV
  }
  // out = acc / l, lse = m + log l; a row that saw no key (l == 0) gets 0 and -inf.
  for (int64_t r = 0; r < R; ++r) {
    const int64_t t = t0 + r / G, h = kh * G + r % G;
    const float lr = l[r];
    const float inv = lr > 0.0f ? 1.0f / lr : (lr == 0.0f ? 0.0f : lr);  // l NaN -> NaN row
    const int64_t o = ((sq.out_tok + t) * a.Hq + h) * D;
    if (a.dtype == DType::kF32) {
      float* out = static_cast<float*>(a.out) + o;
      for (int64_t d = 0; d < D; ++d) out[d] = acc[r * Dp + d] * inv;
    } else {
      for (int64_t d = 0; d < D; ++d) store_from_f32(a.out, o + d, a.dtype, acc[r * Dp + d] * inv);
    }
    if (a.lse) a.lse[sq.lse_off + h * sq.lse_sh + t] = lr > 0.0f ? m[r] + std::log(lr) : (lr == 0.0f ? -INFINITY : lr);
  }
}

}  // namespace LLMKERN_AT_NS
}  // namespace cpu
}  // namespace llmkern

#undef LLMKERN_AT_ROWS
