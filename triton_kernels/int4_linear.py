"""Triton W4A16 int4_linear: y = x @ dequant(qweight)^T + bias (semantics: llmkern/ops/int4_linear.py).

Canonical int4 weights: qweight uint8 [N, K/2] (low nibble = even k), scales/offsets fp32 [N, K/G],
dequant(q) = q * scale + offset. Each program owns a [BLOCK_M, BLOCK_N] output tile and walks K in
BLOCK_K steps: it loads [BLOCK_N, BLOCK_K/2] bytes (contiguous along K: coalesced), splits the nibbles
(tl.join + reshape puts the low nibble at the even k), dequantizes in fp32 with each column's group
scale/offset, casts to x's dtype and runs tl.dot with fp32 accumulation. fp16/bf16 x run the dot in
fp16/bf16; fp32 x run it in IEEE fp32 (input_precision="ieee", not tf32: the fp32 tolerance is 1e-5).

Small M (decode, M <= 16) is memory bound on the weights and has few output tiles, so K is split over a
third grid axis (split-K): each split writes an fp32 partial [M, N] into a workspace [splits, M, N] and
`reduce_kernel` sums the splits in a fixed order (deterministic, no atomics), adds the bias and casts.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import TL_NAME, dot_precision, interpreting, pow2

SPLIT_K_MAX_M = 16  # split-K only for decode-sized M
MAX_SPLITS = 16


@triton.jit
def int4_linear_kernel(x_ptr, qw_ptr, s_ptr, o_ptr, b_ptr, y_ptr, M, N, K, stride_xm, n_groups, split_len,
                       HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, GROUP: tl.constexpr, DOT_PREC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """x [M, K] (row stride stride_xm, unit column stride); qweight [N, K/2], scales/offsets [N, n_groups]
    contiguous; y [M, N] contiguous in x's dtype, or (SPLIT) fp32 partials [splits, M, N].
    Grid (tiles_m * tiles_n, splits); split s covers k in [s * split_len, (s + 1) * split_len)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    # Grouped tile order: GROUP_M row tiles share each column tile while it is in L2.
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    gm = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % gm
    pid_n = (pid % per_group) // gm
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    offs_m64 = offs_m.to(tl.int64)
    offs_n64 = offs_n.to(tl.int64)
    HALF: tl.constexpr = BLOCK_K // 2
    SG: tl.constexpr = BLOCK_K // GROUP if BLOCK_K > GROUP else 1
    half_k = K // 2
    k_start = split * split_len
    k_end = tl.minimum(k_start + split_len, K)
    # Register-light addressing: int64 scalar bases (the tile's first row / column and k_start) plus
    # loop-invariant int32 offsets inside the tile; the bases advance by one K step per iteration. No
    # [rows, BLOCK_K] int64 offset tensor is rebuilt per step (COMPILE_REPORT.md).
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_b = tl.arange(0, HALF)
    offs_g = tl.arange(0, SG)
    x_off = rm[:, None] * stride_xm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    w_off = rn[:, None] * half_k + offs_b[None, :]  # [BLOCK_N, BLOCK_K/2] bytes
    g_off = rn[:, None] * n_groups + offs_g[None, :]  # [BLOCK_N, SG]
    x_blk = x_ptr + ((pid_m * BLOCK_M).to(tl.int64) * stride_xm + k_start)
    w_blk = qw_ptr + ((pid_n * BLOCK_N).to(tl.int64) * half_k + k_start // 2)
    g_row = (pid_n * BLOCK_N).to(tl.int64) * n_groups
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_ok = k0 + offs_k < k_end
        x = tl.load(x_blk + x_off, mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        byte = tl.load(w_blk + w_off, mask=n_ok[:, None] & (k0 // 2 + offs_b < k_end // 2)[None, :],
                       other=0)  # [BLOCK_N, BLOCK_K/2] uint8
        # The step holds SG whole groups (BLOCK_K >= GROUP) or part of one (SG = 1): load [BLOCK_N, SG]
        # scales/offsets and broadcast them over [BLOCK_N, SG, BLOCK_K / SG] (both are powers of two).
        g_ok = n_ok[:, None] & (k0 // GROUP + offs_g < n_groups)[None, :]
        g_ptr = g_row + k0 // GROUP + g_off
        sc = tl.load(s_ptr + g_ptr, mask=g_ok, other=0.0)[:, :, None]
        off = tl.load(o_ptr + g_ptr, mask=g_ok, other=0.0)[:, :, None]
        # Unpack nibbles straight into the dequantized values, one half at a time, and interleave only
        # the results: [BLOCK_N, BLOCK_K/2] low/high -> join -> [BLOCK_N, BLOCK_K] with k = 2j + t.
        SGH: tl.constexpr = HALF // SG
        b3 = tl.reshape(byte, (BLOCK_N, SG, SGH))
        lo = tl.reshape((b3 & 15).to(tl.float32) * sc + off, (BLOCK_N, HALF))  # canonical fp32 dequant
        hi = tl.reshape((b3 >> 4).to(tl.float32) * sc + off, (BLOCK_N, HALF))
        w = tl.reshape(tl.join(lo.to(x.dtype), hi.to(x.dtype)), (BLOCK_N, BLOCK_K))  # x's dtype for the dot
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PREC)
        x_blk += BLOCK_K
        w_blk += HALF
    if SPLIT:
        ptr = y_ptr + (split * M + offs_m64)[:, None] * N + offs_n64[None, :]
        tl.store(ptr, acc, mask=m_ok[:, None] & n_ok[None, :])
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        ptr = y_ptr + offs_m64[:, None] * N + offs_n64[None, :]
        tl.store(ptr, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def reduce_kernel(ws_ptr, b_ptr, y_ptr, MN, N, splits, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y [M, N] (flat MN) = sum over splits of ws [splits, M, N] fp32, in split order, + bias, cast."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(0, splits):
        acc += tl.load(ws_ptr + s * MN + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


REDUCE_BLOCK = 1024


def config(M: int, N: int, K: int, dtype, num_sms: int = 132, split_k: int | None = None) -> dict:
    """Tile sizes by shape. fp32 tiles are smaller (twice the bytes per element, IEEE dots). Splits for
    M <= 16: enough programs to cover every SM ~4 times, each split at least 2 K steps."""
    f32 = dtype == torch.float32
    if interpreting():
        bm, bn, bk, warps, stages = 16, 32, 32, 4, 1
    # fp32 dots are IEEE on CUDA cores, both operands in registers: at 4 warps (and BLOCK_K 32 for M > 16)
    # they spilled 0.3-0.5 KB on sm_80/sm_90 (COMPILE_REPORT.md); 8 warps and BLOCK_K 16 do not.
    elif M <= SPLIT_K_MAX_M:
        bm, bn, bk, warps, stages = (16, 64, 64, 8, 3) if f32 else (16, 64, 128, 4, 3)
    elif M <= 64:
        bm, bn, bk, warps, stages = (64, 64, 16, 8, 3) if f32 else (64, 64, 64, 4, 3)
    else:
        bm, bn, bk, warps, stages = (64, 64, 16, 8, 3) if f32 else (128, 128, 64, 8, 3)
    tiles = triton.cdiv(max(M, 1), bm) * triton.cdiv(max(N, 1), bn)
    if split_k is None:
        split_k = 1
        if M <= SPLIT_K_MAX_M:
            split_k = min(MAX_SPLITS, max(1, triton.cdiv(4 * num_sms, tiles)), max(1, triton.cdiv(K, 2 * bk)))
    split_len = triton.cdiv(triton.cdiv(max(K, 1), max(split_k, 1)), bk) * bk
    splits = triton.cdiv(max(K, 1), split_len)
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages,
            "splits": splits, "split_len": split_len, "DOT_PREC": dot_precision(dtype)}


def int4_linear(x, qweight, scales, offsets, bias, split_k: int | None = None, out: torch.Tensor | None = None):
    """y [..., N] in x's dtype (contiguous). `split_k` forces the split count (tests); `out` is an optional
    contiguous [..., N] output buffer (tests pass a NaN-filled one to see that every element is written)."""
    N, K = qweight.shape[0], qweight.shape[1] * 2
    G = K // scales.shape[1]
    M = math.prod(x.shape[:-1])
    x2 = x.reshape(M, K)  # [..., K] -> [M, K]; a view when rows are evenly strided
    if K and x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = out if out is not None else torch.empty(x.shape[:-1] + (N,), dtype=x.dtype, device=x.device)
    y2 = y.view(M, N)  # [..., N] -> [M, N]
    if M == 0 or N == 0:
        return y
    qw, sc, of = qweight.contiguous(), scales.contiguous(), offsets.contiguous()
    b = bias.contiguous() if bias is not None else sc  # any pointer when HAS_BIAS is off
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 132
    cfg = config(M, N, K, x.dtype, sms, split_k)
    splits = cfg["splits"]
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), splits)
    dst = y2 if splits == 1 else torch.empty((splits, M, N), dtype=torch.float32, device=x.device)
    int4_linear_kernel[grid](x2, qw, sc, of, b, dst, M, N, K, x2.stride(0), sc.shape[1], cfg["split_len"],
                             HAS_BIAS=bias is not None, SPLIT=splits > 1, GROUP=G, DOT_PREC=cfg["DOT_PREC"],
                             BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=8,
                             num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if splits > 1:
        reduce_kernel[(triton.cdiv(M * N, REDUCE_BLOCK),)](dst, b, y2, M * N, N, splits,
                                                           HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK)
    return y


def variants(cap: int, P: dict) -> list[dict]:
    """Every config `config` picks on a GPU (decode split-K, mid M, large M; fp32 and bf16), G 32/128."""
    from .variants import _v

    out = []
    # M=1 compiles with M a constant 1 (the JIT's specialization); M=5 is the same tiles with a runtime M.
    for M, dt in ((1, torch.bfloat16), (5, torch.bfloat16), (64, torch.bfloat16), (4096, torch.bfloat16), (1, torch.float32),
                  (64, torch.float32), (4096, torch.float32)):
        c = config(M, 4096, 4096, dt)
        for G in (32, 128):
            split = c["splits"] > 1
            out.append(_v(f"int4_linear M={M} {TL_NAME[dt]} G={G} split={split}", int4_linear_kernel,
                          {"x_ptr": P[dt], "qw_ptr": P[torch.uint8], "s_ptr": P[torch.float32],
                           "o_ptr": P[torch.float32], "b_ptr": P[dt], "y_ptr": P[torch.float32] if split else P[dt],
                           "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "n_groups": "i32",
                           "split_len": "i32"},
                          {"HAS_BIAS": True, "SPLIT": split, "GROUP": G, "DOT_PREC": c["DOT_PREC"],
                           "BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"], "BLOCK_K": c["BLOCK_K"], "GROUP_M": 8},
                          c["num_warps"], c["num_stages"],
                          vals={"M": M, "N": 4096, "K": 4096, "stride_xm": 4096, "n_groups": 4096 // G,
                                "split_len": c["split_len"]}))
    out.append(_v("int4_linear split-K reduce", reduce_kernel,
                  {"ws_ptr": P[torch.float32], "b_ptr": P[torch.bfloat16], "y_ptr": P[torch.bfloat16],
                   "MN": "i32", "N": "i32", "splits": "i32"}, {"HAS_BIAS": True, "BLOCK": REDUCE_BLOCK},
                  vals={"MN": 4096, "N": 4096, "splits": 8}))
    return out

