"""llmkern's public functional API: one registered torch op (`torch.ops.llmkern.<name>`) per op.

Every function takes `backend=None`: "reference", "cpu", "cuda" or "triton" to choose one explicitly,
else `LLMKERN_BACKEND`, else the fastest backend available for the inputs' device (see _registry.py).
"""
from ._checks import set_value_checks
from ._registry import OPS, BackendUnsupported, strict
from .attention import attention
from .decode_attention import decode_attention
from .int4_linear import int4_linear
from .int8_linear import int8_linear
from .kv_cache_append import kv_cache_append
from .quant import (dequantize_int4, dequantize_int8, pack_int4, quantize_int4, quantize_int8,
                    quantize_rows_int8, unpack_int4)
from .rms_norm import rms_norm
from .rotary_embedding import rotary_cos_sin, rotary_embedding

__all__ = [
    "attention", "decode_attention", "kv_cache_append", "int8_linear", "int4_linear", "rms_norm",
    "rotary_embedding", "rotary_cos_sin", "quantize_int8", "dequantize_int8", "quantize_int4",
    "dequantize_int4", "pack_int4", "unpack_int4", "quantize_rows_int8", "OPS", "BackendUnsupported",
    "strict", "set_value_checks",
]
