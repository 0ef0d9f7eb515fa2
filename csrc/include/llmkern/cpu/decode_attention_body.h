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

// s[jj] = dot(q, key jj) for the W keys at kp[jj] + off (bytes), D values each; q is fp32 with zero
// padding to a multiple of W. The W dot products run side by side (W independent FMA chains) and are
// reduced together by one transpose-and-add tree (O::hsum_w) instead of W horizontal sums.
// qk_block for W = 16 with 16 named accumulators (see OpsAvx512::hsum16: an array of them lives in memory).
template <int KT, class OO = O>
LLMKERN_DA_ATTR inline void qk_block16(const float* q, const char* const* kp, int64_t off, int64_t D, float* s) {
#define LLMKERN_DA_K(i) const char* k##i = kp[i] + off; V a##i = O::zero();
  LLMKERN_DA_K(0) LLMKERN_DA_K(1) LLMKERN_DA_K(2) LLMKERN_DA_K(3) LLMKERN_DA_K(4) LLMKERN_DA_K(5) LLMKERN_DA_K(6)
  LLMKERN_DA_K(7) LLMKERN_DA_K(8) LLMKERN_DA_K(9) LLMKERN_DA_K(10) LLMKERN_DA_K(11) LLMKERN_DA_K(12)
  LLMKERN_DA_K(13) LLMKERN_DA_K(14) LLMKERN_DA_K(15)
#undef LLMKERN_DA_K
  for (int64_t c = 0; c < D; c += 16) {
    const V qv = O::load(q + c);
    const int n = static_cast<int>(D - c);
#define LLMKERN_DA_F(i) a##i = O::fma(qv, O::template load_kv<KT>(k##i, c, n), a##i);
    LLMKERN_DA_F(0) LLMKERN_DA_F(1) LLMKERN_DA_F(2) LLMKERN_DA_F(3) LLMKERN_DA_F(4) LLMKERN_DA_F(5) LLMKERN_DA_F(6)
    LLMKERN_DA_F(7) LLMKERN_DA_F(8) LLMKERN_DA_F(9) LLMKERN_DA_F(10) LLMKERN_DA_F(11) LLMKERN_DA_F(12)
    LLMKERN_DA_F(13) LLMKERN_DA_F(14) LLMKERN_DA_F(15)
#undef LLMKERN_DA_F
  }
  OO::hsum16(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, s);
}

template <int KT>
LLMKERN_DA_ATTR inline void qk_block(const float* q, const char* const* kp, int64_t off, int64_t D, float* s) {
  if constexpr (O::W == 16) {
    qk_block16<KT>(q, kp, off, D, s);
    return;
  }
  V acc[O::W];
  for (int jj = 0; jj < O::W; ++jj) acc[jj] = O::zero();
  for (int64_t c = 0; c < D; c += O::W) {
    const V qv = O::load(q + c);
    const int n = static_cast<int>(D - c);
    for (int jj = 0; jj < O::W; ++jj) acc[jj] = O::fma(qv, O::template load_kv<KT>(kp[jj] + off, c, n), acc[jj]);
  }
  O::hsum_w(acc, s);
}

// acc rows [0, NR) (stride Dp) += sum_jj p[r][jj] * v[jj] over nt value rows at vp[jj] + off (bytes),
// chunk by chunk so the NR accumulators stay in registers while each value vector is loaded once.
template <int KT, int NR>
LLMKERN_DA_ATTR inline void pv_rows(float* acc, int64_t Dp, const float* p, const char* const* vp, int64_t off, int nt,
                                    int64_t D) {
  for (int64_t c = 0; c < D; c += O::W) {
    V a[NR];
    for (int i = 0; i < NR; ++i) a[i] = O::load(acc + i * Dp + c);
    for (int jj = 0; jj < nt; ++jj) {
      const V vv = O::template load_kv<KT>(vp[jj] + off, c, static_cast<int>(D - c));
      for (int i = 0; i < NR; ++i) a[i] = O::fma(O::set1(p[i * kDecodeTile + jj]), vv, a[i]);
    }
    for (int i = 0; i < NR; ++i) O::store(acc + i * Dp + c, a[i]);
  }
}

constexpr int kPvRows = O::W >= 16 ? 8 : 4;  // accumulators per value pass (registers allow)

