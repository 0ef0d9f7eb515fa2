// attention (prefill) on Hopper (sm_90a): flash attention with warpgroup MMA (wgmma) fed by TMA, one
// producer warp and two consumer warpgroups. Same semantics and parameters as attn_fwd_kernel
// (attention.cuh; llmkern/ops/attention.py): causal bottom-right, sliding window, softcap, GQA by
// indexing, batched or packed (varlen) rows, out and lse. Torch-free; launcher csrc/cuda/attention_sm90.cu.
//
// One block = (sequence b, query head h, BM = 128 query rows); 384 threads in three warpgroups:
// - warpgroup 0, the producer: one thread issues every TMA load (the rest of the warpgroup exits after
//   giving up registers). Q once (D / 64 boxes of [128 rows][64 values]); then for each visible key tile
//   (BN = 128 keys) K and V into a ring of kStages stages, each stage's K and V announced by its own
//   "full" mbarrier (transaction bytes) and freed by an "empty" mbarrier (256 consumer arrivals).
// - warpgroups 1 and 2, the consumers: rows [64 c, 64 c + 64) of the tile for consumer c, taking turns to
//   issue their S GEMMs (ping-pong: one's softmax overlaps the other's GEMMs). Per key tile:
//     S = Q K^T      wgmma m64n128k16, A (Q) and B (K) from shared memory, both K-major, D / 16 steps
//     softcap, masks, online softmax in fp32 on the accumulators (2 rows per thread, quads share a row)
//     O += P V       wgmma m64nDk16, A = P from registers (the S accumulators re-packed to 16 bits: the
//                    D fragment of S is the A fragment of P), B = V [keys][D] from shared memory, MN-major
//   then arrive on the stage's empty barrier. OVERLAP (docs/notes/cuda-attn-sm90.md; 64-key tiles at D = 128): S(t + 1) and
//   P V(t) issued back to back, the softmax of t + 1 while P V(t) runs (FlashAttention-3's intra-warpgroup
//   overlap; P double-buffered, O rescaled only between P V groups).
// Shared memory tiles are TMA boxes with the 128-byte swizzle (sm90_layout.cuh); K and V rows past the
// tensor's end are zeros (TMA fill). Packed (varlen) sequences: rows past a sequence's end belong to the
// next sequence; their scores are masked (by select, so NaN/inf never leak) and, on the tile that cuts
// the sequence end, the consumers zero those V rows before the P V wgmma (P is 0 there, but 0 * inf =
// NaN).
// Epilogue: out = O / l through the consumer's own rows of the Q tile in shared memory (16-byte coalesced
// stores), lse = m ln 2 + ln l, as attn_fwd_kernel.
// Compiled only for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL or the CPU emulator); elsewhere the body traps and
// the launcher never launches it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "llmkern/cuda/attention_common.cuh"
#include "llmkern/cuda/attention_params.h"
#include "llmkern/cuda/sm80.cuh"  // fast_exp2
#include "llmkern/cuda/sm90.cuh"
#include "llmkern/cuda/sm90_layout.cuh"

