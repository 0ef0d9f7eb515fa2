// decode_attention on tensor cores (opt-in: DecodeParams::mma; llmkern/ops/decode_attention.py CUDA_DECODE_MMA),
// for 16-bit caches with D = 64 or 128. Torch-free; never allocates. Same grid, key ranges, splits, workspace
// layout and merge kernel as decode_split_kernel (decode_attention.cuh); what differs is how a CTA walks its keys.
//
// Why: decode_split_kernel does the dot products and P V on CUDA cores with 16 lanes per key (a shuffle tree per
// score, the softmax repeated in all 16 lanes): ~1770 SASS instructions per 8-key step of a warp for bf16, D = 128,
// 4 query rows (sm_90a), which caps it near a third of an H200's read bandwidth whatever the loads do (the first
// GPU run: 34%). Here the G x Sq query rows of a KV head (up to 16) are the rows of mma.sync m16n8k16 tiles,
// as in prefill flash attention (attention.cuh, whose fragment helpers this reuses):
//   - a CTA (4 warps) = one sequence, one KV head, one key slice, 16 query rows; K / V tiles of 64 keys come in
//     by cp.async, kDecodeMmaStages deep (a ring in dynamic shared memory, swizzled 16-byte chunks);
//   - warp w takes keys 16 w .. 16 w + 15 of every tile: S = Q K^T (ldmatrix, D / 16 k-steps x 2 n-blocks),
//     online softmax per row over its keys (quad shuffles), O += P V (P from the S accumulators, V by
//     ldmatrix.trans); so each warp keeps its own (m, l, O) like the split kernel's warps;
//   - at the end the 4 warps merge through shared memory and the CTA writes the output (one split) or its
//     partial state (acc, m in log2 units, l) for decode_merge_kernel.
// Rows past G x Sq (the tile has 16) hold q = 0 and are never written. P is rounded to the cache's dtype before
// P V (as flash attention does); the split kernel keeps it in fp32: the two agree to the op's tolerance, not
// bitwise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "llmkern/cuda/attention.cuh"
#include "llmkern/cuda/attention_common.cuh"
#include "llmkern/cuda/decode_attention_merge.cuh"
#include "llmkern/cuda/kv_rotary_common.cuh"
#include "llmkern/cuda/mma_common.cuh"  // smem_u32; cp.async, ldmatrix, mma (sm80.cuh)
#include "llmkern/cuda/params.h"
#include "llmkern/cuda_check.cuh"

