// Launcher of the CUDA rotary_embedding (kernel: csrc/include/llmkern/cuda/rotary_embedding.cuh).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "llmkern/cuda/rotary_embedding.cuh"
#include "llmkern/cuda_check.cuh"

namespace llmkern {

void rotary_embedding_cuda(const cuda::RotaryParams& p, void* stream) {
  auto fail = [](const std::string& m) { throw std::invalid_argument("llmkern._C_cuda.rotary_embedding: " + m); };
  if (p.T < 0 || p.Hq < 0 || p.Hk < 0 || p.D < 1) fail("need T, Hq, Hk >= 0 and D >= 1");
  if (p.R < 2 || p.R % 2 || p.R > p.D) fail("rotary dim R must be even and in [2, D]");
  if (p.q_dtype < 0 || p.q_dtype > 2 || p.k_dtype < 0 || p.k_dtype > 2) fail("dtype codes must be 0..2");
  if (p.T * (p.Hq + p.Hk) == 0) return;
  if (!p.cos_sin || !p.positions || (p.Hq && (!p.q || !p.q_out)) || (p.Hk && (!p.k || !p.k_out))) fail("null pointer");
  LLMKERN_CUDA_CHECK(cuda::launch_rotary_embedding(p, static_cast<cudaStream_t>(stream)));
  LLMKERN_CUDA_CHECK_LAUNCH();
}

}  // namespace llmkern
