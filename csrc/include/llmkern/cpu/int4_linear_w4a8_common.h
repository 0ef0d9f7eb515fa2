// W4A8 int4_linear on the CPU: shared pieces (arguments, the weight layout the kernels stream, the
// tile interface, the workspace, the portable tile and row preparation).
//
// Modes (llmkern/ops/int4_linear.py): the activations are quantized to int8 by int8_linear's W8A8
// rule (int8_linear_common.h: symmetric, amax / 127, round half to even), either per row ("w4a8",
// one scale per row) or per group of G values of a row ("w4a8g", the weights' groups: an outlier
// channel then costs only its own group's resolution), and the output is those dequantized
// activations times the dequantized int4 weights:
//   y[m, n] = sum_g sx[m, g] * ( scale[n, g] * D(m, n, g) + offset[n, g] * A(m, g) ) + bias[n]
//   D(m, n, g) = sum_{k in g} a[m, k] * q[n, k]   (a int8, q in 0..15: exact int32, |D| < 2^18)
//   A(m, g)    = sum_{k in g} a[m, k]             (exact int32)
//   sx[m, g]   = the scale of row m's group g (per row: the row's scale in every group)
// The integer dot products are what makes W4A8 fast: vpdpbusd multiplies 64 unsigned bytes (the
// weights' q, 0..15) by 64 signed bytes (the activations) and sums groups of 4 into 16 int32 lanes,
// 4x the multiply-adds of an fp32 FMA per instruction and no dequantization of the weights.
// Rounding: D and A are exact; per group t = offset * A, t = fma(D, scale, t), acc = fma(t, sx, acc)
// (fixed order: group by group), then one add of the bias. Every output is computed by one
// thread in that order, so results do not depend on the thread count, and every ISA (AVX-512 VNNI,
// AVX2, scalar) gives the same bits.
//
// W4A8 layout (int4_w4a8_pack, made once per weight by the cpu preparer; a prepared Int4Linear then holds it
// alone and rebuilds the canonical tensors from it on demand, int4_w4a8_unpack): output rows in blocks of 16 (the last block zero-padded); per block, per
// group g of G values of k:
//   G / 8 chunks of 64 bytes: chunk c holds, for row r of the block, the 4 bytes at 4 r: byte b has
//     q[k0 + 8c + b] in its low nibble and q[k0 + 8c + 4 + b] in its high nibble (k0 = g G);
//   then the 16 rows' scales, then their offsets, E bytes each (fp16 when every scale and offset of
//   the tensor is exactly an fp16 value, as GGUF Q4_0 / Q4_1 imports are, else fp32).
// So one 64-byte load gives 16 rows x 8 values of k; its low nibbles are the u8 operand of one
// vpdpbusd against the broadcast activations k0 + 8c .. + 3, its high nibbles of one against
// k0 + 8c + 4 .. + 7. A block is one contiguous stream of K / G (8 G + 32 E) bytes (every group a
// multiple of 64 bytes: loads stay aligned), read once per tile of rows.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "llmkern/cpu/convert.h"
#include "llmkern/cpu/int8_linear_common.h"
#include "llmkern/cpu/int8_linear_scalar.h"

