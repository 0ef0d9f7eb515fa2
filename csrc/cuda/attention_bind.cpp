// pybind11 binding of the CUDA prefill attention (launcher: csrc/cuda/attention.cu). Pointers and the
// stream cross as integers; no torch headers. Invalid arguments raise ValueError (std::invalid_argument).
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace llmkern {

bool attention_fwd(int dtype, const void* q, const void* k, const void* v, const int64_t* qs, const int64_t* ks,
                   const int64_t* vs, int64_t B, int64_t Sq, int64_t Sk, int64_t Hq, int64_t Hk, int64_t D,
                   const int32_t* cu_q, const int32_t* cu_k, int64_t Tq, int64_t Tk, double scale, bool causal,
                   int64_t window_left, int64_t window_right, double softcap, void* out, float* lse,
                   cudaStream_t stream, bool wide, bool wgmma, bool overlap);

namespace {

bool launch(int dtype, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, const std::vector<int64_t>& qs,
            const std::vector<int64_t>& ks, const std::vector<int64_t>& vs, int64_t B, int64_t Sq, int64_t Sk,
            int64_t Hq, int64_t Hk, int64_t D, std::uintptr_t cu_q, std::uintptr_t cu_k, int64_t Tq, int64_t Tk,
            double scale, bool causal, int64_t window_left, int64_t window_right, double softcap, std::uintptr_t out,
            std::uintptr_t lse, std::uintptr_t stream, bool wide, bool wgmma, bool overlap) {
  const char* where = "llmkern._C_cuda.attention: ";
  for (const auto* s : {&qs, &ks, &vs}) {
    if (s->size() != 3) throw std::invalid_argument(std::string(where) + "strides must be 3 (batch, token, head)");
    for (int64_t x : *s)
      if (x < 0) throw std::invalid_argument(std::string(where) + "strides must be >= 0");
  }
  const bool any = B > 0 && (cu_q ? Tq : Sq) > 0;
  if (any && (q == 0 || out == 0)) throw std::invalid_argument(std::string(where) + "q/out is a null pointer");
  if (any && (cu_q ? Tk : Sk) > 0 && (k == 0 || v == 0))
    throw std::invalid_argument(std::string(where) + "k/v is a null pointer");
  if (lse % 4) throw std::invalid_argument(std::string(where) + "lse is not 4-byte aligned");
  if ((cu_q % 4) || (cu_k % 4)) throw std::invalid_argument(std::string(where) + "cu_seqlens not 4-byte aligned");
  return attention_fwd(dtype, reinterpret_cast<const void*>(q), reinterpret_cast<const void*>(k),
                reinterpret_cast<const void*>(v), qs.data(), ks.data(), vs.data(), B, Sq, Sk, Hq, Hk, D,
                reinterpret_cast<const int32_t*>(cu_q), reinterpret_cast<const int32_t*>(cu_k), Tq, Tk, scale, causal,
                window_left, window_right, softcap, reinterpret_cast<void*>(out), reinterpret_cast<float*>(lse),
                reinterpret_cast<cudaStream_t>(stream), wide, wgmma, overlap);
}

}  // namespace

void bind_attention(py::module_& m) {
  m.def("attention", &launch, py::arg("dtype"), py::arg("q_ptr"), py::arg("k_ptr"), py::arg("v_ptr"),
        py::arg("q_strides"), py::arg("k_strides"), py::arg("v_strides"), py::arg("B"), py::arg("Sq"), py::arg("Sk"),
        py::arg("Hq"), py::arg("Hk"), py::arg("D"), py::arg("cu_seqlens_q_ptr"), py::arg("cu_seqlens_k_ptr"),
        py::arg("Tq"), py::arg("Tk"), py::arg("scale"), py::arg("causal"), py::arg("window_left"),
        py::arg("window_right"), py::arg("softcap"), py::arg("out_ptr"), py::arg("lse_ptr"), py::arg("stream"),
        py::arg("wide") = false, py::arg("wgmma") = false, py::arg("overlap") = false,
        py::call_guard<py::gil_scoped_release>(),
        "Prefill flash attention on device pointers (see llmkern/ops/attention.py): dtype 1 bf16 / 2 fp16, "
        "D 64 or 128; strides in elements (batch, token, head; batch unused when packed), D contiguous, "
        "16-byte aligned; out contiguous like q; lse float32 [B, Hq, Sq] or [Hq, Tq] (lse_ptr 0: not "
        "written). Packed: cu_seqlens_* int32 [B + 1] on the device (not read on the host), Tq/Tk the packed "
        "row counts; rows past cu_seqlens_q[B] are not written. wide: D = 128 with 128-row query tiles (8 warps) "
        "instead of 64 (4 warps), for tuning. wgmma: the sm_90a kernel (TMA + warpgroup MMA) where it can run "
        "(a compute-capability-9.0 device, a module built for sm_90a, strides the TMA can describe; overlap: "
        "its intra-warpgroup-overlap variant, 64-key tiles at D = 128); returns "
        "True when it ran, False when the sm_80 kernel did. Asynchronous on `stream`.");
}

}  // namespace llmkern
