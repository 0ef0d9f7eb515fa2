// Launcher of int8_linear (kernels: csrc/include/llmkern/cpu/int8_linear*.h). Called by
// llmkern/ops/int8_linear.py (`_cpu`) with raw pointers of tensors torch allocated.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings.h"
#include "llmkern/cpu/int8_linear.h"

namespace py = pybind11;

namespace llmkern {
namespace bindings {
namespace {

const char* kWhere = "llmkern._C.int8_linear";

[[noreturn]] void fail(const std::string& what) { fail_arg(kWhere, what); }

bool parse_mode(const std::string& mode, const char* where) {
  if (mode == "w8a8") return true;
  if (mode == "w8a16") return false;
  throw py::value_error(std::string(where) + ": mode must be 'w8a16' or 'w8a8', got '" + mode + "'");
}

void check_ptr(const char* name, std::uintptr_t p, int64_t align) { check_ptr_arg(kWhere, name, p, align); }

// Sizes must be small enough that every byte offset the kernel forms fits in int64.
constexpr int64_t kMaxDim = int64_t(1) << 31;

KernelCall make_call(std::uintptr_t x_ptr, int x_dtype, int64_t x_row_stride, int64_t M, int64_t K, std::uintptr_t w_ptr,
            int64_t N, std::uintptr_t scale_ptr, int64_t group_size, std::uintptr_t bias_ptr, std::uintptr_t out_ptr,
            int64_t out_row_stride, const std::string& mode, std::uintptr_t ws_ptr, int64_t ws_bytes, int num_threads,
            const std::string& isa_name) {
  const bool w8a8 = parse_mode(mode, kWhere);
  if (x_dtype < 0 || x_dtype > 2) fail("x_dtype must be 0 (float32), 1 (bfloat16) or 2 (float16), got " + std::to_string(x_dtype));
  const cpu::Isa isa = isa_or_throw(kWhere, isa_name);
  if (M < 0 || M > kMaxDim) fail("M must be in [0, 2^31], got " + std::to_string(M));
  if (N < 0 || N > kMaxDim) fail("N must be in [0, 2^31], got " + std::to_string(N));
  if (K < 1 || K > kMaxDim) fail("K must be in [1, 2^31], got " + std::to_string(K));
  if (group_size < 1 || K % group_size) fail("group_size must divide K=" + std::to_string(K) + ", got " + std::to_string(group_size));
  if (w8a8 && group_size > cpu::kMaxW8A8Group)
    fail("w8a8 group_size (K for per-channel scales) must be <= " + std::to_string(cpu::kMaxW8A8Group) +
         " so int32 group sums are exact, got " + std::to_string(group_size));
  if (num_threads < 1 || num_threads > 1024) fail("num_threads must be in [1, 1024], got " + std::to_string(num_threads));
  if (x_row_stride < 0) fail("x_row_stride must be >= 0, got " + std::to_string(x_row_stride));
  if (out_row_stride < (M > 1 ? N : 0))
    fail("out_row_stride must be >= N=" + std::to_string(N) + " (rows must not overlap), got " + std::to_string(out_row_stride));
  const int64_t need = cpu::int8_linear_workspace_bytes(M, K, N, w8a8);
  if (ws_bytes < need)
    fail("workspace too small: ws_bytes=" + std::to_string(ws_bytes) + ", need " + std::to_string(need) +
         " (int8_linear_workspace_size(M, K, N, mode))");
  if (M == 0 || N == 0) return {};  // empty output: nothing to compute, nothing read
  const int64_t esize = x_dtype == 0 ? 4 : 2;
  check_ptr("x_ptr", x_ptr, esize);
  check_ptr("w_ptr", w_ptr, 1);
  check_ptr("scale_ptr", scale_ptr, 4);
  if (bias_ptr) check_ptr("bias_ptr", bias_ptr, 4);
  check_ptr("out_ptr", out_ptr, esize);
  check_ptr("ws_ptr", ws_ptr, 1);

  cpu::Int8LinearArgs a;
  a.x = reinterpret_cast<const void*>(x_ptr);
  a.x_dtype = static_cast<cpu::DType>(x_dtype);
  a.x_row_stride = x_row_stride;
  a.M = M;
  a.K = K;
  a.N = N;
  a.w = reinterpret_cast<const int8_t*>(w_ptr);
  a.scale = reinterpret_cast<const float*>(scale_ptr);
  a.group = group_size;
  a.bias = reinterpret_cast<const float*>(bias_ptr);
  a.out = reinterpret_cast<void*>(out_ptr);
  a.out_row_stride = out_row_stride;
  a.w8a8 = w8a8;
  a.ws = reinterpret_cast<void*>(ws_ptr);
  a.num_threads = num_threads;
  return {[a, isa] { cpu::int8_linear(a, isa); }, "int8_linear"};
}

}  // namespace

void bind_int8_linear(py::module_& m) {
  m.def(
      "int8_linear_workspace_size",
      [](int64_t M, int64_t K, int64_t N, const std::string& mode) {
        const char* where = "llmkern._C.int8_linear_workspace_size";
        const bool w8a8 = parse_mode(mode, where);
        if (M < 0 || M > kMaxDim || N < 0 || N > kMaxDim || K < 1 || K > kMaxDim)
          throw py::value_error(std::string(where) + ": need 0 <= M, N <= 2^31 and 1 <= K <= 2^31, got M=" +
                                std::to_string(M) + " K=" + std::to_string(K) + " N=" + std::to_string(N));
        return cpu::int8_linear_workspace_bytes(M, K, N, w8a8);
      },
      py::arg("M"), py::arg("K"), py::arg("N"), py::arg("mode"),
      "Bytes of workspace int8_linear needs for these sizes and mode ('w8a16' or 'w8a8').");
  def_launcher(m, "int8_linear", &make_call,
        "out[M, N] = x[M, K] @ dequant(w[N, K])^T (+ bias), W8A16 or W8A8, on raw pointers (see "
        "llmkern/ops/int8_linear.py). x_dtype: 0 float32, 1 bfloat16, 2 float16; out has x's dtype. "
        "Releases the GIL while computing; invalid arguments raise ValueError.",
        py::arg("x_ptr"), py::arg("x_dtype"), py::arg("x_row_stride"), py::arg("M"),
        py::arg("K"), py::arg("w_ptr"), py::arg("N"), py::arg("scale_ptr"), py::arg("group_size"), py::arg("bias_ptr"),
        py::arg("out_ptr"), py::arg("out_row_stride"), py::arg("mode"), py::arg("ws_ptr"), py::arg("ws_bytes"),
        py::arg("num_threads"), py::arg("isa"));
}

}  // namespace bindings
}  // namespace llmkern
