// W4A16 at decode-sized M (1..16 rows, bf16 / fp16 x) on tensor cores, reading int4 weights prepacked once
// (by pack_weights_kernel / pack_scales_kernel below, when an Int4Linear module prepares its first call) into
// the order of the mma.sync m16n8k16 A fragments. Torch-free.
//
// Why a packed layout (decode_mma.cuh reads the canonical one): there, every weight costs ~4.75 ALU ops
// (nibble -> fp32, fp32 q * s + o, round to 16 bits, pack), which caps the kernel below memory bandwidth on a
// GPU whose ALUs are shared with the tensor cores. Here the dequantization costs ~1.4 per weight (2.6-2.9
// SASS instructions per weight for the whole loop): the nibbles sit where a `lop3` (mask + OR with the
// exponent of 128 / 1024) turns two of them into a bf16x2 / f16x2 word 128 + q / 1024 + q, one `hsub2`
// makes that q exactly, and the group's scale and offset are applied once per group to fp32 accumulators:
//     sum_k x[m, k] (q[n, k] s + o) = s * sum_k x[m, k] q[n, k] + o * sum_k x[m, k]        (one group of G k)
// with both sums from tensor cores (the second is an mma with an all-ones A operand). q and x are exact in
// the mma, so the result differs from the canonical fp32 (q s + o) dequantization only by fp32 rounding,
// not by rounding each weight to 16 bits as decode_mma does.
//
// Swap AB as in decode_mma.cuh: 16 weight rows (n) are the A operand, x^T (8 rows m per mma, MB = 1 or 2
// mmas) is B. K order inside an mma is free as long as both operands agree; within each 16-k step the packed
// order gives lane (g = lane / 4, t = lane % 4) the 4 consecutive k 4t .. 4t + 3 (A reg0 / reg1: k 4t, 4t + 1
// of rows g / g + 8; reg2 / reg3: k 4t + 2, 4t + 3), so its B words are one 8-byte load of x[m = g][4t ..].
//
// Packed weight layout `qp` (uint2 = 8 bytes per lane and chunk; a chunk is 16 rows x 32 k, one warp-wide
// 256-byte load): qp[tile][c][lane], tile = n / 16 (rows past N zero), c = k / 32. Word s (0, 1) of lane
// (g, t) holds the 16 k step s of the chunk, k0 = 32 c + 16 s + 4 t; nibble at bit 4 r + 16 e is
//     r = 0: q[16 tile + g,     k0 + e]      r = 1: q[16 tile + g + 8, k0 + e]
//     r = 2: q[16 tile + g,     k0 + 2 + e]  r = 3: q[16 tile + g + 8, k0 + 2 + e]       (e = 0, 1)
// so (word >> 4 r) & 0x000F000F holds A register r's two values in its two 16-bit halves (lower k low).
// Scale layout `sp`: per (tile, group, g) the rows g and g + 8: float4 (s_g, o_g, s_g8, o_g8), or, when every
// scale and offset of the weight is an fp16 value (GGUF Q4_0 / Q4_1 are; the packer's caller checks), two
// half2 (s_g, o_g), (s_g8, o_g8) in a uint2: the same values in half the bytes.
//
// CTA: kWarps warps on the same 16 output columns interleave 128-k blocks (4 chunks); their fp32 fragments are
// summed in shared memory in warp order. Split-K over gridDim.y (fp32 partials ws[split, M, N], summed in order
// by int4_linear::reduce_kernel): deterministic.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "llmkern/cuda/linear_common.cuh"
#include "llmkern/cuda/sm80.cuh"

