// Host side of TMA: encodes the tensor maps llmkern's sm_90a kernels take as __grid_constant__ parameters.
// Torch-free. The driver's cuTensorMapEncodeTiled is found through the runtime
// (cudaGetDriverEntryPointByVersion), so nothing links against libcuda: the module still imports on a
// machine without a GPU driver. The CPU emulator (tests/cuda_emu) shadows this header.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "llmkern/cuda/sm90.cuh"

namespace llmkern {
namespace cuda {
namespace sm90 {

// A 4-D tensor of 16-bit values (fp16 when !bf16, else bf16): dims[0] (contiguous) .. dims[3] elements,
// byte strides of dims 1..3 (multiples of 16, < 2^40), boxes of box[0] x .. x box[3] elements
// (box[0] * 2 <= 128: one swizzle span), written to shared memory with the 128-byte swizzle; elements
// outside the tensor read as zeros. Returns false (map unusable) when the driver entry point is missing
// or the driver refuses the arguments; the caller then runs another kernel.
inline bool encode_tma_4d(TmaMap* map, bool bf16, const void* base, const uint64_t dims[4], const uint64_t strides[3],
                          const uint32_t box[4]) {
  using Encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                              const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                              CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  static Encode encode = []() -> Encode {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &status) !=
            cudaSuccess ||
        status != cudaDriverEntryPointSuccess)
      return nullptr;
    return reinterpret_cast<Encode>(fn);
  }();
  if (!encode) return false;
  const cuuint64_t gdim[4] = {dims[0], dims[1], dims[2], dims[3]};
  const cuuint64_t gstride[3] = {strides[0], strides[1], strides[2]};
  const cuuint32_t bdim[4] = {box[0], box[1], box[2], box[3]};
  const cuuint32_t estride[4] = {1, 1, 1, 1};
  return encode(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
                const_cast<void*>(base), gdim, gstride, bdim, estride, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace sm90
}  // namespace cuda
}  // namespace llmkern
