// Memory read-bandwidth probe for the benchmarks' machine limits (benchmarks/_machine.py).
//
// torch's x.sum() is one way to stream memory, but its reduction code is not what bounds a quantized
// GEMV: the limit a kernel should be compared with is the fastest plain read of a buffer that does
// not fit in cache. This reads `n` floats with the widest loads the CPU has, split over threads in
// contiguous slices (each thread streams its own range, as the GEMV kernels do), with independent
// accumulators so the adds never bound the loop. Returns the sum so the loads cannot be removed.
#pragma once

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>

#include "llmkern/cpu/features.h"

namespace llmkern {
namespace cpu {

__attribute__((target("avx512f"))) inline float read_sum_avx512(const float* p, int64_t n) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    a0 = _mm512_add_ps(a0, _mm512_loadu_ps(p + i));
    a1 = _mm512_add_ps(a1, _mm512_loadu_ps(p + i + 16));
    a2 = _mm512_add_ps(a2, _mm512_loadu_ps(p + i + 32));
    a3 = _mm512_add_ps(a3, _mm512_loadu_ps(p + i + 48));
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  for (; i < n; ++i) s += p[i];
  return s;
}

__attribute__((target("avx2"))) inline float read_sum_avx2(const float* p, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + i + 8));
    a2 = _mm256_add_ps(a2, _mm256_loadu_ps(p + i + 16));
    a3 = _mm256_add_ps(a3, _mm256_loadu_ps(p + i + 24));
  }
  __m256 t = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
  alignas(32) float v[8];
  _mm256_store_ps(v, t);
  float s = v[0] + v[1] + v[2] + v[3] + v[4] + v[5] + v[6] + v[7];
  for (; i < n; ++i) s += p[i];
  return s;
}

inline float read_sum_scalar(const float* p, int64_t n) {
  float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += p[i];
    s1 += p[i + 1];
    s2 += p[i + 2];
    s3 += p[i + 3];
  }
  for (; i < n; ++i) s0 += p[i];
  return (s0 + s1) + (s2 + s3);
}

// Seconds for kIters rounds of 12 independent vdpbf16ps (dot) or vfmadd231ps chains.
__attribute__((target("avx512f,avx512bf16"), noinline)) inline double bf16_dot_rate_run(bool dot) {
  constexpr int kChains = 12;
  constexpr int64_t kIters = 2048;
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(static_cast<float>(i));
  __m512 a = _mm512_set1_ps(1.0f);
  const __m512 b = _mm512_set1_ps(0.5f);
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t n = 0; n < kIters; ++n) {
    if (dot) {
      for (int i = 0; i < kChains; ++i)
        acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_castps_si512(a), (__m512bh)_mm512_castps_si512(b));
    } else {
      for (int i = 0; i < kChains; ++i) acc[i] = _mm512_fmadd_ps(a, b, acc[i]);
    }
    __asm__ volatile("" : "+v"(a));  // a may change: the loop stays
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  __m512 sum = acc[0];
  for (int i = 1; i < kChains; ++i) sum = _mm512_add_ps(sum, acc[i]);
  volatile float sink = _mm512_reduce_add_ps(sum);
  (void)sink;
  return s;
}

// Issue rate of vdpbf16ps over that of 512-bit vfmadd231ps on this core: 12 independent chains each (so neither
// waits on its own latency), best of 3 alternated runs of ~25k instructions (~10-40 us). About 1 on AMD Zen 4 / 5
// (peak_ops.cpp's rates: 3.65 / 3.65 and 7.4 / 8.0 G/s), 0.24-0.26 on an Intel Xeon (family 6 model 207) whose
// vdpbf16ps issues every other cycle: there the bf16 kernels (which run on vdpbf16ps) are slower than the fp32
// ones (docs/notes/cpu-intel-host.md), which `generate --dtype auto` needs to know. The caller checks avx512_bf16.
inline double bf16_dot_rate_ratio() {
  bf16_dot_rate_run(false);  // warm-up: the core's 512-bit units and clock
  double dot = 1e30, fma = 1e30;
  for (int r = 0; r < 3; ++r) {
    dot = std::min(dot, bf16_dot_rate_run(true));
    fma = std::min(fma, bf16_dot_rate_run(false));
  }
  return dot > 0 ? fma / dot : 0.0;  // the same instruction count: the rate ratio is the inverse time ratio
}

// Sum of p[0..n) read by `threads` threads, each over one contiguous slice (64-byte aligned cuts).
inline float read_sum(const float* p, int64_t n, int threads, Isa isa) {
  if (threads < 1) threads = 1;
  double total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t per = ((n + nt - 1) / nt + 15) / 16 * 16;
    const int64_t lo = t * per < n ? t * per : n, hi = lo + per < n ? lo + per : n;
    float s;
    if (isa == Isa::kAvx512Vnni) s = read_sum_avx512(p + lo, hi - lo);
    else if (isa == Isa::kAvx2) s = read_sum_avx2(p + lo, hi - lo);
    else s = read_sum_scalar(p + lo, hi - lo);
    total += s;
  }
  return static_cast<float>(total);
}

}  // namespace cpu
}  // namespace llmkern
