// pybind11 binding of the CUDA decode_attention (launcher: csrc/cuda/decode_attention.cu). Pointers and
// the stream are integers from torch; element strides as lists; no torch headers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "llmkern/cuda/params.h"

namespace py = pybind11;

namespace llmkern {

void bind_decode_attention(py::module_& m) {
  m.def(
      "decode_attention",
      [](std::uintptr_t q, int q_dtype, const std::vector<int64_t>& qs, int B, int Sq, int Hq, int Hk, int D,
         std::uintptr_t k_cache, std::uintptr_t v_cache, int kv_type, const std::vector<int64_t>& ks,
         const std::vector<int64_t>& vs, std::uintptr_t k_scale, std::uintptr_t v_scale,
         const std::vector<int64_t>& kss, const std::vector<int64_t>& vss, std::uintptr_t seq_lens,
         std::uintptr_t block_table, int64_t bt_stride, int block_size, float scale, float softcap,
         int window_left, std::uintptr_t out, std::uintptr_t ws, int num_splits, std::uintptr_t stream,
         int pipeline, int mma) {
        auto need3 = [](const std::vector<int64_t>& s, const char* name) {
          if (s.size() != 3)
            throw py::value_error(std::string("llmkern._C_cuda.decode_attention: ") + name + " needs 3 strides");
        };
        need3(qs, "q");
        need3(ks, "k_cache");
        need3(vs, "v_cache");
        need3(kss, "k_scale");
        need3(vss, "v_scale");
        cuda::DecodeParams p;
        p.q = reinterpret_cast<const void*>(q);
        p.q_dtype = q_dtype;
        p.q_s0 = qs[0], p.q_s1 = qs[1], p.q_s2 = qs[2];
        p.B = B, p.Sq = Sq, p.Hq = Hq, p.Hk = Hk, p.D = D;
        p.k_cache = reinterpret_cast<const void*>(k_cache);
        p.v_cache = reinterpret_cast<const void*>(v_cache);
        p.kv_type = kv_type;
        p.k_s0 = ks[0], p.k_s1 = ks[1], p.k_s2 = ks[2];
        p.v_s0 = vs[0], p.v_s1 = vs[1], p.v_s2 = vs[2];
        p.k_scale = reinterpret_cast<const float*>(k_scale);
        p.v_scale = reinterpret_cast<const float*>(v_scale);
        p.ks_s0 = kss[0], p.ks_s1 = kss[1], p.ks_s2 = kss[2];
        p.vs_s0 = vss[0], p.vs_s1 = vss[1], p.vs_s2 = vss[2];
        p.seq_lens = reinterpret_cast<const int32_t*>(seq_lens);
        p.block_table = reinterpret_cast<const int32_t*>(block_table);
        p.bt_stride = bt_stride;
        p.block_size = block_size;
        p.scale = scale, p.softcap = softcap, p.window_left = window_left;
        p.out = reinterpret_cast<void*>(out);
        p.ws = reinterpret_cast<float*>(ws);
        p.num_splits = num_splits;
        p.pipeline = pipeline;
        p.mma = mma;
        return std::string(decode_attention_cuda(p, reinterpret_cast<void*>(stream)));
      },
      py::arg("q"), py::arg("q_dtype"), py::arg("q_strides"), py::arg("B"), py::arg("Sq"), py::arg("Hq"),
      py::arg("Hk"), py::arg("D"), py::arg("k_cache"), py::arg("v_cache"), py::arg("kv_type"),
      py::arg("k_strides"), py::arg("v_strides"), py::arg("k_scale"), py::arg("v_scale"),
      py::arg("k_scale_strides"), py::arg("v_scale_strides"), py::arg("seq_lens"), py::arg("block_table"),
      py::arg("bt_stride"), py::arg("block_size"), py::arg("scale"), py::arg("softcap"), py::arg("window_left"),
      py::arg("out"), py::arg("ws"), py::arg("num_splits"), py::arg("stream"), py::arg("pipeline") = 0, py::arg("mma") = 0,
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "decode_attention_workspace_floats",
      [](int64_t B, int64_t Sq, int64_t Hq, int64_t D, int64_t num_splits) {
        return cuda::decode_workspace_floats(B, Sq, Hq, D, num_splits);
      },
      py::arg("B"), py::arg("Sq"), py::arg("Hq"), py::arg("D"), py::arg("num_splits"));
}

}  // namespace llmkern
