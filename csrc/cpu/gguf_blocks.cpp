// llmkern._C.gguf_unpack: the native path of llmkern/formats/gguf_kquants.py (kernels:
// csrc/include/llmkern/cpu/gguf_blocks.h). The Python side checks shapes, byte counts and the float16
// fields, allocates the outputs and passes raw pointers.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings.h"
#include "llmkern/cpu/gguf_blocks.h"

namespace py = pybind11;

namespace llmkern {
namespace bindings {

void bind_gguf_blocks(py::module_& m) {
  m.def(
      "gguf_unpack",
      [](const std::string& type, std::uintptr_t raw_ptr, int64_t R, int64_t nb, std::uintptr_t out0,
         std::uintptr_t out1, std::uintptr_t out2) {
        const char* where = "llmkern._C.gguf_unpack";
        if (R < 0 || nb < 0) fail_arg(where, "R and nb must be >= 0, got " + std::to_string(R) + ", " + std::to_string(nb));
        if (R == 0 || nb == 0) return;
        check_ptr_arg(where, "raw_ptr", raw_ptr, 1);
        const auto* raw = reinterpret_cast<const uint8_t*>(raw_ptr);
        namespace g = cpu::gguf;
        if (type == "Q4_K") {
          check_ptr_arg(where, "out0 (qweight)", out0, 1);
          check_ptr_arg(where, "out1 (scales)", out1, 4);
          check_ptr_arg(where, "out2 (offsets)", out2, 4);
          py::gil_scoped_release release;
          g::q4_k_to_int4(raw, R, nb, reinterpret_cast<uint8_t*>(out0), reinterpret_cast<float*>(out1),
                          reinterpret_cast<float*>(out2));
        } else if (type == "Q6_K" || type == "Q5_0") {
          check_ptr_arg(where, "out0 (weight)", out0, 1);
          check_ptr_arg(where, "out1 (weight_scale)", out1, 4);
          py::gil_scoped_release release;
          (type == "Q6_K" ? g::q6_k_to_int8 : g::q5_0_to_int8)(raw, R, nb, reinterpret_cast<int8_t*>(out0),
                                                               reinterpret_cast<float*>(out1));
        } else if (type == "Q5_1" || type == "Q5_K") {
          check_ptr_arg(where, "out0 (values)", out0, 4);
          py::gil_scoped_release release;
          (type == "Q5_1" ? g::q5_1_to_f32 : g::q5_k_to_f32)(raw, R, nb, reinterpret_cast<float*>(out0));
        } else {
          fail_arg(where, "type must be Q4_K, Q6_K, Q5_0, Q5_1 or Q5_K, got '" + type + "'");
        }
      },
      py::arg("type"), py::arg("raw_ptr"), py::arg("R"), py::arg("nb"), py::arg("out0"), py::arg("out1") = 0,
      py::arg("out2") = 0,
      "Unpacks R rows of nb GGUF blocks of `type` at raw_ptr into the canonical outputs (Q4_K: qweight, scales, "
      "offsets; Q6_K / Q5_0: weight, weight_scale; Q5_1 / Q5_K: float32 values), contiguous, allocated by the "
      "caller. float16 fields must be finite (checked by the caller).");
}

}  // namespace bindings
}  // namespace llmkern
