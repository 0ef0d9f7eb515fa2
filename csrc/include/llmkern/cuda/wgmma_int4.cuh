// Hopper (sm_90a) warpgroup-MMA GEMM core for the W4A16 prefill path (torch-free):
//   y[M, N] = x[M, K] @ dequant(qweight)^T (+ bias), x and y bf16 or fp16, fp32 accumulation,
//   canonical int4 weights (uint8 [N, K / 2], fp32 scales / offsets [N, K / G], dequant = q * s + o).
//
// Design (docs/notes/cuda-wgmma.md; CPU model of every index formula: scripts/emulate_wgmma.py):
// - CTA tile BM x kBN = 64 x 128 (one warpgroup, 128 threads) or 128 x 128 (two warpgroups, 256
//   threads); warpgroup wg owns output rows [64 wg, 64 wg + 64) of the tile and all 128 columns.
// - kStages = 3 pipeline stages of kBK = 64 k. Per stage, shared memory holds the x tile [BM][64] and the
//   dequantized weight tile [kBN][64], both 16-bit, K-major, rows of 128 bytes in the 128-byte swizzle
//   layout: 16-byte chunk c (0..7) of row r sits at byte r * 128 + ((c ^ (r % 8)) * 16) from a
//   1024-byte-aligned tile base (8 rows = one 1024-byte swizzle atom). That is exactly what the
//   hardware reads through a matrix descriptor with swizzle mode 1 (128B), SBO = 1024 (distance between
//   8-row groups), LBO unused (encoded 1); the k16 step ks of the 64-k stage starts 32 * ks bytes into the
//   row (the swizzle XOR is applied by the hardware on address bits [4, 7) with bits [7, 10)).
// - x tile: cp.async 16 B per chunk (zero-filled outside M / K). Weight tile: each thread loads 16 B of
//   nibbles (32 k of one row, inside one group since G % 32 == 0) plus its scale / offset into
//   registers one stage ahead, dequantizes (fp32 q * s, then + o, one rounding to T, as wdq_gemm.cuh)
//   and stores 4 x 16 B into the swizzled tile while the current stage's wgmmas run.
// - Ordering: generic-proxy writes (cp.async, st.shared) -> fence.proxy.async.shared::cta in each writing
//   thread -> __syncthreads -> wgmma.fence, 4 x wgmma.mma_async m64n128k16 (A and B from shared memory
//   descriptors), wgmma.commit_group -> (dequantize + store the next-but-one stage) ->
//   wgmma.wait_group 0. The stage refilled in iteration kt was last read by the wgmmas of kt - 1, which
//   every warpgroup waited for before the barrier of kt.
// - Accumulators: 64 fp32 per thread; register i of thread t of a warpgroup holds row
//   16 (t / 32) + (t % 32) / 4 + 8 ((i / 2) % 2), column 8 (i / 4) + 2 (t % 4) + i % 2 (PTX ISA,
//   wgmma m64nNk16 D fragment). Epilogue: + fp32 bias, rounded to T, stored with M / N bounds checks.
// Compiled only for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); on other targets the kernel body is a trap, and
// the launcher (csrc/cuda/int4_linear.cu) only launches it on a compute-capability-9.0 device.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "llmkern/cuda/linear_common.cuh"
#include "llmkern/cuda/mma_common.cuh"
#include "llmkern/cuda/wdq_gemm.cuh"

