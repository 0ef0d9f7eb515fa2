// int8_linear's packed decode layout: its description, size and packing (the kernels that read it:
// int8_linear_pack_avx512.h and int8_linear_pack_avx2.h; the dispatch: int8_linear_pack.h).
//
// Layout (built once by int8_pack_decode, at prepare time; the canonical w [N, K] / scale [N, K/G]
// stay the state-dict form):
//   [64-byte header: magic, N, K, G, E, w8a8]
//   then ceil(N / 8) blocks of 8 weight rows (the last block padded with zero rows), each
//   for every step s of 64 values of k (nsteps = ceil(K / 64); the last step zero-padded):
//     W[8][64]  the 8 rows' weight bytes of the step: int8 (W8A16) or w + 128 as uint8 (W8A8)
//     S[8][e_s] the E-byte scales (E = 2: fp16, E = 4: fp32) of the e_s groups that END in this
//               step (e_s = floor(min(64 s + 64, K) / G) - floor(64 s / G)), row-major per row
//   so a block is 8 * (64 nsteps + E K/G) bytes and a thread's blocks are one sequential stream.
// E = 2 only when every scale is exactly an fp16 value (GGUF Q8_0); fp16 -> fp32 is exact.
// Packable groups: per channel (K/G = 1, any K), G = 16 or 32 (several groups per step), or a
// multiple of 64 (a group ends every G/64 steps).
//
// Each ISA's kernels give bit-identical results to its canonical tiles (int8_linear_avx512.h,
// int8_linear_avx2.h) for the same mode: the same fp32 operations in the same order, only the
// addresses differ (how W8A8's u8 weights keep that: in each kernel file).
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "llmkern/cpu/convert.h"
#include "llmkern/cpu/int8_linear_common.h"

namespace llmkern {
namespace cpu {
namespace i8pk {

constexpr int64_t kRows = 8;            // weight rows per block
constexpr int64_t kStep = 64;           // values of k per step
constexpr int64_t kHeader = 64;         // bytes before the first block
constexpr uint32_t kMagic = 0x38504b4c;  // "LKP8"

inline int64_t nsteps(int64_t K) { return (K + kStep - 1) / kStep; }
inline int64_t block_bytes(int64_t K, int64_t G, int64_t E) { return kRows * (kStep * nsteps(K) + E * (K / G)); }
inline int64_t packed_bytes(int64_t N, int64_t K, int64_t G, int64_t E) {
  return kHeader + (N + kRows - 1) / kRows * block_bytes(K, G, E);
}
// Whether the layout (and its kernels) take this group size.
inline bool group_ok(int64_t K, int64_t G) {
  return G >= 1 && K % G == 0 && (G == K || G == 16 || G == 32 || G % 64 == 0);
}
inline int64_t groups_ending(int64_t s, int64_t K, int64_t G) {
  return std::min((s + 1) * kStep, K) / G - (s * kStep) / G;
}

struct Header {
  uint32_t magic;
  uint32_t w8a8;
  int64_t N, K, G, E;
};

// Packs canonical weights (w [N, K] int8, scale [N, K/G] fp32) into packed_bytes(N, K, G, E) bytes at out.
inline void int8_pack_decode(const int8_t* w, const float* scale, int64_t N, int64_t K, int64_t G, int64_t E,
                             bool w8a8, uint8_t* out) {
  const int64_t ng = K / G, ns = nsteps(K);
  std::memset(out, 0, kHeader);
  const Header h{kMagic, w8a8 ? 1u : 0u, N, K, G, E};
  std::memcpy(out, &h, sizeof(h));
  const uint8_t pad = w8a8 ? 0x80 : 0x00;  // a zero weight in either encoding
  const int64_t nb = (N + kRows - 1) / kRows, bb = block_bytes(K, G, E);
  // Blocks in parallel (each is bb contiguous bytes): a model's prepare packs its lm_head here
  // (SmolLM2: 28 MB, 9 ms of the first prefill on one thread).
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t n0 = b * kRows;
    uint8_t* p = out + kHeader + b * bb;
    for (int64_t s = 0; s < ns; ++s) {
      const int64_t k0 = s * kStep, kn = std::min(kStep, K - k0);
      for (int64_t j = 0; j < kRows; ++j, p += kStep) {
        std::memset(p, pad, kStep);
        if (n0 + j >= N) continue;
        const int8_t* src = w + (n0 + j) * K + k0;
        for (int64_t k = 0; k < kn; ++k) p[k] = static_cast<uint8_t>(src[k]) ^ pad;
      }
      const int64_t e = groups_ending(s, K, G), g0 = k0 / G;
      for (int64_t j = 0; j < kRows; ++j)
        for (int64_t g = 0; g < e; ++g, p += E) {
          const float v = n0 + j < N ? scale[(n0 + j) * ng + g0 + g] : 0.0f;
          if (E == 2) {
            const uint16_t hv = f32_to_f16(v);
            std::memcpy(p, &hv, 2);
          } else {
            std::memcpy(p, &v, 4);
          }
        }
    }
  }
}

// Byte offset of step s (s < nsteps(K)) in a block: the steps before it, each 8 rows x 64 weight bytes and the
// scales of the groups ending in it (floor(64 s / G) groups end before step s).
inline int64_t step_offset(int64_t s, int64_t K, int64_t G, int64_t E) {
  return kRows * (kStep * s + E * (std::min(s * kStep, K) / G));
}

// Row n's weight bytes from k (0 <= k < K) to the end of k's step, in the packed layout at p (its header
// first): int8 values as stored (W8A16 packs them unchanged; W8A8 stores w + 128).
inline const int8_t* row_ptr(const uint8_t* p, int64_t K, int64_t G, int64_t E, int64_t n, int64_t k) {
  return reinterpret_cast<const int8_t*>(p + kHeader + (n / kRows) * block_bytes(K, G, E) +
                                         step_offset(k / kStep, K, G, E) + (n % kRows) * kStep + k % kStep);
}

// The canonical weights w [N, K] (int8) the packed layout at p was packed from (int8_pack_decode), bit for bit
// (W8A8's stored w + 128 back to w). The scales are not rebuilt: a released module keeps them.
inline void unpack_weights(const uint8_t* p, int64_t N, int64_t K, int64_t G, int64_t E, bool w8a8, int8_t* w) {
  const uint8_t pad = w8a8 ? 0x80 : 0x00;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k0 = 0; k0 < K; k0 += kStep) {
      const uint8_t* src = reinterpret_cast<const uint8_t*>(row_ptr(p, K, G, E, n, k0));
      const int64_t kn = std::min(kStep, K - k0);
      for (int64_t k = 0; k < kn; ++k) w[n * K + k0 + k] = static_cast<int8_t>(src[k] ^ pad);
    }
}

// Rows ids[i] (0 <= ids[i] < N) of the canonical weights, from the packed layout at p: out int8 [n, K] (the eager
// lookup of an embedding tied to a released lm_head).
inline void gather_rows(const uint8_t* p, int64_t K, int64_t G, int64_t E, bool w8a8, const int64_t* ids, int64_t n,
                        int8_t* out) {
  const uint8_t pad = w8a8 ? 0x80 : 0x00;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k0 = 0; k0 < K; k0 += kStep) {
      const uint8_t* src = reinterpret_cast<const uint8_t*>(row_ptr(p, K, G, E, ids[i], k0));
      const int64_t kn = std::min(kStep, K - k0);
      for (int64_t k = 0; k < kn; ++k) out[i * K + k0 + k] = static_cast<int8_t>(src[k] ^ pad);
    }
}

