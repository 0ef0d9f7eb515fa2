"""Triton decode attention over contiguous or paged (block table) caches, float or int8, split-KV.

Semantics: llmkern/ops/decode_attention.py. Grid (B, Hk, num_splits): a program takes every query row
of one KV head — the GQA group's Hq / Hk heads times the Sq new tokens, padded to BLOCK_M >= 16 for
tl.dot — so each key/value is read once per head group (no K/V copies). Each split covers a range of
keys and produces (o = acc / l, lse = m + log2 l) per row; `merge_kernel` combines the splits exactly:
lse_tot = log2 sum 2^lse_s, out = sum o_s 2^(lse_s - lse_tot). With one split the first kernel writes
the output directly. Softmax in fp32 with exp2 (scores pre-multiplied by log2 e).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot_precision, interpreting, pow2, tanh_f32

LOG2E = 1.4426950408889634
MAX_ROWS = 128  # GQA group x Sq rows one program holds; more falls back to another backend
MAX_SPLITS = 64
# Keys per step on a GPU: 64 spilled registers on the paged gather (2D pointer tiles), see COMPILE_REPORT.md.
GPU_BLOCK_N = 32


@triton.jit
def decode_kernel(q_ptr, kc_ptr, vc_ptr, lens_ptr, bt_ptr, ks_ptr, vs_ptr, out_ptr, po_ptr, plse_ptr,
                  Sq, Hq, D, GROUP, split_size, num_splits, block_size,
                  stride_qb, stride_qs, stride_qh, stride_c0, stride_c1, stride_c2, stride_s0, stride_s1,
                  stride_bt, sm_scale, softcap, window_left,
                  PAGED: tl.constexpr, INT8: tl.constexpr, SOFTCAP: tl.constexpr, DIRECT: tl.constexpr,
                  DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  ROW_BLOCKS: tl.constexpr, ALIGN8: tl.constexpr):
    """q [B, Sq, Hq, D] strided; caches [rows, cols, Hk, D] (unit D stride), scales [rows, cols, Hk];
    out [B, Sq, Hq, D] contiguous (DIRECT) or po [B*Sq*Hq, num_splits, D] / plse [B*Sq*Hq, num_splits].
    Grid axis 1 is Hk * ROW_BLOCKS: the head's GROUP * Sq rows in ROW_BLOCKS blocks of BLOCK_M.
    ALIGN8: the launcher checked that D and the q/cache strides are multiples of 8."""
    if ALIGN8:
        # x // 8 * 8 == x here, and tells the compiler so: with D = 72..120 (no divisibility-16 hint from
        # the JIT) the K/V/q loads stay 16-byte vectors instead of one element each.
        D = D // 8 * 8
        stride_qb, stride_qs, stride_qh = stride_qb // 8 * 8, stride_qs // 8 * 8, stride_qh // 8 * 8
        stride_c0, stride_c1, stride_c2 = stride_c0 // 8 * 8, stride_c1 // 8 * 8, stride_c2 // 8 * 8
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1) // ROW_BLOCKS
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b)
    rows = (tl.program_id(1) % ROW_BLOCKS) * BLOCK_M + tl.arange(0, BLOCK_M)
    g = rows // Sq  # row = g * Sq + t: head kvh * GROUP + g, new token t
    t = rows % Sq
    row_ok = rows < GROUP * Sq
    h = kvh * GROUP + g
    q_pos = seq_len - Sq + t  # key coordinate of each query: it sees keys j <= q_pos
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(q_ptr + b * stride_qb + t[:, None] * stride_qs + h[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    start = split * split_size
    end = tl.minimum(start + split_size, seq_len)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    for n0 in range(start, end, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        j_ok = j < end
        if PAGED:
            row = tl.load(bt_ptr + b * stride_bt + j // block_size, mask=j_ok, other=0).to(tl.int64)
            col = j % block_size
        else:
            row = tl.zeros([BLOCK_N], tl.int64) + b
            col = j
        off = row * stride_c0 + col * stride_c1 + kvh * stride_c2  # [BLOCK_N] token offsets
        kv_mask = j_ok[:, None] & d_ok[None, :]
        k = tl.load(kc_ptr + off[:, None] + offs_d[None, :], mask=kv_mask, other=0)
        v = tl.load(vc_ptr + off[:, None] + offs_d[None, :], mask=kv_mask, other=0)
        if INT8:
            soff = row * stride_s0 + col * stride_s1 + kvh
            k = (k.to(tl.float32) * tl.load(ks_ptr + soff, mask=j_ok, other=0.0)[:, None]).to(q.dtype)
            v = (v.to(tl.float32) * tl.load(vs_ptr + soff, mask=j_ok, other=0.0)[:, None]).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_N] fp32
        if SOFTCAP:
            s = softcap * tanh_f32(s * (sm_scale / softcap)) * 1.4426950408889634
        else:
            s = s * qk_scale
        vis = row_ok[:, None] & j_ok[None, :] & (j[None, :] <= q_pos[:, None])
        vis = vis & ((window_left < 0) | (j[None, :] >= q_pos[:, None] - window_left))
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: keep exp2 finite
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row with no visible key: 0
    out_row = (b * Sq + t) * Hq + h  # [B, Sq, Hq] row index
    mask = row_ok[:, None] & d_ok[None, :]
    if DIRECT:
        tl.store(out_ptr + out_row[:, None] * D + offs_d[None, :], o.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        prow = out_row * num_splits + split
        tl.store(po_ptr + prow[:, None] * D + offs_d[None, :], o, mask=mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(plse_ptr + prow, lse, mask=row_ok)


@triton.jit
def merge_kernel(po_ptr, plse_ptr, out_ptr, D, num_splits, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """One output row: po [rows, num_splits, D] fp32, plse [rows, num_splits] (log2) -> out [rows, D]."""
    r = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = s < num_splits
    lse = tl.load(plse_ptr + r * num_splits + s, mask=s_ok, other=float("-inf"))
    mx = tl.max(lse, axis=0)
    w = tl.exp2(lse - tl.where(mx == float("-inf"), 0.0, mx))  # empty splits weigh 0
    tot = tl.sum(w, axis=0)
    po = tl.load(po_ptr + (r * num_splits + s)[:, None] * D + offs_d[None, :],
                 mask=s_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    o = tl.sum(w[:, None] * po, axis=0) / tl.where(tot > 0, tot, 1.0)
    tl.store(out_ptr + r * D + offs_d, o.to(out_ptr.dtype.element_ty), mask=offs_d < D)


class Unsupported(Exception):
    """An input these kernels do not take (the op adapter turns it into BackendUnsupported)."""


def config(rows: int, D: int, capacity: int, programs: int, dtype, num_sms: int = 132,
           num_splits: int | None = None) -> dict:
    """Tile sizes and the split count. Splits come from the cache capacity, not seq_lens (no host sync,
    CUDA-graph safe): enough programs to fill the GPU twice, at most one split per 256 keys."""
    bn = 16 if interpreting() else GPU_BLOCK_N
    if num_splits is None:
        num_splits = min(triton.cdiv(max(capacity, 1), 256), max(1, triton.cdiv(2 * num_sms, max(programs, 1))))
    num_splits = max(1, min(num_splits, MAX_SPLITS))
    split_size = triton.cdiv(triton.cdiv(max(capacity, 1), num_splits), bn) * bn
    num_splits = triton.cdiv(max(capacity, 1), split_size)
    bd, bm = pow2(D, 16), pow2(rows, 16)
    # At most 16384 accumulator elements per program: 128 rows x D=256 spilled on sm_80 (832 B with int8,
    # COMPILE_REPORT.md), so such a group runs as row blocks (each reads the keys; they share L2).
    bm = min(bm, max(16384 // bd, 16))
    # fp32 (IEEE dots on CUDA cores) at 4 warps spilled 504 B on sm_90: 8 warps.
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, "num_splits": num_splits,
            "ROW_BLOCKS": triton.cdiv(rows, bm),
            "split_size": split_size, "num_warps": 4 if bd <= 128 and bm * bd < 8192 and dtype != torch.float32 else 8, "num_stages": 2,
            "DOT_PREC": dot_precision(dtype)}


def decode_attention(q, k_cache, v_cache, seq_lens, block_table, k_scale, v_scale, scale, softcap, window_left,
                     num_splits: int | None = None):
    """out like q (contiguous): attention of each sequence's Sq new tokens over its cache."""
    q4 = q if q.dim() == 4 else q[:, None]  # [B, Hq, D] -> [B, 1, Hq, D] (a view)
    B, Sq, Hq, D = q4.shape
    Hk = k_cache.shape[2]
    group = Hq // Hk
    if group * Sq > MAX_ROWS:
        raise Unsupported(f"{group} query heads per KV head x Sq={Sq} > {MAX_ROWS} rows")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1:
        raise Unsupported("k_cache and v_cache need the same strides and a unit stride along D")
    if q4.stride(3) != 1:
        q4 = q4.contiguous()
    int8 = k_cache.dtype == torch.int8
    if int8:
        if not (k_scale.is_contiguous() and v_scale.is_contiguous()):
            raise Unsupported("k_scale/v_scale must be contiguous")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if B == 0 or Sq == 0 or Hq == 0:
        return out
    paged = block_table is not None
    seq_lens = seq_lens.contiguous()  # (read at b: unit stride; block_table rows at b * stride, then unit stride)
    if paged and block_table.stride(1) != 1:
        block_table = block_table.contiguous()
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 132
    cfg = config(group * Sq, D, capacity, B * Hk, q.dtype, sms, num_splits)
    ns = cfg["num_splits"]
    direct = ns == 1
    rows = B * Sq * Hq
    po = out if direct else torch.empty((rows, ns, D), dtype=torch.float32, device=q.device)
    plse = out if direct else torch.empty((rows, ns), dtype=torch.float32, device=q.device)
    sc = float(scale) if scale is not None else D ** -0.5
    ks, vs = (k_scale, v_scale) if int8 else (k_cache, v_cache)
    bt = block_table if paged else seq_lens
    align8 = D % 8 == 0 and all(x % 8 == 0 for x in (*q4.stride()[:3], *k_cache.stride()[:3]))
    decode_kernel[(B, Hk * cfg["ROW_BLOCKS"], ns)](
        q4, k_cache, v_cache, seq_lens, bt, ks, vs, out, po, plse,
        Sq, Hq, D, group, cfg["split_size"], ns, k_cache.shape[1],
        q4.stride(0), q4.stride(1), q4.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k_cache.shape[1] * k_cache.shape[2], k_cache.shape[2], bt.stride(0), sc, float(softcap), int(window_left),
        PAGED=paged, INT8=int8, SOFTCAP=softcap > 0, DIRECT=direct, DOT_PREC=cfg["DOT_PREC"],
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], ROW_BLOCKS=cfg["ROW_BLOCKS"], ALIGN8=align8,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if not direct:
        merge_kernel[(rows,)](po, plse, out, D, ns, BLOCK_S=pow2(ns), BLOCK_D=pow2(D), num_warps=4)
    return out