namespace llmkern {
namespace cuda {
namespace wgmma {

constexpr int kBK = 64;            // k per stage: one 128-byte row of 16-bit values
constexpr int kRowBytes = 128;     // bytes per tile row = the 128B swizzle width
constexpr int kAtomBytes = 1024;   // 8 rows x 128 B: one swizzle atom; tile bases are aligned to it
constexpr int kBN = 128;           // weight rows (output columns) per CTA = wgmma N
constexpr int kStages = 3;
constexpr int kWgRows = 64;        // output rows per warpgroup = wgmma M

constexpr int threads(int BM) { return BM / kWgRows * 128; }
constexpr int stage_bytes(int BM) { return (BM + kBN) * kRowBytes; }
// Dynamic shared memory of a CTA: the stages plus slack to align the base to 1024 bytes.
constexpr int smem_bytes(int BM) { return kStages * stage_bytes(BM) + kAtomBytes; }

// Byte offset of 16-byte chunk c (0..7) of row r in a tile with a 1024-byte-aligned base.
__device__ __forceinline__ int swz128(int r, int c) { return r * kRowBytes + ((c ^ (r & 7)) << 4); }

// wgmma shared-memory matrix descriptor (PTX ISA "Matrix Descriptor Format"): bits 0-13 start address >> 4,
// 16-29 leading-dimension byte offset >> 4, 32-45 stride-dimension byte offset >> 4, 49-51 base offset
// (0: atoms 1024-byte aligned), 62-63 swizzle mode (1 = 128B). K-major operand, 128B swizzle: LBO unused
// (1), SBO = 1024 = distance between consecutive groups of 8 rows.
__device__ __forceinline__ uint64_t make_desc(uint32_t smem_addr) {
  uint64_t d = uint64_t((smem_addr & 0x3FFFFu) >> 4);
  d |= uint64_t(1) << 16;
  d |= uint64_t(kAtomBytes >> 4) << 32;
  d |= uint64_t(1) << 62;
  return d;
}

__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accesses of an accumulator register across the async wgmma window.
__device__ __forceinline__ void fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }

// d[64] (+)= A[64 x 16] (descriptor desc_a) * B[16 x 128] (descriptor desc_b, stored [128][16] K-major);
// scale_d = 0 ignores the old d.
template <typename T>
__device__ __forceinline__ void mma_64x128x16(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d)
        : "memory");
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d)
        : "memory");
  }
}

// 16 bytes of nibbles (32 k of one weight row, k order: low then high nibble of each byte) -> 16 words of
// two T values each: T(q * s + o) with an fp32 multiply, an fp32 add and one rounding.
template <typename T>
__device__ __forceinline__ void dequant32(const uint4& raw, float s, float o, uint32_t (&out)[16]) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t lo = w[i] & 0x0F0F0F0Fu, hi = (w[i] >> 4) & 0x0F0F0F0Fu;
    float f[8];
    f[0] = byte_to_f32<0>(lo);
    f[1] = byte_to_f32<0>(hi);
    f[2] = byte_to_f32<1>(lo);
    f[3] = byte_to_f32<1>(hi);
    f[4] = byte_to_f32<2>(lo);
    f[5] = byte_to_f32<2>(hi);
    f[6] = byte_to_f32<3>(lo);
    f[7] = byte_to_f32<3>(hi);
#pragma unroll
    for (int j = 0; j < 8; ++j) f[j] = __fadd_rn(__fmul_rn(f[j], s), o);
#pragma unroll
    for (int j = 0; j < 4; ++j) out[4 * i + j] = wdq::pack2<T>(f[2 * j], f[2 * j + 1]);
  }
}

