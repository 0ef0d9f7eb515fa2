// int8_linear's packed decode layout: which calls read it, and the driver of those calls (the layout:
// int8_linear_pack_layout.h; the kernels: int8_linear_pack_avx512.h, int8_linear_pack_avx2.h).
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "llmkern/cpu/features.h"
#include "llmkern/cpu/int8_linear_common.h"
#include "llmkern/cpu/int8_linear_pack_avx2.h"
#include "llmkern/cpu/int8_linear_pack_avx512.h"
#include "llmkern/cpu/int8_linear_pack_layout.h"
#include "llmkern/cpu/int8_linear_scalar.h"
#include "llmkern/cpu/parallel.h"

namespace llmkern {
namespace cpu {
namespace i8pk {

// AVX2 W8A16 calls read the packed layout up to this many rows when the group is per channel or a
// multiple of 64 above 64: each row converts every weight again (vpmovsxbd + vcvtdq2ps, compute-bound
// from L1/L2), which the canonical tiles share among 2 rows. Cold, 2 threads, against the canonical
// tiles (docs/notes/cpu-avx2-int8pack.md): M = 4 1.0-1.9x, M = 8 0.84-1.22x. Groups of 16 / 32 / 64
// have a kernel converting each chunk once for up to 4 rows (k256::w8a16_rows_block): up to 8 rows
// (M = 8: 1.1-1.4x). W8A8 keeps max_rows (M = 8 grouped: 1.1-1.3x).
constexpr int64_t kAvx2W8A16MaxRows = 4;

// Whether a call of M rows reads the packed layout (AVX-512 and AVX2; see int8_linear.h).
inline bool use_packed(const Int8LinearArgs& a, Isa isa) {
  if (!a.packed || a.M < 1 || a.M > max_rows(a.w8a8, a.group == a.K)) return false;
  if (isa == Isa::kAvx2) {
    const bool rows_kernel = a.K / a.group > 1 && (a.group == 16 || a.group == 32 || a.group == 64);
    return a.w8a8 || a.M <= (rows_kernel ? kMaxRows : kAvx2W8A16MaxRows);
  }
  return isa == Isa::kAvx512Vnni && (a.w8a8 || a.M <= w8a16_tile_rows(a.M, a.K));
}

namespace detail {

// The blocks of the packed layout split over nt threads (contiguous ranges), run(b0, b1) each.
template <class F>
inline void over_blocks(const Int8LinearArgs& a, F&& run) {
  const int64_t nb = (a.N + kRows - 1) / kRows;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(a.num_threads, nb)));
#pragma omp parallel num_threads(nt)
  {
    int64_t b0, b1;
    split_range(nb, omp_get_num_threads(), omp_get_thread_num(), &b0, &b1);
    run(b0, b1);
  }
}

// W8A16 activation rows as fp32: x's own rows (fp32) or converted by `convert` into ws (kpad(K) floats each).
inline void f32_rows(const Int8LinearArgs& a, char* ws, void (*convert)(const void*, DType, int64_t, float*),
                     const void** x) {
  for (int64_t m = 0; m < a.M; ++m) {
    if (a.x_dtype == DType::kF32) {
      x[m] = x_row(a, m);
    } else {
      float* row = reinterpret_cast<float*>(ws) + m * kpad(a.K);
      convert(x_row(a, m), a.x_dtype, a.K, row);
      x[m] = row;
    }
  }
}

inline void packed_avx512(const Int8LinearArgs& a, char* ws) {
  const int64_t Kp = kpad(a.K);
  k512::Rows r;
  if (a.w8a8) {
    char* extra = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(ws + a.M * Kp + a.M * 4) + kAlign - 1) /
                                          kAlign * kAlign);
    for (int64_t m = 0; m < a.M; ++m) {
      uint8_t* qu = reinterpret_cast<uint8_t*>(ws + m * Kp);
      avx512::quantize_row(x_row(a, m), a.x_dtype, a.K, qu, &r.scale[m]);
      int8_t* xq = reinterpret_cast<int8_t*>(extra + m * 2 * Kp);
      __m512i* c = reinterpret_cast<__m512i*>(extra + m * 2 * Kp + Kp);
      k512::w8a8_prepare_row(qu, a.K, a.group, xq, c);
      r.x[m] = xq;
      r.corr[m] = c;
    }
  } else {
    f32_rows(a, ws, &avx512::row_to_f32, r.x);
  }
  const uint8_t* blocks = a.packed + kHeader;
  over_blocks(a, [&](int64_t b0, int64_t b1) {
    if (a.packed_e == 2) k512::run_range_g<2>(a, blocks, b0, b1, r);
    else k512::run_range_g<4>(a, blocks, b0, b1, r);
  });
}

// AVX2: the canonical AVX2 path's row preparation (the portable code), q rows zero-padded to kpad(K).
inline void packed_avx2(const Int8LinearArgs& a, char* ws) {
  const int64_t Kp = kpad(a.K);
  k256::Rows r;
  if (a.w8a8) {
    for (int64_t m = 0; m < a.M; ++m) {
      char* q = ws + m * Kp;
      scalar::quantize_row(x_row(a, m), a.x_dtype, a.K, q, &r.scale[m]);
      std::memset(q + a.K, 0, Kp - a.K);
      r.x[m] = q;
    }
  } else {
    f32_rows(a, ws, &scalar::row_to_f32, r.x);
  }
  const uint8_t* blocks = a.packed + kHeader;
  over_blocks(a, [&](int64_t b0, int64_t b1) {
    if (a.packed_e == 2) k256::run_range_g<2>(a, blocks, b0, b1, r);
    else k256::run_range_g<4>(a, blocks, b0, b1, r);
  });
}

}  // namespace detail

// A call of M <= max_rows rows from the packed layout (use_packed): every weight block is streamed
// once, each activation row in turn. ws: int8_linear_workspace_bytes(M, K, N, mode).
inline void int8_linear_packed(const Int8LinearArgs& a, Isa isa) {
  char* ws = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(a.ws) + kAlign - 1) / kAlign * kAlign);
  if (isa == Isa::kAvx512Vnni) detail::packed_avx512(a, ws);
  else detail::packed_avx2(a, ws);
}

}  // namespace i8pk
}  // namespace cpu
}  // namespace llmkern
