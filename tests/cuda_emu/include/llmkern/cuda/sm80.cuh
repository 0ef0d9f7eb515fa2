// CPU emulation of llmkern/cuda/sm80.cuh (the sm_80 primitives: cp.async, ldmatrix, mma.sync) for the fiber
// emulator (tests/cuda_emu/include/cuda_runtime.h). It shadows the real header on the emulator's include
// path; the model below is written from the PTX ISA (sections "cp.async", "cp.async.commit_group",
// "cp.async.wait_group", "ldmatrix", "Matrix Fragments for mma.m16n8k16 with floating point type",
// "Matrix Fragments for mma.m16n8k32"), not from the kernels' formulas, so that the kernels' fragment and
// address arithmetic is checked against it. g = lane / 4, t = lane % 4 below.
//
// - cp_async16(dst, src, n) (cp.async.cg.shared.global [dst], [src], 16, n): 16 bytes to shared address
//   dst, the first n (0..16) from global src, the rest zeros. dst and src must be 16-byte aligned (cp-size)
//   and dst inside the block's shared memory (checked at issue: the launch throws). The copy is recorded
//   per thread; cp_async_commit closes the thread's open copies into a group (possibly empty);
//   cp_async_wait<N> completes the thread's oldest committed groups until at most N remain pending
//   (copies not yet committed stay pending). Delivery: by default (env LLMKERN_EMU_CP_ASYNC unset or
//   "lazy") the data lands in shared memory only in that wait (the latest legal moment: a kernel that
//   reads before waiting, or reads another thread's copy without a barrier after that thread's wait, reads
//   the 0xFF poison, NaN for 16-bit floats); LLMKERN_EMU_CP_ASYNC=eager writes at issue (the earliest: a
//   copy into a stage other warps still read overwrites it). Two pending copies (of any threads of the
//   block) to the same 16 bytes throw (PTX: no ordering between unsynchronized cp.async), an ldmatrix that
//   reads bytes with a copy in flight throws, and a block that exits with copies never waited for throws.
// - ldmatrix_x4 (.m8n8.x4.b16, optionally .trans): warp-collective (all 32 lanes, the same instruction;
//   checked). Lanes 8 i .. 8 i + 7 give the shared addresses of rows 0..7 of matrix i (16 bytes each,
//   16-byte aligned, checked). Lane l receives in r_i the 32-bit word holding elements (row l / 4,
//   columns 2 (l % 4), 2 (l % 4) + 1) of matrix i, lower column in the lower half; with .trans, elements
//   (rows 2 (l % 4), 2 (l % 4) + 1, column l / 4) (the matrix read column-major). Shared memory is read when
//   the last lane arrives.
// - mma_f16 / mma_bf16 (m16n8k16.row.col.f32.{f16,bf16}.f32) and mma_s8 (m16n8k32.row.col.s32.s8.s8.s32):
//   warp-collective. A (16 x K, K = 16 halves or 32 bytes): register 0 = row g, register 1 = row g + 8,
//   registers 2 / 3 = the same rows K / 2 further; within register j the elements are k = (K / 8) t + e
//   (+ K / 2 for j >= 2), e = 0 .. (elements per register - 1), lowest e in the lowest bits. B (K x 8,
//   "col"): register 0 = column n = g, k = (K / 8) t + e; register 1 = the same at k + K / 2. C / D (16 x 8):
//   d0, d1 = row g, columns 2t, 2t + 1; d2, d3 = row g + 8, the same columns. fp32: D = C + sum_k A B with
//   every product of the 16-bit inputs exact in double, summed in double, rounded to fp32 once per
//   instruction (the hardware's summation order and rounding are unspecified: its last bits may differ).
//   s8: exact, int32 wrapping (no .satfinite).
// - fast_exp2 (ex2.approx.ftz.f32): exp2f, subnormal results flushed to 0.
// - lop3_and_or (lop3.b32, LUT 0xEA): (a & b) | c.
// Test-only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <deque>
#include <string>
#include <unordered_map>
#include <vector>

