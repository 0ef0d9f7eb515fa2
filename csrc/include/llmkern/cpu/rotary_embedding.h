// rotary_embedding on the CPU: rotate q and k by their positions into new contiguous tensors
// (llmkern/ops/rotary_embedding.py has the semantics).
//
// Per (token, head) row of D: the first R values are loaded to fp32, rotated by the helpers the fused
// rotary of kv_cache_append uses (llmkern/cpu/rotary.h: float64 math, bit-exact with the reference) and
// stored; dims R..D-1 are copied unchanged. Memory bound, but the portable row code (a dtype switch per
// element, one pair at a time in float64) costs more than the bytes: with the AVX-512 ISA rows are
// loaded, rotated and stored 16 / 8 values per step (rot512, rotate_row_avx512; the same bits). OpenMP
// splits the tokens only when they carry enough bytes to pay for the threads.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "llmkern/cpu/convert.h"
#include "llmkern/cpu/features.h"
#include "llmkern/cpu/rotary.h"

namespace llmkern {
namespace cpu {

constexpr int64_t kRotaryMaxR = 1024;  // the fp32 row buffer on the stack (head dims are <= 256 in practice)

struct RotaryArgs {
  // src element (t, h, d) at t * s_t + h * s_h + d; dst [T, H, D] contiguous; same dtype.
  const void* q = nullptr;
  void* q_out = nullptr;
  DType q_dtype = DType::kF32;
  int64_t q_st = 0, q_sh = 0, Hq = 0;
  const void* k = nullptr;
  void* k_out = nullptr;
  DType k_dtype = DType::kF32;
  int64_t k_st = 0, k_sh = 0, Hk = 0;
  int64_t T = 0, D = 0;
  const float* cos_sin = nullptr;  // [max_pos, R]: cos | sin
  int64_t R = 0;
  const int64_t* positions = nullptr;  // [T]
  bool interleaved = false;
  int num_threads = 1;
  Isa isa = Isa::kScalar;  // kAvx512Vnni: the vector row path; anything else: the portable one
};

// The H heads of token t of one tensor, rotated into dst.
inline void rotate_heads(const RotaryArgs& a, int64_t t, const void* src, void* dst, DType dt, int64_t st,
                         int64_t sh, int64_t H, const float* cs) {
  const int64_t esz = dtype_size(dt), D = a.D, R = a.R;
  float row[kRotaryMaxR];
  for (int64_t h = 0; h < H; ++h) {
    const int64_t in = t * st + h * sh, out = (t * H + h) * D;
    if (a.isa == Isa::kAvx512Vnni) {
      rot512::load_row(src, in, dt, row, R);
      rotate_row_avx512(row, cs, R, a.interleaved, dt);  // values now exact in dt: the store does not round
      rot512::store_row_f(row, dst, out, dt, R);
    } else {
      for (int64_t d = 0; d < R; ++d) row[d] = load_as_f32(src, in + d, dt);
      rotate_row(row, cs, R, a.interleaved, dt);  // values now exact in dt: the store below does not round
      for (int64_t d = 0; d < R; ++d) store_from_f32(dst, out + d, dt, row[d]);
    }
    if (D > R)  // pass-through dims: the same bits
      std::memcpy(static_cast<char*>(dst) + (out + R) * esz, static_cast<const char*>(src) + (in + R) * esz,
                  (D - R) * esz);
  }
}

inline void rotary_embedding(const RotaryArgs& a) {
  if (a.T <= 0) return;
  const int64_t bytes = 2 * a.T * (a.Hq * dtype_size(a.q_dtype) + a.Hk * dtype_size(a.k_dtype)) * a.D;
  const int threads = bytes >= (int64_t(64) << 10) && a.T > 1 ? std::max(1, a.num_threads) : 1;
  auto token = [&a](int64_t t) {
    const float* cs = a.cos_sin + a.positions[t] * a.R;
    rotate_heads(a, t, a.q, a.q_out, a.q_dtype, a.q_st, a.q_sh, a.Hq, cs);
    rotate_heads(a, t, a.k, a.k_out, a.k_dtype, a.k_st, a.k_sh, a.Hk, cs);
  };
  if (threads == 1) {
    for (int64_t t = 0; t < a.T; ++t) token(t);
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < a.T; ++t) token(t);
}

}  // namespace cpu
}  // namespace llmkern
