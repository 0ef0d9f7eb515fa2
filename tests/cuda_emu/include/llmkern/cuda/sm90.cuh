// CPU emulation of llmkern/cuda/sm90.cuh and sm90_wgmma.cuh (the sm_90a primitives: mbarriers, TMA
// tensor loads, wgmma) for the fiber emulator (tests/cuda_emu/include/cuda_runtime.h). It shadows the real
// header on the emulator's include path; sm90_layout.cuh (descriptors, swizzle) is NOT shadowed, so the
// kernel's layout arithmetic is checked against the model of the hardware below, which is written from
// the PTX ISA, not from the kernel's formulas:
//
// - Shared memory: only the dynamic shared memory of the launch (cuda_runtime.h: 0xFF-filled per block, at
//   a shared-window address that is not 1024-aligned). Every access by the operations below is range-checked.
// - mbarrier: a side table keyed by shared address: expected arrival count, pending arrivals, tx-count,
//   phase. arrive: pending -= 1; expect_tx(b): tx += b, then arrive; complete_tx(b) (TMA): tx -= b. The
//   current phase completes when pending == 0 and tx == 0: phase += 1, pending = expected (tx is 0). A
//   phase with pending == 0 and tx < 0 (more bytes delivered than expected) throws. try_wait.parity(p) is
//   true when the phase of parity p has completed, i.e. when (current phase & 1) != p (a fresh barrier is
//   in phase 0: wait(0) blocks, wait(1) passes). The 8 bytes of an initialized barrier hold a marker that
//   every barrier operation checks (a kernel write over a live barrier throws), and TMA writes over a live
//   barrier throw.
// - TMA (cp.async.bulk.tensor.4d / .2d, tile mode, SWIZZLE_128B, box[0] = one 128-byte row: 64 16-bit values
//   or 128 bytes): box element (i0, i1, i2, i3) reads tensor element (c0 + i0, ..., c3 + i3), zero when any
//   coordinate is outside [0, dims[d]) (coordinates may be negative); it is placed at byte
//   L = ((i3 b2 + i2) b1 + i1) * 128 + size * i0 from dst (the box packed row by row), then the 128-byte
//   swizzle of the shared address
//   A = dst + L: A ^ (((A >> 7) & 7) << 4) (16-byte chunk bits 4-6 XOR bits 7-9: chunk c of box row r lands
//   in chunk c ^ (r % 8) since dst is 1024-aligned, which is checked). Then complete_tx(box bytes,
//   out-of-bounds elements included) on the barrier. Delivery is asynchronous: by default (env
//   LLMKERN_EMU_TMA unset or "lazy") a load lands only when no thread can run (the latest legal moment:
//   a consumer that reads before waiting reads 0xFF, NaN); LLMKERN_EMU_TMA=eager delivers at issue (the
//   earliest: a stage released before its readers finished gets overwritten). A block that exits with
//   loads in flight throws.
// - wgmma (warpgroup = threads 128 w .. 128 w + 127; all 128 must issue the same sequence): wgmma_ss /
//   wgmma_rs record the operation per thread (accumulator pointer, a snapshot of the A registers); commit
//   closes a group; wgmma_wait<N> is a barrier of the warpgroup after which the oldest groups are retired
//   until N remain, the math done THEN, reading shared memory at that time (a kernel that overwrites an
//   operand before the wait gets wrong data). Before the math the last arriving thread lets every other
//   thread run once (a producer waiting on an "empty" barrier released too early gets to overwrite).
//   D[m][n] = (scale_d ? D : 0) + sum_k A[m][k] B[n][k] (k < 16) in double from the 16-bit inputs, rounded
//   to fp32 once per instruction; s8 (wgmma_ss_s8, k < 32, K-major): exact, int32 wrapping. Checks: a
//   wgmma_fence since the thread's last retiring wait; accumulators unchanged between issue and
//   retirement (and, for RS, the A registers); descriptors' reserved bits zero, base offset 0, swizzle mode 1.
//   Descriptor (PTX "Matrix Descriptor Format"): start = bits 0-13 << 4, LBO = bits 16-29 << 4, SBO =
//   bits 32-45 << 4, base offset bits 49-51, swizzle bits 62-63. Element (row r of M / N, k) address before
//   the swizzle (PTX canonical layouts, 16-bit types, T = 8 values = 16 bytes):
//     K-major, 128B  ((8, m), (T, 2k)) : ((8T, SBO), (1, T)):  start + (r / 8) SBO + (r % 8) 128 + size k
//                    (LBO unused: a k16 step stays in one 128-byte row)
//     MN-major, 128B ((T, 8, m), (8, k)) : ((1, T, LBO), (8T, SBO)):
//                    start + (r / 64) LBO + 2 (r % 64) + (k % 8) 128 + (k / 8) SBO
//   then the same address swizzle as TMA's. Fragments (PTX "Register Fragments", m64nNk16): D register i of
//   thread t: row 16 (t / 32) + (t % 32) / 4 + 8 ((i / 2) % 2), column 8 (i / 4) + 2 (t % 4) + i % 2;
//   A word j of thread t: row 16 (t / 32) + (t % 32) / 4 + 8 (j % 2), columns 2 (t % 4) + 8 (j / 2) + {0, 1}
//   (low half first).
// - named_barrier_sync / named_barrier_arrive: cuda_runtime.h's named barriers (bar.sync / bar.arrive). fences, setmaxnreg, tma_prefetch_map: no-ops
//   (setmaxnreg checks its range).
// Test-only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <deque>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

