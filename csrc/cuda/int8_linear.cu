// Launchers of the int8_linear CUDA kernels (csrc/include/llmkern/cuda/int8_linear.cuh). Called from
// csrc/cuda/int8_linear_bind.cpp with raw device pointers from torch (llmkern/ops/int8_linear.py).
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "llmkern/cuda/decode_mma.cuh"
#include "llmkern/cuda/int8_linear.cuh"
#include "llmkern/cuda/wdq_gemm.cuh"
#include "llmkern/cuda_check.cuh"

namespace llmkern {

namespace {

namespace k8 = cuda::int8_linear;
using cuda::XType;

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("llmkern._C_cuda.int8_linear: " + what);
}

template <typename T>
void launch_quant(const void* x, int64_t ldx, int M, int K, int8_t* xq, int64_t ldq, float* xs, cudaStream_t st) {
  const bool vec = K % 8 == 0 && aligned16(x) && (ldx * int64_t(sizeof(T))) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(xq) % 8 == 0 && ldq % 8 == 0;
  if (vec) k8::quant_rows_kernel<T, true><<<M, k8::kQuantThreads, 0, st>>>(static_cast<const T*>(x), ldx, K, xq, ldq, xs);
  else k8::quant_rows_kernel<T, false><<<M, k8::kQuantThreads, 0, st>>>(static_cast<const T*>(x), ldx, K, xq, ldq, xs);
}

// Rows per GEMV CTA: the next power of two >= M, at most 8 (larger M runs ceil(M / 8) row blocks).
int gemv_rows(int M) { return M <= 1 ? 1 : M <= 2 ? 2 : M <= 4 ? 4 : 8; }

template <typename T>
void launch_w8a16_gemv(const k8::GemvArgs& a, cudaStream_t st) {
  const int mr = gemv_rows(a.M);
  dim3 grid((a.N + k8::kGemvColsPerCta - 1) / k8::kGemvColsPerCta, (a.M + mr - 1) / mr);
  dim3 block(k8::kGemvWarps * 32);
  switch (mr) {
    case 1: k8::w8a16_gemv_kernel<T, 1><<<grid, block, 0, st>>>(a); break;
    case 2: k8::w8a16_gemv_kernel<T, 2><<<grid, block, 0, st>>>(a); break;
    case 4: k8::w8a16_gemv_kernel<T, 4><<<grid, block, 0, st>>>(a); break;
    default: k8::w8a16_gemv_kernel<T, 8><<<grid, block, 0, st>>>(a); break;
  }
}

template <bool kPerChannel>
void launch_w8a8_gemv(const k8::GemvArgs& a, cudaStream_t st) {
  const int mr = gemv_rows(a.M);
  dim3 grid((a.N + k8::kGemvColsPerCta - 1) / k8::kGemvColsPerCta, (a.M + mr - 1) / mr);
  dim3 block(k8::kGemvWarps * 32);
  switch (mr) {
    case 1: k8::w8a8_gemv_kernel<1, kPerChannel><<<grid, block, 0, st>>>(a); break;
    case 2: k8::w8a8_gemv_kernel<2, kPerChannel><<<grid, block, 0, st>>>(a); break;
    case 4: k8::w8a8_gemv_kernel<4, kPerChannel><<<grid, block, 0, st>>>(a); break;
    default: k8::w8a8_gemv_kernel<8, kPerChannel><<<grid, block, 0, st>>>(a); break;
  }
}

template <int BM, int BN, int WM, int WN>
void launch_mma(const k8::MmaArgs& a, bool per_group, cudaStream_t st) {
  const int64_t tiles = int64_t((a.N + BN - 1) / BN) * ((a.M + BM - 1) / BM);
  require(tiles < (int64_t(1) << 31), "too many output tiles");
  dim3 grid(static_cast<unsigned>(tiles));
  dim3 block(WM * WN * 32);
  if (per_group) k8::w8a8_mma_kernel<BM, BN, WM, WN, true><<<grid, block, 0, st>>>(a);
  else k8::w8a8_mma_kernel<BM, BN, WM, WN, false><<<grid, block, 0, st>>>(a);
}

template <typename T, int kFmt>
void launch_wdq(const cuda::wdq::Args<T>& a, int num_sms, cudaStream_t st) {
  const int64_t tiles128 = int64_t((a.M + 127) / 128) * ((a.N + 127) / 128);
  if (tiles128 >= num_sms) {
    const int64_t tiles = tiles128;
    cuda::wdq::wdq_mma_kernel<T, 128, 128, 2, 4, kFmt><<<static_cast<unsigned>(tiles), 256, 0, st>>>(a);
  } else {
    const int64_t tiles = int64_t((a.M + 63) / 64) * ((a.N + 127) / 128);
    cuda::wdq::wdq_mma_kernel<T, 64, 128, 1, 4, kFmt><<<static_cast<unsigned>(tiles), 128, 0, st>>>(a);
  }
}

template <typename T>
void launch_w8a16_mma(const void* x, int64_t ldx, int M, int K, const int8_t* w, int N, const float* scale,
                      int ngroups, int group, const float* bias, void* out, int64_t ldo, int num_sms,
                      cudaStream_t st) {
  cuda::wdq::Args<T> a{static_cast<const T*>(x), ldx, M, N, K, w, scale, nullptr, ngroups, group, bias,
                       static_cast<T*>(out), ldo};
  if (ngroups == 1) launch_wdq<T, cuda::wdq::kInt8Channel>(a, num_sms, st);
  else launch_wdq<T, cuda::wdq::kInt8Group>(a, num_sms, st);
}

template <typename T>
void launch_w8a16_decode_mma(const void* x, int64_t ldx, int M, int K, const int8_t* w, int N, const float* scale,
                             int ngroups, int group, const float* bias, void* out, int64_t ldo, cudaStream_t st) {
  namespace d = cuda::decode_mma;
  constexpr int kBK = d::block_k(d::kInt8Channel);  // same for both int8 formats
  const int blocks = (K + kBK - 1) / kBK;
  d::Args<T> a{static_cast<const T*>(x), ldx, M, N, K, w, scale, nullptr, ngroups, group, bias, out, ldo, blocks};
  dim3 grid((N + d::kCols - 1) / d::kCols, 1);
  if (ngroups == 1) {
    if (M <= 8) d::decode_mma_kernel<T, 1, d::kInt8Channel><<<grid, d::kWarps * 32, 0, st>>>(a);
    else d::decode_mma_kernel<T, 2, d::kInt8Channel><<<grid, d::kWarps * 32, 0, st>>>(a);
  } else {
    if (M <= 8) d::decode_mma_kernel<T, 1, d::kInt8Group><<<grid, d::kWarps * 32, 0, st>>>(a);
    else d::decode_mma_kernel<T, 2, d::kInt8Group><<<grid, d::kWarps * 32, 0, st>>>(a);
  }
}

}  // namespace

