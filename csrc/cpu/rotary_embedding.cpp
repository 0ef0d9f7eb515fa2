// Launcher of rotary_embedding (kernel: csrc/include/llmkern/cpu/rotary_embedding.h). Called by
// llmkern/ops/rotary_embedding.py (`_cpu`) with raw pointers and element strides of tensors torch owns.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bindings.h"
#include "llmkern/cpu/rotary_embedding.h"

namespace py = pybind11;

namespace llmkern {
namespace bindings {
namespace {

const char* kWhere = "llmkern._C.rotary_embedding";

[[noreturn]] void fail(const std::string& what) { fail_arg(kWhere, what); }

void check_ptr(const char* name, std::uintptr_t p, int64_t align) { check_ptr_arg(kWhere, name, p, align); }

void check_dtype(const char* name, int code) {
  if (code < 0 || code > 2) fail(std::string(name) + " must be 0 (float32), 1 (bfloat16) or 2 (float16)");
}

void check_strides(const char* name, const std::vector<int64_t>& s) {
  check_strides_arg(kWhere, name, s, 2, "token, head");
}

void launch(std::uintptr_t q_ptr, std::uintptr_t q_out_ptr, int q_dtype, const std::vector<int64_t>& q_strides,
            int64_t Hq, std::uintptr_t k_ptr, std::uintptr_t k_out_ptr, int k_dtype,
            const std::vector<int64_t>& k_strides, int64_t Hk, int64_t T, int64_t D, std::uintptr_t cos_sin_ptr,
            int64_t R, std::uintptr_t positions_ptr, bool interleaved, int num_threads, const std::string& isa_name) {
  const cpu::Isa isa = isa_or_throw(kWhere, isa_name);
  check_dtype("q_dtype", q_dtype);
  check_dtype("k_dtype", k_dtype);
  check_strides("q", q_strides);
  check_strides("k", k_strides);
  if (T < 0 || Hq < 1 || Hk < 1 || D < 1) fail("need T >= 0, Hq >= 1, Hk >= 1 and D >= 1");
  if (R < 2 || R % 2 || R > D || R > cpu::kRotaryMaxR)
    fail("rotary dim R must be even and in [2, min(D, " + std::to_string(cpu::kRotaryMaxR) + ")]");
  if (num_threads < 1 || num_threads > 1024) fail("num_threads must be in [1, 1024]");
  if (T == 0) return;
  const int64_t qa = q_dtype == 0 ? 4 : 2, ka = k_dtype == 0 ? 4 : 2;
  check_ptr("q_ptr", q_ptr, qa);
  check_ptr("q_out_ptr", q_out_ptr, qa);
  check_ptr("k_ptr", k_ptr, ka);
  check_ptr("k_out_ptr", k_out_ptr, ka);
  check_ptr("cos_sin_ptr", cos_sin_ptr, 4);
  check_ptr("positions_ptr", positions_ptr, 8);
  cpu::RotaryArgs a;
  a.q = reinterpret_cast<const void*>(q_ptr);
  a.q_out = reinterpret_cast<void*>(q_out_ptr);
  a.q_dtype = static_cast<cpu::DType>(q_dtype);
  a.q_st = q_strides[0], a.q_sh = q_strides[1], a.Hq = Hq;
  a.k = reinterpret_cast<const void*>(k_ptr);
  a.k_out = reinterpret_cast<void*>(k_out_ptr);
  a.k_dtype = static_cast<cpu::DType>(k_dtype);
  a.k_st = k_strides[0], a.k_sh = k_strides[1], a.Hk = Hk;
  a.T = T;
  a.D = D;
  a.cos_sin = reinterpret_cast<const float*>(cos_sin_ptr);
  a.R = R;
  a.positions = reinterpret_cast<const int64_t*>(positions_ptr);
  a.interleaved = interleaved;
  a.num_threads = num_threads;
  a.isa = isa;
  py::gil_scoped_release release;
  cpu::rotary_embedding(a);
}

}  // namespace

void bind_rotary_embedding(py::module_& m) {
  m.def("rotary_embedding", &launch, py::arg("q_ptr"), py::arg("q_out_ptr"), py::arg("q_dtype"),
        py::arg("q_strides"), py::arg("Hq"), py::arg("k_ptr"), py::arg("k_out_ptr"), py::arg("k_dtype"),
        py::arg("k_strides"), py::arg("Hk"), py::arg("T"), py::arg("D"), py::arg("cos_sin_ptr"), py::arg("R"),
        py::arg("positions_ptr"), py::arg("interleaved"), py::arg("num_threads"), py::arg("isa") = "",
        "Rotate q [T, Hq, D] and k [T, Hk, D] (element strides (token, head), D contiguous) at positions "
        "(int64 [T]) by cos_sin (float32 [max_pos, R]: cos | sin) into contiguous q_out/k_out of the same "
        "dtypes; dims R..D-1 copied. isa: '' (the best here), 'avx512_vnni' (vector rows), 'avx2' or 'scalar' "
        "(portable rows; the same bits). Releases the GIL; invalid arguments raise ValueError.");
}

}  // namespace bindings
}  // namespace llmkern
