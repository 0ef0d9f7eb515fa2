// pybind11 binding of the CUDA kv_cache_append (launcher: csrc/cuda/kv_cache_append.cu). Pointers and
// the stream are integers from torch; element strides as lists; no torch headers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "llmkern/cuda/params.h"

namespace py = pybind11;

namespace llmkern {

void bind_kv_cache_append(py::module_& m) {
  m.def(
      "kv_cache_append",
      [](std::uintptr_t k, std::uintptr_t v, int kv_dtype, const std::vector<int64_t>& ks,
         const std::vector<int64_t>& vs, int64_t B, int64_t S, int64_t Hk, int64_t D, std::uintptr_t slots,
         std::uintptr_t k_cache, std::uintptr_t v_cache, int cache_type, std::uintptr_t k_scale,
         std::uintptr_t v_scale, std::uintptr_t cos_sin, int64_t R, std::uintptr_t positions, bool interleaved,
         std::uintptr_t q, int q_dtype, const std::vector<int64_t>& qs, int64_t Hq, std::uintptr_t stream) {
        if (ks.size() != 3 || vs.size() != 3 || qs.size() != 3)
          throw py::value_error("llmkern._C_cuda.kv_cache_append: k, v and q need 3 strides (batch, token, head)");
        cuda::KvAppendParams p;
        p.k = reinterpret_cast<const void*>(k);
        p.v = reinterpret_cast<const void*>(v);
        p.kv_dtype = kv_dtype;
        p.k_s0 = ks[0], p.k_s1 = ks[1], p.k_s2 = ks[2];
        p.v_s0 = vs[0], p.v_s1 = vs[1], p.v_s2 = vs[2];
        p.B = B, p.S = S, p.Hk = Hk, p.D = D;
        p.slots = reinterpret_cast<const int64_t*>(slots);
        p.k_cache = reinterpret_cast<void*>(k_cache);
        p.v_cache = reinterpret_cast<void*>(v_cache);
        p.cache_type = cache_type;
        p.k_scale = reinterpret_cast<float*>(k_scale);
        p.v_scale = reinterpret_cast<float*>(v_scale);
        p.cos_sin = reinterpret_cast<const float*>(cos_sin);
        p.R = R;
        p.positions = reinterpret_cast<const int64_t*>(positions);
        p.interleaved = interleaved;
        p.q = reinterpret_cast<void*>(q);
        p.q_dtype = q_dtype;
        p.q_s0 = qs[0], p.q_s1 = qs[1], p.q_s2 = qs[2];
        p.Hq = Hq;
        kv_cache_append_cuda(p, reinterpret_cast<void*>(stream));
      },
      py::arg("k"), py::arg("v"), py::arg("kv_dtype"), py::arg("k_strides"), py::arg("v_strides"), py::arg("B"),
      py::arg("S"), py::arg("Hk"), py::arg("D"), py::arg("slots"), py::arg("k_cache"), py::arg("v_cache"),
      py::arg("cache_type"), py::arg("k_scale"), py::arg("v_scale"), py::arg("cos_sin"), py::arg("R"),
      py::arg("positions"), py::arg("interleaved"), py::arg("q"), py::arg("q_dtype"), py::arg("q_strides"),
      py::arg("Hq"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
}

}  // namespace llmkern
