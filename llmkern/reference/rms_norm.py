"""Reference RMS norm (pure PyTorch); semantics in llmkern/ops/rms_norm.py."""
from __future__ import annotations

import torch


def rms_norm(x, weight, eps, residual):
    """Returns (y, h): y = h / sqrt(mean(h^2) + eps) * weight with h = x (+ residual).

    h is rounded to x's dtype first (what an unfused model feeds the norm); the norm itself is
    computed in float64 and rounded once to x's dtype. Without residual the second output is empty(0).
    """
    if residual is not None:
        h = (x.to(torch.float64) + residual.to(torch.float64)).to(x.dtype)  # [..., N]
    else:
        h = x
    h64 = h.to(torch.float64)
    inv_rms = torch.rsqrt(h64.square().mean(dim=-1, keepdim=True) + float(eps))  # [..., 1]
    # Contiguous outputs whatever x's layout (the fake kernel promises x.new_empty(x.shape)).
    y = (h64 * inv_rms * weight.to(torch.float64)).to(x.dtype).contiguous()
    if residual is None:
        return y, x.new_empty((0,))
    return y, h.contiguous()
