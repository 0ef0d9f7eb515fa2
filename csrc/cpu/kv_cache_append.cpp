// Launcher of kv_cache_append (kernel: csrc/include/llmkern/cpu/kv_cache_append.h). Called by
// llmkern/ops/kv_cache_append.py (`_cpu`) with raw pointers and element strides of tensors torch owns.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <string>
#include <vector>

#include "bindings.h"
#include "llmkern/cpu/kv_cache_append.h"

namespace py = pybind11;

namespace llmkern {
namespace bindings {
namespace {

const char* kWhere = "llmkern._C.kv_cache_append";

[[noreturn]] void fail(const std::string& what) { fail_arg(kWhere, what); }

void check_ptr(const char* name, std::uintptr_t p, int64_t align) { check_ptr_arg(kWhere, name, p, align); }

void check_strides(const char* name, const std::vector<int64_t>& s) {
  check_strides_arg(kWhere, name, s, 3, "batch, token, head");
}

KernelCall make_call(std::uintptr_t k_ptr, std::uintptr_t v_ptr, int kv_dtype, const std::vector<int64_t>& k_strides,
            const std::vector<int64_t>& v_strides, int64_t B, int64_t S, int64_t Hk, int64_t D,
            std::uintptr_t slots_ptr, std::uintptr_t k_cache_ptr, std::uintptr_t v_cache_ptr, int cache_type,
            std::uintptr_t k_scale_ptr, std::uintptr_t v_scale_ptr, std::uintptr_t cos_sin_ptr, int64_t R,
            std::uintptr_t positions_ptr, bool interleaved, std::uintptr_t q_ptr, int q_dtype,
            const std::vector<int64_t>& q_strides, int64_t Hq, int num_threads, const std::string& isa_name) {
  const cpu::Isa isa = isa_or_throw(kWhere, isa_name);
  if (kv_dtype < 0 || kv_dtype > 2) fail("kv_dtype must be 0 (float32), 1 (bfloat16) or 2 (float16)");
  if (cache_type < 0 || cache_type > 3) fail("cache_type must be 0..3 (float32, bfloat16, float16, int8)");
  if (B < 0 || S < 0 || Hk < 1 || D < 1 || D > 256) fail("need B, S >= 0, Hk >= 1 and 1 <= D <= 256");
  if (num_threads < 1 || num_threads > 1024) fail("num_threads must be in [1, 1024]");
  check_strides("k", k_strides);
  check_strides("v", v_strides);
  if (B * S == 0) return {};
  const int64_t esz = kv_dtype == 0 ? 4 : 2;
  check_ptr("k_ptr", k_ptr, esz);
  check_ptr("v_ptr", v_ptr, esz);
  check_ptr("slots_ptr", slots_ptr, 8);
  check_ptr("k_cache_ptr", k_cache_ptr, (cache_type == 0 ? 4 : (cache_type == 3 ? 1 : 2)));
  check_ptr("v_cache_ptr", v_cache_ptr, (cache_type == 0 ? 4 : (cache_type == 3 ? 1 : 2)));
  if (cache_type == 3) {
    check_ptr("k_scale_ptr", k_scale_ptr, 4);
    check_ptr("v_scale_ptr", v_scale_ptr, 4);
  }
  cpu::AppendArgs a;
  if (cos_sin_ptr) {
    if (R < 2 || R % 2 || R > D) fail("rotary dim R must be even and in [2, D]");
    check_ptr("positions_ptr", positions_ptr, 8);
    a.cos_sin = reinterpret_cast<const float*>(cos_sin_ptr);
    a.R = R;
    a.positions = reinterpret_cast<const int64_t*>(positions_ptr);
    a.interleaved = interleaved;
    if (q_ptr) {
      if (q_dtype < 0 || q_dtype > 2) fail("q_dtype must be 0, 1 or 2");
      if (Hq < 1) fail("Hq must be >= 1");
      check_ptr("q_ptr", q_ptr, q_dtype == 0 ? 4 : 2);
      check_strides("q", q_strides);
      a.q = reinterpret_cast<void*>(q_ptr);
      a.q_dtype = static_cast<cpu::DType>(q_dtype);
      a.q_s0 = q_strides[0], a.q_s1 = q_strides[1], a.q_s2 = q_strides[2];
      a.Hq = Hq;
    }
  }
  a.k = reinterpret_cast<const void*>(k_ptr);
  a.v = reinterpret_cast<const void*>(v_ptr);
  a.kv_dtype = static_cast<cpu::DType>(kv_dtype);
  a.k_s0 = k_strides[0], a.k_s1 = k_strides[1], a.k_s2 = k_strides[2];
  a.v_s0 = v_strides[0], a.v_s1 = v_strides[1], a.v_s2 = v_strides[2];
  a.B = B;
  a.S = S;
  a.Hk = Hk;
  a.D = D;
  a.slots = reinterpret_cast<const int64_t*>(slots_ptr);
  a.k_cache = reinterpret_cast<void*>(k_cache_ptr);
  a.v_cache = reinterpret_cast<void*>(v_cache_ptr);
  a.cache_type = cache_type;
  a.k_scale = reinterpret_cast<float*>(k_scale_ptr);
  a.v_scale = reinterpret_cast<float*>(v_scale_ptr);
  a.num_threads = num_threads;
  a.isa = isa;
  return {[a] { cpu::kv_cache_append(a); }, "kv_cache_append"};
}

// (min, max) of n int64 values (n >= 1): the op's slot range check on CPU tensors without two torch
// reductions.
std::pair<int64_t, int64_t> i64_range(std::uintptr_t ptr, int64_t n) {
  if (n < 1 || !ptr) fail("i64_range: need n >= 1 and a pointer");
  const int64_t* p = reinterpret_cast<const int64_t*>(ptr);
  int64_t lo = p[0], hi = p[0];
  for (int64_t i = 1; i < n; ++i) {
    lo = std::min(lo, p[i]);
    hi = std::max(hi, p[i]);
  }
  return {lo, hi};
}

}  // namespace

void bind_kv_cache_append(py::module_& m) {
  m.def("i64_range", &i64_range, py::arg("ptr"), py::arg("n"), "(min, max) of n contiguous int64 values.");
  def_launcher(m, "kv_cache_append", &make_call,
        "Write k/v [B, S, Hk, D] (element strides (batch, token, head), D contiguous) into caches seen as "
        "[num_slots, Hk, D] at slots (int64 [B * S], -1 skipped); optional fused rotary (q rotated in place) "
        "and int8 quantization (cache_type 3); isa: the kernel variant (resolve_isa names, \"\" = best). Releases "
        "the GIL; invalid arguments raise ValueError.",
        py::arg("k_ptr"), py::arg("v_ptr"), py::arg("kv_dtype"), py::arg("k_strides"),
        py::arg("v_strides"), py::arg("B"), py::arg("S"), py::arg("Hk"), py::arg("D"), py::arg("slots_ptr"),
        py::arg("k_cache_ptr"), py::arg("v_cache_ptr"), py::arg("cache_type"), py::arg("k_scale_ptr"),
        py::arg("v_scale_ptr"), py::arg("cos_sin_ptr"), py::arg("R"), py::arg("positions_ptr"),
        py::arg("interleaved"), py::arg("q_ptr"), py::arg("q_dtype"), py::arg("q_strides"), py::arg("Hq"),
        py::arg("num_threads"), py::arg("isa") = "");
}

}  // namespace bindings
}  // namespace llmkern
