"""Weight formats: llmkern's canonical quantized layouts (see README.md) and exact importers into them.

- `gguf`: GGUF Q8_0 / Q4_0 / Q4_1 blocks -> canonical int8 / int4, bit-exact; `load_gguf_tensor` for a
  whole tensor of a GGUF file (F32 / F16 / BF16 too).
- `gguf_file`: `GGUFFile`, the reader the loader uses (header, metadata, tensor table over a memory map;
  ~20x faster than gguf.GGUFReader on a tokenizer's vocabulary).
"""
from .gguf import SUPPORTED_TYPES, load_gguf_tensor, q4_0_to_int4, q4_1_to_int4, q8_0_to_int8

__all__ = ["SUPPORTED_TYPES", "load_gguf_tensor", "q8_0_to_int8", "q4_0_to_int4", "q4_1_to_int4"]
