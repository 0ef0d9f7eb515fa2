// Host emulation of the CUDA subset that llmkern's decode-side kernels use (tests/cuda_emu): every thread
// of a CTA is a fiber (ucontext) of one OS thread; CTAs run one after another; warp shuffles, __any_sync,
// __syncwarp and __syncthreads are barriers that switch fibers cooperatively. Arithmetic is the host's
// IEEE fp32/fp64 (no FMA contraction on x86-64 without -mfma); exp2f/tanhf are libm's. It checks the
// kernels' index arithmetic, reductions and numerics on machines without a GPU; it cannot catch
// data races between barriers (threads run in a fixed order) nor register or occupancy limits. Vector accesses made through ld_vec / ldg_vec /
// st_vec (llmkern/cuda/kv_rotary_common.cuh) are checked for alignment: the launch then throws. Test-only.
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
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline float2 make_float2(float a, float b) { return {a, b}; }
typedef void* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated error"; }
// The emulated device: compute capability 9.0 (sm_90a kernels run), 132 SMs.
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrComputeCapabilityMajor = 75,
                      cudaDevAttrComputeCapabilityMinor = 76 };
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
  }
  return cudaErrorInvalidValue;
}

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
  // hooks of extensions (sm90.cuh): block start / block end / stall (returns true if it made progress)
  std::vector<std::function<void()>> on_block_begin, on_block_end;
  std::vector<std::function<bool()>> on_stall;
  std::vector<std::function<std::string(const WaitOn&)>> describe;
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
// bar.sync id, count (named barriers 1..15): `count` threads (a multiple of 32) of the block.
inline void named_sync(int id, int count) {
  if (id < 1 || id > 15) throw std::runtime_error("named barrier id " + std::to_string(id) + " (1..15; 0 is __syncthreads)");
  if (count <= 0 || count % 32 || count > nthreads())
    throw std::runtime_error("named barrier " + std::to_string(id) + ": thread count " + std::to_string(count) +
                             " (a multiple of 32, at most the block's " + std::to_string(nthreads()) + ")");
  Barrier& b = S().named_bar[id];
  if (b.count == 0) b.expected = count;
  else if (b.expected != count)
    throw std::runtime_error("named barrier " + std::to_string(id) + " used with counts " + std::to_string(b.expected) +
                             " and " + std::to_string(count) + " in the same phase");
  const long g = b.gen;
  if (++b.count == count) { b.count = 0; ++b.gen; return; }
  block_until([&b, g] { return b.gen != g; }, "a named barrier (bar.sync)", uint64_t(id), uint64_t(count));
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

// ---------------------------------------------------------------- dynamic shared memory
inline unsigned char* dyn_smem_base() { return S().dyn; }
// Shared-window address of a pointer into the dynamic shared memory (what cvta.to.shared gives).
inline uint32_t smem_addr(const void* p) {
  const State& s = S();
  const auto* c = static_cast<const unsigned char*>(p);
  if (!s.dyn || c < s.dyn || c >= s.dyn + kDynSmemCap)
    throw std::runtime_error("shared-window address of a pointer outside the dynamic shared memory (the emulator "
                             "models only dynamic shared memory for sm_90 operations)");
  return s.window + uint32_t(c - s.dyn);
}
// Host pointer of `bytes` bytes at shared-window address `addr`, which must lie in the launch's dynamic
// shared memory.
inline unsigned char* smem_ptr(uint32_t addr, size_t bytes, const char* what) {
  const State& s = S();
  if (addr < s.window || uint64_t(addr) + bytes > uint64_t(s.window) + s.dyn_bytes)
    throw std::runtime_error(std::string(what) + ": shared address " + hex(addr) + " (+" + std::to_string(bytes) +
                             " bytes) outside the block's dynamic shared memory [" + hex(s.window) + ", " +
                             hex(s.window + s.dyn_bytes) + ")");
  return s.dyn + (addr - s.window);
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
  if (const char* w = getenv("LLMKERN_EMU_SMEM_BASE")) s.window = uint32_t(strtoul(w, nullptr, 0)) & ~15u;
  if (s.dyn_raw.empty()) s.dyn_raw.resize(kDynSmemCap + 8192);
  const uintptr_t raw = reinterpret_cast<uintptr_t>(s.dyn_raw.data());
  s.dyn = s.dyn_raw.data() + ((s.window - raw) & 4095);  // host address == window address (mod 4096)
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
        for (auto& h : s.on_block_end) h();
      }
  if (!s.misaligned.empty()) throw std::runtime_error("CUDA emulation: " + s.misaligned);
}
// `k<<<grid, block, smem, stream>>>(args)` (build_emu.py rewrites launches to this).
template <class K, class... A>
void launch_smem(size_t smem, K kernel, dim3 grid, dim3 block, A... args) {
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
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int v) {
  return v >= 0 && size_t(v) <= emu::kDynSmemMax ? cudaSuccess : cudaErrorInvalidValue;
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
