// One ISA's decode-attention work unit; included once per ISA by decode_attention.h with
//   LLMKERN_DA_NS    namespace of this copy (avx512 / avx2 / scalar)
//   LLMKERN_DA_OPS   the vector ops struct (attention_simd.h)
//   LLMKERN_DA_ATTR  the target attribute matching those ops
// (a template over the ops struct cannot carry a per-ISA target attribute, hence the re-inclusion).
// No include guard on purpose.

namespace llmkern {
namespace cpu {
namespace LLMKERN_DA_NS {

using O = LLMKERN_DA_OPS;
using V = O::V;

// s[r * kTile + jj] = dot(qf row r, key row) for NR rows starting at qf, one key row `k` of D values.
template <int KT, int NR>
LLMKERN_DA_ATTR inline void qk_rows(const float* qf, int64_t Dp, const void* k, int64_t D, float* s, int jj) {
  V acc[NR];
  for (int i = 0; i < NR; ++i) acc[i] = O::zero();
  for (int64_t c = 0; c < D; c += O::W) {
    const V kv = O::template load_kv<KT>(k, c, static_cast<int>(D - c));
    for (int i = 0; i < NR; ++i) acc[i] = O::fma(O::load(qf + i * Dp + c), kv, acc[i]);
  }
  for (int i = 0; i < NR; ++i) s[i * kDecodeTile + jj] = O::hsum(acc[i]);
}

// acc rows [r0, r0 + NR) (stride Dp) += sum_jj p[r][jj] * v[jj] over nt value rows, chunk by chunk so
// the NR accumulators stay in registers while each value vector is loaded once.
template <int KT, int NR>
LLMKERN_DA_ATTR inline void pv_rows(float* acc, int64_t Dp, const float* p, const void* const* vp, int nt, int64_t D) {
  for (int64_t c = 0; c < D; c += O::W) {
    V a[NR];
    for (int i = 0; i < NR; ++i) a[i] = O::load(acc + i * Dp + c);
    for (int jj = 0; jj < nt; ++jj) {
      const V vv = O::template load_kv<KT>(vp[jj], c, static_cast<int>(D - c));
      for (int i = 0; i < NR; ++i) a[i] = O::fma(O::set1(p[i * kDecodeTile + jj]), vv, a[i]);
    }
    for (int i = 0; i < NR; ++i) O::store(acc + i * Dp + c, a[i]);
  }
}

constexpr int kQkRows = O::W >= 16 ? 8 : 4;  // accumulators per dot-product pass (registers allow)
constexpr int kPvRows = O::W >= 16 ? 8 : 4;

template <int KT>
LLMKERN_DA_ATTR inline void qk_all(const float* qf, int64_t R, int64_t Dp, const void* k, int64_t D, float* s, int jj) {
  int64_t r = 0;
  for (; r + kQkRows <= R; r += kQkRows) qk_rows<KT, kQkRows>(qf + r * Dp, Dp, k, D, s + r * kDecodeTile, jj);
  switch (R - r) {
    case 1: qk_rows<KT, 1>(qf + r * Dp, Dp, k, D, s + r * kDecodeTile, jj); break;
    case 2: qk_rows<KT, 2>(qf + r * Dp, Dp, k, D, s + r * kDecodeTile, jj); break;
    case 3: qk_rows<KT, 3>(qf + r * Dp, Dp, k, D, s + r * kDecodeTile, jj); break;
    case 4: qk_rows<KT, 4>(qf + r * Dp, Dp, k, D, s + r * kDecodeTile, jj); break;
    case 5: qk_rows<KT, 5>(qf + r * Dp, Dp, k, D, s + r * kDecodeTile, jj); break;
    case 6: qk_rows<KT, 6>(qf + r * Dp, Dp, k, D, s + r * kDecodeTile, jj); break;
    case 7: qk_rows<KT, 7>(qf + r * Dp, Dp, k, D, s + r * kDecodeTile, jj); break;
    default: break;
  }
}

template <int KT>
LLMKERN_DA_ATTR inline void pv_all(float* acc, int64_t R, int64_t Dp, const float* p, const void* const* vp, int nt,
                                   int64_t D) {
  int64_t r = 0;
  for (; r + kPvRows <= R; r += kPvRows) pv_rows<KT, kPvRows>(acc + r * Dp, Dp, p + r * kDecodeTile, vp, nt, D);
  switch (R - r) {
    case 1: pv_rows<KT, 1>(acc + r * Dp, Dp, p + r * kDecodeTile, vp, nt, D); break;
    case 2: pv_rows<KT, 2>(acc + r * Dp, Dp, p + r * kDecodeTile, vp, nt, D); break;
    case 3: pv_rows<KT, 3>(acc + r * Dp, Dp, p + r * kDecodeTile, vp, nt, D); break;
    case 4: pv_rows<KT, 4>(acc + r * Dp, Dp, p + r * kDecodeTile, vp, nt, D); break;
    case 5: pv_rows<KT, 5>(acc + r * Dp, Dp, p + r * kDecodeTile, vp, nt, D); break;
    case 6: pv_rows<KT, 6>(acc + r * Dp, Dp, p + r * kDecodeTile, vp, nt, D); break;
    case 7: pv_rows<KT, 7>(acc + r * Dp, Dp, p + r * kDecodeTile, vp, nt, D); break;
    default: break;
  }
}

// Online softmax of one row's tile of scores s[0..nt) (kDecodeTile entries, the rest ignored):
// updates the row's running max m and sum l, rescales its accumulator, and turns s into the
// weights p = exp(s - m_new) (0 past nt and for masked -inf scores).
LLMKERN_DA_ATTR inline void softmax_tile(float* s, int nt, float* m, float* l, float* acc, int64_t Dp) {
  for (int jj = nt; jj < kDecodeTile; ++jj) s[jj] = -INFINITY;
  V mv = O::set1(-INFINITY);
  for (int jj = 0; jj < kDecodeTile; jj += O::W) mv = O::max(mv, O::load(s + jj));
  const float mt = O::hmax(mv);
  if (!(mt > -INFINITY)) {  // nothing visible in this tile for this row (or a NaN score)
    if (mt != mt) *l = mt;  // a NaN score (NaN in a visible key) makes the row NaN, as in the reference
    for (int jj = 0; jj < kDecodeTile; ++jj) s[jj] = 0.0f;
    return;
  }
  const float mnew = *m > mt ? *m : mt;
  const V mn = O::set1(mnew);
  V sum = O::zero();
  for (int jj = 0; jj < kDecodeTile; jj += O::W) {
    const V p = O::exp(O::sub(O::load(s + jj), mn));
    O::store(s + jj, p);
    sum = O::add(sum, p);
  }
  if (*m != mnew) {
    const float alpha = *m > -INFINITY ? std::exp(*m - mnew) : 0.0f;
    const V av = O::set1(alpha);
    for (int64_t c = 0; c < Dp; c += O::W) O::store(acc + c, O::mul(O::load(acc + c), av));
    *l *= alpha;
  }
  *l += O::hsum(sum);
  *m = mnew;
}

// One work unit: sequence b, KV head kh, keys [j_begin, j_end). Rows r = t * G + g (query token t,
// head kh * G + g); qf [R, Dp] their fp32 queries times scale; acc [R, Dp], m [R], l [R] the unit's
// softmax state (initialized here); s scratch [R, kDecodeTile]; kp/vp/ks/vs scratch [kDecodeTile].
template <int KT>
LLMKERN_DA_ATTR void unit_kt(const DecodeArgs& a, int64_t b, int64_t kh, int64_t j_begin, int64_t j_end,
                            const float* qf, float* acc, float* m, float* l, float* s, const void** kp,
                            const void** vp, float* ksc, float* vsc) {
  const int64_t G = a.Hq / a.Hk, R = G * a.Sq, D = a.D, Dp = decode_dpad(D);
  const int64_t len = a.seq_lens[b];
  const int64_t esz = kv_elem_size(KT);
  for (int64_t r = 0; r < R; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
    for (int64_t c = 0; c < Dp; ++c) acc[r * Dp + c] = 0.0f;
  }
  const char* kbase = static_cast<const char*>(a.k);
  const char* vbase = static_cast<const char*>(a.v);
  for (int64_t j0 = j_begin; j0 < j_end; j0 += kDecodeTile) {
    const int nt = static_cast<int>(std::min<int64_t>(kDecodeTile, j_end - j0));
    // Row pointers of the tile's keys: the block index advances with the offset (no division per key).
    int64_t blk = a.block_size ? j0 / a.block_size : 0, off = a.block_size ? j0 % a.block_size : j0;
    for (int jj = 0; jj < nt; ++jj) {
      const int64_t row = a.block_size ? a.block_table[b * a.bt_stride + blk] : b;
      kp[jj] = kbase + (row * a.k_s0 + off * a.k_s1 + kh * a.k_s2) * esz;
      vp[jj] = vbase + (row * a.v_s0 + off * a.v_s1 + kh * a.v_s2) * esz;
      if constexpr (KT == kKvI8) {
        ksc[jj] = a.k_scale[row * a.ks_s0 + off * a.ks_s1 + kh * a.ks_s2];
        vsc[jj] = a.v_scale[row * a.vs_s0 + off * a.vs_s1 + kh * a.vs_s2];
      }
      if (++off == a.block_size) {  // never true for a contiguous cache (block_size 0)
        off = 0;
        ++blk;
      }
    }
    for (int jj = 0; jj < nt; ++jj) qk_all<KT>(qf, R, Dp, kp[jj], D, s, jj);
    for (int64_t r = 0; r < R; ++r) {
      float* sr = s + r * kDecodeTile;
      const int64_t pos = len - a.Sq + r / G;  // this row's query position: it sees keys [lo, pos]
      const int64_t lo = a.window_left >= 0 ? pos - a.window_left : 0;
      for (int jj = 0; jj < nt; ++jj) {
        float x = sr[jj];
        if constexpr (KT == kKvI8) x *= ksc[jj];  // q . (k * scale) = (q . k) * scale
        if (a.softcap > 0.0f) x = a.softcap * std::tanh(x / a.softcap);
        const int64_t j = j0 + jj;
        sr[jj] = (j < lo || j > pos) ? -INFINITY : x;
      }
      softmax_tile(sr, nt, m + r, l + r, acc + r * Dp, Dp);
      if constexpr (KT == kKvI8)  // the value scale goes into the weight; l keeps the plain weights
        for (int jj = 0; jj < nt; ++jj) sr[jj] *= vsc[jj];
    }
    pv_all<KT>(acc, R, Dp, s, vp, nt, D);
  }
}

LLMKERN_DA_ATTR void unit(const DecodeArgs& a, int64_t b, int64_t kh, int64_t j_begin, int64_t j_end, const float* qf,
                          float* acc, float* m, float* l, float* s, const void** kp, const void** vp, float* ksc,
                          float* vsc) {
  switch (a.kv_type) {
    case kKvBF16: unit_kt<kKvBF16>(a, b, kh, j_begin, j_end, qf, acc, m, l, s, kp, vp, ksc, vsc); break;
    case kKvF16: unit_kt<kKvF16>(a, b, kh, j_begin, j_end, qf, acc, m, l, s, kp, vp, ksc, vsc); break;
    case kKvI8: unit_kt<kKvI8>(a, b, kh, j_begin, j_end, qf, acc, m, l, s, kp, vp, ksc, vsc); break;
    default: unit_kt<kKvF32>(a, b, kh, j_begin, j_end, qf, acc, m, l, s, kp, vp, ksc, vsc);
  }
}

}  // namespace LLMKERN_DA_NS
}  // namespace cpu
}  // namespace llmkern
