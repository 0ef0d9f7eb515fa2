"""Pure-PyTorch ground truth for every op: fp32/fp64 math, any device, every option.

Each function takes exactly the op's arguments (without `backend`) in schema order, after the op's
checks have run; see llmkern/ops/<op>.py for the semantics these implement.
"""
from .attention import attention
from .decode_attention import decode_attention
from .int4_linear import int4_linear
from .int8_linear import int8_linear
from .kv_cache_append import kv_cache_append
from .quant import (dequantize_int4, dequantize_int8, pack_int4, quantize_int4, quantize_int8,
                    quantize_rows_int8, unpack_int4)
from .rms_norm import rms_norm
from .rotary_embedding import rotary_embedding

__all__ = [
    "attention", "decode_attention", "kv_cache_append", "int8_linear", "int4_linear", "rms_norm",
    "rotary_embedding", "quantize_int8", "dequantize_int8", "quantize_int4", "dequantize_int4",
    "pack_int4", "unpack_int4", "quantize_rows_int8",
]
