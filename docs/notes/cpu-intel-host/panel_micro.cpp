// Hot GFLOP/s of the fp32 prefill micro-kernel pgemm::avx512::micro<8, 3> alone (1 thread, panel and x in L1/L2):
//   g++ -O3 -std=c++17 -Icsrc/include docs/notes/cpu-intel-host/panel_micro.cpp -o /tmp/micro && /tmp/micro
#include <chrono>
#include <cstdio>
#include <vector>
#include <algorithm>
#include "llmkern/cpu/panel_gemm.h"
using namespace llmkern::cpu;
int main() {
  const int64_t kc = 256, M = 8, K = 576;
  std::vector<float> w(kc * 48, 0.5f), x(M * K, 0.25f), c(8 * 48), out(8 * 48);
  pgemm::Rows r{};
  for (int i = 0; i < 8; ++i) { r.x[i] = x.data() + i * K; r.out[i] = out.data() + i * 48; }
  r.c = c.data(); r.first = true; r.last = false; r.bias = nullptr; r.dt = DType::kF32; r.ncols = 48;
  for (int rep = 0; rep < 3; ++rep) {
    const int n = 20000;
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < n; ++i) { pgemm::avx512::micro<8, 3>(w.data(), kc, r); r.first = false; }
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    printf("micro<8,3> kc=%ld: %.1f GFLOP/s (1 thread; peak 2x16x2x2.36 = 151)\n", (long)kc, 2.0 * 8 * 48 * kc * n / s / 1e9);
  }
}