namespace llmkern {
namespace cuda {
namespace int4_packed {

constexpr int kWarps = 4;
constexpr int kCols = 16;        // output columns (weight rows) per CTA = rows of a tile
constexpr int kChunkK = 32;      // k per chunk (one uint2 per lane)
constexpr int kBlockChunks = 4;  // chunks per block (a warp's unit of work: 128 k)

// Bytes of the packed weight and scale buffers for an [N, K] weight with groups of G.
inline int64_t packed_weight_bytes(int N, int K) { return int64_t((N + kCols - 1) / kCols) * kCols * (K / 2); }
inline int64_t packed_scale_bytes(int N, int K, int G, bool scale16) {
  return int64_t((N + kCols - 1) / kCols) * (K / G) * 8 * (scale16 ? 8 : 16);
}

template <typename T>
struct Args {
  const T* x;  // [M, K], row stride ldx, 16-byte aligned rows
  int64_t ldx;
  int M, N, K;
  const uint2* qp;   // packed weights (above)
  const void* sp;    // packed scales: float4 or uint2 per (tile, group, g)
  int ngroups;        // K / G (G = 32 kCPG, a template parameter of the kernel)
  const float* bias;  // [N] fp32 or null (unsplit only)
  void* out;          // unsplit: T [M, N] row stride ldo; split: fp32 ws [splits, M, N]
  int64_t ldo;
  int split_blocks;   // 128-k blocks per split
};

// 128 + q (bf16) or 1024 + q (fp16) for q in 0..15 is exact: the magic number's exponent makes the
// mantissa's low bits the integer q.
template <typename T>
struct Magic;
template <>
struct Magic<__nv_bfloat16> {
  static constexpr uint32_t kBias = 0x43004300u;  // 128.0, 128.0
  static constexpr uint32_t kOne = 0x3F803F80u;   // 1.0, 1.0
};
template <>
struct Magic<__half> {
  static constexpr uint32_t kBias = 0x64006400u;  // 1024.0, 1024.0
  static constexpr uint32_t kOne = 0x3C003C00u;
};

// Two nibbles (bits 0..3 and 16..19 of v) -> the packed pair (q_lo, q_hi) in T, exactly.
template <typename T>
__device__ __forceinline__ uint32_t nibbles_to_pair(uint32_t v) {
  const uint32_t bias = Magic<T>::kBias;
  const uint32_t biased = lop3_and_or(v, 0x000F000Fu, bias);
  using T2 = typename std::conditional<std::is_same<T, __nv_bfloat16>::value, __nv_bfloat162, __half2>::type;
  const T2 r = __hsub2(*reinterpret_cast<const T2*>(&biased), *reinterpret_cast<const T2*>(&bias));
  return *reinterpret_cast<const uint32_t*>(&r);
}

template <typename T>
__device__ __forceinline__ void mma16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) mma_bf16(d, a, b0, b1);
  else mma_f16(d, a, b0, b1);
}

// (s_g, o_g, s_g8, o_g8) of entry i of the scale buffer.
template <bool kS16>
__device__ __forceinline__ float4 load_scales(const void* sp, int64_t i) {
  if constexpr (kS16) {
    const uint2 v = __ldg(static_cast<const uint2*>(sp) + i);
    const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&v.x));
    const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&v.y));
    return make_float4(a.x, a.y, b.x, b.y);
  } else {
    return __ldg(static_cast<const float4*>(sp) + i);
  }
}

// One lane's operands of one 128-k block; kCPG = G / 32 chunks per group (1, 2, 4: a block holds whole groups).
template <int MB, int kCPG>
struct Block {
  uint2 w[kBlockChunks];
  float4 sc[kBlockChunks / kCPG];  // per group of the block
  uint2 x[kBlockChunks][MB][2];  // chunk u, 8-row block mb, step s: x[m = g + 8 mb][32 c + 16 s + 4 t ..+4]
};

// A lane's read positions, computed once: its packed weights, its scale entries and its x rows.
template <typename T, int MB>
struct LanePtrs {
  const uint2* w;    // + 32 c: chunk c
  const void* sc;    // entry (tile, group 0, g); + 8 per group
  const T* x[MB];    // x[m = g + 8 mb][4 t]; + 32 c (null where m >= M)
};

