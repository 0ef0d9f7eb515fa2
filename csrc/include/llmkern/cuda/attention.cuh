// attention (prefill) on NVIDIA GPUs, sm_80+: a flash-attention forward kernel on tensor cores.
// Semantics: llmkern/ops/attention.py. Torch-free; the launcher (csrc/cuda/attention.cu) checks sizes.
//
// One thread block = (sequence b, query head h, query tile of BM = 16 * NW rows); warp w owns query rows
// w * 16 .. w * 16 + 15 of the tile. The key/value head is h / (Hq / Hk) (GQA/MQA by indexing).
// Per key tile of BN keys (only the tiles some row of the block can see: causal / window bands are
// skipped by the loop bounds, the band edges and the sequence end are masked per element):
//   S = Q K^T     mma.sync m16n8k16 (fp16/bf16 in, fp32 out); Q fragments stay in registers for the
//                 whole block (ldmatrix once), K fragments by ldmatrix from shared memory
//   softcap       x = cap * tanh(S * scale / cap) (accurate tanhf) in log2 units (times log2 e), else
//                 x = S and the scale (times log2 e) multiplies in the exponent: exp2(x * c - m * c),
//                 one FMA per score
//   online softmax per row in fp32: running max m, sum l; acc rescaled by exp2((m_old - m_new) c)
//   O += P V      P re-packed from the S accumulators into A fragments (no shared memory round
//                 trip), V fragments by ldmatrix.trans
// K and V tiles are double-buffered in shared memory with cp.async (the copy of tile t + 1 runs while
// tile t is computed); rows past the sequence end are zero-filled (no garbage, no NaN * 0).
// Shared memory rows are XOR-swizzled in 16-byte chunks (chunk ^ (row & 7)): conflict-free ldmatrix
// and cp.async. At the end the block writes out = acc / l (0 for a row that saw no key) through its
// warp's own rows of the Q tile in shared memory (16-byte coalesced stores), and lse = m ln 2 + ln l
// (natural log of the softmax denominator of the scaled, capped scores; -inf for a row with no key).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "llmkern/cuda/attention_common.cuh"
#include "llmkern/cuda/attention_params.h"
#include "llmkern/cuda/sm80.cuh"

namespace llmkern {
namespace cuda {

namespace attn_detail {

// 16-bit pair packing (lower value in the lower half) and the m16n8k16 MMA of T (sm80.cuh).
template <typename T>
struct Mma;

template <>
struct Mma<__half> {
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    return uint32_t(__half_as_ushort(__float2half_rn(lo))) | (uint32_t(__half_as_ushort(__float2half_rn(hi))) << 16);
  }
  __device__ __forceinline__ static void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    mma_f16(*reinterpret_cast<float(*)[4]>(c), *reinterpret_cast<const uint32_t(*)[4]>(a), b0, b1);
  }
};

template <>
struct Mma<__nv_bfloat16> {
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    return uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
           (uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
  }
  __device__ __forceinline__ static void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    mma_bf16(*reinterpret_cast<float(*)[4]>(c), *reinterpret_cast<const uint32_t(*)[4]>(a), b0, b1);
  }
};

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, uint32_t addr) { cuda::ldmatrix_x4(addr, r[0], r[1], r[2], r[3]); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, uint32_t addr) {
  cuda::ldmatrix_x4_trans(addr, r[0], r[1], r[2], r[3]);
}

