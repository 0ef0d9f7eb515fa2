// Work splitting shared by the CPU kernels' OpenMP regions.
#pragma once

#include <cstdint>

namespace llmkern {
namespace cpu {

// [begin, end) of part p when n items are cut into `parts` near-equal contiguous pieces.
inline void split_range(int64_t n, int64_t parts, int64_t p, int64_t* begin, int64_t* end) {
  const int64_t q = n / parts, r = n % parts;
  *begin = p * q + (p < r ? p : r);
  *end = *begin + q + (p < r ? 1 : 0);
}

// Thread t's share (of nt) of a GEMM's output grid: `units` column units go to ts = min(nt, units)
// threads in contiguous ranges; with more threads than units, tm = nt / ts threads share a column range
// and split the rows instead. Threads past ts * tm get nothing (active false).
struct GridPart {
  int64_t u0 = 0, u1 = 0;               // column units [u0, u1)
  int64_t row_part = 0, row_parts = 1;  // which of the row parts of a chunk
  bool active = false;

  GridPart(int64_t units, int nt, int t) {
    const int64_t ts = nt < units ? nt : units, tm = ts > 0 && nt / ts > 1 ? nt / ts : 1;
    active = ts > 0 && t < ts * tm;
    if (!active) return;
    split_range(units, ts, t % ts, &u0, &u1);
    row_part = t / ts;
    row_parts = tm;
  }

  // This thread's rows [*r0, *r1) of a chunk of `rows`, in whole blocks of `blk` (empty when inactive).
  void rows(int64_t rows, int64_t blk, int64_t* r0, int64_t* r1) const {
    *r0 = *r1 = 0;
    if (!active) return;
    split_range((rows + blk - 1) / blk, row_parts, row_part, r0, r1);
    *r0 *= blk;
    *r1 = *r1 * blk < rows ? *r1 * blk : rows;
  }
};

}  // namespace cpu
}  // namespace llmkern
