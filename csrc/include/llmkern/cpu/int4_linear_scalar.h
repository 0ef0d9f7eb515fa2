// int4_linear, portable C++ (no ISA extension): the "scalar" ISA, and the pieces the AVX2 path
// shares (x rows to fp32, the fp32 weight-panel unpack, strip scales/offsets, row stores).
#pragma once

#include <cstdint>

#include "llmkern/cpu/int4_linear_common.h"

namespace llmkern {
namespace cpu {
namespace int4_scalar {

// x row [K] (dtype dt) -> out [K] fp32.
inline void row_to_f32(const void* x, DType dt, int64_t K, float* out) {
  for (int64_t k = 0; k < K; ++k) out[k] = load_as_f32(x, k, dt);
}

// out[n] = v[n] + bias[n] in dt, n < cols.
inline void store_row(const float* v, const float* bias, void* out, DType dt, int64_t cols) {
  for (int64_t n = 0; n < cols; ++n) store_from_f32(out, n, dt, bias ? v[n] + bias[n] : v[n]);
}

// ------------------------------------------------------------------------------------ decode
// Rows in natural order (permute_row_f32 with one lane), zero padded to a multiple of 128.
inline bool dec_prep(const void* x, DType dt, int64_t K, int64_t G, void* xp, float* xs, bool /*scale*/) {
  permute_row_f32(x, dt, K, 1, static_cast<float*>(xp));
  group_sums(x, dt, K, G, xs);
  return false;
}

// E: weights in the canonical arrays (0) or the packed layout with E-byte scales (2, 4): the same
// arithmetic on the same values either way.
template <int MB, int NB, int E = 0>
void dec_tile(const DecodeTile& t) {
  const int64_t G = t.group;
  const void* offs = offsets_ptr<E>(t);
  for (int i = 0; i < MB; ++i) {
    const float* x = static_cast<const float*>(t.x[i]);
    for (int j = 0; j < NB; ++j) {
      float total = 0.0f;
      for (int64_t g = 0; g < t.ngroups; ++g) {
        const int64_t byte0 = g * G / 2;
        const StepPtrs sp = step_ptrs<E>(t, byte0);  // byte0: a multiple of 16
        const uint8_t* w = sp.q + j * sp.qstride;      // the group's first byte
        float d = 0.0f;  // D(m, n, g)
        for (int64_t k = g * G; k < (g + 1) * G; ++k) d += x[k] * static_cast<float>(nibble(w, k - g * G));
        total += group_value<E>(sp.s, j * sp.sstride) * d + group_value<E>(offs, j * t.ngroups + g) * t.xs[i][g];
      }
      t.res[i * t.res_stride + j] = total;
    }
  }
}

// ----------------------------------------------------------------------------------- prefill

// Panel of fp32 q values: w[k * NS + n] = q[n0 + n, k0 + k] for n < ncols, 0 for ncols <= n < NS.
// Weight rows start at qw (row n0) with `row_bytes` bytes each; k0 is even.
inline void unpack_panel_f32(const uint8_t* qw, int64_t row_bytes, int64_t ncols, int64_t NS, int64_t k0, int64_t kc,
                             float* w) {
  for (int64_t n = 0; n < NS; ++n) {
    if (n >= ncols) {
      for (int64_t k = 0; k < kc; ++k) w[k * NS + n] = 0.0f;
      continue;
    }
    const uint8_t* row = qw + n * row_bytes + k0 / 2;
    for (int64_t b = 0; b < kc / 2; ++b) {  // one byte: two consecutive k
      w[(2 * b) * NS + n] = static_cast<float>(row[b] & 15);
      w[(2 * b + 1) * NS + n] = static_cast<float>(row[b] >> 4);
    }
  }
}

// dst[g * NS + n] = src[n * ngroups + g] for all groups of rows [0, ncols) (src at row n0), 0 for
// ncols <= n < NS. Reads the rows' contiguous block in order.
inline void strip_groups(const float* src, int64_t ngroups, int64_t ncols, int64_t NS, float* dst) {
  for (int64_t n = 0; n < NS; ++n) {
    const float* row = src + n * ngroups;
    if (n < ncols)
      for (int64_t g = 0; g < ngroups; ++g) dst[g * NS + n] = row[g];
    else
      for (int64_t g = 0; g < ngroups; ++g) dst[g * NS + n] = 0.0f;
  }
}

constexpr int64_t kNS = 16, kKC = 128, kMR = 4;

template <int MR>
void micro(const Panel& p, const Micro& m) {
  const float* w = static_cast<const float*>(p.w);
  const int64_t G = p.group, ng = p.kc / G;
  float acc[MR][kNS];
  for (int i = 0; i < MR; ++i)
    for (int64_t n = 0; n < kNS; ++n) acc[i][n] = m.first ? 0.0f : m.c[i * kNS + n];
  for (int64_t g = 0; g < ng; ++g) {
    float d[MR][kNS] = {};
    for (int64_t k = g * G; k < (g + 1) * G; ++k)
      for (int i = 0; i < MR; ++i) {
        const float xv = static_cast<const float*>(m.x[i])[k];
        for (int64_t n = 0; n < kNS; ++n) d[i][n] += xv * w[k * kNS + n];
      }
    for (int i = 0; i < MR; ++i)
      for (int64_t n = 0; n < kNS; ++n) acc[i][n] += p.ss[g * kNS + n] * d[i][n] + p.oo[g * kNS + n] * m.xs[i][g];
  }
  for (int i = 0; i < MR; ++i) {
    if (m.last) store_row(acc[i], m.bias, m.out[i], m.dt, m.ncols);
    else
      for (int64_t n = 0; n < kNS; ++n) m.c[i * kNS + n] = acc[i][n];
  }
}

}  // namespace int4_scalar
}  // namespace cpu
}  // namespace llmkern
