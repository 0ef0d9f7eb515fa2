// Launcher of the CUDA rms_norm (kernel: csrc/include/llmkern/cuda/rms_norm.cuh).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "llmkern/cuda/rms_norm.cuh"
#include "llmkern/cuda_check.cuh"

namespace llmkern {

void rms_norm_cuda(const cuda::RmsNormParams& p, void* stream) {
  auto fail = [](const std::string& m) { throw std::invalid_argument("llmkern._C_cuda.rms_norm: " + m); };
  if (p.M < 0 || p.N < 0) fail("M and N must be >= 0");
  if (p.M > 0x7fffffff) fail("too many rows for the grid");
  for (int dt : {p.x_dtype, p.r_dtype, p.w_dtype})
    if (dt < 0 || dt > 2) fail("dtype codes must be 0..2");
  if (p.M == 0 || p.N == 0) return;
  if (!p.x || !p.weight || !p.y || (p.residual && !p.h)) fail("null pointer");
  LLMKERN_CUDA_CHECK(cuda::launch_rms_norm(p, static_cast<cudaStream_t>(stream)));
  LLMKERN_CUDA_CHECK_LAUNCH();
}

}  // namespace llmkern
