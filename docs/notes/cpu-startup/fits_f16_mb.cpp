// fits_f16 (F16C) against the scalar rule on 200k random vectors (NaN, denormals, -0, one-bit changes), and
// both timed on 6.8M values.  g++ -O3 -std=c++17 -Icsrc/include docs/notes/cpu-startup/fits_f16_mb.cpp -o /tmp/f && /tmp/f
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <chrono>
#include <cmath>
#include "llmkern/cpu/convert.h"
using namespace llmkern::cpu;
static bool scalar(const float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (std::isnan(v[i]) || f32_bits(f16_to_f32(f32_to_f16(v[i]))) != f32_bits(v[i])) return false;
  return true;
}
int main() {
  srand(1);
  int bad = 0;
  std::vector<float> v(37);
  for (int trial = 0; trial < 200000; ++trial) {
    int n = rand() % 37;
    for (int i = 0; i < n; ++i) v[i] = f16_to_f32(rand() & 0xffff);  // fp16 values (incl. inf, nan, subnormal)
    if (n && rand() % 2) {
      int j = rand() % n; uint32_t u = rand() ^ (rand() << 16);
      switch (rand() % 4) { case 0: v[j] = bits_f32(u); break; case 1: v[j] = bits_f32(f32_bits(v[j]) ^ 1u); break;
        case 2: v[j] = bits_f32(u & 0x807fffffu); break; default: v[j] = -0.0f; }
    }
    if (fits_f16(v.data(), n) != scalar(v.data(), n)) ++bad;
  }
  std::vector<float> big(26 << 18);
  for (auto& x : big) x = f16_to_f32(rand() & 0x7bff);
  auto t0 = std::chrono::steady_clock::now(); bool a = fits_f16(big.data(), big.size());
  auto t1 = std::chrono::steady_clock::now(); bool b = scalar(big.data(), big.size());
  auto t2 = std::chrono::steady_clock::now();
  printf("mismatches %d; %zu values: f16c %.2f ms (%d), scalar %.2f ms (%d)\n", bad, big.size(),
         std::chrono::duration<double>(t1 - t0).count() * 1e3, a, std::chrono::duration<double>(t2 - t1).count() * 1e3, b);
}
