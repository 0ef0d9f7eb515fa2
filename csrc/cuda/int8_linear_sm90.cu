// Launcher of the sm_90a W8A8 GEMM (csrc/include/llmkern/cuda/int8_linear_sm90.cuh): encodes the TMA maps
// of the quantized activations and the weight and launches. Called by int8_linear_cuda (int8_linear.cu)
// for per-channel W8A8 with M > 16 when the caller asks for it; returns false, launching nothing, where it
// cannot run (not a compute-capability-9.0 device, a module built without sm_90a, a layout the driver
// refuses), and int8_linear_cuda then runs the sm_80 mma.sync GEMM.
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "llmkern/cuda/int8_linear_sm90.cuh"
#include "llmkern/cuda/sm90_tma_host.h"
#include "llmkern/cuda_check.cuh"
#include "sm90_launch.h"

namespace llmkern {

// xq int8 [M, K] (row stride ldq bytes), xs fp32 [M], w int8 [N, K] contiguous, scale fp32 [N], bias fp32
// [N] or null, out [M, N] (row stride ldo elements) of out_dtype (0 fp32, 1 bf16, 2 fp16).
bool w8a8_sm90(const int8_t* xq, int64_t ldq, const float* xs, const int8_t* w, const float* scale, const float* bias,
               void* out, int64_t ldo, int out_dtype, int M, int N, int K, cudaStream_t st) {
  namespace k = cuda::int8_sm90;
  if (M < 1 || N < 1 || K < 1 || K % 16 || ldq % 16 || reinterpret_cast<uintptr_t>(xq) % 16 ||
      reinterpret_cast<uintptr_t>(w) % 16)
    return false;
  static std::atomic<uint64_t> checked{0}, ok{0};  // once-per-device verdicts
  if (!sm90_kernel_ready(cuda::w8a8_sm90_kernel, k::kSmemBytes, &checked, &ok)) return false;
  cuda::sm90::TmaMap tx, tw;
  if (!cuda::sm90::encode_tma_2d_i8(&tx, xq, uint64_t(K), uint64_t(M), uint64_t(ldq), k::kBK, k::kBM) ||
      !cuda::sm90::encode_tma_2d_i8(&tw, w, uint64_t(K), uint64_t(N), uint64_t(K), k::kBK, k::kBN))
    return false;
  const int64_t tiles = int64_t((M + k::kBM - 1) / k::kBM) * ((N + k::kBN - 1) / k::kBN);
  if (tiles >= (int64_t(1) << 31)) return false;
  const k::Args a{xs, scale, bias, out, ldo, out_dtype, M, N, K};
  cuda::w8a8_sm90_kernel<<<static_cast<unsigned>(tiles), k::kThreads, k::kSmemBytes, st>>>(a, tx, tw);
  LLMKERN_CUDA_CHECK_LAUNCH();
  return true;
}

}  // namespace llmkern
