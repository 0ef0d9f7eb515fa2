// Prototype (not wired into llmkern): W4A16 decode with bf16 x on a layout of 16 weight rows per vector
// (one output row per lane): per pair of k one vdpbf16ps for 16 rows, q as bf16(128 + q) by one
// vpternlogd, per group one FMA with the 16 scales and one with (offset - 128 scale) * X(g); no
// horizontal sums. Checks itself against a float64 reference. docs/notes/cpu-int4-decode-compute.md.
//   g++ -O3 -std=c++17 rows16_proto.cpp -o rows16_proto && ./rows16_proto [N]
// Prototype: W4A16 decode (bf16 x) on a 16-rows-per-vector layout, no horizontal sums.
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <vector>
#include <cstdint>
static inline float bf2f(uint16_t h) { uint32_t u = uint32_t(h) << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f2bf(float f) { uint32_t u; memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1); return u >> 16; }
constexpr int G = 32;
// layout: block rb (16 rows), group g, chunk c (8 k): 64 bytes; lane r word: half0 nibbles q[k0+0,2,4,6], half1 q[k0+1,3,5,7]
void pack(const uint8_t* q /*[N][K] 0..15*/, int N, int K, std::vector<uint32_t>& out) {
  const int NB = (N + 15) / 16, ng = K / G;
  out.assign((size_t)NB * ng * (G / 8) * 16, 0);
  for (int rb = 0; rb < NB; ++rb) for (int g = 0; g < ng; ++g) for (int c = 0; c < G / 8; ++c) for (int r = 0; r < 16; ++r) {
    const int n = rb * 16 + r; uint32_t w = 0;
    if (n < N) for (int t = 0; t < 4; ++t) {
      const int k0 = g * G + 8 * c;
      w |= uint32_t(q[(size_t)n * K + k0 + 2 * t]) << (4 * t);
      w |= uint32_t(q[(size_t)n * K + k0 + 2 * t + 1]) << (16 + 4 * t);
    }
    out[(((size_t)rb * ng + g) * (G / 8) + c) * 16 + r] = w;
  }
}
template <int MB, int NJ>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void tile(const uint32_t* pk, int rb0, int ng, const float* sc, const float* of,
    const uint32_t* xp /*[MB][K/2] bf16 pairs*/, int K, const float* X /*[MB][ng]*/, float* out /*[MB][N]*/, int N) {
  const __m512i m = _mm512_set1_epi32(0x000F000F), c43 = _mm512_set1_epi32(0x43004300);
  const __m512 m128 = _mm512_set1_ps(-128.0f);
  __m512 accf[MB][NJ];
  for (int i = 0; i < MB; ++i) for (int j = 0; j < NJ; ++j) accf[i][j] = _mm512_setzero_ps();
  for (int g = 0; g < ng; ++g) {
    __m512 acc[MB][NJ];
    for (int i = 0; i < MB; ++i) for (int j = 0; j < NJ; ++j) acc[i][j] = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int c = 0; c < G / 8; ++c) {
      __m512i v[NJ];
      for (int j = 0; j < NJ; ++j) v[j] = _mm512_loadu_si512(pk + (((size_t)(rb0 + j) * ng + g) * (G / 8) + c) * 16);
#pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) {
        __m512i q[NJ];
        for (int j = 0; j < NJ; ++j) q[j] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v[j], 4 * s), m, c43, 0xEA);
        const int kp = (g * G + 8 * c) / 2 + s;
        for (int i = 0; i < MB; ++i) {
          const __m512i xb = _mm512_set1_epi32(xp[(size_t)i * (K / 2) + kp]);
          for (int j = 0; j < NJ; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xb, (__m512bh)q[j]);
        }
      }
    }
    for (int j = 0; j < NJ; ++j) {
      const __m512 s = _mm512_loadu_ps(sc + ((size_t)(rb0 + j) * ng + g) * 16);
      const __m512 o = _mm512_fmadd_ps(m128, s, _mm512_loadu_ps(of + ((size_t)(rb0 + j) * ng + g) * 16));  // o - 128 s
      for (int i = 0; i < MB; ++i) {
        accf[i][j] = _mm512_fmadd_ps(acc[i][j], s, accf[i][j]);
        accf[i][j] = _mm512_fmadd_ps(o, _mm512_set1_ps(X[i * ng + g]), accf[i][j]);
      }
    }
  }
  for (int i = 0; i < MB; ++i) for (int j = 0; j < NJ; ++j) {
    const int n0 = (rb0 + j) * 16;
    if (n0 + 16 <= N) _mm512_storeu_ps(out + (size_t)i * N + n0, accf[i][j]);
  }
}
int main(int argc, char** argv) {
  const int N = argc > 1 ? atoi(argv[1]) : 3072, K = 576, ng = K / G;
  std::vector<uint8_t> q((size_t)N * K); for (size_t i = 0; i < q.size(); ++i) q[i] = (i * 2654435761u >> 13) & 15;
  std::vector<uint32_t> pk; pack(q.data(), N, K, pk);
  const int NBk = (N + 15) / 16;
  std::vector<float> sc((size_t)NBk * ng * 16), of((size_t)NBk * ng * 16);
  for (int n = 0; n < N; ++n) for (int g = 0; g < ng; ++g) { sc[((size_t)(n / 16) * ng + g) * 16 + n % 16] = 0.01f + 0.0001f * ((n + g) % 7); of[((size_t)(n / 16) * ng + g) * 16 + n % 16] = -0.08f + 0.001f * ((n * 3 + g) % 5); }
  for (int M : {1, 2, 4, 8}) {
    std::vector<uint16_t> x((size_t)M * K); for (size_t i = 0; i < x.size(); ++i) x[i] = f2bf(std::sin(0.37f * i));
    std::vector<float> X((size_t)M * ng, 0.f);
    for (int i = 0; i < M; ++i) for (int k = 0; k < K; ++k) X[i * ng + k / G] += bf2f(x[(size_t)i * K + k]);
    std::vector<float> out((size_t)M * N);
    auto run = [&]() {
      for (int m0 = 0; m0 < M; m0 += 4) {
        const int mb = M - m0 < 4 ? M - m0 : 4;
        const uint32_t* xp = reinterpret_cast<const uint32_t*>(x.data() + (size_t)m0 * K);
        for (int rb = 0; rb < NBk; rb += 2) {
          if (mb == 4) tile<4, 2>(pk.data(), rb, ng, sc.data(), of.data(), xp, K, X.data() + m0 * ng, out.data() + (size_t)m0 * N, N);
          else if (mb == 2) tile<2, 2>(pk.data(), rb, ng, sc.data(), of.data(), xp, K, X.data() + m0 * ng, out.data() + (size_t)m0 * N, N);
          else tile<1, 2>(pk.data(), rb, ng, sc.data(), of.data(), xp, K, X.data() + m0 * ng, out.data() + (size_t)m0 * N, N);
        }
      }
    };
    run();
    double maxerr = 0, maxref = 0;
    for (int i = 0; i < M; ++i) for (int n = 0; n < N; ++n) {
      double ref = 0;
      for (int k = 0; k < K; ++k) { const int g = k / G; const size_t si = ((size_t)(n / 16) * ng + g) * 16 + n % 16;
        ref += (double)bf2f(x[(size_t)i * K + k]) * ((double)q[(size_t)n * K + k] * sc[si] + of[si]); }
      maxerr = std::fmax(maxerr, std::fabs(ref - out[(size_t)i * N + n])); maxref = std::fmax(maxref, std::fabs(ref));
    }
    for (int r = 0; r < 30; ++r) run();
    const int reps = 300;
    auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) run();
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
    printf("N=%d M=%d: %.1f us   max err %.2e (max |y| %.2f)\n", N, M, dt * 1e6, maxerr, maxref);
  }
}
