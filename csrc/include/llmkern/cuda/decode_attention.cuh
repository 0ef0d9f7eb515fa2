// decode_attention on CUDA: split-KV attention of each sequence's newest Sq tokens over its cache
// (llmkern/ops/decode_attention.py has the semantics). Torch-free; never allocates.
//
// Kernel 1 (decode_split_kernel), grid (num_splits, Hk * row_chunks, B), 4 warps: one CTA takes one
// sequence, one KV head, one slice of that sequence's visible keys, and up to ROWS query rows of that
// KV head (the G = Hq / Hk query heads of the group times the Sq new tokens), so each K/V row is read
// from memory once per KV head. Lanes hold VEC consecutive elements of a key (16-byte loads; 8-byte for
// int8), LPK = DMAX / VEC lanes form one key (lanes past the head dim D <= DMAX idle), KPW = 32 / LPK keys per warp instruction; each warp walks
// U * KPW keys per step with all loads of the step (K and V) issued before the math, and keeps an
// online softmax (running max m, sum l, accumulator acc, fp32, in the log2 domain) per query row.
// Scores are reduced across the LPK lanes of a key with shuffles; the max over a step is reduced across
// the warp, so m is warp-uniform and the warp's KPW key groups merge with plain sums at the end. The
// 4 warps merge through shared memory; the CTA writes the normalized output (num_splits == 1) or its
// partial state (acc, m, l) to the workspace.
// Kernel 2 (decode_merge_kernel), one CTA per query row: out = sum_s acc_s 2^(m_s - M) / sum_s l_s 2^(m_s - M).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "llmkern/cuda/decode_attention_mma.cuh"
#include "llmkern/cuda/kv_rotary_common.cuh"
#include "llmkern/cuda/mma_common.cuh"  // smem_u32, cp.async (sm80.cuh)
#include "llmkern/cuda/params.h"

namespace llmkern {
namespace cuda {

constexpr int kDecodeWarps = 4;
constexpr float kLog2e = 1.4426950408889634f;

template <int KV>
struct KvVec;  // one lane's load of a cache row: raw bits and their conversion to fp32
template <>
struct KvVec<kF32> {
  static constexpr int kVec = 4;
  using Raw = float4;
  __device__ __forceinline__ static void to_f32(const Raw& r, float* x) { x[0] = r.x, x[1] = r.y, x[2] = r.z, x[3] = r.w; }
};
template <>
struct KvVec<kBF16> {
  static constexpr int kVec = 8;
  using Raw = uint4;
  __device__ __forceinline__ static void to_f32(const Raw& r, float* x) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      x[2 * i] = __uint_as_float(w[i] << 16);
      x[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
};
template <>
struct KvVec<kF16> {
  static constexpr int kVec = 8;
  using Raw = uint4;
  __device__ __forceinline__ static void to_f32(const Raw& r, float* x) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h2;
      memcpy(&h2, &w[i], 4);
      const float2 f = __half22float2(h2);
      x[2 * i] = f.x;
      x[2 * i + 1] = f.y;
    }
  }
};
template <>
struct KvVec<kI8> {
  static constexpr int kVec = 8;
  using Raw = uint2;
  __device__ __forceinline__ static void to_f32(const Raw& r, float* x) {
    const uint32_t w[2] = {r.x, r.y};
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) x[4 * i + j] = static_cast<float>(static_cast<int8_t>((w[i] >> (8 * j)) & 0xffu));
  }
};

