"""Reference (pure PyTorch) implementation; see llmkern/ops for the semantics."""
import torch



def kv_cache_append(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, q, positions, cos_sin_cache, rotary_interleaved):
    raise NotImplementedError