namespace llmkern {
namespace cuda {
namespace attn90 {

constexpr int kBM = 128;      // query rows per block (two consumer warpgroups of 64)
// Keys per tile (wgmma N of S = Q K^T): 128, or 64 for the D = 128 overlap variant, whose live registers
// (scores, two P buffers, O) must fit the consumers' 240.
constexpr int block_n(int D, bool overlap) { return overlap && D == 128 ? 64 : 128; }
constexpr int kStages = 2;    // K/V ring depth
constexpr int kThreads = 384; // producer warpgroup + two consumer warpgroups
constexpr int kConsumers = 256;
constexpr int kTurn = 3;       // named barriers 3 and 4: the consumers' turns (1 and 2: each consumer's own)

// Byte layout of the dynamic shared memory after aligning its base to 1024: Q, then per stage K and V,
// then the mbarriers (q_full, k_full[S], v_full[S], empty[S]).
template <int D, int BN>
struct Smem {
  static constexpr uint32_t kQ = kBM * D * 2;       // D / 64 boxes of [kBM][64]
  static constexpr uint32_t kKV = BN * D * 2;       // one K or V tile: D / 64 boxes of [BN][64]
  static constexpr uint32_t kBoxKV = BN * sm90::kSwRow;
  static constexpr uint32_t kBoxQ = kBM * sm90::kSwRow;
  static constexpr uint32_t q = 0;
  static constexpr uint32_t k(int s) { return kQ + uint32_t(s) * 2 * kKV; }
  static constexpr uint32_t v(int s) { return kQ + uint32_t(s) * 2 * kKV + kKV; }
  static constexpr uint32_t bars = kQ + kStages * 2 * kKV;
  static constexpr uint32_t q_full = bars;
  static constexpr uint32_t k_full(int s) { return bars + 8 + 8 * uint32_t(s); }
  static constexpr uint32_t v_full(int s) { return bars + 8 + 8 * kStages + 8 * uint32_t(s); }
  static constexpr uint32_t empty(int s) { return bars + 8 + 16 * kStages + 8 * uint32_t(s); }
  static constexpr uint32_t end = bars + 8 + 24 * kStages;
  static constexpr int bytes = int(end) + sm90::kSwAtom;  // + slack to align the base
};

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value)
    return uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
           (uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
  else
    return uint32_t(__half_as_ushort(__float2half_rn(lo))) | (uint32_t(__half_as_ushort(__float2half_rn(hi))) << 16);
}

// The per-block view of one sequence: where its rows are and which key tiles the block's rows see.
struct BlockSeq {
  int q_len, k_len;
  int q_row0, k_row0;   // TMA row coordinate (dim 2) of the sequence's first query / key row
  int q_b, k_b;         // TMA batch coordinate (dim 3)
  int64_t q_tok0;       // first output row (token) of the sequence
  int64_t lse_base, lse_stride_h;
};

__device__ __forceinline__ BlockSeq block_seq(const AttnFwdParams& p, int b) {
  BlockSeq s;
  if (p.cu_q) {
    const int q0 = p.cu_q[b], k0 = p.cu_k[b];
    s.q_len = p.cu_q[b + 1] - q0;
    s.k_len = p.cu_k[b + 1] - k0;
    s.q_row0 = q0, s.k_row0 = k0, s.q_b = 0, s.k_b = 0;
    s.q_tok0 = q0;
    s.lse_base = q0;
    s.lse_stride_h = p.Tq;
  } else {
    s.q_len = p.Sq, s.k_len = p.Sk;
    s.q_row0 = 0, s.k_row0 = 0, s.q_b = b, s.k_b = b;
    s.q_tok0 = int64_t(b) * p.Sq;
    s.lse_base = int64_t(b) * p.Hq * p.Sq;
    s.lse_stride_h = p.Sq;
  }
  return s;
}

}  // namespace attn90

// Launch: grid (B * Hq, ceil(max query rows / 128)), 384 threads, attn90::Smem<D>::bytes of dynamic shared
// memory. tq / tk / tv: 4-D tensor maps (values of dims (D, heads, rows, batch)) with boxes
// (64, 1, 128, 1) (attention_sm90.cu).
template <typename T, int D, bool OVERLAP>
__global__ void __launch_bounds__(attn90::kThreads, 1)
    attn_fwd_sm90_kernel(const AttnFwdParams p, const __grid_constant__ sm90::TmaMap tq,
                         const __grid_constant__ sm90::TmaMap tk, const __grid_constant__ sm90::TmaMap tv) {
#if defined(LLMKERN_SM90A) || defined(LLMKERN_CUDA_EMULATOR)
  using namespace attn90;
  constexpr int kBN = block_n(D, OVERLAP);
  using L = Smem<D, kBN>;
  static_assert(D == 64 || D == 128, "head dims 64 and 128");
  constexpr int KD = D / 16;     // k16 steps of S = Q K^T
  constexpr int KN = kBN / 16;   // k16 steps of O += P V
  constexpr int kBoxes = D / 64;

  unsigned char* raw = sm90::dyn_smem();
  unsigned char* base = raw + ((sm90::kSwAtom - (sm90::smem_u32(raw) & (sm90::kSwAtom - 1))) & (sm90::kSwAtom - 1));
  const uint32_t sb = sm90::smem_u32(base);

  const int tid = threadIdx.x;
  const int wg = tid / 128;
  const int bh = blockIdx.x;
  const int b = bh / p.Hq, h = bh % p.Hq, kh = h / p.group;
  const int m0 = (gridDim.y - 1 - blockIdx.y) * kBM;  // heaviest (causal) query tiles first

  const BlockSeq sq = block_seq(p, b);
  if (m0 >= sq.q_len) return;  // packed grids are sized for the longest possible sequence
  const int diag = sq.k_len - sq.q_len;  // query i sits at key position i + diag
  const int m_last = min(m0 + kBM, sq.q_len) - 1;
  int lo = 0, hi = sq.k_len;  // keys some row of the block sees: [lo, hi)
  if (p.window_left >= 0) lo = max(0, m0 + diag - p.window_left);
  if (p.window_right >= 0) hi = min(sq.k_len, m_last + diag + p.window_right + 1);
  const int t_begin = lo / kBN;
  const int t_end = hi > lo ? (hi + kBN - 1) / kBN : t_begin;

  if (tid == 0) {
    sm90::mbar_init(sb + L::q_full, 1);
    for (int s = 0; s < kStages; ++s) {
      sm90::mbar_init(sb + L::k_full(s), 1);
      sm90::mbar_init(sb + L::v_full(s), 1);
      sm90::mbar_init(sb + L::empty(s), kConsumers);
    }
    sm90::mbar_fence_init();
  }
  __syncthreads();

  if (wg == 0) {
    // ------------------------------------------------------------ producer
    sm90::setmaxnreg_dec<24>();
    if (tid != 0 || t_begin >= t_end) return;
    sm90::tma_prefetch_map(&tq);
    sm90::tma_prefetch_map(&tk);
    sm90::tma_prefetch_map(&tv);
    sm90::mbar_arrive_expect_tx(sb + L::q_full, L::kQ);
#pragma unroll
    for (int x = 0; x < kBoxes; ++x)
      sm90::tma_load_4d(sb + L::q + x * L::kBoxQ, &tq, sb + L::q_full, 64 * x, h, sq.q_row0 + m0, sq.q_b);
    for (int t = t_begin, it = 0; t < t_end; ++t, ++it) {
      const int s = it % kStages;
      // The stage's previous tile (it - kStages) was released by all 256 consumer threads.
      if (it >= kStages) sm90::mbar_wait(sb + L::empty(s), ((it / kStages) - 1) & 1);
      const int row = sq.k_row0 + t * kBN;
      sm90::mbar_arrive_expect_tx(sb + L::k_full(s), L::kKV);
#pragma unroll
      for (int x = 0; x < kBoxes; ++x)
        sm90::tma_load_4d(sb + L::k(s) + x * L::kBoxKV, &tk, sb + L::k_full(s), 64 * x, kh, row, sq.k_b);
      sm90::mbar_arrive_expect_tx(sb + L::v_full(s), L::kKV);
#pragma unroll
      for (int x = 0; x < kBoxes; ++x)
        sm90::tma_load_4d(sb + L::v(s) + x * L::kBoxKV, &tv, sb + L::v_full(s), 64 * x, kh, row, sq.k_b);
    }
    return;
  }

  // -------------------------------------------------------------- consumers
  sm90::setmaxnreg_inc<240>();  // 24 + 2 x 240 = 3 x 168: the pool of the launch bound
  const int c = wg - 1;            // consumer warpgroup: tile rows [64 c, 64 c + 64)
  const int ct = tid - 128 * wg;   // thread in the warpgroup
  const int warp = ct >> 5, lane = ct & 31;
  const int g = lane >> 2, tq4 = lane & 3;
  const int r0 = 64 * c + 16 * warp + g;  // tile row of accumulator half 0 (half 1: + 8)
  const bool softcap = p.softcap_log2 > 0.0f;
  const float mult = softcap ? 1.0f : p.scale_log2;

  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};

