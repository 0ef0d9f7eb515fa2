// Self-test kernels of the sm_90a emulation (include/llmkern/cuda/sm90.cuh): small GEMMs through TMA +
// wgmma written against llmkern/cuda/sm90.cuh and sm90_layout.cuh, a TMA producer / consumer ring, a raw
// TMA box; each with `flags` that break one thing (the tests show the emulator notices). Test-only code,
// built into `_C_cuda_emu_sm90` by tests/cuda_emu/test_sm90_emulator.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>

#include "llmkern/cuda/sm90.cuh"
#include "llmkern/cuda/sm90_layout.cuh"
#include "llmkern/cuda/sm90_tma_host.h"

namespace py = pybind11;

namespace llmkern {
namespace sm90test {

using namespace cuda::sm90;

// Dynamic shared memory above 48 KiB needs the per-kernel opt-in (the emulator checks it at launch).
template <class Kernel>
void opt_in(Kernel k, size_t smem) {
  if (smem > 48 * 1024 && cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)) != cudaSuccess)
    throw std::invalid_argument("cudaFuncSetAttribute refused the shared memory size");
}

enum Flags {
  kSkipWait = 1,        // wgmma before waiting for the TMA (waits only after the wgmma_wait)
  kBadSbo = 2,          // A descriptor with SBO 512 (SS) / B descriptor with LBO / 2 (RS)
  kManualA = 4,         // SS: A stored by the threads with tile_offset instead of TMA
  kManualNoSwizzle = 8, // ... without the swizzle
  kNoAlign = 16,        // tiles not 1024-aligned
  kDeadlock = 32,       // barrier count 2, one arrival
  kClobberAcc = 64,     // writes an accumulator between wgmma and wgmma_wait
  kOverwriteA = 128,    // zeroes A in shared memory between wgmma and wgmma_wait
  kNoFence = 256,       // no wgmma_fence
  kWrongMajor = 512,    // RS: B read K-major (TRANS_B = false) although stored MN-major
  kEarlyRelease = 1024, // ring: arrive on the empty barrier before the wgmma_wait
  kClobberA = 2048,     // RS: rewrites an A fragment register between wgmma and wgmma_wait
};

__device__ __forceinline__ unsigned char* aligned_base(int flags) {
  unsigned char* raw = dyn_smem();
  const uint32_t pad = (kSwAtom - (smem_u32(raw) & (kSwAtom - 1))) & (kSwAtom - 1);
  return raw + ((flags & kNoAlign) ? pad + 128 : pad);
}

template <int N>
__device__ __forceinline__ void store_d(const float (&d)[N / 2], float* out) {
  const int t = threadIdx.x % 128;
  for (int i = 0; i < N / 2; ++i) {
    const int r = 16 * (t / 32) + (t % 32) / 4 + 8 * ((i / 2) % 2), c = 8 * (i / 4) + 2 * (t % 4) + i % 2;
    out[r * N + c] = d[i];
  }
}