namespace emu {
namespace sm80 {

struct Copy {
  uint32_t dst;
  const unsigned char* src;
  int bytes;
};
struct Thread {
  std::vector<Copy> open;               // issued, not committed
  std::deque<std::vector<Copy>> groups;  // committed, not complete
};
enum Kind { kLdm = 1, kLdmT, kMmaF16, kMmaBF16, kMmaS8 };
// One warp-collective instruction in progress: what each lane brought, what each lane gets.
struct Coll {
  int count = 0, kind = 0;
  long gen = 0;
  uint32_t in[32][10];
  uint32_t out[32][4];
};
struct St {
  std::vector<Thread> th;
  std::vector<Coll> warps;
  std::unordered_map<uint32_t, int> inflight;  // 16-byte shared chunk -> copies pending on it
  bool eager = false;
};
inline St& st() {
  static St s;
  return s;
}

[[noreturn]] inline void fail(const std::string& m) { throw std::runtime_error(m); }

inline void deliver(const Copy& c) {
  unsigned char* d = smem_ptr(c.dst, 16, "cp.async");
  unsigned char buf[16] = {0};
  if (c.bytes > 0) memcpy(buf, c.src, size_t(c.bytes));
  memcpy(d, buf, 16);
}
inline void retire(const Copy& c) {
  auto it = st().inflight.find(c.dst);
  if (it != st().inflight.end() && --it->second == 0) st().inflight.erase(it);
  deliver(c);
}

inline void cp_async(uint32_t dst, const void* src, int bytes) {
  if (dst % 16) fail("cp.async: shared destination " + hex(dst) + " not 16-byte aligned");
  if (reinterpret_cast<uintptr_t>(src) % 16)
    fail("cp.async: global source " + hex(reinterpret_cast<uintptr_t>(src)) + " not 16-byte aligned");
  if (bytes < 0 || bytes > 16) fail("cp.async: src-size " + std::to_string(bytes) + " (0..16 for cp-size 16)");
  if (bytes > 0 && !src) fail("cp.async: null source");
  smem_ptr(dst, 16, "cp.async");
  const Copy c{dst, static_cast<const unsigned char*>(src), bytes};
  if (st().eager) {
    deliver(c);
    st().th[lin()].open.push_back(Copy{dst, nullptr, -1});  // group bookkeeping only
    return;
  }
  if (st().inflight[dst]++)
    fail("cp.async: two copies in flight to shared address " + hex(dst) +
         " (unordered without a wait between them: PTX leaves the result undefined)");
  st().th[lin()].open.push_back(c);
}
inline void commit() {
  Thread& me = st().th[lin()];
  me.groups.push_back(std::move(me.open));
  me.open.clear();
}
inline void wait_group(int n) {
  Thread& me = st().th[lin()];
  while (int(me.groups.size()) > n) {
    for (const Copy& c : me.groups.front())
      if (c.bytes >= 0) retire(c);
    me.groups.pop_front();
  }
}

// ---------------------------------------------------------------- warp-collective instructions

inline const char* kind_name(int k) {
  switch (k) {
    case kLdm: return "ldmatrix.x4";
    case kLdmT: return "ldmatrix.x4.trans";
    case kMmaF16: return "mma.sync m16n8k16 f16";
    case kMmaBF16: return "mma.sync m16n8k16 bf16";
    case kMmaS8: return "mma.sync m16n8k32 s8";
  }
  return "?";
}

inline void ldmatrix_compute(Coll& c, bool trans) {
  const unsigned char* row[4][8];
  for (int i = 0; i < 4; ++i)
    for (int r = 0; r < 8; ++r) {
      const uint32_t a = c.in[8 * i + r][0];
      if (a % 16) fail("ldmatrix: row address " + hex(a) + " of lane " + std::to_string(8 * i + r) + " not 16-byte aligned");
      row[i][r] = smem_ptr(a, 16, "ldmatrix");
      if (st().inflight.count(a))
        fail("ldmatrix: reads shared address " + hex(a) + " (lane " + std::to_string(8 * i + r) +
             ") while a cp.async to it is in flight (no wait_group + barrier in between)");
    }
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < 4; ++i) {
      uint16_t lo, hi;
      if (!trans) {
        memcpy(&lo, row[i][l / 4] + 2 * (2 * (l % 4)), 2);
        memcpy(&hi, row[i][l / 4] + 2 * (2 * (l % 4) + 1), 2);
      } else {
        memcpy(&lo, row[i][2 * (l % 4)] + 2 * (l / 4), 2);
        memcpy(&hi, row[i][2 * (l % 4) + 1] + 2 * (l / 4), 2);
      }
      c.out[l][i] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
}

inline double cvt16(uint16_t v, bool bf16) {
  return bf16 ? double(llmkern::cpu::bf16_to_f32(v)) : double(llmkern::cpu::f16_to_f32(v));
}

// in[l] = a0..a3, b0, b1, c0..c3 (bits); out[l] = d0..d3 (bits).
inline void mma_compute(Coll& c, int kind) {
  if (kind == kMmaS8) {
    int64_t A[16][32], B[32][8];
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      for (int j = 0; j < 4; ++j)
        for (int e = 0; e < 4; ++e)
          A[g + 8 * (j % 2)][4 * t + e + 16 * (j / 2)] = int8_t(uint8_t(c.in[l][j] >> (8 * e)));
      for (int j = 0; j < 2; ++j)
        for (int e = 0; e < 4; ++e) B[4 * t + e + 16 * j][g] = int8_t(uint8_t(c.in[l][4 + j] >> (8 * e)));
    }
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      for (int i = 0; i < 4; ++i) {
        const int r = g + 8 * (i / 2), n = 2 * t + i % 2;
        int64_t acc = int32_t(c.in[l][6 + i]);
        for (int k = 0; k < 32; ++k) acc += A[r][k] * B[k][n];
        c.out[l][i] = uint32_t(uint64_t(acc));  // modulo 2^32
      }
    }
    return;
  }
  const bool bf16 = kind == kMmaBF16;
  double A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int j = 0; j < 4; ++j)
      for (int e = 0; e < 2; ++e)
        A[g + 8 * (j % 2)][2 * t + e + 8 * (j / 2)] = cvt16(uint16_t(c.in[l][j] >> (16 * e)), bf16);
    for (int j = 0; j < 2; ++j)
      for (int e = 0; e < 2; ++e) B[2 * t + e + 8 * j][g] = cvt16(uint16_t(c.in[l][4 + j] >> (16 * e)), bf16);
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int i = 0; i < 4; ++i) {
      const int r = g + 8 * (i / 2), n = 2 * t + i % 2;
      double acc = double(__uint_as_float(c.in[l][6 + i]));
      for (int k = 0; k < 16; ++k) acc += A[r][k] * B[k][n];
      c.out[l][i] = __float_as_uint(float(acc));
    }
  }
}