// Element offset of (row, 16-byte chunk) in a [rows, D] tile with XOR-swizzled chunks.
template <int D>
__device__ __forceinline__ int swz(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// Copies rows [0, rows) of a [R, D] tile from global (row r at base + r * stride) into shared memory;
// rows >= valid are zero-filled. NT threads, each moves R * D / 8 / NT chunks of 16 bytes.
template <typename T, int R, int D, int NT>
__device__ __forceinline__ void load_tile(uint32_t smem, const T* base, int64_t stride, int valid, int tid) {
  constexpr int kChunks = D / 8;
  static_assert((R * kChunks) % NT == 0, "tile chunks divide evenly among threads");
#pragma unroll
  for (int i = 0; i < R * kChunks / NT; ++i) {
    const int c = tid + i * NT;
    const int row = c / kChunks, ch = c % kChunks;
    const bool ok = row < valid;
    const T* src = ok ? base + row * stride + ch * 8 : base;
    cp_async16(smem + swz<D>(row, ch) * int(sizeof(T)), src, ok ? 16 : 0);
  }
}

// The online-softmax step of one tile of scores s[NB][4] (m16n8 accumulators: rows g (d0, d1) and g + 8 (d2, d3)
// of a warp's 16, each spread over the 4 threads of a quad; unscaled, or capped in log2 units, the scale applied in
// the exponent: exp2(s * mult - m * mult) by one FMA): the two rows' running max m_run and sum l_run are updated, s
// becomes the probabilities, and the output accumulators o[ND][4] are rescaled by exp2((m_old - m_new) * mult).
// Shared by the prefill kernel below and the decode one (decode_attention_mma.cuh).
template <int NB, int ND>
__device__ __forceinline__ void online_softmax(float (&s)[NB][4], float (&m_run)[2], float (&l_run)[2], float mult,
                                               float (&o)[ND][4]) {
  float alpha[2];
  bool grew = false;  // some row's running max grew: acc needs rescaling
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < NB; ++j) mx = fmaxf(mx, fmaxf(s[j][hf * 2], s[j][hf * 2 + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m_run[hf], mx);
    const float m_sc = m_new == -INFINITY ? 0.0f : m_new * mult;  // 0: nothing visible yet
    // exp2((m_old - m_new) c): 0 while m_old is -inf; exactly 1 when the max did not grow.
    const bool up = m_new > m_run[hf];
    alpha[hf] = up ? fast_exp2(fmaf(m_run[hf], mult, -m_sc)) : 1.0f;
    grew |= up;
    m_run[hf] = m_new;
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < NB; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float pe = fast_exp2(fmaf(s[j][hf * 2 + e], mult, -m_sc));
        s[j][hf * 2 + e] = pe;
        sum += pe;
      }
    l_run[hf] = l_run[hf] * alpha[hf] + sum;
  }
  // After the first tiles the maxima rarely grow: skip the D / 2 multiplies when no row's did.
  if (__any_sync(0xffffffffu, grew)) {
#pragma unroll
    for (int n = 0; n < ND; ++n) {
      o[n][0] *= alpha[0];
      o[n][1] *= alpha[0];
      o[n][2] *= alpha[1];
      o[n][3] *= alpha[1];
    }
  }
}

}  // namespace attn_detail

// Launch: grid (B * Hq, ceil(max query rows / BM)), NT = 32 * NW threads,
// attn_fwd_smem_bytes<D, NW, BN>() bytes of dynamic shared memory.
template <int D, int NW, int BN>
constexpr int attn_fwd_smem_bytes() {
  return (16 * NW + 4 * BN) * D * 2;
}