// out[64][N] = A[64][K] B[N][K]^T; A and B K-major, TMA boxes of 64 columns; 128 threads.
template <typename T, int N>
__global__ void gemm_ss_kernel(const __grid_constant__ TmaMap ta, const __grid_constant__ TmaMap tb, const T* a_glob,
                               int K, float* out, int flags) {
  const int KB = K / 64, tid = threadIdx.x;
  unsigned char* base = aligned_base(flags);
  const uint32_t sb = smem_u32(base);
  auto a_box = [&](int kb) { return sb + uint32_t(kb) * 64 * kSwRow; };
  auto b_box = [&](int kb) { return sb + uint32_t(KB) * 64 * kSwRow + uint32_t(kb) * N * kSwRow; };
  const uint32_t bar = sb + uint32_t(KB) * (64 + N) * kSwRow;
  const bool manual = flags & kManualA;
  if (tid == 0) {
    mbar_init(bar, (flags & kDeadlock) ? 2 : 1);
    mbar_fence_init();
  }
  if (manual) {  // A [64][K] into its boxes by the threads (the layout sm90_layout.cuh says TMA writes)
    for (int e = tid; e < 64 * K; e += blockDim.x) {
      const int r = e / K, c = e % K;
      const uint32_t off = (flags & kManualNoSwizzle) ? uint32_t(c / 64) * 64 * kSwRow + r * kSwRow + (c % 64) * 2
                                                      : tile_offset(64, r, c);
      *reinterpret_cast<T*>(base + off) = a_glob[e];
    }
    fence_proxy_async();
  }
  __syncthreads();
  if (tid == 0) {
    mbar_arrive_expect_tx(bar, uint32_t(KB) * ((manual ? 0 : 64) + N) * kSwRow);
    for (int kb = 0; kb < KB; ++kb) {
      if (!manual) tma_load_4d(a_box(kb), &ta, bar, 64 * kb, 0, 0, 0);
      tma_load_4d(b_box(kb), &tb, bar, 64 * kb, 0, 0, 0);
    }
  }
  if (!(flags & kSkipWait)) mbar_wait(bar, 0);
  float d[N / 2];
  if (!(flags & kNoFence)) wgmma_fence();
  for (int kb = 0; kb < KB; ++kb)
    for (int ks = 0; ks < 4; ++ks) {
      const uint64_t da = (flags & kBadSbo) ? desc_sw128(a_box(kb) + 32 * ks, 16, 512) : desc_k_major(a_box(kb) + 32 * ks);
      wgmma_ss<T, N>(d, da, desc_k_major(b_box(kb) + 32 * ks), (kb | ks) ? 1 : 0);
    }
  wgmma_commit();
  if (flags & kClobberAcc) d[0] = 1.0f;
  if (flags & kOverwriteA)
    for (int e = tid; e < 64 * K / 8; e += blockDim.x) reinterpret_cast<uint4*>(base)[e] = uint4{0, 0, 0, 0};
  wgmma_wait<0>();
  fence_regs(d);
  if (flags & kSkipWait) mbar_wait(bar, 0);  // too late: the wgmma read the shared memory before the data landed
  store_d<N>(d, out);
}

// out[64][N] = A[64][K] B[K][N]; A from registers (fragments read from global memory), B [K][N] MN-major in
// N / 64 TMA boxes of [K rows][64 n]; 128 threads.
template <typename T, int N>
__global__ void gemm_rs_kernel(const __grid_constant__ TmaMap tb, const T* a, int K, float* out, int flags) {
  const int tid = threadIdx.x, t = tid % 128;
  const uint32_t sb = smem_u32(aligned_base(flags));
  const uint32_t box_bytes = uint32_t(K) * kSwRow;
  const uint32_t bar = sb + (N / 64) * box_bytes;
  if (tid == 0) {
    mbar_init(bar, 1);
    mbar_fence_init();
  }
  __syncthreads();
  if (tid == 0) {
    mbar_arrive_expect_tx(bar, (N / 64) * box_bytes);
    for (int j = 0; j < N / 64; ++j) tma_load_4d(sb + j * box_bytes, &tb, bar, 64 * j, 0, 0, 0);
  }
  mbar_wait(bar, 0);
  float d[N / 2];
  wgmma_fence();
  // One fragment per k step: an RS wgmma reads its A registers asynchronously, until the wait that retires it.
  uint32_t frags[K / 16][4];
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t (&frag)[4] = frags[kk];
    for (int j = 0; j < 4; ++j) {
      const int r = 16 * (t / 32) + (t % 32) / 4 + 8 * (j % 2), c = 16 * kk + 2 * (t % 4) + 8 * (j / 2);
      uint16_t lo, hi;
      memcpy(&lo, &a[r * K + c], 2);
      memcpy(&hi, &a[r * K + c + 1], 2);
      frag[j] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
    const uint64_t db = desc_mn_major(sb + 2048 * kk, (flags & kBadSbo) ? box_bytes / 2 : box_bytes);
    if (flags & kWrongMajor) wgmma_rs<T, N, false>(d, frag, db, kk ? 1 : 0);
    else wgmma_rs<T, N, true>(d, frag, db, kk ? 1 : 0);
  }
  if (flags & kClobberA) frags[0][0] ^= 1u;
  wgmma_commit();
  wgmma_wait<0>();
  store_d<N>(d, out);
}

