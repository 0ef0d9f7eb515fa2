// Launcher of rms_norm (kernel: csrc/include/llmkern/cpu/rms_norm.h). Called by llmkern/ops/rms_norm.py
// (`_cpu`) with raw pointers and row strides of tensors torch owns.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "bindings.h"
#include "llmkern/cpu/rms_norm.h"

namespace py = pybind11;

namespace llmkern {
namespace bindings {
namespace {

const char* kWhere = "llmkern._C.rms_norm";

[[noreturn]] void fail(const std::string& what) { fail_arg(kWhere, what); }

void check_ptr(const char* name, std::uintptr_t p, int dtype) { check_ptr_arg(kWhere, name, p, dtype == 0 ? 4 : 2); }

void check_dtype(const char* name, int code) {
  if (code < 0 || code > 2) fail(std::string(name) + " must be 0 (float32), 1 (bfloat16) or 2 (float16)");
}

KernelCall make_call(std::uintptr_t x_ptr, int x_dtype, int64_t x_stride, std::uintptr_t residual_ptr, int r_dtype,
            int64_t r_stride, std::uintptr_t weight_ptr, int w_dtype, std::uintptr_t y_ptr, std::uintptr_t h_ptr,
            int64_t M, int64_t N, double eps, int num_threads, const std::string& isa_name) {
  const cpu::Isa isa = isa_or_throw(kWhere, isa_name);
  check_dtype("x_dtype", x_dtype);
  check_dtype("w_dtype", w_dtype);
  if (M < 0 || N < 1) fail("need M >= 0 and N >= 1");
  if (!(eps >= 0.0) || !std::isfinite(eps)) fail("eps must be finite and >= 0");
  if (num_threads < 1 || num_threads > 1024) fail("num_threads must be in [1, 1024]");
  if (x_stride < N) fail("x_stride must be >= N (rows must not overlap)");
  if (M == 0) return {};
  check_ptr("x_ptr", x_ptr, x_dtype);
  check_ptr("weight_ptr", weight_ptr, w_dtype);
  check_ptr("y_ptr", y_ptr, x_dtype);
  cpu::RmsNormArgs a;
  if (residual_ptr) {
    check_dtype("r_dtype", r_dtype);
    if (r_stride < N) fail("r_stride must be >= N (rows must not overlap)");
    check_ptr("residual_ptr", residual_ptr, r_dtype);
    check_ptr("h_ptr", h_ptr, x_dtype);
    a.residual = reinterpret_cast<const void*>(residual_ptr);
    a.r_dtype = static_cast<cpu::DType>(r_dtype);
    a.r_stride = r_stride;
    a.h = reinterpret_cast<void*>(h_ptr);
  }
  a.x = reinterpret_cast<const void*>(x_ptr);
  a.x_dtype = static_cast<cpu::DType>(x_dtype);
  a.x_stride = x_stride;
  a.weight = reinterpret_cast<const void*>(weight_ptr);
  a.w_dtype = static_cast<cpu::DType>(w_dtype);
  a.y = reinterpret_cast<void*>(y_ptr);
  a.M = M;
  a.N = N;
  a.eps = eps;
  a.num_threads = num_threads;
  a.isa = isa;
  return {[a] { cpu::rms_norm(a); }, "rms_norm"};
}

}  // namespace

void bind_rms_norm(py::module_& m) {
  def_launcher(m, "rms_norm", &make_call,
        "y[M, N] = rms_norm(h) * weight with h = x (+ residual, stored to h[M, N] in x's dtype); x/residual "
        "rows at element strides x_stride/r_stride (last dim contiguous), y/h contiguous, residual_ptr 0 = "
        "none. dtype codes 0 float32, 1 bfloat16, 2 float16. Releases the GIL; invalid arguments raise "
        "ValueError. isa: the kernel variant (resolve_isa names, \"\" = best).",
        py::arg("x_ptr"), py::arg("x_dtype"), py::arg("x_stride"), py::arg("residual_ptr"),
        py::arg("r_dtype"), py::arg("r_stride"), py::arg("weight_ptr"), py::arg("w_dtype"), py::arg("y_ptr"),
        py::arg("h_ptr"), py::arg("M"), py::arg("N"), py::arg("eps"), py::arg("num_threads"), py::arg("isa") = "");
}

}  // namespace bindings
}  // namespace llmkern