// 1-D grid of ceil(M / BM) * ceil(N / kBN) CTAs in grouped raster order (8 row tiles per column tile),
// threads(BM) threads, smem_bytes(BM) bytes of dynamic shared memory. Requirements (launcher): K % 32 == 0,
// 16-byte aligned x rows and qweight, group in {32, 64, 128}.
template <typename T, int BM>
__global__ void __launch_bounds__(threads(BM), 1) wgmma_int4_kernel(wdq::Args<T> a) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kThreads = threads(BM);
  constexpr int kStage = stage_bytes(BM);
  constexpr int kXChunks = BM * (kRowBytes / 16) / kThreads;  // 16-byte x chunks per thread per stage
  constexpr int kPieces = kBN * (kBK / 32) / kThreads;        // 32-k weight pieces per thread per stage
  static_assert(BM % kWgRows == 0 && kXChunks * kThreads == BM * 8 && kPieces * kThreads == kBN * 2, "tile");
  extern __shared__ uint8_t smem_raw[];
  // Align the stage base to the 1024-byte swizzle atom (the swizzle is a function of address bits).
  uint8_t* smem = smem_raw + ((kAtomBytes - (smem_u32(smem_raw) & (kAtomBytes - 1))) & (kAtomBytes - 1));

  const int tid = threadIdx.x, wg = tid / 128, t = tid % 128;
  int tile_m, tile_n;
  grouped_raster(a.M, a.N, BM, kBN, blockIdx.x, tile_m, tile_n);
  const int m_base = tile_m * BM, n_base = tile_n * kBN;
  const int KT = (a.K + kBK - 1) / kBK;
  const uint8_t* qw = static_cast<const uint8_t*>(a.w);

  // x tile of stage s <- k tile kt (chunk c of row r holds x[m_base + r, kt * 64 + 8c .. + 8)).
  auto load_x = [&](int s, int kt) {
    uint8_t* sx = smem + s * kStage;
#pragma unroll
    for (int i = 0; i < kXChunks; ++i) {
      const int idx = tid + i * kThreads;
      const int r = idx / 8, c = idx % 8;
      const int gm = m_base + r, gk = kt * kBK + c * 8;
      const bool ok = gm < a.M && gk < a.K;
      const T* src = ok ? a.x + int64_t(gm) * a.ldx + gk : a.x;
      cp_async16(smem_u32(sx + swz128(r, c)), src, ok ? 16 : 0);
    }
  };
  // Weight piece i of this thread for k tile kt: row idx / 2 of the tile, k = kt * 64 + 32 (idx % 2) .. + 32.
  uint4 raw[kPieces];
  float ps[kPieces], po[kPieces];
  auto load_w = [&](int kt) {
#pragma unroll
    for (int i = 0; i < kPieces; ++i) {
      const int idx = tid + i * kThreads;
      const int n = n_base + idx / 2, k = kt * kBK + (idx % 2) * 32;
      raw[i] = make_uint4(0, 0, 0, 0);
      ps[i] = 0.0f;
      po[i] = 0.0f;  // out-of-range rows / k: zero weights, contribute nothing
      if (n < a.N && k < a.K) {
        raw[i] = __ldg(reinterpret_cast<const uint4*>(qw + int64_t(n) * (a.K / 2) + k / 2));
        ps[i] = __ldg(a.scale + int64_t(n) * a.ngroups + k / a.group);
        po[i] = __ldg(a.offset + int64_t(n) * a.ngroups + k / a.group);
      }
    }
  };
  // Registers -> dequantized weight tile of stage s: piece idx fills chunks 4 (idx % 2) .. + 4 of row idx / 2.
  auto store_w = [&](int s) {
    uint8_t* sw = smem + s * kStage + BM * kRowBytes;
#pragma unroll
    for (int i = 0; i < kPieces; ++i) {
      const int idx = tid + i * kThreads;
      const int r = idx / 2, h = idx % 2;
      uint32_t v[16];
      dequant32<T>(raw[i], ps[i], po[i], v);
#pragma unroll
      for (int j = 0; j < 4; ++j)
        *reinterpret_cast<uint4*>(sw + swz128(r, 4 * h + j)) = make_uint4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]);
    }
  };

  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.0f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < KT) {
      load_x(s, s);
      load_w(s);
      store_w(s);
    }
    cp_async_commit();
  }

  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<kStages - 2>();
    // This thread's cp.async data of tile kt has landed and its st.shared of the weight tile are done;
    // make both visible to the async proxy (the tensor cores read through it), then to every thread.
    fence_proxy_async();
    __syncthreads();
    const int nk = kt + kStages - 1;
    const bool refill = nk < KT;
    if (refill) {
      load_x(nk % kStages, nk);
      load_w(nk);  // global loads in flight during the wgmmas below
    }
    cp_async_commit();
    const uint32_t sx = smem_u32(smem + (kt % kStages) * kStage) + wg * kWgRows * kRowBytes;
    const uint32_t sw = smem_u32(smem + (kt % kStages) * kStage + BM * kRowBytes);
#pragma unroll
    for (int i = 0; i < 64; ++i) fence_operand(acc[i]);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kBK / 16; ++ks) mma_64x128x16<T>(acc, make_desc(sx + 32 * ks), make_desc(sw + 32 * ks), 1);
    wgmma_commit();
    // Dequantize the next-but-one stage while the tensor cores work; its buffer was last read by the
    // wgmmas of iteration kt - 1, completed (wait_group 0) before this iteration's barrier.
    if (refill) store_w(nk % kStages);
    wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < 64; ++i) fence_operand(acc[i]);
  }
  cp_async_wait<0>();

  const int warp = t / 32, lane = t % 32;
  const int row0 = m_base + wg * kWgRows + 16 * warp + lane / 4;
  const int col0 = n_base + 2 * (lane % 4);
#pragma unroll
  for (int i = 0; i < 64; ++i) {
    const int m = row0 + 8 * ((i / 2) % 2);
    const int n = col0 + 8 * (i / 4) + i % 2;
    if (m < a.M && n < a.N) {
      float v = acc[i];
      if (a.bias) v += a.bias[n];
      a.out[int64_t(m) * a.ldo + n] = from_f32<T>(v);
    }
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // wgmma needs sm_90a; the launcher never sends another device here
#endif
}

}  // namespace wgmma
}  // namespace cuda
}  // namespace llmkern
