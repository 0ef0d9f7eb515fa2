// Build: g++ -O3 -std=c++17 -Icsrc/include docs/notes/cpu-intel-host/panel_micro_rows.cpp -o /tmp/m2 && /tmp/m2 0 && /tmp/m2 1
// The fp32 prefill micro-kernel hot alone vs over 64 row blocks of x (M = 512 rows in L2, each with its own C
// tile), as the real GEMM loop calls it for one panel; alternated, 1 thread.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include "llmkern/cpu/panel_gemm.h"
using namespace llmkern::cpu;
int main(int argc, char** argv) {
  const int64_t kc = 128, M = 512, K = 576, NB = M / 8;
  std::vector<float> w(kc * 48, 0.5f), x(M * K, 0.25f), c(M * 48), out(M * 48);
  const int xpack = argc > 1 ? atoi(argv[1]) : 0;  // 1: x rows of a block packed contiguously [8][kc]
  std::vector<float> xp(M * kc, 0.25f);
  std::vector<pgemm::Rows> rows(NB);
  for (int64_t b = 0; b < NB; ++b) {
    pgemm::Rows& r = rows[b];
    for (int i = 0; i < 8; ++i) {
      r.x[i] = xpack ? xp.data() + (b * 8 + i) * kc : x.data() + (b * 8 + i) * K;
      r.out[i] = out.data() + (b * 8 + i) * 48;
    }
    r.c = c.data() + b * 8 * 48; r.first = false; r.last = false; r.bias = nullptr; r.dt = DType::kF32; r.ncols = 48;
  }
  double best[2] = {0, 0};
  for (int rep = 0; rep < 10; ++rep)
    for (int v = 0; v < 2; ++v) {
      const int n = 300;
      auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < n; ++i)
        for (int64_t b = 0; b < NB; ++b) pgemm::avx512::micro<8, 3>(w.data(), kc, rows[v ? b : 0]);
      double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      best[v] = std::max(best[v], 2.0 * 8 * 48 * kc * NB * n / s / 1e9);
    }
  printf("xpack=%d best of 10: one row block %.1f GFLOP/s, 64 row blocks (x, C in L2) %.1f GFLOP/s\n", xpack, best[0], best[1]);
}
