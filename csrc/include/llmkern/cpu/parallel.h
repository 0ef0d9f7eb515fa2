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

}  // namespace cpu
}  // namespace llmkern
