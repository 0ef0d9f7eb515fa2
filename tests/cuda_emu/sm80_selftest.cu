// Self-test kernels of the sm_80 emulation (include/llmkern/cuda/sm80.cuh): cp.async groups, ldmatrix (plain
// and .trans) and mma.sync (f16 / bf16 / s8) called through llmkern/cuda/sm80.cuh's wrappers, each with modes
// that break one rule (the tests show the emulator notices). The fragments here are loaded per lane by
// plain indexing written from the PTX ISA's fragment formulas. Test-only code, built into `_C_cuda_emu_sm80`
// by tests/cuda_emu/test_sm80_emulator.py.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>

#include "llmkern/cuda/sm80.cuh"

namespace py = pybind11;

namespace llmkern {
namespace sm80test {

using namespace cuda;

__device__ __forceinline__ uint32_t saddr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// One warp; thread t copies src[16 t .. 16 t + 16) into chunk t of a static shared array. out: 512 bytes
// (the chunks as the mode reads them) .. see test_sm80_emulator.py for the modes.
__global__ void cp_async_kernel(const unsigned char* src, unsigned char* out, int mode) {
  __shared__ __align__(128) unsigned char sm[2][512];
  const int t = threadIdx.x;
  unsigned char* mine = sm[0] + 16 * t;
  switch (mode) {
    case 0:  // correct: copy, commit, wait, barrier, read a neighbour's chunk
      cp_async16(saddr(mine), src + 16 * t, 16);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      memcpy(out + 16 * t, sm[0] + 16 * ((t + 1) % 32), 16);
      return;
    case 1:  // reads its own chunk before the wait
      cp_async16(saddr(mine), src + 16 * t, 16);
      cp_async_commit();
      memcpy(out + 16 * t, mine, 16);
      cp_async_wait<0>();
      return;
    case 2:  // two groups; wait_group 1 completes the older one only
      cp_async16(saddr(mine), src + 16 * t, 16);
      cp_async_commit();
      cp_async16(saddr(sm[1] + 16 * t), src + 16 * t, 16);
      cp_async_commit();
      cp_async_wait<1>();
      memcpy(out + 16 * t, t % 2 ? sm[1] + 16 * t : mine, 16);  // odd lanes: the pending group (poison)
      cp_async_wait<0>();
      return;
    case 3:  // src-size t % 17: the first t % 17 bytes copied, the rest zeros
      cp_async16(saddr(mine), src + 16 * t, t % 17);
      cp_async_commit();
      cp_async_wait<0>();
      memcpy(out + 16 * t, mine, 16);
      return;
    case 4:  // misaligned shared destination
      cp_async16(saddr(mine) + 8, src + 16 * t, 16);
      break;
    case 5:  // misaligned global source
      cp_async16(saddr(mine), src + 16 * t + 4, 16);
      break;
    case 6:  // two copies in flight to the same 16 bytes
      cp_async16(saddr(mine), src + 16 * t, 16);
      cp_async16(saddr(mine), src + 16 * ((t + 1) % 32), 16);
      break;
    case 7:  // exits with a copy never waited for
      cp_async16(saddr(mine), src + 16 * t, 16);
      cp_async_commit();
      return;
    case 8:  // waits for its own copy only: another thread's chunk without a barrier
      cp_async16(saddr(mine), src + 16 * t, 16);
      cp_async_commit();
      cp_async_wait<0>();
      memcpy(out + 16 * t, sm[0] + 16 * ((t + 1) % 32), 16);
      return;
    case 9: {  // ldmatrix of chunks with copies in flight
      cp_async16(saddr(mine), src + 16 * t, 16);
      cp_async_commit();
      uint32_t r[4];
      ldmatrix_x4(saddr(sm[0] + 16 * t), r[0], r[1], r[2], r[3]);
      break;
    }
    case 10:  // copies never committed are not completed by wait_group 0
      cp_async16(saddr(mine), src + 16 * t, 16);
      cp_async_wait<0>();
      memcpy(out + 16 * t, mine, 16);
      cp_async_commit();
      cp_async_wait<0>();
      return;
    case 11:  // a pointer that is not shared memory
      cp_async16(saddr(out), src, 16);
      break;
  }
  cp_async_commit();
  cp_async_wait<0>();
}

// One warp: 4 matrices of 8 x 8 16-bit values m[i][r][c] = 256 i + 16 r + c stored at rows in a permuted
// order (row r of matrix i at shared row perm(i, r)); lane l gives the address of row l % 8 of matrix l / 8.
// out[l][i] = register i of lane l.
__global__ void ldmatrix_kernel(int trans, uint32_t* out, int mode) {
  __shared__ __align__(16) uint16_t sm[32][8];
  const int l = threadIdx.x;
  auto perm = [](int i, int r) { return (5 * (8 * i + r) + 3) % 32; };
  for (int c = 0; c < 8; ++c) sm[perm(l / 8, l % 8)][c] = uint16_t(256 * (l / 8) + 16 * (l % 8) + c);
  __syncwarp();
  uint32_t r[4];
  uint32_t a = saddr(sm[perm(l / 8, l % 8)]);
  if (mode == 1) a += 4;  // misaligned row address
  if (mode == 2 && l >= 16) {  // half of the warp at another collective
    float d[4] = {0, 0, 0, 0};
    const uint32_t z[4] = {0, 0, 0, 0};
    mma_f16(d, z, 0, 0);
    return;
  }
  if (mode == 3 && l == 31) return;  // a lane has exited
  if (trans) ldmatrix_x4_trans(a, r[0], r[1], r[2], r[3]);
  else ldmatrix_x4(a, r[0], r[1], r[2], r[3]);
  for (int i = 0; i < 4; ++i) out[4 * l + i] = r[i];
}

// One warp: D[16][8] = A[16][K] B[K][8] + C, A row-major [16][K], B given as Bt[8][K] ("col"), fragments
// loaded per lane from the PTX formulas (K = 16 halves or 32 bytes; g = lane / 4, t = lane % 4):
// 16-bit A element i (0..7): row g + 8 ((i / 2) % 2), column 2 t + i % 2 + 8 (i / 4); B element i (0..3):
// row (k) 2 t + i % 2 + 8 (i / 2), column g; s8 A element i (0..15): row g + 8 ((i / 4) % 2), column
// 4 t + i % 4 + 16 (i / 8); B element i (0..7): row 4 t + i % 4 + 16 (i / 4), column g; C / D element i:
// row g + 8 (i / 2), column 2 t + i % 2. kind 0 f16, 1 bf16, 2 s8.
__global__ void mma_kernel(int kind, const void* a, const void* bt, const void* c, void* d) {
  const int l = threadIdx.x, g = l / 4, t = l % 4;
  uint32_t af[4] = {0, 0, 0, 0}, bf[2] = {0, 0};
  if (kind < 2) {
    const uint16_t* A = static_cast<const uint16_t*>(a);
    const uint16_t* B = static_cast<const uint16_t*>(bt);
    for (int i = 0; i < 8; ++i)
      af[i / 2] |= uint32_t(A[(g + 8 * ((i / 2) % 2)) * 16 + 2 * t + i % 2 + 8 * (i / 4)]) << (16 * (i % 2));
    for (int i = 0; i < 4; ++i) bf[i / 2] |= uint32_t(B[g * 16 + 2 * t + i % 2 + 8 * (i / 2)]) << (16 * (i % 2));
    float acc[4];
    for (int i = 0; i < 4; ++i) acc[i] = static_cast<const float*>(c)[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2];
    if (kind == 0) mma_f16(acc, af, bf[0], bf[1]);
    else mma_bf16(acc, af, bf[0], bf[1]);
    for (int i = 0; i < 4; ++i) static_cast<float*>(d)[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = acc[i];
  } else {
    const uint8_t* A = static_cast<const uint8_t*>(a);
    const uint8_t* B = static_cast<const uint8_t*>(bt);
    for (int i = 0; i < 16; ++i)
      af[i / 4] |= uint32_t(A[(g + 8 * ((i / 4) % 2)) * 32 + 4 * t + i % 4 + 16 * (i / 8)]) << (8 * (i % 4));
    for (int i = 0; i < 8; ++i) bf[i / 4] |= uint32_t(B[g * 32 + 4 * t + i % 4 + 16 * (i / 4)]) << (8 * (i % 4));
    int acc[4];
    for (int i = 0; i < 4; ++i) acc[i] = static_cast<const int*>(c)[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2];
    mma_s8(acc, af, bf[0], bf[1]);
    for (int i = 0; i < 4; ++i) static_cast<int*>(d)[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = acc[i];
  }
}

__global__ void exp2_kernel(const float* x, float* y, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) y[i] = fast_exp2(x[i]);
}

__global__ void lop3_kernel(const uint32_t* a, const uint32_t* b, const uint32_t* c, uint32_t* d, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) d[i] = lop3_and_or(a[i], b[i], c[i]);
}

// 16-byte __ldg at byte offset `off` of p; dynamic shared memory of the launch written at its last byte.
__global__ void misc_kernel(const unsigned char* p, int off, unsigned* out, int smem) {
  extern __shared__ __align__(16) unsigned char dyn[];
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p + off));
  dyn[smem - 1] = 1;
  out[threadIdx.x] = v.x + dyn[smem - 1];
}

}  // namespace sm80test

