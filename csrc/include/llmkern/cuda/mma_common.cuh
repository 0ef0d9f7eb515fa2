// Tensor-core building blocks shared by the int8_linear / int4_linear GEMMs (torch-free): the shared-memory
// tile geometry and raster; the cp.async / ldmatrix / mma.sync wrappers are in sm80.cuh (included here).
//
// Every tile in shared memory has rows of kTileRowBytes = 64 bytes: 64 int8 (two m16n8k32 steps) or
// 32 bf16/fp16 (two m16n8k16 steps). The 8-bit m16n8k32 and 16-bit m16n8k16 fragments have the same
// byte layout (A: reg0 = row g bytes 4t..4t+3 of a 32-byte k slice, reg1 = row g+8, reg2/reg3 the same
// at byte 16 + 4t; B: reg0 = row n = g bytes 4t.., reg1 = bytes 16 + 4t..; C: rows g / g+8, columns
// 2t, 2t+1), so one ldmatrix addressing serves both (see w8a8_mma_kernel).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "llmkern/cuda/sm80.cuh"

namespace llmkern {
namespace cuda {

constexpr int kTileRowBytes = 64;  // bytes per row of a shared-memory tile = one pipeline stage's K
constexpr int kMmaStages = 3;      // 3 x (128 + 128) x 64 B = 48 KiB of static shared memory at most

// Grouped raster of a 1-D grid of output tiles (the GEMM kernels: int8_linear, wdq_gemm, wgmma_int4):
// kRasterM consecutive row tiles share each column tile while it is in L2, so a weight panel is read
// about once per kRasterM row tiles instead of once per row tile. Block pid -> (tile_m, tile_n).
__device__ __forceinline__ void grouped_raster(int M, int N, int BM, int BN, int pid, int& tile_m, int& tile_n) {
  constexpr int kRasterM = 8;
  const int tiles_m = (M + BM - 1) / BM, tiles_n = (N + BN - 1) / BN;
  const int per_group = kRasterM * tiles_n;
  const int first_m = (pid / per_group) * kRasterM;
  const int gm = min(tiles_m - first_m, kRasterM);
  tile_m = first_m + (pid % per_group) % gm;
  tile_n = (pid % per_group) / gm;
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// One thread's share of the cp.async copies that fill a [rows][kChunks x 16 bytes] tile of a row-major matrix
// (x, or int8 weights) at every k tile of a GEMM: copy n is row i / kChunks, 16-byte chunk i % kChunks of the
// tile (i = tid + n kThreads). The source pointers, the elements left in each chunk's row from its first k tile
// (0 for rows past the matrix: nothing copied) and the swizzled destinations are set up once per CTA, so that a k
// tile costs an add and a compare per copy. (Loader loops over tid..rows with a run-time trip count, rebuilding
// 64-bit row addresses from the kernel arguments every k tile, were a third or more of the GEMM loops' SASS:
// docs/notes/cuda-gemm-loops.md.) A chunk lies wholly inside or outside the row's [0, K).
template <typename T, int kCopies, int kChunks, int kThreads>
struct TileCopies {
  const T* src[kCopies];
  int left[kCopies];
  uint32_t dst[kCopies];  // byte offset in the tile

  // a[rows, K] with row stride ld; the tile's rows start at row0, its first k tile at column k0; swz(r, c): the
  // byte offset of chunk c of tile row r.
  template <class Swz>
  __device__ __forceinline__ void init(const T* a, int64_t ld, int rows, int K, int row0, int k0, int tid, Swz swz) {
#pragma unroll
    for (int n = 0; n < kCopies; ++n) {
      const int i = tid + n * kThreads, r = i / kChunks, c = i % kChunks, row = row0 + r;
      const int k = k0 + c * int(16 / sizeof(T));
      src[n] = row < rows ? a + int64_t(row) * ld + k : a;
      left[n] = row < rows ? K - k : 0;
      dst[n] = swz(r, c);
    }
  }
  // The k tile kk elements after k0 -> the tile at shared address `tile` (zeros past the rows and K; `any` is a
  // valid address for the copies of no bytes).
  __device__ __forceinline__ void issue(uint32_t tile, int kk, const T* any) const {
#pragma unroll
    for (int n = 0; n < kCopies; ++n) {
      const bool ok = kk < left[n];
      cp_async16(tile + dst[n], ok ? src[n] + kk : any, ok ? 16 : 0);
    }
  }
};

// Byte offset of 16-byte chunk c (0..3) of row r in a [rows][64 B] tile. The chunk index is XORed with
// bits 1..2 of the row so that the 8 rows one ldmatrix phase reads (same chunk column) hit 8 distinct
// 16-byte bank groups: rows 0..7 at chunk c land on groups c, 4+c, c^1, 4+(c^1), c^2, ... (all distinct).
__device__ __forceinline__ int swz(int r, int c) { return r * kTileRowBytes + ((c ^ ((r >> 1) & 3)) << 4); }

// A warp's A fragments (MT 16-row blocks from tile row a_row0) and B fragments (NT 8-row blocks from tile row
// b_row0) of the 32-byte k slice ks of a stage, by ldmatrix.x4 from the swizzled tiles sa / sb: for m16n8k16
// (16-bit) and m16n8k32 (8-bit) alike (the same byte layout, see above).
// A matrices: (rows 0-7, k 0-15), (rows 8-15, k 0-15), (rows 0-7, k 16-31), (rows 8-15, k 16-31) of a 16-row block;
// B matrices: (n 0-7, k 0-15), (n 0-7, k 16-31), (n 8-15, k 0-15), (n 8-15, k 16-31) of a pair of 8-row blocks.
template <int MT, int NT>
__device__ __forceinline__ void load_frags(const int8_t* sa, const int8_t* sb, int a_row0, int b_row0, int ks, int lane,
                                           uint32_t (&af)[MT][4], uint32_t (&bf)[NT][2]) {
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    const int r = a_row0 + i * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
    ldmatrix_x4(smem_u32(sa + swz(r, ks * 2 + lane / 16)), af[i][0], af[i][1], af[i][2], af[i][3]);
  }
#pragma unroll
  for (int jp = 0; jp < NT / 2; ++jp) {
    const int r = b_row0 + jp * 16 + (lane % 8) + (lane / 16) * 8;
    ldmatrix_x4(smem_u32(sb + swz(r, ks * 2 + (lane / 8) % 2)), bf[2 * jp][0], bf[2 * jp][1], bf[2 * jp + 1][0],
                bf[2 * jp + 1][1]);
  }
}

}  // namespace cuda
}  // namespace llmkern
