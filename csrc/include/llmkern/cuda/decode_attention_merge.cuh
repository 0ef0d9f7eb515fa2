// Pieces both decode_attention kernels share (decode_split_kernel in decode_attention.cuh, decode_mma_kernel in
// decode_attention_mma.cuh), torch-free: the keys a CTA walks (decode_key_range), and its last step
// (decode_merge_warps): a CTA's warps each hold a partial softmax state per query row (running max m in log2 units,
// sum l, unnormalized accumulator acc[D]); merge them exactly (rescaled by 2^(m_w - M)) and write the normalized
// output (one split) or this split's partial state (acc, M, L) for decode_merge_kernel.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "llmkern/cuda/kv_rotary_common.cuh"  // store_f32
#include "llmkern/cuda/params.h"

namespace llmkern {
namespace cuda {

// Keys [kbeg, kend) of sequence b that split `split` of a CTA walks: of the keys visible to at least one of its
// query rows r0 .. r0 + nrows - 1 ([lo, hi): row rr is token t = rr / G at position len - Sq + t and sees j <=
// position and, with a window, j >= position - window_left), the split's equal share. len: seq_lens[b].
__device__ __forceinline__ void decode_key_range(const DecodeParams& p, int len, int r0, int nrows, int split,
                                                 int& kbeg, int& kend) {
  const int G = p.Hq / p.Hk, ns = p.num_splits;
  const int t_first = r0 / G, t_last = (r0 + nrows - 1) / G;
  const int hi = len > 0 ? len - p.Sq + t_last + 1 : 0;
  const int lo = p.window_left >= 0 ? max(0, len - p.Sq + t_first - p.window_left) : 0;
  const int n = max(0, hi - lo);
  const int per = (n + ns - 1) / ns;
  kbeg = lo + split * per;
  kend = min(hi, kbeg + per);
}

// s_m / s_l: [NW][ROWS] per warp and row; s_acc: warp w's row r at s_acc + (w * ROWS + r) * stride (stride >= D).
// Rows r < nrows of the CTA's chunk are rows r0 + r of KV head kvh's G x Sq query rows (token rr / G, head
// kvh G + rr % G). Called by all NW * 32 threads after a barrier that made the states visible.
template <int NW, int ROWS>
__device__ __forceinline__ void decode_merge_warps(const DecodeParams& p, const float (&s_m)[NW][ROWS],
                                                   const float (&s_l)[NW][ROWS], const float* s_acc, int stride,
                                                   int nrows, int r0, int kvh, int b, int split) {
  const int D = p.D, G = p.Hq / p.Hk, ns = p.num_splits;
  for (int idx = threadIdx.x; idx < nrows * D; idx += NW * 32) {
    const int r = idx / D, d = idx % D;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < NW; ++w) M = fmaxf(M, s_m[w][r]);
    float L = 0.0f, A = 0.0f;
#pragma unroll
    for (int w = 0; w < NW; ++w) {
      const float f = s_m[w][r] == -INFINITY ? 0.0f : exp2f(s_m[w][r] - M);
      L = fmaf(s_l[w][r], f, L);
      A = fmaf(s_acc[(w * ROWS + r) * stride + d], f, A);
    }
    const int rr = r0 + r;
    const int t = rr / G, h = kvh * G + rr % G;
    const int64_t grow = (static_cast<int64_t>(b) * p.Sq + t) * p.Hq + h;  // row of out [B, Sq, Hq, D]
    if (ns == 1) {
      store_f32(p.out, grow * D + d, p.q_dtype, L > 0.0f ? A / L : 0.0f);
    } else {
      const int64_t prow = grow * ns + split;
      p.ws[prow * D + d] = A;
      if (d == 0) {
        const int64_t rows_total = static_cast<int64_t>(p.B) * p.Sq * p.Hq;
        float* pm = p.ws + rows_total * ns * D;
        pm[prow] = M;
        pm[rows_total * ns + prow] = L;
      }
    }
  }
}

}  // namespace cuda
}  // namespace llmkern
