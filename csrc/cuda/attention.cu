// Launcher of attention (prefill) on CUDA (kernel: csrc/include/llmkern/cuda/attention.cuh). Called
// through the binding (attention_bind.cpp) by llmkern/ops/attention.py (`_cuda`), which allocates out
// and lse with torch. Instantiated for fp16/bf16 x head dims 64 and 128 only (compile time).
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "llmkern/cuda/attention_params.h"
#include "llmkern/cuda_check.cuh"
#include "llmkern/cuda/attention.cuh"

namespace llmkern {

namespace {

// Tile configurations (ptxas: 0 spills on sm_80 and sm_90a):
// D = 64: 8 warps (128 query rows), 64-key tiles, 48 KiB of shared memory, ~170 registers (1 block
//   per SM by registers; 2 blocks would need <= 128 registers: spills on sm_90a);
// D = 128: 4 warps (64 query rows), 64-key tiles, 80 KiB, <= 255 registers: 2 blocks per SM.
// D = 128 wide (opt-in, `wide`; for tuning on the GPU): 8 warps (128 rows), 96 KiB, 1 block per SM:
//   half the K/V traffic per query row, one barrier domain of 8 warps instead of two of 4.
template <int D, bool WIDE>
struct AttnCfg;
template <bool WIDE>
struct AttnCfg<64, WIDE> {
  static constexpr int NW = 8, BN = 64, MINB = 1;
};
template <>
struct AttnCfg<128, false> {
  static constexpr int NW = 4, BN = 64, MINB = 2;
};
template <>
struct AttnCfg<128, true> {
  static constexpr int NW = 8, BN = 64, MINB = 1;
};

// cudaFuncSetAttribute once per (kernel, device): not a stream operation, but kept out of the hot
// path (and out of CUDA graph captures after the first call on a device).
template <typename Kernel>
void allow_smem(Kernel kernel, int bytes, std::atomic<uint64_t>* done) {
  if (bytes <= 48 * 1024) return;
  int dev = 0;
  LLMKERN_CUDA_CHECK(cudaGetDevice(&dev));
  const uint64_t bit = dev < 64 ? (uint64_t(1) << dev) : 0;
  if (bit && (done->load(std::memory_order_acquire) & bit)) return;
  LLMKERN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  if (bit) done->fetch_or(bit, std::memory_order_release);
}

template <typename T, int D, bool WIDE = false>
void launch_attn(const cuda::AttnFwdParams& p, int B, int max_q, cudaStream_t stream) {
  using Cfg = AttnCfg<D, WIDE>;
  constexpr int NW = Cfg::NW, BN = Cfg::BN, BM = 16 * NW;
  constexpr int smem = cuda::attn_fwd_smem_bytes<D, NW, BN>();
  auto kernel = cuda::attn_fwd_kernel<T, D, NW, BN, Cfg::MINB>;
  static std::atomic<uint64_t> done{0};
  allow_smem(kernel, smem, &done);
  const int64_t blocks_m = (int64_t(max_q) + BM - 1) / BM;
  const int64_t bh = int64_t(B) * p.Hq;
  if (blocks_m > 65535) throw std::invalid_argument("llmkern attention (cuda): too many query rows for one launch");
  if (bh > 2147483647LL) throw std::invalid_argument("llmkern attention (cuda): B * Hq too large");
  dim3 grid(static_cast<unsigned>(bh), static_cast<unsigned>(blocks_m));
  kernel<<<grid, 32 * NW, smem, stream>>>(p);
  LLMKERN_CUDA_CHECK_LAUNCH();
}

}  // namespace

bool attention_fwd_sm90(int dtype, const cuda::AttnFwdParams& p, int64_t D, int64_t B, int64_t Sq, int64_t Sk,
                        int64_t Hq, int64_t Hk, int64_t Tq, int64_t Tk, const int64_t* qs, const int64_t* ks,
                        const int64_t* vs, int max_q, bool overlap, cudaStream_t stream);

// dtype: 1 bfloat16, 2 float16 (the op's codes; 0 = float32 is not supported here). Strides in
// elements, [batch, token, head] (packed: batch unused). Packed when cu_q != nullptr: B sequences,
// Tq rows of q (the grid covers Tq rows per sequence: no host read of cu_seqlens, graph-safe).
// wgmma: run the sm_90a kernel (attention_sm90.cu) where it can run (overlap: its intra-warpgroup-overlap
// variant); returns whether it ran (else the sm_80 kernel did).
bool attention_fwd(int dtype, const void* q, const void* k, const void* v, const int64_t* qs, const int64_t* ks,
                   const int64_t* vs, int64_t B, int64_t Sq, int64_t Sk, int64_t Hq, int64_t Hk, int64_t D,
                   const int32_t* cu_q, const int32_t* cu_k, int64_t Tq, int64_t Tk, double scale, bool causal,
                   int64_t window_left, int64_t window_right, double softcap, void* out, float* lse,
                   cudaStream_t stream, bool wide, bool wgmma, bool overlap) {
  constexpr int64_t kMax = int64_t(1) << 30;  // index math in the kernel is 32-bit per sequence
  const bool packed = cu_q != nullptr;
  if (dtype != 1 && dtype != 2) throw std::invalid_argument("llmkern attention (cuda): dtype must be 1 (bf16) or 2 (fp16)");
  if (D != 64 && D != 128) throw std::invalid_argument("llmkern attention (cuda): head dim must be 64 or 128");
  if (B < 0 || B >= kMax || Sq < 0 || Sk < 0 || Tq < 0 || Tk < 0 || Sq >= kMax || Sk >= kMax || Tq >= kMax || Tk >= kMax)
    throw std::invalid_argument("llmkern attention (cuda): lengths must be in [0, 2^30)");
  if (Hk < 1 || Hq < Hk || Hq % Hk || Hq >= kMax) throw std::invalid_argument("llmkern attention (cuda): Hq must be a positive multiple of Hk");
  if (!(scale > 0) || !(softcap >= 0)) throw std::invalid_argument("llmkern attention (cuda): scale > 0 and softcap >= 0");
  if (window_left < -1 || window_right < -1) throw std::invalid_argument("llmkern attention (cuda): window_left/right must be >= -1");
  if (packed != (cu_k != nullptr)) throw std::invalid_argument("llmkern attention (cuda): cu_seqlens_q and cu_seqlens_k go together");
  // Packed: Sq is the longest query sequence when the caller knows it (> 0; it bounds the grid's query tiles,
  // each sequence's CTAs past its length return at once), else 0 and every sequence gets Tq rows' tiles.
  const int64_t max_q = packed ? (Sq > 0 ? std::min(Sq, Tq) : Tq) : Sq;
  if (B == 0 || max_q == 0 || Hq == 0) return false;
  // 16-byte cp.async: base pointers and every stride a multiple of 8 elements.
  auto aligned = [](const void* ptr, const int64_t* s) {
    return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && s[0] % 8 == 0 && s[1] % 8 == 0 && s[2] % 8 == 0;
  };
  if (!aligned(q, qs) || !aligned(k, ks) || !aligned(v, vs) || reinterpret_cast<uintptr_t>(out) % 16)
    throw std::invalid_argument("llmkern attention (cuda): pointers must be 16-byte aligned and strides multiples of 8");

  cuda::AttnFwdParams p;
  p.q = q;
  p.k = k;
  p.v = v;
  p.out = out;
  p.lse = lse;
  p.cu_q = cu_q;
  p.cu_k = cu_k;
  p.q_sb = qs[0], p.q_st = qs[1], p.q_sh = qs[2];
  p.k_sb = ks[0], p.k_st = ks[1], p.k_sh = ks[2];
  p.v_sb = vs[0], p.v_st = vs[1], p.v_sh = vs[2];
  p.Sq = packed ? 0 : static_cast<int>(Sq);
  p.Sk = static_cast<int>(Sk);
  p.Tq = static_cast<int>(Tq);
  p.Hq = static_cast<int>(Hq);
  p.group = static_cast<int>(Hq / Hk);
  const double log2e = 1.4426950408889634;
  p.scale_log2 = static_cast<float>(scale * log2e);
  p.softcap_log2 = softcap > 0 ? static_cast<float>(softcap * log2e) : 0.0f;
  p.inv_softcap = softcap > 0 ? static_cast<float>(scale / softcap) : 0.0f;
  // Bands wider than any sequence are unbounded in effect; clamping keeps the kernel's int math safe.
  p.window_left = static_cast<int>(std::min<int64_t>(window_left, kMax - 1));
  p.window_right = causal ? 0 : static_cast<int>(std::min<int64_t>(window_right, kMax - 1));

  const int Bi = static_cast<int>(B), mq = static_cast<int>(max_q);
  if (wgmma && attention_fwd_sm90(dtype, p, D, B, Sq, Sk, Hq, Hk, Tq, Tk, qs, ks, vs, mq, overlap, stream)) return true;
  if (dtype == 1) {
    if (D == 64) launch_attn<__nv_bfloat16, 64>(p, Bi, mq, stream);
    else if (wide) launch_attn<__nv_bfloat16, 128, true>(p, Bi, mq, stream);
    else launch_attn<__nv_bfloat16, 128>(p, Bi, mq, stream);
  } else {
    if (D == 64) launch_attn<__half, 64>(p, Bi, mq, stream);
    else if (wide) launch_attn<__half, 128, true>(p, Bi, mq, stream);
    else launch_attn<__half, 128>(p, Bi, mq, stream);
  }
  return false;
}

}  // namespace llmkern