template <int KV, int DMAX, int ROWS, bool PIPE>
__global__ void __launch_bounds__(kDecodeWarps * 32, ROWS <= 4 ? 3 : 2) decode_split_kernel(const DecodeParams p) {
  using V = KvVec<KV>;
  using Raw = typename V::Raw;
  constexpr int VEC = V::kVec;
  constexpr int LPK = DMAX / VEC;  // lanes per key
  constexpr int KPW = 32 / LPK;  // keys per warp instruction
  constexpr int U = ROWS <= 4 ? 4 : 2;
  constexpr int NW = kDecodeWarps;
  constexpr int ESZ = KV == kF32 ? 4 : (KV == kI8 ? 1 : 2);
  static_assert(DMAX % VEC == 0 && LPK <= 32 && 32 % LPK == 0, "head dim does not fit the lane layout");

  __shared__ float s_acc[NW][ROWS][DMAX];
  __shared__ float s_m[NW][ROWS];
  __shared__ float s_l[NW][ROWS];

  const int split = blockIdx.x, b = blockIdx.z;
  const int kvh = blockIdx.y / p.row_chunks, chunk = blockIdx.y % p.row_chunks;
  const int G = p.Hq / p.Hk;
  const int r0 = chunk * ROWS;
  const int nrows = min(ROWS, G * p.Sq - r0);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int sub = lane / LPK, lig = lane % LPK;
  const int D = p.D;  // multiple of VEC, <= DMAX
  const bool active = lig * VEC < D;  // this lane holds part of the head dim

  // Keys this split walks: its share of those visible to at least one row of this CTA (decode_key_range).
  const int len = p.seq_lens[b];
  int kbeg, kend;
  decode_key_range(p, len, r0, nrows, split, kbeg, kend);
  const bool row_mask = p.Sq > 1;  // with one new token every key of the CTA's range is visible to every row

  // This lane's slice of each query row, pre-scaled (and in the log2 domain without softcap).
  const bool capped = p.softcap > 0.0f;
  const float qmul = capped ? p.scale : p.scale * kLog2e;
  float qr[ROWS][VEC];
  int qpos[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int rr = r0 + r;
    const int t = rr / G, h = kvh * G + rr % G;
    qpos[r] = len - p.Sq + t;
    const int64_t base = b * p.q_s0 + t * p.q_s1 + h * p.q_s2 + lig * VEC;
#pragma unroll
    for (int e = 0; e < VEC; ++e) qr[r][e] = r < nrows && active ? load_f32(p.q, base + e, p.q_dtype) * qmul : 0.0f;
  }

  float m[ROWS], l[ROWS], acc[ROWS][VEC];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[r][e] = 0.0f;
  }

  const char* kc = static_cast<const char*>(p.k_cache);
  const char* vc = static_cast<const char*>(p.v_cache);
  const bool paged = p.block_table != nullptr;
  const int32_t* bt = paged ? p.block_table + b * p.bt_stride : nullptr;
  const float inv_cap = capped ? 1.0f / p.softcap : 0.0f;

  // One step of a warp: U * KPW keys from `base`. `locate` gives this lane's key u's column in the cache and, paged,
  // its block's index in the block table (one division per step, then stepped along by KPW keys, at most
  // ceil(KPW / block_size) wraps); `rows_of` reads the rows; `step_math` is the scores, the online softmax update
  // and the accumulation over a step's K / V values.
  auto locate = [&](int base, unsigned (&tix)[U], int64_t (&col)[U], bool (&ok)[U]) {
    unsigned blk = 0, off = 0;
    if (paged) {
      const unsigned j0 = static_cast<unsigned>(base + sub), bs = static_cast<unsigned>(p.block_size);
      blk = j0 / bs;
      off = j0 - blk * bs;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = base + u * KPW + sub;
      ok[u] = j < kend;
      if (paged) {
        tix[u] = blk;
        col[u] = off;
        if (u + 1 < U) {
          off += KPW;
          if (off >= static_cast<unsigned>(p.block_size)) {  // crossed into the next block (or further, bs < KPW)
            const unsigned wraps = off / static_cast<unsigned>(p.block_size);
            blk += wraps;
            off -= wraps * static_cast<unsigned>(p.block_size);
          }
        }
      } else {
        tix[u] = 0;
        col[u] = j;
      }
    }
  };
  // The cache rows of a step's keys: the sequence (contiguous), or their blocks' block-table entries (paged).
  auto rows_of = [&](const unsigned (&tix)[U], const bool (&ok)[U], int64_t (&row)[U]) {
#pragma unroll
    for (int u = 0; u < U; ++u) row[u] = !paged ? b : (ok[u] ? bt[tix[u]] : 0);
  };
  auto step_math = [&](int base, const Raw (&kr)[U], const Raw (&vr)[U], const float (&ksc)[U],
                       const float (&vsc)[U], const bool (&ok)[U]) {
    // Scores s[u][r] (log2 domain), -inf where key u is not visible to row r.
    float s[U][ROWS];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[VEC];
      V::to_f32(kr[u], kf);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        float d = 0.0f;
#pragma unroll
        for (int e = 0; e < VEC; ++e) d = fmaf(qr[r][e], kf[e], d);
        s[u][r] = d;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        float d = s[u][r];
#pragma unroll
        for (int o = LPK / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
        if (KV == kI8) d *= ksc[u];
        if (capped) d = p.softcap * tanhf(d * inv_cap) * kLog2e;
        const int j = base + u * KPW + sub;
        bool vis = ok[u] && r < nrows;
        if (row_mask) vis = vis && j <= qpos[r] && (p.window_left < 0 || j >= qpos[r] - p.window_left);
        s[u][r] = vis ? d : -INFINITY;
      }
    // Online softmax update, one rescale per step.
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      float mx = s[0][r];
#pragma unroll
      for (int u = 1; u < U; ++u) mx = fmaxf(mx, s[u][r]);
#pragma unroll
      for (int o = LPK; o < 32; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float m_new = fmaxf(m[r], mx);
      if (m_new > m[r]) {  // warp-uniform (m and mx are): rescale only when the running max grows
        const float corr = m[r] == -INFINITY ? 0.0f : exp2f(m[r] - m_new);
        m[r] = m_new;
        l[r] *= corr;
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[r][e] *= corr;
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const float pr = s[u][r] == -INFINITY ? 0.0f : exp2f(s[u][r] - m_new);
        l[r] += pr;
        s[u][r] = KV == kI8 ? pr * vsc[u] : pr;  // weight of v's raw values
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float vf[VEC];
      V::to_f32(vr[u], vf);
#pragma unroll
      for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[r][e] = fmaf(s[u][r], vf[e], acc[r][e]);
    }
  };

  if constexpr (!PIPE) {
    // Each step's loads (K and V of U keys) are issued before its math, into registers.
    for (int base = kbeg + warp * U * KPW; base < kend; base += NW * U * KPW) {
      Raw kr[U], vr[U];
      float ksc[U], vsc[U];
      bool ok[U];
      int64_t row[U], col[U];
      unsigned tix[U];
      locate(base, tix, col, ok);
      rows_of(tix, ok, row);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        ksc[u] = vsc[u] = 1.0f;
        if (ok[u] && active) {
          const int64_t ko = row[u] * p.k_s0 + col[u] * p.k_s1 + kvh * p.k_s2 + lig * VEC;
          const int64_t vo = row[u] * p.v_s0 + col[u] * p.v_s1 + kvh * p.v_s2 + lig * VEC;
          kr[u] = ldg_vec<Raw>(kc + ko * ESZ);
          vr[u] = ldg_vec<Raw>(vc + vo * ESZ);
          if (KV == kI8) {
            ksc[u] = __ldg(p.k_scale + row[u] * p.ks_s0 + col[u] * p.ks_s1 + kvh * p.ks_s2);
            vsc[u] = __ldg(p.v_scale + row[u] * p.vs_s0 + col[u] * p.vs_s1 + kvh * p.vs_s2);
          }
        } else {
          memset(&kr[u], 0, sizeof(Raw));
          memset(&vr[u], 0, sizeof(Raw));
        }
      }
      step_math(base, kr, vr, ksc, vsc, ok);
    }
  } else {
    // Pipelined (16-byte rows only): each lane copies its own K / V chunks of the NEXT step into shared memory
    // with cp.async (no registers held) before the current step's math, so a step's loads overlap the previous
    // step's math instead of waiting in front of it. Lane-private slots: no barrier, a wait_group suffices.
    static_assert(sizeof(Raw) == 16 && KV != kI8, "the pipelined loop copies 16-byte chunks");
    const int tid = threadIdx.x;
    __shared__ Raw s_stage[2][U][2][NW * 32];  // [stage][key u][K, V][thread]: 16 B a slot, lane-private
    // A step's rows (paged: block-table entries) and columns are found one step before its copies are issued, so
    // that the issue does not wait on the block table in front of the current step's math (and locates nothing).
    auto fetch_rows = [&](int base, int64_t (&row)[U], int (&col32)[U]) {
      unsigned tix[U];
      int64_t col[U];
      bool ok[U];
      locate(base, tix, col, ok);
      rows_of(tix, ok, row);
#pragma unroll
      for (int u = 0; u < U; ++u) col32[u] = int(col[u]);  // (a key index or a block offset: < 2^31)
    };
    auto issue = [&](int base, int stage, const int64_t (&row)[U], const int (&col)[U]) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const bool live = base + u * KPW + sub < kend && active;
        const int64_t ko = row[u] * p.k_s0 + col[u] * p.k_s1 + kvh * p.k_s2 + lig * VEC;
        const int64_t vo = row[u] * p.v_s0 + col[u] * p.v_s1 + kvh * p.v_s2 + lig * VEC;
        // (a dead slot copies 0 bytes from the cache's start: zeros, as the register loop's memset)
        cp_async16(smem_u32(&s_stage[stage][u][0][tid]), live ? kc + ko * ESZ : kc, live ? 16 : 0);
        cp_async16(smem_u32(&s_stage[stage][u][1][tid]), live ? vc + vo * ESZ : vc, live ? 16 : 0);
      }
    };
    const int stride = NW * U * KPW;
    int base = kbeg + warp * U * KPW;
    int64_t rows_next[U];  // the rows and columns of step base + stride, found one iteration ahead of its issue
    int cols_next[U];
    if (base < kend) {
      fetch_rows(base, rows_next, cols_next);
      issue(base, 0, rows_next, cols_next);
    }
    cp_async_commit();
    if (base + stride < kend) fetch_rows(base + stride, rows_next, cols_next);
    for (int it = 0; base < kend; base += stride, ++it) {
      const int cur = it & 1;
      if (base + stride < kend) issue(base + stride, cur ^ 1, rows_next, cols_next);
      // (for the next iteration's issue)
      if (base + 2 * stride < kend) fetch_rows(base + 2 * stride, rows_next, cols_next);
      cp_async_commit();  // (possibly empty: the group count stays one per step)
      cp_async_wait<1>();  // this step's group has landed (the next one may still be in flight)
      // A compiler barrier too: the wait's inline asm has no "memory" clobber, so nothing else keeps the shared
      // loads below from being scheduled above it (every lane of the warp runs the same trip count).
      __syncwarp();
      Raw kr[U], vr[U];
      float ones[U];
      bool ok[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        kr[u] = ld_vec<Raw>(&s_stage[cur][u][0][tid]);
        vr[u] = ld_vec<Raw>(&s_stage[cur][u][1][tid]);
        ones[u] = 1.0f;
        ok[u] = base + u * KPW + sub < kend;
      }
      step_math(base, kr, vr, ones, ones, ok);
    }
    cp_async_wait<0>();
  }

  // Merge the warp's KPW key groups (same m across the warp): plain sums.
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
#pragma unroll
    for (int o = LPK; o < 32; o <<= 1) {
      l[r] += __shfl_xor_sync(0xffffffffu, l[r], o);
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[r][e] += __shfl_xor_sync(0xffffffffu, acc[r][e], o);
    }
  }
  if (sub == 0 && active) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int e = 0; e < VEC; ++e) s_acc[warp][r][lig * VEC + e] = acc[r][e];
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      s_m[warp][r] = m[r];
      s_l[warp][r] = l[r];
    }
  }
  __syncthreads();

  // Merge the warps and write: the output (one split) or this split's partial state.
  decode_merge_warps<NW, ROWS>(p, s_m, s_l, &s_acc[0][0][0], DMAX, nrows, r0, kvh, b, split);
}

