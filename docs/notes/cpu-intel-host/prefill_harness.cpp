// int4_linear prefill alone (canonical tensors, fp32 x, M = 512, 1 thread) on the header tree given by -I, as
// cpu-int4-decode-mb/harness.cpp does for decode:
//   g++ -O3 -std=c++17 -fopenmp -Icsrc/include docs/notes/cpu-intel-host/prefill_harness.cpp -o /tmp/h && /tmp/h 3072 576
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include "llmkern/cpu/int4_linear.h"
using namespace llmkern::cpu;
int main(int argc, char** argv) {
  const int64_t N = argc > 1 ? atol(argv[1]) : 3072, K = argc > 2 ? atol(argv[2]) : 576, G = 32, M = 512;
  std::vector<uint8_t> qw(N * K / 2); for (size_t i = 0; i < qw.size(); ++i) qw[i] = uint8_t(i * 37 + 11);
  std::vector<float> sc(N * K / G, 0.01f), of(N * K / G, -0.08f);
  std::vector<float> x(M * K); for (size_t i = 0; i < x.size(); ++i) x[i] = 0.5f + (i % 7) * 0.125f;
  std::vector<float> out(M * N);
  Int4LinearArgs a;
  a.x = x.data(); a.x_dtype = DType::kF32; a.x_row_stride = K; a.M = M; a.K = K; a.N = N;
  a.qweight = qw.data(); a.scales = sc.data(); a.offsets = of.data(); a.group = G;
  a.out = out.data(); a.out_row_stride = N; a.num_threads = 1;
  std::vector<char> ws(int4_linear_workspace_bytes(M, K, N, 1, -1) + 64);
  a.ws = ws.data();
  for (int r = 0; r < 3; ++r) int4_linear(a, Isa::kAvx512Vnni);
  double best = 1e9;
  for (int rep = 0; rep < 15; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    int4_linear(a, Isa::kAvx512Vnni);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  printf("N=%ld K=%ld M=%ld: best %.2f ms, %.1f GFLOP/s, out0 %.4f\n", (long)N, (long)K, (long)M, best * 1e3, 2.0 * M * N * K / best / 1e9, out[0]);
}
