// The decode-step program of llmkern._C: a model's whole one-token step as a list of checked kernel
// launches (KernelCall) run by one Python call with the GIL released (StepProgram.run).
//
// Why: a SmolLM2-135M decode step is ~300 kernel launches of a few microseconds each; launched one by
// one from Python (llmkern/models/decode_plan.py) the argument handling around them cost as much as
// the kernels. Every launch's arguments (pointers into buffers the plan owns, the caches, the
// weights) are fixed for the plan's life, so they are checked once, when each call is made by the op's
// own `<op>_call` (same checks as `<op>`), and the step replays them. The three small steps that have
// no op of their own are made here: the embedding row gather (which checks the token ids each run),
// SwiGLU's silu(gate) * up, and the caches' length counters.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings.h"
#include "llmkern/cpu/embedding.h"
#include "llmkern/cpu/silu_mul.h"

namespace py = pybind11;

namespace llmkern {
namespace bindings {
namespace {

class StepProgram {
 public:
  void append(const KernelCall& c) {
    if (c.fn) calls_.push_back(c);
  }
  size_t size() const { return calls_.size(); }
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& c : calls_) out.push_back(c.name);
    return out;
  }
  // Runs every call in order with the GIL released. A call may throw (the embedding, on a token id out
  // of range: it runs first, before anything is written); the exception reaches Python once the GIL is
  // back.
  void run() const {
    py::gil_scoped_release release;
    for (const auto& c : calls_) c.fn();
  }
  // run(), timing each call (seconds, steady clock): the step's profile (benchmarks/profile_decode.py).
  std::vector<double> run_timed() const {
    std::vector<double> out(calls_.size());
    py::gil_scoped_release release;
    for (size_t i = 0; i < calls_.size(); ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      calls_[i].fn();
      out[i] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    return out;
  }

 private:
  std::vector<KernelCall> calls_;
};

void check_dtype(const char* where, int code) {
  if (code < 0 || code > 2)
    fail_arg(where, "dtype must be 0 (float32), 1 (bfloat16) or 2 (float16), got " + std::to_string(code));
}

// Every token id in [0, V) (else std::out_of_range, an IndexError in Python, naming the row and the id).
void check_token_ids(const int64_t* tokens, int64_t B, int64_t V) {
  for (int64_t b = 0; b < B; ++b) {
    const int64_t t = tokens[b];
    if (t < 0 || t >= V)
      throw std::out_of_range("llmkern decode step: token id " + std::to_string(t) + " of batch row " +
                              std::to_string(b) + " is out of range for a vocabulary of " + std::to_string(V));
  }
}

// out[b, :] = table[tokens[b], :] for b < B: table [V, H] contiguous (dtype code), tokens int64 [B],
// out [B, H] contiguous. Token ids are checked on every run (IndexError naming the row and the id).
KernelCall embedding_call(std::uintptr_t table_ptr, int dtype, int64_t V, int64_t H, std::uintptr_t tokens_ptr,
                          int64_t B, std::uintptr_t out_ptr) {
  const char* where = "llmkern._C.embedding_call";
  check_dtype(where, dtype);
  if (V < 1 || H < 1 || B < 0) fail_arg(where, "need V >= 1, H >= 1 and B >= 0");
  if (B == 0) return {};
  const int64_t esz = dtype == 0 ? 4 : 2;
  check_ptr_arg(where, "table_ptr", table_ptr, esz);
  check_ptr_arg(where, "tokens_ptr", tokens_ptr, 8);
  check_ptr_arg(where, "out_ptr", out_ptr, esz);
  const auto* table = reinterpret_cast<const char*>(table_ptr);
  const auto* tokens = reinterpret_cast<const int64_t*>(tokens_ptr);
  auto* out = reinterpret_cast<char*>(out_ptr);
  const size_t row = static_cast<size_t>(H * esz);
  return {[=] {
            check_token_ids(tokens, B, V);
            for (int64_t b = 0; b < B; ++b) std::memcpy(out + b * row, table + tokens[b] * row, row);
          },
          "embedding"};
}

// out[b, :] = dequant(table row tokens[b]) in dtype: a quantized table (llmkern.nn.QuantizedEmbedding), format
// "int8" (w_ptr int8 [V, H], scale_ptr fp32 [V, H / G]; offset_ptr 0), "int4" (w_ptr uint8 [V, H / 2],
// scale_ptr / offset_ptr fp32 [V, H / G]) or "int5" (w_ptr uint8 [V, H], the same scales and offsets); see
// csrc/include/llmkern/cpu/embedding.h. Token ids are checked on every run, as embedding_call does.
KernelCall quant_embedding_call(const std::string& format, std::uintptr_t w_ptr, std::uintptr_t scale_ptr,
                                std::uintptr_t offset_ptr, int64_t V, int64_t H, int64_t G, int dtype,
                                std::uintptr_t tokens_ptr, int64_t B, std::uintptr_t out_ptr) {
  const char* where = "llmkern._C.quant_embedding_call";
  const bool int4 = format == "int4", int5 = format == "int5", packed = format == "int8_packed";
  const bool offsets = int4 || int5;
  if (!offsets && !packed && format != "int8")
    fail_arg(where, "format must be 'int8', 'int8_packed', 'int4' or 'int5', got '" + format + "'");
  check_dtype(where, dtype);
  if (V < 1 || H < 1 || B < 0) fail_arg(where, "need V >= 1, H >= 1 and B >= 0");
  if (G < 1 || H % G) fail_arg(where, "G must divide H=" + std::to_string(H) + ", got " + std::to_string(G));
  if (int4 && (H % 2 || G % 2))
    fail_arg(where, "int4 needs an even H and G, got H=" + std::to_string(H) + " G=" + std::to_string(G));
  if (!offsets && offset_ptr) fail_arg(where, "int8 takes no offsets: offset_ptr must be 0");
  if (B == 0) return {};
  check_ptr_arg(where, "w_ptr", w_ptr, 1);
  check_ptr_arg(where, "scale_ptr", scale_ptr, 4);
  if (offsets) check_ptr_arg(where, "offset_ptr", offset_ptr, 4);
  check_ptr_arg(where, "tokens_ptr", tokens_ptr, 8);
  check_ptr_arg(where, "out_ptr", out_ptr, dtype == 0 ? 4 : 2);
  const auto* tokens = reinterpret_cast<const int64_t*>(tokens_ptr);
  const auto dt = static_cast<cpu::DType>(dtype);
  auto* out = reinterpret_cast<void*>(out_ptr);
  if (packed) {  // w_ptr: an int8_linear packed decode layout (either mode's) of this [V, H] table with groups of G
    check_ptr_arg(where, "w_ptr", w_ptr, 8);
    const auto* h = reinterpret_cast<const cpu::i8pk::Header*>(w_ptr);
    if (h->magic != cpu::i8pk::kMagic || h->N != V || h->K != H || h->G != G)
      fail_arg(where, "format 'int8_packed': w_ptr does not hold this [V=" + std::to_string(V) + ", H=" +
                          std::to_string(H) + "] table with G=" + std::to_string(G) + " in the packed decode layout");
    const int64_t E = h->E;
    const bool w8a8 = h->w8a8 != 0;
    return {[=] {
              check_token_ids(tokens, B, V);
              cpu::embed_rows_int8_packed(reinterpret_cast<const uint8_t*>(w_ptr), reinterpret_cast<const float*>(scale_ptr),
                                          H, G, E, w8a8, tokens, B, dt, out);
            },
            "embedding"};
  }
  return {[=] {
            check_token_ids(tokens, B, V);
            if (int4)
              cpu::embed_rows_int4(reinterpret_cast<const uint8_t*>(w_ptr), reinterpret_cast<const float*>(scale_ptr),
                                   reinterpret_cast<const float*>(offset_ptr), H, G, tokens, B, dt, out);
            else if (int5)
              cpu::embed_rows_int5(reinterpret_cast<const uint8_t*>(w_ptr), reinterpret_cast<const float*>(scale_ptr),
                                   reinterpret_cast<const float*>(offset_ptr), H, G, tokens, B, dt, out);
            else
              cpu::embed_rows_int8(reinterpret_cast<const int8_t*>(w_ptr), reinterpret_cast<const float*>(scale_ptr),
                                   H, G, tokens, B, dt, out);
          },
          "embedding"};
}

// out[m, i] = silu(gu[m, i]) * gu[m, I + i] (see csrc/include/llmkern/cpu/silu_mul.h).
KernelCall silu_mul_call(std::uintptr_t gu_ptr, int dtype, int64_t gu_stride, int64_t M, int64_t I,
                         std::uintptr_t out_ptr, int64_t out_stride, const std::string& isa_name) {
  const char* where = "llmkern._C.silu_mul_call";
  check_dtype(where, dtype);
  const cpu::Isa isa = isa_or_throw(where, isa_name);
  if (M < 0 || I < 1) fail_arg(where, "need M >= 0 and I >= 1");
  if (gu_stride < 2 * I) fail_arg(where, "gu_stride must be >= 2 I = " + std::to_string(2 * I));
  if (out_stride < I) fail_arg(where, "out_stride must be >= I = " + std::to_string(I));
  if (M == 0) return {};
  const int64_t esz = dtype == 0 ? 4 : 2;
  check_ptr_arg(where, "gu_ptr", gu_ptr, esz);
  check_ptr_arg(where, "out_ptr", out_ptr, esz);
  cpu::SiluMulArgs a;
  a.gu = reinterpret_cast<const void*>(gu_ptr);
  a.gu_stride = gu_stride;
  a.out = reinterpret_cast<void*>(out_ptr);
  a.out_stride = out_stride;
  a.M = M;
  a.I = I;
  a.dtype = static_cast<cpu::DType>(dtype);
  a.isa = isa;
  return {[a] { cpu::silu_mul(a); }, "silu_mul"};
}

// One token appended to every sequence of a contiguous KVCache: seq_lens (int32 [B]) and the next
// (position, slot) table (int64 [2, B], contiguous) each advance by one.
KernelCall advance_call(std::uintptr_t seq_lens_ptr, std::uintptr_t next_ptr, int64_t B) {
  const char* where = "llmkern._C.advance_call";
  if (B < 0) fail_arg(where, "B must be >= 0");
  if (B == 0) return {};
  check_ptr_arg(where, "seq_lens_ptr", seq_lens_ptr, 4);
  check_ptr_arg(where, "next_ptr", next_ptr, 8);
  auto* lens = reinterpret_cast<int32_t*>(seq_lens_ptr);
  auto* next = reinterpret_cast<int64_t*>(next_ptr);
  return {[=] {
            for (int64_t b = 0; b < B; ++b) lens[b] += 1;
            for (int64_t i = 0; i < 2 * B; ++i) next[i] += 1;
          },
          "advance"};
}

}  // namespace

void bind_decode_step(py::module_& m) {
  py::class_<KernelCall>(m, "KernelCall",
                         "One checked kernel launch with its arguments bound (made by an `<op>_call` function).")
      .def(
          "__call__",
          [](const KernelCall& c) {
            if (!c.fn) return;
            py::gil_scoped_release release;
            c.fn();
          },
          "Run the launch (GIL released).")
      .def_readwrite("name", &KernelCall::name, "The op (a caller may refine it, e.g. 'int4_linear:qkv').")
      .def_property_readonly("empty", [](const KernelCall& c) { return !c.fn; })
      .def("__repr__", [](const KernelCall& c) { return "<llmkern._C.KernelCall " + (c.fn ? c.name : "(empty)") + ">"; });
  py::class_<BoundLinear>(m, "BoundLinear",
                          "A CPU linear op's weights bound once (made by int8_linear_bind, int4_linear_bind, "
                          "int4_linear_w4a8_bind): run / call take the activation's arguments only.")
      .def(
          "run",
          [](const BoundLinear& b, std::uintptr_t x_ptr, int x_dtype, int64_t x_row_stride, int64_t M,
             std::uintptr_t out_ptr, std::uintptr_t ws_ptr, int64_t ws_bytes, int num_threads,
             const std::string& isa) -> int64_t {
            const int64_t need = b.workspace(M, num_threads);
            if (ws_bytes < need) return need;  // the caller grows its workspace and calls again
            KernelCall c = b.make(x_ptr, x_dtype, x_row_stride, M, out_ptr, ws_ptr, ws_bytes, num_threads, isa);
            if (c.fn) {
              py::gil_scoped_release release;
              c.fn();
            }
            return 0;
          },
          py::arg("x_ptr"), py::arg("x_dtype"), py::arg("x_row_stride"), py::arg("M"), py::arg("out_ptr"),
          py::arg("ws_ptr"), py::arg("ws_bytes"), py::arg("num_threads"), py::arg("isa"),
          "out[M, N] (contiguous) = the op on x[M, K] (rows x_row_stride elements apart) with the bound weights; "
          "x_dtype: 0 float32, 1 bfloat16, 2 float16. Returns 0 after computing (GIL released), or, computing "
          "nothing, the workspace bytes needed when ws_bytes is smaller. Invalid arguments raise ValueError.")
      .def("call", [](const BoundLinear& b, std::uintptr_t x_ptr, int x_dtype, int64_t x_row_stride, int64_t M,
                      std::uintptr_t out_ptr, std::uintptr_t ws_ptr, int64_t ws_bytes, int num_threads,
                      const std::string& isa) {
             KernelCall c = b.make(x_ptr, x_dtype, x_row_stride, M, out_ptr, ws_ptr, ws_bytes, num_threads, isa);
             return c;
           },
           py::arg("x_ptr"), py::arg("x_dtype"), py::arg("x_row_stride"), py::arg("M"), py::arg("out_ptr"),
           py::arg("ws_ptr"), py::arg("ws_bytes"), py::arg("num_threads"), py::arg("isa"),
           "The launch run() makes, checked, as a KernelCall (ValueError when ws_bytes is too small).")
      .def("workspace_size", [](const BoundLinear& b, int64_t M, int num_threads) { return b.workspace(M, num_threads); },
           py::arg("M"), py::arg("num_threads"), "Workspace bytes run / call need for M rows at num_threads.")
      .def_readonly("name", &BoundLinear::name)
      .def("__repr__", [](const BoundLinear& b) { return "<llmkern._C.BoundLinear " + b.name + ">"; });
  py::class_<StepProgram>(m, "StepProgram",
                          "A list of KernelCalls run in order by one call with the GIL released: a decode step.")
      .def(py::init<>())
      .def("append", &StepProgram::append, py::arg("call"), "Add a call (empty calls are skipped).")
      .def("__len__", &StepProgram::size)
      .def("names", &StepProgram::names, "The op name of each call, in order.")
      .def("run", &StepProgram::run, "Run every call in order (GIL released).")
      .def("run_timed", &StepProgram::run_timed,
           "run(), returning each call's wall time in seconds (in order; names() says which op).");
  m.def("embedding_call", &embedding_call, py::arg("table_ptr"), py::arg("dtype"), py::arg("V"), py::arg("H"),
        py::arg("tokens_ptr"), py::arg("B"), py::arg("out_ptr"),
        "KernelCall: out[b, :] = table[tokens[b], :] (table [V, H] contiguous, tokens int64 [B], out [B, H]); "
        "token ids are checked on each run (IndexError).");
  m.def("quant_embedding_call", &quant_embedding_call, py::arg("format"), py::arg("w_ptr"), py::arg("scale_ptr"),
        py::arg("offset_ptr"), py::arg("V"), py::arg("H"), py::arg("G"), py::arg("dtype"), py::arg("tokens_ptr"),
        py::arg("B"), py::arg("out_ptr"),
        "KernelCall: out[b, :] = the dequantized row tokens[b] of an int8 (weight, scale), int4 (qweight, scales, "
        "offsets) or int5 (codes uint8 [V, H], scales, offsets) table [V, H] with groups of G, in dtype; token ids are "
        "checked on each run (IndexError). "
        "format 'int8_packed': w_ptr is the table's int8_linear packed decode layout (either mode's), scale_ptr its "
        "scales.");
  m.def("silu_mul_call", &silu_mul_call, py::arg("gu_ptr"), py::arg("dtype"), py::arg("gu_stride"), py::arg("M"),
        py::arg("I"), py::arg("out_ptr"), py::arg("out_stride"), py::arg("isa") = "",
        "KernelCall: out[m, i] = silu(gu[m, i]) * gu[m, I + i] (rows at element strides; 16-bit dtypes round "
        "silu before the product, as F.silu(g) * u does).");
  m.def("advance_call", &advance_call, py::arg("seq_lens_ptr"), py::arg("next_ptr"), py::arg("B"),
        "KernelCall: seq_lens (int32 [B]) += 1 and next (int64 [2, B]) += 1: a KVCache's counters after "
        "one appended token per sequence.");
}

}  // namespace bindings
}  // namespace llmkern
