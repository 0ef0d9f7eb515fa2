// Launcher of the CUDA kv_cache_append (kernel: csrc/include/llmkern/cuda/kv_cache_append.cuh).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "llmkern/cuda/kv_cache_append.cuh"
#include "llmkern/cuda_check.cuh"

namespace llmkern {

void kv_cache_append_cuda(const cuda::KvAppendParams& p, void* stream) {
  auto fail = [](const std::string& m) { throw std::invalid_argument("llmkern._C_cuda.kv_cache_append: " + m); };
  if (p.B < 0 || p.S < 0 || p.Hk < 1 || p.D < 1 || p.D > cuda::kAppendMaxD) fail("need B, S >= 0, Hk >= 1, 1 <= D <= 256");
  if (p.kv_dtype < 0 || p.kv_dtype > 2 || p.cache_type < 0 || p.cache_type > 3) fail("bad dtype code");
  if (p.B * p.S == 0) return;
  if (!p.k || !p.v || !p.slots || !p.k_cache || !p.v_cache) fail("null pointer");
  if (p.cache_type == cuda::kI8 && (!p.k_scale || !p.v_scale)) fail("an int8 cache needs k_scale and v_scale");
  if (p.cos_sin) {
    if (p.R < 2 || p.R % 2 || p.R > p.D || !p.positions) fail("rotary needs positions and an even R in [2, D]");
    if (p.q && (p.Hq < 1 || p.q_dtype < 0 || p.q_dtype > 2)) fail("bad q");
  } else if (p.q) {
    fail("q is only rotated with cos_sin");
  }
  LLMKERN_CUDA_CHECK(cuda::launch_kv_cache_append(p, static_cast<cudaStream_t>(stream)));
  LLMKERN_CUDA_CHECK_LAUNCH();
}

}  // namespace llmkern