namespace llmkern {
namespace cuda {
namespace sm90 {

// The emulated tensor map (sm90_tma_host.h fills it): a tensor of rank 2 or 4 (unused dims 1), elements of
// `esize` bytes (2: fp16 / bf16, 1: int8 as uint8), 128-byte swizzle, zero fill.
struct alignas(64) EmuTmaMap {
  uint64_t magic;
  const void* base;
  uint64_t dims[4];
  uint64_t strides[4];  // bytes; strides[0] = esize
  uint32_t box[4];
  uint32_t esize, rank, bf16;
};
using TmaMap = EmuTmaMap;
static_assert(std::is_trivially_copyable<TmaMap>::value, "a kernel parameter");
constexpr uint64_t kTmaMagic = 0x4c4c4d4b544d4131ull;

}  // namespace sm90
}  // namespace cuda
}  // namespace llmkern

namespace emu {
namespace sm90 {

using llmkern::cuda::sm90::TmaMap;

struct Mbar {
  uint32_t expected = 0, phase = 0;
  int64_t pending = 0, tx = 0;
};
struct TmaOp {
  uint32_t dst, bar;
  TmaMap map;
  int c[4];
};
enum Type { kF16 = 0, kBF16 = 1, kS8 = 2 };  // inputs; accumulators fp32 (kS8: int32)
struct WgOp {
  bool rs;
  int type;
  bool trans_b;
  int n, scale_d;
  uint64_t da, db;
  void* d;  // n / 2 fp32 or int32 registers
  uint32_t a[4];             // RS: the A registers at issue (the math uses these)
  const uint32_t* a_regs;    // RS: the registers themselves (checked unchanged at retirement)
  std::vector<uint32_t> d_issue;  // accumulators at issue (first pending op on this d only)
  bool operator==(const WgOp& o) const {
    return rs == o.rs && type == o.type && trans_b == o.trans_b && n == o.n && scale_d == o.scale_d && da == o.da &&
           db == o.db;
  }
};
struct WgThread {
  std::vector<WgOp> open;               // issued, not committed
  std::deque<std::vector<WgOp>> groups;  // committed, not retired
  bool fenced = false;
};
struct Warpgroup {
  std::vector<WgThread> t = std::vector<WgThread>(128);
  int count = 0, n_req = 0;
  long gen = 0;
};
struct St {
  std::map<uint32_t, Mbar> bars;
  std::deque<TmaOp> tma;
  std::vector<Warpgroup> wgs;
  bool eager = false;
};
inline St& st() {
  static St s;
  return s;
}
constexpr int64_t kTxMax = (int64_t(1) << 20) - 1;

[[noreturn]] inline void fail(const std::string& m) { throw std::runtime_error(m); }
inline uint64_t marker(uint32_t addr) { return 0x4d42415200000000ull | addr; }  // "MBAR" + address

inline Mbar& bar_at(uint32_t addr, const char* op) {
  auto it = st().bars.find(addr);
  if (it == st().bars.end())
    fail(std::string(op) + ": no mbarrier initialized at shared address " + hex(addr));
  uint64_t m;
  memcpy(&m, smem_ptr(addr, 8, op), 8);
  if (m != marker(addr))
    fail(std::string(op) + ": the mbarrier at " + hex(addr) + " was overwritten by a shared-memory store");
  return it->second;
}
inline void try_complete(uint32_t addr, Mbar& b) {
  if (b.pending < 0)
    fail("mbarrier at " + hex(addr) + ": more arrivals than its count (" + std::to_string(b.expected) + ") in phase " +
         std::to_string(b.phase));
  if (b.pending == 0 && b.tx < 0)
    fail("mbarrier at " + hex(addr) + ": " + std::to_string(-b.tx) +
         " more transaction bytes completed than expected in phase " + std::to_string(b.phase));
  if (b.pending == 0 && b.tx == 0) {
    ++b.phase;
    b.pending = b.expected;
  }
}
inline void check_tx(uint32_t addr, const Mbar& b) {
  if (b.tx > kTxMax || b.tx < -kTxMax) fail("mbarrier at " + hex(addr) + ": tx-count out of range");
}
inline void complete_tx(uint32_t addr, int64_t bytes) {
  Mbar& b = bar_at(addr, "complete_tx (TMA)");
  b.tx -= bytes;
  check_tx(addr, b);
  try_complete(addr, b);
}

// TMA: the box lands in shared memory (see the header comment).
inline uint64_t box_bytes(const TmaMap& m) { return uint64_t(m.box[0]) * m.box[1] * m.box[2] * m.box[3] * m.esize; }
inline void deliver(const TmaOp& op) {
  const TmaMap& m = op.map;
  const uint32_t b0 = m.box[0], b1 = m.box[1], b2 = m.box[2], b3 = m.box[3], es = m.esize;
  const uint64_t bytes = box_bytes(m);
  unsigned char* dst = smem_ptr(op.dst, bytes, "tma_load_4d");
  for (auto& kv : st().bars)
    if (kv.first + 8 > op.dst && kv.first < op.dst + bytes)
      fail("tma_load_4d: the box at " + hex(op.dst) + " (+" + std::to_string(bytes) + ") overwrites the mbarrier at " +
           hex(kv.first));
  const auto* g = static_cast<const unsigned char*>(m.base);
  for (uint32_t i3 = 0; i3 < b3; ++i3)
    for (uint32_t i2 = 0; i2 < b2; ++i2)
      for (uint32_t i1 = 0; i1 < b1; ++i1)
        for (uint32_t i0 = 0; i0 < b0; ++i0) {
          const int64_t x[4] = {int64_t(op.c[0]) + i0, int64_t(op.c[1]) + i1, int64_t(op.c[2]) + i2,
                                int64_t(op.c[3]) + i3};
          unsigned char v[2] = {0, 0};
          bool in = true;
          uint64_t off = 0;
          for (int d = 0; d < 4; ++d) {
            in = in && x[d] >= 0 && uint64_t(x[d]) < m.dims[d];
            off += uint64_t(x[d]) * m.strides[d];
          }
          if (in) memcpy(v, g + off, es);
          const uint32_t lin = ((i3 * b2 + i2) * b1 + i1) * (b0 * es) + i0 * es;
          const uint32_t a = op.dst + lin;
          const uint32_t phys = a ^ (((a >> 7) & 7u) << 4);
          memcpy(dst + (phys - op.dst), v, es);
        }
  complete_tx(op.bar, int64_t(bytes));
}

// ---------------------------------------------------------------- wgmma model

struct Desc {
  uint32_t start, lbo, sbo;
};
inline Desc decode(uint64_t d, const char* which) {
  const uint64_t reserved = (3ull << 14) | (3ull << 30) | (7ull << 46) | (0x3FFull << 52);
  if (d & reserved) fail(std::string("wgmma: descriptor ") + which + " " + hex(d) + " has reserved bits set");
  const int base_off = int((d >> 49) & 7), mode = int(d >> 62);
  if (mode != 1)
    fail(std::string("wgmma: descriptor ") + which + " " + hex(d) + ": swizzle mode " + std::to_string(mode) +
         " (the emulator models mode 1, 128B, only)");
  if (base_off != 0)
    fail(std::string("wgmma: descriptor ") + which + " " + hex(d) + ": base offset " + std::to_string(base_off) +
         " (not modeled; 0 = swizzle atoms 1024-byte aligned)");
  return {uint32_t(d & 0x3FFF) << 4, uint32_t((d >> 16) & 0x3FFF) << 4, uint32_t((d >> 32) & 0x3FFF) << 4};
}
// Shared address (after the swizzle) of element (row r of M or N, k) of a 128B-swizzled operand of
// `es`-byte elements (MN-major: 16-bit only).
inline uint32_t elem_addr(const Desc& d, bool k_major, uint32_t r, uint32_t k, uint32_t es = 2) {
  const uint32_t off = k_major ? (r / 8) * d.sbo + (r % 8) * 128 + k * es
                               : (r / 64) * d.lbo + (r % 64) * 2 + (k % 8) * 128 + (k / 8) * d.sbo;
  const uint32_t a = d.start + off;
  return a ^ (((a >> 7) & 7u) << 4);
}
inline double cvt(uint16_t v, int type) {
  return type == kBF16 ? double(llmkern::cpu::bf16_to_f32(v)) : double(llmkern::cpu::f16_to_f32(v));
}
inline double ld(uint32_t addr, int type) {
  if (type == kS8) return double(*reinterpret_cast<const int8_t*>(smem_ptr(addr, 1, "wgmma operand read")));
  uint16_t v;
  memcpy(&v, smem_ptr(addr, 2, "wgmma operand read"), 2);
  return cvt(v, type);
}
inline int d_row(int t, int i) { return 16 * (t / 32) + (t % 32) / 4 + 8 * ((i / 2) % 2); }
inline int d_col(int t, int i) { return 8 * (i / 4) + 2 * (t % 4) + i % 2; }

// One wgmma of the warpgroup: ops[t] is thread t's record.
inline void compute(std::vector<const WgOp*>& ops) {
  const WgOp& o = *ops[0];
  const int n = o.n, K = o.type == kS8 ? 32 : 16;  // k per instruction: 32 bytes
  const uint32_t es = o.type == kS8 ? 1 : 2;
  static thread_local double A[64][32], B[256][32];  // s8: exact integers (sums < 2^53)
  if (o.rs) {
    for (int t = 0; t < 128; ++t)
      for (int j = 0; j < 4; ++j)
        for (int h = 0; h < 2; ++h)
          A[16 * (t / 32) + (t % 32) / 4 + 8 * (j % 2)][2 * (t % 4) + 8 * (j / 2) + h] =
              cvt(uint16_t(ops[t]->a[j] >> (16 * h)), o.type);
  } else {
    const Desc da = decode(o.da, "A");
    for (int m = 0; m < 64; ++m)
      for (int k = 0; k < K; ++k) A[m][k] = ld(elem_addr(da, true, m, k, es), o.type);
  }
  const Desc db = decode(o.db, "B");
  for (int c = 0; c < n; ++c)
    for (int k = 0; k < K; ++k) B[c][k] = ld(elem_addr(db, !o.trans_b, c, k, es), o.type);
  for (int t = 0; t < 128; ++t) {
    const WgOp& p = *ops[t];
    if (!p.d_issue.empty() && memcmp(p.d_issue.data(), p.d, 4 * size_t(n / 2)))
      fail("wgmma: thread " + std::to_string(t) + " of the warpgroup wrote its accumulators between the wgmma and "
           "the wgmma_wait that retires it");
    if (p.rs && memcmp(p.a_regs, p.a, sizeof p.a))
      fail("wgmma: thread " + std::to_string(t) + " of the warpgroup wrote the A fragment registers of an RS wgmma "
           "between the wgmma and the wgmma_wait that retires it (the tensor cores read them asynchronously)");
    for (int i = 0; i < n / 2; ++i) {
      const int r = d_row(t, i), c = d_col(t, i);
      if (o.type == kS8) {  // exact, wrapping modulo 2^32 (no .satfinite)
        int32_t* d = static_cast<int32_t*>(p.d);
        double acc = o.scale_d ? double(d[i]) : 0.0;
        for (int k = 0; k < K; ++k) acc += A[r][k] * B[c][k];
        d[i] = int32_t(uint32_t(uint64_t(int64_t(acc))));
      } else {
        float* d = static_cast<float*>(p.d);
        double acc = o.scale_d ? double(d[i]) : 0.0;
        for (int k = 0; k < K; ++k) acc += A[r][k] * B[c][k];
        d[i] = float(acc);
      }
    }
  }
}

inline int my_wg() {
  const int l = lin(), w = l / 128;
  if ((w + 1) * 128 > nthreads())
    fail("wgmma: thread " + std::to_string(l) + " is in an incomplete warpgroup (block of " +
         std::to_string(nthreads()) + " threads)");
  return w;
}
inline void retire(Warpgroup& g, int keep) {
  const size_t ng = g.t[0].groups.size();
  for (int t = 1; t < 128; ++t) {
    if (g.t[t].groups.size() != ng)
      fail("wgmma_wait: threads 0 and " + std::to_string(t) + " of the warpgroup committed different numbers of "
           "groups (wgmma is warpgroup-collective)");
    for (size_t i = 0; i < ng; ++i) {
      const auto &a = g.t[0].groups[i], &b = g.t[t].groups[i];
      bool same = a.size() == b.size();
      for (size_t j = 0; same && j < a.size(); ++j) same = a[j] == b[j];
      if (!same)
        fail("wgmma: threads 0 and " + std::to_string(t) + " of the warpgroup issued different wgmmas (shape, "
             "descriptors or scale-d differ; wgmma is warpgroup-collective)");
    }
  }
  bool retired = false;
  while (int(g.t[0].groups.size()) > keep) {
    const size_t nops = g.t[0].groups.front().size();
    std::vector<const WgOp*> ops(128);
    for (size_t j = 0; j < nops; ++j) {
      for (int t = 0; t < 128; ++t) ops[t] = &g.t[t].groups.front()[j];
      compute(ops);
    }
    for (int t = 0; t < 128; ++t) g.t[t].groups.pop_front();
    retired = true;
  }
  if (retired)
    for (auto& th : g.t) th.fenced = false;
}
template <int N>
inline void issue(void* d, bool rs, int type, bool trans_b, uint64_t da, uint64_t db, const uint32_t* a, int scale_d) {
  const int w = my_wg();
  WgThread& me = st().wgs[w].t[lin() % 128];
  if (!me.fenced)
    fail("wgmma issued without a wgmma_fence since the thread's last wgmma_wait that retired a group (PTX: "
         "wgmma.fence before the first wgmma.mma_async and between register accesses and wgmma)");
  WgOp op{rs, type, trans_b, N, scale_d ? 1 : 0, rs ? 0 : da, db, d, {0, 0, 0, 0}, rs ? a : nullptr, {}};
  if (rs) memcpy(op.a, a, sizeof op.a);
  bool first = true;
  for (auto& o : me.open) first = first && o.d != d;
  for (auto& gr : me.groups)
    for (auto& o : gr) first = first && o.d != d;
  if (first) {
    op.d_issue.resize(N / 2);
    memcpy(op.d_issue.data(), d, 4 * size_t(N / 2));
  }
  me.open.push_back(std::move(op));
}
template <class T>
constexpr int type_of() {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "wgmma: fp16 or bf16");
  return std::is_same<T, __nv_bfloat16>::value ? kBF16 : kF16;
}
inline void tma_issue(uint32_t dst, const TmaMap* map, uint32_t bar, int rank, const int* c) {
  if (!map || map->magic != llmkern::cuda::sm90::kTmaMagic)
    fail("tma_load: not a tensor map encoded by sm90_tma_host.h");
  if (int(map->rank) != rank)
    fail("tma_load_" + std::to_string(rank) + "d with a tensor map of rank " + std::to_string(map->rank));
  if (dst % 1024) fail("tma_load: destination " + hex(dst) + " not 1024-byte aligned (required by the 128-byte swizzle)");
  if (map->box[0] * map->esize != 128)
    fail("tma_load: box inner dimension of " + std::to_string(map->box[0] * map->esize) +
         " bytes (the emulator models 128-byte box rows only)");
  smem_ptr(dst, box_bytes(*map), "tma_load");
  bar_at(bar, "tma_load");
  TmaOp op{dst, bar, *map, {c[0], c[1], c[2], c[3]}};
  if (st().eager) deliver(op);
  else st().tma.push_back(op);
}

inline bool on_stall() {
  auto& q = st().tma;
  if (q.empty()) return false;
  const TmaOp op = q.front();
  q.pop_front();
  deliver(op);
  return true;
}
inline std::string describe(const WaitOn& w) {
  if (!w.what || strcmp(w.what, "mbar_wait")) return "";
  const uint32_t addr = uint32_t(w.a);
  auto it = st().bars.find(addr);
  if (it == st().bars.end()) return "mbar_wait on " + hex(addr) + " (no barrier)";
  const Mbar& b = it->second;
  return "mbar_wait(" + hex(addr) + ", parity " + std::to_string(w.b) + ") [phase " + std::to_string(b.phase) +
         ", pending arrivals " + std::to_string(b.pending) + "/" + std::to_string(b.expected) + ", tx " +
         std::to_string(b.tx) + "]";
}
inline bool install() {
  State& s = S();
  s.on_block_begin.push_back([] {
    St& e = st();
    e.bars.clear();
    e.tma.clear();
    e.wgs.assign(size_t(nthreads() / 128), Warpgroup{});  // sized once: references stay valid
    const char* p = getenv("LLMKERN_EMU_TMA");
    e.eager = p && !strcmp(p, "eager");
  });
  s.on_block_end.push_back([] {
    St& e = st();
    if (!e.tma.empty())
      fail("CUDA emulation: " + where() + " exited with " + std::to_string(e.tma.size()) +
           " TMA load(s) in flight (never waited for)");
    for (size_t w = 0; w < e.wgs.size(); ++w)
      for (auto& t : e.wgs[w].t)
        if (!t.open.empty() || !t.groups.empty())
          fail("CUDA emulation: " + where() + " warpgroup " + std::to_string(w) +
               " exited with wgmma operations not retired by a wgmma_wait");
  });
  s.on_stall.push_back(on_stall);
  s.describe.push_back(describe);
  return true;
}
inline const bool installed = install();

}  // namespace sm90
}  // namespace emu

