// Host emulation of the CUDA subset that llmkern's decode-side kernels use (tests/cuda_emu): every thread
// of a CTA is a fiber (ucontext) of one OS thread; CTAs run one after another; warp shuffles, __any_sync,
// __syncwarp and __syncthreads are barriers that switch fibers cooperatively. Arithmetic is the host's
// IEEE fp32/fp64 (no FMA contraction on x86-64 without -mfma); exp2f/tanhf are libm's. It checks the
// kernels' index arithmetic, reductions and numerics on machines without a GPU; it cannot catch
// data races between barriers (threads run in a fixed order) nor register or occupancy limits. Vector accesses made through ld_vec / ldg_vec /
// st_vec (llmkern/cuda/kv_rotary_common.cuh) and __ldg of uint4 / uint2 / float4 / float2 are checked for
// alignment: the launch then throws. A launch with more than 48 KiB of dynamic shared memory throws unless
// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, >= bytes) was called. Test-only.
//
// Scheduler: a fiber runs until it blocks in a wait (block_until: a predicate the scheduler re-evaluates
// without switching to the fiber) or exits. A pass in which no fiber can run is a stall: the stall hooks
// (asynchronous copies of the sm_90 emulation, include/llmkern/cuda/sm90.cuh) get to deliver something;
// if none does, the launch throws a deadlock error listing what every thread waits for. An exception
// thrown in a kernel (including __trap()) ends the launch with that error, naming block and thread.
// __syncthreads waits for the threads of the block that have not exited (as the hardware counts warps).
// Dynamic shared memory: one buffer per block (dyn_smem_base(), filled with 0xFF, NaN for 16-bit floats,
// at the start of every block), of the size the launch asked for (`<<<g, b, smem>>>`, at most 227 KiB),
// at shared-window address kSmemWindow (env LLMKERN_EMU_SMEM_BASE; default 0x410: NOT 1024-aligned, so
// kernels must align their tiles themselves); the host address is congruent to it modulo 4096.
// `extern __shared__ __align__(A) T name[];` (build_emu.py rewrites it to extern_smem(A)) is the dynamic
// buffer moved up to the next A-aligned shared address (as the compiler aligns it after the static
// shared memory); the launch's byte count then counts from there.
// Static `__shared__ T x[...];` (build_emu.py rewrites it to static_smem<T[...]>(key, align)) is laid out, at
// its first use in a launch, in a per-launch arena of at most 48 KiB (and static + dynamic <= 227 KiB) that
// is filled with 0xFF at the start of every block (per-CTA and poisoned, like the hardware's) and has its
// own range of the shared window (above the dynamic buffer, congruent to the host address modulo 4096),
// so __cvta_generic_to_shared and the shared-memory operations (sm80.cuh, sm90.cuh) accept both kinds.
#pragma once
#include <ucontext.h>

#include <math.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "llmkern/cpu/convert.h"

#ifndef LLMKERN_CUDA_EMULATOR
#define LLMKERN_CUDA_EMULATOR 1
#endif
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))

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
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline float2 make_float2(float a, float b) { return {a, b}; }
typedef void* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated error"; }
// The emulated device: compute capability 9.0 (sm_90a kernels run), 132 SMs.
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrComputeCapabilityMajor = 75,
                      cudaDevAttrComputeCapabilityMinor = 76, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct cudaFuncAttributes {
  size_t sharedSizeBytes = 0, constSizeBytes = 0, localSizeBytes = 0;
  int maxThreadsPerBlock = 1024, numRegs = 0, ptxVersion = 90, binaryVersion = 90, cacheModeCA = 0;
  int maxDynamicSharedSizeBytes = 48 << 10;
};
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  switch (a) {
    case cudaDevAttrComputeCapabilityMajor: *v = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *v = 0; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *v = 132; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = 227 << 10; return cudaSuccess;  // (kDynSmemMax below)
  }
  return cudaErrorInvalidValue;
}

