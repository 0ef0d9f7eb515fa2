// int4_linear prefill (canonical tensors, fp32 x, M = 512, 1 thread) alternated call by call with the same micro-kernel
// calls alone (one panel; x windows moving with the K block and output columns with the strip, as the real loop),
// medians of 21 pairs:  g++ -O3 -std=c++17 -fopenmp -Icsrc/include docs/notes/cpu-intel-host/prefill_vs_micro.cpp \
//   -o /tmp/pm && OMP_NUM_THREADS=1 /tmp/pm 3072 576
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include "llmkern/cpu/int4_linear.h"
#include "llmkern/cpu/panel_gemm.h"
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
  // standalone: the same number of micro calls (64 strips x 5 K blocks x 64 row blocks, kc 128 x 4 + 64) on one
  // constant panel, x rows and C tiles of all 512 rows
  std::vector<float> w(128 * 48, 0.5f), c(M * 48);
  std::vector<pgemm::Rows> rows(M / 8);
  for (int64_t b = 0; b < M / 8; ++b) {
    pgemm::Rows& r = rows[b];
    for (int i = 0; i < 8; ++i) { r.x[i] = x.data() + (b * 8 + i) * K; r.out[i] = out.data() + (b * 8 + i) * N; }
    r.c = c.data() + b * 8 * 48; r.bias = nullptr; r.dt = DType::kF32; r.ncols = 48;
  }
  auto standalone = [&] {
    for (int64_t s = 0; s < N / 48; ++s)
      for (int kb = 0; kb < 5; ++kb)
        for (int64_t b = 0; b < M / 8; ++b) {
          rows[b].first = kb == 0; rows[b].last = kb == 4;
          for (int i = 0; i < 8; ++i) { rows[b].x[i] = x.data() + (b * 8 + i) * K + kb * 128; rows[b].out[i] = out.data() + (b * 8 + i) * N + s * 48; }
          pgemm::avx512::micro<8, 3>(w.data(), kb == 4 ? 64 : 128, rows[b]);
        }
  };
  std::vector<double> ratio, ta, tb;
  for (int rep = 0; rep < 21; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    int4_linear(a, Isa::kAvx512Vnni);
    auto t1 = std::chrono::steady_clock::now();
    standalone();
    auto t2 = std::chrono::steady_clock::now();
    const double x1 = std::chrono::duration<double>(t1 - t0).count(), x2 = std::chrono::duration<double>(t2 - t1).count();
    ta.push_back(x1); tb.push_back(x2); ratio.push_back(x1 / x2);
  }
  std::sort(ratio.begin(), ratio.end()); std::sort(ta.begin(), ta.end()); std::sort(tb.begin(), tb.end());
  printf("int4_linear %.2f ms, the same micro calls alone %.2f ms (medians); per-pair ratio median %.2f (%.2f-%.2f)\n",
         ta[10] * 1e3, tb[10] * 1e3, ratio[10], ratio[0], ratio[20]);
  const double best = ta[10];
  printf("N=%ld K=%ld M=%ld: best %.2f ms, %.1f GFLOP/s, out0 %.4f\n", (long)N, (long)K, (long)M, best * 1e3, 2.0 * M * N * K / best / 1e9, out[0]);
}
