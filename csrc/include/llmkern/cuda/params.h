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

struct DecodeParams {
  // q [B, Sq, Hq, D]: element (b, t, h, d) at b*q_s0 + t*q_s1 + h*q_s2 + d, dtype q_dtype (0..2).
  const void* q = nullptr;
  int q_dtype = kF32;
  int64_t q_s0 = 0, q_s1 = 0, q_s2 = 0;
  int B = 0, Sq = 1, Hq = 0, Hk = 0, D = 0;
  // Caches: token j of sequence b at (row, col) = (b, j) (contiguous) or (block_table[b, j / block_size],
  // j % block_size) (paged); element (row, col, head, d) at row*s0 + col*s1 + head*s2 + d.
  const void* k_cache = nullptr;
  const void* v_cache = nullptr;
  int kv_type = kF32;  // q_dtype, or kI8 with per-(row, col, head) float scales
  int64_t k_s0 = 0, k_s1 = 0, k_s2 = 0, v_s0 = 0, v_s1 = 0, v_s2 = 0;
  const float* k_scale = nullptr;
  const float* v_scale = nullptr;
  int64_t ks_s0 = 0, ks_s1 = 0, ks_s2 = 0, vs_s0 = 0, vs_s1 = 0, vs_s2 = 0;
  const int32_t* seq_lens = nullptr;     // [B]
  const int32_t* block_table = nullptr;  // [B, *] with row stride bt_stride; null: contiguous cache
  int64_t bt_stride = 0;
  int block_size = 0;
  float scale = 0.0f, softcap = 0.0f;
  int window_left = -1;
  void* out = nullptr;   // [B, Sq, Hq, D] contiguous, q_dtype
  float* ws = nullptr;   // num_splits > 1: decode_workspace_floats() floats (partial states)
  int num_splits = 1;
  int pipeline = 0;      // 1: the cp.async-pipelined loop where it exists (16-byte rows, D <= 128); 0: loads into registers
  int mma = 0;           // 1: the tensor-core kernel where it applies (16-bit cache, D 64 or 128; decode_attention_mma.cuh)
  int rows_per_cta = 0;  // filled by the launcher: 4 or 8 query rows (of one KV head) per CTA; 16 for the mma kernel
  int row_chunks = 0;    // filled by the launcher: ceil((Hq / Hk) * Sq / rows_per_cta)
};

// Floats of the split-KV workspace: per query row and split, D partial sums, the max and the sum.
inline int64_t decode_workspace_floats(int64_t B, int64_t Sq, int64_t Hq, int64_t D, int64_t num_splits) {
  return num_splits > 1 ? B * Sq * Hq * num_splits * (D + 2) : 0;
}

struct RmsNormParams {
  // Row m of x / residual starts at element m * stride (last dim contiguous).
  const void* x = nullptr;
  int x_dtype = kF32;
  int64_t x_stride = 0;
  const void* residual = nullptr;  // null: no residual (h = x, nothing stored to h)
  int r_dtype = kF32;
  int64_t r_stride = 0;
  const void* weight = nullptr;  // [N], contiguous
  int w_dtype = kF32;
  void* y = nullptr;  // [M, N] contiguous, x_dtype
  void* h = nullptr;  // [M, N] contiguous, x_dtype; used only with residual
  int64_t M = 0, N = 0;
  float eps = 0.0f;
};

struct RotaryParams {
  // Input row (t, h) at t*st + h*sh (last dim contiguous); outputs [T, H, D] contiguous, same dtype.
  const void* q = nullptr;
  void* q_out = nullptr;
  int q_dtype = kF32;
  int64_t q_st = 0, q_sh = 0, Hq = 0;
  const void* k = nullptr;
  void* k_out = nullptr;
  int k_dtype = kF32;
  int64_t k_st = 0, k_sh = 0, Hk = 0;
  int64_t T = 0, D = 0;
  const float* cos_sin = nullptr;  // [max_pos, R]: cos | sin
  int64_t R = 0;
  const int64_t* positions = nullptr;  // [T]
  bool interleaved = false;
};

}  // namespace cuda

// Launchers (csrc/cuda/<op>.cu): validate, launch on `stream` (a cudaStream_t), throw on a CUDA error.
void kv_cache_append_cuda(const cuda::KvAppendParams& p, void* stream);
const char* decode_attention_cuda(cuda::DecodeParams p, void* stream);  // "split", "split_pipelined", "split_mma"
void rms_norm_cuda(const cuda::RmsNormParams& p, void* stream);
void rotary_embedding_cuda(const cuda::RotaryParams& p, void* stream);

}  // namespace llmkern
