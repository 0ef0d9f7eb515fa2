"""Reference (pure PyTorch) int8_linear; see llmkern/ops/int8_linear.py for the semantics.

The math runs in float64, which makes it exact where the op defines integers:
- w8a16: y = x @ dequant(w)^T + bias, dequant(w) = dequantize_int8(w, scale) (the fp32 product that
  every backend and GGUF Q8_0 use), matmul and bias in float64, one final rounding to x's dtype;
- w8a8: x rows quantized by quantize_rows_int8 (bit-exact rule), integer dot products per weight group
  in float64 (|q| <= 127, so every partial sum is an integer below 2^53: exact in any order),
  times x_scale * w_scale, summed over groups, + bias, one final rounding to x's dtype.
"""
import math

import torch

from .quant import dequantize_int8, quantize_rows_int8


def _w8a8(x2, weight, weight_scale):
    """x2 float [M, K], weight int8 [N, K], weight_scale [N] or [N, g] -> float64 [M, N] (without bias)."""
    M, K = x2.shape
    N = weight.shape[0]
    qx, sx = quantize_rows_int8(x2)  # int8 [M, K], fp32 [M]
    g = 1 if weight_scale.dim() == 1 else weight_scale.shape[1]
    G = K // g if g else 0
    # Integer dot products per group: [g, M, G] @ [g, G, N] -> [g, M, N], exact in float64.
    xq = qx.to(torch.float64).reshape(M, g, G).transpose(0, 1)  # [M, K] -> [M, g, G] -> [g, M, G]
    wq = weight.to(torch.float64).reshape(N, g, G).permute(1, 2, 0)  # [N, K] -> [N, g, G] -> [g, G, N]
    acc = torch.bmm(xq, wq)  # [g, M, N]
    sw = weight_scale.to(torch.float64).reshape(N, g).t().unsqueeze(1)  # [N, g] -> [g, 1, N]
    sx64 = sx.to(torch.float64).reshape(1, M, 1)  # [M] -> [1, M, 1]
    # Rescale each group's integer sum by x_scale * w_scale, then sum the groups.
    return (acc * (sx64 * sw)).sum(dim=0)  # [M, N]


def int8_linear(x, weight, weight_scale, bias, mode):
    """y [..., N] = x [..., K] @ dequant(weight [N, K])^T + bias [N], in x's dtype."""
    N, K = weight.shape
    x2 = x.reshape(math.prod(x.shape[:-1]), K)  # [..., K] -> [M, K] (also when K = 0)
    if mode == "w8a8":
        y = _w8a8(x2, weight, weight_scale)
    else:
        w = dequantize_int8(weight, weight_scale).to(torch.float64)  # [N, K]
        y = x2.to(torch.float64) @ w.t()  # [M, N]
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(x.dtype).reshape(x.shape[:-1] + (N,))  # [M, N] -> [..., N]