  if (t_begin < t_end) {
    // S(t) = Q K^T of the tile in ring slot `it` into `sc`, issued and committed, not waited for. A = rows
    // [64 c, 64 c + 64) of Q, B = the tile's kBN keys; k16 step ks in box ks / 4 at + 32 (ks % 4) bytes.
    // Ping-pong (FlashAttention-3): the consumers take turns issuing their S GEMMs, so that one's softmax
    // runs while the other's GEMMs use the tensor cores. Barrier kTurn + c opens consumer c's turn (its 128
    // threads wait, the other's 128 arrive); consumer 0 goes first. Both issue the same n S GEMMs: consumer
    // 1 arrives once up front and skips its last arrival, so no barrier phase is left open.
    float sc[kBN / 2];
    auto issue_s = [&](int it, bool last) {
      const int s = it % kStages;
      sm90::mbar_wait(sb + L::k_full(s), (it / kStages) & 1);
      sm90::named_barrier_sync(kTurn + c, kConsumers);
      sm90::wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < KD; ++ks) {
        const uint32_t a = sb + L::q + (ks / 4) * L::kBoxQ + 64 * c * sm90::kSwRow + 32 * (ks % 4);
        const uint32_t bk = sb + L::k(s) + (ks / 4) * L::kBoxKV + 32 * (ks % 4);
        sm90::wgmma_ss<T, kBN>(sc, sm90::desc_k_major(a), sm90::desc_k_major(bk), ks > 0);
      }
      sm90::wgmma_commit();
      if (c == 0 || !last) sm90::named_barrier_arrive(kTurn + (1 - c), kConsumers);
    };

