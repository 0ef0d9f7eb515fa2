// Hopper (sm_90a) warpgroup-MMA GEMM core for the W4A16 prefill path (torch-free):
//   y[M, N] = x[M, K] @ dequant(qweight)^T (+ bias), x and y bf16 or fp16, fp32 accumulation,
//   canonical int4 weights (uint8 [N, K / 2], fp32 scales / offsets [N, K / G], dequant = q * s + o).
//
// Design (docs/notes/cuda-wgmma.md; runs on the CPU through the CUDA emulator, tests/cuda_emu):
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
//   nibbles (32 k of one row, inside one group since G % 32 == 0) plus its scale / offset into a ring of
//   wdq::kWDepth register buffers, kWDepth - 1 iterations before it dequantizes them (fp32 q * s, then + o, one
//   rounding to T, as wdq_gemm.cuh) and stores 4 x 16 B into the swizzled tile while the current stage's
//   wgmmas run.
// - Split-K (wdq::Args::ws set): blockIdx.y's k range [split * k_split, + k_split) (whole 64-k stages), fp32
//   partials to ws[split, M, N] without bias; the launcher's reduction sums them in order.
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
#include "llmkern/cuda/sm90.cuh"
#include "llmkern/cuda/sm90_layout.cuh"
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

// Byte offset of 16-byte chunk c (0..7) of row r in a tile with a 1024-byte-aligned base (sm90_layout.cuh).
__device__ __forceinline__ int swz128(int r, int c) { return int(sm90::swz128(uint32_t(r), uint32_t(c))); }

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
    for (int j = 0; j < 4; ++j) out[4 * i + j] = pack2<T>(f[2 * j], f[2 * j + 1]);
  }
}

// 1-D grid of ceil(M / BM) * ceil(N / kBN) CTAs in grouped raster order (8 row tiles per column tile),
// threads(BM) threads, smem_bytes(BM) bytes of dynamic shared memory. Requirements (launcher): K % 32 == 0,
// 16-byte aligned x rows and qweight, group in {32, 64, 128}.
template <typename T, int BM>
__global__ void __launch_bounds__(threads(BM), 1) wgmma_int4_kernel(wdq::Args<T> a) {
#if defined(LLMKERN_SM90A) || defined(LLMKERN_CUDA_EMULATOR)
  constexpr int kThreads = threads(BM);
  constexpr int kStage = stage_bytes(BM);
  constexpr int kXChunks = BM * (kRowBytes / 16) / kThreads;  // 16-byte x chunks per thread per stage
  constexpr int kPieces = kBN * (kBK / 32) / kThreads;        // 32-k weight pieces per thread per stage
  static_assert(BM % kWgRows == 0 && kXChunks * kThreads == BM * 8 && kPieces * kThreads == kBN * 2, "tile");
  uint8_t* smem_raw = sm90::dyn_smem();
  // Align the stage base to the 1024-byte swizzle atom (the swizzle is a function of address bits).
  uint8_t* smem = smem_raw + ((kAtomBytes - (smem_u32(smem_raw) & (kAtomBytes - 1))) & (kAtomBytes - 1));

  const int tid = threadIdx.x, wg = tid / 128, t = tid % 128;
  int tile_m, tile_n;
  grouped_raster(a.M, a.N, BM, kBN, blockIdx.x, tile_m, tile_n);
  const int m_base = tile_m * BM, n_base = tile_n * kBN;
  // This CTA's k tiles [kt0, kt0 + KT) (split-K: blockIdx.y's share, whole stages).
  const int KT_all = (a.K + kBK - 1) / kBK;
  const int kt0 = a.ws ? blockIdx.y * (a.k_split / kBK) : 0;
  const int KT = a.ws ? min(KT_all - kt0, a.k_split / kBK) : KT_all;
  const uint8_t* qw = static_cast<const uint8_t*>(a.w);

  // x tile of stage s <- k tile kt (chunk c of row r holds x[m_base + r, kt * 64 + 8c .. + 8); copies set up once).
  TileCopies<T, kXChunks, 8, kThreads> xc;
  xc.init(a.x, a.ldx, a.M, a.K, m_base, kt0 * kBK, tid, [](int r, int c) { return sm90::swz128(r, c); });
  auto load_x = [&](int s, int kt) { xc.issue(smem_u32(smem + s * kStage), kt * kBK, a.x); };
  // Weight piece i of this thread for k tile kt: row idx / 2 of the tile, k = kt * 64 + 32 (idx % 2) .. + 32;
  // its row's bytes, scales and offsets from pointers set up once.
  struct WPieces {
    uint4 raw[kPieces];
    float s[kPieces], o[kPieces];
  };
  const uint8_t* wsrc[kPieces];
  const float* ssrc[kPieces];
  const float* osrc[kPieces];
  int wk[kPieces];    // the piece's k in the CTA's first k tile
  bool wok[kPieces];  // its row is inside N
#pragma unroll
  for (int i = 0; i < kPieces; ++i) {
    const int idx = tid + i * kThreads, n = n_base + idx / 2;
    wok[i] = n < a.N;
    const int64_t row = wok[i] ? n : 0;
    wk[i] = kt0 * kBK + (idx % 2) * 32;
    wsrc[i] = qw + row * (a.K / 2) + wk[i] / 2;
    ssrc[i] = a.scale + row * a.ngroups;
    osrc[i] = a.offset + row * a.ngroups;
  }
  const int gshift = __ffs(a.group) - 1;  // (groups of 32, 64 or 128: a shift, not a division)
  auto load_w = [&](int kt, WPieces& w) {
#pragma unroll
    for (int i = 0; i < kPieces; ++i) {
      const int k = wk[i] + kt * kBK;
      w.raw[i] = make_uint4(0, 0, 0, 0);
      w.s[i] = 0.0f;
      w.o[i] = 0.0f;  // out-of-range rows / k (or past this CTA's tiles): zero weights, contribute nothing
      if (wok[i] && k < a.K && kt < KT) {
        w.raw[i] = __ldg(reinterpret_cast<const uint4*>(wsrc[i] + kt * (kBK / 2)));
        w.s[i] = __ldg(ssrc[i] + (k >> gshift));
        w.o[i] = __ldg(osrc[i] + (k >> gshift));
      }
    }
  };
  // Registers -> dequantized weight tile of stage s: piece idx fills chunks 4 (idx % 2) .. + 4 of row idx / 2.
  auto store_w = [&](int s, const WPieces& w) {
    uint8_t* sw = smem + s * kStage + BM * kRowBytes;
#pragma unroll
    for (int i = 0; i < kPieces; ++i) {
      const int idx = tid + i * kThreads;
      const int r = idx / 2, h = idx % 2;
      uint32_t v[16];
      dequant32<T>(w.raw[i], w.s[i], w.o[i], v);
#pragma unroll
      for (int j = 0; j < 4; ++j)
        *reinterpret_cast<uint4*>(sw + swz128(r, 4 * h + j)) = make_uint4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]);
    }
  };

  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.0f;

  // wq[kt % kWDepth]: the raw pieces of k tile kt, loaded kWDepth - 1 iterations before iteration
  // kt - (kStages - 1) dequantizes them into their stage.
  constexpr int kWDepth = wdq::kWDepth;
  WPieces wq[kWDepth];
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < KT) {
      load_x(s, s);
      load_w(s, wq[0]);
      store_w(s, wq[0]);
    }
    cp_async_commit();
  }