namespace llmkern {
namespace cuda {

constexpr int kDecodeMmaRows = 16;   // query rows per CTA: one m16 tile
constexpr int kDecodeMmaBN = 64;     // keys per tile: 16 per warp
constexpr int kDecodeMmaStages = 3;  // K / V tiles in flight (cp.async ring)
constexpr int kDecodeMmaWarps = 4;
constexpr float kDecodeMmaLog2e = 1.4426950408889634f;

// Dynamic shared memory: the Q tile, then per stage a K tile and a V tile (16-bit, [keys][D]). The merge at the
// end reuses the stages for the warps' fp32 O ([warp][row][D]: at most 4 x 16 x 128 x 4 = 32 KB).
template <int D>
constexpr int decode_mma_smem_bytes() {
  return (kDecodeMmaRows * D + kDecodeMmaStages * 2 * kDecodeMmaBN * D) * 2;
}

template <typename T, int D>
__global__ void __launch_bounds__(kDecodeMmaWarps * 32, 2) decode_mma_kernel(const DecodeParams p) {
  using namespace attn_detail;
  constexpr int NW = kDecodeMmaWarps, NT = 32 * NW, BN = kDecodeMmaBN, S = kDecodeMmaStages;
  constexpr int KD = D / 16;      // k-steps of S = Q K^T
  constexpr int ND = D / 8;       // n-blocks of O
  constexpr int CPR = D / 8;      // 16-byte chunks per row
  constexpr int RSTEP = NT / CPR;  // a thread's rows of a tile are RSTEP apart
  constexpr int RPT = BN / RSTEP;  // ... and it copies RPT of them (per K and per V)
  constexpr uint32_t kTile = BN * D * 2;
  static_assert(D == 64 || D == 128, "head dims 64 and 128");
  static_assert(NT % CPR == 0 && BN % RSTEP == 0 && NW * 16 == BN, "tile shapes");
  static_assert(NW * kDecodeMmaRows * D * 4 <= S * 2 * int(kTile), "the merge's O fits in the stages");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ float s_m[NW][kDecodeMmaRows];
  __shared__ float s_l[NW][kDecodeMmaRows];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  const uint32_t sQ_a = smem_u32(sQ);
  const uint32_t sKV_a = sQ_a + kDecodeMmaRows * D * 2;  // stage s: K at + 2 s kTile, V at + (2 s + 1) kTile

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, tq = lane & 3;
  const int split = blockIdx.x, b = blockIdx.z;
  const int kvh = blockIdx.y / p.row_chunks, chunk = blockIdx.y % p.row_chunks;
  const int G = p.Hq / p.Hk;
  const int r0 = chunk * kDecodeMmaRows;
  const int nrows = min(kDecodeMmaRows, G * p.Sq - r0);

  // Keys visible to at least one row of this CTA, and this split's share (decode_split_kernel's).
  const int len = p.seq_lens[b];
  int kbeg, kend;
  decode_key_range(p, len, r0, nrows, split, kbeg, kend);
  const int ntiles = kend > kbeg ? (kend - kbeg + BN - 1) / BN : 0;
  const bool row_mask = p.Sq > 1;  // with one new token every key of [lo, hi) is visible to every row

  // K / V tile t (keys kbeg + BN t ..) into stage `stage`: this thread's chunk ch of rows rbase + RSTEP i; rows
  // past kend are zero-filled. Paged: one division per tile, then stepped along.
  const char* kc = static_cast<const char*>(p.k_cache);
  const char* vc = static_cast<const char*>(p.v_cache);
  const bool paged = p.block_table != nullptr;
  const int32_t* bt = paged ? p.block_table + b * p.bt_stride : nullptr;
  const int ch = tid % CPR, rbase = tid / CPR;
  // Byte offsets common to every row this thread copies (head, chunk; contiguous: the sequence too), so that a row
  // costs one multiply-add per cache (its column, or its block's row and column).
  const int64_t k_fix = (int64_t(kvh) * p.k_s2 + ch * 8 + (paged ? 0 : int64_t(b) * p.k_s0)) * 2;
  const int64_t v_fix = (int64_t(kvh) * p.v_s2 + ch * 8 + (paged ? 0 : int64_t(b) * p.v_s0)) * 2;
  const int64_t k_step = int64_t(RSTEP) * p.k_s1 * 2, v_step = int64_t(RSTEP) * p.v_s1 * 2;  // contiguous: next row
  auto issue = [&](int t, int stage) {
    const int j0 = kbeg + t * BN + rbase;
    unsigned blk = 0, off = 0;
    int64_t ko = 0, vo = 0;  // contiguous: this row's byte offsets, stepped along (one multiply per tile)
    if (paged) {
      blk = unsigned(j0) / unsigned(p.block_size);
      off = unsigned(j0) - blk * unsigned(p.block_size);
    } else {
      ko = k_fix + int64_t(j0) * p.k_s1 * 2;
      vo = v_fix + int64_t(j0) * p.v_s1 * 2;
    }
    const uint32_t sk = sKV_a + 2 * stage * kTile;
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      const int r = rbase + i * RSTEP, j = j0 + i * RSTEP;
      const bool ok = j < kend;
      if (paged) {
        const int64_t row = ok ? bt[blk] : 0;
        ko = k_fix + (row * p.k_s0 + int64_t(off) * p.k_s1) * 2;
        vo = v_fix + (row * p.v_s0 + int64_t(off) * p.v_s1) * 2;
        off += RSTEP;
        while (off >= unsigned(p.block_size)) {  // (at most RSTEP / block_size + 1 wraps)
          off -= unsigned(p.block_size);
          ++blk;
        }
      }
      const uint32_t dst = sk + swz<D>(r, ch) * 2;
      cp_async16(dst, ok ? kc + ko : kc, ok ? 16 : 0);
      cp_async16(dst + kTile, ok ? vc + vo : vc, ok ? 16 : 0);
      if (!paged) {
        ko += k_step;
        vo += v_step;
      }
    }
  };

