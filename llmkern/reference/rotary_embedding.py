"""Reference rotary embedding (pure PyTorch); semantics in llmkern/ops/rotary_embedding.py."""
from __future__ import annotations

import torch


def rotate(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x [..., H, D] rotated at positions [...] -> new contiguous tensor in x's dtype.

    cos_sin_cache [max_pos, R]: cos in columns 0..R/2-1, sin in R/2..R-1. Computed in float64 (the
    fp32 cos/sin and the input are exact there), rounded once; dims R..D-1 are copied unchanged.
    """
    R = cos_sin_cache.shape[1]
    half = R // 2
    cs = cos_sin_cache[positions.to(torch.int64)].to(torch.float64)  # [..., R]
    cos = cs[..., None, :half]  # [..., 1, R/2], broadcast over heads
    sin = cs[..., None, half:]
    xr = x[..., :R].to(torch.float64)  # [..., H, R]
    if interleaved:
        a, b = xr[..., 0::2], xr[..., 1::2]  # GPT-J pairs (x[2i], x[2i+1])
    else:
        a, b = xr[..., :half], xr[..., half:]  # NeoX pairs (x[i], x[i + R/2])
    ra, rb = a * cos - b * sin, b * cos + a * sin  # [..., H, R/2] each
    if interleaved:
        rot = torch.stack((ra, rb), dim=-1).flatten(-2)  # back to (a0, b0, a1, b1, ...)
    else:
        rot = torch.cat((ra, rb), dim=-1)
    out = x.clone(memory_format=torch.contiguous_format)  # pass-through dims R..D-1
    out[..., :R] = rot.to(x.dtype)
    return out


def rotary_embedding(q, k, positions, cos_sin_cache, interleaved):
    """(q rotated, k rotated), new tensors in the inputs' dtypes."""
    return rotate(q, positions, cos_sin_cache, interleaved), rotate(k, positions, cos_sin_cache, interleaved)
