// int8_linear W8A8 GEMM on Hopper (sm_90a): y[M, N] = (xq[M, K] . w[N, K]^T) * xs[m] * scale[n] (+ bias[n]),
// int8 x int8 products with int32 accumulation by warpgroup MMA (wgmma m64n256k32 s8.s8.s32), operands
// loaded by TMA. Per-channel weight scales (ngroups = 1); grouped scales run the sm_80 kernel. The
// epilogue is w8a8_mma_kernel's (int8_linear.cuh) per-channel one, operation for operation, so both give
// the same bits. Torch-free; launcher csrc/cuda/int8_linear_sm90.cu.
//
// CTA tile 128 x 256, 384 threads: warpgroup 0 produces (one thread issues the TMA loads of each k tile of
// 128: x [128 rows][128 k] and w [256 rows][128 k], K-major boxes with the 128-byte swizzle, zero-filled
// past M, N and K), warpgroups 1 and 2 consume (rows [64 c, 64 c + 64), all 256 columns: 128 int32
// accumulators per thread). 4-stage ring with full (transaction bytes) and empty (256 arrivals)
// mbarriers. The consumers keep one wgmma group in flight: after committing k tile t they wait until only
// that group is pending, so tile t - 1's stage is free and released.
// 1-D grid of output tiles in the grouped raster of the other GEMMs (8 row tiles per weight panel).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "llmkern/cuda/mma_common.cuh"  // grouped_raster
#include "llmkern/cuda/sm90.cuh"
#include "llmkern/cuda/sm90_layout.cuh"

namespace llmkern {
namespace cuda {
namespace int8_sm90 {

constexpr int kBM = 128, kBN = 256, kBK = 128, kStages = 4, kThreads = 384, kConsumers = 256;
constexpr uint32_t kTileA = kBM * kBK, kTileB = kBN * kBK;  // bytes (int8)
constexpr uint32_t kStage = kTileA + kTileB;
constexpr uint32_t kBars = kStages * kStage;
constexpr uint32_t full_bar(int s) { return kBars + 8 * uint32_t(s); }
constexpr uint32_t empty_bar(int s) { return kBars + 8 * kStages + 8 * uint32_t(s); }
constexpr int kSmemBytes = int(kBars) + 16 * kStages + sm90::kSwAtom;  // + slack to align the base

struct Args {
  const float* xs;     // [M] row scales of the quantized x
  const float* scale;  // [N] channel scales
  const float* bias;   // [N] fp32 or null
  void* out;           // [M, N], row stride ldo, dtype out_dtype (0 fp32, 1 bf16, 2 fp16)
  int64_t ldo;
  int out_dtype;
  int M, N, K;
};

__device__ __forceinline__ void store(void* out, int64_t i, int dt, float v) {
  if (dt == 0) static_cast<float*>(out)[i] = v;
  else if (dt == 1) static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v);
  else static_cast<__half*>(out)[i] = __float2half_rn(v);
}

}  // namespace int8_sm90

// Launch: ceil(M / 128) * ceil(N / 256) blocks of 384 threads, int8_sm90::kSmemBytes of dynamic shared
// memory. tx: 2-D map of xq (K, M) with boxes (128, 128); tw: of w (K, N) with boxes (128, 256).
__global__ void __launch_bounds__(int8_sm90::kThreads, 1)
    w8a8_sm90_kernel(const int8_sm90::Args a, const __grid_constant__ sm90::TmaMap tx,
                     const __grid_constant__ sm90::TmaMap tw) {
#if defined(LLMKERN_SM90A) || defined(LLMKERN_CUDA_EMULATOR)
  using namespace int8_sm90;
  unsigned char* raw = sm90::dyn_smem();
  unsigned char* base = raw + ((sm90::kSwAtom - (sm90::smem_u32(raw) & (sm90::kSwAtom - 1))) & (sm90::kSwAtom - 1));
  const uint32_t sb = sm90::smem_u32(base);
  const int tid = threadIdx.x, wg = tid / 128;
  int tile_m, tile_n;
  grouped_raster(a.M, a.N, kBM, kBN, blockIdx.x, tile_m, tile_n);
  const int m0 = tile_m * kBM, n0 = tile_n * kBN;
  const int kt_n = (a.K + kBK - 1) / kBK;

  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      sm90::mbar_init(sb + full_bar(s), 1);
      sm90::mbar_init(sb + empty_bar(s), kConsumers);
    }
    sm90::mbar_fence_init();
  }
  __syncthreads();

  if (wg == 0) {
    // ------------------------------------------------------------ producer
    sm90::setmaxnreg_dec<40>();
    if (tid != 0) return;
    sm90::tma_prefetch_map(&tx);
    sm90::tma_prefetch_map(&tw);
    for (int kt = 0; kt < kt_n; ++kt) {
      const int s = kt % kStages;
      if (kt >= kStages) sm90::mbar_wait(sb + empty_bar(s), ((kt / kStages) - 1) & 1);
      sm90::mbar_arrive_expect_tx(sb + full_bar(s), kStage);
      sm90::tma_load_2d(sb + s * kStage, &tx, sb + full_bar(s), kt * kBK, m0);
      sm90::tma_load_2d(sb + s * kStage + kTileA, &tw, sb + full_bar(s), kt * kBK, n0);
    }
    return;
  }

  // -------------------------------------------------------------- consumers
  sm90::setmaxnreg_inc<232>();
  const int c = wg - 1, ct = tid - 128 * wg;
  const int warp = ct >> 5, lane = ct & 31;
  int32_t acc[kBN / 2];