// One CTA per query row: merge the num_splits partial states exactly (rescaled by 2^(m_s - M)).
__global__ void __launch_bounds__(128) decode_merge_kernel(const DecodeParams p) {
  const int64_t row = blockIdx.x;
  const int ns = p.num_splits, D = p.D;
  const int64_t rows_total = static_cast<int64_t>(p.B) * p.Sq * p.Hq;
  const float* pacc = p.ws + row * ns * D;
  const float* pm = p.ws + rows_total * ns * D + row * ns;
  const float* pl = pm + rows_total * ns;
  float M = -INFINITY;
  for (int s = 0; s < ns; ++s) M = fmaxf(M, pm[s]);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float L = 0.0f, A = 0.0f;
    for (int s = 0; s < ns; ++s) {
      const float f = pm[s] == -INFINITY ? 0.0f : exp2f(pm[s] - M);
      L = fmaf(pl[s], f, L);
      A = fmaf(pacc[static_cast<int64_t>(s) * D + d], f, A);
    }
    store_f32(p.out, row * D + d, p.q_dtype, L > 0.0f ? A / L : 0.0f);
  }
}

// The split kernels' loop that ran (launch_decode_attention's answer): none (no kernel for the input), loads into
// registers, the cp.async-pipelined loop, or the tensor-core kernel (decode_attention_mma.cuh).
enum DecodeLoop { kDecodeNone = 0, kDecodeRegisters = 1, kDecodePipelined = 2, kDecodeMma = 3 };