// A ring of 2 stages over `iters` K blocks of 64: out[64][64] = A[64][64 iters] B[64][64 iters]^T. Thread 0
// produces (the rest of warpgroup 0 exits), warpgroup 1 consumes.
template <typename T>
__global__ void ring_kernel(const __grid_constant__ TmaMap ta, const __grid_constant__ TmaMap tb, int iters, float* out,
                            int flags) {
  const int tid = threadIdx.x;
  const uint32_t sb = smem_u32(aligned_base(0));
  constexpr uint32_t kStage = 2 * 64 * kSwRow;
  auto full = [&](int s) { return sb + 2 * kStage + 8 * s; };
  auto empty = [&](int s) { return sb + 2 * kStage + 16 + 8 * s; };
  if (tid == 0) {
    for (int s = 0; s < 2; ++s) mbar_init(full(s), 1), mbar_init(empty(s), 128);
    mbar_fence_init();
  }
  __syncthreads();
  if (tid < 128) {
    setmaxnreg_dec<40>();
    if (tid != 0) return;
    tma_prefetch_map(&ta);
    for (int it = 0; it < iters; ++it) {
      const int s = it % 2, ph = (it / 2) & 1;
      mbar_wait(empty(s), ph ^ 1);
      mbar_arrive_expect_tx(full(s), kStage);
      tma_load_4d(sb + s * kStage, &ta, full(s), 64 * it, 0, 0, 0);
      tma_load_4d(sb + s * kStage + kStage / 2, &tb, full(s), 64 * it, 0, 0, 0);
    }
    return;
  }
  setmaxnreg_inc<232>();
  float d[32];
  for (int it = 0; it < iters; ++it) {
    const int s = it % 2, ph = (it / 2) & 1;
    mbar_wait(full(s), ph);
    wgmma_fence();
    for (int ks = 0; ks < 4; ++ks)
      wgmma_ss<T, 64>(d, desc_k_major(sb + s * kStage + 32 * ks), desc_k_major(sb + s * kStage + kStage / 2 + 32 * ks),
                      (it | ks) ? 1 : 0);
    wgmma_commit();
    if (flags & kEarlyRelease) {
      mbar_arrive(empty(s));
      wgmma_wait<0>();
    } else {
      wgmma_wait<0>();
      mbar_arrive(empty(s));
    }
  }
  named_barrier_sync(1, 128);
  store_d<64>(d, out);
}

// One TMA box into shared memory, copied out raw (swizzled) to `out`; 32 threads.
__global__ void tma_box_kernel(const __grid_constant__ TmaMap m, int c0, int c1, int c2, int c3, unsigned char* out,
                               int bytes) {
  const int tid = threadIdx.x;
  unsigned char* base = aligned_base(0);
  const uint32_t sb = smem_u32(base), bar = sb + uint32_t(bytes);
  if (tid == 0) {
    mbar_init(bar, 1);
    mbar_fence_init();
  }
  __syncthreads();
  if (tid == 0) {
    mbar_arrive_expect_tx(bar, uint32_t(bytes));
    tma_load_4d(sb, &m, bar, c0, c1, c2, c3);
  }
  mbar_wait(bar, 0);
  for (int i = tid; i < bytes; i += 32) out[i] = base[i];
}

// out[64][N] = init + A[64][K] B[N][K]^T in int8 -> int32 (wrapping); 2-D uint8 maps, boxes of 128 columns;
// k32 steps of +32 bytes; 128 threads.
template <int N>
__global__ void gemm_s8_kernel(const __grid_constant__ TmaMap ta, const __grid_constant__ TmaMap tb, int K, int32_t* out,
                               int init) {
  const int KB = K / 128, tid = threadIdx.x;
  const uint32_t sb = smem_u32(aligned_base(0));
  auto a_box = [&](int kb) { return sb + uint32_t(kb) * 64 * kSwRow; };
  auto b_box = [&](int kb) { return sb + uint32_t(KB) * 64 * kSwRow + uint32_t(kb) * N * kSwRow; };
  const uint32_t bar = sb + uint32_t(KB) * (64 + N) * kSwRow;
  if (tid == 0) {
    mbar_init(bar, 1);
    mbar_fence_init();
  }
  __syncthreads();
  if (tid == 0) {
    mbar_arrive_expect_tx(bar, uint32_t(KB) * (64 + N) * kSwRow);
    for (int kb = 0; kb < KB; ++kb) {
      tma_load_2d(a_box(kb), &ta, bar, 128 * kb, 0);
      tma_load_2d(b_box(kb), &tb, bar, 128 * kb, 0);
    }
  }
  mbar_wait(bar, 0);
  int32_t d[N / 2];
  for (int i = 0; i < N / 2; ++i) d[i] = init;
  wgmma_fence();
  for (int kb = 0; kb < KB; ++kb)
    for (int ks = 0; ks < 4; ++ks) wgmma_ss_s8<N>(d, desc_k_major(a_box(kb) + 32 * ks), desc_k_major(b_box(kb) + 32 * ks), 1);
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs(d);
  const int t = tid % 128;
  for (int i = 0; i < N / 2; ++i)
    out[(16 * (t / 32) + (t % 32) / 4 + 8 * ((i / 2) % 2)) * N + 8 * (i / 4) + 2 * (t % 4) + i % 2] = d[i];
}