// Lane arrives with `nin` input words; when all 32 lanes of the warp have arrived at the same instruction
// the last one computes every lane's result; each lane leaves with its `nout` words.
inline void collective(int kind, const uint32_t* in, int nin, uint32_t* out, int nout) {
  if (nthreads() % 32)
    fail(std::string(kind_name(kind)) + ": block of " + std::to_string(nthreads()) +
         " threads (warp-collective instructions need whole warps)");
  const int l = lin(), w = l / 32, lane = l % 32;
  Coll& c = st().warps[w];
  if (c.count == 0) c.kind = kind;
  else if (c.kind != kind)
    fail(std::string("warp ") + std::to_string(w) + ": lanes at different warp-collective instructions (" +
         kind_name(c.kind) + " and " + kind_name(kind) + "; .sync.aligned needs all 32 lanes at the same one)");
  memcpy(c.in[lane], in, sizeof(uint32_t) * size_t(nin));
  const long gen = c.gen;
  if (++c.count == 32) {
    if (kind == kLdm || kind == kLdmT) ldmatrix_compute(c, kind == kLdmT);
    else mma_compute(c, kind);
    c.count = 0;
    ++c.gen;
  } else {
    block_until([w, gen] { return st().warps[w].gen != gen; }, "sm80 warp collective", uint64_t(w), uint64_t(kind));
  }
  memcpy(out, st().warps[w].out[lane], sizeof(uint32_t) * size_t(nout));
}

