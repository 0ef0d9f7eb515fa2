// sm_80 (Ampere and later) primitives of llmkern's tensor-core kernels: cp.async copies, ldmatrix and
// mma.sync. Torch-free; one inline-asm wrapper per PTX instruction and nothing else, so that the CPU emulator
// (tests/cuda_emu/include/llmkern/cuda/sm80.cuh shadows this file there) can stand in for each one and run
// the kernels that use them. Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 / m16n8k32"),
// g = lane / 4, t = lane % 4:
// - A (16 x 16 of 16-bit, or 16 x 32 of 8-bit): word 0 = row g, k bytes [4t, 4t + 4) of the first 16
//   bytes; word 1 = row g + 8, same k; words 2 / 3 = rows g / g + 8, k bytes [16 + 4t, 16 + 4t + 4).
// - B (k x 8, "col"): word 0 = column n = g, k bytes [4t, 4t + 4); word 1 = column g, k bytes [16 + 4t, ..).
// - C / D (16 x 8, fp32 or int32): d0, d1 = row g, columns 2t, 2t + 1; d2, d3 = row g + 8, the same columns.
// Within a word, the lower k (lower address) sits in the lower bits.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace llmkern {
namespace cuda {

// 16 bytes global -> shared, asynchronously; src_bytes 0 writes zeros (out-of-range rows / k).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
// Closes this thread's group of copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N of this thread's committed groups are pending (their data is then in shared
// memory, visible to this thread; other threads see it after a barrier).
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// ldmatrix .x4: four 8 x 8 matrices of 16-bit values; lanes 8 i .. 8 i + 7 give the shared addresses of the
// 8 rows (16 bytes each) of matrix i; lane l receives in r_i the word (row l / 4, columns 2 (l % 4), +1) of
// matrix i (warp-collective).
__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

// d += a * b, m16n8k32, int8 x int8 -> int32 (exact, wrapping), fragments as above.
__device__ __forceinline__ void mma_s8(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// d += a * b, m16n8k16, bf16 / fp16 inputs, fp32 accumulation, fragments as above.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ldmatrix .x4 .trans: the same addressing; lane l receives in r_i the values (rows 2 (l % 4) and
// 2 (l % 4) + 1, column l / 4) of matrix i, lower row in the lower half (each matrix transposed).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                                  uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

// 2^x by the SFU (ex2.approx.ftz: ~2 ulp, subnormal results flushed to 0).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// (a & b) | c in one instruction (lop3.b32 with LUT 0xEA = (0xF0 & 0xCC) | 0xAA). Written out because for
// constant b and c the compiler emits an AND and an OR (a SASS LOP3 holds one immediate).
__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

}  // namespace cuda
}  // namespace llmkern
