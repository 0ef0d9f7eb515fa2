// The bf16 decode tile's inner loop of int4_linear (int4_linear_avx512.h dec_tile_bf16) in isolation:
// weights, x and scales in L1, no prefetch, no pointers. Compare its cycles per block with the real
// kernel's (docs/notes/cpu-int4-decode-compute.md).
//   g++ -O3 -mavx512f -mavx512bw -mavx512bf16 -mavx512vnni -mavx512vl tile_loop.cpp -o tile_loop && ./tile_loop
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
alignas(64) uint16_t X[4][1024];
alignas(64) uint16_t tabv[32];
alignas(64) uint8_t W[8][4096];
alignas(64) float S[8][1024];
template <int MB, int NB, int VAR>
double run(long blocks_total) {
  __m512 accf[MB][NB];
  for (int i=0;i<MB;i++) for(int j=0;j<NB;j++) accf[i][j]=_mm512_setzero_ps();
  const __m512i tab=_mm512_load_si512(tabv);
  const __m512i gidx=_mm512_srlv_epi32(_mm512_setr_epi32(0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15), _mm512_set1_epi32(2));
  auto t0=std::chrono::steady_clock::now();
  for (long bb=0; bb<blocks_total; ++bb) {
    const long b = bb & 7;
    __m512i d[NB];
    _Pragma("GCC unroll 8") for(int j=0;j<NB;j++) d[j]=_mm512_loadu_si512(W[j]+b*64);
    __m512 acc[MB][NB];
    _Pragma("GCC unroll 4") for (int i=0;i<MB;i++) _Pragma("GCC unroll 8") for(int j=0;j<NB;j++) acc[i][j]=_mm512_setzero_ps();
    _Pragma("GCC unroll 4") for (int u=0;u<4;u++) {
      __m512i xv[MB];
      _Pragma("GCC unroll 4") for(int i=0;i<MB;i++) xv[i]=_mm512_loadu_si512(X[i]+b*128+32*u);
      _Pragma("GCC unroll 8") for(int j=0;j<NB;j++){
        const __m512i q = _mm512_permutexvar_epi16(_mm512_srli_epi16(d[j],4*u), tab);
        _Pragma("GCC unroll 4") for(int i=0;i<MB;i++) acc[i][j]=_mm512_dpbf16_ps(acc[i][j],(__m512bh)xv[i],(__m512bh)q);
      }
    }
    if (VAR >= 1) {
      _Pragma("GCC unroll 8") for(int j=0;j<NB;j++){
        __m512 s = _mm512_maskz_loadu_ps(VAR==2 ? (__mmask16)0xffff : (__mmask16)0x000f, S[j]+b*4);
        s = _mm512_permutexvar_ps(gidx, s);
        _Pragma("GCC unroll 4") for(int i=0;i<MB;i++) accf[i][j]=_mm512_fmadd_ps(acc[i][j], s, accf[i][j]);
      }
    } else {
      _Pragma("GCC unroll 4") for (int i=0;i<MB;i++) _Pragma("GCC unroll 8") for(int j=0;j<NB;j++) accf[i][j]=_mm512_add_ps(accf[i][j], acc[i][j]);
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
  const long it=20000000;
  double t;
  t=run<4,2,0>(it); printf("MB4 NB2 add-only:       %.2f ns/block, %.1f cycles@4GHz\n", t/it*1e9, t/it*4e9);
  t=run<4,2,1>(it); printf("MB4 NB2 masked 0xf:     %.2f ns/block, %.1f cycles@4GHz\n", t/it*1e9, t/it*4e9);
  t=run<4,2,2>(it); printf("MB4 NB2 mask ffff:      %.2f ns/block, %.1f cycles@4GHz\n", t/it*1e9, t/it*4e9);
  t=run<1,8,1>(it); printf("MB1 NB8 masked 0xf:     %.2f ns/block, %.1f cycles@4GHz\n", t/it*1e9, t/it*4e9);
  t=run<4,4,1>(it); printf("MB4 NB4 masked 0xf:     %.2f ns/block, %.1f cycles@4GHz\n", t/it*1e9, t/it*4e9);
}
