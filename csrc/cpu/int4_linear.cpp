// Launcher of int4_linear (kernels: csrc/include/llmkern/cpu/int4_linear*.h). Called by
// llmkern/ops/int4_linear.py (`_cpu`) with raw pointers of tensors torch allocated.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings.h"
#include "llmkern/cpu/int4_linear.h"

namespace py = pybind11;

namespace llmkern {
namespace bindings {
namespace {

const char* kWhere = "llmkern._C.int4_linear";

[[noreturn]] void fail(const char* where, const std::string& what) { fail_arg(where, what); }

void check_ptr(const char* name, std::uintptr_t p, int64_t align) { check_ptr_arg(kWhere, name, p, align); }

// Sizes must be small enough that every byte offset the kernel forms fits in int64.
constexpr int64_t kMaxDim = int64_t(1) << 31;

void check_sizes(const char* where, int64_t M, int64_t K, int64_t N, int num_threads) {
  if (M < 0 || M > kMaxDim) fail(where, "M must be in [0, 2^31], got " + std::to_string(M));
  if (N < 0 || N > kMaxDim) fail(where, "N must be in [0, 2^31], got " + std::to_string(N));
  if (K < 32 || K > kMaxDim || K % 32) fail(where, "K must be a positive multiple of 32 below 2^31, got " + std::to_string(K));
  if (num_threads < 1 || num_threads > 1024) fail(where, "num_threads must be in [1, 1024], got " + std::to_string(num_threads));
}

// group_size in {32, 64, 128} dividing K (the op's group sizes).
void check_group(const char* where, int64_t K, int64_t group_size) {
  if (group_size != 32 && group_size != 64 && group_size != 128)
    fail(where, "group_size must be 32, 64 or 128, got " + std::to_string(group_size));
  if (K % group_size) fail(where, "group_size must divide K=" + std::to_string(K) + ", got " + std::to_string(group_size));
}

// The arguments of a packed layout's size and packer: sizes, group, e = 2 (fp16) or 4 (fp32) bytes per scale.
void check_layout_args(const char* where, int64_t N, int64_t K, int64_t group_size, int64_t e) {
  check_sizes(where, 1, K, N, 1);
  check_group(where, K, group_size);
  if (e != 2 && e != 4) fail(where, "e must be 2 (fp16 scales) or 4 (fp32), got " + std::to_string(e));
}

// The rows16 layout's arguments: as check_layout_args, and e = 1 (factored scales) for whole super-blocks.
void check_rows16_args(const char* where, int64_t N, int64_t K, int64_t group_size, int64_t e) {
  if (e != 1) return check_layout_args(where, N, K, group_size, e);
  check_sizes(where, 1, K, N, 1);
  check_group(where, K, group_size);
  if (!cpu::int4_rows16::factored_fits(K, group_size))
    fail(where, "e=1 (factored scales) needs K / group_size a multiple of " + std::to_string(cpu::int4_rows16::kSuper) +
                    ", got " + std::to_string(K / group_size));
}

KernelCall make_call(std::uintptr_t x_ptr, int x_dtype, int64_t x_row_stride, int64_t M, int64_t K, std::uintptr_t qweight_ptr,
            int64_t N, std::uintptr_t scales_ptr, std::uintptr_t offsets_ptr, int64_t group_size, std::uintptr_t bias_ptr,
            std::uintptr_t out_ptr, int64_t out_row_stride, std::uintptr_t ws_ptr, int64_t ws_bytes, int num_threads,
            const std::string& isa_name, int64_t decode_max_rows, bool bf16_dot, std::uintptr_t packed_ptr,
            int64_t packed_e, std::uintptr_t rows16_ptr, int64_t rows16_e) {
  if (x_dtype < 0 || x_dtype > 2) fail(kWhere, "x_dtype must be 0 (float32), 1 (bfloat16) or 2 (float16), got " + std::to_string(x_dtype));
  cpu::Isa isa = isa_or_throw(kWhere, isa_name);
  check_sizes(kWhere, M, K, N, num_threads);
  // Released weights (an Int4Linear holding rows16 alone): no canonical tensors, every call reads rows16,
  // which only the AVX-512 kernels do; a pinned narrower ISA cannot apply to them.
  const bool released = N > 0 && !qweight_ptr && !scales_ptr && !offsets_ptr;  // (N = 0: empty tensors, null pointers)
  if (released) {
    if (!rows16_ptr)
      fail(kWhere, "qweight_ptr, scales_ptr and offsets_ptr may be 0 only with rows16_ptr (the rows16 layout alone)");
    if (packed_ptr) fail(kWhere, "packed_ptr must be 0 without the canonical tensors (qweight_ptr = 0)");
    if (!cpu::isa_supported(cpu::Isa::kAvx512Vnni))
      fail(kWhere, "the rows16 layout alone (qweight_ptr = 0) needs an AVX-512 CPU, this one is not");
    isa = cpu::Isa::kAvx512Vnni;
  }
  check_group(kWhere, K, group_size);
  if (decode_max_rows < -1 || decode_max_rows > kMaxDim)
    fail(kWhere, "decode_max_rows must be -1 (default) or in [0, 2^31], got " + std::to_string(decode_max_rows));
  if (packed_ptr ? (packed_e != 2 && packed_e != 4) : packed_e != 0)
    fail(kWhere, "packed_e must be 2 or 4 with packed_ptr, 0 without, got " + std::to_string(packed_e));
  if (rows16_ptr ? (rows16_e != 1 && rows16_e != 2 && rows16_e != 4) : rows16_e != 0)
    fail(kWhere, "rows16_e must be 1, 2 or 4 with rows16_ptr, 0 without, got " + std::to_string(rows16_e));
  if (rows16_e == 1 && !cpu::int4_rows16::factored_fits(K, group_size))
    fail(kWhere, "rows16_e=1 needs K / group_size a multiple of " + std::to_string(cpu::int4_rows16::kSuper));
  if (x_row_stride < 0) fail(kWhere, "x_row_stride must be >= 0, got " + std::to_string(x_row_stride));
  if (out_row_stride < (M > 1 ? N : 0))
    fail(kWhere, "out_row_stride must be >= N=" + std::to_string(N) + " (rows must not overlap), got " + std::to_string(out_row_stride));
  const int64_t need = cpu::int4_linear_workspace_bytes(M, K, N, num_threads, decode_max_rows);
  if (ws_bytes < need)
    fail(kWhere, "workspace too small: ws_bytes=" + std::to_string(ws_bytes) + ", need " + std::to_string(need) +
                     " (int4_linear_workspace_size(M, K, N, num_threads, decode_max_rows))");
  if (M == 0 || N == 0) return {};  // empty output: nothing to compute, nothing read
  const int64_t esize = x_dtype == 0 ? 4 : 2;
  check_ptr("x_ptr", x_ptr, esize);
  if (!released) {
    check_ptr("qweight_ptr", qweight_ptr, 1);
    check_ptr("scales_ptr", scales_ptr, 4);
    check_ptr("offsets_ptr", offsets_ptr, 4);
  }
  if (bias_ptr) check_ptr("bias_ptr", bias_ptr, 4);
  check_ptr("out_ptr", out_ptr, esize);
  check_ptr("ws_ptr", ws_ptr, 1);
  if (packed_ptr) check_ptr("packed_ptr", packed_ptr, packed_e);
  if (rows16_ptr) check_ptr("rows16_ptr", rows16_ptr, 4);

  cpu::Int4LinearArgs a;
  a.x = reinterpret_cast<const void*>(x_ptr);
  a.x_dtype = static_cast<cpu::DType>(x_dtype);
  a.x_row_stride = x_row_stride;
  a.M = M;
  a.K = K;
  a.N = N;
  a.qweight = reinterpret_cast<const uint8_t*>(qweight_ptr);
  a.scales = reinterpret_cast<const float*>(scales_ptr);
  a.offsets = reinterpret_cast<const float*>(offsets_ptr);
  a.group = group_size;
  a.bias = reinterpret_cast<const float*>(bias_ptr);
  a.out = reinterpret_cast<void*>(out_ptr);
  a.out_row_stride = out_row_stride;
  a.ws = reinterpret_cast<void*>(ws_ptr);
  a.num_threads = num_threads;
  a.decode_max_rows = decode_max_rows;
  a.bf16_dot = bf16_dot;
  a.packed = reinterpret_cast<const uint8_t*>(packed_ptr);
  a.packed_e = packed_e;
  a.rows16 = reinterpret_cast<const uint8_t*>(rows16_ptr);
  a.rows16_e = rows16_e;
  return {[a, isa] { cpu::int4_linear(a, isa); }, "int4_linear"};
}

}  // namespace

void bind_int4_linear(py::module_& m) {
  m.def(
      "int4_linear_workspace_size",
      [](int64_t M, int64_t K, int64_t N, int num_threads, int64_t decode_max_rows) {
        const char* where = "llmkern._C.int4_linear_workspace_size";
        check_sizes(where, M, K, N, num_threads);
        if (decode_max_rows < -1 || decode_max_rows > kMaxDim)
          fail(where, "decode_max_rows must be -1 (default) or in [0, 2^31], got " + std::to_string(decode_max_rows));
        return cpu::int4_linear_workspace_bytes(M, K, N, num_threads, decode_max_rows);
      },
      py::arg("M"), py::arg("K"), py::arg("N"), py::arg("num_threads"), py::arg("decode_max_rows") = -1,
      "Bytes of workspace int4_linear needs for these sizes and thread count.");
  def_launcher(m, "int4_linear", &make_call,
        "out[M, N] = x[M, K] @ dequant(qweight[N, K/2])^T (+ bias) on raw pointers, canonical int4 layout "
        "(see llmkern/ops/int4_linear.py). x_dtype: 0 float32, 1 bfloat16, 2 float16; out has x's dtype; "
        "scales/offsets/bias float32. decode_max_rows: M at or below it takes the decode path (-1: default); "
        "bf16_dot: allow AVX512-BF16 dot products for bf16 x; packed_ptr / packed_e: the same weights in the "
        "packed decode layout (int4_linear_pack), read instead of qweight/scales/offsets by one-row (M = 1) "
        "calls; rows16_ptr / rows16_e: the same weights in the rows16 layout (int4_linear_rows16_pack), read "
        "by fp32 / bf16 decode calls and by the prefill on AVX-512 CPUs; with rows16 the canonical pointers "
        "may all be 0 (every call then reads rows16, on AVX-512 whatever isa says). Releases the GIL while "
        "computing; invalid arguments raise ValueError.",
        py::arg("x_ptr"), py::arg("x_dtype"), py::arg("x_row_stride"), py::arg("M"),
        py::arg("K"), py::arg("qweight_ptr"), py::arg("N"), py::arg("scales_ptr"), py::arg("offsets_ptr"),
        py::arg("group_size"), py::arg("bias_ptr"), py::arg("out_ptr"), py::arg("out_row_stride"), py::arg("ws_ptr"),
        py::arg("ws_bytes"), py::arg("num_threads"), py::arg("isa"), py::arg("decode_max_rows") = -1,
        py::arg("bf16_dot") = true, py::arg("packed_ptr") = 0, py::arg("packed_e") = 0, py::arg("rows16_ptr") = 0,
        py::arg("rows16_e") = 0);
  m.def(
      "int4_linear_bind",
      [](std::uintptr_t qweight_ptr, int64_t N, int64_t K, std::uintptr_t scales_ptr, std::uintptr_t offsets_ptr,
         int64_t group_size, std::uintptr_t bias_ptr, int64_t decode_max_rows, bool bf16_dot, std::uintptr_t packed_ptr,
         int64_t packed_e, std::uintptr_t rows16_ptr, int64_t rows16_e) {
        BoundLinear b;
        b.name = "int4_linear";
        b.make = [=](std::uintptr_t x_ptr, int x_dtype, int64_t x_row_stride, int64_t M, std::uintptr_t out_ptr,
                     std::uintptr_t ws_ptr, int64_t ws_bytes, int num_threads, const std::string& isa) {
          return make_call(x_ptr, x_dtype, x_row_stride, M, K, qweight_ptr, N, scales_ptr, offsets_ptr, group_size,
                           bias_ptr, out_ptr, N, ws_ptr, ws_bytes, num_threads, isa, decode_max_rows, bf16_dot,
                           packed_ptr, packed_e, rows16_ptr, rows16_e);
        };
        b.workspace = [=](int64_t M, int num_threads) {
          check_sizes("llmkern._C.BoundLinear(int4_linear).workspace_size", M, K, N, num_threads);
          return cpu::int4_linear_workspace_bytes(M, K, N, num_threads, decode_max_rows);
        };
        b.make(0, 0, 0, 0, 0, 0, b.workspace(0, 1), 1, "");  // the weight-side checks (M = 0 computes nothing)
        if (qweight_ptr || scales_ptr || offsets_ptr || !rows16_ptr) {  // (all 0 with rows16: released)
          check_ptr("qweight_ptr", qweight_ptr, 1);
          check_ptr("scales_ptr", scales_ptr, 4);
          check_ptr("offsets_ptr", offsets_ptr, 4);
        }
        if (bias_ptr) check_ptr("bias_ptr", bias_ptr, 4);
        if (packed_ptr) check_ptr("packed_ptr", packed_ptr, packed_e);
        if (rows16_ptr) check_ptr("rows16_ptr", rows16_ptr, 4);
        return b;
      },
      py::arg("qweight_ptr"), py::arg("N"), py::arg("K"), py::arg("scales_ptr"), py::arg("offsets_ptr"),
      py::arg("group_size"), py::arg("bias_ptr"), py::arg("decode_max_rows") = -1, py::arg("bf16_dot") = true,
      py::arg("packed_ptr") = 0, py::arg("packed_e") = 0, py::arg("rows16_ptr") = 0, py::arg("rows16_e") = 0,
      "int4_linear's weight arguments (as int4_linear takes them), checked and bound once: a BoundLinear whose "
      "run / call take the activation's arguments only.");
  m.def(
      "int4_linear_packed_size",
      [](int64_t N, int64_t K, int64_t group_size, int64_t e) {
        const char* where = "llmkern._C.int4_linear_packed_size";
        check_layout_args(where, N, K, group_size, e);
        return cpu::pk_total_bytes(N, K, group_size, e);
      },
      py::arg("N"), py::arg("K"), py::arg("group_size"), py::arg("e"),
      "Bytes of the packed decode layout of [N, K] int4 weights with e-byte scales and offsets.");
  m.def(
      "int4_linear_fits_f16",
      [](std::uintptr_t ptr, int64_t n) {
        const char* where = "llmkern._C.int4_linear_fits_f16";
        if (n < 0) fail(where, "n must be >= 0, got " + std::to_string(n));
        if (n == 0) return true;
        check_ptr_arg(where, "ptr", ptr, 4);
        py::gil_scoped_release release;
        return cpu::fits_f16(reinterpret_cast<const float*>(ptr), n);
      },
      py::arg("ptr"), py::arg("n"),
      "Whether all n float32 values at ptr are exactly fp16 values (bit for bit; NaN: no).");
  def_int4_packer(
      m, "int4_linear_pack", &check_layout_args, &cpu::pk_total_bytes, &cpu::int4_pack_decode, 0,
      "Packs canonical int4 weights (qweight [N, K/2], scales/offsets fp32 [N, K/G], contiguous) into the "
      "packed decode layout (csrc/include/llmkern/cpu/int4_linear_common.h) with e-byte scales: "
      "e=2 (fp16) only when every scale and offset is exactly an fp16 value (ValueError otherwise).");
  m.def(
      "int4_linear_rows16_packed_size",
      [](int64_t N, int64_t K, int64_t group_size, int64_t e) {
        const char* where = "llmkern._C.int4_linear_rows16_packed_size";
        check_rows16_args(where, N, K, group_size, e);
        return cpu::int4_rows16::packed_bytes(N, K, group_size, e);
      },
      py::arg("N"), py::arg("K"), py::arg("group_size"), py::arg("e"),
      "Bytes of the rows16 layout of [N, K] int4 weights with e-byte scales and offsets (e = 1: factored).");
  m.def(
      "int4_linear_rows16_factors_ok",
      [](std::uintptr_t scales_ptr, std::uintptr_t offsets_ptr, int64_t N, int64_t K, int64_t group_size) {
        const char* where = "llmkern._C.int4_linear_rows16_factors_ok";
        check_rows16_args(where, N, K, group_size, 1);
        check_ptr_arg(where, "scales_ptr", scales_ptr, 4);
        check_ptr_arg(where, "offsets_ptr", offsets_ptr, 4);
        py::gil_scoped_release release;
        return cpu::int4_rows16::factors_ok(reinterpret_cast<const float*>(scales_ptr),
                                            reinterpret_cast<const float*>(offsets_ptr), N, K / group_size);
      },
      py::arg("scales_ptr"), py::arg("offsets_ptr"), py::arg("N"), py::arg("K"), py::arg("group_size"),
      "Whether the rows16 layout can hold these scales and offsets factored (e = 1, exactly): per row and "
      "super-block of 8 groups, one fp32 factor times integer codes 0..255 (GGUF Q4_K imports).");
  m.def(
      "int4_linear_rows16_pack",
      [](std::uintptr_t qweight_ptr, std::uintptr_t scales_ptr, std::uintptr_t offsets_ptr, int64_t N, int64_t K,
         int64_t group_size, int64_t e, std::uintptr_t out_ptr, int64_t out_bytes) {
        const char* where = "llmkern._C.int4_linear_rows16_pack";
        check_rows16_args(where, N, K, group_size, e);
        if (!check_int4_pack(where, qweight_ptr, scales_ptr, offsets_ptr, N, K, group_size, e, out_ptr, out_bytes,
                             cpu::int4_rows16::packed_bytes(N, K, group_size, e), 4))
          return;
        const auto* s = reinterpret_cast<const float*>(scales_ptr);
        const auto* o = reinterpret_cast<const float*>(offsets_ptr);
        py::gil_scoped_release release;
        if (e == 1 && !cpu::int4_rows16::factors_ok(s, o, N, K / group_size)) {
          py::gil_scoped_acquire acquire;
          fail_arg(where, "e=1 needs every row's scales and offsets to factor per super-block of 8 groups "
                          "(int4_linear_rows16_factors_ok)");
        }
        cpu::int4_rows16::pack(reinterpret_cast<const uint8_t*>(qweight_ptr), s, o, N, K, group_size, e,
                               reinterpret_cast<uint8_t*>(out_ptr));
      },
      py::arg("qweight_ptr"), py::arg("scales_ptr"), py::arg("offsets_ptr"), py::arg("N"), py::arg("K"),
      py::arg("group_size"), py::arg("e"), py::arg("out_ptr"), py::arg("out_bytes"),
      "Packs canonical int4 weights (qweight [N, K/2], scales/offsets fp32 [N, K/G], contiguous) into the "
      "rows16 layout (csrc/include/llmkern/cpu/int4_linear_rows16.h) with e-byte scales: e=2 (fp16) only "
      "when every scale and offset is exactly an fp16 value, e=1 (factored) only when they factor "
      "(int4_linear_rows16_factors_ok); ValueError otherwise.");
  m.def(
      "int4_linear_rows16_unpack",
      [](std::uintptr_t rows16_ptr, int64_t N, int64_t K, int64_t group_size, int64_t e, std::uintptr_t qweight_ptr,
         std::uintptr_t scales_ptr, std::uintptr_t offsets_ptr) {
        const char* where = "llmkern._C.int4_linear_rows16_unpack";
        check_rows16_args(where, N, K, group_size, e);
        if (N == 0) return;
        check_ptr_arg(where, "rows16_ptr", rows16_ptr, 4);
        check_ptr_arg(where, "qweight_ptr", qweight_ptr, 1);
        check_ptr_arg(where, "scales_ptr", scales_ptr, 4);
        check_ptr_arg(where, "offsets_ptr", offsets_ptr, 4);
        py::gil_scoped_release release;
        cpu::int4_rows16::unpack_canonical(reinterpret_cast<const uint8_t*>(rows16_ptr), N, K, group_size, e,
                                           reinterpret_cast<uint8_t*>(qweight_ptr),
                                           reinterpret_cast<float*>(scales_ptr), reinterpret_cast<float*>(offsets_ptr));
      },
      py::arg("rows16_ptr"), py::arg("N"), py::arg("K"), py::arg("group_size"), py::arg("e"), py::arg("qweight_ptr"),
      py::arg("scales_ptr"), py::arg("offsets_ptr"),
      "The rows16 layout (int4_linear_rows16_pack's output, e-byte scales) back to the canonical tensors it was "
      "packed from, bit for bit: qweight uint8 [N, K/2], scales / offsets float32 [N, K/G], contiguous, written "
      "at the given pointers.");
  m.def("int4_linear_cpu_info", []() {
    py::dict d;
    d["decode_max_rows"] = cpu::kDecodeMaxRows;  // the largest default (bf16 dot products)
    d["decode_max_rows_f32"] = cpu::kDecodeMaxRowsF32;
    d["decode_min_bytes_per_thread"] = cpu::int4_detail::kMinBytesPerThread;  // fewer threads below
    d["prefill_min_macs_per_thread"] = cpu::int4_detail::kMinMacsPerThread;
    d["bf16_dot"] = cpu::int4_kernels_for(cpu::Isa::kAvx512Vnni).has_bf16 && cpu::isa_supported(cpu::Isa::kAvx512Vnni);
    return d;
  }, "Defaults of the int4_linear CPU kernel: decode_max_rows (bf16 dot-product route; decode_max_rows_f32 "
     "for fp32 FMAs), the work per thread below which fewer threads run, and whether bf16 dot products are "
     "used here.");
}

}  // namespace bindings
}  // namespace llmkern