  // Q rows r0 .. r0 + 15 of this KV head (row rr: token rr / G, head kvh G + rr % G) into sQ; zeros past nrows.
  // (raw 16-bit copies: q has the cache's dtype T; zero bits are +0 in both)
  const uint16_t* qg = static_cast<const uint16_t*>(p.q);
  uint16_t* sQ16 = reinterpret_cast<uint16_t*>(sQ);
  for (int idx = tid; idx < kDecodeMmaRows * D; idx += NT) {
    const int r = idx / D, d = idx % D, rr = r0 + r;
    uint16_t v = 0;
    if (r < nrows) v = qg[b * p.q_s0 + (rr / G) * p.q_s1 + (kvh * G + rr % G) * p.q_s2 + d];
    sQ16[swz<D>(r, d >> 3) + (d & 7)] = v;
  }
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < ntiles) issue(s, s);
    cp_async_commit();
  }
  __syncthreads();  // sQ written
  const uint32_t q_off = swz<D>((lane & 7) + ((lane >> 3) & 1) * 8, lane >> 4) * 2;
  const uint32_t k_off = swz<D>((lane & 7) + (lane >> 4) * 8, (lane >> 3) & 1) * 2;
  const uint32_t v_off = swz<D>((lane & 7) + ((lane >> 3) & 1) * 8, lane >> 4) * 2;
  const uint32_t w_off = uint32_t(warp) * 16 * D * 2;  // this warp's 16 keys of a tile
  uint32_t qa[KD][4];
#pragma unroll
  for (int kk = 0; kk < KD; ++kk) ldmatrix_x4(qa[kk], sQ_a + (q_off ^ (kk << 5)));

  // Scores stay unscaled (or capped, in log2 units); exp2(s * mult - m * mult) by one FMA, as attention.cuh.
  const bool capped = p.softcap > 0.0f;
  const float mult = capped ? 1.0f : p.scale * kDecodeMmaLog2e;
  const float cap_log2 = p.softcap * kDecodeMmaLog2e, cap_in = capped ? p.scale / p.softcap : 0.0f;
  int qpos[2];  // key position of fragment rows g and g + 8 (Sq > 1: rows of different tokens see different keys)
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) qpos[hf] = len - p.Sq + (r0 + g + 8 * hf) / G;

  float o[ND][4];
#pragma unroll
  for (int i = 0; i < ND; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};

  for (int t = 0; t < ntiles; ++t) {
    const int stage = t % S;
    cp_async_wait<S - 2>();
    // Tile t has landed (this thread's copies; the barrier: everyone's), and every warp is done with tile
    // t - 1, whose stage the next issue refills.
    __syncthreads();
    if (t + S - 1 < ntiles) issue(t + S - 1, (t + S - 1) % S);
    cp_async_commit();
    const uint32_t kt = sKV_a + 2 * stage * kTile + w_off, vt = kt + kTile;

    float s[2][4];  // [n-block of 8 keys][d0..d3]: rows g (0, 1) and g + 8 (2, 3), keys 8 j + 2 tq + {0, 1}
#pragma unroll
    for (int j = 0; j < 2; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
      uint32_t kb[4];  // keys 0..7 (kb[0..1]) and 8..15 (kb[2..3]) of the warp's 16, d 16 kk .. 16 kk + 15
      ldmatrix_x4(kb, kt + (k_off ^ (kk << 5)));
      Mma<T>::mma(s[0], qa[kk], kb[0], kb[1]);
      Mma<T>::mma(s[1], qa[kk], kb[2], kb[3]);
    }
    if (capped) {
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = cap_log2 * tanhf(s[j][e] * cap_in);
    }
    const int key0 = kbeg + t * BN + warp * 16;  // the warp's first key
    if (key0 + 16 > kend || row_mask) {
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = key0 + 8 * j + 2 * tq + (e & 1), hf = e >> 1;
          bool vis = key < kend;
          if (row_mask) vis = vis && key <= qpos[hf] && (p.window_left < 0 || key >= qpos[hf] - p.window_left);
          if (!vis) s[j][e] = -INFINITY;
        }
    }

    online_softmax(s, m_run, l_run, mult, o);  // (attention.cuh: rows g and g + 8, each over a quad)

    // O += P V over the warp's 16 keys (one k-step).
    uint32_t pa[4];
    pa[0] = Mma<T>::pack(s[0][0], s[0][1]);
    pa[1] = Mma<T>::pack(s[0][2], s[0][3]);
    pa[2] = Mma<T>::pack(s[1][0], s[1][1]);
    pa[3] = Mma<T>::pack(s[1][2], s[1][3]);
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t vb[4];  // d 16 dp + 0..7 (vb[0..1]) and + 8..15 (vb[2..3]) of the warp's 16 keys
      ldmatrix_x4_trans(vb, vt + (v_off ^ (dp << 5)));
      Mma<T>::mma(o[2 * dp], pa, vb[0], vb[1]);
      Mma<T>::mma(o[2 * dp + 1], pa, vb[2], vb[3]);
    }
  }
  cp_async_wait<0>();  // (only empty groups can be left)
  __syncthreads();     // every warp is done with the stages: they hold the merge's O now

  // Each warp's state per row: m in log2 units, l summed over its quad, O.
  float* s_o = reinterpret_cast<float*>(smem_raw + kDecodeMmaRows * D * 2);  // [warp][row][D]
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int row = g + 8 * hf;
    const float l = attn_common::quad_sum(l_run[hf]);
    if (tq == 0) {
      s_m[warp][row] = m_run[hf] == -INFINITY ? -INFINITY : m_run[hf] * mult;
      s_l[warp][row] = l;
    }