// Chunks 4 kb .. 4 kb + 3 (kFull) or those of them below nchunks (the last block when K % 128 != 0).
template <typename T, int MB, bool kS16, bool kFull, int kCPG>
__device__ __forceinline__ void load_block(const LanePtrs<T, MB>& p, int kb, int nchunks, Block<MB, kCPG>& b) {
#pragma unroll
  for (int u = 0; u < kBlockChunks; ++u) {
    const int c = kb * kBlockChunks + u;
    if (!kFull && c >= nchunks) {  // (K % G == 0: whole groups are skipped)
      b.w[u] = make_uint2(0, 0);
      if (u % kCPG == 0) b.sc[u / kCPG] = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int mb = 0; mb < MB; ++mb) b.x[u][mb][0] = b.x[u][mb][1] = make_uint2(0, 0);
      continue;
    }
    b.w[u] = __ldg(p.w + c * 32);
    if (u % kCPG == 0) b.sc[u / kCPG] = load_scales<kS16>(p.sc, (c / kCPG) * 8);
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
      b.x[u][mb][0] = b.x[u][mb][1] = make_uint2(0, 0);
      if (p.x[mb] != nullptr) {
        b.x[u][mb][0] = __ldg(reinterpret_cast<const uint2*>(p.x[mb] + c * kChunkK));
        b.x[u][mb][1] = __ldg(reinterpret_cast<const uint2*>(p.x[mb] + c * kChunkK + 16));
      }
    }
  }
}

template <typename T, int MB, bool kFull, int kCPG>
__device__ __forceinline__ void mma_block(const Block<MB, kCPG>& b, int kb, int nchunks, float (&out)[MB][4]) {
  const uint32_t ones[4] = {Magic<T>::kOne, Magic<T>::kOne, Magic<T>::kOne, Magic<T>::kOne};
  float acc[MB][4], sx[MB][4];  // sum x q and sum x over the current group
#pragma unroll
  for (int u = 0; u < kBlockChunks; ++u) {
    if (!kFull && kb * kBlockChunks + u >= nchunks) break;  // (at a group boundary: K % G == 0)
    if (u % kCPG == 0) {
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mb][e] = sx[mb][e] = 0.0f;
    }
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const uint32_t word = s == 0 ? b.w[u].x : b.w[u].y;
      const uint32_t q[4] = {nibbles_to_pair<T>(word), nibbles_to_pair<T>(word >> 4), nibbles_to_pair<T>(word >> 8),
                             nibbles_to_pair<T>(word >> 12)};
#pragma unroll
      for (int mb = 0; mb < MB; ++mb) {
        mma16<T>(acc[mb], q, b.x[u][mb][s].x, b.x[u][mb][s].y);
        mma16<T>(sx[mb], ones, b.x[u][mb][s].x, b.x[u][mb][s].y);
      }
    }
    if (u % kCPG != kCPG - 1) continue;  // the group goes on in the next chunk
    // End of a group. d0, d1: row g (s_g, o_g); d2, d3: row g + 8 (s_g8, o_g8).
    const float4 sc = b.sc[u / kCPG];
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
      out[mb][0] = fmaf(sc.x, acc[mb][0], fmaf(sc.y, sx[mb][0], out[mb][0]));
      out[mb][1] = fmaf(sc.x, acc[mb][1], fmaf(sc.y, sx[mb][1], out[mb][1]));
      out[mb][2] = fmaf(sc.z, acc[mb][2], fmaf(sc.w, sx[mb][2], out[mb][2]));
      out[mb][3] = fmaf(sc.z, acc[mb][3], fmaf(sc.w, sx[mb][3], out[mb][3]));
    }
  }
}

// Blocks kb and kb + kWarps (when second): both loaded before either is computed (bytes in flight).
template <typename T, int MB, bool kS16, bool kFull, int kCPG>
__device__ __forceinline__ void run_blocks(const LanePtrs<T, MB>& p, int kb, bool second, int nchunks,
                                           float (&out)[MB][4]) {
  Block<MB, kCPG> b0, b1;
  load_block<T, MB, kS16, kFull, kCPG>(p, kb, nchunks, b0);
  if (second) load_block<T, MB, kS16, kFull, kCPG>(p, kb + kWarps, nchunks, b1);
  mma_block<T, MB, kFull, kCPG>(b0, kb, nchunks, out);
  if (second) mma_block<T, MB, kFull, kCPG>(b1, kb + kWarps, nchunks, out);
}

