// rms_norm on the CPU, optionally fused with the residual add (llmkern/ops/rms_norm.py has the semantics).
//
// Per row of N: h = x + residual rounded once to x's dtype (an fp32 add of two values that fp32 holds
// exactly is correctly rounded, so rounding it to bf16/fp16 gives the reference's float64 -> dtype bits),
// y = h * (1 / sqrt(sum(h^2) / N + eps)) * weight in float64, rounded once to x's dtype. float64 costs
// nothing here (a decode row is 576 values) and keeps fp32 results within ~1 ulp of the float64
// reference, bf16 ones almost always bit-exact.
//
// Two passes over a row and no scratch buffer: pass 1 forms h (stored into the h output when there is a
// residual) and the sum of squares; pass 2 reads h back (exact: it is a value of x's dtype) for y. The
// work is memory bound, so the code is portable C++ without ISA variants; OpenMP splits the rows only
// when they carry enough bytes to pay for waking threads (a decode step's single row never does).
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "llmkern/cpu/convert.h"
#include "llmkern/cpu/rotary.h"  // round_to_dtype: double -> dtype as torch's .to() rounds

namespace llmkern {
namespace cpu {

struct RmsNormArgs {
  // Row m of x / residual starts at element m * stride (last dim contiguous).
  const void* x = nullptr;
  DType x_dtype = DType::kF32;
  int64_t x_stride = 0;
  const void* residual = nullptr;  // null: no residual (h = x, nothing stored to h)
  DType r_dtype = DType::kF32;
  int64_t r_stride = 0;
  const void* weight = nullptr;  // [N]
  DType w_dtype = DType::kF32;
  void* y = nullptr;  // [M, N] contiguous, x_dtype
  void* h = nullptr;  // [M, N] contiguous, x_dtype; used only with residual
  int64_t M = 0, N = 0;
  double eps = 0.0;
  int num_threads = 1;
};

inline void rms_norm_row(const RmsNormArgs& a, int64_t m) {
  const int64_t N = a.N;
  const DType dt = a.x_dtype;
  const void* hrow;  // h of this row in x's dtype, with its element offset
  int64_t hoff;
  // 4 partial sums: independent chains the compiler can overlap (order differs from the reference's
  // by float64 rounding only, ~1e-16 relative).
  double ss[4] = {0.0, 0.0, 0.0, 0.0};
  if (a.residual) {
    const int64_t xo = m * a.x_stride, ro = m * a.r_stride;
    hoff = m * N;
    for (int64_t n = 0; n < N; ++n) {
      const float s = load_as_f32(a.x, xo + n, dt) + load_as_f32(a.residual, ro + n, a.r_dtype);
      store_from_f32(a.h, hoff + n, dt, s);  // fp32 -> dtype rounds like the reference's double -> dtype
      const double hv = load_as_f32(a.h, hoff + n, dt);
      ss[n & 3] += hv * hv;  // exact square in double
    }
    hrow = a.h;
  } else {
    hoff = m * a.x_stride;
    for (int64_t n = 0; n < N; ++n) {
      const double hv = load_as_f32(a.x, hoff + n, dt);
      ss[n & 3] += hv * hv;
    }
    hrow = a.x;
  }
  const double inv = 1.0 / std::sqrt((ss[0] + ss[1] + ss[2] + ss[3]) / static_cast<double>(N) + a.eps);
  const int64_t yoff = m * N;
  for (int64_t n = 0; n < N; ++n) {
    const double v = static_cast<double>(load_as_f32(hrow, hoff + n, dt)) * inv *
                     static_cast<double>(load_as_f32(a.weight, n, a.w_dtype));  // the reference's order
    store_from_f32(a.y, yoff + n, dt, round_to_dtype(v, dt));
  }
}

inline void rms_norm(const RmsNormArgs& a) {
  if (a.M <= 0) return;
  // Bytes read and written per call; below ~64 KiB a thread team costs more than it saves.
  const int64_t bytes = a.M * a.N * dtype_size(a.x_dtype) * (a.residual ? 4 : 2);
  const int threads = bytes >= (int64_t(64) << 10) && a.M > 1 ? std::max(1, a.num_threads) : 1;
  if (threads == 1) {  // no OpenMP region at all: a decode step is one short row
    for (int64_t m = 0; m < a.M; ++m) rms_norm_row(a, m);
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t m = 0; m < a.M; ++m) rms_norm_row(a, m);
}

}  // namespace cpu
}  // namespace llmkern
