// CPU emulation of llmkern/cuda/sm90_tma_host.h (tests/cuda_emu): encode_tma_4d / encode_tma_2d_i8 fill the
// emulator's tensor map (include/llmkern/cuda/sm90.cuh) after the checks cuTensorMapEncodeTiled makes for
// these arguments (no interleave, 128-byte swizzle, element strides 1): map 64-byte aligned, base 16-byte
// aligned, dims 1..2^32, strides multiples of 16 below 2^40, box dims 1..256 with the box row
// (box[0] * element size) a multiple of 16 bytes and at most 128 (the swizzle span). false when one fails.
// Test-only.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "llmkern/cuda/sm90.cuh"

namespace llmkern {
namespace cuda {
namespace sm90 {

namespace detail {
inline bool encode(TmaMap* map, uint32_t esize, bool bf16, int rank, const void* base, const uint64_t* dims,
                   const uint64_t* strides, const uint32_t* box) {
  if (!map || reinterpret_cast<uintptr_t>(map) % 64 || !base || reinterpret_cast<uintptr_t>(base) % 16) return false;
  TmaMap m{};
  m.magic = kTmaMagic;
  m.base = base;
  m.esize = esize;
  m.rank = uint32_t(rank);
  m.bf16 = bf16 ? 1 : 0;
  m.strides[0] = esize;
  for (int d = 0; d < 4; ++d) m.dims[d] = 1, m.box[d] = 1;
  for (int d = 0; d < rank; ++d) {
    if (dims[d] < 1 || dims[d] > (uint64_t(1) << 32) || box[d] < 1 || box[d] > 256) return false;
    m.dims[d] = dims[d], m.box[d] = box[d];
  }
  for (int d = 0; d + 1 < rank; ++d) {
    if (strides[d] % 16 || strides[d] >= (uint64_t(1) << 40)) return false;
    m.strides[d + 1] = strides[d];
  }
  if ((box[0] * esize) % 16 || box[0] * esize > 128) return false;
  *map = m;
  return true;
}
}  // namespace detail

inline bool encode_tma_4d(TmaMap* map, bool bf16, const void* base, const uint64_t dims[4], const uint64_t strides[3],
                          const uint32_t box[4]) {
  return detail::encode(map, 2, bf16, 4, base, dims, strides, box);
}
inline bool encode_tma_2d_i8(TmaMap* map, const void* base, uint64_t cols, uint64_t rows, uint64_t row_stride,
                             uint32_t box_cols, uint32_t box_rows) {
  const uint64_t dims[2] = {cols, rows}, strides[1] = {row_stride};
  const uint32_t box[2] = {box_cols, box_rows};
  return detail::encode(map, 1, false, 2, base, dims, strides, box);
}

}  // namespace sm90
}  // namespace cuda
}  // namespace llmkern
