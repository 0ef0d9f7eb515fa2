"""Reference KV cache write (pure PyTorch); semantics in llmkern/ops/kv_cache_append.py."""
from __future__ import annotations

import torch

from .quant import quantize_rows_int8
from .rotary_embedding import rotate


def _write(src: torch.Tensor, cache: torch.Tensor, scale_t: torch.Tensor | None, slots: torch.Tensor) -> None:
    """cache viewed as [num_slots, Hk, D]; row slots[t] = src[t] (already filtered of -1 slots)."""
    Hk, D = cache.shape[2], cache.shape[3]
    flat = cache.view(-1, Hk, D)  # [num_slots, Hk, D], a view: writes land in the cache
    if scale_t is None:
        flat.index_copy_(0, slots, src.to(cache.dtype))
        return
    # Per (token, head) over D: the int8 rule of llmkern/ops/quant.py, shared so that there is one rule.
    q, s = quantize_rows_int8(src)  # int8 [T, Hk, D], float32 [T, Hk]
    flat.index_copy_(0, slots, q)
    scale_t.view(-1, Hk).index_copy_(0, slots, s)  # [num_slots, Hk]


def kv_cache_append(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, q, positions, cos_sin_cache,
                    rotary_interleaved):
    """Write k/v at slot_mapping into the caches in place (rotating q/k first when cos_sin_cache is given)."""
    q_rot = None
    if cos_sin_cache is not None:
        # Same result as rotary_embedding then kv_cache_append: k rounded to its dtype after rotation.
        k = rotate(k, positions, cos_sin_cache, rotary_interleaved)
        if q is not None:
            q_rot = rotate(q, positions, cos_sin_cache, rotary_interleaved)
    Hk, D = k.shape[-2], k.shape[-1]
    slots = slot_mapping.reshape(-1)  # [T]
    keep = (slots >= 0).nonzero().squeeze(1)  # token indices to write; slot -1 is padding
    if keep.numel():
        slots = slots[keep]
        # [B, S, Hk, D] or [T, Hk, D] -> [T, Hk, D], then only the kept tokens.
        k_rows = k.reshape(-1, Hk, D)[keep]
        v_rows = v.reshape(-1, Hk, D)[keep]
        _write(k_rows, k_cache, k_scale, slots)
        _write(v_rows, v_cache, v_scale, slots)
    if q_rot is not None:  # last: a q that is v (or k) itself must not change what was written
        q.copy_(q_rot)
