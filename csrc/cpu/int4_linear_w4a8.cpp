// Launchers of int4_linear's W4A8 mode (kernels: csrc/include/llmkern/cpu/int4_linear_w4a8*.h).
// Called by llmkern/ops/int4_linear.py with raw pointers of tensors torch allocated.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings.h"
#include "llmkern/cpu/int4_linear_w4a8.h"

namespace py = pybind11;

namespace llmkern {
namespace bindings {
namespace {

const char* kWhere = "llmkern._C.int4_linear_w4a8";
constexpr int64_t kMaxDim = int64_t(1) << 31;

void check_shape(const char* where, int64_t M, int64_t K, int64_t N, int64_t G, int64_t e) {
  if (M < 0 || M > kMaxDim) fail_arg(where, "M must be in [0, 2^31], got " + std::to_string(M));
  if (N < 0 || N > kMaxDim) fail_arg(where, "N must be in [0, 2^31], got " + std::to_string(N));
  if (G != 32 && G != 64 && G != 128) fail_arg(where, "group_size must be 32, 64 or 128, got " + std::to_string(G));
  if (K < G || K > kMaxDim || K % G)
    fail_arg(where, "K must be a positive multiple of group_size=" + std::to_string(G) + " below 2^31, got " +
                        std::to_string(K));
  if (e != 2 && e != 4) fail_arg(where, "e must be 2 (fp16 scales) or 4 (fp32), got " + std::to_string(e));
}

KernelCall make_call(std::uintptr_t x_ptr, int x_dtype, int64_t x_row_stride, int64_t M, int64_t K, std::uintptr_t w_ptr,
                     int64_t N, int64_t group_size, int64_t e, std::uintptr_t bias_ptr, std::uintptr_t out_ptr,
                     int64_t out_row_stride, std::uintptr_t ws_ptr, int64_t ws_bytes, int num_threads,
                     const std::string& isa_name, bool group_scales) {
  if (x_dtype < 0 || x_dtype > 2)
    fail_arg(kWhere, "x_dtype must be 0 (float32), 1 (bfloat16) or 2 (float16), got " + std::to_string(x_dtype));
  const cpu::Isa isa = isa_or_throw(kWhere, isa_name);
  check_shape(kWhere, M, K, N, group_size, e);
  if (num_threads < 1 || num_threads > 1024)
    fail_arg(kWhere, "num_threads must be in [1, 1024], got " + std::to_string(num_threads));
  if (x_row_stride < 0) fail_arg(kWhere, "x_row_stride must be >= 0, got " + std::to_string(x_row_stride));
  if (out_row_stride < (M > 1 ? N : 0))
    fail_arg(kWhere, "out_row_stride must be >= N=" + std::to_string(N) + " (rows must not overlap), got " +
                         std::to_string(out_row_stride));
  const int64_t need = cpu::int4_w4a8_workspace_bytes(M, K, group_size, num_threads);
  if (ws_bytes < need)
    fail_arg(kWhere, "workspace too small: ws_bytes=" + std::to_string(ws_bytes) + ", need " + std::to_string(need) +
                         " (int4_linear_w4a8_workspace_size(M, K, group_size, num_threads))");
  if (M == 0 || N == 0) return {};
  const int64_t esize = x_dtype == 0 ? 4 : 2;
  check_ptr_arg(kWhere, "x_ptr", x_ptr, esize);
  check_ptr_arg(kWhere, "w_ptr", w_ptr, 64);  // the layout's vector loads assume 64-byte groups from here
  if (bias_ptr) check_ptr_arg(kWhere, "bias_ptr", bias_ptr, 4);
  check_ptr_arg(kWhere, "out_ptr", out_ptr, esize);
  check_ptr_arg(kWhere, "ws_ptr", ws_ptr, 1);

  cpu::Int4W4A8Args a;
  a.x = reinterpret_cast<const void*>(x_ptr);
  a.x_dtype = static_cast<cpu::DType>(x_dtype);
  a.x_row_stride = x_row_stride;
  a.M = M;
  a.K = K;
  a.N = N;
  a.w = reinterpret_cast<const uint8_t*>(w_ptr);
  a.e = e;
  a.group = group_size;
  a.bias = reinterpret_cast<const float*>(bias_ptr);
  a.out = reinterpret_cast<void*>(out_ptr);
  a.out_row_stride = out_row_stride;
  a.ws = reinterpret_cast<void*>(ws_ptr);
  a.num_threads = num_threads;
  a.group_scales = group_scales;
  return {[a, isa] { cpu::int4_linear_w4a8(a, isa); }, "int4_linear_w4a8"};
}

}  // namespace

void bind_int4_linear_w4a8(py::module_& m) {
  m.def(
      "int4_linear_w4a8_workspace_size",
      [](int64_t M, int64_t K, int64_t group_size, int num_threads) {
        const char* where = "llmkern._C.int4_linear_w4a8_workspace_size";
        check_shape(where, M, K, 0, group_size, 4);
        if (num_threads < 1 || num_threads > 1024)
          fail_arg(where, "num_threads must be in [1, 1024], got " + std::to_string(num_threads));
        return cpu::int4_w4a8_workspace_bytes(M, K, group_size, num_threads);
      },
      py::arg("M"), py::arg("K"), py::arg("group_size"), py::arg("num_threads"),
      "Bytes of workspace int4_linear_w4a8 needs for M rows of K values at num_threads (quantized rows and "
      "group sums; one copy per thread for M <= 4).");
  m.def(
      "int4_linear_w4a8_packed_size",
      [](int64_t N, int64_t K, int64_t group_size, int64_t e) {
        check_shape("llmkern._C.int4_linear_w4a8_packed_size", 1, K, N, group_size, e);
        return cpu::w4a8_packed_bytes(N, K, group_size, e);
      },
      py::arg("N"), py::arg("K"), py::arg("group_size"), py::arg("e"),
      "Bytes of the W4A8 layout of [N, K] int4 weights with e-byte scales and offsets.");
  def_int4_packer(
      m, "int4_linear_w4a8_pack",
      [](const char* where, int64_t N, int64_t K, int64_t G, int64_t e) { check_shape(where, 1, K, N, G, e); },
      &cpu::w4a8_packed_bytes, &cpu::int4_w4a8_pack, 64,  // 64: the kernel's aligned loads
      "Packs canonical int4 weights (qweight [N, K/2], scales/offsets fp32 [N, K/G], contiguous) into the W4A8 "
      "layout (csrc/include/llmkern/cpu/int4_linear_w4a8_common.h): e=2 (fp16 scales) only when every scale and "
      "offset is exactly an fp16 value (ValueError otherwise).");
  m.def(
      "int4_linear_w4a8_unpack",
      [](std::uintptr_t w_ptr, int64_t N, int64_t K, int64_t group_size, int64_t e, std::uintptr_t qweight_ptr,
         std::uintptr_t scales_ptr, std::uintptr_t offsets_ptr) {
        const char* where = "llmkern._C.int4_linear_w4a8_unpack";
        check_shape(where, 1, K, N, group_size, e);
        if (N == 0) return;
        check_ptr_arg(where, "w_ptr", w_ptr, 1);
        check_ptr_arg(where, "qweight_ptr", qweight_ptr, 1);
        check_ptr_arg(where, "scales_ptr", scales_ptr, 4);
        check_ptr_arg(where, "offsets_ptr", offsets_ptr, 4);
        py::gil_scoped_release release;
        cpu::int4_w4a8_unpack(reinterpret_cast<const uint8_t*>(w_ptr), N, K, group_size, e,
                              reinterpret_cast<uint8_t*>(qweight_ptr), reinterpret_cast<float*>(scales_ptr),
                              reinterpret_cast<float*>(offsets_ptr));
      },
      py::arg("w_ptr"), py::arg("N"), py::arg("K"), py::arg("group_size"), py::arg("e"), py::arg("qweight_ptr"),
      py::arg("scales_ptr"), py::arg("offsets_ptr"),
      "The W4A8 layout (int4_linear_w4a8_pack's output, e-byte scales) back to the canonical tensors it was packed "
      "from, bit for bit: qweight uint8 [N, K/2], scales / offsets float32 [N, K/G], contiguous, written at the "
      "given pointers.");
  m.def(
      "int4_linear_w4a8_bind",
      [](std::uintptr_t w_ptr, int64_t N, int64_t K, int64_t group_size, int64_t e, std::uintptr_t bias_ptr,
         bool group_scales) {
        BoundLinear b;
        b.name = "int4_linear_w4a8";
        b.make = [=](std::uintptr_t x_ptr, int x_dtype, int64_t x_row_stride, int64_t M, std::uintptr_t out_ptr,
                     std::uintptr_t ws_ptr, int64_t ws_bytes, int num_threads, const std::string& isa) {
          return make_call(x_ptr, x_dtype, x_row_stride, M, K, w_ptr, N, group_size, e, bias_ptr, out_ptr, N, ws_ptr,
                           ws_bytes, num_threads, isa, group_scales);
        };
        b.workspace = [=](int64_t M, int num_threads) {
          const char* where = "llmkern._C.BoundLinear(int4_linear_w4a8).workspace_size";
          check_shape(where, M, K, N, group_size, e);
          if (num_threads < 1 || num_threads > 1024)
            fail_arg(where, "num_threads must be in [1, 1024], got " + std::to_string(num_threads));
          return cpu::int4_w4a8_workspace_bytes(M, K, group_size, num_threads);
        };
        b.make(0, 0, 0, 0, 0, 0, b.workspace(0, 1), 1, "");  // the weight-side checks (M = 0 computes nothing)
        check_ptr_arg(kWhere, "w_ptr", w_ptr, 64);
        if (bias_ptr) check_ptr_arg(kWhere, "bias_ptr", bias_ptr, 4);
        return b;
      },
      py::arg("w_ptr"), py::arg("N"), py::arg("K"), py::arg("group_size"), py::arg("e"), py::arg("bias_ptr"),
      py::arg("group_scales") = false,
      "int4_linear_w4a8's weight arguments (as it takes them), checked and bound once: a BoundLinear whose "
      "run / call take the activation's arguments only.");
  def_launcher(m, "int4_linear_w4a8", &make_call,
               "out[M, N] = quant8(x[M, K]) @ dequant(w)^T (+ bias) on raw pointers: int4_linear's W4A8 modes "
               "(x quantized to int8 as int8_linear's W8A8 does, one scale per row, or per group of group_size "
               "values with group_scales; integer dot products) on weights in the W4A8 layout (int4_linear_w4a8_pack, 64-byte aligned). x_dtype: 0 float32, 1 bfloat16, 2 float16; out has "
               "x's dtype; bias float32. Releases the GIL while computing; invalid arguments raise ValueError.",
               py::arg("x_ptr"), py::arg("x_dtype"), py::arg("x_row_stride"), py::arg("M"), py::arg("K"),
               py::arg("w_ptr"), py::arg("N"), py::arg("group_size"), py::arg("e"), py::arg("bias_ptr"),
               py::arg("out_ptr"), py::arg("out_row_stride"), py::arg("ws_ptr"), py::arg("ws_bytes"),
               py::arg("num_threads"), py::arg("isa"), py::arg("group_scales") = false);
}

}  // namespace bindings
}  // namespace llmkern
