// What the CUDA module was built for and what it finds at run time. Linked against the static cudart,
// so this runs (and reports no device) on machines without a driver.
#include <cuda_runtime.h>

#include <string>

#include "llmkern/cuda_check.cuh"

namespace llmkern {

// A trivial kernel compiled for every target architecture: proves the toolchain produces sm_80 and
// sm_90a code, and gives the GPU script a launch it can check before the real kernels run.
__global__ void iota_kernel(int* out, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = i;
}

int runtime_version() {
  int v = 0;
  if (cudaRuntimeGetVersion(&v) != cudaSuccess) return -1;
  return v;
}

int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) return -1;
  return v;
}

// Number of visible devices; 0 (not an error) where there is no driver or no GPU.
int device_count(std::string* error) {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    if (error) *error = cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  return n;
}

// "" when `device` can run this module's kernels, else why not: a compute capability below 8.0 (the kernels
// use sm_80's mma.sync, ldmatrix and cp.async), or no kernel image for it (a GPU newer than the build's
// targets when the build holds no PTX, e.g. LLMKERN_CUDA_ARCHS without the PTX target). Makes `device`
// current for this thread (the caller passes torch's current device, so nothing changes for torch).
std::string kernel_image_error(int device) {
  int cur = -1;
  if (cudaGetDevice(&cur) != cudaSuccess || cur != device) {
    cudaError_t err = cudaSetDevice(device);
    if (err != cudaSuccess) {
      cudaGetLastError();
      return cudaGetErrorString(err);
    }
  }
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (major < 8)
    return "compute capability " + std::to_string(major) + "." + std::to_string(minor) +
           ": llmkern's CUDA kernels need 8.0 or newer";
  cudaFuncAttributes attr{};
  cudaError_t err = cudaFuncGetAttributes(&attr, iota_kernel);  // loads (or JIT-compiles) the image
  if (err != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it
    return std::string(cudaGetErrorString(err)) + " (compute capability " + std::to_string(major) + "." +
           std::to_string(minor) + ")";
  }
  return "";
}

void iota(int* out, int n, cudaStream_t stream) {
  if (n <= 0) return;
  iota_kernel<<<(n + 255) / 256, 256, 0, stream>>>(out, n);
  LLMKERN_CUDA_CHECK_LAUNCH();
}

}  // namespace llmkern