    // Softcap, masks and the online softmax of key tile t on its retired scores `sc`: updates m and l,
    // leaves P in `pa` (A fragments) and O's rescale factors in `alpha` (applied by the caller while no P V
    // is in flight: O is the accumulator of the P V wgmmas).
    auto softmax = [&](int t, uint32_t (&pa)[KN][4], float (&alpha)[2]) {
      const int n0 = t * kBN;
      // Softcap (into log2 units; else the scale multiplies in the exponent), then the masks where the tile
      // cuts the band or the sequence end. Register i: row r0 + 8 ((i / 2) % 2), key 8 (i / 4) + 2 tq4 + i % 2.
      if (softcap) {
#pragma unroll
        for (int i = 0; i < kBN / 2; ++i) sc[i] = p.softcap_log2 * tanhf(sc[i] * p.inv_softcap);
      }
      const bool full = n0 + kBN <= sq.k_len &&
                        (p.window_right < 0 || n0 + kBN - 1 <= m0 + diag + p.window_right) &&
                        (p.window_left < 0 || n0 >= m_last + diag - p.window_left);
      if (!full) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int pos = m0 + r0 + 8 * hf + diag;
          const int khi = p.window_right >= 0 ? min(sq.k_len - 1, pos + p.window_right) : sq.k_len - 1;
          const int klo = p.window_left >= 0 ? pos - p.window_left : 0;
#pragma unroll
          for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int key = n0 + 8 * j + 2 * tq4 + e;
              if (key > khi || key < klo) sc[4 * j + 2 * hf + e] = -INFINITY;
            }
        }
      }
      // Online softmax; each row spread over the 4 threads of a quad.
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < kBN / 8; ++j) mx = fmaxf(mx, fmaxf(sc[4 * j + 2 * hf], sc[4 * j + 2 * hf + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_run[hf], mx);
        const float m_sc = m_new == -INFINITY ? 0.0f : m_new * mult;
        alpha[hf] = m_new > m_run[hf] ? fast_exp2(fmaf(m_run[hf], mult, -m_sc)) : 1.0f;
        m_run[hf] = m_new;
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float pe = fast_exp2(fmaf(sc[4 * j + 2 * hf + e], mult, -m_sc));
            sc[4 * j + 2 * hf + e] = pe;
            sum += pe;
          }
        l_run[hf] = l_run[hf] * alpha[hf] + sum;
      }
      // P as A fragments: k16 step kk covers keys 16 kk .. 16 kk + 15 = accumulator registers 8 kk .. 8 kk + 7.