namespace llmkern {
namespace cuda {
namespace sm90 {

__device__ __forceinline__ unsigned char* dyn_smem() { return emu::dyn_smem_base(); }
__device__ __forceinline__ uint32_t smem_u32(const void* p) { return emu::smem_addr(p); }

// ---------------------------------------------------------------- mbarriers

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  if (bar % 8) emu::sm90::fail("mbar_init: address " + emu::hex(bar) + " not 8-byte aligned");
  if (count < 1 || int64_t(count) > emu::sm90::kTxMax) emu::sm90::fail("mbar_init: count " + std::to_string(count));
  unsigned char* p = emu::smem_ptr(bar, 8, "mbar_init");
  for (auto& t : emu::sm90::st().tma)
    if (bar + 8 > t.dst && bar < t.dst + emu::sm90::box_bytes(t.map))
      emu::sm90::fail("mbar_init at " + emu::hex(bar) + " inside the destination of a TMA load in flight");
  emu::sm90::Mbar b;
  b.expected = count;
  b.pending = count;
  emu::sm90::st().bars[bar] = b;
  const uint64_t m = emu::sm90::marker(bar);
  memcpy(p, &m, 8);
}
__device__ __forceinline__ void mbar_fence_init() {}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  emu::sm90::Mbar& b = emu::sm90::bar_at(bar, "mbar_arrive_expect_tx");
  b.tx += bytes;
  emu::sm90::check_tx(bar, b);
  --b.pending;
  emu::sm90::try_complete(bar, b);
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  emu::sm90::Mbar& b = emu::sm90::bar_at(bar, "mbar_arrive");
  --b.pending;
  emu::sm90::try_complete(bar, b);
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  if (parity > 1) emu::sm90::fail("mbar_wait: parity " + std::to_string(parity));
  emu::sm90::bar_at(bar, "mbar_wait");
  emu::block_until(
      [bar, parity] {
        auto it = emu::sm90::st().bars.find(bar);
        return it != emu::sm90::st().bars.end() && (it->second.phase & 1u) != parity;
      },
      "mbar_wait", bar, parity);
  emu::sm90::bar_at(bar, "mbar_wait");
}

// ---------------------------------------------------------------- TMA

__device__ __forceinline__ void tma_load_4d(uint32_t dst, const TmaMap* map, uint32_t bar, int c0, int c1, int c2,
                                            int c3) {
  const int c[4] = {c0, c1, c2, c3};
  emu::sm90::tma_issue(dst, map, bar, 4, c);
}
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const TmaMap* map, uint32_t bar, int c0, int c1) {
  const int c[4] = {c0, c1, 0, 0};
  emu::sm90::tma_issue(dst, map, bar, 2, c);
}
__device__ __forceinline__ void tma_prefetch_map(const TmaMap* map) {
  if (!map || map->magic != kTmaMagic) emu::sm90::fail("tma_prefetch_map: not a tensor map");
}

