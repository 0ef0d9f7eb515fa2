// pybind11 binding of the CUDA rotary_embedding (launcher: csrc/cuda/rotary_embedding.cu); no torch headers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "llmkern/cuda/params.h"

namespace py = pybind11;

namespace llmkern {

void bind_rotary_embedding(py::module_& m) {
  m.def(
      "rotary_embedding",
      [](std::uintptr_t q, std::uintptr_t q_out, int q_dtype, const std::vector<int64_t>& qs, int64_t Hq,
         std::uintptr_t k, std::uintptr_t k_out, int k_dtype, const std::vector<int64_t>& ks, int64_t Hk, int64_t T,
         int64_t D, std::uintptr_t cos_sin, int64_t R, std::uintptr_t positions, bool interleaved,
         std::uintptr_t stream) {
        if (qs.size() != 2 || ks.size() != 2)
          throw py::value_error("llmkern._C_cuda.rotary_embedding: q and k need 2 strides (token, head)");
        cuda::RotaryParams p;
        p.q = reinterpret_cast<const void*>(q);
        p.q_out = reinterpret_cast<void*>(q_out);
        p.q_dtype = q_dtype;
        p.q_st = qs[0], p.q_sh = qs[1], p.Hq = Hq;
        p.k = reinterpret_cast<const void*>(k);
        p.k_out = reinterpret_cast<void*>(k_out);
        p.k_dtype = k_dtype;
        p.k_st = ks[0], p.k_sh = ks[1], p.Hk = Hk;
        p.T = T, p.D = D;
        p.cos_sin = reinterpret_cast<const float*>(cos_sin);
        p.R = R;
        p.positions = reinterpret_cast<const int64_t*>(positions);
        p.interleaved = interleaved;
        rotary_embedding_cuda(p, reinterpret_cast<void*>(stream));
      },
      py::arg("q"), py::arg("q_out"), py::arg("q_dtype"), py::arg("q_strides"), py::arg("Hq"), py::arg("k"),
      py::arg("k_out"), py::arg("k_dtype"), py::arg("k_strides"), py::arg("Hk"), py::arg("T"), py::arg("D"),
      py::arg("cos_sin"), py::arg("R"), py::arg("positions"), py::arg("interleaved"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());
}

}  // namespace llmkern
