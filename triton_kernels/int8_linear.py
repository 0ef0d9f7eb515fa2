"""Triton int8_linear, W8A16 and W8A8 (semantics: llmkern/ops/int8_linear.py).

weight int8 [N, K], weight_scale fp32 [N] (per channel) or [N, K/G] (per group).

W8A16: the int8 weights are converted to x's dtype inside the K loop (exact: |q| <= 128 fits fp16/bf16)
and tl.dot runs in x's dtype with fp32 accumulation (IEEE fp32 for fp32 x). Per-channel scales multiply
the accumulator once in the epilogue; per group (G a multiple of 16), BLOCK_K divides G, so each K step's
dot lies in one group and is scaled by it before it is added (scaling the exact integer weights' dot
instead of rounding q * scale to x's dtype first: no weight rounding at all).

W8A8: `quant_rows_kernel` quantizes each row of x exactly as quantize_rows_int8 does (amax, IEEE
divisions, ties to even: _common's rule), writing int8 rows [M, K] and fp32 row scales [M]. Then
`w8a8_kernel` runs tl.dot on int8 with int32 accumulation. Per channel: one int32 sum over K (refused
for K > 131072, where 127 * 128 * K could overflow), epilogue acc * (x_scale * w_scale) + bias. Per
group (G a multiple of 32): BLOCK_K divides G, so every K step lies in one group; its int32 dot is scaled
by the group's weight scale and added in fp32, and the row scale is applied in the epilogue.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import TL_NAME, dot_precision, interpreting, pow2, round_half_even

MAX_W8A8_K = 131072  # 127 * 128 * K < 2^31: the int32 sum of one group (or row) cannot overflow
QUANT_BLOCK = 1024
# Per-group scales apply per K step, so BLOCK_K must divide the group: the smallest K of an int8 dot is
# 32, of a 16-bit or fp32 dot 16. Other group sizes are refused (another backend runs them).
MIN_GROUP_K = {"w8a8": 32, "w8a16": 16}  # K elements per step of the row quantization kernel


class Unsupported(Exception):
    """An input these kernels do not take (the op adapter turns it into BackendUnsupported)."""


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) in grouped order: GROUP_M row tiles share each column tile while it is in L2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    gm = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % gm, (pid % per_group) // gm


@triton.jit
def quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, BLOCK: tl.constexpr):
    """One row: x [M, K] (row stride stride_xm) -> q int8 [M, K] contiguous, scale fp32 [M].

    Two passes over the row (amax, then quantize), so any K fits; the rule is _common.quant_int8_rows'.
    """
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    amax_v = tl.zeros([BLOCK], tl.float32)
    nan_v = tl.zeros([BLOCK], tl.int32)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax_v = tl.maximum(amax_v, tl.abs(x))
        nan_v = tl.maximum(nan_v, (x != x).to(tl.int32))
    # A NaN in the row makes its scale NaN, as the reference's max does (tl.maximum / tl.max drop NaNs on a GPU:
    # fmaxf), so the row's output is NaN, never a finite answer.
    amax = tl.where(tl.max(nan_v, axis=0) > 0, float("nan"), tl.max(amax_v, axis=0))
    scale = tl.math.div_rn(amax, 127.0)
    inv = tl.where(amax > 0, tl.math.div_rn(127.0, tl.where(amax > 0, amax, 1.0)), 0.0)
    for k0 in range(0, K, BLOCK):
        ok = k0 + offs < K
        x = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=ok, other=0.0).to(tl.float32)
        p = x * inv
        p = tl.where(p == p, p, 0.0)  # NaN products are 0, as the reference's nan_to_num (see quant_int8_rows)
        q = round_half_even(tl.minimum(tl.maximum(p, -127.0), 127.0))
        tl.store(q_ptr + row * K + k0 + offs, q.to(tl.int8), mask=ok)
    tl.store(s_ptr + row, scale)


@triton.jit
def w8a8_kernel(xq_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, n_groups, GROUP,
                HAS_BIAS: tl.constexpr, PER_GROUP: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """xq int8 [M, K], xs fp32 [M], w int8 [N, K], ws fp32 [N] or [N, n_groups] (GROUP = K / n_groups,
    a multiple of BLOCK_K), all contiguous; y [M, N] contiguous in the output dtype."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc_i = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    acc_f = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        a = tl.load(xq_ptr + offs_m[:, None] * K + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
        b = tl.load(w_ptr + offs_n[:, None] * K + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        if PER_GROUP:
            # This step lies in group k0 // GROUP: its exact int32 dot times the group's weight scale.
            part = tl.dot(a, tl.trans(b), out_dtype=tl.int32)
            sw = tl.load(ws_ptr + offs_n * n_groups + k0 // GROUP, mask=n_ok, other=0.0)
            acc_f += part.to(tl.float32) * sw[None, :]
        else:
            acc_i = tl.dot(a, tl.trans(b), acc_i, out_dtype=tl.int32)
    xs = tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0)
    if PER_GROUP:
        y = acc_f * xs[:, None]
    else:
        sw = tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0)
        y = acc_i.to(tl.float32) * (xs[:, None] * sw[None, :])
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def w8a16_kernel(x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, stride_xm, n_groups, GROUP,
                 HAS_BIAS: tl.constexpr, PER_GROUP: tl.constexpr, DOT_PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """x [M, K] (row stride stride_xm, unit column stride); w int8 [N, K], ws fp32 [N] or [N, n_groups]
    contiguous (GROUP = K / n_groups, a multiple of BLOCK_K); y [M, N] contiguous in x's dtype."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        q = tl.load(w_ptr + offs_n[:, None] * K + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        w = q.to(x.dtype)  # exact (|q| <= 128); scales are applied to the fp32 dot results
        if PER_GROUP:
            # This step lies in group k0 // GROUP: its dot times the group's scale.
            sw = tl.load(ws_ptr + offs_n * n_groups + k0 // GROUP, mask=n_ok, other=0.0)
            acc += tl.dot(x, tl.trans(w), input_precision=DOT_PREC) * sw[None, :]
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PREC)
    if not PER_GROUP:
        acc = acc * tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def config(mode: str, M: int, N: int, K: int, dtype, group: int | None = None) -> dict:
    """Tile sizes by mode and shape (group: the weight group size, which BLOCK_K must divide)."""
    f32 = dtype == torch.float32
    if interpreting():
        bm, bn, bk, warps, stages = 16, 32, 32, 4, 1
    elif mode == "w8a8":
        # int8 operands: twice the K per byte of shared memory of a 16-bit dot. 8 warps and BLOCK_K 64 for
        # large tiles: 4 warps or BLOCK_K 128 spilled kilobytes of registers (ptxas, COMPILE_REPORT.md).
        bm, bn, bk, warps, stages = (16, 64, 128, 4, 4) if M <= 16 else (64, 128, 128, 8, 3) if M <= 64 \
            else (128, 128, 64, 8, 3)
    # fp32 dots are IEEE on CUDA cores, both operands in registers: at 4 warps (and BLOCK_K 32 for M > 16)
    # they spilled 0.2-0.6 KB on sm_80/sm_90 (COMPILE_REPORT.md); 8 warps and BLOCK_K 16 do not.
    elif M <= 16:
        bm, bn, bk, warps, stages = (16, 64, 64, 8, 3) if f32 else (16, 64, 128, 4, 3)
    elif M <= 64:
        bm, bn, bk, warps, stages = (64, 64, 16, 8, 3) if f32 else (64, 64, 64, 4, 3)
    else:
        bm, bn, bk, warps, stages = (64, 64, 16, 8, 3) if f32 else (128, 128, 64, 8, 3)
    if group is not None:
        while group % bk:
            bk //= 2  # group is a multiple of MIN_GROUP_K[mode] (checked by the launcher)
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages,
            "DOT_PREC": dot_precision(dtype)}


def quantize_rows(x2: torch.Tensor):
    """x2 float [M, K] (unit column stride) -> (q int8 [M, K], scale fp32 [M]), quantize_rows_int8's rule."""
    M, K = x2.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x2.device)
    s = torch.empty((M,), dtype=torch.float32, device=x2.device)
    if M:
        quant_rows_kernel[(M,)](x2, q, s, K, x2.stride(0), BLOCK=min(QUANT_BLOCK, pow2(K, 16)),
                                num_warps=4)
    return q, s


