// Hot A/B of int4_rows16::decode with fp32 x: the float tiles against the int16-pair prototype (EXP_I16=1;
// rows16_i16_proto.patch applied to a copy of the tree), same weights, outputs compared. 1 / 2 threads.
//   g++ -O3 -std=c++17 -fopenmp -mf16c -I<patched tree>/csrc/include r16i16.cpp -o /tmp/r16
//   OMP_NUM_THREADS=1 /tmp/r16 1536 576 1;  OMP_NUM_THREADS=2 /tmp/r16 4096 4096 2
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cstring>
#include <algorithm>
#include <random>
#include "llmkern/cpu/int4_linear_rows16.h"
using namespace llmkern::cpu;
int main(int argc, char** argv) {
  const int64_t N = argc > 1 ? atol(argv[1]) : 1536, K = argc > 2 ? atol(argv[2]) : 576, G = 32, E = 2;
  const int T = argc > 3 ? atoi(argv[3]) : 1;
  std::mt19937 rng(1); std::normal_distribution<float> nd;
  std::vector<uint8_t> qw(N * K / 2); for (auto& b : qw) b = rng() & 0xFF;
  std::vector<float> sc(N * K / G), of(N * K / G);
  for (auto& v : sc) v = (float)_cvtsh_ss(_cvtss_sh(0.01f * (1 + (rng() % 100) / 50.0f), 0));
  for (auto& v : of) v = (float)_cvtsh_ss(_cvtss_sh(-0.08f * (1 + (rng() % 100) / 50.0f), 0));
  std::vector<uint8_t> pk(int4_rows16::packed_bytes(N, K, G, E) + 64);
  int4_rows16::pack(qw.data(), sc.data(), of.data(), N, K, G, E, pk.data());
  std::vector<float> xf(8 * K); for (auto& v : xf) v = nd(rng);
  std::vector<float> out(8 * N), out2(8 * N), X(8 * K / G);
  for (int M : {1, 2, 4}) {
    double best[2];
    for (int v = 0; v < 2; ++v) {
      setenv("EXP_I16", v ? "1" : "0", 1);
      float* o = v ? out2.data() : out.data();
      auto run = [&] { int4_rows16::decode(xf.data(), K, true, M, K, N, G, pk.data(), E, nullptr, o, N, DType::kF32, X.data(), T); };
      for (int r = 0; r < 100; ++r) run();
      std::vector<double> ts;
      for (int rep = 0; rep < 9; ++rep) {
        const int reps = 200;
        auto t0 = std::chrono::steady_clock::now();
        for (int r = 0; r < reps; ++r) run();
        ts.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps);
      }
      std::sort(ts.begin(), ts.end());
      best[v] = ts[4] * 1e6;
    }
    double num = 0, den = 0;
    for (int64_t i = 0; i < M * N; ++i) { num += (out[i] - out2[i]) * (double)(out[i] - out2[i]); den += out[i] * (double)out[i]; }
    printf("M=%d N=%ld K=%ld T=%d: float %.2f us, i16 %.2f us (%.2fx), rel diff %.2e\n", M, (long)N, (long)K, T, best[0], best[1], best[0] / best[1], std::sqrt(num / den));
  }
}