template <int KV, int DMAX, int ROWS>
inline DecodeLoop launch_decode_split(const DecodeParams& p, cudaStream_t stream) {
  const dim3 grid(p.num_splits, p.Hk * p.row_chunks, p.B);
  // The pipelined loop (p.pipeline) for 16-byte rows and D <= 128 (its 2 x U x 2 x 128 x 16 B of staging next
  // to the merge's s_acc stay within 48 KB of static shared memory).
  if constexpr (KV != kI8 && DMAX <= 128) {
    if (p.pipeline) {
      decode_split_kernel<KV, DMAX, ROWS, true><<<grid, kDecodeWarps * 32, 0, stream>>>(p);
      return kDecodePipelined;
    }
  }
  decode_split_kernel<KV, DMAX, ROWS, false><<<grid, kDecodeWarps * 32, 0, stream>>>(p);
  return kDecodeRegisters;
}

template <int KV, int DMAX>
inline DecodeLoop launch_decode_rows(const DecodeParams& p, cudaStream_t stream) {
  return p.rows_per_cta == 4 ? launch_decode_split<KV, DMAX, 4>(p, stream) : launch_decode_split<KV, DMAX, 8>(p, stream);
}

template <int KV>
inline DecodeLoop launch_decode_dim(const DecodeParams& p, cudaStream_t stream) {
  // Head dims are multiples of 8 (the op's rule); a kernel for DMAX takes any D in (DMAX/2, DMAX] (and
  // the 64 one every D <= 64) with the lanes past D idle. fp32 has 4 elements per lane: D <= 128.
  if (p.D < 8 || p.D % 8) return kDecodeNone;
  if (p.D <= 64) return launch_decode_rows<KV, 64>(p, stream);
  if (p.D <= 128) return launch_decode_rows<KV, 128>(p, stream);
  if (p.D <= 256) {
    if constexpr (KV == kF32) return kDecodeNone;
    else return launch_decode_rows<KV, 256>(p, stream);
  }
  return kDecodeNone;
}

