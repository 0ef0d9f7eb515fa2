// Cold read bandwidth of S interleaved sequential streams (blocks of B bytes side by side per tile, as the
// rows16 decode reads two 16-row blocks at once), with and without a one-tile-ahead prefetcht0, against one
// stream; 1 GiB buffer in transparent huge pages. g++ -O3 -fopenmp -std=c++17 streams.cpp -o /tmp/s && /tmp/s 2
#include <immintrin.h>
#include <omp.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <algorithm>
#include <sys/mman.h>
__attribute__((target("avx512f"))) float run(const char* buf, size_t bytes, int S, size_t B, int T, int pfd) {
  const size_t tile = S * B, tiles = bytes / tile;
  float tot = 0;
#pragma omp parallel num_threads(T) reduction(+ : tot)
  {
    const int t = omp_get_thread_num();
    const size_t t0 = tiles * t / T, t1 = tiles * (t + 1) / T;
    __m512 acc = _mm512_setzero_ps();
    for (size_t tl = t0; tl < t1; ++tl) {
      const char* base = buf + tl * tile;
      const char* nxt = base + pfd * tile;
      const size_t lines = B / 64;
      const size_t pf_lines = tl + pfd < t1 ? tile / 64 : 0;
      size_t pl = 0;
      for (size_t l = 0; l < lines; ++l) {
        for (int s = 0; s < S; ++s) acc = _mm512_add_ps(acc, _mm512_loadu_ps((const float*)(base + s * B + 64 * l)));
        if (pfd) for (size_t e = (l + 1) * pf_lines / lines; pl < e; ++pl) _mm_prefetch(nxt + 64 * pl, _MM_HINT_T0);
      }
    }
    tot += _mm512_reduce_add_ps(acc);
  }
  return tot;
}
int main(int argc, char** argv) {
  const size_t bytes = size_t(1) << 30;
  char* buf = (char*)aligned_alloc(1 << 21, bytes);
  madvise(buf, bytes, MADV_HUGEPAGE);
  memset(buf, 1, bytes);
  const int T = argc > 1 ? atoi(argv[1]) : 2;
  for (size_t B : {5760ul, 40960ul})
    for (int pfd : {0, 1})
      for (int S : {1, 2, 4}) {
        std::vector<double> ts;
        for (int r = 0; r < 7; ++r) {
          auto a = std::chrono::steady_clock::now();
          volatile float f = run(buf, bytes, S, B, T, pfd);
          (void)f;
          ts.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count());
        }
        std::sort(ts.begin(), ts.end());
        printf("T=%d block %zu B, %d streams, prefetch %d: %.1f GB/s\n", T, B, S, pfd, bytes / ts[3] / 1e9);
      }
}
