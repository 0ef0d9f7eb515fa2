// int8_linear CUDA kernels (torch-free): y[M, N] = x[M, K] @ dequant(w[N, K])^T (+ bias), in x's dtype.
// Semantics: llmkern/ops/int8_linear.py; weights in the canonical layout (llmkern/formats/README.md):
// w int8 [N, K] row-major, scale fp32 [N, ngroups] (ngroups = 1: per channel; group = K / ngroups).
//
// Kernels (launchers: csrc/cuda/int8_linear.cu):
// - quant_rows_kernel      W8A8 activations: one CTA per row, quantize_rows_int8's rule bit for bit.
// - w8a16_gemv_kernel      W8A16, any M (MR rows per CTA row-block), fp32 math: each warp streams COLS
//                          weight rows with 16-byte loads, converts int8 -> fp32 exactly, FMAs against
//                          fp32 activations, scales each 16-wide partial by its group scale, warp-reduces.
// - w8a8_gemv_kernel       W8A8 small M: the same walk on quantized activations with dp4a (exact int32
//                          partials), per channel one int32 sum per output, per group fp32 rescaled sums.
// - w8a8_mma_kernel        W8A8 tensor cores (mma.sync m16n8k32 s8.s8.s32), cp.async 3-stage pipeline,
//                          ldmatrix from XOR-swizzled shared memory, int32 accumulators; per group
//                          (G % 32 == 0) the int32 sums are flushed into fp32 accumulators times the
//                          group's weight scale at every group end. Epilogue * row scale (+ bias).
// - dequant_kernel         w -> x's dtype (q * scale rounded once), for the large-M W8A16 route (the
//                          adapter multiplies with cuBLAS through torch).
// Requirements checked by the launcher: K % 16 == 0, 16-byte aligned rows of x, xq and w.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "llmkern/cuda/linear_common.cuh"
#include "llmkern/cuda/mma_common.cuh"

