// Launcher of int8_linear (kernels: csrc/include/llmkern/cpu/int8_linear*.h). Called by
// llmkern/ops/int8_linear.py (`_cpu`) with raw pointers of tensors torch allocated.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings.h"
#include "llmkern/cpu/int8_linear.h"

namespace py = pybind11;

namespace llmkern {
namespace bindings {
namespace {

const char* kWhere = "llmkern._C.int8_linear";

[[noreturn]] void fail(const std::string& what) { fail_arg(kWhere, what); }

bool parse_mode(const std::string& mode, const char* where) {
  if (mode == "w8a8") return true;
  if (mode == "w8a16") return false;
  throw py::value_error(std::string(where) + ": mode must be 'w8a16' or 'w8a8', got '" + mode + "'");
}

void check_ptr(const char* name, std::uintptr_t p, int64_t align) { check_ptr_arg(kWhere, name, p, align); }

// Sizes must be small enough that every byte offset the kernel forms fits in int64.
constexpr int64_t kMaxDim = int64_t(1) << 31;

KernelCall make_call(std::uintptr_t x_ptr, int x_dtype, int64_t x_row_stride, int64_t M, int64_t K, std::uintptr_t w_ptr,
            int64_t N, std::uintptr_t scale_ptr, int64_t group_size, std::uintptr_t bias_ptr, std::uintptr_t out_ptr,
            int64_t out_row_stride, const std::string& mode, std::uintptr_t ws_ptr, int64_t ws_bytes, int num_threads,
            const std::string& isa_name, std::uintptr_t packed_ptr, int64_t packed_e, std::uintptr_t gemm_ptr) {
  const bool w8a8 = parse_mode(mode, kWhere);
  if (x_dtype < 0 || x_dtype > 2) fail("x_dtype must be 0 (float32), 1 (bfloat16) or 2 (float16), got " + std::to_string(x_dtype));
  cpu::Isa isa = isa_or_throw(kWhere, isa_name);
  // Released weights (an Int8Linear holding the packed decode layout and the scales, and in W8A8 the GEMM
  // layout): no int8 weight tensor; the packed kernels (AVX-512, AVX2) read every call the GEMM layout does not,
  // so a pinned scalar ISA cannot apply to them.
  const bool released = N > 0 && !w_ptr;  // (N = 0: empty tensors, null pointers)
  if (released) {
    if (!packed_ptr) fail("w_ptr may be 0 only with packed_ptr (the packed decode layout alone)");
    if (isa == cpu::Isa::kScalar) {
      if (cpu::isa_supported(cpu::Isa::kAvx512Vnni)) isa = cpu::Isa::kAvx512Vnni;
      else if (cpu::isa_supported(cpu::Isa::kAvx2)) isa = cpu::Isa::kAvx2;
      else fail("w_ptr = 0 (the packed layout alone) needs an AVX-512 or AVX2 CPU, this one is neither");
    }
  }
  if (M < 0 || M > kMaxDim) fail("M must be in [0, 2^31], got " + std::to_string(M));
  if (N < 0 || N > kMaxDim) fail("N must be in [0, 2^31], got " + std::to_string(N));
  if (K < 1 || K > kMaxDim) fail("K must be in [1, 2^31], got " + std::to_string(K));
  if (group_size < 1 || K % group_size) fail("group_size must divide K=" + std::to_string(K) + ", got " + std::to_string(group_size));
  if (w8a8 && group_size > cpu::kMaxW8A8Group)
    fail("w8a8 group_size (K for per-channel scales) must be <= " + std::to_string(cpu::kMaxW8A8Group) +
         " so int32 group sums are exact, got " + std::to_string(group_size));
  if (num_threads < 1 || num_threads > 1024) fail("num_threads must be in [1, 1024], got " + std::to_string(num_threads));
  if (x_row_stride < 0) fail("x_row_stride must be >= 0, got " + std::to_string(x_row_stride));
  if (out_row_stride < (M > 1 ? N : 0))
    fail("out_row_stride must be >= N=" + std::to_string(N) + " (rows must not overlap), got " + std::to_string(out_row_stride));
  const int64_t need = cpu::int8_linear_workspace_bytes(M, K, N, w8a8, num_threads);
  if (ws_bytes < need)
    fail("workspace too small: ws_bytes=" + std::to_string(ws_bytes) + ", need " + std::to_string(need) +
         " (int8_linear_workspace_size(M, K, N, mode, num_threads))");
  if (packed_ptr ? (packed_e != 2 && packed_e != 4) : packed_e != 0)
    fail("packed_e must be 2 or 4 with packed_ptr, 0 without, got " + std::to_string(packed_e));
  if (packed_ptr) {  // the header int8_linear_pack wrote must describe these weights and this mode
    check_ptr("packed_ptr", packed_ptr, 8);
    const auto* h = reinterpret_cast<const cpu::i8pk::Header*>(packed_ptr);
    if (h->magic != cpu::i8pk::kMagic || h->N != N || h->K != K || h->G != group_size || h->E != packed_e ||
        h->w8a8 != (w8a8 ? 1u : 0u))
      fail("packed_ptr does not hold these weights packed for this mode (int8_linear_pack with N=" + std::to_string(N) +
           " K=" + std::to_string(K) + " group_size=" + std::to_string(group_size) + " e=" + std::to_string(packed_e) +
           " mode='" + mode + "')");
  }
  if (gemm_ptr) {  // the header int8_linear_gemm_pack wrote must describe these weights; W8A8 only
    if (!w8a8) fail("gemm_ptr (the W8A8 GEMM layout) needs mode 'w8a8', got '" + mode + "'");
    check_ptr("gemm_ptr", gemm_ptr, 8);
    const auto* h = reinterpret_cast<const cpu::i8gm::Header*>(gemm_ptr);
    if (h->magic != cpu::i8gm::kMagic || h->N != N || h->K != K || h->G != group_size)
      fail("gemm_ptr does not hold these weights in the GEMM layout (int8_linear_gemm_pack with N=" + std::to_string(N) +
           " K=" + std::to_string(K) + " group_size=" + std::to_string(group_size) + ")");
  }
  if (M == 0 || N == 0) return {};  // empty output: nothing to compute, nothing read
  const int64_t esize = x_dtype == 0 ? 4 : 2;
  check_ptr("x_ptr", x_ptr, esize);
  if (!released) check_ptr("w_ptr", w_ptr, 1);
  check_ptr("scale_ptr", scale_ptr, 4);
  if (bias_ptr) check_ptr("bias_ptr", bias_ptr, 4);
  check_ptr("out_ptr", out_ptr, esize);
  check_ptr("ws_ptr", ws_ptr, 1);

  cpu::Int8LinearArgs a;
  a.x = reinterpret_cast<const void*>(x_ptr);
  a.x_dtype = static_cast<cpu::DType>(x_dtype);
  a.x_row_stride = x_row_stride;
  a.M = M;
  a.K = K;
  a.N = N;
  a.w = reinterpret_cast<const int8_t*>(w_ptr);
  a.scale = reinterpret_cast<const float*>(scale_ptr);
  a.group = group_size;
  a.bias = reinterpret_cast<const float*>(bias_ptr);
  a.out = reinterpret_cast<void*>(out_ptr);
  a.out_row_stride = out_row_stride;
  a.w8a8 = w8a8;
  a.ws = reinterpret_cast<void*>(ws_ptr);
  a.num_threads = num_threads;
  a.packed = reinterpret_cast<const uint8_t*>(packed_ptr);
  a.packed_e = packed_e;
  a.gemm = reinterpret_cast<const uint8_t*>(gemm_ptr);
  return {[a, isa] { cpu::int8_linear(a, isa); }, "int8_linear"};
}

// The header of the packed decode layout at packed_ptr, checked to describe [N, K] weights (ValueError if not).
const cpu::i8pk::Header* packed_header(const char* where, std::uintptr_t packed_ptr, int64_t N, int64_t K) {
  check_ptr_arg(where, "packed_ptr", packed_ptr, 8);
  const auto* h = reinterpret_cast<const cpu::i8pk::Header*>(packed_ptr);
  if (h->magic != cpu::i8pk::kMagic || h->N != N || h->K != K)
    fail_arg(where, "packed_ptr does not hold [N=" + std::to_string(N) + ", K=" + std::to_string(K) +
                        "] weights in the packed decode layout (int8_linear_pack)");
  return h;
}

// The packed decode layout (csrc/include/llmkern/cpu/int8_linear_pack.h): size, fp16 rule, packing, and back.
void bind_int8_linear_pack(py::module_& m) {
  m.def(
      "int8_linear_packed_size",
      [](int64_t N, int64_t K, int64_t group_size, int64_t e) {
        const char* where = "llmkern._C.int8_linear_packed_size";
        if (N < 0 || N > kMaxDim || K < 1 || K > kMaxDim)
          fail_arg(where, "need 0 <= N <= 2^31 and 1 <= K <= 2^31, got N=" + std::to_string(N) + " K=" + std::to_string(K));
        if (!cpu::i8pk::group_ok(K, group_size))
          fail_arg(where, "group_size must be K (per channel), 16, 32 or a multiple of 64 dividing K=" + std::to_string(K) +
                              ", got " + std::to_string(group_size));
        if (e != 2 && e != 4) fail_arg(where, "e must be 2 or 4, got " + std::to_string(e));
        return cpu::i8pk::packed_bytes(N, K, group_size, e);
      },
      py::arg("N"), py::arg("K"), py::arg("group_size"), py::arg("e"),
      "Bytes of the packed decode layout of [N, K] int8 weights with e-byte scales.");
  m.def(
      "int8_linear_fits_f16",
      [](std::uintptr_t ptr, int64_t n) {
        const char* where = "llmkern._C.int8_linear_fits_f16";
        if (n < 0) fail_arg(where, "n must be >= 0, got " + std::to_string(n));
        if (n == 0) return true;
        check_ptr_arg(where, "ptr", ptr, 4);
        return cpu::fits_f16(reinterpret_cast<const float*>(ptr), n);
      },
      py::arg("ptr"), py::arg("n"), "Whether every one of n float32 at ptr is exactly an fp16 value (NaN: no).");
  m.def(
      "int8_linear_unpack",
      [](std::uintptr_t packed_ptr, std::uintptr_t w_ptr, int64_t N, int64_t K) {
        const char* where = "llmkern._C.int8_linear_unpack";
        const cpu::i8pk::Header* h = packed_header(where, packed_ptr, N, K);
        if (N == 0) return;
        check_ptr_arg(where, "w_ptr", w_ptr, 1);
        py::gil_scoped_release release;
        cpu::i8pk::unpack_weights(reinterpret_cast<const uint8_t*>(packed_ptr), N, K, h->G, h->E, h->w8a8 != 0,
                                  reinterpret_cast<int8_t*>(w_ptr));
      },
      py::arg("packed_ptr"), py::arg("w_ptr"), py::arg("N"), py::arg("K"),
      "Writes the int8 weights [N, K] (contiguous, at w_ptr) that the packed decode layout at packed_ptr was "
      "packed from (int8_linear_pack), bit for bit; the layout's header gives its group size, scale bytes and mode.");
  m.def(
      "int8_linear_gather_rows",
      [](std::uintptr_t packed_ptr, int64_t N, int64_t K, std::uintptr_t ids_ptr, int64_t n, std::uintptr_t out_ptr) {
        const char* where = "llmkern._C.int8_linear_gather_rows";
        const cpu::i8pk::Header* h = packed_header(where, packed_ptr, N, K);
        if (n < 0) fail_arg(where, "n must be >= 0, got " + std::to_string(n));
        if (n == 0) return;
        check_ptr_arg(where, "ids_ptr", ids_ptr, 8);
        check_ptr_arg(where, "out_ptr", out_ptr, 1);
        const auto* ids = reinterpret_cast<const int64_t*>(ids_ptr);
        for (int64_t i = 0; i < n; ++i)
          if (ids[i] < 0 || ids[i] >= N)
            throw py::index_error(std::string(where) + ": row id " + std::to_string(ids[i]) + " at " +
                                  std::to_string(i) + " is out of range for " + std::to_string(N) + " rows");
        py::gil_scoped_release release;
        cpu::i8pk::gather_rows(reinterpret_cast<const uint8_t*>(packed_ptr), K, h->G, h->E, h->w8a8 != 0, ids, n,
                               reinterpret_cast<int8_t*>(out_ptr));
      },
      py::arg("packed_ptr"), py::arg("N"), py::arg("K"), py::arg("ids_ptr"), py::arg("n"), py::arg("out_ptr"),
      "Writes rows ids[i] (int64 [n]) of the int8 weights [N, K] that the packed decode layout at packed_ptr was "
      "packed from into out (int8 [n, K], contiguous), bit for bit; ids out of range raise IndexError.");
  m.def(
      "int8_linear_pack",
      [](std::uintptr_t w_ptr, std::uintptr_t scale_ptr, int64_t N, int64_t K, int64_t group_size, int64_t e,
         const std::string& mode, std::uintptr_t out_ptr, int64_t out_bytes) {
        const char* where = "llmkern._C.int8_linear_pack";
        const bool w8a8 = parse_mode(mode, where);
        if (N < 0 || N > kMaxDim || K < 1 || K > kMaxDim)
          fail_arg(where, "need 0 <= N <= 2^31 and 1 <= K <= 2^31, got N=" + std::to_string(N) + " K=" + std::to_string(K));
        if (!cpu::i8pk::group_ok(K, group_size))
          fail_arg(where, "group_size must be K (per channel), 16, 32 or a multiple of 64 dividing K=" + std::to_string(K) +
                              ", got " + std::to_string(group_size));
        if (e != 2 && e != 4) fail_arg(where, "e must be 2 or 4, got " + std::to_string(e));
        const int64_t need = cpu::i8pk::packed_bytes(N, K, group_size, e);
        if (out_bytes < need)
          fail_arg(where, "out_bytes=" + std::to_string(out_bytes) + " < " + std::to_string(need) + " (int8_linear_packed_size)");
        check_ptr_arg(where, "out_ptr", out_ptr, 8);
        if (N > 0) {
          check_ptr_arg(where, "w_ptr", w_ptr, 1);
          check_ptr_arg(where, "scale_ptr", scale_ptr, 4);
        }
        const auto* s = reinterpret_cast<const float*>(scale_ptr);
        if (e == 2 && N > 0 && !cpu::fits_f16(s, N * (K / group_size)))
          fail_arg(where, "e=2 needs every scale to be exactly an fp16 value (int8_linear_fits_f16)");
        py::gil_scoped_release release;
        cpu::i8pk::int8_pack_decode(reinterpret_cast<const int8_t*>(w_ptr), s, N, K, group_size, e, w8a8,
                                    reinterpret_cast<uint8_t*>(out_ptr));
      },
      py::arg("w_ptr"), py::arg("scale_ptr"), py::arg("N"), py::arg("K"), py::arg("group_size"), py::arg("e"),
      py::arg("mode"), py::arg("out_ptr"), py::arg("out_bytes"),
      "Packs int8 weights [N, K] and fp32 scales [N, K/group_size] into the packed decode layout for `mode` "
      "(csrc/include/llmkern/cpu/int8_linear_pack.h) with e-byte scales (e = 2 only for fp16-exact scales).");
}

// The W8A8 GEMM layout (csrc/include/llmkern/cpu/int8_linear_gemm.h): size and packing.
void bind_int8_linear_gemm_pack(py::module_& m) {
  auto check_sizes = [](const char* where, int64_t N, int64_t K, int64_t group_size) {
    if (N < 0 || N > kMaxDim || K < 1 || K > kMaxDim)
      fail_arg(where, "need 0 <= N <= 2^31 and 1 <= K <= 2^31, got N=" + std::to_string(N) + " K=" + std::to_string(K));
    if (!cpu::i8gm::group_ok(K, group_size))
      fail_arg(where, "group_size must be K (per channel) or a multiple of 4 dividing K=" + std::to_string(K) +
                          ", got " + std::to_string(group_size));
    if (group_size > cpu::kMaxW8A8Group)
      fail_arg(where, "group_size must be <= " + std::to_string(cpu::kMaxW8A8Group) + " (exact int32 sums), got " +
                          std::to_string(group_size));
  };
  m.def(
      "int8_linear_gemm_min_rows", [] { return cpu::i8gm::kMinRows; },
      "Rows from which W8A8 calls given the GEMM layout read it (AVX-512; fewer rows keep the other paths).");
  m.def(
      "int8_linear_gemm_packed_size",
      [check_sizes](int64_t N, int64_t K, int64_t group_size) {
        check_sizes("llmkern._C.int8_linear_gemm_packed_size", N, K, group_size);
        return cpu::i8gm::packed_bytes(N, K, group_size);
      },
      py::arg("N"), py::arg("K"), py::arg("group_size"), "Bytes of the W8A8 GEMM layout of [N, K] int8 weights.");
  m.def(
      "int8_linear_gemm_pack",
      [check_sizes](std::uintptr_t w_ptr, std::uintptr_t scale_ptr, int64_t N, int64_t K, int64_t group_size,
                    std::uintptr_t out_ptr, int64_t out_bytes) {
        const char* where = "llmkern._C.int8_linear_gemm_pack";
        check_sizes(where, N, K, group_size);
        const int64_t need = cpu::i8gm::packed_bytes(N, K, group_size);
        if (out_bytes < need)
          fail_arg(where, "out_bytes=" + std::to_string(out_bytes) + " < " + std::to_string(need) +
                              " (int8_linear_gemm_packed_size)");
        check_ptr_arg(where, "out_ptr", out_ptr, 8);
        if (N > 0) {
          check_ptr_arg(where, "w_ptr", w_ptr, 1);
          check_ptr_arg(where, "scale_ptr", scale_ptr, 4);
        }
        py::gil_scoped_release release;
        cpu::i8gm::int8_pack_gemm(reinterpret_cast<const int8_t*>(w_ptr), reinterpret_cast<const float*>(scale_ptr), N,
                                  K, group_size, reinterpret_cast<uint8_t*>(out_ptr));
      },
      py::arg("w_ptr"), py::arg("scale_ptr"), py::arg("N"), py::arg("K"), py::arg("group_size"), py::arg("out_ptr"),
      py::arg("out_bytes"),
      "Packs int8 weights [N, K] and fp32 scales [N, K/group_size] into the W8A8 GEMM layout "
      "(csrc/include/llmkern/cpu/int8_linear_gemm.h).");
}

}  // namespace

void bind_int8_linear(py::module_& m) {
  m.def(
      "int8_linear_workspace_size",
      [](int64_t M, int64_t K, int64_t N, const std::string& mode, int num_threads) {
        const char* where = "llmkern._C.int8_linear_workspace_size";
        const bool w8a8 = parse_mode(mode, where);
        if (M < 0 || M > kMaxDim || N < 0 || N > kMaxDim || K < 1 || K > kMaxDim)
          throw py::value_error(std::string(where) + ": need 0 <= M, N <= 2^31 and 1 <= K <= 2^31, got M=" +
                                std::to_string(M) + " K=" + std::to_string(K) + " N=" + std::to_string(N));
        if (num_threads < 1 || num_threads > 1024)
          throw py::value_error(std::string(where) + ": num_threads must be in [1, 1024], got " + std::to_string(num_threads));
        return cpu::int8_linear_workspace_bytes(M, K, N, w8a8, num_threads);
      },
      py::arg("M"), py::arg("K"), py::arg("N"), py::arg("mode"), py::arg("num_threads") = 1,
      "Bytes of workspace int8_linear needs for these sizes, mode ('w8a16' or 'w8a8') and thread count.");
  m.def(
      "int8_linear_route",
      [](int64_t M, int64_t K, int64_t group_size, const std::string& mode, int x_dtype, const std::string& isa_name,
         bool packed, bool gemm) {
        const char* where = "llmkern._C.int8_linear_route";
        cpu::Int8LinearArgs a;
        a.w8a8 = parse_mode(mode, where);
        if (x_dtype < 0 || x_dtype > 2)
          fail_arg(where, "x_dtype must be 0 (float32), 1 (bfloat16) or 2 (float16), got " + std::to_string(x_dtype));
        if (M < 1 || M > kMaxDim) fail_arg(where, "M must be in [1, 2^31], got " + std::to_string(M));
        if (K < 1 || K > kMaxDim) fail_arg(where, "K must be in [1, 2^31], got " + std::to_string(K));
        if (group_size < 1 || K % group_size)
          fail_arg(where, "group_size must divide K=" + std::to_string(K) + ", got " + std::to_string(group_size));
        a.M = M;
        a.K = K;
        a.group = group_size;
        a.x_dtype = static_cast<cpu::DType>(x_dtype);
        static const uint8_t dummy = 0;  // only whether a layout is given matters to the route
        a.packed = packed ? &dummy : nullptr;
        a.gemm = gemm ? &dummy : nullptr;
        return std::string(cpu::int8_route_name(cpu::int8_linear_route(a, isa_or_throw(where, isa_name))));
      },
      py::arg("M"), py::arg("K"), py::arg("group_size"), py::arg("mode"), py::arg("x_dtype"), py::arg("isa"),
      py::arg("packed") = false, py::arg("gemm") = false,
      "Which CPU kernel an int8_linear call of these sizes runs: 'packed' (decode layout), 'stream' (W8A16 "
      "decode over the canonical tensors), 'gemm_w8a8', "
      "'gemm_bf16', 'gemm_f32' (W8A16 GEMMs over dequantized panels) or 'tiles'. packed / gemm: whether "
      "the call is given those layouts. isa: '' for the best this CPU has.");
  def_launcher(m, "int8_linear", &make_call,
        "out[M, N] = x[M, K] @ dequant(w[N, K])^T (+ bias), W8A16 or W8A8, on raw pointers (see "
        "llmkern/ops/int8_linear.py). x_dtype: 0 float32, 1 bfloat16, 2 float16; out has x's dtype. "
        "packed_ptr / packed_e: the same weights in the packed decode layout (int8_linear_pack, same mode), "
        "read instead of w/scale by decode calls (M <= 8; W8A8 per channel: 4; AVX2 W8A16 per channel or G >= 128: 4) on AVX-512 and AVX2 (identical results); "
        "w_ptr 0 with packed_ptr (W8A16): the packed layout alone, read by every call (the GEMM routes' panels from it; "
        "AVX-512 or AVX2 whatever isa says). "
        "gemm_ptr: the same weights in the W8A8 GEMM layout (int8_linear_gemm_pack), read by W8A8 calls of "
        "more rows on AVX-512 (per channel: identical results; per group: equal up to fp32 rounding). "
        "Releases the GIL while computing; invalid arguments raise ValueError.",
        py::arg("x_ptr"), py::arg("x_dtype"), py::arg("x_row_stride"), py::arg("M"),
        py::arg("K"), py::arg("w_ptr"), py::arg("N"), py::arg("scale_ptr"), py::arg("group_size"), py::arg("bias_ptr"),
        py::arg("out_ptr"), py::arg("out_row_stride"), py::arg("mode"), py::arg("ws_ptr"), py::arg("ws_bytes"),
        py::arg("num_threads"), py::arg("isa"), py::arg("packed_ptr") = 0, py::arg("packed_e") = 0,
        py::arg("gemm_ptr") = 0);
  m.def(
      "int8_linear_bind",
      [](std::uintptr_t w_ptr, int64_t N, int64_t K, std::uintptr_t scale_ptr, int64_t group_size, std::uintptr_t bias_ptr,
         const std::string& mode, std::uintptr_t packed_ptr, int64_t packed_e, std::uintptr_t gemm_ptr) {
        const bool w8a8 = parse_mode(mode, "llmkern._C.int8_linear_bind");
        BoundLinear b;
        b.name = "int8_linear";
        b.make = [=](std::uintptr_t x_ptr, int x_dtype, int64_t x_row_stride, int64_t M, std::uintptr_t out_ptr,
                     std::uintptr_t ws_ptr, int64_t ws_bytes, int num_threads, const std::string& isa) {
          return make_call(x_ptr, x_dtype, x_row_stride, M, K, w_ptr, N, scale_ptr, group_size, bias_ptr, out_ptr, N,
                           mode, ws_ptr, ws_bytes, num_threads, isa, packed_ptr, packed_e, gemm_ptr);
        };
        b.workspace = [=](int64_t M, int num_threads) {
          if (M < 0 || M > kMaxDim)
            fail_arg("llmkern._C.BoundLinear(int8_linear).workspace_size", "M must be in [0, 2^31], got " + std::to_string(M));
          if (num_threads < 1 || num_threads > 1024)
            fail_arg("llmkern._C.BoundLinear(int8_linear).workspace_size",
                     "num_threads must be in [1, 1024], got " + std::to_string(num_threads));
          return cpu::int8_linear_workspace_bytes(M, K, N, w8a8, num_threads);
        };
        b.make(0, 0, 0, 0, 0, 0, b.workspace(0, 1), 1, "");  // the weight-side checks (M = 0 computes nothing)
        if (w_ptr || N == 0) check_ptr("w_ptr", w_ptr, 1);  // (0: released weights, which make_call checked)
        check_ptr("scale_ptr", scale_ptr, 4);
        if (bias_ptr) check_ptr("bias_ptr", bias_ptr, 4);
        if (packed_ptr) check_ptr("packed_ptr", packed_ptr, packed_e);
        if (gemm_ptr) check_ptr("gemm_ptr", gemm_ptr, 4);
        return b;
      },
      py::arg("w_ptr"), py::arg("N"), py::arg("K"), py::arg("scale_ptr"), py::arg("group_size"), py::arg("bias_ptr"),
      py::arg("mode"), py::arg("packed_ptr") = 0, py::arg("packed_e") = 0, py::arg("gemm_ptr") = 0,
      "int8_linear's weight arguments (as int8_linear takes them), checked and bound once: a BoundLinear whose "
      "run / call take the activation's arguments only.");
  bind_int8_linear_pack(m);
  bind_int8_linear_gemm_pack(m);
}

}  // namespace bindings
}  // namespace llmkern
