"""Triton rms_norm, optionally fused with the residual add (semantics: llmkern/ops/rms_norm.py).

One program per row; the row (N <= MAX_N) stays in registers, so x is read once.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import pow2

MAX_N = 16384  # one row in registers (32768 spilled, COMPILE_REPORT.md); wider rows fall back


@triton.jit
def rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, N, stride_x, stride_r, eps,
                    HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    """x, r [M, N] (row strides stride_x/stride_r, unit column stride); y, h contiguous [M, N]."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0)
        # The fp32 sum of two fp16/bf16 values rounded to that dtype is the correctly rounded sum
        # (fp32 has >= 2p + 2 bits), i.e. exactly what the unfused model computes.
        h = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(h_ptr + row * N + offs, h, mask=mask)
        hf = h.to(tl.float32)
    else:
        hf = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / N + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * N + offs, (hf * inv_rms * w).to(y_ptr.dtype.element_ty), mask=mask)


def config(N: int) -> dict:
    block = pow2(N, 16)
    return {"BLOCK": block, "num_warps": min(max(block // 256, 1), 16)}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None):
    """Returns (y, h) like the reference: y contiguous like x; h = x + residual (or empty(0))."""
    N = x.shape[-1]
    M = math.prod(x.shape[:-1])
    x2 = x.reshape(M, N)  # [..., N] -> [M, N]; a view when rows are evenly strided
    if N and x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = torch.empty(x.shape if residual is not None else (0,), dtype=x.dtype, device=x.device)
    r2 = x2
    if residual is not None:
        r2 = residual.reshape(M, N)
        if N and r2.stride(1) != 1:
            r2 = r2.contiguous()
    if M == 0:
        return y, h
    if N == 0:
        return y, h
    cfg = config(N)
    rms_norm_kernel[(M,)](x2, r2, weight.contiguous(), y, h if residual is not None else y, N,
                          x2.stride(0), r2.stride(0), float(eps), HAS_RES=residual is not None,
                          BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])
    return y, h
