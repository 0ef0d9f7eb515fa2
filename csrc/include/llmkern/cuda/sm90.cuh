// Hopper (sm_90a) primitives for llmkern's warp-specialized kernels: mbarriers, TMA tensor loads,
// warpgroup MMA (wgmma) and the fences and barriers between them. Torch-free; one inline-asm wrapper per
// PTX instruction, nothing else, so that the CPU emulator (tests/cuda_emu/include/llmkern/cuda/sm90.cuh
// shadows this file there) can stand in for each one. Layout arithmetic (descriptors, swizzle) is NOT
// here but in sm90_layout.cuh, which the emulator compiles as is.
//
// Addresses of shared memory are 32-bit shared-window addresses (`smem_u32`). Every wrapper is only
// meaningful on sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); on other targets the bodies are empty and the kernels
// that use them trap (their launchers only launch them on a compute-capability-9.0 device).
#pragma once

#include <cuda.h>  // CUtensorMap (a 128-byte opaque struct; no driver symbol is linked here)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LLMKERN_SM90A 1
#endif

namespace llmkern {
namespace cuda {
namespace sm90 {

using TmaMap = CUtensorMap;

// The dynamic shared memory of the block (declared once here; the caller aligns it).
__device__ __forceinline__ unsigned char* dyn_smem() {
  extern __shared__ __align__(1024) unsigned char llmkern_sm90_dyn_smem[];
  return llmkern_sm90_dyn_smem;
}
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---------------------------------------------------------------- mbarriers (64-bit, in shared memory)

// Initializes the barrier at `bar` to expect `count` arrivals per phase (phase 0 first).
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
#ifdef LLMKERN_SM90A
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#endif
}
// Makes the initializations of this thread visible to the async proxy (TMA) and to other threads;
// follow with a block-wide barrier.
__device__ __forceinline__ void mbar_fence_init() {
#ifdef LLMKERN_SM90A
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
// One arrival that also raises the phase's expected transaction count by `bytes` (the bytes the TMA
// loads signalling this barrier will deliver).
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
#ifdef LLMKERN_SM90A
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
#endif
}
// One arrival (release semantics: this thread's earlier shared-memory reads and writes happen before).
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
#ifdef LLMKERN_SM90A
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
#endif
}
// Waits until the phase with parity `parity` (0 or 1) of the barrier has completed (acquire).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
#ifdef LLMKERN_SM90A
  asm volatile(
      "{\n.reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
#endif
}

// ---------------------------------------------------------------- TMA

// Copies the box of `map` at element coordinates (c0, c1, c2, c3) (innermost first) into shared memory
// at `dst` (1024-byte aligned for the 128-byte swizzle), completing `bytes` of the barrier's transaction
// count when it lands. Elements outside the tensor are written as zeros.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const TmaMap* map, uint32_t bar, int c0, int c1, int c2,
                                            int c3) {
#ifdef LLMKERN_SM90A
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], "
      "[%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
#endif
}
// The 2-D form: box of `map` at (c0, c1) (innermost first); otherwise as tma_load_4d.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const TmaMap* map, uint32_t bar, int c0, int c1) {
#ifdef LLMKERN_SM90A
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
#endif
}
// Fetches the tensor map (a __grid_constant__ kernel parameter) into the descriptor cache ahead of use.
__device__ __forceinline__ void tma_prefetch_map(const TmaMap* map) {
#ifdef LLMKERN_SM90A
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
#endif
}

// ---------------------------------------------------------------- fences, barriers, registers

// Orders this thread's generic-proxy shared-memory writes before later async-proxy reads (wgmma, TMA).
__device__ __forceinline__ void fence_proxy_async() {
#ifdef LLMKERN_SM90A
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// Barrier `id` (1..15; 0 is __syncthreads) over `count` threads (a multiple of 32).
__device__ __forceinline__ void named_barrier_sync(int id, int count) {
#ifdef LLMKERN_SM90A
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
#endif
}
// Arrives at barrier `id` without waiting (bar.arrive): counts towards the `count` threads that complete the
// barrier's phase together with those waiting in named_barrier_sync(id, count).
__device__ __forceinline__ void named_barrier_arrive(int id, int count) {
#ifdef LLMKERN_SM90A
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
#endif
}
template <int R>
__device__ __forceinline__ void setmaxnreg_dec() {
#ifdef LLMKERN_SM90A
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R));
#endif
}
template <int R>
__device__ __forceinline__ void setmaxnreg_inc() {
#ifdef LLMKERN_SM90A
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R));
#endif
}

// ---------------------------------------------------------------- warpgroup MMA

// Before the first wgmma of a group: orders this warpgroup's earlier register and shared-memory accesses
// before the wgmmas that read them.
__device__ __forceinline__ void wgmma_fence() {
#ifdef LLMKERN_SM90A
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifdef LLMKERN_SM90A
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
// Waits until at most N committed wgmma groups of this warpgroup are pending.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#ifdef LLMKERN_SM90A
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Keeps the compiler from moving accesses of accumulator registers into the asynchronous window
// (between a wgmma and the wait that retires it).
template <int R>
__device__ __forceinline__ void fence_regs(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int R>
__device__ __forceinline__ void fence_regs(int32_t (&a)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+r"(a[i])::"memory");
}

}  // namespace sm90
}  // namespace cuda
}  // namespace llmkern

#include "llmkern/cuda/sm90_wgmma.cuh"