namespace llmkern {
namespace cuda {
namespace int8_linear {

// ================================================================== activation quantization
constexpr int kQuantThreads = 256;

// q = clamp(rint(x * inv), -127, 127), NaN products -> 0 (the reference's round + clamp + nan_to_num).
__device__ __forceinline__ int quant1(float x, float inv) {
  const float p = __fmul_rn(x, inv);
  const float r = fminf(fmaxf(rintf(p), -127.0f), 127.0f);  // rintf: round half to even
  return isnan(p) ? 0 : static_cast<int>(r);
}

// x [M, K] (row stride ldx elements, unit column stride) -> xq int8 [M, K] (row stride ldq), xs fp32 [M].
// amax = max|x| (NaN if the row has a NaN, as torch.amax), scale = amax / 127 (IEEE division),
// inv = amax > 0 ? 127 / amax : 0, q = clamp(rint(x * inv), -127, 127) with NaN products -> 0: exactly
// llmkern/reference/quant.py's _symmetric_int8 (where + round + clamp + nan_to_num) for every input.
// One CTA per row, two passes (the second mostly from L1/L2). kVec: 8 elements per access (needs
// K % 8 == 0, 16-byte aligned x rows and 8-byte aligned xq rows).
template <typename T, bool kVec>
__global__ void __launch_bounds__(kQuantThreads) quant_rows_kernel(const T* __restrict__ x, int64_t ldx, int K,
                                                                    int8_t* __restrict__ xq, int64_t ldq,
                                                                    float* __restrict__ xs) {
  const int64_t m = blockIdx.x;
  const T* row = x + m * ldx;
  float amax = 0.0f;
  bool nan = false;
  if constexpr (kVec) {
    for (int k = threadIdx.x * 8; k < K; k += kQuantThreads * 8) {
      float v[8];
      load8_f32<T>(row + k, v);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        nan |= isnan(v[e]);
        amax = fmaxf(amax, fabsf(v[e]));
      }
    }
  } else {
    for (int k = threadIdx.x; k < K; k += kQuantThreads) {
      const float v = to_f32<T>(row[k]);
      nan |= isnan(v);
      amax = fmaxf(amax, fabsf(v));
    }
  }
  __shared__ float s_max[kQuantThreads / 32];
  __shared__ int s_nan[kQuantThreads / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const int any_nan = __any_sync(0xffffffffu, nan);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    s_max[warp] = amax;
    s_nan[warp] = any_nan;
  }
  __syncthreads();
  amax = s_max[0];
  int nn = s_nan[0];
#pragma unroll
  for (int i = 1; i < kQuantThreads / 32; ++i) {
    amax = fmaxf(amax, s_max[i]);
    nn |= s_nan[i];
  }
  if (nn) amax = __int_as_float(0x7fc00000);  // torch.amax propagates NaN
  const float inv = amax > 0.0f ? __fdiv_rn(127.0f, amax) : 0.0f;  // NaN > 0 is false
  if (threadIdx.x == 0) xs[m] = __fdiv_rn(amax, 127.0f);
  int8_t* qrow = xq + m * ldq;
  if constexpr (kVec) {
    for (int k = threadIdx.x * 8; k < K; k += kQuantThreads * 8) {
      float v[8];
      load8_f32<T>(row + k, v);
      uint32_t w[2] = {0u, 0u};
#pragma unroll
      for (int e = 0; e < 8; ++e) w[e / 4] |= (static_cast<uint32_t>(quant1(v[e], inv)) & 0xFFu) << (8 * (e % 4));
      *reinterpret_cast<uint2*>(qrow + k) = make_uint2(w[0], w[1]);
    }
  } else {
    for (int k = threadIdx.x; k < K; k += kQuantThreads) qrow[k] = static_cast<int8_t>(quant1(to_f32<T>(row[k]), inv));
  }
}

// ================================================================== GEMV (any M, rows in blocks of MR)
constexpr int kGemvWarps = 4;
constexpr int kGemvCols = 2;  // weight rows per warp
constexpr int kGemvColsPerCta = kGemvWarps * kGemvCols;

struct GemvArgs {
  const void* x;       // W8A16: [M, K] of T, row stride ldx; W8A8: quantized int8 [M, K], row stride ldx
  int64_t ldx;
  const float* xs;     // W8A8 row scales [M]
  int M, K, N;
  const int8_t* w;     // [N, K]
  const float* scale;  // [N, ngroups]
  int ngroups, group;  // group = K / ngroups, a multiple of 16
  const float* bias;   // [N] fp32 or null
  void* out;           // [M, N] in out_dtype, row stride ldo
  int64_t ldo;
  XType out_dtype;
};

// Sixteen int8 of a uint4 -> fp32.
__device__ __forceinline__ void s8x16_to_f32(const uint4& v, float (&f)[16]) {
  s8x4_to_f32(v.x, f[0], f[1], f[2], f[3]);
  s8x4_to_f32(v.y, f[4], f[5], f[6], f[7]);
  s8x4_to_f32(v.z, f[8], f[9], f[10], f[11]);
  s8x4_to_f32(v.w, f[12], f[13], f[14], f[15]);
}

// Writes the MR x kGemvCols warp-reduced results; lane i stores value i.
__device__ __forceinline__ void gemv_store(const GemvArgs& a, int m0, int n0, int lane, int i, float v) {
  const int m = m0 + i / kGemvCols, n = n0 + i % kGemvCols;
  if (lane == i && m < a.M && n < a.N) {
    if (a.bias) v += a.bias[n];
    store_out(a.out, int64_t(m) * a.ldo + n, a.out_dtype, v);
  }
}

// Grid (ceil(N / kGemvColsPerCta), ceil(M / MR)), kGemvWarps * 32 threads.
template <typename T, int MR>
__global__ void __launch_bounds__(kGemvWarps * 32) w8a16_gemv_kernel(GemvArgs a) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int n0 = (blockIdx.x * kGemvWarps + warp) * kGemvCols;
  const int m0 = blockIdx.y * MR;
  if (n0 >= a.N) return;  // whole warp leaves together
  const T* x = static_cast<const T*>(a.x);
  const int8_t* wrow[kGemvCols];
  const float* srow[kGemvCols];
#pragma unroll
  for (int c = 0; c < kGemvCols; ++c) {
    const int n = min(n0 + c, a.N - 1);  // out-of-range columns compute row N-1 and are not stored
    wrow[c] = a.w + int64_t(n) * a.K;
    srow[c] = a.scale + int64_t(n) * a.ngroups;
  }
  const T* xrow[MR];
#pragma unroll
  for (int i = 0; i < MR; ++i) xrow[i] = x + int64_t(min(m0 + i, a.M - 1)) * a.ldx;
  float acc[MR][kGemvCols];
#pragma unroll
  for (int i = 0; i < MR; ++i)
#pragma unroll
    for (int c = 0; c < kGemvCols; ++c) acc[i][c] = 0.0f;
  const int chunks = a.K / 16;
  for (int ch = lane; ch < chunks; ch += 32) {
    const int k = ch * 16;
    const int g = k / a.group;
    uint4 wv[kGemvCols];
#pragma unroll
    for (int c = 0; c < kGemvCols; ++c) wv[c] = __ldg(reinterpret_cast<const uint4*>(wrow[c] + k));
    float s[kGemvCols];
#pragma unroll
    for (int c = 0; c < kGemvCols; ++c) s[c] = __ldg(srow[c] + g);
    float wf[kGemvCols][16];
#pragma unroll
    for (int c = 0; c < kGemvCols; ++c) s8x16_to_f32(wv[c], wf[c]);
#pragma unroll
    for (int i = 0; i < MR; ++i) {
      float xa[8], xb[8];
      load8_f32<T>(xrow[i] + k, xa);
      load8_f32<T>(xrow[i] + k + 8, xb);
#pragma unroll
      for (int c = 0; c < kGemvCols; ++c) {
        float p = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; ++j) p = fmaf(xa[j], wf[c][j], p);
#pragma unroll
        for (int j = 0; j < 8; ++j) p = fmaf(xb[j], wf[c][8 + j], p);
        acc[i][c] = fmaf(p, s[c], acc[i][c]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < MR; ++i)
#pragma unroll
    for (int c = 0; c < kGemvCols; ++c) gemv_store(a, m0, n0, lane, i * kGemvCols + c, warp_sum(acc[i][c]));
}

// W8A8 GEMV on quantized rows (a.x int8 [M, K], row stride ldx, 16-byte aligned rows).
template <int MR, bool kPerChannel>
__global__ void __launch_bounds__(kGemvWarps * 32) w8a8_gemv_kernel(GemvArgs a) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int n0 = (blockIdx.x * kGemvWarps + warp) * kGemvCols;
  const int m0 = blockIdx.y * MR;
  if (n0 >= a.N) return;
  const int8_t* xq = static_cast<const int8_t*>(a.x);
  const int8_t* wrow[kGemvCols];
  const float* srow[kGemvCols];
#pragma unroll
  for (int c = 0; c < kGemvCols; ++c) {
    const int n = min(n0 + c, a.N - 1);
    wrow[c] = a.w + int64_t(n) * a.K;
    srow[c] = a.scale + int64_t(n) * a.ngroups;
  }
  const int8_t* xrow[MR];
#pragma unroll
  for (int i = 0; i < MR; ++i) xrow[i] = xq + int64_t(min(m0 + i, a.M - 1)) * a.ldx;
  // Per channel: exact int32 sums over all of K; per group: fp32 sums of group-scaled int32 partials.
  using Acc = typename std::conditional<kPerChannel, int, float>::type;
  Acc acc[MR][kGemvCols];
#pragma unroll
  for (int i = 0; i < MR; ++i)
#pragma unroll
    for (int c = 0; c < kGemvCols; ++c) acc[i][c] = Acc(0);
  const int chunks = a.K / 16;
  for (int ch = lane; ch < chunks; ch += 32) {
    const int k = ch * 16;
    uint4 wv[kGemvCols];
#pragma unroll
    for (int c = 0; c < kGemvCols; ++c) wv[c] = __ldg(reinterpret_cast<const uint4*>(wrow[c] + k));
    float s[kGemvCols];
    if (!kPerChannel) {
      const int g = k / a.group;
#pragma unroll
      for (int c = 0; c < kGemvCols; ++c) s[c] = __ldg(srow[c] + g);
    }
#pragma unroll
    for (int i = 0; i < MR; ++i) {
      const uint4 xv = __ldg(reinterpret_cast<const uint4*>(xrow[i] + k));
#pragma unroll
      for (int c = 0; c < kGemvCols; ++c) {
        int p = __dp4a(int(xv.x), int(wv[c].x), 0);
        p = __dp4a(int(xv.y), int(wv[c].y), p);
        p = __dp4a(int(xv.z), int(wv[c].z), p);
        p = __dp4a(int(xv.w), int(wv[c].w), p);
        if constexpr (kPerChannel) acc[i][c] += p;
        else acc[i][c] = fmaf(float(p), s[c], acc[i][c]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < MR; ++i) {
#pragma unroll
    for (int c = 0; c < kGemvCols; ++c) {
      float v;
      if constexpr (kPerChannel) v = float(warp_sum_int(acc[i][c]));
      else v = warp_sum(acc[i][c]);
      if (lane == i * kGemvCols + c) {
        const float xs = a.xs[min(m0 + i, a.M - 1)];
        if constexpr (kPerChannel) v *= xs * srow[c][0];
        else v *= xs;
      }
      gemv_store(a, m0, n0, lane, i * kGemvCols + c, v);
    }
  }
}

// ================================================================== W8A8 tensor-core GEMM

struct MmaArgs {
  const int8_t* xq;    // [M, K], row stride ldx (16-byte aligned rows)
  int64_t ldx;
  const float* xs;     // [M]
  const int8_t* w;     // [N, K] contiguous (16-byte aligned rows)
  const float* scale;  // [N, ngroups]
  int ngroups, group;  // per group: group % 32 == 0
  const float* bias;   // [N] fp32 or null
  void* out;           // [M, N], row stride ldo, dtype out_dtype
  int64_t ldo;
  XType out_dtype;
  int M, N, K;
};

// CTA tile BM x BN, warps WARPS_M x WARPS_N, each warp (BM / WARPS_M) x (BN / WARPS_N) = (16 MT) x (8 NT).
// Grid: ceil(M / BM) * ceil(N / BN) CTAs (1-D, grouped raster below).
template <int BM, int BN, int WARPS_M, int WARPS_N, bool kPerGroup>
__global__ void __launch_bounds__(WARPS_M* WARPS_N * 32, 1) w8a8_mma_kernel(MmaArgs a) {
  constexpr int kThreads = WARPS_M * WARPS_N * 32;
  constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  constexpr int MT = WM / 16, NT = WN / 8;
  static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tile");
  static_assert((BM * 4) % kThreads == 0 && (BN * 4) % kThreads == 0, "loader");
  __shared__ __align__(128) int8_t smem[kMmaStages][(BM + BN) * kTileRowBytes];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  // Grouped raster over a 1-D grid (mma_common.cuh): row tiles share a column tile while it is in L2.
  int tile_m, tile_n;
  grouped_raster(a.M, a.N, BM, BN, blockIdx.x, tile_m, tile_n);
  const int m_base = tile_m * BM, n_base = tile_n * BN;
  const int KT = (a.K + kTileRowBytes - 1) / kTileRowBytes;

  // ---- async tile loader: stage s <- k tile kt (zero-filled outside [0, M) x [0, K) / [0, N) x [0, K));
  // each thread's copies of the x and weight tiles set up once (TileCopies).
  TileCopies<int8_t, BM * 4 / kThreads, 4, kThreads> xc;
  TileCopies<int8_t, BN * 4 / kThreads, 4, kThreads> wc;
  const auto sw = [](int r, int c) { return swz(r, c); };
  xc.init(a.xq, a.ldx, a.M, a.K, m_base, 0, tid, sw);
  wc.init(a.w, a.K, a.N, a.K, n_base, 0, tid, sw);
  auto load_tile = [&](int s, int kt) {
    const uint32_t sa = smem_u32(smem[s]);
    xc.issue(sa, kt * kTileRowBytes, a.xq);
    wc.issue(sa + BM * kTileRowBytes, kt * kTileRowBytes, a.w);
  };

  int acc[MT][NT][4];
  float facc[kPerGroup ? MT : 1][kPerGroup ? NT : 1][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;
  if (kPerGroup) {
#pragma unroll
    for (int i = 0; i < (kPerGroup ? MT : 1); ++i)
#pragma unroll
      for (int j = 0; j < (kPerGroup ? NT : 1); ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) facc[i][j][e] = 0.0f;
  }

  // Columns this thread owns in the accumulator fragments: n_base + wn * WN + j * 8 + 2 * (lane % 4) + {0, 1}.
  const int col0 = n_base + wn * WN + 2 * (lane % 4);

#pragma unroll
  for (int s = 0; s < kMmaStages - 1; ++s) {
    if (s < KT) load_tile(s, s);
    cp_async_commit();
  }

  // Unrolled by kMmaStages so that the stage indices are compile-time constants (kt % kMmaStages == u).
  for (int kb = 0; kb < KT; kb += kMmaStages) {
#pragma unroll
    for (int u = 0; u < kMmaStages; ++u) {
      const int kt = kb + u;
      if (kt >= KT) break;  // (uniform across the CTA)
      cp_async_wait<kMmaStages - 2>();
      __syncthreads();  // tile kt visible to all; every warp is done with the stage refilled below
      {
        const int nk = kt + kMmaStages - 1;
        if (nk < KT) load_tile((u + kMmaStages - 1) % kMmaStages, nk);
        cp_async_commit();
      }
      const int8_t* sa = smem[u];
      const int8_t* sb = smem[u] + BM * kTileRowBytes;
#pragma unroll
      for (int ks = 0; ks < kTileRowBytes / 32; ++ks) {
        uint32_t af[MT][4], bf[NT][2];
        load_frags<MT, NT>(sa, sb, wm * WM, wn * WN, ks, lane, af, bf);
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
          for (int j = 0; j < NT; ++j) mma_s8(acc[i][j], af[i], bf[j][0], bf[j][1]);
        if (kPerGroup) {
          const int kend = kt * kTileRowBytes + ks * 32 + 32;  // k just past this step (group % 32 == 0)
          // Steps past K hold zero padding only; K % group == 0, so the last real step ends a group.
          if (kend <= a.K && kend % a.group == 0) {
            const int g = (kend - 1) / a.group;
#pragma unroll
            for (int j = 0; j < NT; ++j) {
              const int n = col0 + j * 8;
              const float s0 = n < a.N ? __ldg(a.scale + int64_t(n) * a.ngroups + g) : 0.0f;
              const float s1 = n + 1 < a.N ? __ldg(a.scale + int64_t(n + 1) * a.ngroups + g) : 0.0f;
#pragma unroll
              for (int i = 0; i < MT; ++i) {
                facc[i][j][0] = fmaf(float(acc[i][j][0]), s0, facc[i][j][0]);
                facc[i][j][1] = fmaf(float(acc[i][j][1]), s1, facc[i][j][1]);
                facc[i][j][2] = fmaf(float(acc[i][j][2]), s0, facc[i][j][2]);
                facc[i][j][3] = fmaf(float(acc[i][j][3]), s1, facc[i][j][3]);
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;
              }
            }
          }
        }
      }
    }
  }
  cp_async_wait<0>();  // nothing real is pending (only empty groups), but leave no copy in flight

  // ---- epilogue: y = acc * (xs * sw) (per channel) or facc * xs (per group), + bias, in out_dtype.
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // fragment rows lane/4 and lane/4 + 8
      const int m = m_base + wm * WM + i * 16 + lane / 4 + h * 8;
      if (m >= a.M) continue;
      const float xs = a.xs[m];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int n = col0 + j * 8 + e;
          if (n >= a.N) continue;
          float v;
          // Rounded multiplies and add, never contracted into an fma (nvcc does that or not by context): the
          // sm_90a kernel's epilogue (int8_linear_sm90.cuh) gives the same bits.
          if (kPerGroup) v = __fmul_rn(facc[kPerGroup ? i : 0][kPerGroup ? j : 0][h * 2 + e], xs);
          else v = __fmul_rn(float(acc[i][j][h * 2 + e]), __fmul_rn(xs, __ldg(a.scale + n)));
          if (a.bias) v = __fadd_rn(v, a.bias[n]);
          store_out(a.out, int64_t(m) * a.ldo + n, a.out_dtype, v);
        }
      }
    }
  }
}

// ================================================================== dequantize (large-M W8A16 route)
// out[n, k] = T(float(q[n, k]) * scale[n, k / group]); 16 elements per thread, K % 16 == 0.
template <typename T>
__global__ void __launch_bounds__(256) dequant_kernel(const int8_t* __restrict__ w, const float* __restrict__ scale,
                                                      int ngroups, int group, int N, int K, T* __restrict__ out) {
  const int64_t chunk = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t per_row = K / 16;
  if (chunk >= int64_t(N) * per_row) return;
  const int64_t n = chunk / per_row;
  const int k = int(chunk % per_row) * 16;
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(w + n * K + k));
  float f[16];
  s8x16_to_f32(v, f);
  const float s = __ldg(scale + n * ngroups + k / group);
  T* o = out + n * K + k;
#pragma unroll
  for (int j = 0; j < 16; ++j) o[j] = from_f32<T>(__fmul_rn(f[j], s));
}

}  // namespace int8_linear
}  // namespace cuda
}  // namespace llmkern
