// Shared pieces of the int4_linear CPU kernels: call arguments, the interfaces every ISA implements
// (decode tiles, prefill panels and micro-kernels), the workspace layout, portable row preparation.
//
// Canonical weights (llmkern/ops/int4_linear.py): qweight [N, K/2] bytes, byte j of row n holds
// q[n, 2j] (low nibble) and q[n, 2j+1] (high nibble); scales, offsets [N, K/G] fp32;
// w[n, k] = q[n, k] * scale[n, g] + offset[n, g] with g = k / G.
//
// Decode paths and the portable prefill compute, per output (m, n), in fp32:
//   y[m, n] = sum_g ( scale[n, g] * D(m, n, g) + offset[n, g] * X(m, g) ) + bias[n]
//   D(m, n, g) = sum_{k in g} x[m, k] * q[n, k]     (q exact as a float; fp32 sums)
//   X(m, g)    = sum_{k in g} x[m, k]               (one sum per row and group, shared by all n)
// which is the dequantize-then-matmul definition regrouped: one multiply-add per weight, and
// the group's scale and offset applied once per group instead of once per weight. The products
// x * q are exact for bf16/fp16 x (8 or 11 significant bits times 4), so the only roundings are
// fp32 sums, as in a fp32 matmul. The AVX-512 and AVX2 prefill routes instead multiply x by the
// canonical w itself (fp32 panels, panel_gemm.h; bf16 x on AVX512-BF16: w rounded to bf16): a plain
// GEMM, as F.linear on those weights, without the per-group rescaling (which took 0.98-1.30x its time,
// docs/notes/cpu-int8-prefill.md). Each output is one thread's fixed-order sum: results do not
// depend on the thread count.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "llmkern/cpu/convert.h"
#include "llmkern/cpu/panel_gemm.h"

