// Host emulation of the CUDA subset that llmkern's decode-side kernels use (tests/cuda_emu): every thread
// of a CTA is a fiber (ucontext) of one OS thread; CTAs run one after another; warp shuffles, __any_sync,
// __syncwarp and __syncthreads are barriers that switch fibers cooperatively. Arithmetic is the host's
// IEEE fp32/fp64 (no FMA contraction on x86-64 without -mfma); exp2f/tanhf are libm's. It checks the
// kernels' index arithmetic, reductions and numerics on machines without a GPU; it cannot catch
// data races between barriers or launch-configuration errors. Vector accesses made through ld_vec / ldg_vec /
// st_vec (llmkern/cuda/kv_rotary_common.cuh) are checked for alignment: the launch then throws. Test-only.
#pragma once
#include <ucontext.h>

#include <math.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "llmkern/cpu/convert.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint3 { unsigned x, y, z; };
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
struct float4 { float x, y, z, w; };
struct float2 { float x, y; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline float2 make_float2(float a, float b) { return {a, b}; }
typedef void* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated error"; }

struct __half { uint16_t x; };
struct __half2 { __half a, b; };
struct __nv_bfloat16 { uint16_t x; };
inline float __half2float(__half h) { return llmkern::cpu::f16_to_f32(h.x); }
inline __half __ushort_as_half(uint16_t u) { return {u}; }
inline uint16_t __half_as_ushort(__half h) { return h.x; }
inline __half __float2half_rn(float f) { return {llmkern::cpu::f32_to_f16(f)}; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.a), __half2float(h.b)}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {llmkern::cpu::f32_to_bf16(f)}; }
inline uint16_t __bfloat16_as_ushort(__nv_bfloat16 b) { return b.x; }
inline float __uint_as_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; memcpy(&f, &u, 4); return f; }
inline float __fdiv_rn(float a, float b) { volatile float r = a / b; return r; }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline int __float2int_rn(float v) { return static_cast<int>(std::nearbyint(v)); }
inline float __double2float_rn(double d) { return static_cast<float>(d); }
template <class T> inline T __ldg(const T* p) { return *p; }

using std::max;
using std::min;

namespace emu {
struct Fiber { ucontext_t ctx; uint3 tid; bool done; std::vector<char> stack; };
struct Barrier { int count = 0; long gen = 0; };
struct State {
  std::vector<Fiber> fibers;
  int cur = 0;
  ucontext_t sched;
  uint3 block{0, 0, 0};
  dim3 bdim, gdim;
  std::vector<Barrier> warp_bar;
  Barrier block_bar;
  std::vector<std::vector<uint64_t>> slots;
  std::function<void()> body;
  std::string misaligned;  // first misaligned vector access of the launch (reported after the grid)
};
inline State& S() { static State s; return s; }
inline void yield() { swapcontext(&S().fibers[S().cur].ctx, &S().sched); }
inline void wait(Barrier& b, int n) {
  const long g = b.gen;
  if (++b.count == n) { b.count = 0; ++b.gen; return; }
  while (b.gen == g) yield();
}
inline int lin() { const uint3 t = S().fibers[S().cur].tid; return (t.z * S().bdim.y + t.y) * S().bdim.x + t.x; }
inline void warp_sync() { wait(S().warp_bar[lin() / 32], 32); }
inline void block_sync() { wait(S().block_bar, S().bdim.x * S().bdim.y * S().bdim.z); }
template <class T> T shfl_xor(T v, int o) {
  const int l = lin(), w = l / 32, lane = l % 32;
  uint64_t u = 0;
  memcpy(&u, &v, sizeof(T));
  S().slots[w][lane] = u;
  warp_sync();
  uint64_t r = S().slots[w][lane ^ o];
  warp_sync();
  T out;
  memcpy(&out, &r, sizeof(T));
  return out;
}
inline void check_aligned(const void* p, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes && S().misaligned.empty())
    S().misaligned = "misaligned " + std::to_string(bytes) + "-byte vector access at address " +
                     std::to_string(reinterpret_cast<uintptr_t>(p));
}
inline void tramp() {
  S().body();
  S().fibers[S().cur].done = true;
}
template <class K, class... A>
void launch(K kernel, dim3 grid, dim3 block, A... args) {
  State& s = S();
  s.bdim = block;
  s.gdim = grid;
  const int n = block.x * block.y * block.z;
  s.body = [=]() { kernel(args...); };
  s.misaligned.clear();
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        s.block = {bx, by, bz};
        s.fibers.assign(n, Fiber{});
        s.warp_bar.assign((n + 31) / 32, Barrier{});
        s.block_bar = Barrier{};
        s.slots.assign((n + 31) / 32, std::vector<uint64_t>(32));
        for (int i = 0; i < n; ++i) {
          Fiber& f = s.fibers[i];
          f.tid = {unsigned(i % block.x), unsigned((i / block.x) % block.y), unsigned(i / (block.x * block.y))};
          f.done = false;
          f.stack.resize(256 << 10);
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = &s.sched;
          makecontext(&f.ctx, tramp, 0);
        }
        bool any = true;
        while (any) {
          any = false;
          for (int i = 0; i < n; ++i) {
            if (s.fibers[i].done) continue;
            any = true;
            s.cur = i;
            swapcontext(&s.sched, &s.fibers[i].ctx);
          }
        }
      }
  if (!s.misaligned.empty()) throw std::runtime_error("CUDA emulation: " + s.misaligned);
}
}  // namespace emu

#define LLMKERN_ASSERT_ALIGNED(ptr, bytes) emu::check_aligned((ptr), (bytes))
#define threadIdx (emu::S().fibers[emu::S().cur].tid)
#define blockIdx (emu::S().block)
#define blockDim (emu::S().bdim)
template <class T> inline T __shfl_xor_sync(unsigned, T v, int o) { return emu::shfl_xor(v, o); }
inline int __any_sync(unsigned, int pred) {
  const int l = emu::lin(), w = l / 32, lane = l % 32;
  emu::S().slots[w][lane] = pred ? 1 : 0;
  emu::warp_sync();
  int any = 0;
  for (int i = 0; i < 32; ++i) any |= int(emu::S().slots[w][i]);
  emu::warp_sync();
  return any;
}
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_sync(); }
inline void __syncthreads() { emu::block_sync(); }