// Grid (ceil(N / kCols), splits), kWarps * 32 threads. MB = 1 for M <= 8, 2 for M <= 16; kCPG = G / 32.
template <typename T, int MB, bool kS16, int kCPG>
__global__ void __launch_bounds__(kWarps * 32) packed_kernel(Args<T> a) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int tile = blockIdx.x;
  const int nchunks = a.K / kChunkK;
  const int blocks = (nchunks + kBlockChunks - 1) / kBlockChunks;
  const int kb0 = blockIdx.y * a.split_blocks;
  const int kb1 = min(blocks, kb0 + a.split_blocks);

  float out[MB][4];
#pragma unroll
  for (int mb = 0; mb < MB; ++mb)
#pragma unroll
    for (int e = 0; e < 4; ++e) out[mb][e] = 0.0f;

  LanePtrs<T, MB> p;
  p.w = a.qp + int64_t(tile) * nchunks * 32 + lane;
  p.sc = static_cast<const char*>(a.sp) + (int64_t(tile) * a.ngroups * 8 + g) * (kS16 ? 8 : 16);
#pragma unroll
  for (int mb = 0; mb < MB; ++mb) p.x[mb] = g + 8 * mb < a.M ? a.x + int64_t(g + 8 * mb) * a.ldx + 4 * t : nullptr;

  // Two blocks per iteration; only the last block of the K range can be partial (K % 128 != 0).
  for (int kb = kb0 + warp; kb < kb1; kb += 2 * kWarps) {
    const bool second = kb + kWarps < kb1;
    const int last = second ? kb + kWarps : kb;
    if ((last + 1) * kBlockChunks <= nchunks) run_blocks<T, MB, kS16, true, kCPG>(p, kb, second, nchunks, out);
    else run_blocks<T, MB, kS16, false, kCPG>(p, kb, second, nchunks, out);
  }

  __shared__ float red[kWarps][kCols][8 * MB];
  swapab_store<T, kWarps, MB>(red, out, tile * kCols, a.M, a.N, nullptr, a.bias, a.out, a.ldo);
}

// ------------------------------------------------------------------ packing (once per weight)

// qp (layout above) from the canonical qweight uint8 [N, K / 2]; one thread per uint2.
__global__ void __launch_bounds__(256) pack_weights_kernel(const uint8_t* __restrict__ qw, int N, int K,
                                                           uint2* __restrict__ qp) {
  const int nchunks = K / kChunkK;
  const int64_t total = int64_t((N + kCols - 1) / kCols) * nchunks * 32;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int lane = int(i % 32), c = int((i / 32) % nchunks);
  const int tile = int(i / 32 / nchunks);
  const int g = lane / 4, t = lane % 4;
  const int na = tile * kCols + g, nb = na + 8;
  uint32_t words[2];
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    const int k0 = c * kChunkK + 16 * s + 4 * t;  // nibbles k0 .. k0 + 3 = bytes k0 / 2, k0 / 2 + 1 of a row
    uint32_t ra = 0, rb = 0;                       // 16 bits: nibble j = q[row, k0 + j]
    if (na < N) ra = qw[int64_t(na) * (K / 2) + k0 / 2] | (uint32_t(qw[int64_t(na) * (K / 2) + k0 / 2 + 1]) << 8);
    if (nb < N) rb = qw[int64_t(nb) * (K / 2) + k0 / 2] | (uint32_t(qw[int64_t(nb) * (K / 2) + k0 / 2 + 1]) << 8);
    const auto nib = [](uint32_t r, int j) { return (r >> (4 * j)) & 0xFu; };
    words[s] = nib(ra, 0) | (nib(rb, 0) << 4) | (nib(ra, 2) << 8) | (nib(rb, 2) << 12) |  // e = 0
               (nib(ra, 1) << 16) | (nib(rb, 1) << 20) | (nib(ra, 3) << 24) | (nib(rb, 3) << 28);  // e = 1
  }
  qp[i] = make_uint2(words[0], words[1]);
}