void bind_sm80_selftest(py::module_& m) {
  using namespace sm80test;
  auto p = [](std::uintptr_t x) { return reinterpret_cast<void*>(x); };
  m.def("cp_async", [p](std::uintptr_t src, std::uintptr_t out, int mode) {
    cp_async_kernel<<<2, 32, 0, 0>>>(static_cast<const unsigned char*>(p(src)), static_cast<unsigned char*>(p(out)), mode);
  });
  m.def("ldmatrix", [p](bool trans, std::uintptr_t out, int mode) {
    ldmatrix_kernel<<<1, 32, 0, 0>>>(trans ? 1 : 0, static_cast<uint32_t*>(p(out)), mode);
  });
  m.def("mma", [p](int kind, std::uintptr_t a, std::uintptr_t bt, std::uintptr_t c, std::uintptr_t d) {
    mma_kernel<<<1, 32, 0, 0>>>(kind, p(a), p(bt), p(c), p(d));
  });
  m.def("misc", [p](std::uintptr_t src, int off, std::uintptr_t out, int smem, bool opt_in) {
    if (opt_in && cudaFuncSetAttribute(misc_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess)
      throw std::invalid_argument("cudaFuncSetAttribute refused");
    misc_kernel<<<1, 32, smem, 0>>>(static_cast<const unsigned char*>(p(src)), off, static_cast<unsigned*>(p(out)), smem);
  });
  m.def("lop3_and_or", [p](std::uintptr_t a, std::uintptr_t b, std::uintptr_t c, std::uintptr_t d, int n) {
    lop3_kernel<<<1, 32, 0, 0>>>(static_cast<const uint32_t*>(p(a)), static_cast<const uint32_t*>(p(b)),
                                 static_cast<const uint32_t*>(p(c)), static_cast<uint32_t*>(p(d)), n);
  });
  m.def("exp2", [p](std::uintptr_t x, std::uintptr_t y, int n) {
    exp2_kernel<<<1, 32, 0, 0>>>(static_cast<const float*>(p(x)), static_cast<float*>(p(y)), n);
  });
}

}  // namespace llmkern
