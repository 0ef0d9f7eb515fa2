// Error handling shared by llmkern's CUDA launchers. Torch-free: launchers turn a failed CUDA call
// into a C++ exception carrying the call site, which pybind11 raises as a Python RuntimeError.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace llmkern {

inline void cuda_check(cudaError_t err, const char* what, const char* file, int line) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("llmkern CUDA error in ") + what + " at " + file + ":" +
                             std::to_string(line) + ": " + cudaGetErrorString(err));
  }
}

}  // namespace llmkern

#define LLMKERN_CUDA_CHECK(expr) ::llmkern::cuda_check((expr), #expr, __FILE__, __LINE__)
// After every kernel launch: catches bad launch configurations without synchronizing.
#define LLMKERN_CUDA_CHECK_LAUNCH() LLMKERN_CUDA_CHECK(cudaGetLastError())
