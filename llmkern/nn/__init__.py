"""Drop-in nn.Modules over llmkern.ops: quantized linears, norms, rotary, KV caches and attention.

Every module takes `backend=None` and passes it to each op call (see llmkern.ops for the dispatch).
"""
from .attention import Attention
from .embedding import QuantizedEmbedding
from .kv_cache import KVCache
from .linear import Int4Linear, Int8Linear, keep_canonical, quantize_linears, set_linear_modes
from .norm import RMSNorm, RotaryEmbedding
from .paged_kv_cache import BlockAllocator, PagedKVCache

__all__ = [
    "Int8Linear", "Int4Linear", "quantize_linears", "set_linear_modes", "keep_canonical", "RMSNorm",
    "RotaryEmbedding", "KVCache", "PagedKVCache", "BlockAllocator", "Attention", "QuantizedEmbedding",
]