namespace llmkern {
namespace cpu {

struct Int4LinearArgs {
  const void* x = nullptr;  // [M, K] in x_dtype, row m at x + m * x_row_stride elements
  DType x_dtype = DType::kF32;
  int64_t x_row_stride = 0;
  int64_t M = 0, K = 0, N = 0;
  const uint8_t* qweight = nullptr;  // [N, K / 2] contiguous
  const float* scales = nullptr;     // [N, K / group] contiguous
  const float* offsets = nullptr;    // [N, K / group] contiguous
  int64_t group = 0;                 // 32, 64 or 128
  const float* bias = nullptr;       // [N] or null
  void* out = nullptr;               // [M, N] in x_dtype, row m at out + m * out_row_stride elements
  int64_t out_row_stride = 0;
  void* ws = nullptr;                // int4_linear_workspace_bytes(M, K, N, num_threads) bytes
  int num_threads = 1;
  int64_t decode_max_rows = -1;      // M <= this takes the decode path; < 0: the route's default
  bool bf16_dot = true;              // bf16 x may use AVX512-BF16 dot products (when the CPU has them)
  // Optional packed decode layout of the same weights (int4_pack_decode, packed_e-byte scales):
  // the decode path reads it instead of qweight / scales / offsets when M <= kPkMaxRows; otherwise
  // (and on the prefill path) those are read.
  const uint8_t* packed = nullptr;
  int64_t packed_e = 0;              // 2 (fp16) or 4 (fp32) when packed is set
  // Optional rows16 layout of the same weights (int4_linear_rows16.h, rows16_e-byte scales): on AVX-512,
  // decode calls (bf16 x with AVX-512 BF16 as it is, other x converted to fp32 rows) and the prefill's panels
  // (int4_linear_rows16_panel.h) read it instead. With rows16, qweight / scales / offsets may all be null
  // (a released Int4Linear): every call then reads rows16 (decode sizes on the rows16 decode, more rows on the prefill).
  const uint8_t* rows16 = nullptr;
  int64_t rows16_e = 0;
};

// M <= the decode limit: decode path (weights streamed once per tile of rows); above it, prefill
// path (weight panels unpacked once, reused by every row). Crossover measured on Zen 5 (4096 x 4096,
// cold weights): bf16 dot products (cheap nibble unpack) up to 16 rows, fp32 FMAs up to 8.
constexpr int64_t kDecodeMaxRowsBf16 = 16, kDecodeMaxRowsF32 = 8;
constexpr int64_t kDecodeMaxRows = kDecodeMaxRowsBf16;  // the larger: sizes the decode workspace

constexpr int64_t kAlign = 64;
inline int64_t align_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

// ------------------------------------------------------------------------------- decode path
// Decode rows are prepared once per call in an ISA-specific order (the order the ISA unpacks
// nibbles in), padded with zeros to a multiple of 128 elements, plus the group sums X padded with
// zeros to a multiple of 16 groups. A tile is MB rows x NB weight rows, dot products along K.
constexpr int kDecMaxMB = 4;
constexpr int kDecMaxNB = 8;

struct DecodeTile {
  const void* x[kDecMaxMB];    // prepared rows (ISA format)
  bool x_scaled = false;       // the rows are in the prep's scaled form (I4PrepFn; AVX2 only)
  const float* xs[kDecMaxMB];  // X(m, g) for g = 0.., padded with zeros to a multiple of 16
  const uint8_t* qw;           // weight row n0, row stride K / 2
  const float* scale;          // scale row n0, row stride ngroups
  const float* offset;         // offset row n0, row stride ngroups
  int64_t K, group, ngroups;
  float* res;  // res[i * res_stride + j] = y[m0 + i, n0 + j] without bias
  int64_t res_stride;
  // Software prefetch of the weights the thread reads next (the hardware prefetchers do not keep
  // up with many short row streams): pf_bytes bytes of packed weights at pf_qw and pf_gbytes bytes
  // of scales and of offsets at pf_scale / pf_offset, spread over the tile's steps.
  const uint8_t* pf_qw;
  const float* pf_scale;
  const float* pf_offset;
  int64_t pf_bytes, pf_gbytes;
  // Packed decode layout (see "packed decode layout" below); read by the tiles instantiated for it.
  const uint8_t* pk = nullptr;  // the row block holding the tile's rows
  int64_t pk_rows = 0;          // rows of that block (8, fewer in the last block)
  int64_t pk_row0 = 0;          // the tile's first row within the block
};

// Prefetches step b's share (of `steps`) of the tile's prefetch ranges into L1; the ISA kernels
// call it once per step of 64 weight bytes per row (NB rows -> NB lines of weights per step).
// always_inline: GCC 12 finds a function of only prefetches "pure" and deletes the calls.
inline __attribute__((always_inline)) void dec_prefetch(const DecodeTile& t, int64_t b, int64_t steps, int NB) {
  for (int j = 0; j < NB; ++j) {
    const int64_t off = (b * NB + j) * 64;
    if (off < t.pf_bytes) __builtin_prefetch(t.pf_qw + off, 0, 3);
  }
  const int64_t lines = (t.pf_gbytes + 63) / 64;
  for (int64_t l = b * lines / steps; l < (b + 1) * lines / steps; ++l) {
    __builtin_prefetch(reinterpret_cast<const char*>(t.pf_scale) + l * 64, 0, 3);
    __builtin_prefetch(reinterpret_cast<const char*>(t.pf_offset) + l * 64, 0, 3);
  }
}
using DecodeTileFn = void (*)(const DecodeTile&);

// ------------------------------------------------------------------ packed decode layout
// The canonical layout makes a decode tile of NB weight rows read 3 * NB streams (NB rows of
// qweight, K/2 bytes apart; NB rows of scales; NB rows of offsets). The packed layout
// (int4_pack_decode, made once per weight by the cpu preparer) puts everything a tile of up to 8
// rows reads into one contiguous, sequentially read block:
//   rows in blocks of kPkRows (the last block may have fewer: nr = min(8, N - n0) rows);
//   block of nr rows = for each span of kPkSpan values of k (256 bytes per row; the last span of a
//   row may be shorter, sb = min(256, K/2 - 256 s) bytes):
//       q bytes [nr][sb] (canonical nibble order), then the span's scales [nr][sb * 2 / G]
//     then the offsets of the block [nr][K / G];
//   scales and offsets stored as fp16 (E = 2) when every one of them is exactly an fp16 value
//   (GGUF Q4_0 / Q4_1 imports), else fp32 (E = 4): the kernels convert them back to the same fp32
//   values, so packed results are bit-identical to canonical ones.
// Bytes per row: K/2 + 2 (K/G) E; block n0 / 8 starts at byte n0 * that.
constexpr int64_t kPkRows = 8;
constexpr int64_t kPkSpan = 512;  // values of k per span: 256 bytes per row
constexpr int64_t kPkMaxRows = 1;  // decode calls of at most this many rows read the packed layout

inline int64_t pk_row_bytes(int64_t K, int64_t G, int64_t E) { return K / 2 + 2 * (K / G) * E; }
inline int64_t pk_total_bytes(int64_t N, int64_t K, int64_t G, int64_t E) { return N * pk_row_bytes(K, G, E); }

// Pointers of one decode step (bytes [byte0, byte0 + step) of each row, byte0 a multiple of the
// step, the step dividing 256) for the tile's row 0; row j at q + j * qstride, scales of the step's
// groups at s + j * sstride elements, offsets of all groups at o + j * ostride elements.
struct StepPtrs {
  const uint8_t* q;
  int64_t qstride;
  const void* s;
  int64_t sstride;
};

// E = 0: canonical arrays; E = 2 / 4: the packed layout with fp16 / fp32 scales and offsets.
template <int E>
inline __attribute__((always_inline)) StepPtrs step_ptrs(const DecodeTile& t, int64_t byte0) {
  const int gs = __builtin_ctzll(static_cast<uint64_t>(t.group));
  const int64_t rb = t.K / 2;
  if constexpr (E == 0) {
    return StepPtrs{t.qw + byte0, rb, t.scale + ((2 * byte0) >> gs), t.ngroups};
  } else {
    const int64_t span = byte0 >> 8, w = byte0 & 255;
    const int64_t sb = rb - 256 * span < 256 ? rb - 256 * span : 256;
    const int64_t nr = t.pk_rows, full = 256 + ((int64_t(512) >> gs) * E);  // bytes per row of a full span
    const uint8_t* base = t.pk + span * nr * full;
    const int64_t sgs = (2 * sb) >> gs;  // groups of this span
    return StepPtrs{base + t.pk_row0 * sb + w, sb,
                    base + nr * sb + (t.pk_row0 * sgs + ((2 * w) >> gs)) * E, sgs};
  }
}

// Offsets of the tile's row 0 (row j at + j * ngroups elements).
template <int E>
inline __attribute__((always_inline)) const void* offsets_ptr(const DecodeTile& t) {
  if constexpr (E == 0) return t.offset;
  else return t.pk + t.pk_rows * (t.K / 2 + t.ngroups * E) + t.pk_row0 * t.ngroups * E;
}

// Software prefetch of the packed stream: pf_bytes bytes at pf_qw spread over a tile's steps.
// Measured without it: 10x slower (the hardware prefetchers of the 2-vCPU EPYC VM do not follow the
// stream); a fixed distance of 1-4 KB instead of a block ahead was slower or no better.
inline __attribute__((always_inline)) void dec_prefetch_pk(const DecodeTile& t, int64_t b, int64_t steps) {
  const int64_t lines = (t.pf_bytes + 63) / 64;
  for (int64_t l = b * lines / steps; l < (b + 1) * lines / steps; ++l) __builtin_prefetch(t.pf_qw + l * 64, 0, 3);
}

template <int E>
inline __attribute__((always_inline)) void dec_prefetch_any(const DecodeTile& t, int64_t b, int64_t steps, int NB) {
  if constexpr (E == 0) dec_prefetch(t, b, steps, NB);
  else dec_prefetch_pk(t, b, steps);
}

// Element i of a packed fp16 / fp32 (or canonical fp32) scale or offset array.
template <int E>
inline float group_value(const void* p, int64_t i) {
  if constexpr (E == 2) return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  else return static_cast<const float*>(p)[i];
}

// Packs canonical weights (qweight [N, K/2], scales / offsets [N, K/G] fp32) into the packed
// decode layout with E-byte scales (E = 2 only when fits_f16 says so). out: pk_total_bytes bytes.
inline void int4_pack_decode(const uint8_t* qw, const float* scales, const float* offsets, int64_t N, int64_t K,
                             int64_t G, int64_t E, uint8_t* out) {
  const int64_t rb = K / 2, ng = K / G;
  auto put = [&](uint8_t* dst, float v) {
    if (E == 2) {
      const uint16_t h = f32_to_f16(v);
      std::memcpy(dst, &h, 2);
    } else {
      std::memcpy(dst, &v, 4);
    }
  };
  for (int64_t n0 = 0; n0 < N; n0 += kPkRows) {
    const int64_t nr = std::min(kPkRows, N - n0);
    uint8_t* p = out + n0 * pk_row_bytes(K, G, E);
    for (int64_t byte0 = 0; byte0 < rb; byte0 += 256) {
      const int64_t sb = std::min<int64_t>(256, rb - byte0), sgs = 2 * sb / G, g0 = 2 * byte0 / G;
      for (int64_t j = 0; j < nr; ++j, p += sb) std::memcpy(p, qw + (n0 + j) * rb + byte0, sb);
      for (int64_t j = 0; j < nr; ++j)
        for (int64_t g = 0; g < sgs; ++g, p += E) put(p, scales[(n0 + j) * ng + g0 + g]);
    }
    for (int64_t j = 0; j < nr; ++j)
      for (int64_t g = 0; g < ng; ++g, p += E) put(p, offsets[(n0 + j) * ng + g]);
  }
}

// Bytes of one prepared decode row (the largest of the ISA formats: fp32, padded to 128).
inline int64_t dec_row_bytes(int64_t K) { return align_up(K, 128) * 4; }
inline int64_t groups_padded(int64_t K) { return align_up(K / 32, 16); }  // >= K / G for G >= 32

// ------------------------------------------------------------------------------ prefill path
// A thread takes strips of NS consecutive weight rows (output columns). Per strip it transposes the
// scales and offsets to [g][NS] once (one contiguous read: the strip's rows are adjacent); per K
// block it unpacks a panel (NS x kc values) once, into fp32 weights [k][NS] (dequantized on
// AVX-512 / AVX2, q values in the portable route) or bf16 pairs [k/2][NS][2] of dequantized
// weights, a span of K blocks at a time (kSpanBytes), and runs each group of kGroupBlocks MR-row blocks of the
// current M chunk through the span's K blocks in order (micro-kernels of MR rows x NS columns). Partial sums live in
// a per-thread C tile [rows][NS] between K blocks; the last K block writes y.
constexpr int64_t kMaxNS = 48;    // panel width (columns) of any ISA
constexpr int64_t kMaxKC = 256;   // panel depth of any ISA
constexpr int64_t kMaxMR = 8;
constexpr int64_t kPanelBytes = kMaxKC * kMaxNS * 4;
// A thread's panels: a strip's K blocks are unpacked up to this many bytes at once (a "K span", 240 KiB: L2), then
// every row block runs through all of them, so its x rows and C tile stay in L1 across the span's K blocks
// instead of all rows of x streaming from L2 once per K block. On an Intel Xeon host (docs/notes/cpu-intel-host.md)
// an Int4Linear's fp32 prefill at M = 512 gained 1.01-1.08x (3072 x 576) and 1.11-1.24x (576 x 1536) against
// F.linear in the same runs; the same bits. 0 gives back the K-block-at-a-time order (one block a span), e.g. to
// A/B it on another host.
constexpr int64_t kSpanBytes = 5 * kPanelBytes;
constexpr int64_t kPanelRegion = kSpanBytes > kPanelBytes ? kSpanBytes : kPanelBytes;  // a thread's panel bytes
// Row blocks that take each K block of a span in turn (int8_linear_common.h, kF32GroupBlocks): 2 let a block's 24 KiB
// panel serve 16 rows from L1 before the next block's comes from L2. Intel Xeon host, fp32 x, M = 512 and 128,
// alternated call by call: 1-6% faster than 1 in 16 of 20 cases, 1-5% slower in 4 (the smallest calls); the same bits.
constexpr int64_t kGroupBlocks = 2;
// Scales or offsets of a whole strip (every group of K), transposed to [g][NS] once per strip.
inline int64_t strip_group_bytes(int64_t K) { return align_up(groups_padded(K) * kMaxNS * 4, kAlign); }
constexpr int64_t kChunkMaxRows = 512;  // rows of one M chunk when x is read in place
constexpr int64_t kConvBudget = int64_t(2) << 20;  // bytes of converted fp32 rows per chunk
constexpr int64_t kPackBudget = int64_t(8) << 20;  // bytes of packed bf16 rows per chunk

struct Panel {
  const void* w;      // fp32 [kc][NS] or bf16 pairs [kc/2][NS]
  const float* ss;    // [kc / G][NS] scales (0 past the last column)
  const float* oo;    // [kc / G][NS] offsets
  int64_t kc, group;  // values of k in the panel (multiple of G), group size
};

// How the prefill reads x: in place (fp32 rows), converted to fp32 rows per chunk (fp16 x, or bf16
// x without bf16 dot products), or packed per chunk for bf16 dot products: [row block of 8][k/2][8]
// 32-bit pairs, so that a micro-kernel reads its 8 rows' pairs as one contiguous stream instead of
// 8 short pieces 2K bytes apart (worth ~6% of a 2-thread bf16 GEMM, measured with x in L1).
enum class XMode { kInPlace, kConvert, kPack };

struct Micro {
  const void* x[kMaxMR];    // fp32 rows at the panel's first k; kPack: x[0] = the row block's
                            // packed pairs at the panel's first pair
  const float* xs[kMaxMR];  // X(m, g) at the panel's first group
  float* c;                 // C tile rows [MR][NS] (row stride NS)
  bool first, last;         // first K block: start from 0; last: write y instead of C
  void* out[kMaxMR];        // output row pointers at the panel's first column (last block only)
  DType dt;
  const float* bias;        // at the panel's first column, or null
  int64_t ncols;            // valid columns of the panel (<= NS)
};
using MicroFn = void (*)(const Panel&, const Micro&);

// The first MR rows of a micro-kernel call as panel_gemm.h's fp32 micro-kernels take them (x fp32).
template <int MR>
inline pgemm::Rows gemm_rows(const Micro& m) {
  pgemm::Rows r;
  for (int i = 0; i < MR; ++i) {
    r.x[i] = static_cast<const float*>(m.x[i]);
    r.out[i] = m.out[i];
  }
  r.c = m.c;
  r.first = m.first;
  r.last = m.last;
  r.bias = m.bias;
  r.dt = m.dt;
  r.ncols = m.ncols;
  return r;
}

// Rows of one M chunk: all rows (up to kChunkMaxRows) when x is read in place, fewer when rows
// are converted (kConvBudget bytes) or packed (kPackBudget) first; a multiple of 8.
inline int64_t chunk_rows(int64_t M, int64_t K, XMode mode) {
  int64_t r = mode == XMode::kConvert ? kConvBudget / (align_up(K, 16) * 4)
              : mode == XMode::kPack  ? kPackBudget / (K * 2)
                                      : kChunkMaxRows;
  r = std::max<int64_t>(8, std::min<int64_t>(kChunkMaxRows, r) / 8 * 8);
  return std::min(M, r);
}

// Bytes of the shared row buffer of a chunk: converted fp32 rows or packed bf16 pairs.
inline int64_t row_buffer_bytes(int64_t M, int64_t K) {
  const int64_t conv = chunk_rows(M, K, XMode::kConvert) * align_up(K, 16) * 4;
  const int64_t pack = align_up(chunk_rows(M, K, XMode::kPack), 8) * K * 2;
  return align_up(std::max(conv, pack), kAlign);
}

// ---------------------------------------------------------------------------- workspace
// [shared: converted or packed rows of a chunk][shared: X of a chunk][per thread: decode rows, their X,
// a result chunk | panel, strip scales, strip offsets, C tile], every region 64-byte aligned (no
// false sharing), plus kAlign so the kernel can align the start.
struct WsLayout {
  int64_t conv = 0, xs = 0, thread0 = 0, per_thread = 0, total = 0;
  int64_t chunk = 0;  // rows per M chunk (the largest of the conversion / in-place cases)
};

inline int64_t dec_thread_bytes(int64_t M, int64_t K) {
  return align_up(M * dec_row_bytes(K), kAlign) + align_up(M * groups_padded(K) * 4, kAlign) +
         align_up(M * 32 * 4, kAlign);
}

inline int64_t decode_limit(int64_t decode_max_rows) { return decode_max_rows < 0 ? kDecodeMaxRows : decode_max_rows; }

inline WsLayout int4_ws_layout(int64_t M, int64_t K, int64_t N, int num_threads, int64_t decode_max_rows) {
  (void)N;
  WsLayout L;
  if (M <= 0 || K <= 0) return L;
  const int64_t nt = std::max(1, num_threads);
  L.chunk = std::max({chunk_rows(M, K, XMode::kConvert), chunk_rows(M, K, XMode::kPack),
                      chunk_rows(M, K, XMode::kInPlace)});
  L.conv = 0;  // first region
  L.xs = row_buffer_bytes(M, K);
  L.thread0 = L.xs + align_up(L.chunk * groups_padded(K) * 4, kAlign);
  int64_t per = kPanelRegion + 2 * strip_group_bytes(K) + align_up(L.chunk * kMaxNS * 4, kAlign);
  if (M <= decode_limit(decode_max_rows)) per = std::max(per, dec_thread_bytes(M, K));
  L.per_thread = align_up(per, kAlign);
  L.total = L.thread0 + nt * L.per_thread + kAlign;
  return L;
}

inline int64_t int4_linear_workspace_bytes(int64_t M, int64_t K, int64_t N, int num_threads,
                                           int64_t decode_max_rows = -1) {
  return int4_ws_layout(M, K, N, num_threads, decode_max_rows).total;
}

// ------------------------------------------------------------------------ portable helpers

// X(g) for the groups of one row (fp32 sums in k order), zeros up to groups_padded(K).
inline void group_sums(const void* x, DType dt, int64_t K, int64_t G, float* xs) {
  const int64_t ng = K / G;
  for (int64_t g = 0; g < ng; ++g) {
    float s = 0.0f;
    for (int64_t k = g * G; k < (g + 1) * G; ++k) s += load_as_f32(x, k, dt);
    xs[g] = s;
  }
  for (int64_t g = ng; g < groups_padded(K); ++g) xs[g] = 0.0f;
}

// q[n, k] of the canonical layout.
inline int nibble(const uint8_t* row, int64_t k) { return (row[k >> 1] >> ((k & 1) * 4)) & 15; }

// Decode row for an ISA of L lanes: blocks of 8L values of k; within a block, value t of lane j
// (the t-th nibble of the lane's 32-bit word, t = 0..7) is k = 8j + t, stored at L * t + j.
// L = 1 is the natural order. Zeros past K up to a multiple of 128.
inline void permute_row_f32(const void* x, DType dt, int64_t K, int L, float* xp) {
  const int64_t block = 8 * L, Kp = align_up(K, 128);
  for (int64_t b = 0; b < Kp; b += block)
    for (int t = 0; t < 8; ++t)
      for (int j = 0; j < L; ++j) {
        const int64_t k = b + 8 * j + t;
        xp[b + L * t + j] = k < K ? load_as_f32(x, k, dt) : 0.0f;
      }
}

}  // namespace cpu
}  // namespace llmkern