namespace llmkern {
namespace cpu {

struct Int4W4A8Args {
  const void* x = nullptr;  // [M, K] in x_dtype, row m at x + m * x_row_stride elements
  DType x_dtype = DType::kF32;
  int64_t x_row_stride = 0;
  int64_t M = 0, K = 0, N = 0;
  const uint8_t* w = nullptr;  // the W4A8 layout of [N, K] int4 weights (int4_w4a8_pack)
  int64_t e = 4;               // bytes per scale / offset in it: 2 (fp16) or 4 (fp32)
  int64_t group = 32;          // 32, 64 or 128
  const float* bias = nullptr; // [N] or null
  void* out = nullptr;         // [M, N] in x_dtype, row m at out + m * out_row_stride elements
  int64_t out_row_stride = 0;
  void* ws = nullptr;          // int4_w4a8_workspace_bytes(M, K, group, num_threads) bytes
  int num_threads = 1;
  bool group_scales = false;   // activation scales per group of `group` ("w4a8g"), else per row ("w4a8")
};

constexpr int64_t kW4A8Rows = 16;  // output rows per block (one zmm of int32 lanes)

inline int64_t w4a8_blocks(int64_t N) { return (N + kW4A8Rows - 1) / kW4A8Rows; }
inline int64_t w4a8_group_bytes(int64_t G, int64_t E) { return 8 * G + 2 * kW4A8Rows * E; }
inline int64_t w4a8_block_bytes(int64_t K, int64_t G, int64_t E) { return K / G * w4a8_group_bytes(G, E); }
inline int64_t w4a8_packed_bytes(int64_t N, int64_t K, int64_t G, int64_t E) {
  return w4a8_blocks(N) * w4a8_block_bytes(K, G, E);
}

inline void w4a8_put_scalar(uint8_t* p, int64_t E, float v) {
  if (E == 2) {
    const uint16_t h = f32_to_f16(v);  // exact: the caller checked every value is an fp16 value
    std::memcpy(p, &h, 2);
  } else {
    std::memcpy(p, &v, 4);
  }
}

// The 4 layout bytes of one row and chunk from the 4 canonical bytes w of k = k8 .. k8 + 7 (k8 a multiple
// of 8; byte i of w holds q[k8 + 2i] low, q[k8 + 2i + 1] high): layout byte b = q[k8 + b] | q[k8 + 4 + b] << 4.
// With a = the low nibbles of w's bytes (q[k8], q[k8+2], q[k8+4], q[k8+6]) and h = the high ones
// (q[k8+1], q[k8+3], ...), a | a >> 12 puts a0 | a2 << 4 (b = 0) and a1 | a3 << 4 (b = 2) in its two low
// bytes, h | h >> 12 the same for b = 1 and b = 3.
inline uint32_t w4a8_chunk_word(uint32_t w) {
  const uint32_t a = w & 0x0F0F0F0Fu, h = (w >> 4) & 0x0F0F0F0Fu;
  const uint32_t lo = (a | (a >> 12)) & 0xFFFFu, hi = (h | (h >> 12)) & 0xFFFFu;
  return (lo & 0xFFu) | (hi & 0xFFu) << 8 | (lo >> 8) << 16 | (hi >> 8) << 24;
}

// Canonical qweight [N, K/2] (low nibble = even k), scales / offsets fp32 [N, K/G] -> the layout.
// Blocks are independent (each writes its own bytes): OpenMP over them. A word per (row, chunk) rather
// than a nibble at a time: SmolLM2's 120 fused linears pack in 23 ms, against 67 ms before.
inline void int4_w4a8_pack(const uint8_t* qweight, const float* scales, const float* offsets, int64_t N, int64_t K,
                           int64_t G, int64_t E, uint8_t* out) {
  const int64_t ng = K / G, gb = w4a8_group_bytes(G, E), bb = w4a8_block_bytes(K, G, E), nblk = w4a8_blocks(N);
#pragma omp parallel for schedule(static)
  for (int64_t blk = 0; blk < nblk; ++blk) {
    uint8_t* bp = out + blk * bb;
    std::memset(bp, 0, static_cast<size_t>(bb));  // rows past N stay zero
    for (int64_t r = 0; r < kW4A8Rows && blk * kW4A8Rows + r < N; ++r) {
      const int64_t n = blk * kW4A8Rows + r;
      const uint8_t* qrow = qweight + n * (K / 2);
      for (int64_t g = 0; g < ng; ++g) {
        uint8_t* gp = bp + g * gb;
        for (int64_t c = 0; c < G / 8; ++c) {
          uint32_t w;
          std::memcpy(&w, qrow + (g * G + 8 * c) / 2, 4);
          const uint32_t o = w4a8_chunk_word(w);
          std::memcpy(gp + c * 64 + 4 * r, &o, 4);
        }
        w4a8_put_scalar(gp + 8 * G + r * E, E, scales[n * ng + g]);
        w4a8_put_scalar(gp + 8 * G + (kW4A8Rows + r) * E, E, offsets[n * ng + g]);
      }
    }
  }
}

// ------------------------------------------------------------------------------ workspace layout
// Prepared rows: [M rows of w4a8_row_bytes(K) int8 activations][M rows of K/G float scales sx][M rows of
// K/G float group sums A], each part starting at a kAlign boundary. Decode calls (M <= kW4A8MaxMR rows,
// one tile) give every thread its own copy, which it prepares itself: no barrier between the row
// preparation and the tiles (one thread preparing a single row while the other waits cost ~2 us a
// call at 2 threads); larger M share one copy. Plus kAlign so the kernel can align the start.
// Rows are one cache line longer than kpad(K): with a power-of-two stride (K = 4096) the rows of a
// tile would all fall into the same L1 sets and evict each other.
inline int64_t w4a8_row_bytes(int64_t K) { return kpad(K) + 64; }
inline int64_t w4a8_q_bytes(int64_t M, int64_t K) { return M * w4a8_row_bytes(K); }
inline int64_t w4a8_sx_bytes(int64_t M, int64_t ng) { return (M * ng * 4 + kAlign - 1) / kAlign * kAlign; }
inline int64_t w4a8_rows_bytes(int64_t M, int64_t K, int64_t G) {  // one copy of the prepared rows
  return w4a8_q_bytes(M, K) + 2 * w4a8_sx_bytes(M, K / G);
}
constexpr int64_t kW4A8PrivateRows = 4;  // M up to this: per-thread prepared rows (= kW4A8MaxMR below)
inline int64_t int4_w4a8_workspace_bytes(int64_t M, int64_t K, int64_t G, int num_threads) {
  if (M <= 0 || K <= 0) return 0;
  const int64_t copies = M <= kW4A8PrivateRows ? (num_threads > 1 ? num_threads : 1) : 1;
  return copies * w4a8_rows_bytes(M, K, G) + kAlign;
}

// --------------------------------------------------------------------------------------- tiles
// One tile: MR activation rows times NR consecutive blocks (16 NR output rows), over all of K.
//   q[i]     row i's int8 activations [K]
//   asum[i]  row i's group sums A as float [K / G] (exact: |A| <= 127 G)
//   sx[i]    row i's activation scales [K / G] (the row's scale repeated, in per-row mode)
//   w        the first block; block j at w + j * block_bytes
//   res      res[i * res_stride + 16 j + r] = sum_g (scale D + offset A) of row i, block j, row r
constexpr int kW4A8MaxMR = 4;
static_assert(kW4A8PrivateRows == kW4A8MaxMR, "a decode call with private rows is one tile of rows");
struct W4A8Tile {
  const int8_t* q[kW4A8MaxMR];
  const float* asum[kW4A8MaxMR];
  const float* sx[kW4A8MaxMR];
  const uint8_t* w;
  int64_t block_bytes, ngroups, G;
  float* res;
  int64_t res_stride;
};
using W4A8TileFn = void (*)(const W4A8Tile&);

inline float w4a8_get_scalar(const uint8_t* p, int64_t E) {
  if (E == 2) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return f16_to_f32(h);
  }
  float v;
  std::memcpy(&v, p, 4);
  return v;
}

// The layout back to the canonical tensors it was packed from, bit for bit (what a module that released
// them rebuilds them from): layout byte b = q[k8 + b] | q[k8 + 4 + b] << 4 -> canonical byte i =
// q[k8 + 2i] | q[k8 + 2i + 1] << 4. qweight [N, K/2], scales / offsets fp32 [N, K/G], contiguous.
inline void int4_w4a8_unpack(const uint8_t* packed, int64_t N, int64_t K, int64_t G, int64_t E, uint8_t* qweight,
                             float* scales, float* offsets) {
  const int64_t ng = K / G, gb = w4a8_group_bytes(G, E), bb = w4a8_block_bytes(K, G, E), nblk = w4a8_blocks(N);
#pragma omp parallel for schedule(static)
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const uint8_t* bp = packed + blk * bb;
    for (int64_t r = 0; r < kW4A8Rows && blk * kW4A8Rows + r < N; ++r) {
      const int64_t n = blk * kW4A8Rows + r;
      uint8_t* qrow = qweight + n * (K / 2);
      for (int64_t g = 0; g < ng; ++g) {
        const uint8_t* gp = bp + g * gb;
        for (int64_t c = 0; c < G / 8; ++c) {
          uint8_t q[8];  // q[k8 + j], j = 0..7
          for (int b = 0; b < 4; ++b) {
            const uint8_t v = gp[c * 64 + 4 * r + b];
            q[b] = v & 15;
            q[4 + b] = v >> 4;
          }
          uint8_t* dst = qrow + (g * G + 8 * c) / 2;
          for (int i = 0; i < 4; ++i) dst[i] = static_cast<uint8_t>(q[2 * i] | q[2 * i + 1] << 4);
        }
        scales[n * ng + g] = w4a8_get_scalar(gp + 8 * G + r * E, E);
        offsets[n * ng + g] = w4a8_get_scalar(gp + 8 * G + (kW4A8Rows + r) * E, E);
      }
    }
  }
}

