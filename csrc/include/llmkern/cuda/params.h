// Host-visible parameter blocks and launchers of the CUDA kernels of kv_cache_append, decode_attention,
// rms_norm and rotary_embedding: plain C++ (no CUDA headers, no torch), so the pybind11 bindings,
// compiled by the host compiler, can fill them and call the launchers defined in csrc/cuda/<op>.cu.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LLMKERN_HD __host__ __device__
#else
#define LLMKERN_HD
#endif

namespace llmkern {
namespace cuda {

// Dtype codes (the Python adapters' _DTYPE_CODE): 0 float32, 1 bfloat16, 2 float16, 3 int8 (caches only).
enum : int { kF32 = 0, kBF16 = 1, kF16 = 2, kI8 = 3 };

LLMKERN_HD inline int dtype_bytes(int dt) { return dt == kF32 ? 4 : (dt == kI8 ? 1 : 2); }

struct KvAppendParams {
  // k, v, q: element (b, s, h, d) at b*s0 + s*s1 + h*s2 + d; token t = b * S + s (slot_mapping order).
  const void* k = nullptr;
  const void* v = nullptr;
  int kv_dtype = kF32;
  int64_t k_s0 = 0, k_s1 = 0, k_s2 = 0, v_s0 = 0, v_s1 = 0, v_s2 = 0;
  int64_t B = 0, S = 0, Hk = 0, D = 0;
  const int64_t* slots = nullptr;  // [B * S], -1 = skip
  void* k_cache = nullptr;         // [num_slots, Hk, D] contiguous, cache_type
  void* v_cache = nullptr;
  int cache_type = kF32;
  float* k_scale = nullptr;  // int8: [num_slots, Hk]
  float* v_scale = nullptr;
  const float* cos_sin = nullptr;  // [max_pos, R]: cos | sin; null: no rotary
  int64_t R = 0;
  const int64_t* positions = nullptr;  // [B * S]
  bool interleaved = false;
  void* q = nullptr;  // rotated in place, q_dtype, strides q_s0..2; null: no q
  int q_dtype = kF32;
  int64_t q_s0 = 0, q_s1 = 0, q_s2 = 0, Hq = 0;
  int64_t rows_per_token = 0;  // filled by the launcher: (q ? Hq : 0) + 2 * Hk
  int64_t blocks_per_token = 0;
};

}  // namespace cuda

// Launchers (csrc/cuda/<op>.cu): validate, launch on `stream` (a cudaStream_t), throw on a CUDA error.
void kv_cache_append_cuda(const cuda::KvAppendParams& p, void* stream);

}  // namespace llmkern