#pragma unroll
  for (int i = 0; i < kBN / 2; ++i) acc[i] = 0;
  for (int kt = 0; kt < kt_n; ++kt) {
    const int s = kt % kStages;
    sm90::mbar_wait(sb + full_bar(s), (kt / kStages) & 1);
    sm90::wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kBK / 32; ++ks) {  // k32 step ks of the 128-byte rows: + 32 ks bytes
      const uint32_t pa = sb + s * kStage + 64 * c * sm90::kSwRow + 32 * ks;
      const uint32_t pb = sb + s * kStage + kTileA + 32 * ks;
      sm90::wgmma_ss_s8<kBN>(acc, sm90::desc_k_major(pa), sm90::desc_k_major(pb), 1);
    }
    sm90::wgmma_commit();
    // Tile kt's group may still run; tile kt - 1's has retired: its stage goes back to the producer.
    sm90::wgmma_wait<1>();
    sm90::fence_regs(acc);
    if (kt > 0) sm90::mbar_arrive(sb + empty_bar((kt - 1) % kStages));
  }
  sm90::wgmma_wait<0>();
  sm90::fence_regs(acc);

  // Epilogue (w8a8_mma_kernel's per-channel one): y = float(acc) * (xs * scale[n]) (+ bias[n]). Register i:
  // row 64 c + 16 warp + lane / 4 + 8 ((i / 2) % 2), column 8 (i / 4) + 2 (lane % 4) + i % 2.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int m = m0 + 64 * c + 16 * warp + lane / 4 + 8 * h;
    if (m >= a.M) continue;
    const float xs = a.xs[m];
#pragma unroll
    for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int n = n0 + 8 * j + 2 * (lane % 4) + e;
        if (n >= a.N) continue;
        // Rounded multiply, then rounded add (no contraction into an fma, which nvcc does or not by context):
        // the same bits as w8a8_mma_kernel's epilogue.
        float v = __fmul_rn(float(acc[4 * j + 2 * h + e]), __fmul_rn(xs, a.scale[n]));
        if (a.bias) v = __fadd_rn(v, a.bias[n]);
        store(a.out, int64_t(m) * a.ldo + n, a.out_dtype, v);
      }
  }
#else
  __trap();
#endif
}

}  // namespace cuda
}  // namespace llmkern
