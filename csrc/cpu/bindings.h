// Registration functions of llmkern._C: one per op source file in csrc/cpu, called by module.cpp.
// Launchers are thin: check arguments (ValueError naming the argument, never a crash), release the
// GIL, call the torch-free kernels of csrc/include/llmkern/cpu on raw pointers.
#pragma once

#include <pybind11/pybind11.h>

#include <string>

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

void bind_int8_linear(pybind11::module_& m);
void bind_decode_attention(pybind11::module_& m);
void bind_kv_cache_append(pybind11::module_& m);
void bind_rms_norm(pybind11::module_& m);
void bind_rotary_embedding(pybind11::module_& m);
void bind_attention(pybind11::module_& m);
void bind_int4_linear(pybind11::module_& m);

}  // namespace bindings
}  // namespace llmkern