// Threads 64.. exit; the rest meet at __syncthreads (which counts the threads that have not exited) or,
// mode 1, at a named barrier of 128 threads that never fills (a deadlock).
__global__ void barrier_kernel(int mode, int* out) {
  const int tid = threadIdx.x;
  if (tid >= 64) return;
  if (mode == 0) __syncthreads();
  else named_barrier_sync(1, 128);
  out[tid] = 1;
}

bool map2d(TmaMap* m, bool bf16, const void* p, uint64_t cols, uint64_t rows, uint32_t box_rows) {
  const uint64_t dims[4] = {cols, rows, 1, 1}, strides[3] = {cols * 2, cols * rows * 2, cols * rows * 2};
  const uint32_t box[4] = {64, box_rows, 1, 1};
  return encode_tma_4d(m, bf16, p, dims, strides, box);
}

template <typename T>
void gemm_ss(int N, int K, const void* a, const void* b, float* out, int flags) {
  TmaMap ta, tb;
  if (!map2d(&ta, std::is_same<T, __nv_bfloat16>::value, a, K, 64, 64) ||
      !map2d(&tb, std::is_same<T, __nv_bfloat16>::value, b, K, N, N))
    throw std::invalid_argument("encode_tma_4d refused the maps");
  const size_t smem = size_t(K / 64) * (64 + N) * kSwRow + 8 + 2 * kSwAtom;
  opt_in(gemm_ss_kernel<T, 64>, smem);
  opt_in(gemm_ss_kernel<T, 128>, smem);
  if (N == 64) gemm_ss_kernel<T, 64><<<1, 128, smem, 0>>>(ta, tb, static_cast<const T*>(a), K, out, flags);
  else gemm_ss_kernel<T, 128><<<1, 128, smem, 0>>>(ta, tb, static_cast<const T*>(a), K, out, flags);
}

template <typename T>
void gemm_rs(int N, int K, const void* a, const void* b, float* out, int flags) {
  TmaMap tb;
  const uint64_t dims[4] = {uint64_t(N), uint64_t(K), 1, 1}, strides[3] = {uint64_t(N) * 2, uint64_t(N * K) * 2,
                                                                          uint64_t(N * K) * 2};
  const uint32_t box[4] = {64, uint32_t(K), 1, 1};
  if (!encode_tma_4d(&tb, std::is_same<T, __nv_bfloat16>::value, b, dims, strides, box))
    throw std::invalid_argument("encode_tma_4d refused the map");
  const size_t smem = size_t(N / 64) * K * kSwRow + 8 + 2 * kSwAtom;
  opt_in(gemm_rs_kernel<T, 64>, smem);
  opt_in(gemm_rs_kernel<T, 128>, smem);
  if (N == 64) gemm_rs_kernel<T, 64><<<1, 128, smem, 0>>>(tb, static_cast<const T*>(a), K, out, flags);
  else gemm_rs_kernel<T, 128><<<1, 128, smem, 0>>>(tb, static_cast<const T*>(a), K, out, flags);
}

template <typename T>
void ring(int iters, const void* a, const void* b, float* out, int flags) {
  TmaMap ta, tb;
  const bool bf = std::is_same<T, __nv_bfloat16>::value;
  if (!map2d(&ta, bf, a, 64 * iters, 64, 64) || !map2d(&tb, bf, b, 64 * iters, 64, 64))
    throw std::invalid_argument("encode_tma_4d refused the maps");
  opt_in(ring_kernel<T>, 4 * 64 * kSwRow + 32 + kSwAtom);
  ring_kernel<T><<<dim3(1, 1, 1), dim3(256, 1, 1), 4 * 64 * kSwRow + 32 + kSwAtom, 0>>>(ta, tb, iters, out, flags);
}