inline std::string describe(const WaitOn& wt) {
  if (!wt.what || strcmp(wt.what, "sm80 warp collective")) return "";
  const Coll& c = st().warps[wt.a];
  return std::string(kind_name(int(wt.b))) + " (warp-collective; " + std::to_string(c.count) +
         " of the warp's 32 lanes arrived)";
}

inline bool install() {
  State& s = S();
  s.on_block_begin.push_back([] {
    St& e = st();
    e.th.assign(size_t(nthreads()), Thread{});
    e.warps.assign(size_t((nthreads() + 31) / 32), Coll{});
    e.inflight.clear();
    const char* p = getenv("LLMKERN_EMU_CP_ASYNC");
    e.eager = p && !strcmp(p, "eager");
  });
  s.on_block_end.push_back([] {
    St& e = st();
    size_t n = 0;
    for (auto& t : e.th) {
      for (auto& c : t.open) n += c.bytes >= 0;
      for (auto& g : t.groups)
        for (auto& c : g) n += c.bytes >= 0;
    }
    if (n)
      fail("CUDA emulation: " + where() + " exited with " + std::to_string(n) +
           " cp.async copies never completed by a wait_group");
  });
  s.describe.push_back(describe);
  return true;
}
inline const bool installed = install();

}  // namespace sm80
}  // namespace emu

namespace llmkern {
namespace cuda {

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  emu::sm80::cp_async(dst, src, src_bytes);
}
__device__ __forceinline__ void cp_async_commit() { emu::sm80::commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  static_assert(N >= 0 && N <= 7, "cp.async.wait_group N");
  emu::sm80::wait_group(N);
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  uint32_t o[4];
  emu::sm80::collective(emu::sm80::kLdm, &addr, 1, o, 4);
  r0 = o[0], r1 = o[1], r2 = o[2], r3 = o[3];
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                                  uint32_t& r3) {
  uint32_t o[4];
  emu::sm80::collective(emu::sm80::kLdmT, &addr, 1, o, 4);
  r0 = o[0], r1 = o[1], r2 = o[2], r3 = o[3];
}

namespace emu_sm80_detail {
template <class D>
inline void mma(int kind, D (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  uint32_t in[10] = {a[0], a[1], a[2], a[3], b0, b1, 0, 0, 0, 0};
  memcpy(in + 6, d, 16);
  uint32_t o[4];
  emu::sm80::collective(kind, in, 10, o, 4);
  memcpy(d, o, 16);
}
}  // namespace emu_sm80_detail

__device__ __forceinline__ void mma_s8(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu_sm80_detail::mma(emu::sm80::kMmaS8, d, a, b0, b1);
}
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu_sm80_detail::mma(emu::sm80::kMmaBF16, d, a, b0, b1);
}
__device__ __forceinline__ void mma_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu_sm80_detail::mma(emu::sm80::kMmaF16, d, a, b0, b1);
}

__device__ __forceinline__ float fast_exp2(float x) {
  const float y = exp2f(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.0f : y;
}

// lop3.b32 d, a, b, c, immLut: bit i of d = bit (4 a_i + 2 b_i + c_i)... of the LUT indexed as in the PTX ISA
// (the LUT operand is F(0xF0, 0xCC, 0xAA)); 0xEA = (a & b) | c.
__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {
  constexpr uint32_t kLut = 0xEA;
  uint32_t d = 0;
  for (int i = 0; i < 32; ++i) {
    const uint32_t idx = (((a >> i) & 1) << 2) | (((b >> i) & 1) << 1) | ((c >> i) & 1);
    d |= ((kLut >> idx) & 1u) << i;
  }
  return d;
}

}  // namespace cuda
}  // namespace llmkern