bool w8a8_sm90(const int8_t* xq, int64_t ldq, const float* xs, const int8_t* w, const float* scale, const float* bias,
               void* out, int64_t ldo, int out_dtype, int M, int N, int K, cudaStream_t st);

// Largest M that runs as a GEMV (W8A8: dp4a; W8A16 with 16-bit x) instead of on tensor cores.
constexpr int kInt8GemvMaxM = 16;

// y[M, N] = x[M, K] @ dequant(w)^T (+ bias). w8a8: xq int8 [M, K] (contiguous) and xs fp32 [M] are
// workspaces (written here, then read). W8A16 runs the GEMV for every M (the adapter routes large
// 16-bit M to dequantize + cuBLAS instead). w8a8_wgmma: per-channel W8A8 with M > 16 runs the sm_90a GEMM
// where it can. Returns a short name of the path taken (for tests/logs).
const char* int8_linear_cuda(const void* x, int x_dtype, int64_t ldx, int M, int K, const int8_t* w, int N,
                             const float* scale, int group, const float* bias, void* out, int64_t ldo, bool w8a8,
                             int8_t* xq, float* xs, int num_sms, bool decode_mma, bool w8a8_mma, cudaStream_t st,
                             bool w8a8_wgmma) {
  require(x_dtype >= 0 && x_dtype <= 2, "x_dtype must be 0, 1 or 2");
  require(M >= 0 && N >= 0 && K > 0, "need M >= 0, N >= 0, K > 0");
  require(K % 16 == 0, "K must be a multiple of 16, got " + std::to_string(K));
  require(group >= 16 && group % 16 == 0 && K % group == 0, "group must be a multiple of 16 dividing K");
  if (M == 0 || N == 0) return "empty";
  const int64_t esize = x_dtype == 0 ? 4 : 2;
  require(aligned16(x) && (ldx * esize) % 16 == 0, "x rows must be 16-byte aligned");
  require(aligned16(w), "w must be 16-byte aligned");
  require(ldo >= N, "ldo must be >= N");
  require((M + 7) / 8 <= 65535, "M too large for the GEMV grid");
  const XType dt = static_cast<XType>(x_dtype);
  const int ngroups = K / group;
  if (!w8a8 && dt != XType::kF32 && M > kInt8GemvMaxM) {
    require((int64_t(M + 63) / 64) * ((N + 127) / 128) < (int64_t(1) << 31), "too many output tiles");
    if (dt == XType::kBF16) launch_w8a16_mma<__nv_bfloat16>(x, ldx, M, K, w, N, scale, ngroups, group, bias, out, ldo, num_sms, st);
    else launch_w8a16_mma<__half>(x, ldx, M, K, w, N, scale, ngroups, group, bias, out, ldo, num_sms, st);
    LLMKERN_CUDA_CHECK_LAUNCH();
    return "w8a16_mma";
  }
  if (!w8a8 && dt != XType::kF32 && decode_mma && M >= 2) {  // 2 <= M <= 16
    if (dt == XType::kBF16) launch_w8a16_decode_mma<__nv_bfloat16>(x, ldx, M, K, w, N, scale, ngroups, group, bias, out, ldo, st);
    else launch_w8a16_decode_mma<__half>(x, ldx, M, K, w, N, scale, ngroups, group, bias, out, ldo, st);
    LLMKERN_CUDA_CHECK_LAUNCH();
    return "w8a16_decode_mma";
  }
  if (!w8a8) {
    k8::GemvArgs a{x, ldx, nullptr, M, K, N, w, scale, ngroups, group, bias, out, ldo, dt};
    switch (dt) {
      case XType::kF32: launch_w8a16_gemv<float>(a, st); break;
      case XType::kBF16: launch_w8a16_gemv<__nv_bfloat16>(a, st); break;
      default: launch_w8a16_gemv<__half>(a, st); break;
    }
    LLMKERN_CUDA_CHECK_LAUNCH();
    return "w8a16_gemv";
  }
  require(xq != nullptr && xs != nullptr && aligned16(xq), "w8a8 needs 16-byte aligned xq and xs workspaces");
  require(group <= 131072, "w8a8 group (K when per channel) must be <= 131072 (exact int32 sums)");
  switch (dt) {
    case XType::kF32: launch_quant<float>(x, ldx, M, K, xq, K, xs, st); break;
    case XType::kBF16: launch_quant<__nv_bfloat16>(x, ldx, M, K, xq, K, xs, st); break;
    default: launch_quant<__half>(x, ldx, M, K, xq, K, xs, st); break;
  }
  LLMKERN_CUDA_CHECK_LAUNCH();
  const bool per_channel = ngroups == 1;
  if (M <= kInt8GemvMaxM || (!per_channel && group % 32 != 0) || !w8a8_mma) {
    k8::GemvArgs a{xq, K, xs, M, K, N, w, scale, ngroups, group, bias, out, ldo, dt};
    if (per_channel) launch_w8a8_gemv<true>(a, st);
    else launch_w8a8_gemv<false>(a, st);
    LLMKERN_CUDA_CHECK_LAUNCH();
    return "w8a8_gemv";
  }
  // The sm_90a GEMM (TMA + wgmma; int8_linear_sm90.cu) when asked for, per channel, where it can run.
  if (w8a8_wgmma && per_channel && w8a8_sm90(xq, K, xs, w, scale, bias, out, ldo, int(dt), M, N, K, st))
    return "w8a8_wgmma";
  k8::MmaArgs a{xq, K, xs, w, scale, ngroups, group, bias, out, ldo, dt, M, N, K};
  const int64_t tiles128 = int64_t((M + 127) / 128) * ((N + 127) / 128);
  if (tiles128 >= num_sms) {
    launch_mma<128, 128, 2, 4>(a, !per_channel, st);
    LLMKERN_CUDA_CHECK_LAUNCH();
    return "w8a8_mma_128x128";
  }
  launch_mma<64, 128, 1, 4>(a, !per_channel, st);
  LLMKERN_CUDA_CHECK_LAUNCH();
  return "w8a8_mma_64x128";
}

