// Launchers of the int4_linear CUDA kernels (csrc/include/llmkern/cuda/int4_linear.cuh). Called from
// csrc/cuda/int4_linear_bind.cpp with raw device pointers from torch (llmkern/ops/int4_linear.py).
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "llmkern/cuda/decode_mma.cuh"
#include "llmkern/cuda/int4_linear.cuh"
#include "llmkern/cuda/int4_linear_packed.cuh"
#include "llmkern/cuda/int4_linear_packed_gemm.cuh"
#include "llmkern/cuda/wdq_gemm.cuh"
#include "llmkern/cuda/wgmma_int4.cuh"
#include "sm90_launch.h"
#include "llmkern/cuda_check.cuh"

namespace llmkern {

namespace {

namespace k4 = cuda::int4_linear;
using cuda::XType;

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("llmkern._C_cuda.int4_linear: " + what);
}

// Rows per GEMV CTA: the next power of two >= M, at most 8 (larger M runs ceil(M / 8) row blocks).
int gemv_rows(int M) { return M <= 1 ? 1 : M <= 2 ? 2 : M <= 4 ? 4 : 8; }

constexpr int kMaxSplits = 16;

template <typename T>
void launch_gemv(const k4::GemvArgs& a, int splits, cudaStream_t st) {
  const int mr = gemv_rows(a.M);
  dim3 grid((a.N + k4::kColsPerCta - 1) / k4::kColsPerCta, (a.M + mr - 1) / mr, splits);
  dim3 block(k4::kWarps * 32);
  switch (mr) {
    case 1: k4::gemv_kernel<T, 1><<<grid, block, 0, st>>>(a); break;
    case 2: k4::gemv_kernel<T, 2><<<grid, block, 0, st>>>(a); break;
    case 4: k4::gemv_kernel<T, 4><<<grid, block, 0, st>>>(a); break;
    default: k4::gemv_kernel<T, 8><<<grid, block, 0, st>>>(a); break;
  }
}

// Output tiles of the M > 16 GEMMs (mma.sync, wgmma, packed: BM x 128, BM = 128 when those tiles alone fill the
// SMs, else 64) and whether they are the 128-row ones.
int64_t gemm_tiles(int M, int N, int num_sms, bool* bm128 = nullptr) {
  const int64_t tn = (N + 127) / 128, tiles128 = int64_t((M + 127) / 128) * tn;
  if (bm128) *bm128 = tiles128 >= num_sms;
  return tiles128 >= num_sms ? tiles128 : int64_t((M + 63) / 64) * tn;
}

// k per split of the GEMMs' split-K (whole kSplitKUnit units; int4_linear_gemm_splits made `splits` leave none
// empty).
int gemm_k_split(int K, int splits) {
  constexpr int U = cuda::wdq::kSplitKUnit;
  const int units = (K + U - 1) / U;
  return (units + splits - 1) / splits * U;
}

template <typename T>
void launch_mma(const k4::GemvArgs& g, int num_sms, float* ws, int splits, cudaStream_t st) {
  cuda::wdq::Args<T> a{static_cast<const T*>(g.x), g.ldx, g.M, g.N, g.K, g.qw, g.scales, g.offsets,
                       g.ngroups, g.group, g.bias, static_cast<T*>(g.out), g.ldo,
                       splits > 1 ? ws : nullptr, gemm_k_split(g.K, splits)};
  bool bm128 = false;
  const dim3 grid(static_cast<unsigned>(gemm_tiles(a.M, a.N, num_sms, &bm128)), splits);
  if (bm128) cuda::wdq::wdq_mma_kernel<T, 128, 128, 2, 4, cuda::wdq::kInt4><<<grid, 256, 0, st>>>(a);
  else cuda::wdq::wdq_mma_kernel<T, 64, 128, 1, 4, cuda::wdq::kInt4><<<grid, 128, 0, st>>>(a);
}

// The sm_90a warpgroup-MMA GEMM (wgmma_int4.cuh): 128 x 128 tiles (two warpgroups) when they fill the
// GPU, else 64 x 128 (one warpgroup). Dynamic shared memory above 48 KiB needs the opt-in per kernel.
template <typename T, int BM>
void launch_wgmma_bm(const cuda::wdq::Args<T>& a, int splits, cudaStream_t st) {
  namespace w = cuda::wgmma;
  constexpr int kSmem = w::smem_bytes(BM);
  // Once per device (bit `dev` of the mask; a race only sets the attribute twice), so that launches under
  // CUDA graph capture need no attribute call after a warm-up.
  static std::atomic<uint64_t> opted_in{0};
  int dev = 0;
  LLMKERN_CUDA_CHECK(cudaGetDevice(&dev));
  const uint64_t bit = dev < 64 ? uint64_t(1) << dev : 0;
  if (!bit || !(opted_in.load(std::memory_order_relaxed) & bit)) {
    // A module built without sm_90a runs its sm_80 code on an H100/H200, where this kernel is a trap.
    cudaFuncAttributes fa{};
    LLMKERN_CUDA_CHECK(cudaFuncGetAttributes(&fa, w::wgmma_int4_kernel<T, BM>));
    require(fa.binaryVersion == 90, "the wgmma kernel needs llmkern._C_cuda built for sm_90a (LLMKERN_CUDA_ARCHS)");
    LLMKERN_CUDA_CHECK(cudaFuncSetAttribute(w::wgmma_int4_kernel<T, BM>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
    opted_in.fetch_or(bit, std::memory_order_relaxed);
  }
  const int64_t tiles = int64_t((a.M + BM - 1) / BM) * ((a.N + w::kBN - 1) / w::kBN);
  w::wgmma_int4_kernel<T, BM><<<dim3(static_cast<unsigned>(tiles), splits), w::threads(BM), kSmem, st>>>(a);
}

template <typename T>
void launch_wgmma(const k4::GemvArgs& g, int num_sms, float* ws, int splits, cudaStream_t st) {
  cuda::wdq::Args<T> a{static_cast<const T*>(g.x), g.ldx, g.M, g.N, g.K, g.qw, g.scales, g.offsets,
                       g.ngroups, g.group, g.bias, static_cast<T*>(g.out), g.ldo,
                       splits > 1 ? ws : nullptr, gemm_k_split(g.K, splits)};
  bool bm128 = false;
  gemm_tiles(a.M, a.N, num_sms, &bm128);
  if (bm128) launch_wgmma_bm<T, 128>(a, splits, st);
  else launch_wgmma_bm<T, 64>(a, splits, st);
}


template <typename T>
void launch_decode_mma(const k4::GemvArgs& g, int splits, int split_blocks, cudaStream_t st) {
  namespace d = cuda::decode_mma;
  d::Args<T> a{static_cast<const T*>(g.x), g.ldx, g.M, g.N, g.K, g.qw, g.scales, g.offsets, g.ngroups, g.group,
               g.bias, g.out, g.ldo, split_blocks};
  dim3 grid((g.N + d::kCols - 1) / d::kCols, splits);
  if (g.M <= 8) d::decode_mma_kernel<T, 1, d::kInt4><<<grid, d::kWarps * 32, 0, st>>>(a);
  else d::decode_mma_kernel<T, 2, d::kInt4><<<grid, d::kWarps * 32, 0, st>>>(a);
}

template <typename T, bool kS16, int kCPG>
void launch_packed_g(const cuda::int4_packed::Args<T>& a, int splits, cudaStream_t st) {
  namespace p = cuda::int4_packed;
  dim3 grid((a.N + p::kCols - 1) / p::kCols, splits);
  if (a.M <= 8) p::packed_kernel<T, 1, kS16, kCPG><<<grid, p::kWarps * 32, 0, st>>>(a);
  else p::packed_kernel<T, 2, kS16, kCPG><<<grid, p::kWarps * 32, 0, st>>>(a);
}

template <typename T, bool kS16>
void launch_packed(const cuda::int4_packed::Args<T>& a, int group, int splits, cudaStream_t st) {
  if (group == 32) launch_packed_g<T, kS16, 1>(a, splits, st);
  else if (group == 64) launch_packed_g<T, kS16, 2>(a, splits, st);
  else launch_packed_g<T, kS16, 4>(a, splits, st);
}

// The packed GEMM (M > 16): 128-row tiles (8 warps) when they fill the GPU, else 64-row tiles (4 warps); `splits`
// CTAs along K per tile (a.ws set when > 1).
template <typename T, bool kS16>
void launch_packed_gemm(const cuda::int4_packed::GemmArgs<T>& a, int num_sms, int splits, cudaStream_t st) {
  namespace p = cuda::int4_packed;
  static_assert(p::kGemmBN == 128, "gemm_tiles assumes 128 weight rows per tile");
  bool bm128 = false;
  const dim3 grid(static_cast<unsigned>(gemm_tiles(a.M, a.N, num_sms, &bm128)), splits);
  if (bm128) p::packed_gemm_kernel<T, 128, kS16><<<grid, p::gemm_threads(128), 0, st>>>(a);
  else p::packed_gemm_kernel<T, 64, kS16><<<grid, p::gemm_threads(64), 0, st>>>(a);
}

}  // namespace

// Largest M that runs as a GEMV for 16-bit x (fp32 x always does); larger M run on tensor cores.
constexpr int kInt4GemvMaxM = 16;

// splits leaves no split of the M > 16 GEMMs empty (gemm_k_split's ranges).
static bool gemm_splits_valid(int K, int splits) {
  constexpr int U = cuda::wdq::kSplitKUnit;
  const int units = (K + U - 1) / U, per = gemm_k_split(K, splits) / U;
  return splits >= 1 && (units + per - 1) / per == splits;
}

// out = bias + the sum of the splits' fp32 partials ws[splits, M, N], in split order.
static void reduce_splits(const float* ws, int splits, int M, int N, const float* bias, void* out, int64_t ldo, XType dt,
                   cudaStream_t st) {
  const int64_t MN = int64_t(M) * N;
  k4::reduce_kernel<<<(MN + 255) / 256, 256, 0, st>>>(ws, splits, M, N, bias, out, ldo, dt);
  LLMKERN_CUDA_CHECK_LAUNCH();
}

// Route of an input: 0 SIMT GEMV, 1 decode-sized tensor-core kernel (16-bit x, 2 <= M <= 16, when
// allowed), 2 dequantizing tensor-core GEMM (16-bit x, M > 16).
static int int4_route(int M, int x_dtype, bool decode_mma) {
  if (x_dtype == 0) return 0;
  if (M > kInt4GemvMaxM) return 2;
  return decode_mma && M >= 2 ? 1 : 0;
}

// Split-K factor of both swap-AB decode kernels: `ctas` CTAs of `warps` warps over `blocks` k blocks each;
// split K until there are about per_sm CTAs per SM, keeping at least two blocks per warp in a split and no
// split empty.
static int swapab_splits(int64_t ctas, int blocks, int warps, int per_sm, int num_sms) {
  const int64_t want = per_sm * int64_t(std::max(num_sms, 1));
  if (ctas >= want) return 1;
  int splits = int(std::min<int64_t>(kMaxSplits, (want + ctas - 1) / ctas));
  splits = std::max(1, std::min(splits, blocks / (2 * warps)));
  const int per = (blocks + splits - 1) / splits;
  return (blocks + per - 1) / per;
}

// Splits of the decode tensor-core kernel: up to ~3 CTAs per SM, every warp at least two 128-k blocks.
static int decode_mma_splits(int N, int K, int num_sms) {
  namespace d = cuda::decode_mma;
  constexpr int kBK = d::block_k(d::kInt4);
  return swapab_splits((N + d::kCols - 1) / d::kCols, (K + kBK - 1) / kBK, d::kWarps, 3, num_sms);
}

// Split-K factor of the M > 16 GEMMs (mma.sync, wgmma, packed; the same tiles): 1 when their output tiles
// alone give every SM one; otherwise enough splits for ~2 CTAs per SM (M = 64 on Llama-3-8B's 4096 x 14336
// layer: 32 tiles on an H200's 132 SMs, 9 splits), each split at least kGemmMinSplitK k in whole
// kSplitKUnit units, at most kMaxSplits, none empty.
// (256 k: 8 mma.sync tiles, 4 wgmma stages; SmolLM2's K = 576 layers at prefill split in two, their 40 tiles
// being a third of an H200's SMs)
constexpr int kGemmMinSplitK = 256;
int int4_linear_gemm_splits(int M, int N, int K, int num_sms) {
  if (M <= 0 || N <= 0 || K <= 0) return 1;
  const int64_t tiles = gemm_tiles(M, N, std::max(num_sms, 1));
  if (tiles >= num_sms) return 1;
  constexpr int U = cuda::wdq::kSplitKUnit;
  const int units = (K + U - 1) / U;
  const int64_t want = 2 * int64_t(std::max(num_sms, 1));
  int splits = int(std::min<int64_t>(kMaxSplits, (want + tiles - 1) / tiles));
  splits = std::max(1, std::min(splits, units / (kGemmMinSplitK / U)));
  const int per = (units + splits - 1) / splits;
  return (units + per - 1) / per;
}

// Split-K factor for these sizes. GEMV: 1 when the (N, M) grid alone has >= 2 CTAs per SM; otherwise enough
// splits for ~2 CTAs per SM, each split at least 32 chunks (one per lane) of 32 k, at most kMaxSplits. The
// decode tensor-core kernel: decode_mma_splits; the M > 16 GEMMs: int4_linear_gemm_splits. The adapter sizes
// the fp32 workspace [splits, M, N] from this.
int int4_linear_splits(int M, int N, int K, int num_sms, int x_dtype, bool decode_mma) {
  if (M <= 0 || N <= 0 || K <= 0) return 1;
  const int route = int4_route(M, x_dtype, decode_mma);
  if (route == 2) return int4_linear_gemm_splits(M, N, K, num_sms);
  if (route == 1) return decode_mma_splits(N, K, num_sms);
  if (M > kInt4GemvMaxM) return 1;
  const int mr = gemv_rows(M);
  const int64_t ctas = int64_t((N + k4::kColsPerCta - 1) / k4::kColsPerCta) * ((M + mr - 1) / mr);
  const int64_t want = 2 * int64_t(std::max(num_sms, 1));
  if (ctas >= want) return 1;
  const int chunks = K / k4::kChunkK;
  int splits = int(std::min<int64_t>(kMaxSplits, (want + ctas - 1) / ctas));
  splits = std::max(1, std::min(splits, chunks / 32));
  const int per = (chunks + splits - 1) / splits;
  return (chunks + per - 1) / per;  // no empty split
}

// y[M, N] = x[M, K] @ dequant(qweight)^T (+ bias). GEMV for fp32 x and M <= 16, the decode tensor-core kernel,
// the dequantizing tensor-core GEMM for 16-bit x with M > 16; splits (int4_linear_splits) > 1 needs ws: fp32
// [splits, M, N].
const char* int4_linear_cuda(const void* x, int x_dtype, int64_t ldx, int M, int K, const uint8_t* qw, int N,
                             const float* scales, const float* offsets, int group, const float* bias, void* out,
                             int64_t ldo, float* ws, int splits, int num_sms, bool decode_mma, cudaStream_t st,
                             bool wgmma) {
  // wgmma (llmkern/ops/int4_linear.py, CUDA_INT4_WGMMA): the M > 16 tensor-core route runs the sm_90a
  // warpgroup-MMA kernel instead of the mma.sync one.
  require(x_dtype >= 0 && x_dtype <= 2, "x_dtype must be 0, 1 or 2");
  require(M >= 0 && N >= 0 && K > 0, "need M >= 0, N >= 0, K > 0");
  require((group == 32 || group == 64 || group == 128) && K % group == 0, "group must be 32, 64 or 128 and divide K");
  require(splits >= 1 && splits <= kMaxSplits, "splits must be in [1, 16]");
  if (M == 0 || N == 0) return "empty";
  const int64_t esize = x_dtype == 0 ? 4 : 2;
  require(aligned16(x) && (ldx * esize) % 16 == 0, "x rows must be 16-byte aligned");
  require(aligned16(qw), "qweight must be 16-byte aligned");
  require(ldo >= N, "ldo must be >= N");
  require((M + 7) / 8 <= 65535, "M too large for the GEMV grid");
  require(splits == 1 || ws != nullptr, "splits > 1 needs the fp32 workspace");
  const XType dt = static_cast<XType>(x_dtype);
  const int route = int4_route(M, x_dtype, decode_mma);
  if (route == 1) {
    constexpr int kBK = cuda::decode_mma::block_k(cuda::decode_mma::kInt4);
    const int blocks = (K + kBK - 1) / kBK;
    const int per_b = (blocks + splits - 1) / splits;
    require((blocks + per_b - 1) / per_b == splits, "splits leaves an empty split; use int4_linear_splits");
    k4::GemvArgs g{x, ldx, M, K, N, qw, scales, offsets, K / group, group, bias,
                   splits > 1 ? static_cast<void*>(ws) : out, ldo, dt, 0};
    if (dt == XType::kBF16) launch_decode_mma<__nv_bfloat16>(g, splits, per_b, st);
    else launch_decode_mma<__half>(g, splits, per_b, st);
    LLMKERN_CUDA_CHECK_LAUNCH();
    if (splits == 1) return "decode_mma";
    const int64_t MN = int64_t(M) * N;
    k4::reduce_kernel<<<(MN + 255) / 256, 256, 0, st>>>(ws, splits, M, N, bias, out, ldo, dt);
    LLMKERN_CUDA_CHECK_LAUNCH();
    return "decode_mma_splitk";
  }
  if (route == 2) {
    require((int64_t(M + 63) / 64) * ((N + 127) / 128) < (int64_t(1) << 31), "too many output tiles");
    require(gemm_splits_valid(K, splits), "splits leaves an empty split; use int4_linear_splits");
    k4::GemvArgs g{x, ldx, M, K, N, qw, scales, offsets, K / group, group, bias, out, ldo, dt, 0};
    if (wgmma) {
      require(device_is_sm90(), "the wgmma kernel needs a compute capability 9.0 (sm_90a) device");
      if (dt == XType::kBF16) launch_wgmma<__nv_bfloat16>(g, num_sms, ws, splits, st);
      else launch_wgmma<__half>(g, num_sms, ws, splits, st);
    } else {
      if (dt == XType::kBF16) launch_mma<__nv_bfloat16>(g, num_sms, ws, splits, st);
      else launch_mma<__half>(g, num_sms, ws, splits, st);
    }
    LLMKERN_CUDA_CHECK_LAUNCH();
    if (splits == 1) return wgmma ? "wgmma" : "mma";
    reduce_splits(ws, splits, M, N, bias, out, ldo, dt, st);
    return wgmma ? "wgmma_splitk" : "mma_splitk";
  }
  const int chunks = K / k4::kChunkK;
  const int per = (chunks + splits - 1) / splits;
  require((chunks + per - 1) / per == splits, "splits leaves an empty split; use int4_linear_splits");
  k4::GemvArgs a{x, ldx, M, K, N, qw, scales, offsets, K / group, group, bias,
                 splits > 1 ? static_cast<void*>(ws) : out, ldo, dt, per};
  switch (dt) {
    case XType::kF32: launch_gemv<float>(a, splits, st); break;
    case XType::kBF16: launch_gemv<__nv_bfloat16>(a, splits, st); break;
    default: launch_gemv<__half>(a, splits, st); break;
  }
  LLMKERN_CUDA_CHECK_LAUNCH();
  if (splits == 1) return "gemv";
  const int64_t MN = int64_t(M) * N;
  k4::reduce_kernel<<<(MN + 255) / 256, 256, 0, st>>>(ws, splits, M, N, bias, out, ldo, dt);
  LLMKERN_CUDA_CHECK_LAUNCH();
  return "gemv_splitk";
}

// out[N, K] (x's 16-bit dtype) = q * scale + offset, for the large-M route.
void int4_linear_dequant_cuda(const uint8_t* qw, const float* scales, const float* offsets, int group, int N, int K,
                              void* out, int dtype, cudaStream_t st) {
  require(dtype == 1 || dtype == 2, "dequant dtype must be 1 (bfloat16) or 2 (float16)");
  require(K > 0 && (group == 32 || group == 64 || group == 128) && K % group == 0,
          "dequant needs a group of 32, 64 or 128 dividing K");
  if (N <= 0) return;
  require(aligned16(qw), "qweight must be 16-byte aligned");
  const int64_t chunks = int64_t(N) * (K / k4::kChunkK);
  const int64_t blocks = (chunks + 255) / 256;
  if (dtype == 1)
    k4::dequant_kernel<__nv_bfloat16><<<blocks, 256, 0, st>>>(qw, scales, offsets, K / group, group, N, K,
                                                             static_cast<__nv_bfloat16*>(out));
  else
    k4::dequant_kernel<__half><<<blocks, 256, 0, st>>>(qw, scales, offsets, K / group, group, N, K,
                                                      static_cast<__half*>(out));
  LLMKERN_CUDA_CHECK_LAUNCH();
}

// ------------------------------------------------------------------ prepacked weights (int4_linear_packed.cuh)

// Splits of the packed decode kernel: up to ~4 CTAs per SM (each is small: kWarps warps), every warp at
// least two 128-k blocks per split, at most kMaxSplits.
int int4_linear_packed_splits(int N, int K, int num_sms) {
  namespace p = cuda::int4_packed;
  if (N <= 0 || K <= 0) return 1;
  const int blocks = (K / p::kChunkK + p::kBlockChunks - 1) / p::kBlockChunks;
  return swapab_splits((N + p::kCols - 1) / p::kCols, blocks, p::kWarps, 4, num_sms);
}

// Bytes of the packed weight and scale buffers (the adapter allocates them).
void int4_linear_packed_bytes(int N, int K, int group, bool scale16, int64_t* weight_bytes, int64_t* scale_bytes) {
  require(N >= 0 && K > 0 && (group == 32 || group == 64 || group == 128) && K % group == 0,
          "packed sizes need N >= 0 and a group of 32, 64 or 128 dividing K");
  *weight_bytes = cuda::int4_packed::packed_weight_bytes(N, K);
  *scale_bytes = cuda::int4_packed::packed_scale_bytes(N, K, group, scale16);
}

// qp / sp (int4_linear_packed.cuh's layouts; sizes int4_linear_packed_bytes) from the canonical weight.
// scale16: every scale and offset is an fp16 value (the caller checks) and is stored as one.
void int4_linear_pack_cuda(const uint8_t* qw, const float* scales, const float* offsets, int group, int N, int K,
                           void* qp, void* sp, bool scale16, cudaStream_t st) {
  namespace p = cuda::int4_packed;
  require(K > 0 && (group == 32 || group == 64 || group == 128) && K % group == 0,
          "pack needs a group of 32, 64 or 128 dividing K");
  if (N <= 0) return;
  require(aligned16(qp) && aligned16(sp), "packed buffers must be 16-byte aligned");
  const int64_t tiles = (N + p::kCols - 1) / p::kCols;
  const int64_t nw = tiles * (K / p::kChunkK) * 32, ns = tiles * (K / group) * 8;
  p::pack_weights_kernel<<<(nw + 255) / 256, 256, 0, st>>>(qw, N, K, static_cast<uint2*>(qp));
  LLMKERN_CUDA_CHECK_LAUNCH();
  p::pack_scales_kernel<<<(ns + 255) / 256, 256, 0, st>>>(scales, offsets, N, K / group, scale16, sp);
  LLMKERN_CUDA_CHECK_LAUNCH();
}

// out[N, K] (x's 16-bit dtype) = q * scale + offset from the packed weight (the large-M route of a packed module).
void int4_linear_packed_dequant_cuda(const void* qp, const void* sp, bool scale16, int group, int N, int K, void* out,
                                     int dtype, cudaStream_t st) {
  namespace p = cuda::int4_packed;
  require(dtype == 1 || dtype == 2, "dequant dtype must be 1 (bfloat16) or 2 (float16)");
  require(K > 0 && (group == 32 || group == 64 || group == 128) && K % group == 0,
          "dequant needs a group of 32, 64 or 128 dividing K");
  if (N <= 0) return;
  require(aligned16(qp) && aligned16(sp) && aligned16(out), "packed buffers and out must be 16-byte aligned");
  const int64_t threads = int64_t((N + p::kCols - 1) / p::kCols) * (K / p::kChunkK) * 32;
  const int64_t blocks = (threads + 255) / 256;
  if (dtype == 1)
    p::dequant_packed_kernel<__nv_bfloat16><<<blocks, 256, 0, st>>>(static_cast<const uint2*>(qp), sp, scale16, N, K,
                                                                     K / group, group, static_cast<__nv_bfloat16*>(out));
  else
    p::dequant_packed_kernel<__half><<<blocks, 256, 0, st>>>(static_cast<const uint2*>(qp), sp, scale16, N, K,
                                                              K / group, group, static_cast<__half*>(out));
  LLMKERN_CUDA_CHECK_LAUNCH();
}

// y[M, N] = x[M, K] @ dequant(w)^T (+ bias) for 16-bit x from the packed weight: the decode kernel for
// 1 <= M <= 16 (splits: int4_linear_packed_splits), the GEMM for M > 16 (splits: int4_linear_gemm_splits); splits
// > 1 needs ws: fp32 [splits, M, N].
const char* int4_linear_packed_cuda(const void* x, int x_dtype, int64_t ldx, int M, int K, const void* qp,
                                    const void* sp, bool scale16, int N, int group, const float* bias, void* out,
                                    int64_t ldo, float* ws, int splits, int num_sms, cudaStream_t st) {
  namespace p = cuda::int4_packed;
  require(x_dtype == 1 || x_dtype == 2, "the packed kernels take x_dtype 1 (bfloat16) or 2 (float16)");
  require(M >= 0 && N >= 0 && K > 0 && (group == 32 || group == 64 || group == 128) && K % group == 0,
          "need M >= 0, N >= 0 and a group of 32, 64 or 128 dividing K");
  require(splits >= 1 && splits <= kMaxSplits, "splits must be in [1, 16]");
  if (M == 0 || N == 0) return "empty";
  require(aligned16(x) && (ldx * 2) % 16 == 0, "x rows must be 16-byte aligned");
  require(aligned16(qp) && aligned16(sp), "packed buffers must be 16-byte aligned");
  require(ldo >= N, "ldo must be >= N");
  const int gshift = group == 32 ? 0 : group == 64 ? 1 : 2;
  require(splits == 1 || ws != nullptr, "splits > 1 needs the fp32 workspace");
  if (M > kInt4GemvMaxM) {
    require(int64_t((M + 63) / 64) * ((N + p::kGemmBN - 1) / p::kGemmBN) < (int64_t(1) << 31), "too many output tiles");
    require(gemm_splits_valid(K, splits), "splits leaves an empty split; use int4_linear_gemm_splits");
    float* gws = splits > 1 ? ws : nullptr;
    const int ksplit = gemm_k_split(K, splits);
    if (x_dtype == 1) {
      p::GemmArgs<__nv_bfloat16> a{static_cast<const __nv_bfloat16*>(x), ldx, M, N, K, static_cast<const uint2*>(qp),
                                   sp, K / group, gshift, bias, static_cast<__nv_bfloat16*>(out), ldo, gws, ksplit};
      if (scale16) launch_packed_gemm<__nv_bfloat16, true>(a, num_sms, splits, st);
      else launch_packed_gemm<__nv_bfloat16, false>(a, num_sms, splits, st);
    } else {
      p::GemmArgs<__half> a{static_cast<const __half*>(x), ldx, M, N, K, static_cast<const uint2*>(qp), sp,
                            K / group, gshift, bias, static_cast<__half*>(out), ldo, gws, ksplit};
      if (scale16) launch_packed_gemm<__half, true>(a, num_sms, splits, st);
      else launch_packed_gemm<__half, false>(a, num_sms, splits, st);
    }
    LLMKERN_CUDA_CHECK_LAUNCH();
    if (splits == 1) return "packed_gemm";
    reduce_splits(ws, splits, M, N, bias, out, ldo, static_cast<XType>(x_dtype), st);
    return "packed_gemm_splitk";
  }
  const int blocks = (K / p::kChunkK + p::kBlockChunks - 1) / p::kBlockChunks;
  const int per = (blocks + splits - 1) / splits;
  require((blocks + per - 1) / per == splits, "splits leaves an empty split; use int4_linear_packed_splits");
  void* dst = splits > 1 ? static_cast<void*>(ws) : out;
  if (x_dtype == 1) {
    p::Args<__nv_bfloat16> a{static_cast<const __nv_bfloat16*>(x), ldx, M, N, K, static_cast<const uint2*>(qp), sp,
                             K / group, bias, dst, ldo, per};
    if (scale16) launch_packed<__nv_bfloat16, true>(a, group, splits, st);
    else launch_packed<__nv_bfloat16, false>(a, group, splits, st);
  } else {
    p::Args<__half> a{static_cast<const __half*>(x), ldx, M, N, K, static_cast<const uint2*>(qp), sp,
                      K / group, bias, dst, ldo, per};
    if (scale16) launch_packed<__half, true>(a, group, splits, st);
    else launch_packed<__half, false>(a, group, splits, st);
  }
  LLMKERN_CUDA_CHECK_LAUNCH();
  if (splits == 1) return "packed";
  const int64_t MN = int64_t(M) * N;
  k4::reduce_kernel<<<(MN + 255) / 256, 256, 0, st>>>(ws, splits, M, N, bias, out, ldo, static_cast<XType>(x_dtype));
  LLMKERN_CUDA_CHECK_LAUNCH();
  return "packed_splitk";
}

}  // namespace llmkern