namespace w4a8_scalar {

// Any MR x NR (the table points every shape here); the same per-group fp32 order as the vector tiles:
// t = offset * A; t = fma(float(D), scale, t); acc = fma(t, sx, acc).
template <int E>
inline void tile_any(const W4A8Tile& t, int mr, int nr) {
  const int64_t G = t.G, gb = w4a8_group_bytes(G, E);
  for (int i = 0; i < mr; ++i) {
    for (int j = 0; j < nr; ++j) {
      const uint8_t* blk = t.w + j * t.block_bytes;
      for (int r = 0; r < kW4A8Rows; ++r) {
        float acc = 0.0f;
        for (int64_t g = 0; g < t.ngroups; ++g) {
          const uint8_t* gp = blk + g * gb;
          const int8_t* a = t.q[i] + g * G;
          int32_t d = 0;
          for (int64_t c = 0; c < G / 8; ++c) {
            for (int b = 0; b < 4; ++b) {
              const uint8_t byte = gp[c * 64 + 4 * r + b];
              d += (byte & 15) * a[8 * c + b] + (byte >> 4) * a[8 * c + 4 + b];
            }
          }
          const float s = w4a8_get_scalar(gp + 8 * G + r * E, E);
          const float o = w4a8_get_scalar(gp + 8 * G + (kW4A8Rows + r) * E, E);
          float v = o * t.asum[i][g];
          v = std::fma(static_cast<float>(d), s, v);
          acc = std::fma(v, t.sx[i][g], acc);
        }
        t.res[i * t.res_stride + j * kW4A8Rows + r] = acc;
      }
    }
  }
}

// Row quantization (int8_linear's rule, signed bytes: one scale per row, or per group of G when
// `per_group`), the scales sx [K / G] (a row's scale repeated) and the group sums.
inline void prep_row(const void* x, DType dt, int64_t K, int64_t G, bool per_group, int8_t* q, float* sx,
                     float* asum) {
  if (per_group) {
    for (int64_t g = 0; g < K / G; ++g)
      scalar::quantize_row(static_cast<const char*>(x) + g * G * dtype_size(dt), dt, G, q + g * G, sx + g);
  } else {
    scalar::quantize_row(x, dt, K, q, sx);  // offset 0: the bytes are the signed q
    for (int64_t g = 1; g < K / G; ++g) sx[g] = sx[0];
  }
  for (int64_t g = 0; g < K / G; ++g) {
    int32_t s = 0;
    for (int64_t k = 0; k < G; ++k) s += q[g * G + k];
    asum[g] = static_cast<float>(s);
  }
}

}  // namespace w4a8_scalar
}  // namespace cpu
}  // namespace llmkern