void gemm_s8(int N, int K, const void* a, const void* b, int32_t* out, int init) {
  TmaMap ta, tb;
  if (!encode_tma_2d_i8(&ta, a, K, 64, K, 128, 64) || !encode_tma_2d_i8(&tb, b, K, N, K, 128, N))
    throw std::invalid_argument("encode_tma_2d_i8 refused the maps");
  const size_t smem = size_t(K / 128) * (64 + N) * kSwRow + 8 + 2 * kSwAtom;
  opt_in(gemm_s8_kernel<128>, smem);
  opt_in(gemm_s8_kernel<256>, smem);
  if (N == 128) gemm_s8_kernel<128><<<1, 128, smem, 0>>>(ta, tb, K, out, init);
  else gemm_s8_kernel<256><<<1, 128, smem, 0>>>(ta, tb, K, out, init);
}

}  // namespace sm90test

void bind_sm90_selftest(py::module_& m) {
  using namespace sm90test;
  auto p = [](std::uintptr_t x) { return reinterpret_cast<void*>(x); };
  m.def("gemm_ss", [p](bool bf16, int N, int K, std::uintptr_t a, std::uintptr_t b, std::uintptr_t out, int flags) {
    if (bf16) gemm_ss<__nv_bfloat16>(N, K, p(a), p(b), static_cast<float*>(p(out)), flags);
    else gemm_ss<__half>(N, K, p(a), p(b), static_cast<float*>(p(out)), flags);
  });
  m.def("gemm_rs", [p](bool bf16, int N, int K, std::uintptr_t a, std::uintptr_t b, std::uintptr_t out, int flags) {
    if (bf16) gemm_rs<__nv_bfloat16>(N, K, p(a), p(b), static_cast<float*>(p(out)), flags);
    else gemm_rs<__half>(N, K, p(a), p(b), static_cast<float*>(p(out)), flags);
  });
  m.def("ring", [p](bool bf16, int iters, std::uintptr_t a, std::uintptr_t b, std::uintptr_t out, int flags) {
    if (bf16) ring<__nv_bfloat16>(iters, p(a), p(b), static_cast<float*>(p(out)), flags);
    else ring<__half>(iters, p(a), p(b), static_cast<float*>(p(out)), flags);
  });
  m.def("encode", [p](std::uintptr_t base, std::array<uint64_t, 4> dims, std::array<uint64_t, 3> strides,
                      std::array<uint32_t, 4> box) {
    cuda::sm90::TmaMap map;
    return cuda::sm90::encode_tma_4d(&map, true, p(base), dims.data(), strides.data(), box.data());
  });
  m.def("tma_box", [p](std::uintptr_t base, std::array<uint64_t, 4> dims, std::array<uint64_t, 3> strides,
                       std::array<uint32_t, 4> box, std::array<int, 4> c, std::uintptr_t out) {
    cuda::sm90::TmaMap map;
    if (!cuda::sm90::encode_tma_4d(&map, true, p(base), dims.data(), strides.data(), box.data()))
      throw std::invalid_argument("encode_tma_4d refused the map");
    const int bytes = int(box[0] * box[1] * box[2] * box[3] * 2);
    opt_in(tma_box_kernel, size_t(bytes) + 8 + 2 * 1024);
    tma_box_kernel<<<1, 32, size_t(bytes) + 8 + 2 * 1024, 0>>>(map, c[0], c[1], c[2], c[3],
                                                              static_cast<unsigned char*>(p(out)), bytes);
  });
  m.def("gemm_s8", [p](int N, int K, std::uintptr_t a, std::uintptr_t b, std::uintptr_t out, int init) {
    gemm_s8(N, K, p(a), p(b), static_cast<int32_t*>(p(out)), init);
  });
  m.def("barriers", [p](int mode, std::uintptr_t out) {
    barrier_kernel<<<1, 128, 0, 0>>>(mode, static_cast<int*>(p(out)));
  });
  m.attr("flags") = py::dict(py::arg("skip_wait") = int(kSkipWait), py::arg("bad_sbo") = int(kBadSbo),
                             py::arg("manual_a") = int(kManualA), py::arg("manual_no_swizzle") = int(kManualNoSwizzle),
                             py::arg("no_align") = int(kNoAlign), py::arg("deadlock") = int(kDeadlock),
                             py::arg("clobber_acc") = int(kClobberAcc), py::arg("clobber_a") = int(kClobberA),
                             py::arg("overwrite_a") = int(kOverwriteA),
                             py::arg("no_fence") = int(kNoFence), py::arg("wrong_major") = int(kWrongMajor),
                             py::arg("early_release") = int(kEarlyRelease));
}

}  // namespace llmkern
