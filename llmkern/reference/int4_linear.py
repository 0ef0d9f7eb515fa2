"""Reference (pure PyTorch) int4_linear; see llmkern/ops/int4_linear.py for the semantics.

dequant(q) = q * scale + offset is the canonical fp32 dequantization (dequantize_int4, bit-exact with
GGUF Q4_0/Q4_1); the matmul and bias run in float64 with one final rounding to x's dtype.
Modes "w4a8" / "w4a8g": x is first replaced by its int8 quantization (quantize_rows_int8, the rule of
int8_linear's W8A8) over each row / each group of G values of a row, dequantized exactly in float64
(q * scale, an 8-bit by 24-bit product).
"""
import math

import torch

from .quant import dequantize_int4, quantize_rows_int8


def int4_linear(x, qweight, scales, offsets, bias, mode="w4a16"):
    """y [..., N] = x [..., K] @ dequant(qweight [N, K // 2])^T + bias [N], in x's dtype."""
    N, K = qweight.shape[0], qweight.shape[1] * 2
    w = dequantize_int4(qweight, scales, offsets).to(torch.float64)  # [N, K]
    x2 = x.reshape(math.prod(x.shape[:-1]), K)  # [..., K] -> [M, K]
    if mode in ("w4a8", "w4a8g"):
        G = K // scales.shape[1] if mode == "w4a8g" else K
        M = x2.shape[0]
        qx, sx = quantize_rows_int8(x2.reshape(M, K // G, G))  # int8 [M, K/G, G], fp32 [M, K/G]
        x64 = (qx.to(torch.float64) * sx.to(torch.float64).unsqueeze(-1)).reshape(M, K)  # exact
    else:
        x64 = x2.to(torch.float64)
    y = x64 @ w.t()  # [M, N]
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(x.dtype).reshape(x.shape[:-1] + (N,))  # [M, N] -> [..., N]