// Picks the instantiation and launches both kernels; kDecodeNone when the head dim / dtype has none.
inline DecodeLoop launch_decode_attention(DecodeParams p, cudaStream_t stream) {
  const int rows = (p.Hq / p.Hk) * p.Sq;
  DecodeLoop loop = kDecodeNone;
  if (p.mma && (p.kv_type == kBF16 || p.kv_type == kF16) && (p.D == 64 || p.D == 128) &&
      (p.D == 64 ? decode_mma_fits<64>() : decode_mma_fits<128>())) {
    // The tensor-core kernel (decode_attention_mma.cuh): 16 query rows per CTA. (Where its shared memory does not
    // fit the device, the split kernel runs instead.)
    p.rows_per_cta = kDecodeMmaRows;
    p.row_chunks = (rows + kDecodeMmaRows - 1) / kDecodeMmaRows;
    if (p.kv_type == kBF16) {
      if (p.D == 64) launch_decode_mma<__nv_bfloat16, 64>(p, stream);
      else launch_decode_mma<__nv_bfloat16, 128>(p, stream);
    } else {
      if (p.D == 64) launch_decode_mma<__half, 64>(p, stream);
      else launch_decode_mma<__half, 128>(p, stream);
    }
    loop = kDecodeMma;
  } else {
    p.rows_per_cta = rows <= 4 ? 4 : 8;
    p.row_chunks = (rows + p.rows_per_cta - 1) / p.rows_per_cta;
    switch (p.kv_type) {
      case kF32: loop = launch_decode_dim<kF32>(p, stream); break;
      case kBF16: loop = launch_decode_dim<kBF16>(p, stream); break;
      case kF16: loop = launch_decode_dim<kF16>(p, stream); break;
      case kI8: loop = launch_decode_dim<kI8>(p, stream); break;
      default: break;
    }
  }
  if (loop != kDecodeNone && p.num_splits > 1)
    decode_merge_kernel<<<static_cast<unsigned>(static_cast<int64_t>(p.B) * p.Sq * p.Hq), 128, 0, stream>>>(p);
  return loop;
}

}  // namespace cuda
}  // namespace llmkern