// MINB: blocks per SM to fit in registers (__launch_bounds__), i.e. at most 65536 / (MINB * 32 * NW) each.
template <typename T, int D, int NW, int BN, int MINB>
__global__ void __launch_bounds__(32 * NW, MINB) attn_fwd_kernel(const AttnFwdParams p) {
  using namespace attn_detail;
  constexpr int NT = 32 * NW, BM = 16 * NW;
  constexpr int NB = BN / 8;  // n-blocks of 8 keys in a tile
  constexpr int KD = D / 16;  // k-steps over the head dim
  constexpr int ND = D / 8;   // n-blocks of 8 output columns
  static_assert(D % 64 == 0 && BN % 16 == 0, "tile shapes");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  const uint32_t sQ_a = static_cast<uint32_t>(__cvta_generic_to_shared(sQ));
  const uint32_t sK_a = sQ_a + BM * D * 2;  // two K buffers, then two V buffers
  const uint32_t sV_a = sK_a + 2 * BN * D * 2;
  constexpr uint32_t kTileBytes = BN * D * 2;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int bh = blockIdx.x;
  const int b = bh / p.Hq, h = bh % p.Hq, kh = h / p.group;
  // Heaviest query tiles (most keys when causal) first.
  const int m0 = (gridDim.y - 1 - blockIdx.y) * BM;

  int q_len, k_len;
  int64_t q_tok0, q_base, k_base, v_base, lse_base, lse_stride_h;
  if (p.cu_q) {
    const int q0 = p.cu_q[b], k0 = p.cu_k[b];
    q_len = p.cu_q[b + 1] - q0;
    k_len = p.cu_k[b + 1] - k0;
    q_tok0 = q0;
    q_base = int64_t(q0) * p.q_st;
    k_base = int64_t(k0) * p.k_st;
    v_base = int64_t(k0) * p.v_st;
    lse_base = q0;
    lse_stride_h = p.Tq;
  } else {
    q_len = p.Sq;
    k_len = p.Sk;
    q_tok0 = int64_t(b) * p.Sq;
    q_base = int64_t(b) * p.q_sb;
    k_base = int64_t(b) * p.k_sb;
    v_base = int64_t(b) * p.v_sb;
    lse_base = int64_t(b) * p.Hq * p.Sq;
    lse_stride_h = p.Sq;
  }
  if (m0 >= q_len) return;  // packed grids are sized for the longest possible sequence
  const int diag = k_len - q_len;  // query i sits at key position i + diag
  const int m_last = min(m0 + BM, q_len) - 1;
  // Keys any row of the tile sees: [lo, hi).
  int lo = 0, hi = k_len;
  if (p.window_left >= 0) lo = max(0, m0 + diag - p.window_left);
  if (p.window_right >= 0) hi = min(k_len, m_last + diag + p.window_right + 1);
  const int t_begin = lo / BN;
  const int t_end = hi > lo ? (hi + BN - 1) / BN : t_begin;

  const T* qg = static_cast<const T*>(p.q) + q_base + int64_t(h) * p.q_sh;
  const T* kg = static_cast<const T*>(p.k) + k_base + int64_t(kh) * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + v_base + int64_t(kh) * p.v_sh;
  T* og = static_cast<T*>(p.out) + (q_tok0 + m0) * int64_t(p.Hq) * D + int64_t(h) * D;
  const int64_t o_st = int64_t(p.Hq) * D;

  const int g = lane >> 2, tq = lane & 3;  // fragment row group and column pair
  const int r0 = warp * 16;                // this warp's first row in the tile
  // Scores are kept unscaled (or capped, already in log2 units); exp2(s * mult - m * mult) by one FMA.
  const bool softcap = p.softcap_log2 > 0.0f;
  const float mult = softcap ? 1.0f : p.scale_log2;

  float o[ND][4];
#pragma unroll
  for (int n = 0; n < ND; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};

  if (t_begin < t_end) {
    // Prologue: Q and K[t_begin] in one group, V[t_begin] in the next.
    load_tile<T, BM, D, NT>(sQ_a, qg + int64_t(m0) * p.q_st, p.q_st, q_len - m0, tid);
    load_tile<T, BN, D, NT>(sK_a, kg + int64_t(t_begin) * BN * p.k_st, p.k_st, k_len - t_begin * BN, tid);
    cp_async_commit();
    load_tile<T, BN, D, NT>(sV_a, vg + int64_t(t_begin) * BN * p.v_st, p.v_st, k_len - t_begin * BN, tid);
    cp_async_commit();

    // Q (with K[t_begin]) has landed: this warp's Q fragments go to registers for the whole block.
    cp_async_wait<1>();
    __syncthreads();
    // ldmatrix lane addresses, as byte offsets in a tile, of the first 16 x 16 block (k-step or column
    // pair 0). Rows are D * 2 bytes (a multiple of 128), each 16-byte chunk c of row r sits at chunk
    // c ^ (r & 7) and every lane's row is = lane (mod 8): chunk 2 * i + b lands at (off ^ (i << 5)),
    // and 16 rows further down is + 32 * D bytes (swz<D> written out; the emulator checks both).
    const uint32_t q_off = swz<D>(r0 + (lane & 7) + ((lane >> 3) & 1) * 8, lane >> 4) * 2;
    const uint32_t k_off = swz<D>((lane & 7) + (lane >> 4) * 8, (lane >> 3) & 1) * 2;
    const uint32_t v_off = swz<D>((lane & 7) + ((lane >> 3) & 1) * 8, lane >> 4) * 2;
    uint32_t qa[KD][4];
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) ldmatrix_x4(qa[kk], sQ_a + (q_off ^ (kk << 5)));
    for (int t = t_begin; t < t_end; ++t) {
      const int buf = (t - t_begin) & 1;
      const int n0 = t * BN;
      // K[t] has landed; every warp is done with tile t - 1 (so buffers buf ^ 1 are free).
      cp_async_wait<1>();
      __syncthreads();
      if (t + 1 < t_end)
        load_tile<T, BN, D, NT>(sK_a + (buf ^ 1) * kTileBytes, kg + int64_t(n0 + BN) * p.k_st, p.k_st,
                                k_len - (n0 + BN), tid);
      cp_async_commit();

      // S = Q K^T for this warp's 16 rows x BN keys.
      float s[NB][4];
#pragma unroll
      for (int j = 0; j < NB; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
      const uint32_t kt = sK_a + buf * kTileBytes;
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) {
        const uint32_t ka = kt + (k_off ^ (kk << 5));
#pragma unroll
        for (int jp = 0; jp < NB / 2; ++jp) {
          uint32_t kb[4];  // keys jp * 16 + 0..7 (kb[0..1]) and + 8..15 (kb[2..3]), d 16 kk .. 16 kk + 15
          ldmatrix_x4(kb, ka + jp * 32 * D);
          Mma<T>::mma(s[2 * jp], qa[kk], kb[0], kb[1]);
          Mma<T>::mma(s[2 * jp + 1], qa[kk], kb[2], kb[3]);
        }
      }

      // Softcap (into log2 units; else the scale is applied in the exponent), then the mask where the
      // tile cuts the band.
      if (softcap) {
#pragma unroll
        for (int j = 0; j < NB; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[j][e] = p.softcap_log2 * tanhf(s[j][e] * p.inv_softcap);
      }
      const bool full = n0 + BN <= k_len && (p.window_right < 0 || n0 + BN - 1 <= m0 + diag + p.window_right) &&
                        (p.window_left < 0 || n0 >= m_last + diag - p.window_left);
      if (!full) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int pos = m0 + r0 + g + hf * 8 + diag;  // the row's query position in key coordinates
          const int khi = p.window_right >= 0 ? min(k_len - 1, pos + p.window_right) : k_len - 1;
          const int klo = p.window_left >= 0 ? pos - p.window_left : 0;
#pragma unroll
          for (int j = 0; j < NB; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int key = n0 + j * 8 + 2 * tq + e;
              if (key > khi || key < klo) s[j][hf * 2 + e] = -INFINITY;
            }
        }
      }

      online_softmax(s, m_run, l_run, mult, o);

      // V[t] has landed (K[t + 1] may still be in flight).
      cp_async_wait<1>();
      __syncthreads();
      if (t + 1 < t_end)
        load_tile<T, BN, D, NT>(sV_a + (buf ^ 1) * kTileBytes, vg + int64_t(n0 + BN) * p.v_st, p.v_st,
                                k_len - (n0 + BN), tid);
      cp_async_commit();

      // O += P V: P's A fragments straight from the S accumulators (keys 16 kk .. 16 kk + 15).
      uint32_t pa[BN / 16][4];
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        pa[kk][0] = Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]);
        pa[kk][1] = Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]);
        pa[kk][2] = Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        pa[kk][3] = Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      }
      const uint32_t vt = sV_a + buf * kTileBytes;
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        const uint32_t va = vt + (v_off ^ (dp << 5));
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          uint32_t vb[4];  // d 16 dp + 0..7 (vb[0..1]) and + 8..15 (vb[2..3]), keys 16 kk .. 16 kk + 15
          ldmatrix_x4_trans(vb, va + kk * 32 * D);
          Mma<T>::mma(o[2 * dp], pa[kk], vb[0], vb[1]);
          Mma<T>::mma(o[2 * dp + 1], pa[kk], vb[2], vb[3]);
        }
      }
    }
    cp_async_wait<0>();  // only empty groups can be left; keeps the block's copies retired
  }

  // Epilogue: l over the quad, then out = acc / l (0 when no key was seen) and lse.
  float inv[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const float l = attn_common::quad_sum(l_run[hf]);
    inv[hf] = attn_common::inv_denominator(l);
    const int row = m0 + r0 + g + hf * 8;
    if (p.lse && tq == 0 && row < q_len)
      p.lse[lse_base + int64_t(h) * lse_stride_h + row] = attn_common::row_lse(l, m_run[hf], mult);
  }
  // This warp's rows of the Q tile are free (its Q fragments are in registers; no copy is in flight).
  __syncwarp();
#pragma unroll
  for (int n = 0; n < ND; ++n)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int row = r0 + g + hf * 8;
      *reinterpret_cast<uint32_t*>(sQ + swz<D>(row, n) + 2 * tq) =
          Mma<T>::pack(o[n][hf * 2] * inv[hf], o[n][hf * 2 + 1] * inv[hf]);
    }
  __syncwarp();
#pragma unroll
  for (int i = 0; i < 16 * ND / 32; ++i) {
    const int c = lane + i * 32;
    const int row = c / ND, ch = c % ND;
    if (m0 + r0 + row < q_len)
      *reinterpret_cast<uint4*>(og + int64_t(r0 + row) * o_st + ch * 8) =
          *reinterpret_cast<const uint4*>(sQ + swz<D>(r0 + row, ch));
  }
}

}  // namespace cuda
}  // namespace llmkern
