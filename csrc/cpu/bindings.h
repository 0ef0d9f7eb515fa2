// Registration functions of llmkern._C: one per op source file in csrc/cpu, called by module.cpp.
// Launchers are thin: check arguments (ValueError naming the argument, never a crash), release the
// GIL, call the torch-free kernels of csrc/include/llmkern/cpu on raw pointers.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "llmkern/cpu/convert.h"  // fits_f16
#include "llmkern/cpu/features.h"

namespace llmkern {
namespace bindings {

// The ISA named by `name` ("" = best), or py::value_error saying what this CPU supports.
inline cpu::Isa isa_or_throw(const std::string& where, const std::string& name) {
  cpu::Isa isa;
  std::string err;
  if (!cpu::resolve_isa(name, &isa, &err)) throw pybind11::value_error(where + ": isa: " + err);
  return isa;
}

// Argument checks shared by every launcher; `where` names it ("llmkern._C.<op>"). Each raises
// ValueError (py::value_error) naming the argument.
[[noreturn]] inline void fail_arg(const char* where, const std::string& what) {
  throw pybind11::value_error(std::string(where) + ": " + what);
}

inline void check_ptr_arg(const char* where, const char* name, std::uintptr_t p, int64_t align) {
  if (p == 0) fail_arg(where, std::string(name) + " is a null pointer");
  if (p % align)
    fail_arg(where, std::string(name) + " is not aligned to its element size (" + std::to_string(align) + " bytes)");
}

// `s` holds `n` element strides (named `dims`, e.g. "batch, token, head"), none negative.
inline void check_strides_arg(const char* where, const char* name, const std::vector<int64_t>& s, size_t n,
                              const char* dims) {
  if (s.size() != n) fail_arg(where, std::string(name) + " must have " + std::to_string(n) + " strides (" + dims + ")");
  for (int64_t x : s)
    if (x < 0) fail_arg(where, std::string(name) + " strides must be >= 0");
}

// The checks shared by the int4 weight packers (def_int4_packer), after their size checks: room for `need` bytes at out, the pointers (out aligned to out_align), and with e == 2
// that every scale and offset is exactly an fp16 value (the layouts store them as fp16, losslessly).
// Returns false when there is nothing to pack (N == 0). ValueError naming the argument otherwise.
inline bool check_int4_pack(const char* where, std::uintptr_t qweight_ptr, std::uintptr_t scales_ptr,
                            std::uintptr_t offsets_ptr, int64_t N, int64_t K, int64_t group_size, int64_t e,
                            std::uintptr_t out_ptr, int64_t out_bytes, int64_t need, int64_t out_align) {
  if (out_bytes < need) fail_arg(where, "out_bytes=" + std::to_string(out_bytes) + " too small, need " + std::to_string(need));
  if (N == 0) return false;
  check_ptr_arg(where, "qweight_ptr", qweight_ptr, 1);
  check_ptr_arg(where, "scales_ptr", scales_ptr, 4);
  check_ptr_arg(where, "offsets_ptr", offsets_ptr, 4);
  check_ptr_arg(where, "out_ptr", out_ptr, out_align);
  const int64_t n = N * (K / group_size);
  if (e == 2 && !(cpu::fits_f16(reinterpret_cast<const float*>(scales_ptr), n) &&
                  cpu::fits_f16(reinterpret_cast<const float*>(offsets_ptr), n)))
    fail_arg(where, "e=2 needs every scale and offset to be exactly an fp16 value");
  return true;
}

// Binds `name`(qweight_ptr, scales_ptr, offsets_ptr, N, K, group_size, e, out_ptr, out_bytes): a packer of
// canonical int4 weights (qweight [N, K/2], scales / offsets fp32 [N, K/G], contiguous) into a layout of
// size(N, K, G, e) bytes, written by pack(qweight, scales, offsets, N, K, G, e, out) with the GIL released,
// after check(where, N, K, G, e) (sizes, group, e) and check_int4_pack (out aligned to out_align, or to e
// when out_align is 0).
template <class Check, class Size, class Pack>
void def_int4_packer(pybind11::module_& m, const char* name, Check check, Size size, Pack pack, int64_t out_align,
                     const char* doc) {
  namespace py = pybind11;
  const std::string where = std::string("llmkern._C.") + name;
  m.def(
      name,
      [=](std::uintptr_t qweight_ptr, std::uintptr_t scales_ptr, std::uintptr_t offsets_ptr, int64_t N, int64_t K,
          int64_t group_size, int64_t e, std::uintptr_t out_ptr, int64_t out_bytes) {
        check(where.c_str(), N, K, group_size, e);
        if (!check_int4_pack(where.c_str(), qweight_ptr, scales_ptr, offsets_ptr, N, K, group_size, e, out_ptr,
                             out_bytes, size(N, K, group_size, e), out_align ? out_align : e))
          return;
        py::gil_scoped_release release;
        pack(reinterpret_cast<const uint8_t*>(qweight_ptr), reinterpret_cast<const float*>(scales_ptr),
             reinterpret_cast<const float*>(offsets_ptr), N, K, group_size, e, reinterpret_cast<uint8_t*>(out_ptr));
      },
      py::arg("qweight_ptr"), py::arg("scales_ptr"), py::arg("offsets_ptr"), py::arg("N"), py::arg("K"),
      py::arg("group_size"), py::arg("e"), py::arg("out_ptr"), py::arg("out_bytes"), doc);
}

// One checked kernel launch with every argument bound: what `<op>_call` returns (the arguments were
// checked when it was made) and what llmkern._C.StepProgram runs in sequence (csrc/cpu/decode_step.cpp).
// It holds raw pointers: the Python side keeps the tensors behind them alive. An empty `fn` launches
// nothing (the op had no work, e.g. M == 0).
struct KernelCall {
  std::function<void()> fn;
  std::string name;  // the op, for repr and error messages
};

// A CPU linear op's weights and settings bound once (made by `<op>_bind`, which checks them): run() and
// call() take only what changes from call to call (activation, output, workspace, threads, ISA), so a
// module's eager call converts 9 Python arguments instead of 17-24 and touches one object that holds
// the weight pointers instead of a dozen Python ints (csrc/cpu/decode_step.cpp binds the class). out is
// contiguous [M, N]. The Python side keeps the weight memory alive (llmkern/ops/_cpu_linear.py).
struct BoundLinear {
  // The op's checked launch of x [M, K] (rows x_row_stride elements apart) into out [M, N].
  std::function<KernelCall(std::uintptr_t x_ptr, int x_dtype, int64_t x_row_stride, int64_t M, std::uintptr_t out_ptr,
                           std::uintptr_t ws_ptr, int64_t ws_bytes, int num_threads, const std::string& isa)>
      make;
  // Workspace bytes for M rows at num_threads (ValueError on invalid sizes).
  std::function<int64_t(int64_t M, int num_threads)> workspace;
  std::string name;  // the op
};

// Binds `name` (check, release the GIL, launch) and `name_call` (check, return the KernelCall) from one
// `make` function taking the launcher's arguments, with the same pybind11 argument list `extra`.
template <typename... Args, typename... Extra>
void def_launcher(pybind11::module_& m, const char* name, KernelCall (*make)(Args...), const char* doc,
                  const Extra&... extra) {
  m.def(
      name,
      [make](Args... args) {
        KernelCall c = make(args...);  // checks raise with the GIL held
        if (c.fn) {
          pybind11::gil_scoped_release release;
          c.fn();
        }
      },
      extra..., doc);
  const std::string call_name = std::string(name) + "_call";
  const std::string call_doc = std::string("The same checks as ") + name +
                               "(); returns the launch as a KernelCall (run it with call() or in a StepProgram) "
                               "instead of running it. The caller keeps the memory behind every pointer alive.";
  m.def(call_name.c_str(), make, extra..., call_doc.c_str());
}

void bind_int8_linear(pybind11::module_& m);
void bind_decode_attention(pybind11::module_& m);
void bind_kv_cache_append(pybind11::module_& m);
void bind_rms_norm(pybind11::module_& m);
void bind_rotary_embedding(pybind11::module_& m);
void bind_attention(pybind11::module_& m);
void bind_int4_linear(pybind11::module_& m);
void bind_int4_linear_w4a8(pybind11::module_& m);
void bind_gguf_blocks(pybind11::module_& m);
void bind_decode_step(pybind11::module_& m);

}  // namespace bindings
}  // namespace llmkern