#pragma unroll
      for (int kk = 0; kk < KN; ++kk)
#pragma unroll
        for (int j = 0; j < 4; ++j) pa[kk][j] = pack2<T>(sc[8 * kk + 2 * j], sc[8 * kk + 2 * j + 1]);
    };

    // O *= alpha (no P V in flight), then O += P V for key tile t in ring slot `it`, issued and committed.
    auto issue_pv = [&](const uint32_t (&pa)[KN][4], const float (&alpha)[2], int it, int t) {
      const int s = it % kStages, n0 = t * kBN;
      // After the first tiles the maxima rarely grow: skip the D / 2 multiplies when no row's did.
      if (__any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f)) {
#pragma unroll
        for (int i = 0; i < D / 2; ++i) o[i] *= alpha[(i >> 1) & 1];
      }
      sm90::mbar_wait(sb + L::v_full(s), (it / kStages) & 1);
      if (p.cu_q && n0 + kBN > sq.k_len) {
        // Packed: V rows [k_len - n0, kBN) of this tile are the next sequence's (or TMA zeros): zero them so
        // that P = 0 there cannot meet an inf / NaN. Both consumer warpgroups write the same zeros; each
        // makes its own writes visible to its wgmma (proxy fence + warpgroup barrier).
        const int from = max(sq.k_len - n0, 0);
        for (int i = ct; i < (kBN - from) * D / 8; i += 128) {
          const int row = from + i / (D / 8), ch = i % (D / 8);
          *reinterpret_cast<uint4*>(base + L::v(s) + (ch / 8) * L::kBoxKV + sm90::swz128(row, ch % 8)) =
              make_uint4(0u, 0u, 0u, 0u);
        }
        sm90::fence_proxy_async();
        sm90::named_barrier_sync(1 + c, 128);
      }
      // B = V [keys][D] MN-major (D contiguous; the second 64 columns one box further = LBO), k16 step kk =
      // 16 key rows = + 2048 bytes.
      sm90::fence_regs(o);
      sm90::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < KN; ++kk)
        sm90::wgmma_rs<T, D, true>(o, pa[kk], sm90::desc_mn_major(sb + L::v(s) + 2048 * kk, L::kBoxKV), 1);
      sm90::wgmma_commit();
    };

    // OVERLAP (FlashAttention-3's intra-warpgroup overlap): the tensor cores compute S(t + 1) and then
    // P V(t) while this warpgroup runs the softmax of t + 1. Groups retire in issue order: S(t + 1), then
    // P V(t). P is double-buffered (P V(t) reads pa_x while the softmax of t + 1 writes pa_y); O is touched
    // only with no P V in flight.
    uint32_t pa_x[KN][4], pa_y[KN][4];
    float al_x[2], al_y[2];
    const int n = t_end - t_begin;
    // Tile it with a next one: S(it + 1) and P V(it) issued back to back, the softmax of it + 1 while P V(it)
    // runs. No branch between issue and wait, so that ptxas can tell which group each wait retires.
    auto step = [&](int it, uint32_t (&pa)[KN][4], float (&al)[2], uint32_t (&pa_next)[KN][4], float (&al_next)[2]) {
      issue_s(it + 1, it + 2 == n);
      issue_pv(pa, al, it, t_begin + it);
      sm90::wgmma_wait<1>();  // S(it + 1) retired; P V(it) may still run
      sm90::fence_regs(sc);
      softmax(t_begin + it + 1, pa_next, al_next);
      sm90::wgmma_wait<0>();  // P V(it) retired: O may be rescaled, pa rewritten, the ring slot released
      sm90::fence_regs(o);
      sm90::mbar_arrive(sb + L::empty(it % kStages));
    };
    // The last tile: P V only.
    auto last = [&](int it, uint32_t (&pa)[KN][4], float (&al)[2]) {
      issue_pv(pa, al, it, t_begin + it);
      sm90::wgmma_wait<0>();
      sm90::fence_regs(o);
    };
    if (c == 1) sm90::named_barrier_arrive(kTurn, kConsumers);
    sm90::mbar_wait(sb + L::q_full, 0);
    if constexpr (OVERLAP) {
      issue_s(0, n == 1);
      sm90::wgmma_wait<0>();
      sm90::fence_regs(sc);
      softmax(t_begin, pa_x, al_x);
      int it = 0;
      for (; it + 2 < n; it += 2) {  // two steps per trip: the P buffers swap roles with static indexing
        step(it, pa_x, al_x, pa_y, al_y);
        step(it + 1, pa_y, al_y, pa_x, al_x);
      }
      if (n - it == 2) {
        step(it, pa_x, al_x, pa_y, al_y);
        last(it + 1, pa_y, al_y);
      } else {
        last(it, pa_x, al_x);
      }
    } else {
      // One tile at a time: S, softmax, P V, each waited for (the ping-pong overlaps the two consumers).
      for (int it = 0; it < n; ++it) {
        issue_s(it, it + 1 == n);
        sm90::wgmma_wait<0>();
        sm90::fence_regs(sc);
        softmax(t_begin + it, pa_x, al_x);
        issue_pv(pa_x, al_x, it, t_begin + it);
        sm90::wgmma_wait<0>();
        sm90::fence_regs(o);
        sm90::mbar_arrive(sb + L::empty(it % kStages));
      }
    }
  }

  // Epilogue: l over the quad, out = O / l (0 for a row that saw no key), lse.
  float inv[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const float l = attn_common::quad_sum(l_run[hf]);
    inv[hf] = attn_common::inv_denominator(l);
    const int row = m0 + r0 + 8 * hf;
    if (p.lse && tq4 == 0 && row < sq.q_len)
      p.lse[sq.lse_base + int64_t(h) * sq.lse_stride_h + row] = attn_common::row_lse(l, m_run[hf], mult);
  }
  // This warpgroup's rows of the Q tile are free: its last wgmma reading them has retired (or Q was never
  // loaded). Registers -> swizzled Q rows -> 16-byte stores.
