// Host-side checks shared by the launchers of llmkern's sm_90a kernels (attention_sm90.cu,
// int8_linear_sm90.cu, int4_linear.cu). Torch-free.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "llmkern/cuda_check.cuh"

namespace llmkern {

// The current device has compute capability 9.0 (H100 / H200: wgmma and TMA exist only there).
inline bool device_is_sm90() {
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) return false;
  return major == 9 && minor == 0;
}

// Whether `kernel` (an sm_90a kernel using `smem_bytes` of dynamic shared memory) can run on the current
// device: compute capability 9.0 and a loaded sm_90 binary (a module built without sm_90a runs its sm_80
// code, in which these kernels trap), with the shared-memory opt-in done. Decided once per device and kept
// in `checked` / `ok` (bit d for device d; one pair per kernel), so that the attribute calls stay out of the
// hot path and out of CUDA graph captures after a warm-up call. Devices 64 and up: false.
template <typename Kernel>
bool sm90_kernel_ready(Kernel kernel, int smem_bytes, std::atomic<uint64_t>* checked, std::atomic<uint64_t>* ok) {
  int dev = 0;
  LLMKERN_CUDA_CHECK(cudaGetDevice(&dev));
  const uint64_t bit = dev < 64 ? uint64_t(1) << dev : 0;
  if (!bit) return false;
  if (!(checked->load(std::memory_order_acquire) & bit)) {
    bool usable = device_is_sm90();
    if (usable) {
      cudaFuncAttributes fa{};
      LLMKERN_CUDA_CHECK(cudaFuncGetAttributes(&fa, kernel));
      usable = fa.binaryVersion == 90;
    }
    if (usable) LLMKERN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
    if (usable) ok->fetch_or(bit, std::memory_order_release);
    checked->fetch_or(bit, std::memory_order_release);
  }
  return (ok->load(std::memory_order_acquire) & bit) != 0;
}

}  // namespace llmkern
