"""Helpers shared by the tests of llmkern.nn: relative error and naive float64 definitions."""
from __future__ import annotations

import math

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf, so it never passes a bound."""
    out64, ref64 = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    if not (torch.isfinite(out64).all() and torch.isfinite(ref64).all()):
        return math.inf
    return float((out64 - ref64).norm() / ref64.norm())


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 20 log10(||ref|| / ||out - ref||) in dB."""
    e = rel_err(out, ref)
    return math.inf if e == 0 else -20.0 * math.log10(e)


def naive_rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Llama "rotate half" RoPE in float64. x [B, S, H, D], positions [B, S] -> float64 [B, S, H, D]."""
    D = x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float64) / D))  # [D/2]
    ang = positions.to(torch.float64)[..., None] * inv  # [B, S, D/2]
    cos, sin = ang.cos()[:, :, None], ang.sin()[:, :, None]  # [B, S, 1, D/2]
    x = x.to(torch.float64)
    a, b = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def naive_attention(q, k, v, *, causal=True, scale=None) -> torch.Tensor:
    """float64 softmax(q k^T * scale) v of one sequence with GQA; bottom-right causal mask.

    q [Sq, Hq, D], k/v [Sk, Hk, D] -> [Sq, Hq, D].
    """
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
    Sq, Hq, D = q.shape
    Sk, Hk = k.shape[0], k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    rep = Hq // Hk
    k = k.repeat_interleave(rep, dim=1)  # [Sk, Hq, D]: query head h reads kv head h // rep
    v = v.repeat_interleave(rep, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale  # [Hq, Sq, Sk]
    if causal:
        i = torch.arange(Sq)[:, None] + (Sk - Sq)
        j = torch.arange(Sk)[None, :]
        s = s.masked_fill(j > i, -math.inf)
    p = torch.softmax(s, dim=-1)
    return torch.einsum("hqk,khd->qhd", p, v)
