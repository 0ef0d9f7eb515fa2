// Output-write cost in the fp32 panel GEMM (M = 512, 1 thread, constant fp32 panels copied per strip as a stand-in
// for unpacking): rows per group {8, 32, 512} (8 = the K-span order) x ways of writing y, interleaved, medians of 25:
//   g++ -O3 -std=c++17 -Icsrc/include docs/notes/cpu-intel-host/y_writes.cpp -o /tmp/yw && /tmp/yw 3072 576
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <algorithm>
#include "llmkern/cpu/panel_gemm.h"
using namespace llmkern::cpu; using namespace llmkern::cpu::pgemm;
int main(int argc, char** argv) {
  const int64_t N = atol(argv[1]), K = atol(argv[2]), M = 512, KC = 128;
  std::vector<float> x(M * K), wall(N / 48 * K * 48), out(M * N);
  for (size_t i = 0; i < x.size(); ++i) x[i] = ((i * 2654435761u) % 1000) / 1000.f - 0.5f;
  for (size_t i = 0; i < wall.size(); ++i) wall[i] = ((i * 40503u) % 1000) / 1000.f - 0.5f;
  std::vector<float> span(K * 48 + 64), c(M * 48);
  const int64_t nb = (K + KC - 1) / KC; std::vector<int64_t> kcs(nb);
  for (int64_t b = 0; b < nb; ++b) kcs[b] = 16 * ((K / 16) / nb + (b < (K / 16) % nb ? 1 : 0));
  auto run = [&](int64_t RG, int mode) {  // mode 0 plain, 1 prefetchw y at the last block's start, 2 prefetcht0, 3 no y (C only)
    for (int64_t s = 0; s < N / 48; ++s) {
      memcpy(span.data(), wall.data() + s * K * 48, K * 48 * 4);
      for (int64_t g0 = 0; g0 < M; g0 += RG)
        for (int64_t b = 0, k0 = 0; b < nb; k0 += kcs[b], ++b)
          for (int64_t r0 = g0; r0 < g0 + RG; r0 += 8) {
            Rows r; const bool last = b == nb - 1;
            for (int i = 0; i < 8; ++i) { r.x[i] = x.data() + (r0 + i) * K + k0; r.out[i] = out.data() + (r0 + i) * N + s * 48; }
            if (last && (mode == 1 || mode == 2))
              for (int i = 0; i < 8; ++i) for (int v = 0; v < 3; ++v)
                { if (mode == 1) _mm_prefetch((const char*)r.out[i] + 64 * v, _MM_HINT_ET0); else _mm_prefetch((const char*)r.out[i] + 64 * v, _MM_HINT_T0); }
            r.c = c.data() + r0 * 48; r.first = b == 0; r.last = last && mode != 3; r.bias = nullptr; r.dt = DType::kF32; r.ncols = 48;
            avx512::micro<8, 3>(span.data() + k0 * 48, kcs[b], r);
          }
    }
  };
  const int64_t rgs[] = {8, 32, 512}; const char* mn[] = {"plain", "prefetchw", "prefetcht0", "no y"};
  std::vector<double> t[3][4];
  for (int rep = 0; rep < 25; ++rep)
    for (int j = 0; j < 12; ++j) { const int v = (j + rep) % 12; auto t0 = std::chrono::steady_clock::now(); run(rgs[v / 4], v % 4);
      t[v / 4][v % 4].push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()); }
  for (int a = 0; a < 3; ++a) { printf("N=%ld K=%ld rows/group %3ld:", (long)N, (long)K, (long)rgs[a]);
    for (int m = 0; m < 4; ++m) { std::sort(t[a][m].begin(), t[a][m].end()); printf("  %s %.1f", mn[m], 2.0 * M * N * K / t[a][m][12] / 1e9); }
    printf(" GFLOP/s\n"); }
}
