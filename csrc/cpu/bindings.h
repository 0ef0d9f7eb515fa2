// Registration functions of llmkern._C: one per op source file in csrc/cpu, called by module.cpp.
// Launchers are thin: check arguments (ValueError naming the argument, never a crash), release the
// GIL, call the torch-free kernels of csrc/include/llmkern/cpu on raw pointers.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

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

void bind_int8_linear(pybind11::module_& m);
void bind_decode_attention(pybind11::module_& m);
void bind_kv_cache_append(pybind11::module_& m);
void bind_rms_norm(pybind11::module_& m);
void bind_rotary_embedding(pybind11::module_& m);
void bind_attention(pybind11::module_& m);
void bind_int4_linear(pybind11::module_& m);

}  // namespace bindings
}  // namespace llmkern
