// Hot-cache timing of int4_rows16::decode (the real header): N x K at M = 1 / 2 / 4 rows, fp32 and bf16 x,
// E = 2, T threads, the same weights called again and again (L2 / L3), medians of 9 x 300 calls. Build against
// a tree's headers, e.g. two trees to A/B a kernel change (session 24, cpu-int4-decode-compute.md):
//   g++ -O3 -std=c++17 -fopenmp -Icsrc/include docs/notes/cpu-int4-decode-mb/rows16_hot.cpp -o /tmp/h
//   OMP_NUM_THREADS=1 /tmp/h 1536 576 1;  OMP_NUM_THREADS=2 /tmp/h 4096 4096 2
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cstring>
#include <algorithm>
#include "llmkern/cpu/int4_linear_rows16.h"
using namespace llmkern::cpu;
int main(int argc, char** argv) {
  const int64_t N = argc > 1 ? atol(argv[1]) : 1536, K = argc > 2 ? atol(argv[2]) : 576, G = 32, E = 2;
  const int T = argc > 3 ? atoi(argv[3]) : 1;
  std::vector<uint8_t> qw(N * K / 2); for (size_t i = 0; i < qw.size(); ++i) qw[i] = uint8_t(i * 37 + 11);
  std::vector<float> sc(N * K / G, 0.01f), of(N * K / G, -0.08f);
  std::vector<uint8_t> pk(int4_rows16::packed_bytes(N, K, G, E) + 64);
  int4_rows16::pack(qw.data(), sc.data(), of.data(), N, K, G, E, pk.data());
  std::vector<float> xf(16 * K); for (size_t i = 0; i < xf.size(); ++i) xf[i] = 0.5f + (i % 7) * 0.125f;
  std::vector<uint16_t> xb(16 * K); for (size_t i = 0; i < xb.size(); ++i) xb[i] = 0x3f80 + (i % 7);
  std::vector<float> out(16 * N), X(16 * K / G);
  for (int f32 = 1; f32 >= 0; --f32)
    for (int M : {1, 2, 4}) {
      auto run = [&] { int4_rows16::decode(f32 ? (const void*)xf.data() : (const void*)xb.data(), K, f32, M, K, N, G,
                                           pk.data(), E, nullptr, out.data(), N, DType::kF32, X.data(), T); };
      for (int r = 0; r < 100; ++r) run();
      std::vector<double> ts;
      for (int rep = 0; rep < 9; ++rep) {
        const int reps = 300;
        auto t0 = std::chrono::steady_clock::now();
        for (int r = 0; r < reps; ++r) run();
        ts.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps);
      }
      std::sort(ts.begin(), ts.end());
      const double us = ts[4] * 1e6;
      printf("%s M=%d N=%ld K=%ld T=%d: %.2f us, %.1f Gw/s, out0 %.6f\n", f32 ? "fp32" : "bf16", M, (long)N, (long)K, T, us,
             N * K / us / 1e3, out[0]);
    }
}
