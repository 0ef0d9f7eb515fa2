// Parameters of the prefill attention kernels (attention.cuh for sm_80+, attention_sm90.cuh for sm_90a),
// filled by attention_fwd (csrc/cuda/attention.cu). Torch-free, no CUDA code: the CPU emulator of the
// kernels (tests/cuda_emu) includes it as is.
#pragma once

#include <cstdint>

namespace llmkern {
namespace cuda {

struct AttnFwdParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;   // contiguous [B, Sq, Hq, D] or [Tq, Hq, D], dtype of q
  float* lse = nullptr;  // contiguous [B, Hq, Sq] or [Hq, Tq]; may be null (not written)
  // Batched (cu_q == nullptr): token t of sequence b at b * x_sb + t * x_st. Packed: sequence b is
  // tokens cu_q[b] .. cu_q[b + 1] - 1 (cu_k for keys), token i at i * x_st. Head h at + h * x_sh.
  // Element strides; every stride and base pointer is 16-byte aligned (launcher checks).
  const int32_t* cu_q = nullptr;
  const int32_t* cu_k = nullptr;
  int64_t q_sb = 0, q_st = 0, q_sh = 0;
  int64_t k_sb = 0, k_st = 0, k_sh = 0;
  int64_t v_sb = 0, v_st = 0, v_sh = 0;
  int Sq = 0, Sk = 0;  // batched lengths (packed: unused)
  int Tq = 0;          // packed: rows of q (lse row stride)
  int Hq = 0, group = 1;  // group = Hq / Hk
  float scale_log2 = 0.0f;   // scale * log2(e)
  float softcap_log2 = 0.0f; // softcap * log2(e), 0 = no softcap
  float inv_softcap = 0.0f;  // scale / softcap
  int window_left = -1;      // -1 unbounded, else keys >= i + Sk - Sq - window_left (clamped < 2^30)
  int window_right = -1;     // right band limit: 0 when causal, -1 unbounded (clamped < 2^30)
};

}  // namespace cuda
}  // namespace llmkern
