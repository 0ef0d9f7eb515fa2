// pybind11 binding of the int8_linear CUDA launchers (csrc/cuda/int8_linear.cu). Pointers and the stream
// arrive as integers from torch (llmkern/ops/int8_linear.py, `_cuda`); no torch headers here.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace py = pybind11;

namespace llmkern {

const char* int8_linear_cuda(const void* x, int x_dtype, int64_t ldx, int M, int K, const int8_t* w, int N,
                             const float* scale, int group, const float* bias, void* out, int64_t ldo, bool w8a8,
                             int8_t* xq, float* xs, int num_sms, bool decode_mma, bool w8a8_mma, cudaStream_t st,
                             bool w8a8_wgmma);
void int8_linear_dequant_cuda(const int8_t* w, const float* scale, int group, int N, int K, void* out, int dtype,
                              cudaStream_t st);
void int8_quantize_rows_cuda(const void* x, int x_dtype, int64_t ldx, int M, int K, int8_t* xq, int64_t ldq,
                             float* xs, cudaStream_t st);

namespace {

bool parse_mode(const std::string& mode) {
  if (mode == "w8a8") return true;
  if (mode == "w8a16") return false;
  throw py::value_error("llmkern._C_cuda.int8_linear: mode must be 'w8a16' or 'w8a8', got '" + mode + "'");
}

constexpr int64_t kMaxDim = (int64_t(1) << 31) - 1;

void check_dims(const char* where, int64_t M, int64_t N, int64_t K) {
  if (M < 0 || M > kMaxDim || N < 0 || N > kMaxDim || K < 1 || K > kMaxDim)
    throw py::value_error(std::string(where) + ": need 0 <= M, N < 2^31 and 1 <= K < 2^31, got M=" +
                          std::to_string(M) + " N=" + std::to_string(N) + " K=" + std::to_string(K));
}

}  // namespace

void bind_int8_linear(py::module_& m) {
  m.def(
      "int8_linear",
      [](std::uintptr_t x, int x_dtype, int64_t ldx, int64_t M, int64_t K, std::uintptr_t w, int64_t N,
         std::uintptr_t scale, int64_t group, std::uintptr_t bias, std::uintptr_t out, int64_t ldo,
         const std::string& mode, std::uintptr_t xq, std::uintptr_t xs, int num_sms, bool decode_mma,
         bool w8a8_mma, std::uintptr_t stream, bool w8a8_wgmma) {
        const bool w8a8 = parse_mode(mode);
        check_dims("llmkern._C_cuda.int8_linear", M, N, K);
        if (group < 1 || group > K) throw py::value_error("llmkern._C_cuda.int8_linear: group must be in [1, K]");
        if (M > 0 && N > 0 && (x == 0 || w == 0 || scale == 0 || out == 0))
          throw py::value_error("llmkern._C_cuda.int8_linear: null pointer among x, w, scale, out");
        py::gil_scoped_release release;
        return std::string(int8_linear_cuda(
            reinterpret_cast<const void*>(x), x_dtype, ldx, int(M), int(K), reinterpret_cast<const int8_t*>(w),
            int(N), reinterpret_cast<const float*>(scale), int(group), reinterpret_cast<const float*>(bias),
            reinterpret_cast<void*>(out), ldo, w8a8, reinterpret_cast<int8_t*>(xq), reinterpret_cast<float*>(xs),
            num_sms, decode_mma, w8a8_mma, reinterpret_cast<cudaStream_t>(stream), w8a8_wgmma));
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("ldx"), py::arg("M"), py::arg("K"), py::arg("w"), py::arg("N"),
      py::arg("scale"), py::arg("group"), py::arg("bias"), py::arg("out"), py::arg("ldo"), py::arg("mode"),
      py::arg("xq"), py::arg("xs"), py::arg("num_sms"), py::arg("decode_mma"), py::arg("w8a8_mma"),
      py::arg("stream"), py::arg("w8a8_wgmma") = false,
      "out[M, N] = x[M, K] @ dequant(w[N, K])^T (+ fp32 bias) on raw device pointers, W8A16 or W8A8 "
      "(xq int8 [M, K] and xs fp32 [M] workspaces). x_dtype: 0 float32, 1 bfloat16, 2 float16 (out too). "
      "w8a8_wgmma: per-channel W8A8 with M > 16 on the sm_90a GEMM (TMA + wgmma) where it can run. "
      "Returns the name of the kernel path taken.");
  m.def(
      "int8_quantize_rows",
      [](std::uintptr_t x, int x_dtype, int64_t ldx, int64_t M, int64_t K, std::uintptr_t xq, int64_t ldq,
         std::uintptr_t xs, std::uintptr_t stream) {
        if (M < 0 || M > kMaxDim || K < 0 || K > kMaxDim)
          throw py::value_error("llmkern._C_cuda.int8_quantize_rows: need 0 <= M, K < 2^31");
        if (M > 0 && (x == 0 || xq == 0 || xs == 0))
          throw py::value_error("llmkern._C_cuda.int8_quantize_rows: null pointer among x, xq, xs");
        py::gil_scoped_release release;
        int8_quantize_rows_cuda(reinterpret_cast<const void*>(x), x_dtype, ldx, int(M), int(K),
                                reinterpret_cast<int8_t*>(xq), ldq, reinterpret_cast<float*>(xs),
                                reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("ldx"), py::arg("M"), py::arg("K"), py::arg("xq"), py::arg("ldq"),
      py::arg("xs"), py::arg("stream"),
      "W8A8 activation quantization alone (quantize_rows_int8's rule): xq int8 [M, K], xs fp32 [M].");
  m.def(
      "int8_linear_dequant",
      [](std::uintptr_t w, std::uintptr_t scale, int64_t group, int64_t N, int64_t K, std::uintptr_t out, int dtype,
         std::uintptr_t stream) {
        check_dims("llmkern._C_cuda.int8_linear_dequant", 0, N, K);
        if (group < 1 || group > K) throw py::value_error("llmkern._C_cuda.int8_linear_dequant: group must be in [1, K]");
        if (N > 0 && (w == 0 || scale == 0 || out == 0))
          throw py::value_error("llmkern._C_cuda.int8_linear_dequant: null pointer among w, scale, out");
        py::gil_scoped_release release;
        int8_linear_dequant_cuda(reinterpret_cast<const int8_t*>(w), reinterpret_cast<const float*>(scale), int(group),
                                 int(N), int(K), reinterpret_cast<void*>(out), dtype,
                                 reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("w"), py::arg("scale"), py::arg("group"), py::arg("N"), py::arg("K"), py::arg("out"), py::arg("dtype"),
      py::arg("stream"), "out[N, K] (dtype 1 bfloat16 / 2 float16) = w * scale, rounded once.");
}

}  // namespace llmkern
