// Launcher of attention (prefill; kernels: csrc/include/llmkern/cpu/attention*.h). Called by
// llmkern/ops/attention.py (`_cpu`) with raw pointers and element strides of tensors torch owns.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bindings.h"
#include "llmkern/cpu/attention.h"

namespace py = pybind11;

namespace llmkern {
namespace bindings {
namespace {

const char* kWhere = "llmkern._C.attention";

[[noreturn]] void fail(const std::string& what) { fail_arg(kWhere, what); }

void check_ptr(const char* name, std::uintptr_t p, int64_t align) { check_ptr_arg(kWhere, name, p, align); }

void check_strides(const char* name, const std::vector<int64_t>& s) {
  check_strides_arg(kWhere, name, s, 3, "batch, token, head");
}

// cu [B + 1]: starts at 0, never decreases, ends at most at `total` rows (the kernel trusts it).
void check_cu(const char* name, const int32_t* cu, int64_t B, int64_t total) {
  if (cu[0] != 0) fail(std::string(name) + " must start at 0");
  for (int64_t b = 0; b < B; ++b)
    if (cu[b + 1] < cu[b]) fail(std::string(name) + " must never decrease");
  if (cu[B] > total) fail(std::string(name) + " ends past the packed tensor's " + std::to_string(total) + " rows");
}

constexpr int64_t kMaxDim = int64_t(1) << 31;

auto launch(int dtype, std::uintptr_t q_ptr, std::uintptr_t k_ptr, std::uintptr_t v_ptr,
            const std::vector<int64_t>& q_strides, const std::vector<int64_t>& k_strides,
            const std::vector<int64_t>& v_strides, int64_t B, int64_t Sq, int64_t Sk, int64_t Hq, int64_t Hk,
            int64_t D, std::uintptr_t cu_q_ptr, std::uintptr_t cu_k_ptr, int64_t Tq, int64_t Tk, double scale,
            bool causal, int64_t window_left, int64_t window_right, double softcap, std::uintptr_t out_ptr,
            std::uintptr_t lse_ptr, std::uintptr_t ws_ptr, int64_t ws_bytes, int num_threads,
            const std::string& isa_name, bool bf16_dot) -> int64_t {
  const cpu::Isa isa = isa_or_throw(kWhere, isa_name);
  if (dtype < 0 || dtype > 2) fail("dtype must be 0 (float32), 1 (bfloat16) or 2 (float16)");
  if (B < 0 || B > kMaxDim) fail("B must be in [0, 2^31], got " + std::to_string(B));
  if (Sq < 0 || Sk < 0 || Sq > kMaxDim || Sk > kMaxDim || Tq < 0 || Tk < 0) fail("lengths must be in [0, 2^31]");
  if (Hk < 1 || Hq < Hk || Hq % Hk) fail("Hq must be a positive multiple of Hk, got Hq=" + std::to_string(Hq) + " Hk=" + std::to_string(Hk));
  if (D < 8 || D > 256 || D % 8) fail("D must be a multiple of 8 in [8, 256], got " + std::to_string(D));
  if (num_threads < 1 || num_threads > 1024) fail("num_threads must be in [1, 1024], got " + std::to_string(num_threads));
  if (!(scale > 0)) fail("scale must be > 0");
  if (!(softcap >= 0)) fail("softcap must be >= 0");
  if (window_left < -1 || window_right < -1) fail("window_left/right must be >= -1");
  check_strides("q", q_strides);
  check_strides("k", k_strides);
  check_strides("v", v_strides);
  const bool packed = cu_q_ptr != 0;
  if (packed != (cu_k_ptr != 0)) fail("cu_seqlens_q and cu_seqlens_k go together");
  if (ws_bytes < 0 || (ws_bytes > 0 && ws_ptr == 0)) fail("ws_bytes must be >= 0 with a non-null ws_ptr");
  if (ws_ptr) check_ptr("ws_ptr", ws_ptr, 4);
  if (B == 0) return 0;
  const int64_t e = dtype == 0 ? 4 : 2;
  check_ptr("out_ptr", out_ptr, e);
  if (lse_ptr) check_ptr("lse_ptr", lse_ptr, 4);
  if (packed) {
    check_ptr("cu_seqlens_q", cu_q_ptr, 4);
    check_ptr("cu_seqlens_k", cu_k_ptr, 4);
    check_cu("cu_seqlens_q", reinterpret_cast<const int32_t*>(cu_q_ptr), B, Tq);
    check_cu("cu_seqlens_k", reinterpret_cast<const int32_t*>(cu_k_ptr), B, Tk);
    if (Tq > 0) check_ptr("q_ptr", q_ptr, e);
    if (Tk > 0) {
      check_ptr("k_ptr", k_ptr, e);
      check_ptr("v_ptr", v_ptr, e);
    }
  } else {
    if (Sq > 0) check_ptr("q_ptr", q_ptr, e);
    if (Sk > 0) {
      check_ptr("k_ptr", k_ptr, e);
      check_ptr("v_ptr", v_ptr, e);
    }
  }

  cpu::AttnArgs a;
  a.dtype = static_cast<cpu::DType>(dtype);
  a.B = B;
  a.Hq = Hq;
  a.Hk = Hk;
  a.D = D;
  a.cu_q = reinterpret_cast<const int32_t*>(cu_q_ptr);
  a.cu_k = reinterpret_cast<const int32_t*>(cu_k_ptr);
  a.Sq = Sq;
  a.Sk = Sk;
  a.q = reinterpret_cast<const void*>(q_ptr);
  a.k = reinterpret_cast<const void*>(k_ptr);
  a.v = reinterpret_cast<const void*>(v_ptr);
  a.q_sb = q_strides[0], a.q_st = q_strides[1], a.q_sh = q_strides[2];
  a.k_sb = k_strides[0], a.k_st = k_strides[1], a.k_sh = k_strides[2];
  a.v_sb = v_strides[0], a.v_st = v_strides[1], a.v_sh = v_strides[2];
  a.scale = static_cast<float>(scale);
  a.softcap = static_cast<float>(softcap);
  a.causal = causal;
  a.window_left = window_left;
  a.window_right = causal ? 0 : window_right;
  a.out = reinterpret_cast<void*>(out_ptr);
  a.lse = reinterpret_cast<float*>(lse_ptr);
  a.lse_total = Tq;
  a.num_threads = num_threads;
  a.bf16_dot = bf16_dot;
  py::gil_scoped_release release;
  const size_t need = cpu::attention(a, isa, reinterpret_cast<float*>(ws_ptr), static_cast<size_t>(ws_bytes) / 4);
  return static_cast<int64_t>(need) * 4;
}

}  // namespace

void bind_attention(py::module_& m) {
  m.def("attention", &launch, py::arg("dtype"), py::arg("q_ptr"), py::arg("k_ptr"), py::arg("v_ptr"),
        py::arg("q_strides"), py::arg("k_strides"), py::arg("v_strides"), py::arg("B"), py::arg("Sq"), py::arg("Sk"),
        py::arg("Hq"), py::arg("Hk"), py::arg("D"), py::arg("cu_seqlens_q_ptr"), py::arg("cu_seqlens_k_ptr"),
        py::arg("Tq"), py::arg("Tk"), py::arg("scale"), py::arg("causal"), py::arg("window_left"),
        py::arg("window_right"), py::arg("softcap"), py::arg("out_ptr"), py::arg("lse_ptr"), py::arg("ws_ptr"), py::arg("ws_bytes"), py::arg("num_threads"),
        py::arg("isa"), py::arg("bf16_dot") = true,
        "Prefill attention on raw pointers (see llmkern/ops/attention.py). Strides are in elements "
        "(batch, token, head; batch unused when packed), D contiguous; out contiguous like q, lse "
        "[B, Hq, Sq] or [Hq, Tq] float32 (lse_ptr 0: not written). ws: the caller's scratch; returns 0 when "
        "it ran, else the bytes of scratch it needs (without running: call with ws_bytes 0 to ask). Packed: cu_seqlens_* int32 [B + 1] "
        "(read here), Tq/Tk the packed row counts. bf16_dot: bf16 Q K^T by AVX-512 BF16 dot products where "
        "the CPU has them (False: the fp32 path, for tests). Releases the GIL; invalid arguments raise ValueError.");
}

}  // namespace bindings
}  // namespace llmkern
