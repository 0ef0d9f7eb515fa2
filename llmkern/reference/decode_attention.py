"""Reference decode attention (pure PyTorch); semantics in llmkern/ops/decode_attention.py.

Each sequence's keys/values are gathered from the cache (contiguous or paged, float or int8) into a
padded [B, Lmax, Hk, D] block, then the shared masked softmax of attention.py runs once for the whole
batch with a mask that hides the padding and applies the causal/window rules.
"""
from __future__ import annotations

import torch

from .attention import compute_dtype, masked_attention, visible


def _gather(cache: torch.Tensor, scale_t: torch.Tensor | None, block_table: torch.Tensor | None, lmax: int,
            dtype: torch.dtype) -> torch.Tensor:
    """The first `lmax` tokens of every sequence: [B, lmax, Hk, D] in `dtype` (int8 dequantized).

    cache: contiguous [B, Smax, Hk, D] or paged [num_blocks, block_size, Hk, D] (with block_table
    [B, max_blocks]); scale_t: the int8 scales, the cache's shape without D, or None.
    Tokens past a sequence's length are gathered too (they are masked out later).
    """
    if block_table is None:
        vals = cache[:, :lmax].to(dtype)  # [B, lmax, Hk, D]
        if scale_t is not None:
            vals = vals * scale_t[:, :lmax, :, None].to(dtype)
        return vals
    num_blocks, bs = cache.shape[0], cache.shape[1]
    nblk = (lmax + bs - 1) // bs
    # Entries past a sequence's used blocks may hold anything (the op checks only the used ones):
    # clamp them into range; the mask hides whatever they point to.
    bt = block_table[:, :nblk].to(torch.int64).clamp(0, max(num_blocks - 1, 0))  # [B, nblk]
    B = bt.shape[0]
    vals = cache[bt].to(dtype)  # [B, nblk, bs, Hk, D]
    if scale_t is not None:
        vals = vals * scale_t[bt][..., None].to(dtype)
    return vals.reshape(B, nblk * bs, *cache.shape[2:])[:, :lmax]  # [B, lmax, Hk, D]


def decode_attention(q, k_cache, v_cache, seq_lens, block_table, k_scale, v_scale, scale, softcap, window_left):
    """out like q: attention of each sequence's Sq newest tokens over its seq_lens[b] cached tokens."""
    q4 = q if q.dim() == 4 else q[:, None]  # [B, Sq, Hq, D]
    B, Sq, Hq, D = q4.shape
    scale = D ** -0.5 if scale is None else float(scale)
    lens = seq_lens.to(torch.int64)
    lmax = int(lens.max()) if B else 0
    dtype = compute_dtype(B * Sq * Hq * max(lmax, 1) * D)
    k = _gather(k_cache, k_scale, block_table, lmax, dtype)  # [B, lmax, Hk, D]
    v = _gather(v_cache, v_scale, block_table, lmax, dtype)
    # Slots past a sequence's length may hold anything (NaN, stale data): zero them so that a masked
    # weight of 0 never meets a NaN value in p @ v.
    pad = (torch.arange(lmax, device=q.device)[None, :] >= lens[:, None])[:, :, None, None]  # [B, lmax, 1, 1]
    k, v = k.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)
    # New query t of sequence b sits at position seq_lens[b] - Sq + t; it sees keys j <= position
    # (causal) and j >= position - window_left. A sequence of length 0 sees nothing (out 0).
    q_pos = lens[:, None] - Sq + torch.arange(Sq, device=q.device)[None, :]  # [B, Sq]
    mask = visible(q_pos, lens, lmax, causal=True, window_left=window_left, window_right=0)
    out, _ = masked_attention(q4.to(dtype).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask,
                              scale, float(softcap))
    return out.transpose(1, 2).reshape(q.shape).to(q.dtype).contiguous()  # [B, Sq, Hq, D] -> q's shape
