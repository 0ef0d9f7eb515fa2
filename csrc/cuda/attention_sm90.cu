// Launcher of the sm_90a attention kernel (csrc/include/llmkern/cuda/attention_sm90.cuh): encodes the three
// TMA tensor maps and launches. Called by attention_fwd (attention.cu) when the caller asks for the wgmma
// kernel; returns false, launching nothing, where it cannot run (not a compute-capability-9.0 device, a
// module built without sm_90a, a layout the TMA cannot describe), and attention_fwd then runs the sm_80
// kernel. Arguments were checked by attention_fwd (16-byte aligned pointers and strides).
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "llmkern/cuda/attention_sm90.cuh"
#include "llmkern/cuda/sm90_tma_host.h"
#include "llmkern/cuda_check.cuh"
#include "sm90_launch.h"

namespace llmkern {

namespace {

// A 4-D map over (D values, heads, rows, batches) of 16-bit values; boxes (64, 1, box_rows, 1). Strides in
// elements (head, row, batch); a stride of 0 (a dimension of size 1, never stepped) is replaced by the
// natural one, since the driver wants multiples of 16 bytes.
bool encode_map(cuda::sm90::TmaMap* map, bool bf16, const void* base, int64_t D, int64_t heads, int64_t rows,
                int64_t batches, int64_t s_head, int64_t s_row, int64_t s_batch, int box_rows) {
  // A stride of 0 stands for "never stepped" only on a dimension of size 1; a broadcast view (expand) of a
  // longer one cannot be described by a TMA map (its strides must be non-zero): the sm_80 kernel takes it.
  // (Found by fuzzing on the emulator: batch- or head-broadcast k / v / q were read past their storage.)
  if ((s_head == 0 && heads > 1) || (s_row == 0 && rows > 1) || (s_batch == 0 && batches > 1)) return false;
  const uint64_t sh = uint64_t(s_head ? s_head : D) * 2;
  const uint64_t sr = s_row ? uint64_t(s_row) * 2 : sh * uint64_t(heads);
  const uint64_t sbt = s_batch ? uint64_t(s_batch) * 2 : sr * uint64_t(rows);
  const uint64_t dims[4] = {uint64_t(D), uint64_t(heads), uint64_t(rows), uint64_t(batches)};
  const uint64_t strides[3] = {sh, sr, sbt};
  const uint32_t box[4] = {64, 1, uint32_t(box_rows), 1};
  return cuda::sm90::encode_tma_4d(map, bf16, base, dims, strides, box);
}

template <typename T, int D, bool OVERLAP>
bool launch(const cuda::AttnFwdParams& p, int B, int max_q, const int64_t* qs, const int64_t* ks, const int64_t* vs,
            int64_t Hq, int64_t Hk, int64_t rows_q, int64_t rows_k, int64_t nb, bool packed, cudaStream_t stream) {
  namespace a9 = cuda::attn90;
  constexpr int kBN = a9::block_n(D, OVERLAP);
  constexpr int kSmem = a9::Smem<D, kBN>::bytes;
  auto kernel = cuda::attn_fwd_sm90_kernel<T, D, OVERLAP>;
  static std::atomic<uint64_t> checked{0}, ok{0};  // this instantiation's once-per-device verdicts
  if (!sm90_kernel_ready(kernel, kSmem, &checked, &ok)) return false;
  const int64_t blocks_m = (int64_t(max_q) + a9::kBM - 1) / a9::kBM;
  const int64_t bh = int64_t(B) * p.Hq;
  if (blocks_m > 65535 || bh > 2147483647LL) return false;
  // Q in boxes of the block's 128 rows, K and V in boxes of one key tile.
  const bool bf16 = std::is_same<T, __nv_bfloat16>::value;
  cuda::sm90::TmaMap tq, tk, tv;
  if (!encode_map(&tq, bf16, p.q, D, Hq, rows_q, nb, qs[2], qs[1], packed ? 0 : qs[0], a9::kBM) ||
      !encode_map(&tk, bf16, p.k, D, Hk, rows_k, nb, ks[2], ks[1], packed ? 0 : ks[0], kBN) ||
      !encode_map(&tv, bf16, p.v, D, Hk, rows_k, nb, vs[2], vs[1], packed ? 0 : vs[0], kBN))
    return false;
  dim3 grid(static_cast<unsigned>(bh), static_cast<unsigned>(blocks_m));
  kernel<<<grid, a9::kThreads, kSmem, stream>>>(p, tq, tk, tv);
  LLMKERN_CUDA_CHECK_LAUNCH();
  return true;
}

}  // namespace

// dtype 1 bf16 / 2 fp16; D 64 or 128; strides (batch, row, head) in elements as attention_fwd takes them;
// packed when p.cu_q != nullptr (rows Tq / Tk, one batch). p is filled by attention_fwd. overlap: the
// intra-warpgroup-overlap variant (64-key tiles at D = 128).
bool attention_fwd_sm90(int dtype, const cuda::AttnFwdParams& p, int64_t D, int64_t B, int64_t Sq, int64_t Sk,
                        int64_t Hq, int64_t Hk, int64_t Tq, int64_t Tk, const int64_t* qs, const int64_t* ks,
                        const int64_t* vs, int max_q, bool overlap, cudaStream_t stream) {
  if (D != 64 && D != 128) return false;
  const bool packed = p.cu_q != nullptr;
  const int64_t rows_q = packed ? Tq : Sq, rows_k = packed ? Tk : Sk, nb = packed ? 1 : B;
  if (rows_q < 1 || rows_k < 1) return false;  // no tensor to describe (no keys: the sm_80 kernel writes zeros)
  const int Bi = static_cast<int>(B);
#define LLMKERN_ATTN90(T, DD, OV) launch<T, DD, OV>(p, Bi, max_q, qs, ks, vs, Hq, Hk, rows_q, rows_k, nb, packed, stream)
  if (dtype == 1) {
    if (D == 64) return overlap ? LLMKERN_ATTN90(__nv_bfloat16, 64, true) : LLMKERN_ATTN90(__nv_bfloat16, 64, false);
    return overlap ? LLMKERN_ATTN90(__nv_bfloat16, 128, true) : LLMKERN_ATTN90(__nv_bfloat16, 128, false);
  }
  if (D == 64) return overlap ? LLMKERN_ATTN90(__half, 64, true) : LLMKERN_ATTN90(__half, 64, false);
  return overlap ? LLMKERN_ATTN90(__half, 128, true) : LLMKERN_ATTN90(__half, 128, false);
#undef LLMKERN_ATTN90
}

}  // namespace llmkern