// sp (layout above) from the canonical scales / offsets fp32 [N, ngroups]; one thread per (tile, group, g).
// scale16: stored as fp16 (the caller has checked that every value is one, so this is exact).
__global__ void __launch_bounds__(256) pack_scales_kernel(const float* __restrict__ scales,
                                                          const float* __restrict__ offsets, int N, int ngroups,
                                                          bool scale16, void* __restrict__ sp) {
  const int64_t total = int64_t((N + kCols - 1) / kCols) * ngroups * 8;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int g = int(i % 8), grp = int((i / 8) % ngroups);
  const int tile = int(i / 8 / ngroups);
  const int na = tile * kCols + g, nb = na + 8;
  float v[4] = {0.f, 0.f, 0.f, 0.f};
  if (na < N) v[0] = scales[int64_t(na) * ngroups + grp], v[1] = offsets[int64_t(na) * ngroups + grp];
  if (nb < N) v[2] = scales[int64_t(nb) * ngroups + grp], v[3] = offsets[int64_t(nb) * ngroups + grp];
  if (scale16) {
    const __half2 a = __floats2half2_rn(v[0], v[1]), b = __floats2half2_rn(v[2], v[3]);
    static_cast<uint2*>(sp)[i] = make_uint2(*reinterpret_cast<const uint32_t*>(&a), *reinterpret_cast<const uint32_t*>(&b));
  } else {
    static_cast<float4*>(sp)[i] = make_float4(v[0], v[1], v[2], v[3]);
  }
}

// out[N, K] (T, row-major) = q * scale + offset (fp32, rounded once: int4_linear::dequant_kernel's values) from
// the packed weight and scales: the large-M route of a packed Int4Linear, which multiplies the result with
// cuBLAS through torch (the module no longer holds the canonical weight). One thread per (tile, chunk, lane):
// its 8 bytes hold rows g and g + 8 at k0 .. k0 + 3, k0 = 32 c + 16 s + 4 t, for s = 0, 1; four consecutive k
// share a group (G >= 32) and are stored as one 8-byte word.
template <typename T>
__global__ void __launch_bounds__(256) dequant_packed_kernel(const uint2* __restrict__ qp, const void* __restrict__ sp,
                                                             bool scale16, int N, int K, int ngroups, int group,
                                                             T* __restrict__ out) {
  const int chunks = K / kChunkK;
  const int64_t total = int64_t((N + kCols - 1) / kCols) * chunks * 32;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int lane = int(i % 32), c = int((i / 32) % chunks);
  const int64_t tile = i / 32 / chunks;
  const int g = lane / 4, t = lane % 4;
  const uint2 w = __ldg(qp + i);
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    const uint32_t word = s == 0 ? w.x : w.y;
    const int k0 = kChunkK * c + 16 * s + 4 * t;
    const int64_t si = (tile * ngroups + k0 / group) * 8 + g;  // pack_scales_kernel's index
    float sc[2], of[2];  // rows g, g + 8
    if (scale16) {
      const uint2 h = __ldg(static_cast<const uint2*>(sp) + si);
      const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&h.x));
      const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&h.y));
      sc[0] = a.x, of[0] = a.y, sc[1] = b.x, of[1] = b.y;
    } else {
      const float4 f = __ldg(static_cast<const float4*>(sp) + si);
      sc[0] = f.x, of[0] = f.y, sc[1] = f.z, of[1] = f.w;
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // row g + 8 h: nibbles r = h (k0, k0 + 1) and r = h + 2 (k0 + 2, k0 + 3)
      const int64_t n = tile * kCols + g + 8 * h;
      if (n >= N) continue;
      T v[4];
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const int r = h + 2 * (kk >> 1), e = kk & 1;
        const float q = float((word >> (4 * r + 16 * e)) & 0xFu);
        v[kk] = from_f32<T>(__fadd_rn(__fmul_rn(q, sc[h]), of[h]));
      }
      uint2 packed;
      memcpy(&packed, v, 8);
      *reinterpret_cast<uint2*>(out + n * K + k0) = packed;  // (8-byte aligned: K % 32 == 0, k0 % 4 == 0)
    }
  }
}

}  // namespace int4_packed
}  // namespace cuda
}  // namespace llmkern
