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

namespace detail {
using Encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                            const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                            CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
// Tiled map with the 128-byte swizzle and zero fill; rank <= 4. False when the driver entry point is
// missing or the driver refuses the arguments.
inline bool encode(TmaMap* map, CUtensorMapDataType type, int rank, const void* base, const uint64_t* dims,
                   const uint64_t* strides, const uint32_t* box) {
  static Encode fn = []() -> Encode {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &status) !=
            cudaSuccess ||
        status != cudaDriverEntryPointSuccess)
      return nullptr;
    return reinterpret_cast<Encode>(f);
  }();
  if (!fn) return false;
  cuuint64_t gdim[4], gstride[3];
  cuuint32_t bdim[4], estride[4] = {1, 1, 1, 1};
  for (int i = 0; i < rank; ++i) gdim[i] = dims[i], bdim[i] = box[i];
  for (int i = 0; i + 1 < rank; ++i) gstride[i] = strides[i];
  return fn(map, type, cuuint32_t(rank), const_cast<void*>(base), gdim, gstride, bdim, estride,
            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}
}  // namespace detail

// A 4-D tensor of 16-bit values (fp16 when !bf16, else bf16): dims[0] (contiguous) .. dims[3] elements,
// byte strides of dims 1..3 (multiples of 16, < 2^40), boxes of box[0] x .. x box[3] elements
// (box[0] * 2 <= 128: one swizzle span), written to shared memory with the 128-byte swizzle; elements
// outside the tensor read as zeros. Returns false (map unusable) when the driver entry point is missing
// or the driver refuses the arguments; the caller then runs another kernel.
inline bool encode_tma_4d(TmaMap* map, bool bf16, const void* base, const uint64_t dims[4], const uint64_t strides[3],
                          const uint32_t box[4]) {
  return detail::encode(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4, base,
                        dims, strides, box);
}
// A 2-D int8 matrix (described as uint8: TMA copies bytes, and the zero fill is 0 either way): `rows` rows
// of `cols` values (contiguous), rows `row_stride` bytes apart (a multiple of 16); boxes of box_rows x
// box_cols (box_cols <= 128), 128-byte swizzle, zeros outside. Returns false as encode_tma_4d.
inline bool encode_tma_2d_i8(TmaMap* map, const void* base, uint64_t cols, uint64_t rows, uint64_t row_stride,
                             uint32_t box_cols, uint32_t box_rows) {
  const uint64_t dims[2] = {cols, rows}, strides[1] = {row_stride};
  const uint32_t box[2] = {box_cols, box_rows};
  return detail::encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, base, dims, strides, box);
}

}  // namespace sm90
}  // namespace cuda
}  // namespace llmkern
