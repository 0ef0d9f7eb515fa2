// Times llmkern::cpu::int4_linear (the real header, decode path, 1 thread, bf16 x, K = 576) without Python or
// the extension build: ~8 s to compile, so kernel experiments can be tried on a copy of csrc/include.
//   g++ -O3 -std=c++17 -fopenmp -Icsrc/include docs/notes/cpu-int4-decode-mb/harness.cpp -o /tmp/h && /tmp/h [N]
// Direct harness of llmkern::cpu::int4_linear (decode path): times one call of M rows, 1 thread.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cstring>
#include "llmkern/cpu/int4_linear.h"
using namespace llmkern::cpu;
int main(int argc, char** argv) {
  const int64_t N = argc > 1 ? atol(argv[1]) : 3072, K = 576, G = 32;
  std::vector<uint8_t> qw(N * K / 2); for (size_t i = 0; i < qw.size(); ++i) qw[i] = uint8_t(i * 37 + 11);
  std::vector<float> sc(N * K / G, 0.01f), of(N * K / G, -0.08f);
  std::vector<uint16_t> x(16 * K); for (size_t i = 0; i < x.size(); ++i) x[i] = 0x3f80 + (i % 7);
  std::vector<uint16_t> out(16 * N);
  for (int M : {1, 2, 4, 8}) {
    Int4LinearArgs a;
    a.x = x.data(); a.x_dtype = DType::kBF16; a.x_row_stride = K; a.M = M; a.K = K; a.N = N;
    a.qweight = qw.data(); a.scales = sc.data(); a.offsets = of.data(); a.group = G;
    a.out = out.data(); a.out_row_stride = N; a.num_threads = 1;
    std::vector<char> ws(int4_linear_workspace_bytes(M, K, N, 1, -1) + 64);
    a.ws = ws.data();
    for (int r = 0; r < 50; ++r) int4_linear(a, Isa::kAvx512Vnni);
    const int reps = 400;
    auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) int4_linear(a, Isa::kAvx512Vnni);
    double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
    printf("N=%ld M=%d: %.1f us\n", (long)N, M, dt * 1e6);
  }
}