#pragma unroll
  for (int i = 0; i < D / 2; i += 2) {
    const int hf = (i >> 1) & 1, col = 8 * (i >> 2) + 2 * tq4;
    *reinterpret_cast<uint32_t*>(base + L::q + sm90::tile_offset(kBM, r0 + 8 * hf, col)) =
        pack2<T>(o[i] * inv[hf], o[i + 1] * inv[hf]);
  }
  sm90::named_barrier_sync(1 + c, 128);
  T* og = static_cast<T*>(p.out) + (sq.q_tok0 + m0) * int64_t(p.Hq) * D + int64_t(h) * D;
  const int64_t o_st = int64_t(p.Hq) * D;
#pragma unroll
  for (int i = 0; i < 64 * D / 8 / 128; ++i) {
    const int chunk = ct + 128 * i;
    const int row = 64 * c + chunk / (D / 8), ch = chunk % (D / 8);
    if (m0 + row < sq.q_len)
      *reinterpret_cast<uint4*>(og + int64_t(row) * o_st + ch * 8) =
          *reinterpret_cast<const uint4*>(base + L::q + (ch / 8) * L::kBoxQ + sm90::swz128(row, ch % 8));
  }
#else
  __trap();
#endif
}

}  // namespace cuda
}  // namespace llmkern
