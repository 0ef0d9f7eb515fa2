// Launcher of the CUDA decode_attention (kernels: csrc/include/llmkern/cuda/decode_attention.cuh).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "llmkern/cuda/decode_attention.cuh"
#include "llmkern/cuda_check.cuh"

namespace llmkern {

// Returns the split kernel's loop that ran: "split" (loads into registers), "split_pipelined" or "split_mma"
// (the tensor-core kernel, decode_attention_mma.cuh).
const char* decode_attention_cuda(cuda::DecodeParams p, void* stream) {
  auto fail = [](const std::string& m) { throw std::invalid_argument("llmkern._C_cuda.decode_attention: " + m); };
  if (p.B < 0 || p.Sq < 1 || p.Hk < 1 || p.Hq < p.Hk || p.Hq % p.Hk) fail("need B >= 0, Sq >= 1, Hq a multiple of Hk");
  if (p.B == 0) return "empty";
  // Grid y = Hk * row chunks, chunks of 4 rows when a KV head has <= 4 query rows, else 8 (launch_decode_attention;
  // the Python adapter applies the same rule and falls back before this; the mma kernel's 16-row chunks make fewer).
  const int64_t rows = int64_t(p.Hq / p.Hk) * p.Sq, per_cta = rows <= 4 ? 4 : 8;
  if (p.B > 65535 || p.Hk * ((rows + per_cta - 1) / per_cta) > 65535) fail("too many sequences or heads for the grid");
  if (p.num_splits < 1 || p.num_splits > 65535) fail("num_splits must be in 1..65535");
  if (p.q_dtype < 0 || p.q_dtype > 2) fail("q_dtype must be 0..2");
  if (p.kv_type != p.q_dtype && p.kv_type != cuda::kI8) fail("a float cache must have q's dtype");
  if (!p.q || !p.k_cache || !p.v_cache || !p.seq_lens || !p.out) fail("null pointer");
  if (p.kv_type == cuda::kI8 && (!p.k_scale || !p.v_scale)) fail("an int8 cache needs k_scale and v_scale");
  if (p.block_table && p.block_size < 1) fail("block_size must be >= 1");
  if (p.num_splits > 1 && !p.ws) fail("num_splits > 1 needs a workspace");
  const int align = p.kv_type == cuda::kI8 ? 8 : 16;
  const int vec = p.kv_type == cuda::kF32 ? 4 : 8;
  for (const void* ptr : {p.k_cache, p.v_cache})
    if (reinterpret_cast<uintptr_t>(ptr) % align) fail("caches must be " + std::to_string(align) + "-byte aligned");
  for (int64_t s : {p.k_s0, p.k_s1, p.k_s2, p.v_s0, p.v_s1, p.v_s2})
    if (s % vec) fail("cache strides must be multiples of " + std::to_string(vec) + " elements");
  const cuda::DecodeLoop loop = cuda::launch_decode_attention(p, static_cast<cudaStream_t>(stream));
  if (loop == cuda::kDecodeNone) fail("head dim " + std::to_string(p.D) + " has no kernel (multiples of 8 up to 256; 128 for float32)");
  LLMKERN_CUDA_CHECK_LAUNCH();
  return loop == cuda::kDecodeMma ? "split_mma" : loop == cuda::kDecodePipelined ? "split_pipelined" : "split";
}

}  // namespace llmkern
