// Shared-memory layout arithmetic of llmkern's sm_90a kernels (torch-free, no inline asm: compiled as is
// by the CPU emulator, tests/cuda_emu, which checks it against its own model of the hardware).
//
// Tiles of 16-bit values are stored in "boxes" of rows x 64 values: one 128-byte row per tile row, 16-byte
// chunk c (0..7) of row r at byte r * 128 + ((c ^ (r % 8)) * 16) from a 1024-byte-aligned box base (the
// 128-byte swizzle; 8 rows = one 1024-byte swizzle atom). This is what a TMA load with
// CU_TENSOR_MAP_SWIZZLE_128B and a box inner dimension of 64 values writes, and what wgmma reads through
// a matrix descriptor with swizzle mode 1 (128B). A tile with D > 64 columns is D / 64 boxes, box b holding
// columns [64 b, 64 b + 64).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LLMKERN_HD __host__ __device__ __forceinline__
#else
#define LLMKERN_HD inline
#endif

namespace llmkern {
namespace cuda {
namespace sm90 {

constexpr int kSwRow = 128;    // bytes per box row (= the swizzle span)
constexpr int kSwAtom = 1024;  // 8 rows: one swizzle atom; box bases are aligned to it

// Byte offset of 16-byte chunk c (0..7) of row r in a box.
LLMKERN_HD uint32_t swz128(uint32_t r, uint32_t c) { return r * kSwRow + (((c ^ r) & 7u) << 4); }
// Byte offset of the 16-bit value at (row r, column col) of a tile of `rows`-row boxes (col < 64 * boxes).
LLMKERN_HD uint32_t tile_offset(uint32_t rows, uint32_t r, uint32_t col) {
  return (col >> 6) * rows * kSwRow + swz128(r, (col & 63) >> 3) + (col & 7) * 2;
}

// wgmma shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format"): bits 0-13 start address
// >> 4, 16-29 leading-dimension byte offset (LBO) >> 4, 32-45 stride-dimension byte offset (SBO) >> 4,
// 49-51 base offset (0: atoms 1024-byte aligned), 62-63 swizzle mode (1 = 128B).
LLMKERN_HD uint64_t desc_sw128(uint32_t smem_addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return uint64_t((smem_addr & 0x3FFFFu) >> 4) | (uint64_t((lbo_bytes >> 4) & 0x3FFFu) << 16) |
         (uint64_t((sbo_bytes >> 4) & 0x3FFFu) << 32) | (uint64_t(1) << 62);
}
// K-major operand (rows = M or N, the 16 k of a step contiguous in a row): canonical layout
// ((8, m), (T, 2k)) : ((8T, SBO), (1, T)) with 128B swizzle. SBO = 1024 (the next 8 rows); LBO unused for
// swizzled K-major layouts (encoded 1). k step ks (16 values = 32 bytes) of a box starts at + 32 ks: the
// hardware applies the swizzle XOR to the computed address, so a start inside the atom still finds the
// swizzled chunks (as CUTLASS and DeepGEMM advance k).
LLMKERN_HD uint64_t desc_k_major(uint32_t smem_addr) { return desc_sw128(smem_addr, 16, kSwAtom); }
// MN-major operand (rows = k, the N index contiguous in a row: a [k][n] tile stored row by row): canonical
// layout ((T, 8, m), (8, k)) : ((1, T, LBO), (8T, SBO)) with 128B swizzle: 64 n values per 128-byte row,
// the next 64 n at LBO (= the next box), the next 8 k rows at SBO = 1024. k step kk (16 rows) of a box
// starts at + 2048 kk.
LLMKERN_HD uint64_t desc_mn_major(uint32_t smem_addr, uint32_t box_bytes) {
  return desc_sw128(smem_addr, box_bytes, kSwAtom);
}

}  // namespace sm90
}  // namespace cuda
}  // namespace llmkern
