// pybind11 binding of the int4_linear CUDA launchers (csrc/cuda/int4_linear.cu). Pointers and the stream
// arrive as integers from torch (llmkern/ops/int4_linear.py, `_cuda`); no torch headers here.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace py = pybind11;

namespace llmkern {

int int4_linear_splits(int M, int N, int K, int num_sms, int x_dtype, bool decode_mma);
int int4_linear_gemm_splits(int M, int N, int K, int num_sms);
const char* int4_linear_cuda(const void* x, int x_dtype, int64_t ldx, int M, int K, const uint8_t* qw, int N,
                             const float* scales, const float* offsets, int group, const float* bias, void* out,
                             int64_t ldo, float* ws, int splits, int num_sms, bool decode_mma, cudaStream_t st,
                             bool wgmma);
void int4_linear_dequant_cuda(const uint8_t* qw, const float* scales, const float* offsets, int group, int N, int K,
                              void* out, int dtype, cudaStream_t st);

int int4_linear_packed_splits(int N, int K, int num_sms);
void int4_linear_packed_bytes(int N, int K, int group, bool scale16, int64_t* weight_bytes, int64_t* scale_bytes);
void int4_linear_pack_cuda(const uint8_t* qw, const float* scales, const float* offsets, int group, int N, int K,
                           void* qp, void* sp, bool scale16, cudaStream_t st);
void int4_linear_packed_dequant_cuda(const void* qp, const void* sp, bool scale16, int group, int N, int K, void* out,
                                     int dtype, cudaStream_t st);
const char* int4_linear_packed_cuda(const void* x, int x_dtype, int64_t ldx, int M, int K, const void* qp,
                                    const void* sp, bool scale16, int N, int group, const float* bias, void* out,
                                    int64_t ldo, float* ws, int splits, int num_sms, cudaStream_t st);

namespace {

constexpr int64_t kMaxDim = (int64_t(1) << 31) - 1;

void check_dims(const char* where, int64_t M, int64_t N, int64_t K) {
  if (M < 0 || M > kMaxDim || N < 0 || N > kMaxDim || K < 1 || K > kMaxDim)
    throw py::value_error(std::string(where) + ": need 0 <= M, N < 2^31 and 1 <= K < 2^31, got M=" +
                          std::to_string(M) + " N=" + std::to_string(N) + " K=" + std::to_string(K));
}

}  // namespace

void bind_int4_linear(py::module_& m) {
  m.def(
      "int4_linear_splits",
      [](int64_t M, int64_t N, int64_t K, int num_sms, int x_dtype, bool decode_mma) {
        check_dims("llmkern._C_cuda.int4_linear_splits", M, N, K);
        return int4_linear_splits(int(M), int(N), int(K), num_sms, x_dtype, decode_mma);
      },
      py::arg("M"), py::arg("N"), py::arg("K"), py::arg("num_sms"), py::arg("x_dtype"), py::arg("decode_mma"),
      "Split-K factor int4_linear uses for these sizes, every route (workspace: fp32 [splits, M, N] when > 1).");
  m.def(
      "int4_linear",
      [](std::uintptr_t x, int x_dtype, int64_t ldx, int64_t M, int64_t K, std::uintptr_t qw, int64_t N,
         std::uintptr_t scales, std::uintptr_t offsets, int64_t group, std::uintptr_t bias, std::uintptr_t out,
         int64_t ldo, std::uintptr_t ws, int splits, int num_sms, bool decode_mma, std::uintptr_t stream, bool wgmma) {
        check_dims("llmkern._C_cuda.int4_linear", M, N, K);
        if (M > 0 && N > 0 && (x == 0 || qw == 0 || scales == 0 || offsets == 0 || out == 0))
          throw py::value_error("llmkern._C_cuda.int4_linear: null pointer among x, qweight, scales, offsets, out");
        py::gil_scoped_release release;
        return std::string(int4_linear_cuda(
            reinterpret_cast<const void*>(x), x_dtype, ldx, int(M), int(K), reinterpret_cast<const uint8_t*>(qw),
            int(N), reinterpret_cast<const float*>(scales), reinterpret_cast<const float*>(offsets), int(group),
            reinterpret_cast<const float*>(bias), reinterpret_cast<void*>(out), ldo, reinterpret_cast<float*>(ws),
            splits, num_sms, decode_mma, reinterpret_cast<cudaStream_t>(stream), wgmma));
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("ldx"), py::arg("M"), py::arg("K"), py::arg("qweight"), py::arg("N"),
      py::arg("scales"), py::arg("offsets"), py::arg("group"), py::arg("bias"), py::arg("out"), py::arg("ldo"),
      py::arg("ws"), py::arg("splits"), py::arg("num_sms"), py::arg("decode_mma"), py::arg("stream"),
      py::arg("wgmma") = false,
      "out[M, N] = x[M, K] @ dequant(qweight)^T (+ fp32 bias) on raw device pointers (canonical int4). "
      "x_dtype: 0 float32, 1 bfloat16, 2 float16 (out too). wgmma: 16-bit x with M > 16 run the sm_90a "
      "warpgroup-MMA kernel (compute capability 9.0 only, else ValueError). Returns the name of the kernel "
      "path taken.");
  m.def(
      "int4_linear_dequant",
      [](std::uintptr_t qw, std::uintptr_t scales, std::uintptr_t offsets, int64_t group, int64_t N, int64_t K,
         std::uintptr_t out, int dtype, std::uintptr_t stream) {
        check_dims("llmkern._C_cuda.int4_linear_dequant", 0, N, K);
        if (N > 0 && (qw == 0 || scales == 0 || offsets == 0 || out == 0))
          throw py::value_error("llmkern._C_cuda.int4_linear_dequant: null pointer among qweight, scales, offsets, out");
        py::gil_scoped_release release;
        int4_linear_dequant_cuda(reinterpret_cast<const uint8_t*>(qw), reinterpret_cast<const float*>(scales),
                                 reinterpret_cast<const float*>(offsets), int(group), int(N), int(K),
                                 reinterpret_cast<void*>(out), dtype, reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("qweight"), py::arg("scales"), py::arg("offsets"), py::arg("group"), py::arg("N"), py::arg("K"),
      py::arg("out"), py::arg("dtype"), py::arg("stream"),
      "out[N, K] (dtype 1 bfloat16 / 2 float16) = q * scale + offset (fp32), rounded once.");
  m.def(
      "int4_linear_packed_dequant",
      [](std::uintptr_t qp, std::uintptr_t sp, bool scale16, int64_t group, int64_t N, int64_t K, std::uintptr_t out,
         int dtype, std::uintptr_t stream) {
        check_dims("llmkern._C_cuda.int4_linear_packed_dequant", 0, N, K);
        if (N > 0 && (qp == 0 || sp == 0 || out == 0))
          throw py::value_error("llmkern._C_cuda.int4_linear_packed_dequant: null pointer among qp, sp, out");
        py::gil_scoped_release release;
        int4_linear_packed_dequant_cuda(reinterpret_cast<const void*>(qp), reinterpret_cast<const void*>(sp), scale16,
                                        int(group), int(N), int(K), reinterpret_cast<void*>(out), dtype,
                                        reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("qp"), py::arg("sp"), py::arg("scale16"), py::arg("group"), py::arg("N"), py::arg("K"), py::arg("out"),
      py::arg("dtype"), py::arg("stream"),
      "out[N, K] (dtype 1 bfloat16 / 2 float16) = q * scale + offset from the packed weight (int4_linear_pack's "
      "layout): int4_linear_dequant's values.");
  m.def(
      "int4_linear_packed_bytes",
      [](int64_t N, int64_t K, int64_t group, bool scale16) {
        check_dims("llmkern._C_cuda.int4_linear_packed_bytes", 0, N, K);
        if (!(group == 32 || group == 64 || group == 128) || K % group)
          throw py::value_error("llmkern._C_cuda.int4_linear_packed_bytes: group must be 32, 64 or 128 and divide K");
        int64_t wb = 0, sb = 0;
        int4_linear_packed_bytes(int(N), int(K), int(group), scale16, &wb, &sb);
        return py::make_tuple(wb, sb);
      },
      py::arg("N"), py::arg("K"), py::arg("group"), py::arg("scale16"),
      "(weight bytes, scale bytes) of the packed CUDA layout (csrc/include/llmkern/cuda/int4_linear_packed.cuh).");
  m.def(
      "int4_linear_pack",
      [](std::uintptr_t qw, std::uintptr_t scales, std::uintptr_t offsets, int64_t group, int64_t N, int64_t K,
         std::uintptr_t qp, std::uintptr_t sp, bool scale16, std::uintptr_t stream) {
        check_dims("llmkern._C_cuda.int4_linear_pack", 0, N, K);
        if (N > 0 && (qw == 0 || scales == 0 || offsets == 0 || qp == 0 || sp == 0))
          throw py::value_error("llmkern._C_cuda.int4_linear_pack: null pointer among qweight, scales, offsets, qp, sp");
        py::gil_scoped_release release;
        int4_linear_pack_cuda(reinterpret_cast<const uint8_t*>(qw), reinterpret_cast<const float*>(scales),
                              reinterpret_cast<const float*>(offsets), int(group), int(N), int(K),
                              reinterpret_cast<void*>(qp), reinterpret_cast<void*>(sp), scale16,
                              reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("qweight"), py::arg("scales"), py::arg("offsets"), py::arg("group"), py::arg("N"), py::arg("K"),
      py::arg("qp"), py::arg("sp"), py::arg("scale16"), py::arg("stream"),
      "Repack a canonical int4 weight into the packed CUDA layout (qp, sp of int4_linear_packed_bytes). scale16: "
      "store scales and offsets as fp16 (only when every one is an fp16 value).");
  m.def(
      "int4_linear_gemm_splits",
      [](int64_t M, int64_t N, int64_t K, int num_sms) {
        check_dims("llmkern._C_cuda.int4_linear_gemm_splits", M, N, K);
        return int4_linear_gemm_splits(int(M), int(N), int(K), num_sms);
      },
      py::arg("M"), py::arg("N"), py::arg("K"), py::arg("num_sms"),
      "Split-K factor of the M > 16 GEMMs (canonical mma.sync / wgmma, packed) for these sizes (workspace: fp32 "
      "[splits, M, N] when > 1).");
  m.def(
      "int4_linear_packed_splits",
      [](int64_t N, int64_t K, int num_sms) {
        check_dims("llmkern._C_cuda.int4_linear_packed_splits", 0, N, K);
        return int4_linear_packed_splits(int(N), int(K), num_sms);
      },
      py::arg("N"), py::arg("K"), py::arg("num_sms"),
      "Split-K factor of the packed kernel (workspace: fp32 [splits, M, N] when > 1).");
  m.def(
      "int4_linear_packed",
      [](std::uintptr_t x, int x_dtype, int64_t ldx, int64_t M, int64_t K, std::uintptr_t qp, std::uintptr_t sp,
         bool scale16, int64_t N, int64_t group, std::uintptr_t bias, std::uintptr_t out, int64_t ldo, std::uintptr_t ws,
         int splits, int num_sms, std::uintptr_t stream) {
        check_dims("llmkern._C_cuda.int4_linear_packed", M, N, K);
        if (M > 0 && N > 0 && (x == 0 || qp == 0 || sp == 0 || out == 0))
          throw py::value_error("llmkern._C_cuda.int4_linear_packed: null pointer among x, qp, sp, out");
        py::gil_scoped_release release;
        return std::string(int4_linear_packed_cuda(
            reinterpret_cast<const void*>(x), x_dtype, ldx, int(M), int(K), reinterpret_cast<const void*>(qp),
            reinterpret_cast<const void*>(sp), scale16, int(N), int(group), reinterpret_cast<const float*>(bias),
            reinterpret_cast<void*>(out), ldo, reinterpret_cast<float*>(ws), splits, num_sms,
            reinterpret_cast<cudaStream_t>(stream)));
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("ldx"), py::arg("M"), py::arg("K"), py::arg("qp"), py::arg("sp"),
      py::arg("scale16"), py::arg("N"), py::arg("group"), py::arg("bias"), py::arg("out"), py::arg("ldo"),
      py::arg("ws"), py::arg("splits"), py::arg("num_sms"), py::arg("stream"),
      "out[M, N] = x[M, K] @ dequant(w)^T (+ fp32 bias) from the packed layout; 16-bit x (x_dtype 1 bfloat16, "
      "2 float16): the decode kernel for M <= 16, the GEMM for M > 16 (split-K with splits > 1 either way). "
      "Returns the kernel path taken.");
}

}  // namespace llmkern
