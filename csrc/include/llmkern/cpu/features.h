// CPU feature detection and the instruction-set levels the CPU kernels are built for.
//
// Torch-free and pybind11-free. Every ISA-specific function is compiled with a target attribute
// (setup.py passes no -march), so the one binary runs everywhere and picks its code at run time:
//   avx512_vnni  AVX-512 F/BW/VL + VNNI (zmm registers), plus AVX2/FMA/F16C
//   avx2         AVX2 + FMA + F16C (ymm registers)
//   scalar       portable C++ (always available)
// A feature counts only when the OS saves its registers too (xgetbv: XCR0), e.g. a kernel or
// hypervisor may disable AVX-512 state even when cpuid lists the instructions.
#pragma once

#include <cpuid.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace llmkern {
namespace cpu {

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512_vnni = false, avx512_bf16 = false;
  bool avx_vnni = false;

  // (name, value) pairs in a fixed order, for the Python dict.
  std::vector<std::pair<std::string, bool>> items() const {
    return {{"avx2", avx2},         {"fma", fma},           {"f16c", f16c},
            {"avx512f", avx512f},   {"avx512bw", avx512bw}, {"avx512vl", avx512vl},
            {"avx512_vnni", avx512_vnni}, {"avx512_bf16", avx512_bf16}, {"avx_vnni", avx_vnni}};
  }
};

// XCR0 through xgetbv; only valid when cpuid says OSXSAVE (checked by the caller).
inline uint64_t read_xcr0() {
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

inline CpuFeatures detect_features() {
  CpuFeatures f;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = (c >> 27) & 1, avx = (c >> 28) & 1;
  const bool fma = (c >> 12) & 1, f16c = (c >> 29) & 1;
  if (!osxsave || !avx) return f;
  const uint64_t xcr0 = read_xcr0();
  const bool ymm_os = (xcr0 & 0x6) == 0x6;    // SSE + AVX state
  const bool zmm_os = (xcr0 & 0xe6) == 0xe6;  // + opmask, ZMM_Hi256, Hi16_ZMM
  if (!ymm_os) return f;
  f.fma = fma;
  f.f16c = f16c;
  unsigned max_leaf = __get_cpuid_max(0, nullptr);
  if (max_leaf < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  const unsigned eax7 = a;
  f.avx2 = (b >> 5) & 1;
  if (zmm_os) {
    f.avx512f = (b >> 16) & 1;
    f.avx512bw = (b >> 30) & 1;
    f.avx512vl = (b >> 31) & 1;
    f.avx512_vnni = (c >> 11) & 1;
  }
  if (eax7 >= 1) {  // leaf 7 subleaf 1 exists
    __cpuid_count(7, 1, a, b, c, d);
    f.avx_vnni = (a >> 4) & 1;
    f.avx512_bf16 = zmm_os && ((a >> 5) & 1);
  }
  return f;
}

inline const CpuFeatures& features() {
  static const CpuFeatures f = detect_features();
  return f;
}

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512Vnni = 2 };

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Vnni: return "avx512_vnni";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

inline bool isa_supported(Isa isa, const CpuFeatures& f = features()) {
  const bool avx2 = f.avx2 && f.fma && f.f16c;
  switch (isa) {
    case Isa::kAvx512Vnni: return avx2 && f.avx512f && f.avx512bw && f.avx512vl && f.avx512_vnni;
    case Isa::kAvx2: return avx2;
    default: return true;
  }
}

// Best first.
inline std::vector<Isa> supported_isas() {
  std::vector<Isa> out;
  for (Isa isa : {Isa::kAvx512Vnni, Isa::kAvx2, Isa::kScalar})
    if (isa_supported(isa)) out.push_back(isa);
  return out;
}

// "" -> the best supported ISA; a known, supported name -> that ISA. Otherwise returns false and
// sets *error to a message listing what this CPU supports.
inline bool resolve_isa(const std::string& name, Isa* isa, std::string* error) {
  const std::vector<Isa> ok = supported_isas();
  if (name.empty()) {
    *isa = ok.front();
    return true;
  }
  std::string list;
  for (Isa i : ok) list += std::string(list.empty() ? "" : ", ") + isa_name(i);
  for (Isa i : {Isa::kAvx512Vnni, Isa::kAvx2, Isa::kScalar}) {
    if (name == isa_name(i)) {
      if (isa_supported(i)) {
        *isa = i;
        return true;
      }
      *error = "CPU ISA '" + name + "' is not supported by this CPU (supported: " + list + ")";
      return false;
    }
  }
  *error = "unknown CPU ISA '" + name + "' (known: avx512_vnni, avx2, scalar; supported here: " + list + ")";
  return false;
}

}  // namespace cpu
}  // namespace llmkern
