"""Triton prefill (flash) attention: online softmax in fp32 with exp2, GQA without K/V copies, causal
bottom-right, sliding window, softcap, batched or packed varlen (cu_seqlens), log-sum-exp output.

Semantics: llmkern/ops/attention.py. Grid (query blocks, B * Hq). Head dims 32..256 (multiples of 8)
are padded to the next power of two with masks (80 and 96 run as 128). Key blocks outside the
causal/window band are skipped by the loop bounds; only blocks that cut the band's edges (or end past k_len)
are masked per element.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import capability, dot_precision, interpreting, pow2, tanh_f32


@triton.jit
def _band_mask(s, offs_n, n_ok, q_pos, window_left, window_right):
    """s [BLOCK_M, BLOCK_N] with -inf where key offs_n [BLOCK_N] is past k_len (n_ok) or outside query q_pos's
    [BLOCK_M] band [q_pos - window_left, q_pos + window_right] (a negative limit: unbounded on that side).
    Rows past q_len (q loaded as 0) are computed but never stored: only keys are masked."""
    vis = n_ok[None, :] & ((window_right < 0) | (offs_n[None, :] <= q_pos[:, None] + window_right))
    vis = vis & ((window_left < 0) | (offs_n[None, :] >= q_pos[:, None] - window_left))
    return tl.where(vis, s, float("-inf"))


@triton.jit
def attn_fwd_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cuq_ptr, cuk_ptr,
                    Sq, Sk, Hq, D, GROUP,
                    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                    stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
                    sm_scale, softcap, window_left, window_right,
                    VARLEN: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN8: tl.constexpr):
    """q [B, Sq, Hq, D] / k, v [B, Sk, Hk, D] (or packed: batch strides 0, rows offset by cu_seqlens);
    unit stride along D. window_right is the right band limit (0 when causal, -1 unbounded).
    ALIGN8: the launcher checked that D and the q/k/v/out strides are multiples of 8."""
    if ALIGN8:
        # x // 8 * 8 == x here, and tells the compiler so: with D = 72..120 (not a multiple of 16, so the
        # JIT gives no divisibility hint) loads stay 16-byte vectors instead of one element each, which
        # spilled 80/64 B on sm_80 at D=120 (COMPILE_REPORT.md).
        D = D // 8 * 8
        stride_qb, stride_qs, stride_qh = stride_qb // 8 * 8, stride_qs // 8 * 8, stride_qh // 8 * 8
        stride_kb, stride_ks, stride_kh = stride_kb // 8 * 8, stride_ks // 8 * 8, stride_kh // 8 * 8
        stride_vb, stride_vs, stride_vh = stride_vb // 8 * 8, stride_vs // 8 * 8, stride_vh // 8 * 8
        stride_ob, stride_os, stride_oh = stride_ob // 8 * 8, stride_os // 8 * 8, stride_oh // 8 * 8
    # Within a head, the heaviest query blocks (most keys when causal) launch first, so the grid's last wave
    # holds the lightest ones (as the CUDA kernel's order, with this launch order's K/V locality kept).
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    kvh = h // GROUP
    if VARLEN:
        q0 = tl.load(cuq_ptr + b)
        q_len = tl.load(cuq_ptr + b + 1) - q0
        k0 = tl.load(cuk_ptr + b)
        k_len = tl.load(cuk_ptr + b + 1) - k0
    else:
        q0 = pid_m * 0  # int32 scalars, as in the varlen branch
        q_len = Sq
        k0 = pid_m * 0
        k_len = Sk
    m0 = pid_m * BLOCK_M
    if m0 < q_len:  # varlen grids are sized for the longest possible sequence
        b64 = b.to(tl.int64)
        # Scalar int64 bases (batch, head, first row of the tile) plus int32 offsets inside a tile: no
        # [rows, D] int64 offset tensors, and the K/V offsets are loop invariant (registers, COMPILE_REPORT.md).
        rows = tl.arange(0, BLOCK_M)
        offs_m = m0 + rows
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < q_len
        d_ok = offs_d < D
        row_q = (q0 + m0).to(tl.int64)
        q = tl.load(q_ptr + (b64 * stride_qb + row_q * stride_qs + h * stride_qh)
                    + (rows[:, None] * stride_qs + offs_d[None, :]), mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        diag = k_len - q_len  # bottom-right alignment: query i sits at key position i + diag
        q_pos = offs_m + diag
        lo = m0 * 0  # an int32 scalar on both branches (no loop-carried type change)
        if window_left >= 0:
            lo = tl.maximum(m0 + diag - window_left, 0) // BLOCK_N * BLOCK_N
        hi = k_len
        if window_right >= 0:
            hi = tl.minimum(k_len, m0 + BLOCK_M + diag + window_right)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        qk_scale = sm_scale * 1.4426950408889634  # exp(x) = exp2(x * log2 e)
        cols = tl.arange(0, BLOCK_N)
        k_off = cols[:, None] * stride_ks + offs_d[None, :]
        v_off = cols[:, None] * stride_vs + offs_d[None, :]
        # Pointers to key/value row lo, advanced by BLOCK_N rows per step.
        k_blk = k_ptr + (b64 * stride_kb + (k0 + lo).to(tl.int64) * stride_ks + kvh * stride_kh)
        v_blk = v_ptr + (b64 * stride_vb + (k0 + lo).to(tl.int64) * stride_vs + kvh * stride_vh)
        # Key blocks [mid_lo, mid_hi) lie inside every row's band and below k_len: they skip the per-element
        # mask (on a causal S x S call all but the diagonal blocks; by instruction count the mask's compares and
        # selects are a sizeable share of the softmax's non-MMA work; GPU speed unmeasured). lo is a multiple of BLOCK_N, and so are mid_lo and mid_hi
        # whenever the middle run is not empty. (One loop with a uniform branch, not three loops: three
        # pipelined copies took the sm_80 tile past 255 registers.)
        mid_lo = lo
        if window_left >= 0:
            # the tile's last row sees keys from its q_pos - window_left on; every row does from there
            mid_lo = tl.maximum(lo, (tl.maximum(m0 + BLOCK_M - 1 + diag - window_left, 0) + BLOCK_N - 1)
                                // BLOCK_N * BLOCK_N)
        all_end = k_len  # keys [.., all_end) are seen by every row of the tile (right side)
        if window_right >= 0:
            all_end = tl.minimum(k_len, m0 + diag + window_right + 1)  # the tile's first row's band end
        mid_hi = tl.maximum(all_end, 0) // BLOCK_N * BLOCK_N
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + cols
            n_ok = offs_n < k_len
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_blk + k_off, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_N] fp32
            if SOFTCAP:
                s = softcap * tanh_f32(s * (sm_scale / softcap)) * 1.4426950408889634
            else:
                s = s * qk_scale
            if DOT_PREC == "ieee":
                # fp32 (dots on CUDA cores, which dwarf the mask): every block masked, one copy of the step
                # (the branch's second copy spilled on sm_80, COMPILE_REPORT.md)
                s = _band_mask(s, offs_n, n_ok, q_pos, window_left, window_right)
            elif (n0 < mid_lo) | (n0 >= mid_hi):
                s = _band_mask(s, offs_n, n_ok, q_pos, window_left, window_right)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: exp2 stays finite
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_blk + v_off, mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new
            k_blk += BLOCK_N * stride_ks
            v_blk += BLOCK_N * stride_vs
        seen = l_i > 0
        o = acc / tl.where(seen, l_i, 1.0)[:, None]  # a row that sees no key: 0
        tl.store(out_ptr + (b64 * stride_ob + row_q * stride_os + h * stride_oh)
                 + (rows[:, None] * stride_os + offs_d[None, :]),
                 o.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
        # Natural-log lse of the scaled (capped) scores: (m + log2 l) * ln 2.
        lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(lse_ptr + (b64 * stride_lb + h * stride_lh + row_q) + rows, lse, mask=m_ok)

def config(D: int, dtype: torch.dtype, cap: int) -> dict:
    """Tiles by head dim, dtype and GPU generation; sized so K/V stages fit shared memory (COMPILE_REPORT.md)."""
    bd = pow2(D, 16)
    if interpreting():
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": bd, "num_warps": 4, "num_stages": 1}
    # 4 warps and 64-key blocks at D=256 spilled (COMPILE_REPORT.md): 8 warps everywhere, 32 keys at D=256.
    if dtype == torch.float32:
        # IEEE fp32 dots run on CUDA cores with both operands in registers: 64x32 tiles spilled 1-17 KB on
        # sm_90 (64x16 still 0.5-11 KB with varlen + softcap); 32x16 tiles at 8 warps do not (on sm_80 with
        # 3 stages: 2 stages left 16 B with varlen + softcap; ptxas is erratic on these FMA loops).
        return {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_D": bd, "num_warps": 8, "num_stages": 3 if cap < 90 else 2}
    if bd <= 128:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": bd, "num_warps": 8, "num_stages": 3 if cap >= 90 else 2}
    return {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_D": bd, "num_warps": 8, "num_stages": 2}


class Unsupported(Exception):
    """An input these kernels do not take (the op adapter turns it into BackendUnsupported)."""


def attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, window_left, window_right, softcap,
              max_seqlen_q: int = 0):
    """Returns (out contiguous like q, lse float32 [B, Hq, Sq] or [Hq, Tq]). max_seqlen_q (packed): the longest
    query sequence if known (> 0), which bounds the grid's query tiles (else Tq)."""
    D, Hq, Hk = q.shape[-1], q.shape[-2], k.shape[-2]
    varlen = q.dim() == 3
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if varlen:
        Tq = q.shape[0]
        B = cu_seqlens_q.shape[0] - 1
        # Rows past cu_seqlens_q[-1] belong to no sequence: out 0, lse -inf (no program writes them).
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.full((Hq, Tq), -math.inf, dtype=torch.float32, device=q.device)
        # grid bound (no host sync on cu_seqlens here; the caller may know the longest sequence)
        Sq, Sk = min(Tq, max_seqlen_q) if max_seqlen_q > 0 else Tq, k.shape[0]
        sq_ = (0, q.stride(0), q.stride(1))
        sk_ = (0, k.stride(0), k.stride(1))
        sv_ = (0, v.stride(0), v.stride(1))
        so_ = (0, out.stride(0), out.stride(1))
        sl_ = (0, lse.stride(0))
        cuq, cuk = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()  # (read at b, b + 1)
    else:
        B, Sq = q.shape[0], q.shape[1]
        Sk = k.shape[1]
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
        sq_, sk_, sv_ = q.stride()[:3], k.stride()[:3], v.stride()[:3]
        so_ = out.stride()[:3]
        sl_ = (lse.stride(0), lse.stride(1))
        cuq = cuk = lse  # unused
    if B == 0 or Sq == 0 or Hq == 0:
        return out, lse
    cfg = config(D, q.dtype, capability(q))
    right = 0 if causal else int(window_right)
    left = int(window_left)
    # Bands at least as wide as the sequences are unbounded in effect: -1, so that the kernel's int32 band
    # arithmetic (q_pos + window_right, m0 + diag - window_left) cannot wrap for windows near 2^31 - 1.
    q_total, k_total = (q.shape[0], k.shape[0]) if varlen else (Sq, Sk)
    if left >= k_total:
        left = -1
    if right >= q_total:
        right = -1
    sc = float(scale) if scale is not None else D ** -0.5
    # (query blocks, heads, sequences): CUDA grids allow 65535 along y and z; in launch order, the query blocks
    # of one head (the last, heaviest, first), then the heads of one sequence (a KV head's group side by side:
    # its K/V stay in L2).
    grid = (triton.cdiv(Sq, cfg["BLOCK_M"]), Hq, B)
    if Hq > 65535 or B > 65535:
        raise Unsupported(f"{B} sequences x {Hq} heads: the grid allows 65535 of each")
    align8 = D % 8 == 0 and all(x % 8 == 0 for x in (*sq_, *sk_, *sv_, *so_))
    attn_fwd_kernel[grid](
        q, k, v, out, lse, cuq, cuk, Sq, Sk, Hq, D, Hq // Hk, *sq_, *sk_, *sv_, *so_, *sl_,
        sc, float(softcap), left, right,
        VARLEN=varlen, SOFTCAP=softcap > 0, DOT_PREC=dot_precision(q.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], ALIGN8=align8,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out, lse
