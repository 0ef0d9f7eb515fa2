// llmkern._C_cuda: pybind11 bindings of the CUDA kernels. Launchers take raw device pointers and a
// stream handle (integers from torch on the Python side); no torch headers, no allocation here.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace py = pybind11;

namespace llmkern {
int runtime_version();
int driver_version();
int device_count(std::string* error);
std::string kernel_image_error(int device);
void iota(int* out, int n, cudaStream_t stream);
void bind_attention(py::module_& m);
void bind_kv_cache_append(py::module_& m);
void bind_decode_attention(py::module_& m);
void bind_rms_norm(py::module_& m);
void bind_rotary_embedding(py::module_& m);
void bind_int8_linear(pybind11::module_& m);
void bind_int4_linear(pybind11::module_& m);
}  // namespace llmkern

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "llmkern CUDA kernels (sm_80, sm_90a), static cudart, no torch headers";
  m.def("build_info", []() {
    py::dict d;
    d["cudart_static_version"] = CUDART_VERSION;
    d["runtime_version"] = llmkern::runtime_version();
    d["driver_version"] = llmkern::driver_version();
    std::string err;
    d["device_count"] = llmkern::device_count(&err);
    d["device_error"] = err;
    return d;
  });
  m.def("kernel_image_error", &llmkern::kernel_image_error, py::arg("device"),
        "'' when the GPU `device` can run these kernels, else why not (compute capability below 8.0, or no kernel "
        "image for it in this build). Makes `device` current for the calling thread.");
  m.def(
      "iota",
      [](std::uintptr_t out, int n, std::uintptr_t stream) {
        if (n < 0) throw py::value_error("llmkern._C_cuda.iota: n must be >= 0, got " + std::to_string(n));
        if (n > 0 && out == 0) throw py::value_error("llmkern._C_cuda.iota: out is a null pointer");
        llmkern::iota(reinterpret_cast<int*>(out), n, reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("out"), py::arg("n"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  llmkern::bind_attention(m);
  llmkern::bind_kv_cache_append(m);
  llmkern::bind_decode_attention(m);
  llmkern::bind_rms_norm(m);
  llmkern::bind_rotary_embedding(m);
  llmkern::bind_int8_linear(m);
  llmkern::bind_int4_linear(m);
}