struct __half { uint16_t x; };
struct __half2 { __half a, b; };
struct __nv_bfloat16 { uint16_t x; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };  // x at the lower address (lower 16 bits)
inline float __half2float(__half h) { return llmkern::cpu::f16_to_f32(h.x); }
inline __half __ushort_as_half(uint16_t u) { return {u}; }
inline uint16_t __half_as_ushort(__half h) { return h.x; }
inline __half __float2half_rn(float f) { return {llmkern::cpu::f32_to_f16(f)}; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.a), __half2float(h.b)}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {llmkern::cpu::f32_to_bf16(f)}; }
inline uint16_t __bfloat16_as_ushort(__nv_bfloat16 b) { return b.x; }
inline float __bfloat162float(__nv_bfloat16 b) { return llmkern::cpu::bf16_to_f32(b.x); }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) { return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)}; }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
// a - b per half, rounded to the format (through double: exact for the kernels' operands, small integers).
inline __half2 __hsub2(__half2 a, __half2 b) {
  return {__float2half_rn(float(double(__half2float(a.a)) - __half2float(b.a))),
          __float2half_rn(float(double(__half2float(a.b)) - __half2float(b.b)))};
}
inline __nv_bfloat162 __hsub2(__nv_bfloat162 a, __nv_bfloat162 b) {
  return {__float2bfloat16_rn(float(double(__bfloat162float(a.x)) - __bfloat162float(b.x))),
          __float2bfloat16_rn(float(double(__bfloat162float(a.y)) - __bfloat162float(b.y)))};
}
inline float __uint_as_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; memcpy(&f, &u, 4); return f; }
inline float __fdiv_rn(float a, float b) { volatile float r = a / b; return r; }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
// 1 + the index of the lowest set bit of x, 0 for x == 0 (CUDA's integer intrinsic)
inline int __ffs(int x) { return __builtin_ffs(x); }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
// fma.rn.f32: one rounding of a * b + c (std::fma, not a compiler contraction that could differ)
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
// prmt.b32 (default mode): byte n of the result = byte (s >> 4n) & 7 of {y, x} (x = bytes 0..3), or that
// byte's sign replicated when bit 3 of the selector nibble is set.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = uint64_t(x) | (uint64_t(y) << 32);
  unsigned r = 0;
  for (int n = 0; n < 4; ++n) {
    const unsigned sel = (s >> (4 * n)) & 0xF;
    unsigned b = unsigned(v >> (8 * (sel & 7))) & 0xFF;
    if (sel & 8) b = (b & 0x80) ? 0xFF : 0;
    r |= b << (8 * n);
  }
  return r;
}
// dp4a: c + the dot product of the four signed (unsigned) bytes of a and b, int32 wrapping.
inline int __dp4a(int a, int b, int c) {
  uint32_t acc = uint32_t(c);
  for (int i = 0; i < 4; ++i) acc += uint32_t(int32_t(int8_t(uint32_t(a) >> (8 * i))) * int32_t(int8_t(uint32_t(b) >> (8 * i))));
  return int(acc);
}
inline unsigned __dp4a(unsigned a, unsigned b, unsigned c) {
  uint32_t acc = c;
  for (int i = 0; i < 4; ++i) acc += ((a >> (8 * i)) & 0xFF) * ((b >> (8 * i)) & 0xFF);
  return acc;
}
inline int __float2int_rn(float v) { return static_cast<int>(std::nearbyint(v)); }
inline float __double2float_rn(double d) { return static_cast<float>(d); }
namespace emu { inline void check_aligned(const void* p, size_t bytes); }
// __ldg: the natural alignment of CUDA's vector types (uint4 / float4 16 bytes, uint2 / float2 8) is checked
// like ld_vec's (a misaligned load faults on the GPU: the launch throws).
template <class T> constexpr size_t cuda_align() {
  return std::is_same<T, uint4>::value || std::is_same<T, float4>::value ? 16
         : std::is_same<T, uint2>::value || std::is_same<T, float2>::value ? 8 : alignof(T);
}
template <class T> inline T __ldg(const T* p) {
  emu::check_aligned(p, cuda_align<T>());
  return *p;
}
[[noreturn]] inline void __trap() { throw std::runtime_error("__trap() executed"); }

using std::max;
using std::min;