// The weight bytes of every row from one k (to the end of k's step: a k multiple of 16 has 16 bytes at least),
// in the canonical w or, where the weights were released (a.w null, W8A16), the packed layout: row(n) costs a
// multiply-add either way (the GEMM panels' unpackers read rows through it).
struct WeightColumn {
  const int8_t* base;
  int64_t row_stride, block_stride;  // canonical: K, 0; packed: kStep, block_bytes
  WeightColumn(const Int8LinearArgs& a, int64_t k) {
    if (a.w) {
      base = a.w + k;
      row_stride = a.K;
      block_stride = 0;
    } else {
      base = reinterpret_cast<const int8_t*>(a.packed + kHeader + step_offset(k / kStep, a.K, a.group, a.packed_e) +
                                             k % kStep);
      row_stride = kStep;
      block_stride = block_bytes(a.K, a.group, a.packed_e);
    }
  }
  const int8_t* row(int64_t n) const {
    return block_stride ? base + (n / kRows) * block_stride + (n % kRows) * row_stride : base + n * row_stride;
  }
  // The column dk values of k further, within the same 64-value step (no division: the unpackers step through
  // a step 8 to 32 values at a time and build a new column only where a step starts).
  void next(int64_t dk) { base += dk; }
};

// Calls of up to max_rows(mode, per channel) activation rows read the packed layout: every weight
// block is streamed once from DRAM and re-read from L1/L2 by the call's other rows. Measured (1
// thread, cold weights; docs/notes/cpu-int8pack.md) against the canonical M-row tiles: faster or
// equal for M <= 8 except W8A8 per channel, which the canonical tiles (one vpdpbusd per weight
// vector shared by 4 rows) match at M = 4 and beat at M = 8 (4096x4096: 0.8x).
constexpr int64_t kMaxRows = 8;
inline int64_t max_rows(bool w8a8, bool per_channel) { return w8a8 && per_channel ? 4 : kMaxRows; }

#ifndef LLMKERN_I8PK_PREFETCH
#define LLMKERN_I8PK_PREFETCH 8192
#endif
constexpr int64_t kPrefetch = LLMKERN_I8PK_PREFETCH;  // bytes of the stream prefetched ahead of the read position

// ------------------------------------------------------------------ shared by the ISAs' kernels

// The kernels' group mode GM for this (K, G): 0 per channel, 16 / 32 / 64 (groups inside a step),
// 128 (a multiple of 64 above 64): calls f(std::integral_constant<int, GM>{}).
template <class F>
inline void with_group_mode(int64_t K, int64_t G, F&& f) {
  if (K / G == 1) f(std::integral_constant<int, 0>{});
  else if (G == 16) f(std::integral_constant<int, 16>{});
  else if (G == 32) f(std::integral_constant<int, 32>{});
  else if (G == 64) f(std::integral_constant<int, 64>{});
  else f(std::integral_constant<int, 128>{});
}

// Outputs [n0, n0 + nr) of activation row m from a block's res[j]: times the row scale (W8A8), plus
// bias, stored in x's dtype (the canonical driver's epilogue).
inline void store_block_row(const Int8LinearArgs& a, int64_t m, int64_t n0, int64_t nr, const float* res,
                            float row_scale) {
  for (int64_t j = 0; j < nr; ++j) {
    float v = res[j];
    if (a.w8a8) v *= row_scale;
    if (a.bias) v += a.bias[n0 + j];
    store_from_f32(a.out, m * a.out_row_stride + n0 + j, a.x_dtype, v);
  }
}

}  // namespace i8pk
}  // namespace cpu
}  // namespace llmkern
