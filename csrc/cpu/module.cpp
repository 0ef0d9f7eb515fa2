// llmkern._C: the CPU kernels (pybind11, no torch headers). Module-level functions (ISA, features)
// live here; each op's launcher is registered by its own source file (see bindings.h).
#include <pybind11/pybind11.h>

#include <string>

#include "bindings.h"
#include "llmkern/cpu/features.h"
#include "llmkern/cpu/membench.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "llmkern CPU kernels: OpenMP, runtime ISA dispatch (avx512_vnni / avx2 / scalar), no torch headers";
  m.def(
      "resolve_isa",
      [](const std::string& name) {
        return std::string(llmkern::cpu::isa_name(llmkern::bindings::isa_or_throw("llmkern._C.resolve_isa", name)));
      },
      py::arg("name"),
      "'' -> the best ISA this CPU supports ('avx512_vnni', 'avx2' or 'scalar'); a name -> that name if "
      "supported here, else ValueError listing what is supported.");
  m.def(
      "cpu_features",
      []() {
        py::dict d;
        for (const auto& kv : llmkern::cpu::features().items()) d[py::str(kv.first)] = kv.second;
        return d;
      },
      "CPU features usable here (cpuid, and xgetbv for the OS saving the registers): name -> bool.");
  m.def(
      "read_sum",
      [](std::uintptr_t ptr, int64_t n, int threads, const std::string& isa) {
        const char* where = "llmkern._C.read_sum";
        if (n < 0) llmkern::bindings::fail_arg(where, "n must be >= 0, got " + std::to_string(n));
        if (n > 0) llmkern::bindings::check_ptr_arg(where, "ptr", ptr, 4);
        const auto i = llmkern::bindings::isa_or_throw(where, isa);
        py::gil_scoped_release nogil;
        return llmkern::cpu::read_sum(reinterpret_cast<const float*>(ptr), n, threads, i);
      },
      py::arg("ptr"), py::arg("n"), py::arg("threads"), py::arg("isa") = "",
      "Sum of n float32 at ptr, streamed with the widest loads over `threads` threads: the memory "
      "read-bandwidth probe of benchmarks/_machine.py.");
  m.def(
      "bf16_dot_rate_ratio",
      []() {
        if (!llmkern::cpu::features().avx512_bf16 || !llmkern::cpu::features().avx512f) return 0.0;
        py::gil_scoped_release nogil;
        return llmkern::cpu::bf16_dot_rate_ratio();
      },
      "vdpbf16ps instructions per second over 512-bit FMAs per second on the calling core (a ~0.1 ms "
      "measurement), 0.0 without AVX512-BF16: ~1 where bf16 dot products run at the FMA rate (AMD Zen 4 / 5), "
      "~0.25 where they issue every other cycle (an Intel Xeon here).");
  llmkern::bindings::bind_decode_step(m);  // first: KernelCall and BoundLinear, returned by <op>_call / <op>_bind
  llmkern::bindings::bind_int8_linear(m);
  llmkern::bindings::bind_decode_attention(m);
  llmkern::bindings::bind_kv_cache_append(m);
  llmkern::bindings::bind_rms_norm(m);
  llmkern::bindings::bind_rotary_embedding(m);
  llmkern::bindings::bind_attention(m);
  llmkern::bindings::bind_int4_linear(m);
  llmkern::bindings::bind_int4_linear_w4a8(m);
  llmkern::bindings::bind_gguf_blocks(m);
}