// ---------------------------------------------------------------- fences, barriers, registers

__device__ __forceinline__ void fence_proxy_async() {}
__device__ __forceinline__ void named_barrier_sync(int id, int count) { emu::named_sync(id, count); }
__device__ __forceinline__ void named_barrier_arrive(int id, int count) { emu::named_arrive(id, count); }
template <int R>
__device__ __forceinline__ void setmaxnreg_dec() {
  static_assert(R >= 24 && R <= 256 && R % 8 == 0, "setmaxnreg: 24..256, a multiple of 8");
}
template <int R>
__device__ __forceinline__ void setmaxnreg_inc() {
  static_assert(R >= 24 && R <= 256 && R % 8 == 0, "setmaxnreg: 24..256, a multiple of 8");
}

// ---------------------------------------------------------------- warpgroup MMA

__device__ __forceinline__ void wgmma_fence() {
  const int w = emu::sm90::my_wg();
  emu::sm90::st().wgs[w].t[emu::lin() % 128].fenced = true;
}
__device__ __forceinline__ void wgmma_commit() {
  const int w = emu::sm90::my_wg();
  emu::sm90::WgThread& me = emu::sm90::st().wgs[w].t[emu::lin() % 128];
  me.groups.push_back(std::move(me.open));
  me.open.clear();
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  static_assert(N >= 0 && N <= 7, "wgmma.wait_group N: 0..7");
  const int w = emu::sm90::my_wg();
  emu::sm90::Warpgroup& g = emu::sm90::st().wgs[w];
  if (g.count == 0) g.n_req = N;
  else if (g.n_req != N) emu::sm90::fail("wgmma_wait: threads of a warpgroup wait for different group counts");
  const long gen = g.gen;
  if (++g.count == 128) {
    emu::yield_now();  // everything else runnable runs once: the math sees shared memory as late as possible
    emu::sm90::retire(emu::sm90::st().wgs[w], N);
    emu::sm90::Warpgroup& g2 = emu::sm90::st().wgs[w];
    g2.count = 0;
    ++g2.gen;
    return;
  }
  emu::block_until([w, gen] { return emu::sm90::st().wgs[w].gen != gen; }, "wgmma_wait (warpgroup barrier)",
                   uint64_t(w), uint64_t(N));
}
template <int R>
__device__ __forceinline__ void fence_regs(float (&)[R]) {}
template <int R>
__device__ __forceinline__ void fence_regs(int32_t (&)[R]) {}

template <typename T, int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  static_assert(N == 64 || N == 128, "wgmma N: 64 or 128");
  emu::sm90::issue<N>(d, false, emu::sm90::type_of<T>(), false, desc_a, desc_b, nullptr, scale_d);
}
// m64nNk32 s8 x s8 -> s32, both K-major (32 bytes of k per instruction).
template <int N>
__device__ __forceinline__ void wgmma_ss_s8(int32_t (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  static_assert(N % 64 == 0 && N <= 256, "wgmma s8 N: 64, 128, 192 or 256 here");
  emu::sm90::issue<N>(d, false, emu::sm90::kS8, false, desc_a, desc_b, nullptr, scale_d);
}
template <typename T, int N, bool TRANS_B>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
  static_assert(N == 64 || N == 128, "wgmma N: 64 or 128");
  emu::sm90::issue<N>(d, true, emu::sm90::type_of<T>(), TRANS_B, 0, desc_b, a, scale_d);
}

}  // namespace sm90
}  // namespace cuda
}  // namespace llmkern
