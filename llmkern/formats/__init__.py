"""Weight formats: llmkern's canonical quantized layouts (see README.md) and exact importers into them.

- `gguf`: GGUF Q8_0 / Q4_0 / Q4_1 blocks -> canonical int8 / int4, bit-exact; `load_gguf_tensor` for a
  whole tensor of a GGUF file (F32 / F16 / BF16 and the types of `gguf_kquants` too).
- `gguf_kquants`: Q5_0, Q4_K, Q6_K -> canonical int8 / int4, bit-exact; Q5_1, Q5_K -> float32 (exact values).
- `gguf_file`: `GGUFFile`, the reader the loader uses (header, metadata, tensor table over a memory map;
  ~20x faster than gguf.GGUFReader on a tokenizer's vocabulary).
"""
from .gguf import FLOAT_ONLY_TYPES, SUPPORTED_TYPES, load_gguf_tensor, q4_0_to_int4, q4_1_to_int4, q8_0_to_int8
from .gguf_kquants import q4_k_to_int4, q5_0_to_int8, q5_1_to_float, q5_k_to_float, q6_k_to_int8

__all__ = ["SUPPORTED_TYPES", "FLOAT_ONLY_TYPES", "load_gguf_tensor", "q8_0_to_int8", "q4_0_to_int4", "q4_1_to_int4",
           "q5_0_to_int8", "q4_k_to_int4", "q6_k_to_int8", "q5_1_to_float", "q5_k_to_float"]
