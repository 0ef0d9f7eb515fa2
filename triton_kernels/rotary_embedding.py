"""Triton rotary embedding (semantics: llmkern/ops/rotary_embedding.py); `rotate_tile` is shared with
kv_cache_append's fused rotary.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import pow2


@triton.jit
def rotate_tile(base, offs_h, offs_d, stride_h, cs_ptr, H, D, R, INTERLEAVED: tl.constexpr):
    """One token's heads [BLOCK_H, BLOCK_D] of x at `base`, rotated, in fp32 (dims >= R unchanged).

    Element d < R pairs with `partner`: NeoX (d, d +- R/2), GPT-J (d, d ^ 1); the first of a pair
    becomes a cos - b sin, the second b cos + a sin, i.e. x[d] cos + sign * x[partner] sin.
    cs_ptr points at the token's row of cos_sin_cache [R] (cos | sin).
    """
    half = R // 2
    mask = (offs_h[:, None] < H) & (offs_d[None, :] < D)
    x = tl.load(base + offs_h[:, None] * stride_h + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    if INTERLEAVED:
        i = offs_d // 2
        partner = offs_d ^ 1
        sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)
    else:
        lo = offs_d < half
        i = tl.where(lo, offs_d, offs_d - half)
        partner = tl.where(lo, offs_d + half, offs_d - half)
        sign = tl.where(lo, -1.0, 1.0)
    rot = offs_d < R
    # Outside the rotary dims cos = 1, sin = 0 and the partner is 0: x passes through exactly.
    cos = tl.load(cs_ptr + i, mask=rot, other=1.0)
    sin = tl.load(cs_ptr + half + i, mask=rot, other=0.0)
    p = tl.load(base + offs_h[:, None] * stride_h + partner[None, :], mask=mask & rot[None, :],
                other=0.0).to(tl.float32)
    return x * cos[None, :] + (sign * sin)[None, :] * p


@triton.jit
def rotary_kernel(x_ptr, out_ptr, pos_ptr, cs_ptr, H, D, R, stride_t, stride_h, stride_cs,
                  INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """x [T, H, D] (strides stride_t, stride_h, 1) -> out contiguous [T, H, D]; grid (T, cdiv(H, BLOCK_H))."""
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    out = rotate_tile(x_ptr + t * stride_t, offs_h, offs_d, stride_h, cs_ptr + pos * stride_cs, H, D, R,
                      INTERLEAVED)
    mask = (offs_h[:, None] < H) & (offs_d[None, :] < D)
    tl.store(out_ptr + t * H * D + offs_h[:, None] * D + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


NUM_WARPS = 8  # 4 warps on a 4096-element tile needed ~255 registers with int8 (COMPILE_REPORT.md)


def tile(H: int, D: int) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_D): all of D, and as many heads as fit in ~4096 elements."""
    bd = pow2(D)
    return min(pow2(H), max(4096 // bd, 1)), bd


def _rotate(x, positions, cos_sin_cache, interleaved):
    """x [..., H, D] -> new contiguous tensor, rotated."""
    H, D = x.shape[-2], x.shape[-1]
    T = math.prod(x.shape[:-2])
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if T == 0 or H == 0:
        return out
    x3 = x.reshape(T, H, D)  # [..., H, D] -> [T, H, D]
    if x3.stride(2) != 1:
        x3 = x3.contiguous()
    pos = positions.reshape(T).contiguous()  # (read at t: unit stride)
    cs = cos_sin_cache.contiguous()
    bh, bd = tile(H, D)
    rotary_kernel[(T, triton.cdiv(H, bh))](x3, out, pos, cs, H, D, cs.shape[1], x3.stride(0), x3.stride(1),
                                          cs.stride(0), INTERLEAVED=bool(interleaved), BLOCK_H=bh,
                                          BLOCK_D=bd, num_warps=NUM_WARPS)
    return out


def rotary_embedding(q, k, positions, cos_sin_cache, interleaved):
    """(q rotated, k rotated), new contiguous tensors in the inputs' dtypes."""
    return _rotate(q, positions, cos_sin_cache, interleaved), _rotate(k, positions, cos_sin_cache, interleaved)
