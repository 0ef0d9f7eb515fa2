// Throughput of single AVX-512 instructions on this CPU (12 independent chains each): vdpbf16ps,
// vfmadd, vpermw, vpdpbusd, and a dependent-add loop for the clock.
//   g++ -O3 -mavx512f -mavx512bw -mavx512bf16 -mavx512vnni peak_ops.cpp -o peak_ops && ./peak_ops
#include <immintrin.h>
#include <chrono>
#include <cstdio>
int main(){
  const long N=200000000;
  __m512 acc[12]; for(int i=0;i<12;i++) acc[i]=_mm512_setzero_ps();
  __m512i a=_mm512_set1_epi16(0x3f80), b=_mm512_set1_epi16(0x3f00);
  auto t0=std::chrono::steady_clock::now();
  for(long n=0;n<N/12;n++){
    _Pragma("GCC unroll 12") for(int i=0;i<12;i++) acc[i]=_mm512_dpbf16_ps(acc[i],(__m512bh)a,(__m512bh)b);
    asm volatile("" : "+v"(a));
  }
  double dt=std::chrono::duration<double>(std::chrono::steady_clock::now()-t0).count();
  float s=0; for(int i=0;i<12;i++) s+=_mm512_reduce_add_ps(acc[i]);
  printf("dpbf16ps: %.2f G/s (sum %g)\n", N/dt/1e9, s);
  // fma
  __m512 f[12]; for(int i=0;i<12;i++) f[i]=_mm512_set1_ps(0.f);
  __m512 x=_mm512_set1_ps(1.0001f), y=_mm512_set1_ps(0.9999f);
  t0=std::chrono::steady_clock::now();
  for(long n=0;n<N/12;n++){ _Pragma("GCC unroll 12") for(int i=0;i<12;i++) f[i]=_mm512_fmadd_ps(x,y,f[i]); asm volatile("" : "+v"(x)); }
  dt=std::chrono::duration<double>(std::chrono::steady_clock::now()-t0).count();
  s=0; for(int i=0;i<12;i++) s+=_mm512_reduce_add_ps(f[i]);
  printf("fma512: %.2f G/s (sum %g)\n", N/dt/1e9, s);
  // vpermw throughput
  __m512i p[12]; for(int i=0;i<12;i++) p[i]=_mm512_set1_epi16(i);
  __m512i tab=_mm512_set1_epi16(3);
  t0=std::chrono::steady_clock::now();
  for(long n=0;n<N/12;n++){ _Pragma("GCC unroll 12") for(int i=0;i<12;i++) p[i]=_mm512_permutexvar_epi16(p[i],tab); asm volatile("" : "+v"(tab)); }
  dt=std::chrono::duration<double>(std::chrono::steady_clock::now()-t0).count();
  long z=0; for(int i=0;i<12;i++) z+=_mm512_reduce_add_epi32(p[i]);
  printf("vpermw: %.2f G/s (%ld)\n", N/dt/1e9, z);
  // vpdpbusd
  __m512i d[12]; for(int i=0;i<12;i++) d[i]=_mm512_setzero_si512();
  __m512i u=_mm512_set1_epi8(3), w=_mm512_set1_epi8(5);
  t0=std::chrono::steady_clock::now();
  for(long n=0;n<N/12;n++){ _Pragma("GCC unroll 12") for(int i=0;i<12;i++) d[i]=_mm512_dpbusd_epi32(d[i],u,w); asm volatile("" : "+v"(u)); }
  dt=std::chrono::duration<double>(std::chrono::steady_clock::now()-t0).count();
  z=0; for(int i=0;i<12;i++) z+=_mm512_reduce_add_epi32(d[i]);
  printf("vpdpbusd: %.2f G/s (%ld)\n", N/dt/1e9, z);
  // dependent add chain for clock estimate: 1 add/cycle latency 1
  long c=0, N2=2000000000; t0=std::chrono::steady_clock::now();
  for(long n=0;n<N2;n++){ asm volatile("add $1, %0" : "+r"(c)); }
  dt=std::chrono::duration<double>(std::chrono::steady_clock::now()-t0).count();
  printf("clock ~ %.2f GHz (dependent adds)\n", N2/dt/1e9);
}