template <int KT>
LLMKERN_DA_ATTR inline void pv_all(float* acc, int64_t R, int64_t Dp, const float* p, const char* const* vp,
                                   int64_t off, int nt, int64_t D) {
  int64_t r = 0;
  for (; r + kPvRows <= R; r += kPvRows) pv_rows<KT, kPvRows>(acc + r * Dp, Dp, p + r * kDecodeTile, vp, off, nt, D);
  float* ar = acc + r * Dp;
  const float* pr = p + r * kDecodeTile;
  switch (R - r) {
    case 1: pv_rows<KT, 1>(ar, Dp, pr, vp, off, nt, D); break;
    case 2: pv_rows<KT, 2>(ar, Dp, pr, vp, off, nt, D); break;
    case 3: pv_rows<KT, 3>(ar, Dp, pr, vp, off, nt, D); break;
    case 4: pv_rows<KT, 4>(ar, Dp, pr, vp, off, nt, D); break;
    case 5: pv_rows<KT, 5>(ar, Dp, pr, vp, off, nt, D); break;
    case 6: pv_rows<KT, 6>(ar, Dp, pr, vp, off, nt, D); break;
    case 7: pv_rows<KT, 7>(ar, Dp, pr, vp, off, nt, D); break;
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

// Software prefetch of one tile's K and V token rows (every head: lk / lv cache lines from each row start),
// issued a slice at a time between the compute steps of the tile before it. A burst of all of a tile's
// lines at once (768 for SmolLM2) fills the L1 miss queue and stalls the core until they arrive; spread
// out, the misses overlap with the dot products (SmolLM2 L1024 fp32, 1 thread, cold: 150 -> ~65 us).
// Into L2 (prefetcht1), not L1: a tile's K and V rows are 48 KiB (SmolLM2 fp32) to 256 KiB (Llama-3 fp32), more
// than an L1 holds, so prefetching them into L1 one tile ahead evicted lines before their use. On a Zen 4 host
// (32 KiB L1d; 2026-11-30, 2 threads, cold, alternated builds) T1 against T0: Llama-3-8B B1 L4096 bf16 1180 ->
// ~770 us, SmolLM2 B8 L1024 fp32 650 -> 435 us, B1 L1024 bf16 64 -> 49 us; the earlier T0 was tuned on a Zen 5
// host (48 KiB L1d), not re-measured there.
struct PfStream {
  const char* row[2][kDecodeTile];  // K rows, V rows
  int n = 0, lines[2] = {0, 0};     // rows, lines per K / V row
  int part = 2, r = 0, line = 0;    // cursor: part 0 = K, 1 = V, 2 = done
  int per = 0;                      // lines per step
  LLMKERN_DA_ATTR inline void issue(int count) {
    for (; count > 0 && part < 2; --count) {
      __builtin_prefetch(row[part][r] + 64 * line, 0, 2);
      if (++line == lines[part]) {
        line = 0;
        if (++r == n) {
          r = 0;
          ++part;
        }
      }
    }
  }
  LLMKERN_DA_ATTR inline void step() { issue(per); }
};

// One work unit: sequence b, keys [j_begin, j_end), every KV head. Rows rr = kh * R + t * G + g
// (KV head kh, query token t, query head kh * G + g; R = G * Sq); qf [Hk * R, Dp] their fp32 queries
// times scale; acc [Hk * R, Dp], m, l [Hk * R] the unit's softmax state (initialized here);
// s scratch [Hk * R, kDecodeTile]; kp/vp scratch [kDecodeTile] token row pointers; ksc/vsc scratch
// [Hk, kDecodeTile] int8 scales; kf scratch [16, Dp]; ex the int16 path's scratch (decode_i16_dot: q scales
// [Hk * R], weight scales [Hk * R], int16 weights [Hk * R, kDecodeTile]).
// All heads in one unit: a thread walks whole token rows (Hk * D contiguous values of a [.., Hk, D]
// cache), so its K and V reads are two sequential streams the hardware prefetcher follows, instead of
// one head's D values out of every row (a page apart for Hk * D * 4 = 4 KiB: no prefetch at all).
template <int KT>
LLMKERN_DA_ATTR void unit_kt(const DecodeArgs& a, int64_t b, int64_t j_begin, int64_t j_end, const float* qf,
                            float* acc, float* m, float* l, float* s, const char** kp, const char** vp, float* ksc,
                            float* vsc, float* kf, float* ex) {
  const int64_t G = a.Hq / a.Hk, R = G * a.Sq, Hk = a.Hk, RA = Hk * R, D = a.D, Dp = decode_dpad(D);
  const int64_t len = a.seq_lens[b];
  const int64_t esz = kv_elem_size(KT);
  for (int64_t r = 0; r < RA; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
    for (int64_t c = 0; c < Dp; ++c) acc[r * Dp + c] = 0.0f;
  }
  const char* kbase = static_cast<const char*>(a.k);
  const char* vbase = static_cast<const char*>(a.v);
  const bool plain = KT != kKvI8 && !(a.softcap > 0.0f);  // scores need no per-key fix-up
  // bf16 q and cache on an AVX-512 BF16 CPU: qf holds raw bf16 rows (decode_bf16_pairs), scored by vdpbf16ps.
  bool pairs = false;
  if constexpr (O::W == 16 && KT == kKvBF16) pairs = decode_bf16_pairs(a, Isa::kAvx512Vnni);
  // 16-bit q with an int8 cache on AVX-512 VNNI or AVX2: qf rows hold int16 q (decode_i16_dot), scored and weighted
  // by int16 dot products (decode_attention_i16.h: vpdpwssd; _i16_avx2.h: vpmaddwd), I's functions.
  using I = std::conditional_t<O::W == 16, DecodeI16Avx512, DecodeI16Avx2>;
  constexpr bool kI16 = O::W > 1 && KT == kKvI8;
  bool i16 = false;
  if constexpr (kI16) i16 = decode_i16_dot(a, I::kIsa);
  const float* qsc = ex;
  float* wsc = ex + Hk * R;
  int16_t* wq = reinterpret_cast<int16_t*>(ex + 2 * Hk * R);
  const char* kfp[O::W];  // rows of kf: one block of keys converted to fp32 (compressed caches, G > 1)
  for (int jj = 0; jj < O::W; ++jj) kfp[jj] = reinterpret_cast<const char*>(kf + jj * Dp);
  // pf_fill(pf, jn): point pf at the token rows of the tile that starts at key jn (before j_end).
  const auto pf_fill = [&](PfStream& pf, int64_t jn) {
    pf.n = static_cast<int>(std::min<int64_t>(kDecodeTile, j_end - jn));
    int64_t pblk = a.block_size ? jn / a.block_size : 0, poff = a.block_size ? jn % a.block_size : jn;
    pf.lines[0] = static_cast<int>((((Hk - 1) * a.k_s2 + D) * esz + 63) / 64);
    pf.lines[1] = static_cast<int>((((Hk - 1) * a.v_s2 + D) * esz + 63) / 64);
    for (int jj = 0; jj < pf.n; ++jj) {
      const int64_t row = a.block_size ? a.block_table[b * a.bt_stride + pblk] : b;
      pf.row[0][jj] = kbase + (row * a.k_s0 + poff * a.k_s1) * esz;
      pf.row[1][jj] = vbase + (row * a.v_s0 + poff * a.v_s1) * esz;
      if (++poff == a.block_size) {
        poff = 0;
        ++pblk;
      }
    }
    pf.part = 0;
  };
  // The first tile has nothing before it to hide behind: its K lines at once (as many misses in flight
  // as the core allows, rather than the few the first dot products' loads would expose); its V lines go
  // out in slices during its score steps, ahead of the next tile's (SmolLM2 L64 cold: 14.3 -> ~12 us).
  PfStream first;
  if (j_begin < j_end) {
    pf_fill(first, j_begin);
    first.issue(first.n * first.lines[0]);
  }
  for (int64_t j0 = j_begin; j0 < j_end; j0 += kDecodeTile) {
    const int nt = static_cast<int>(std::min<int64_t>(kDecodeTile, j_end - j0));
    // Token row pointers of the tile (head 0): the block index advances with the offset.
    int64_t blk = a.block_size ? j0 / a.block_size : 0, off = a.block_size ? j0 % a.block_size : j0;
    for (int jj = 0; jj < nt; ++jj) {
      const int64_t row = a.block_size ? a.block_table[b * a.bt_stride + blk] : b;
      kp[jj] = kbase + (row * a.k_s0 + off * a.k_s1) * esz;
      vp[jj] = vbase + (row * a.v_s0 + off * a.v_s1) * esz;
      if constexpr (KT == kKvI8) {
        for (int64_t kh = 0; kh < Hk; ++kh) {
          ksc[kh * kDecodeTile + jj] = a.k_scale[row * a.ks_s0 + off * a.ks_s1 + kh * a.ks_s2];
          vsc[kh * kDecodeTile + jj] = a.v_scale[row * a.vs_s0 + off * a.vs_s1 + kh * a.vs_s2];
        }
      }
      if (++off == a.block_size) {  // never true for a contiguous cache (block_size 0)
        off = 0;
        ++blk;
      }
    }
    // Prefetch the next tile's K and V rows while this tile computes, a slice before each of its steps
    // (Hk score groups per W-block of keys, Hk value passes): the hardware prefetcher alone leaves cold
    // reads latency-bound (the K reads stride over token rows), and one burst per tile stalls the core.
    PfStream pf;
    // prefetch steps per score group (the row-triple path steps once per head and once per triple and 8 keys)
    const int fine = (O::W == 16 && R % 3 == 0 && !pairs && !i16) ? static_cast<int>(R / 3 * 2 + 1) : 1;
    const int score_steps = static_cast<int>((nt + O::W - 1) / O::W * Hk * fine), steps = score_steps + static_cast<int>(Hk);
    if (j0 == j_begin) first.per = (first.n * first.lines[1] + score_steps - 1) / score_steps;
    if (j0 + kDecodeTile < j_end) {
      pf_fill(pf, j0 + kDecodeTile);
      pf.per = (pf.n * (pf.lines[0] + pf.lines[1]) + steps - 1) / steps;
    }
    const auto pf_step = [&]() {
      first.step();
      pf.step();
    };
    // Keys past nt in the last W-block repeat a valid row: their scores are computed, then masked.
    const int nblk = (nt + O::W - 1) / O::W * O::W;
    for (int jj = nt; jj < nblk; ++jj) kp[jj] = kp[nt - 1];
    for (int jb = 0; jb < nblk; jb += O::W)
      for (int64_t kh = 0; kh < Hk; ++kh) {
        const int64_t koff = kh * a.k_s2 * esz;
        pf_step();
        if constexpr (O::W == 16 && KT == kKvBF16) {
          if (pairs) {  // all R rows of the head against the block's 16 keys; qf rows: 2 * Dp raw bf16 each
            da512::qk_bf16_rows(reinterpret_cast<const uint16_t*>(qf + kh * R * Dp), 2 * Dp, R, kp + jb, koff, D,
                                a.scale, s + kh * R * kDecodeTile + jb, kDecodeTile);
            continue;
          }
        }
        if constexpr (kI16) {
          if (i16) {  // the block's W keys to int16 once, then all R rows of the head against them
            int16_t* kb = reinterpret_cast<int16_t*>(kf);
            I::keys(kp + jb, koff, D, kb, 2 * Dp);
            I::qk(reinterpret_cast<const int16_t*>(qf + kh * R * Dp), 2 * Dp, R, kb, 2 * Dp, D, qsc + kh * R,
                  s + kh * R * kDecodeTile + jb, kDecodeTile);
            continue;
          }
        }
        if constexpr (O::W == 16) {
          if (R % 3 == 0) {  // rows in triples: each key chunk loaded (and converted) once for 3 rows
            for (int64_t r = 0; r < R; r += 3) {
              const float* q0 = qf + (kh * R + r) * Dp;
              float* s0 = s + (kh * R + r) * kDecodeTile + jb;
              for (int h = 0; h < O::W; h += 8, pf_step())
                da512::qk3x8<KT>(q0, q0 + Dp, q0 + 2 * Dp, kp + jb + h, koff, D, s0 + h, s0 + kDecodeTile + h,
                                 s0 + 2 * kDecodeTile + h);
            }
            continue;
          }
        }
        if constexpr (KT != kKvF32 && O::W == 16) {
          if (R >= 4) {  // convert the block's keys to fp32 once, not once per GQA row (R = 3: no gain measured)
            for (int jj = 0; jj < O::W; ++jj)
              for (int64_t c = 0; c < D; c += O::W)
                O::store(kf + jj * Dp + c, O::template load_kv<KT>(kp[jb + jj] + koff, c, static_cast<int>(D - c)));
            for (int64_t r = 0; r < R; ++r)
              qk_block<kKvF32>(qf + (kh * R + r) * Dp, kfp, 0, D, s + (kh * R + r) * kDecodeTile + jb);
            continue;
          }
        }
        for (int64_t r = 0; r < R; ++r)
          qk_block<KT>(qf + (kh * R + r) * Dp, kp + jb, koff, D, s + (kh * R + r) * kDecodeTile + jb);
      }
    for (int64_t rr = 0; rr < RA; ++rr) {
      const int64_t kh = rr / R, r = rr % R;
      float* sr = s + rr * kDecodeTile;
      const int64_t pos = len - a.Sq + r / G;  // this row's query position: it sees keys [lo, pos]
      const int64_t lo = a.window_left >= 0 ? pos - a.window_left : 0;
      const bool whole = j0 >= lo && j0 + nt - 1 <= pos;  // every key of the tile visible to this row
      if (KT == kKvI8 && whole && !(a.softcap > 0.0f)) {
        // int8, nothing else to apply: scores times the key scales, W at a time (entries past nt are garbage
        // times garbage, overwritten with -inf by softmax_tile)
        for (int jj = 0; jj < kDecodeTile; jj += O::W)
          O::store(sr + jj, O::mul(O::load(sr + jj), O::load(ksc + kh * kDecodeTile + jj)));
      } else if (!plain || !whole) {
        for (int jj = 0; jj < nt; ++jj) {
          float x = sr[jj];
          if constexpr (KT == kKvI8) x *= ksc[kh * kDecodeTile + jj];  // q . (k * scale) = (q . k) * scale
          if (a.softcap > 0.0f) x = a.softcap * std::tanh(x / a.softcap);
          const int64_t j = j0 + jj;
          sr[jj] = (j < lo || j > pos) ? -INFINITY : x;
        }
      }
      softmax_tile(sr, nt, m + rr, l + rr, acc + rr * Dp, Dp);
      if constexpr (KT == kKvI8)  // the value scale goes into the weight; l keeps the plain weights (P V reads
        for (int jj = 0; jj < kDecodeTile; jj += O::W)  // the first nt only: past them garbage is harmless)
          O::store(sr + jj, O::mul(O::load(sr + jj), O::load(vsc + kh * kDecodeTile + jj)));
      if constexpr (kI16)
        if (i16) wsc[rr] = I::quant_w(sr, nt, wq + rr * kDecodeTile);
    }
    if (i16 && nt % 2) vp[nt] = vp[nt - 1];  // the last pair's partner (weight 0) must be a readable row
    for (int64_t kh = 0; kh < Hk; ++kh) {
      pf_step();
      if constexpr (kI16) {
        if (i16) {
          I::pv(acc + kh * R * Dp, Dp, R, wq + kh * R * kDecodeTile, wsc + kh * R, vp, kh * a.v_s2 * esz, nt, D);
          continue;
        }
      }
      if constexpr (O::W == 16) {
        if (R == 3 && Dp == 64 && Dp == D) {
          da512::pv_regs<KT, 3, 4>(acc + kh * R * Dp, Dp, s + kh * R * kDecodeTile, kDecodeTile, vp, kh * a.v_s2 * esz, nt);
          continue;
        }
        if (R == 4 && Dp == D && D % 64 == 0) {  // GQA groups of 4 (Llama-3): 64 columns per pass, 16 accumulators
          for (int64_t c0 = 0; c0 < D; c0 += 64)  // (pv_rows broadcasts each weight once per 16 columns)
            da512::pv_regs<KT, 4, 4>(acc + kh * R * Dp + c0, Dp, s + kh * R * kDecodeTile, kDecodeTile, vp,
                                     (kh * a.v_s2 + c0) * esz, nt);
          continue;
        }
      }
      pv_all<KT>(acc + kh * R * Dp, R, Dp, s + kh * R * kDecodeTile, vp, kh * a.v_s2 * esz, nt, D);
    }
  }
}

LLMKERN_DA_ATTR void unit(const DecodeArgs& a, int64_t b, int64_t j_begin, int64_t j_end, const float* qf, float* acc,
                          float* m, float* l, float* s, const char** kp, const char** vp, float* ksc, float* vsc,
                          float* kf, float* ex) {
  switch (a.kv_type) {
    case kKvBF16: unit_kt<kKvBF16>(a, b, j_begin, j_end, qf, acc, m, l, s, kp, vp, ksc, vsc, kf, ex); break;
    case kKvF16: unit_kt<kKvF16>(a, b, j_begin, j_end, qf, acc, m, l, s, kp, vp, ksc, vsc, kf, ex); break;
    case kKvI8: unit_kt<kKvI8>(a, b, j_begin, j_end, qf, acc, m, l, s, kp, vp, ksc, vsc, kf, ex); break;
    default: unit_kt<kKvF32>(a, b, j_begin, j_end, qf, acc, m, l, s, kp, vp, ksc, vsc, kf, ex);
  }
}

}  // namespace LLMKERN_DA_NS
}  // namespace cpu
}  // namespace llmkern
