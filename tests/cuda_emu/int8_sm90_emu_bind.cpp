// Test-only binding (tests/cuda_emu): the sm_90a W8A8 launcher (csrc/cuda/int8_linear_sm90.cu) called
// directly on CPU pointers in the CUDA emulator, without int8_linear.cu's other (sm_80, inline-asm) kernels.
#include <pybind11/pybind11.h>

#include <cstdint>

namespace py = pybind11;

namespace llmkern {

bool w8a8_sm90(const int8_t* xq, int64_t ldq, const float* xs, const int8_t* w, const float* scale, const float* bias,
               void* out, int64_t ldo, int out_dtype, int M, int N, int K, void* st);

void bind_int8_sm90_emu(py::module_& m) {
  m.def("w8a8_sm90", [](std::uintptr_t xq, int64_t ldq, std::uintptr_t xs, std::uintptr_t w, std::uintptr_t scale,
                        std::uintptr_t bias, std::uintptr_t out, int64_t ldo, int out_dtype, int M, int N, int K) {
    return w8a8_sm90(reinterpret_cast<const int8_t*>(xq), ldq, reinterpret_cast<const float*>(xs),
                     reinterpret_cast<const int8_t*>(w), reinterpret_cast<const float*>(scale),
                     reinterpret_cast<const float*>(bias), reinterpret_cast<void*>(out), ldo, out_dtype, M, N, K,
                     nullptr);
  });
}

}  // namespace llmkern
