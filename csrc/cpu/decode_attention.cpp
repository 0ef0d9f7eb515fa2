// Launcher of decode_attention (kernels: csrc/include/llmkern/cpu/decode_attention*.h). Called by
// llmkern/ops/decode_attention.py (`_cpu`) with raw pointers and element strides of tensors torch owns.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bindings.h"
#include "llmkern/cpu/decode_attention.h"

namespace py = pybind11;

namespace llmkern {
namespace bindings {
namespace {

const char* kWhere = "llmkern._C.decode_attention";

[[noreturn]] void fail(const std::string& what) { fail_arg(kWhere, what); }

void check_ptr(const char* name, std::uintptr_t p, int64_t align) { check_ptr_arg(kWhere, name, p, align); }

void check_strides(const char* name, const std::vector<int64_t>& s, size_t n) {
  if (s.size() != n) fail(std::string(name) + " must have " + std::to_string(n) + " strides");
  for (int64_t x : s)
    if (x < 0) fail(std::string(name) + " strides must be >= 0");
}

constexpr int64_t kMaxDim = int64_t(1) << 31;

void check_dims(int64_t B, int64_t Sq, int64_t Hq, int64_t Hk, int64_t D, int64_t capacity, int threads) {
  if (B < 0 || B > kMaxDim) fail("B must be in [0, 2^31], got " + std::to_string(B));
  if (Sq < 1 || Sq > kMaxDim) fail("Sq must be in [1, 2^31], got " + std::to_string(Sq));
  if (Hk < 1 || Hq < Hk || Hq % Hk) fail("Hq must be a positive multiple of Hk, got Hq=" + std::to_string(Hq) + " Hk=" + std::to_string(Hk));
  if (D < 8 || D > 256 || D % 8) fail("D must be a multiple of 8 in [8, 256], got " + std::to_string(D));
  if (capacity < 0) fail("capacity must be >= 0");
  if (threads < 1 || threads > 1024) fail("num_threads must be in [1, 1024], got " + std::to_string(threads));
}

KernelCall make_call(std::uintptr_t q_ptr, int q_dtype, const std::vector<int64_t>& q_strides, int64_t B, int64_t Sq, int64_t Hq,
            int64_t Hk, int64_t D, std::uintptr_t k_ptr, std::uintptr_t v_ptr, int kv_type,
            const std::vector<int64_t>& k_strides, const std::vector<int64_t>& v_strides, std::uintptr_t ks_ptr,
            std::uintptr_t vs_ptr, const std::vector<int64_t>& ks_strides, const std::vector<int64_t>& vs_strides,
            std::uintptr_t seq_lens_ptr, std::uintptr_t bt_ptr, int64_t bt_stride, int64_t block_size, int64_t capacity,
            double scale, double softcap, int64_t window_left, std::uintptr_t out_ptr, std::uintptr_t ws_ptr,
            int64_t ws_bytes, int num_threads, const std::string& isa_name, bool i16_dot) {
  const cpu::Isa isa = isa_or_throw(kWhere, isa_name);
  check_dims(B, Sq, Hq, Hk, D, capacity, num_threads);
  if (q_dtype < 0 || q_dtype > 2) fail("q_dtype must be 0 (float32), 1 (bfloat16) or 2 (float16)");
  if (kv_type < 0 || kv_type > 3) fail("kv_type must be 0..3 (float32, bfloat16, float16, int8)");
  if (kv_type != 3 && kv_type != q_dtype) fail("a float cache must have q's dtype");
  check_strides("q", q_strides, 3);
  check_strides("k_cache", k_strides, 3);
  check_strides("v_cache", v_strides, 3);
  if (!(scale > 0)) fail("scale must be > 0");
  if (!(softcap >= 0)) fail("softcap must be >= 0");
  if (window_left < -1) fail("window_left must be >= -1");
  if (block_size < 0 || (bt_ptr && block_size < 1)) fail("block_size must be >= 1 with a block table, 0 without");
  const int64_t need = cpu::decode_workspace_bytes(B, Sq, Hq, Hk, D, capacity, num_threads);
  if (ws_bytes < need) fail("workspace too small: " + std::to_string(ws_bytes) + " < " + std::to_string(need));
  if (B == 0) return {};
  const int64_t qe = q_dtype == 0 ? 4 : 2;
  check_ptr("q_ptr", q_ptr, qe);
  check_ptr("out_ptr", out_ptr, qe);
  check_ptr("k_ptr", k_ptr, cpu::kv_elem_size(kv_type));
  check_ptr("v_ptr", v_ptr, cpu::kv_elem_size(kv_type));
  check_ptr("seq_lens_ptr", seq_lens_ptr, 4);
  check_ptr("ws_ptr", ws_ptr, 4);
  if (bt_ptr) check_ptr("block_table_ptr", bt_ptr, 4);
  if (kv_type == 3) {
    check_ptr("k_scale_ptr", ks_ptr, 4);
    check_ptr("v_scale_ptr", vs_ptr, 4);
    check_strides("k_scale", ks_strides, 3);
    check_strides("v_scale", vs_strides, 3);
  }

  cpu::DecodeArgs a;
  a.q = reinterpret_cast<const void*>(q_ptr);
  a.q_dtype = static_cast<cpu::DType>(q_dtype);
  a.q_sb = q_strides[0];
  a.q_st = q_strides[1];
  a.q_sh = q_strides[2];
  a.B = B;
  a.Sq = Sq;
  a.Hq = Hq;
  a.Hk = Hk;
  a.D = D;
  a.kv_type = kv_type;
  a.k = reinterpret_cast<const void*>(k_ptr);
  a.v = reinterpret_cast<const void*>(v_ptr);
  a.k_s0 = k_strides[0], a.k_s1 = k_strides[1], a.k_s2 = k_strides[2];
  a.v_s0 = v_strides[0], a.v_s1 = v_strides[1], a.v_s2 = v_strides[2];
  if (kv_type == 3) {
    a.k_scale = reinterpret_cast<const float*>(ks_ptr);
    a.v_scale = reinterpret_cast<const float*>(vs_ptr);
    a.ks_s0 = ks_strides[0], a.ks_s1 = ks_strides[1], a.ks_s2 = ks_strides[2];
    a.vs_s0 = vs_strides[0], a.vs_s1 = vs_strides[1], a.vs_s2 = vs_strides[2];
  }
  a.seq_lens = reinterpret_cast<const int32_t*>(seq_lens_ptr);
  a.block_table = reinterpret_cast<const int32_t*>(bt_ptr);
  a.bt_stride = bt_stride;
  a.block_size = bt_ptr ? block_size : 0;
  a.capacity = capacity;
  a.scale = static_cast<float>(scale);
  a.softcap = static_cast<float>(softcap);
  a.window_left = window_left;
  a.out = reinterpret_cast<void*>(out_ptr);
  a.ws = reinterpret_cast<void*>(ws_ptr);
  a.num_threads = num_threads;
  a.i16_dot = i16_dot;
  return {[a, isa] { cpu::decode_attention(a, isa); }, "decode_attention"};
}

// True when every seq_lens[b] is in [0, capacity] and 0 or >= Sq, and (block_table non-null) every
// block-table entry a sequence's length uses is in [0, num_blocks). The op's value checks on CPU tensors
// in well under a microsecond; on false it builds its error message itself.
bool values_ok(std::uintptr_t seq_lens_ptr, int64_t B, int64_t Sq, int64_t capacity, std::uintptr_t bt_ptr,
               int64_t bt_stride, int64_t block_size, int64_t num_blocks) {
  if (B < 0 || (B > 0 && !seq_lens_ptr) || (bt_ptr && block_size < 1)) fail("values_ok: bad arguments");
  const int32_t* lens = reinterpret_cast<const int32_t*>(seq_lens_ptr);
  const int32_t* bt = reinterpret_cast<const int32_t*>(bt_ptr);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = lens[b];
    if (n < 0 || n > capacity || (n && n < Sq)) return false;
    if (bt) {
      const int64_t used = (n + block_size - 1) / block_size;
      for (int64_t i = 0; i < used; ++i) {
        const int64_t e = bt[b * bt_stride + i];
        if (e < 0 || e >= num_blocks) return false;
      }
    }
  }
  return true;
}

}  // namespace

void bind_decode_attention(py::module_& m) {
  m.def("decode_attention_values_ok", &values_ok, py::arg("seq_lens_ptr"), py::arg("B"), py::arg("Sq"),
        py::arg("capacity"), py::arg("block_table_ptr"), py::arg("block_table_stride"), py::arg("block_size"),
        py::arg("num_blocks"),
        "Whether int32 seq_lens [B] are in 0..capacity (and >= Sq when non-zero) and the int32 block table "
        "entries they use (row stride block_table_stride, ptr 0 = none) are in 0..num_blocks-1.");
  m.def(
      "decode_attention_workspace_size",
      [](int64_t B, int64_t Sq, int64_t Hq, int64_t Hk, int64_t D, int64_t capacity, int num_threads) {
        check_dims(B, Sq, Hq, Hk, D, capacity, num_threads);
        return cpu::decode_workspace_bytes(B, Sq, Hq, Hk, D, capacity, num_threads);
      },
      py::arg("B"), py::arg("Sq"), py::arg("Hq"), py::arg("Hk"), py::arg("D"), py::arg("capacity"),
      py::arg("num_threads"), "Bytes of workspace decode_attention needs.");
  def_launcher(m, "decode_attention", &make_call,
        "decode attention on raw pointers (see llmkern/ops/decode_attention.py). Strides are in elements: "
        "q (batch, token, head), caches (row, col, head), scales (row, col, head); D is contiguous. "
        "Releases the GIL while computing; invalid arguments raise ValueError. i16_dot: allow int16 dot products "
        "for a bf16 / f16 q with an int8 cache on the avx512_vnni and avx2 paths (off: the fp32 path).",
        py::arg("q_ptr"), py::arg("q_dtype"), py::arg("q_strides"), py::arg("B"),
        py::arg("Sq"), py::arg("Hq"), py::arg("Hk"), py::arg("D"), py::arg("k_ptr"), py::arg("v_ptr"),
        py::arg("kv_type"), py::arg("k_strides"), py::arg("v_strides"), py::arg("k_scale_ptr"),
        py::arg("v_scale_ptr"), py::arg("k_scale_strides"), py::arg("v_scale_strides"), py::arg("seq_lens_ptr"),
        py::arg("block_table_ptr"), py::arg("block_table_stride"), py::arg("block_size"), py::arg("capacity"),
        py::arg("scale"), py::arg("softcap"), py::arg("window_left"), py::arg("out_ptr"), py::arg("ws_ptr"),
        py::arg("ws_bytes"), py::arg("num_threads"), py::arg("isa"), py::arg("i16_dot") = true);
}

}  // namespace bindings
}  // namespace llmkern
