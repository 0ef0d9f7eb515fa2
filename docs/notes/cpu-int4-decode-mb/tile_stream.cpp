// tile_loop.cpp grown toward the kernel: streams N weight rows 288 bytes apart (K = 576) tile by tile, with
// masked loads and the next tile's prefetch; FIN = 1 adds the per-output _mm512_reduce_add_ps at each
// tile's end (docs/notes/cpu-int4-decode-compute.md).
//   g++ -O3 -mavx512f -mavx512bw -mavx512bf16 -mavx512vnni -mavx512vl tile_stream.cpp -o tile_stream && ./tile_stream
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
alignas(64) uint16_t X[4][1024];
alignas(64) uint16_t tabv[32];
alignas(64) float S[8][1024];
// weights: N rows of 288 bytes (K = 576), read tile by tile: NB rows x 4.5 blocks of 64 bytes
float RES[4][4096];
template <int MB, int NB, int PF, int FIN = 0>
double run(const uint8_t* Wt, long N, int reps) {
  __m512 accf[MB][NB];
  const __m512i tab=_mm512_load_si512(tabv);
  const __m512i gidx=_mm512_srlv_epi32(_mm512_setr_epi32(0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15), _mm512_set1_epi32(2));
  const long rb = 288;
  auto t0=std::chrono::steady_clock::now();
  for (int r=0;r<reps;r++)
  for (long n=0; n<N; n+=NB) {
    if (FIN || n == 0) for (int i=0;i<MB;i++) for(int j=0;j<NB;j++) accf[i][j]=_mm512_setzero_ps();
    const uint8_t* q = Wt + n*rb;
    for (long b=0; b*64<rb; ++b) {
      const long bytes = rb - b*64 < 64 ? rb - b*64 : 64;
      const __mmask16 dm = bytes >= 64 ? 0xffff : (__mmask16)((1u << (bytes/4)) - 1);
      if (PF) for (int j=0;j<NB;j++) __builtin_prefetch(q + NB*rb + (b*NB+j)*64, 0, 3);
      __m512i d[NB];
      _Pragma("GCC unroll 8") for(int j=0;j<NB;j++) d[j]=_mm512_maskz_loadu_epi32(dm, q + j*rb + b*64);
      __m512 acc[MB][NB];
      _Pragma("GCC unroll 4") for (int i=0;i<MB;i++) _Pragma("GCC unroll 8") for(int j=0;j<NB;j++) acc[i][j]=_mm512_setzero_ps();
      _Pragma("GCC unroll 4") for (int u=0;u<4;u++) {
        __m512i xv[MB];
        _Pragma("GCC unroll 4") for(int i=0;i<MB;i++) xv[i]=_mm512_loadu_si512(X[i]+b*128+32*u);
        _Pragma("GCC unroll 8") for(int j=0;j<NB;j++){
          const __m512i qq = _mm512_permutexvar_epi16(_mm512_srli_epi16(d[j],4*u), tab);
          _Pragma("GCC unroll 4") for(int i=0;i<MB;i++) acc[i][j]=_mm512_dpbf16_ps(acc[i][j],(__m512bh)xv[i],(__m512bh)qq);
        }
      }
      _Pragma("GCC unroll 8") for(int j=0;j<NB;j++){
        __m512 s = _mm512_maskz_loadu_ps(0x000f, S[j]+b*4);
        s = _mm512_permutexvar_ps(gidx, s);
        _Pragma("GCC unroll 4") for(int i=0;i<MB;i++) accf[i][j]=_mm512_fmadd_ps(acc[i][j], s, accf[i][j]);
      }
    }
    if (FIN) {
      _Pragma("GCC unroll 4") for (int i=0;i<MB;i++) _Pragma("GCC unroll 8") for(int j=0;j<NB;j++) RES[i][n+j] = _mm512_reduce_add_ps(accf[i][j]);
    }
  }
  double dt=std::chrono::duration<double>(std::chrono::steady_clock::now()-t0).count();
  float s=0; for (int i=0;i<MB;i++) for(int j=0;j<NB;j++) s+=_mm512_reduce_add_ps(accf[i][j]);
  if (s==12345.f) printf("x");
  return dt;
}
int main(){
  for (int i=0;i<4;i++) for (int k=0;k<1024;k++) X[i][k]=0x3f80;
  for (int j=0;j<8;j++) for (int k=0;k<1024;k++) S[j][k]=1.0f;
  for (long N : {64L, 384L, 3072L}) {
    uint8_t* Wt = (uint8_t*)aligned_alloc(64, N*288+4096); for (long i=0;i<N*288+4096;i++) Wt[i]=i*7;
    int reps = 20000000/(N*5);
    double t=run<4,2,0>(Wt,N,reps); double blocks = (double)reps*N/2*4.5;
    double t2=run<4,2,1>(Wt,N,reps);
    double t3=run<1,8,1>(Wt,N,reps); double blocks8=(double)reps*N/8*4.5;
    double t4=run<4,2,1,1>(Wt,N,reps); double t5=run<1,8,1,1>(Wt,N,reps);
    printf("  with per-tile reductions: MB4NB2 %.1f cycles/blockpair, M4 us/call %.1f; MB1NB8 %.1f\n", t4/blocks*4e9, t4/reps*1e6, t5/blocks8*4e9);
    printf("N=%ld: MB4NB2 %.1f cycles/blockpair (pf %.1f); MB1NB8 pf %.1f cycles/block-of-8; M4 us/call %.1f\n", N, t/blocks*4e9, t2/blocks*4e9, t3/blocks8*4e9, t2/reps*1e6);
    free(Wt);
  }
}