// The W8A8 activation quantization alone (tests compare it bit for bit with quantize_rows_int8):
// x [M, K] (row stride ldx) -> xq int8 [M, K] (row stride ldq), xs fp32 [M]. Any K, any alignment.
void int8_quantize_rows_cuda(const void* x, int x_dtype, int64_t ldx, int M, int K, int8_t* xq, int64_t ldq,
                             float* xs, cudaStream_t st) {
  require(x_dtype >= 0 && x_dtype <= 2, "x_dtype must be 0, 1 or 2");
  require(M >= 0 && K >= 0 && ldq >= K, "need M >= 0, K >= 0, ldq >= K");
  if (M == 0) return;
  switch (static_cast<XType>(x_dtype)) {
    case XType::kF32: launch_quant<float>(x, ldx, M, K, xq, ldq, xs, st); break;
    case XType::kBF16: launch_quant<__nv_bfloat16>(x, ldx, M, K, xq, ldq, xs, st); break;
    default: launch_quant<__half>(x, ldx, M, K, xq, ldq, xs, st); break;
  }
  LLMKERN_CUDA_CHECK_LAUNCH();
}

// out[N, K] (x's 16-bit dtype) = q * scale, for the large-M W8A16 route.
void int8_linear_dequant_cuda(const int8_t* w, const float* scale, int group, int N, int K, void* out, int dtype,
                              cudaStream_t st) {
  require(dtype == 1 || dtype == 2, "dequant dtype must be 1 (bfloat16) or 2 (float16)");
  require(K > 0 && K % 16 == 0 && group >= 16 && group % 16 == 0 && K % group == 0,
          "dequant needs K % 16 == 0 and a group that is a multiple of 16 dividing K");
  if (N <= 0) return;
  require(aligned16(w), "w must be 16-byte aligned");
  const int64_t chunks = int64_t(N) * (K / 16);
  const int64_t blocks = (chunks + 255) / 256;
  if (dtype == 1)
    k8::dequant_kernel<__nv_bfloat16><<<blocks, 256, 0, st>>>(w, scale, K / group, group, N, K,
                                                             static_cast<__nv_bfloat16*>(out));
  else
    k8::dequant_kernel<__half><<<blocks, 256, 0, st>>>(w, scale, K / group, group, N, K, static_cast<__half*>(out));
  LLMKERN_CUDA_CHECK_LAUNCH();
}

}  // namespace llmkern