namespace emu {
// A blocked fiber: `ready` is re-evaluated by the scheduler; what / a / b describe the wait for errors.
struct WaitOn { std::function<bool()> ready; const char* what = nullptr; uint64_t a = 0, b = 0; };
struct Fiber { ucontext_t ctx; uint3 tid; bool done; char* stack; WaitOn wait; };
struct Barrier { int count = 0; long gen = 0; int expected = 0; };
constexpr size_t kStackBytes = 256 << 10;
constexpr size_t kDynSmemCap = 256 << 10;        // host buffer; a launch may use up to kDynSmemMax
constexpr size_t kDynSmemMax = 227 << 10;        // the sm_90 opt-in maximum per block
constexpr size_t kStaticSmemMax = 48 << 10;      // static __shared__ per kernel
struct State {
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;  // reused across blocks and launches
  int cur = 0, live = 0;
  ucontext_t sched;
  uint3 block{0, 0, 0};
  dim3 bdim, gdim;
  std::vector<Barrier> warp_bar;
  Barrier block_bar;
  std::vector<Barrier> named_bar;  // bar.sync ids 1..15 (0: __syncthreads)
  std::vector<std::vector<uint64_t>> slots;
  std::function<void()> body;
  std::string misaligned;  // first misaligned vector access of the launch (reported after the grid)
  std::exception_ptr error;
  std::string error_where;
  // dynamic shared memory of the running block
  std::vector<unsigned char> dyn_raw;
  unsigned char* dyn = nullptr;
  uint32_t window = 0x410;
  size_t dyn_bytes = 0;
  uint32_t dyn_off = 0;     // extern_smem: the dynamic buffer starts at window + dyn_off (alignment)
  bool dyn_off_set = false;
  // static __shared__ variables of the running launch (static_smem)
  std::vector<unsigned char> st_raw;
  unsigned char* st_mem = nullptr;   // 4096-aligned host arena of kStaticSmemMax bytes
  size_t st_used = 0;
  std::map<const void*, size_t> st_off;  // declaration -> offset in the arena
  uint32_t static_window = 0;        // shared-window address of st_mem
  // hooks of extensions (sm90.cuh): block start / block end / stall (returns true if it made progress)
  std::vector<std::function<void()>> on_block_begin, on_block_end;
  std::vector<std::function<bool()>> on_stall;
  std::vector<std::function<std::string(const WaitOn&)>> describe;
  std::map<const void*, int> max_dyn_smem;  // cudaFuncSetAttribute(MaxDynamicSharedMemorySize) per kernel
};
inline State& S() { static State s; return s; }
inline Fiber& cur_fiber() { return S().fibers[S().cur]; }
inline void yield() { swapcontext(&S().fibers[S().cur].ctx, &S().sched); }
// Blocks the calling thread until ready() holds (checked first; the scheduler re-checks it).
inline void block_until(std::function<bool()> ready, const char* what, uint64_t a = 0, uint64_t b = 0) {
  if (ready()) return;
  Fiber& f = cur_fiber();
  f.wait.ready = std::move(ready);
  f.wait.what = what, f.wait.a = a, f.wait.b = b;
  yield();
  f.wait = WaitOn{};
}
// Lets every other runnable thread run once before continuing.
inline void yield_now() { yield(); }
inline void wait(Barrier& b, int n) {
  const long g = b.gen;
  if (++b.count == n) { b.count = 0; ++b.gen; return; }
  block_until([&b, g] { return b.gen != g; }, "a warp barrier (shuffle / __syncwarp / __any_sync)");
}
inline int lin() { const uint3 t = S().fibers[S().cur].tid; return (t.z * S().bdim.y + t.y) * S().bdim.x + t.x; }
inline int nthreads() { return int(S().bdim.x * S().bdim.y * S().bdim.z); }
inline void warp_sync() { wait(S().warp_bar[lin() / 32], 32); }
// __syncthreads: completes when every thread of the block that has not exited arrived.
inline void release_block_bar() {
  Barrier& b = S().block_bar;
  if (b.count > 0 && b.count >= S().live) { b.count = 0; ++b.gen; }
}
inline void block_sync() {
  Barrier& b = S().block_bar;
  const long g = b.gen;
  ++b.count;
  release_block_bar();
  if (b.gen == g) block_until([&b, g] { return b.gen != g; }, "__syncthreads");
}
// Named barrier `id` (1..15; 0 is __syncthreads) joined with a thread count of `count` (a multiple of 32, at
// most the block's; the same for every thread of one phase).
inline Barrier& named_bar(int id, int count) {
  if (id < 1 || id > 15) throw std::runtime_error("named barrier id " + std::to_string(id) + " (1..15; 0 is __syncthreads)");
  if (count <= 0 || count % 32 || count > nthreads())
    throw std::runtime_error("named barrier " + std::to_string(id) + ": thread count " + std::to_string(count) +
                             " (a multiple of 32, at most the block's " + std::to_string(nthreads()) + ")");
  Barrier& b = S().named_bar[id];
  if (b.count == 0) b.expected = count;
  else if (b.expected != count)
    throw std::runtime_error("named barrier " + std::to_string(id) + " used with counts " + std::to_string(b.expected) +
                             " and " + std::to_string(count) + " in the same phase");
  return b;
}
// bar.sync id, count: waits until `count` threads have arrived (this one included).
inline void named_sync(int id, int count) {
  Barrier& b = named_bar(id, count);
  const long g = b.gen;
  if (++b.count == count) { b.count = 0; ++b.gen; return; }
  block_until([&b, g] { return b.gen != g; }, "a named barrier (bar.sync)", uint64_t(id), uint64_t(count));
}
// bar.arrive id, count: counts towards the phase like bar.sync, without waiting.
inline void named_arrive(int id, int count) {
  Barrier& b = named_bar(id, count);
  if (++b.count == count) { b.count = 0; ++b.gen; }
}
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
inline std::string hex(uint64_t v) {
  char b[24];
  snprintf(b, sizeof b, "0x%llx", static_cast<unsigned long long>(v));
  return b;
}

// ---------------------------------------------------------------- shared memory
inline unsigned char* dyn_smem_base() { return S().dyn; }
// `extern __shared__ __align__(align) T x[]`: the dynamic buffer at the next align-aligned shared address
// (every such declaration of a launch must agree).
inline unsigned char* extern_smem(size_t align) {
  State& s = S();
  if (align < 16) align = 16;
  if (align & (align - 1)) throw std::runtime_error("extern __shared__: alignment " + std::to_string(align));
  const uint32_t off = uint32_t((align - s.window % align) % align);
  if (s.dyn_off_set && s.dyn_off != off)
    throw std::runtime_error("extern __shared__ arrays of one kernel with different alignments");
  s.dyn_off = off;
  s.dyn_off_set = true;
  return s.dyn + off;
}
// `__shared__ __align__(align) T x;` (key: one per declaration and kernel instantiation): placed in the
// launch's static arena at its first use, the same object for every thread and block of the launch.
template <class T>
inline T& static_smem(const void* key, size_t align) {
  State& s = S();
  auto it = s.st_off.find(key);
  if (it == s.st_off.end()) {
    const size_t a = std::max(align, alignof(T));
    const size_t off = (s.st_used + a - 1) / a * a;
    if (off + sizeof(T) > kStaticSmemMax)
      throw std::runtime_error("static __shared__ variables of " + std::to_string(off + sizeof(T)) +
                               " bytes (at most " + std::to_string(kStaticSmemMax) + ")");
    if (off + sizeof(T) + s.dyn_bytes > kDynSmemMax)
      throw std::runtime_error("static (" + std::to_string(off + sizeof(T)) + ") + dynamic (" +
                               std::to_string(s.dyn_bytes) + ") shared memory above " + std::to_string(kDynSmemMax) +
                               " bytes");
    s.st_used = off + sizeof(T);
    it = s.st_off.emplace(key, off).first;
  }
  return *reinterpret_cast<T*>(s.st_mem + it->second);
}
// Shared-window address of a pointer into shared memory, dynamic or static (what cvta.to.shared gives).
inline uint32_t smem_addr(const void* p) {
  const State& s = S();
  const auto* c = static_cast<const unsigned char*>(p);
  if (s.dyn && c >= s.dyn && c < s.dyn + kDynSmemCap) return s.window + uint32_t(c - s.dyn);
  if (s.st_mem && c >= s.st_mem && c < s.st_mem + kStaticSmemMax) return s.static_window + uint32_t(c - s.st_mem);
  throw std::runtime_error("__cvta_generic_to_shared: " + hex(reinterpret_cast<uintptr_t>(p)) +
                           " is not a pointer into shared memory (dynamic or static __shared__)");
}
// Host pointer of `bytes` bytes at shared-window address `addr`, which must lie in the launch's dynamic
// shared memory or in the static __shared__ variables.
inline unsigned char* smem_ptr(uint32_t addr, size_t bytes, const char* what) {
  const State& s = S();
  const uint64_t d0 = uint64_t(s.window) + s.dyn_off, d1 = d0 + s.dyn_bytes;
  if (addr >= d0 && uint64_t(addr) + bytes <= d1) return s.dyn + (addr - s.window);
  const uint64_t s0 = s.static_window, s1 = s0 + s.st_used;
  if (addr >= s0 && uint64_t(addr) + bytes <= s1) return s.st_mem + (addr - s.static_window);
  throw std::runtime_error(std::string(what) + ": shared address " + hex(addr) + " (+" + std::to_string(bytes) +
                           " bytes) outside the block's dynamic shared memory [" + hex(d0) + ", " + hex(d1) +
                           ") and its static __shared__ variables [" + hex(s0) + ", " + hex(s1) + ")");
}

inline void tramp() {
  State& s = S();
  try {
    s.body();
  } catch (const std::exception& e) {
    s.error = std::current_exception();
    s.error_where = e.what();
  } catch (...) {
    s.error = std::current_exception();
    s.error_where = "unknown exception";
  }
  s.fibers[s.cur].done = true;
}
inline std::string describe_wait(const Fiber& f) {
  for (auto& d : S().describe) {
    std::string r = d(f.wait);
    if (!r.empty()) return r;
  }
  std::string r = f.wait.what ? f.wait.what : "?";
  if (f.wait.a || f.wait.b) r += " (" + std::to_string(f.wait.a) + ", " + std::to_string(f.wait.b) + ")";
  return r;
}
inline std::string where() {
  const State& s = S();
  return "block (" + std::to_string(s.block.x) + "," + std::to_string(s.block.y) + "," + std::to_string(s.block.z) + ")";
}
[[noreturn]] inline void deadlock() {
  State& s = S();
  std::string msg = "CUDA emulation: deadlock in " + where() + ": no thread can proceed;";
  const int n = int(s.fibers.size());
  for (int i = 0; i < n;) {
    const std::string d = s.fibers[i].done ? std::string("exited") : describe_wait(s.fibers[i]);
    int j = i + 1;
    while (j < n && (s.fibers[j].done ? std::string("exited") : describe_wait(s.fibers[j])) == d) ++j;
    msg += " thread" + (j - i > 1 ? "s " + std::to_string(i) + "-" + std::to_string(j - 1) : " " + std::to_string(i)) +
           ": " + d + ";";
    i = j;
  }
  throw std::runtime_error(msg);
}
inline void run_block(int n) {
  State& s = S();
  s.live = n;
  for (;;) {
    bool live = false, ran = false;
    for (int i = 0; i < n; ++i) {
      Fiber& f = s.fibers[i];
      if (f.done) continue;
      live = true;
      if (f.wait.ready && !f.wait.ready()) continue;
      ran = true;
      s.cur = i;
      swapcontext(&s.sched, &f.ctx);
      if (s.error) {
        std::exception_ptr e = s.error;
        s.error = nullptr;
        try {
          std::rethrow_exception(e);
        } catch (const std::exception& ex) {
          throw std::runtime_error("CUDA emulation: " + where() + " thread " + std::to_string(i) + ": " + ex.what());
        }
      }
      if (f.done) {
        --s.live;
        release_block_bar();
      }
    }
    if (!live) return;
    if (ran) continue;
    bool moved = false;
    for (auto& h : s.on_stall)
      if (h()) { moved = true; break; }
    if (!moved) deadlock();
  }
}
inline void launch_impl(size_t smem, dim3 grid, dim3 block) {
  State& s = S();
  const int n = block.x * block.y * block.z;
  if (n < 1 || n > 1024 || grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535)
    throw std::runtime_error("CUDA emulation: invalid launch configuration");
  if (smem > kDynSmemMax)
    throw std::runtime_error("CUDA emulation: " + std::to_string(smem) + " bytes of dynamic shared memory (at most " +
                             std::to_string(kDynSmemMax) + ")");
  s.bdim = block;
  s.gdim = grid;
  s.misaligned.clear();
  s.error = nullptr;
  s.dyn_bytes = smem;
  s.dyn_off = 0;
  s.dyn_off_set = false;
  if (const char* w = getenv("LLMKERN_EMU_SMEM_BASE")) s.window = uint32_t(strtoul(w, nullptr, 0)) & ~15u;
  if (s.dyn_raw.empty()) s.dyn_raw.resize(kDynSmemCap + 8192);
  const uintptr_t raw = reinterpret_cast<uintptr_t>(s.dyn_raw.data());
  s.dyn = s.dyn_raw.data() + ((s.window - raw) & 4095);  // host address == window address (mod 4096)
  // static __shared__: a 4096-aligned arena above the dynamic range
  if (s.st_raw.empty()) {
    s.st_raw.resize(kStaticSmemMax + 4096);
    s.st_mem = s.st_raw.data() + ((4096 - (reinterpret_cast<uintptr_t>(s.st_raw.data()) & 4095)) & 4095);
  }
  s.static_window = (s.window + uint32_t(kDynSmemCap) + 2 * 4096u) & ~4095u;
  s.st_used = 0;
  s.st_off.clear();
  while (s.stacks.size() < size_t(n)) s.stacks.emplace_back(new char[kStackBytes]);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        s.block = {bx, by, bz};
        s.fibers.assign(n, Fiber{});
        s.warp_bar.assign((n + 31) / 32, Barrier{});
        s.block_bar = Barrier{};
        s.named_bar.assign(16, Barrier{});
        s.slots.assign((n + 31) / 32, std::vector<uint64_t>(32));
        memset(s.dyn, 0xFF, kDynSmemCap);
        memset(s.st_mem, 0xFF, kStaticSmemMax);
        for (auto& h : s.on_block_begin) h();
        for (int i = 0; i < n; ++i) {
          Fiber& f = s.fibers[i];
          f.tid = {unsigned(i % block.x), unsigned((i / block.x) % block.y), unsigned(i / (block.x * block.y))};
          f.done = false;
          f.stack = s.stacks[i].get();
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack;
          f.ctx.uc_stack.ss_size = kStackBytes;
          f.ctx.uc_link = &s.sched;
          makecontext(&f.ctx, tramp, 0);
        }
        run_block(n);
        for (int id = 1; id < 16; ++id)
          if (s.named_bar[id].count)  // bar.arrive with no matching phase completion: a protocol error
            throw std::runtime_error("CUDA emulation: block ended with named barrier " + std::to_string(id) +
                                     " holding " + std::to_string(s.named_bar[id].count) + " of " +
                                     std::to_string(s.named_bar[id].expected) + " arrivals");
        for (auto& h : s.on_block_end) h();
      }
  if (!s.misaligned.empty()) throw std::runtime_error("CUDA emulation: " + s.misaligned);
}
// `k<<<grid, block, smem, stream>>>(args)` (build_emu.py rewrites launches to this).
constexpr size_t kDynSmemDefault = 48 << 10;  // without the opt-in
template <class K, class... A>
void launch_smem(size_t smem, K kernel, dim3 grid, dim3 block, A... args) {
  if constexpr (std::is_pointer<K>::value) {
    if (smem > kDynSmemDefault) {
      auto it = S().max_dyn_smem.find(reinterpret_cast<const void*>(kernel));
      if (it == S().max_dyn_smem.end() || size_t(it->second) < smem)
        throw std::runtime_error("CUDA emulation: launch with " + std::to_string(smem) + " bytes of dynamic shared "
                                 "memory (above 48 KiB) without cudaFuncSetAttribute(kernel, "
                                 "cudaFuncAttributeMaxDynamicSharedMemorySize, >= that) on this kernel");
    }
  }
  S().body = [=]() { kernel(args...); };
  launch_impl(smem, grid, block);
}
template <class K, class... A>
void launch(K kernel, dim3 grid, dim3 block, A... args) {
  launch_smem(0, kernel, grid, block, args...);
}
}  // namespace emu

template <class F>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, F) { *a = cudaFuncAttributes{}; return cudaSuccess; }
template <class F>
inline cudaError_t cudaFuncSetAttribute(F f, cudaFuncAttribute a, int v) {
  if (a != cudaFuncAttributeMaxDynamicSharedMemorySize || v < 0 || size_t(v) > emu::kDynSmemMax)
    return cudaErrorInvalidValue;
  emu::S().max_dyn_smem[reinterpret_cast<const void*>(f)] = v;
  return cudaSuccess;
}
inline size_t __cvta_generic_to_shared(const void* p) { return emu::smem_addr(p); }

#define LLMKERN_ASSERT_ALIGNED(ptr, bytes) emu::check_aligned((ptr), (bytes))
#define threadIdx (emu::S().fibers[emu::S().cur].tid)
#define blockIdx (emu::S().block)
#define blockDim (emu::S().bdim)
#define gridDim (emu::S().gdim)
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