#pragma unroll
  for (int d = 0; d < kWDepth - 1; ++d) load_w(kStages - 1 + d, wq[(kStages - 1 + d) % kWDepth]);

  // Unrolled by kWDepth so that every ring index is a compile-time constant (registers, not local memory); as
  // kWDepth == kStages, so is every stage index (kt % kStages == u).
  static_assert(kWDepth == kStages, "stage indices from the unrolled loop");
  for (int kb = 0; kb < KT; kb += kWDepth) {
#pragma unroll
    for (int u = 0; u < kWDepth; ++u) {
      const int kt = kb + u;
      if (kt >= KT) break;  // (uniform across the CTA)
      cp_async_wait<kStages - 2>();
      // This thread's cp.async data of tile kt has landed and its st.shared of the weight tile are done;
      // make both visible to the async proxy (the tensor cores read through it), then to every thread.
      sm90::fence_proxy_async();
      __syncthreads();
      const int nk = kt + kStages - 1;
      const bool refill = nk < KT;
      if (refill) load_x((u + kStages - 1) % kStages, nk);
      cp_async_commit();
      // Tile nk + kWDepth - 1's pieces go into the buffer tile nk - 1 left (stored last iteration): in flight
      // during this and the next kWDepth - 2 iterations.
      if (nk + kWDepth - 1 < KT) load_w(nk + kWDepth - 1, wq[(u + kStages - 1 + kWDepth - 1) % kWDepth]);
      const uint32_t sx = smem_u32(smem + u * kStage) + wg * kWgRows * kRowBytes;
      const uint32_t sw = smem_u32(smem + u * kStage + BM * kRowBytes);
      sm90::fence_regs(acc);
      sm90::wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kBK / 16; ++ks)
        sm90::wgmma_ss<T, kBN>(acc, sm90::desc_k_major(sx + 32 * ks), sm90::desc_k_major(sw + 32 * ks), 1);
      sm90::wgmma_commit();
      // Dequantize the next-but-one stage while the tensor cores work; its buffer was last read by the
      // wgmmas of iteration kt - 1, completed (wait_group 0) before this iteration's barrier.
      if (refill) store_w((u + kStages - 1) % kStages, wq[(u + kStages - 1) % kWDepth]);
      sm90::wgmma_wait<0>();
      sm90::fence_regs(acc);
    }
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
      if (a.ws) {  // split-K partial: the reduction adds the bias
        a.ws[(int64_t(blockIdx.y) * a.M + m) * a.N + n] = v;
        continue;
      }
      if (a.bias) v += a.bias[n];
      a.out[int64_t(m) * a.ldo + n] = from_f32<T>(v);
    }
  }
#else
  __trap();  // wgmma needs sm_90a; the launcher never sends another device here
#endif
}

}  // namespace wgmma
}  // namespace cuda
}  // namespace llmkern