def int8_linear(x, weight, weight_scale, bias, mode, out: torch.Tensor | None = None):
    """y [..., N] in x's dtype (contiguous); `out` is an optional contiguous [..., N] buffer (tests)."""
    N, K = weight.shape
    per_group = weight_scale.dim() == 2
    n_groups = weight_scale.shape[1] if per_group else 1
    G = K // n_groups if n_groups else K
    if per_group and G % MIN_GROUP_K[mode]:
        raise Unsupported(f"{mode} groups of {G} (the Triton kernel takes multiples of {MIN_GROUP_K[mode]})")
    if mode == "w8a8":
        if G > MAX_W8A8_K:
            raise Unsupported(f"w8a8 int32 sums over {G} > {MAX_W8A8_K} products could overflow")
    if K == 0:
        raise Unsupported("K == 0")
    M = math.prod(x.shape[:-1])
    x2 = x.reshape(M, K)  # [..., K] -> [M, K]; a view when rows are evenly strided
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = out if out is not None else torch.empty(x.shape[:-1] + (N,), dtype=x.dtype, device=x.device)
    y2 = y.view(M, N)  # [..., N] -> [M, N]
    if M == 0 or N == 0:
        return y
    w, ws = weight.contiguous(), weight_scale.contiguous()
    b = bias.contiguous() if bias is not None else ws  # any pointer when HAS_BIAS is off
    cfg = config(mode, M, N, K, x.dtype, G if per_group else None)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    common = dict(HAS_BIAS=bias is not None, PER_GROUP=per_group, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                  BLOCK_K=cfg["BLOCK_K"], GROUP_M=8, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if mode == "w8a8":
        xq, xs = quantize_rows(x2)
        w8a8_kernel[grid](xq, xs, w, ws, b, y2, M, N, K, n_groups, G, **common)
    else:
        w8a16_kernel[grid](x2, w, ws, b, y2, M, N, K, x2.stride(0), n_groups, G, DOT_PREC=cfg["DOT_PREC"],
                           **common)
    return y


def variants(cap: int, P: dict) -> list[dict]:
    """Every config `config` picks on a GPU: W8A8 and W8A16 at M 1/64/4096, per channel and per group."""
    from .variants import _v

    i8, f32, bf = torch.int8, torch.float32, torch.bfloat16
    out = [_v("int8 quant rows", quant_rows_kernel, {"x_ptr": P[bf], "q_ptr": P[i8], "s_ptr": P[f32],
                                                     "K": "i32", "stride_xm": "i32"}, {"BLOCK": QUANT_BLOCK},
            vals={"K": 4096, "stride_xm": 4096})]
    ints = {"M": "i32", "N": "i32", "K": "i32", "n_groups": "i32", "GROUP": "i32"}
    for M in (1, 64, 4096):
        for pg in (False, True):
            c = config("w8a8", M, 4096, 4096, bf, 32 if pg else None)
            lv = {"M": M, "N": 4096, "K": 4096, "n_groups": 128 if pg else 1, "GROUP": 32 if pg else 4096,
                  "stride_xm": 4096}
            out.append(_v(f"int8_linear w8a8 M={M} per_group={pg}", w8a8_kernel,
                          {"xq_ptr": P[i8], "xs_ptr": P[f32], "w_ptr": P[i8], "ws_ptr": P[f32], "b_ptr": P[bf],
                           "y_ptr": P[bf], **ints},
                          {"HAS_BIAS": True, "PER_GROUP": pg, "BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"],
                           "BLOCK_K": c["BLOCK_K"], "GROUP_M": 8}, c["num_warps"], c["num_stages"], vals=lv))
    for M in (1, 64, 4096):
        for dt in (bf, f32):
            for pg in (False, True):
                c = config("w8a16", M, 4096, 4096, dt, 32 if pg else None)
                lv = {"M": M, "N": 4096, "K": 4096, "n_groups": 128 if pg else 1, "GROUP": 32 if pg else 4096,
                      "stride_xm": 4096}
                out.append(_v(f"int8_linear w8a16 M={M} {TL_NAME[dt]} per_group={pg}", w8a16_kernel,
                              {"x_ptr": P[dt], "w_ptr": P[i8], "ws_ptr": P[f32], "b_ptr": P[dt], "y_ptr": P[dt],
                               **ints, "stride_xm": "i32"},
                              {"HAS_BIAS": True, "PER_GROUP": pg, "DOT_PREC": c["DOT_PREC"],
                               "BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"], "BLOCK_K": c["BLOCK_K"],
                               "GROUP_M": 8}, c["num_warps"], c["num_stages"], vals=lv))
    return out
