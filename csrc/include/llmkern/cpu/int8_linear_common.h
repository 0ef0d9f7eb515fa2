// Shared types of the int8_linear CPU kernels: call arguments, the micro-tile interface every ISA
// implements, the W8A8 activation quantization rule, the workspace layout.
//
// y[m, n] = sum_g S(m, n, g) * scale[n, g] (* row_scale[m] in W8A8) + bias[n]
//   W8A16: S = sum_{k in group g} x[m, k] * w[n, k]          (fp32 accumulation per group)
//   W8A8:  S = sum_{k in group g} q[m, k] * w[n, k]          (exact int32 per group)
//          q, row_scale = quantize_row(x[m, :]) (rule below)
// Every output (m, n) is computed by one thread in a fixed order, so results do not depend on the
// thread count, and bf16/fp16 outputs are the fp32 result rounded once (nearest even), except W8A16
// calls of 16+ bf16 rows on AVX-512 BF16 CPUs (int8_linear_bf16.h: a bf16 GEMM, within bf16 rounding).
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "llmkern/cpu/convert.h"

namespace llmkern {
namespace cpu {

struct Int8LinearArgs {
  const void* x = nullptr;  // [M, K] in x_dtype, row m at x + m * x_row_stride elements
  DType x_dtype = DType::kF32;
  int64_t x_row_stride = 0;
  int64_t M = 0, K = 0, N = 0;
  const int8_t* w = nullptr;      // [N, K] contiguous; null: released (W8A16 with `packed`, int8_linear_released)
  const float* scale = nullptr;   // [N, K / group]
  int64_t group = 0;              // divides K
  const float* bias = nullptr;    // [N] or null
  void* out = nullptr;            // [M, N] in x_dtype, row m at out + m * out_row_stride elements
  int64_t out_row_stride = 0;
  bool w8a8 = false;
  void* ws = nullptr;             // int8_linear_workspace_bytes(M, K, N, w8a8, num_threads) bytes
  int num_threads = 1;
  // Optional: the same weights in the packed decode layout (int8_linear_pack.h, packed with this
  // mode), read instead of w / scale by decode calls on AVX-512 and AVX2 (i8pk::use_packed); E = packed_e
  // bytes per scale.
  const uint8_t* packed = nullptr;
  int64_t packed_e = 0;
  // Optional: the same weights in the W8A8 GEMM layout (int8_linear_gemm.h), read instead of w /
  // scale by W8A8 calls of at least i8gm::kMinRows rows on AVX-512.
  const uint8_t* gemm = nullptr;
};

// Activation row m of the call (x's dtype, x_row_stride elements apart).
inline const void* x_row(const Int8LinearArgs& a, int64_t m) {
  return static_cast<const char*>(a.x) + m * a.x_row_stride * dtype_size(a.x_dtype);
}

// One micro-tile: MB rows of (converted) activations times NB consecutive weight rows.
//   x[i]   row i of the tile: const float* (W8A16, fp32) or const uint8_t*/int8_t* (W8A8, in the
//          ISA's encoding, see quantize_row); K elements, readable up to K (no padding assumed)
//   w      weight row n0: [NB, K] int8, row stride K
//   scale  scale row n0: [NB, ngroups], row stride ngroups
//   res    res[i * kResStride + j] = sum_g S(i, j, g) * scale[j, g], fp32 (row scale/bias not applied)
// MB <= 4 and NB <= kResStride = 8.
constexpr int kResStride = 8;
struct Tile {
  const void* x[4];
  const int8_t* w;
  const float* scale;
  int64_t K, group, ngroups;
  float* res;
};
using TileFn = void (*)(const Tile&);

// Fully unrolls the loops over a tile's rows/columns early enough that GCC keeps the accumulator
// arrays in registers (without it GCC 12 spills them to the stack on every step).
#define LLMKERN_UNROLL _Pragma("GCC unroll 8")

// W8A8 groups longer than this could overflow the exact int32 group sum (127 * 128 per product).
constexpr int64_t kMaxW8A8Group = int64_t(1) << 17;

// Activation quantization (llmkern/ops/quant.py, bit for bit as llmkern/reference/quant.py):
// amax = max|x| over the row in fp32, inv = 127 / amax, q = clamp(round_half_even(x * inv), -127, 127),
// row scale = amax / 127; amax == 0 gives scale 0 and q 0. The edges, as the reference has them:
// - 0 < amax < 127 / FLT_MAX: inv is inf, so x * inv is +-inf (q = +-127) and 0 * inf is NaN (q = 0):
//   q = 127 * sign(x) ("saturate");
// - a row with NaN or inf: its outputs are NaN (the reference's scale is NaN or inf times all-zero
//   group sums); here scale = NaN and q = 0.
struct RowQuant {
  float inv = 0.0f;
  float scale = 0.0f;     // amax / 127, NaN for a non-finite row
  bool zero = true;       // every q is 0 (amax == 0 or non-finite row)
  bool saturate = false;  // q = 127 * sign(x) (inv overflowed to inf)
};

inline RowQuant row_quant_params(float amax, bool nonfinite) {
  RowQuant r;
  if (nonfinite) {
    r.scale = NAN;
    return r;
  }
  if (amax == 0.0f) return r;
  r.zero = false;
  r.scale = amax / 127.0f;
  r.inv = 127.0f / amax;
  r.saturate = !(r.inv <= FLT_MAX);
  return r;
}

// round_half_even(v) clamped to [-127, 127] for |v| < 2^22 (always true here: |v| <= 127 * (1 + 2^-23)),
// via the 1.5 * 2^23 trick in the default rounding mode: the same result as nearbyint / cvtps2dq.
inline int quant_round(float v) {
  float r = (v + 12582912.0f) - 12582912.0f;
  r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
  return static_cast<int>(r);
}

// ------------------------------------------------------------------------------ workspace layout
// W8A8:  [M rows of kpad(K) quantized bytes][M float row scales], then (packed one-row calls) the
//        signed rows and their correction vectors, 2 kpad(K) bytes per row (up to 8 rows) at the
//        next kAlign boundary
// W8A16: [tile_rows(M, K) rows of kpad(K) floats] (activations converted to fp32, one M tile), or the
//        bf16 or fp32 GEMM routes' layouts below, whichever is largest
// plus kAlign bytes so the kernel can align the start.
constexpr int64_t kAlign = 64;

inline int64_t kpad(int64_t K) { return (K + 63) / 64 * 64; }

constexpr int64_t kMaxTileRows = 256;

// Rows of one M tile of `bytes_per_row` activation bytes: about `budget` bytes (so the tile stays in
// L2 next to the weight rows being reused), a multiple of 4 in [4, kMaxTileRows], at most M.
inline int64_t tile_rows(int64_t M, int64_t bytes_per_row, int64_t budget) {
  int64_t rows = budget / bytes_per_row / 4 * 4;
  rows = rows < 4 ? 4 : (rows > kMaxTileRows ? kMaxTileRows : rows);
  return M < rows ? M : rows;
}

// W8A16: fp32 activations, about 512 KiB per tile.
inline int64_t w8a16_tile_rows(int64_t M, int64_t K) { return tile_rows(M, kpad(K) * 4, int64_t(512) << 10); }

// W8A8: quantized bytes, about 256 KiB per tile.
inline int64_t w8a8_tile_rows(int64_t M, int64_t K) { return tile_rows(M, kpad(K), int64_t(256) << 10); }

// W8A16 bf16 GEMM route (int8_linear_bf16.h: bf16 x, AVX-512 BF16, M >= kBf16MinRows, K % 32 == 0):
// [chunk rows, a multiple of 16, of K bf16 x packed in pairs], then per thread a weight panel
// (kBf16KC / 2 x kBf16NS words) and a C tile (chunk rows x kBf16NS floats).
constexpr int64_t kBf16NS = 48, kBf16KC = 256, kBf16MinRows = 16;
constexpr int64_t kBf16PackBudget = int64_t(8) << 20;  // bytes of packed x per chunk of rows

inline int64_t bf16_chunk_rows(int64_t M, int64_t K) {
  int64_t r = kBf16PackBudget / (K * 2);
  r = (r > 512 ? 512 : r) / 16 * 16;
  r = r < 16 ? 16 : r;
  return M < r ? M : r;
}
inline int64_t bf16_align(int64_t v) { return (v + kAlign - 1) / kAlign * kAlign; }
inline int64_t bf16_chunk_padded(int64_t M, int64_t K) { return (bf16_chunk_rows(M, K) + 15) / 16 * 16; }
inline int64_t bf16_thread_bytes(int64_t M, int64_t K) {
  return bf16_align(kBf16KC / 2 * kBf16NS * 4) + bf16_align(bf16_chunk_padded(M, K) * kBf16NS * 4);
}
inline int64_t bf16_workspace_bytes(int64_t M, int64_t K, int num_threads) {
  if (M < kBf16MinRows || K % 32) return 0;
  return bf16_align(bf16_chunk_padded(M, K) * K * 2) + (num_threads < 1 ? 1 : num_threads) * bf16_thread_bytes(M, K) +
         kAlign;
}

// W8A16 fp32 GEMM route (int8_linear_f32.h: AVX-512 or AVX2, M >= kF32MinRows, K % 16 == 0): [chunk rows, a
// multiple of 16, of K floats] (x not fp32: the chunk's rows converted), then per thread the weight panels of a
// K span (kF32SpanBlocks slots of kF32KC x kF32NS floats, one K block each; AVX2's 2 kF32KC x 16 fit a slot) and
// a C tile (chunk rows x kF32NS floats).
constexpr int64_t kF32NS = 48, kF32KC = 128, kF32MinRows = 16;
// K blocks unpacked at once per strip (a "K span", 10 x 24 KiB: L2), as int4_linear's prefill does
// (int4_linear_common.h, kSpanBytes): each row block then runs through all of them with its x rows and C tile in
// L1, instead of all rows of x streaming from L2 once per K block. 1 gives back the K-block-at-a-time order.
constexpr int64_t kF32SpanBlocks = 10;
// Row blocks (micro-kernel calls of 8 rows; AVX2 6) that take each K block of a span in turn: 2 let a block's
// 24 KiB panel serve 16 rows from L1 (their x slices, 8 KiB, beside it) before the next block's comes from L2.
// Intel Xeon host, M = 512 and 128, alternated call by call: 2 were 1-10% faster than 1 in 19 of 20 cases; 4 helped
// at K = 576 but lost at K = 1536 and 4096 (docs/notes/cpu-intel-host.md, session 27). The same bits for any value.
constexpr int64_t kF32GroupBlocks = 2;
constexpr int64_t kF32ChunkBudget = int64_t(8) << 20;  // bytes of converted x per chunk of rows

inline int64_t f32_chunk_rows(int64_t M, int64_t K) {
  int64_t r = kF32ChunkBudget / (K * 4);
  r = (r > 512 ? 512 : r) / 16 * 16;
  r = r < 16 ? 16 : r;
  return M < r ? M : r;
}
inline int64_t f32_chunk_padded(int64_t M, int64_t K) { return (f32_chunk_rows(M, K) + 15) / 16 * 16; }
inline int64_t f32_thread_bytes(int64_t M, int64_t K) {
  return bf16_align(kF32SpanBlocks * kF32KC * kF32NS * 4) + bf16_align(f32_chunk_padded(M, K) * kF32NS * 4);
}
inline int64_t f32_workspace_bytes(int64_t M, int64_t K, int num_threads) {
  if (M < kF32MinRows || K % 16) return 0;
  return bf16_align(f32_chunk_padded(M, K) * K * 4) + (num_threads < 1 ? 1 : num_threads) * f32_thread_bytes(M, K) +
         kAlign;
}

// num_threads: the W8A16 GEMM routes take scratch per thread (sized whether or not they run).
inline int64_t int8_linear_workspace_bytes(int64_t M, int64_t K, int64_t /*N*/, bool w8a8, int num_threads = 1) {
  if (M <= 0 || K <= 0) return 0;
  if (w8a8) return M * kpad(K) + M * 4 + kAlign + (M < 8 ? M : 8) * 2 * kpad(K) + kAlign;
  // (the packed and stream decode routes convert up to 8 rows of 16-bit x to fp32 there)
  const int64_t tiles = std::max(w8a16_tile_rows(M, K), M < 8 ? M : int64_t(8)) * kpad(K) * 4 + kAlign;
  const int64_t gemm = bf16_workspace_bytes(M, K, num_threads);
  const int64_t f32 = f32_workspace_bytes(M, K, num_threads);
  return std::max(tiles, std::max(gemm, f32));
}

}  // namespace cpu
}  // namespace llmkern
