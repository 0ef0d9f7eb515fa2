"""Triton kv_cache_append: slot-mapped cache writes, optional fused rotary and int8 quantize-on-write.

Semantics: llmkern/ops/kv_cache_append.py. Grid (T, k/v head blocks + q head blocks): a program of
the first kind writes one token's k and v heads to its slot; one of the second kind rotates one
token's q heads in place (only with fused rotary and q given).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import quant_int8_rows
from .rotary_embedding import NUM_WARPS, rotate_tile, tile


@triton.jit
def _store_rows(x, cache_ptr, scale_ptr, slot, offs_h, offs_d, Hk, D, ok, INT8: tl.constexpr):
    """Write x fp32 [BLOCK_H, BLOCK_D] (already rounded to the input dtype) at cache slot `slot`."""
    mask = (offs_h[:, None] < Hk) & (offs_d[None, :] < D) & ok
    dst = cache_ptr + slot * Hk * D + offs_h[:, None] * D + offs_d[None, :]
    if INT8:
        # Padding columns hold 0 (masked loads), so they do not change max|x|.
        q, scale = quant_int8_rows(x, 1)
        tl.store(dst, q.to(tl.int8), mask=mask)
        tl.store(scale_ptr + slot * Hk + offs_h, scale, mask=(offs_h < Hk) & ok)
    else:
        tl.store(dst, x.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def kv_append_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, ks_ptr, vs_ptr, q_ptr, pos_ptr, cs_ptr,
                     Hk, Hq, D, R, stride_kt, stride_kh, stride_vt, stride_vh, stride_qt, stride_qh, stride_cs,
                     ROTARY: tl.constexpr, ROTATE_Q: tl.constexpr, INTERLEAVED: tl.constexpr,
                     INT8: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """k, v [T, Hk, D]; caches [num_slots, Hk, D] contiguous; scales [num_slots, Hk]; q [T, Hq, D]."""
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    n_kv = tl.cdiv(Hk, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    if hb < n_kv:
        offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        slot = tl.load(slot_ptr + t)
        ok = slot >= 0  # slot -1: padding, nothing written
        slot = tl.maximum(slot, 0)
        mask = (offs_h[:, None] < Hk) & (offs_d[None, :] < D)
        if ROTARY:
            pos = tl.load(pos_ptr + t).to(tl.int64)
            k = rotate_tile(k_ptr + t * stride_kt, offs_h, offs_d, stride_kh, cs_ptr + pos * stride_cs, Hk, D,
                            R, INTERLEAVED)
            # Rounded to k's dtype first: the result of rotary_embedding followed by a plain append.
            k = k.to(k_ptr.dtype.element_ty).to(tl.float32)
        else:
            k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask,
                        other=0.0).to(tl.float32)
        v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        _store_rows(k, kc_ptr, ks_ptr, slot, offs_h, offs_d, Hk, D, ok, INT8)
        _store_rows(v, vc_ptr, vs_ptr, slot, offs_h, offs_d, Hk, D, ok, INT8)
    else:
        if ROTATE_Q:
            offs_h = (hb - n_kv) * BLOCK_H + tl.arange(0, BLOCK_H)
            pos = tl.load(pos_ptr + t).to(tl.int64)
            base = q_ptr + t * stride_qt
            qr = rotate_tile(base, offs_h, offs_d, stride_qh, cs_ptr + pos * stride_cs, Hq, D, R, INTERLEAVED)
            mask = (offs_h[:, None] < Hq) & (offs_d[None, :] < D)
            tl.store(base + offs_h[:, None] * stride_qh + offs_d[None, :], qr.to(q_ptr.dtype.element_ty),
                     mask=mask)


def _rows(x, H, D):
    """[..., H, D] -> [T, H, D] with unit last stride (a view when possible)."""
    x3 = x.reshape(-1, H, D)
    return x3 if x3.stride(2) == 1 else x3.contiguous()


def kv_cache_append(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, q, positions, cos_sin_cache,
                    rotary_interleaved):
    """In place: caches (and q when rotating) are written; returns None."""
    Hk, D = k.shape[-2], k.shape[-1]
    T = math.prod(k.shape[:-2])
    if T == 0 or Hk == 0 or D == 0:
        return None
    k3, v3 = _rows(k, Hk, D), _rows(v, Hk, D)
    slots = slot_mapping.reshape(T).contiguous()  # (the kernel reads slots[t] at t: a strided view would not do)
    rotary = cos_sin_cache is not None
    rotate_q = rotary and q is not None and q.numel() > 0
    int8 = k_cache.dtype == torch.int8
    Hq = q.shape[-2] if rotate_q else 1
    q3, q_copy = (_inplace_rows(q, Hq, D) if rotate_q else (k3, False))
    cs = cos_sin_cache.contiguous() if rotary else k3
    pos = positions.reshape(T).contiguous() if rotary else slots
    bh, bd = tile(max(Hk, Hq), D)
    grid = (T, triton.cdiv(Hk, bh) + (triton.cdiv(Hq, bh) if rotate_q else 0))
    kv_append_kernel[grid](
        k3, v3, k_cache, v_cache, slots, k_scale if int8 else k_cache, v_scale if int8 else v_cache, q3, pos, cs,
        Hk, Hq, D, cs.shape[1] if rotary else 2, k3.stride(0), k3.stride(1), v3.stride(0), v3.stride(1),
        q3.stride(0), q3.stride(1), cs.stride(0) if rotary else 0,
        ROTARY=rotary, ROTATE_Q=rotate_q, INTERLEAVED=bool(rotary_interleaved), INT8=int8,
        BLOCK_H=bh, BLOCK_D=bd, num_warps=NUM_WARPS)
    if q_copy:
        q.copy_(q3.view(q.shape))
    return None


def _inplace_rows(q, H, D):
    """q [..., H, D] as [T, H, D] writable in place: a view if q's layout allows, else a copy (flag True)."""
    try:
        q3 = q.view(-1, H, D)
        if q3.stride(2) == 1:
            return q3, False
    except RuntimeError:
        pass
    return q.reshape(-1, H, D).contiguous(), True