#pragma unroll
    for (int i = 0; i < ND; ++i) {
      float* dst = s_o + (warp * kDecodeMmaRows + row) * D + 8 * i + 2 * tq;
      dst[0] = o[i][2 * hf];
      dst[1] = o[i][2 * hf + 1];
    }
  }
  __syncthreads();

  // Merge the warps (the split kernel's merge) and write the output (one split) or this split's state.
  decode_merge_warps<NW, kDecodeMmaRows>(p, s_m, s_l, s_o, D, nrows, r0, kvh, b, split);
}

// Whether decode_mma_kernel<T, D>'s shared memory (dynamic + its 512 static bytes) fits the current device's
// per-block opt-in limit: sm_86 / sm_89 GPUs (A10, L4, L40S, RTX 30 / 40) allow 99 KB, less than the 100.5 KB of
// D = 128. Read once per device (not a stream operation: capture-safe).
template <int D>
inline bool decode_mma_fits() {
  static std::atomic<int> limit[64];  // 0: not read yet
  int dev = 0;
  LLMKERN_CUDA_CHECK(cudaGetDevice(&dev));
  int v = dev < 64 ? limit[dev].load(std::memory_order_relaxed) : 0;
  if (v == 0) {
    LLMKERN_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    if (dev < 64) limit[dev].store(v, std::memory_order_relaxed);
  }
  return decode_mma_smem_bytes<D>() + 2 * kDecodeMmaWarps * kDecodeMmaRows * 4 <= v;
}

// Launches decode_mma_kernel<T, D> over p's grid (p.rows_per_cta = 16, p.row_chunks set by the caller). The
// dynamic shared memory above 48 KB is opted into once per device, outside any CUDA graph capture after a
// warm-up call.
template <typename T, int D>
inline void launch_decode_mma(const DecodeParams& p, cudaStream_t stream) {
  constexpr int smem = decode_mma_smem_bytes<D>();
  static std::atomic<uint64_t> done{0};
  if (smem > 48 * 1024) {
    int dev = 0;
    LLMKERN_CUDA_CHECK(cudaGetDevice(&dev));
    const uint64_t bit = dev < 64 ? (uint64_t(1) << dev) : 0;
    if (!bit || !(done.load(std::memory_order_acquire) & bit)) {
      LLMKERN_CUDA_CHECK(cudaFuncSetAttribute(decode_mma_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      if (bit) done.fetch_or(bit, std::memory_order_release);
    }
  }
  const dim3 grid(p.num_splits, p.Hk * p.row_chunks, p.B);
  decode_mma_kernel<T, D><<<grid, kDecodeMmaWarps * 32, smem, stream>>>(p);
}

}  // namespace cuda
}  // namespace llmkern
