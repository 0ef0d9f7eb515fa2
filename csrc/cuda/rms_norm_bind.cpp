// pybind11 binding of the CUDA rms_norm (launcher: csrc/cuda/rms_norm.cu); no torch headers.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "llmkern/cuda/params.h"

namespace py = pybind11;

namespace llmkern {

void bind_rms_norm(py::module_& m) {
  m.def(
      "rms_norm",
      [](std::uintptr_t x, int x_dtype, int64_t x_stride, std::uintptr_t residual, int r_dtype, int64_t r_stride,
         std::uintptr_t weight, int w_dtype, std::uintptr_t y, std::uintptr_t h, int64_t M, int64_t N, float eps,
         std::uintptr_t stream) {
        cuda::RmsNormParams p;
        p.x = reinterpret_cast<const void*>(x);
        p.x_dtype = x_dtype;
        p.x_stride = x_stride;
        p.residual = reinterpret_cast<const void*>(residual);
        p.r_dtype = r_dtype;
        p.r_stride = r_stride;
        p.weight = reinterpret_cast<const void*>(weight);
        p.w_dtype = w_dtype;
        p.y = reinterpret_cast<void*>(y);
        p.h = reinterpret_cast<void*>(h);
        p.M = M, p.N = N, p.eps = eps;
        rms_norm_cuda(p, reinterpret_cast<void*>(stream));
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("x_stride"), py::arg("residual"), py::arg("r_dtype"),
      py::arg("r_stride"), py::arg("weight"), py::arg("w_dtype"), py::arg("y"), py::arg("h"), py::arg("M"),
      py::arg("N"), py::arg("eps"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
}

}  // namespace llmkern
