"""`attention`: softmax(q k^T * scale) v over whole sequences (prefill), batched or packed varlen.

Semantics (DESIGN.md, FlashAttention conventions):
- batched: q [B, Sq, Hq, D], k/v [B, Sk, Hk, D]; packed: q [Tq, Hq, D], k/v [Tk, Hk, D] with
  cu_seqlens_q/k int32 [B + 1] (sequence b is rows cu[b]:cu[b+1]).
- Hq % Hk == 0: query head h reads key/value head h // (Hq // Hk) (GQA/MQA).
- Masks are aligned bottom-right: query i of a sequence sees key j iff
  j <= i + (Sk - Sq) + window_right (when causal, window_right is 0) and
  j >= i + (Sk - Sq) - window_left (when window_left >= 0). window_* = -1 means unbounded.
- softcap > 0: scores = softcap * tanh(scores / softcap), applied after scaling, before masking.
- Softmax and accumulation in fp32; output in q's dtype. A query row that sees no key gets output 0
  and log-sum-exp -inf.
- Returns (out like q, lse float32): lse is [B, Hq, Sq] batched and [Hq, Tq] packed, the natural log of
  the softmax denominator of the (scaled, capped) scores.
"""
from __future__ import annotations

import os
import threading

import torch

from .. import _backends, reference
from . import _checks as C
from ._registry import BackendUnsupported, defop

def _check(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, window_left, window_right, softcap):
    op = "attention"
    C.tensor(op, "q", q, ranks=(3, 4), dtypes=C.FLOAT_DTYPES)
    C.tensor(op, "k", k, ranks=(q.dim(),), dtypes=C.FLOAT_DTYPES)
    C.tensor(op, "v", v, ranks=(q.dim(),), dtypes=C.FLOAT_DTYPES)
    C.same_dtype(op, q=q, k=k, v=v)
    C.same_device(op, q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    D = q.shape[-1]
    C.head_dim(op, "q", D)
    C.shape(op, "v", v, tuple(k.shape), "same as k")
    if k.shape[-1] != D:
        raise ValueError(f"llmkern.{op}: k must have q's head dim {D}, got {k.shape[-1]}")
    Hq, Hk = q.shape[-2], k.shape[-2]
    if Hk == 0 or Hq % Hk != 0:
        raise ValueError(f"llmkern.{op}: q heads ({Hq}) must be a multiple of k/v heads ({Hk})"
                         + (", which must be at least 1" if Hk == 0 else ""))
    packed = q.dim() == 3
    if packed:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError(f"llmkern.{op}: packed q [T, H, D] needs cu_seqlens_q and cu_seqlens_k")
        C.tensor(op, "cu_seqlens_q", cu_seqlens_q, ranks=(1,), dtypes=(torch.int32,))
        C.tensor(op, "cu_seqlens_k", cu_seqlens_k, ranks=(1,), dtypes=(torch.int32,))
        C.shape(op, "cu_seqlens_k", cu_seqlens_k, tuple(cu_seqlens_q.shape), "same as cu_seqlens_q")
        if cu_seqlens_q.shape[0] < 2:
            raise ValueError(f"llmkern.{op}: cu_seqlens_q must have B + 1 >= 2 entries, got {cu_seqlens_q.shape[0]}")
        for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]), ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
            if C.can_read_values(cu):
                c = cu.tolist()
                C.value(op, c[0] == 0 and all(a <= b for a, b in zip(c, c[1:])),
                        f"{name} must start at 0 and never decrease, got {c}")
                C.value(op, c[-1] <= total, f"{name} ends at {c[-1]} but the packed tensor has {total} rows")
    else:
        if cu_seqlens_q is not None or cu_seqlens_k is not None:
            raise ValueError(f"llmkern.{op}: cu_seqlens_q/k are only for packed [T, H, D] inputs")
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"llmkern.{op}: k batch ({k.shape[0]}) must equal q batch ({q.shape[0]})")
    C.bool_arg(op, "causal", causal)
    C.attn_scalars(op, scale, softcap, window_left, window_right)


def _fake(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, window_left, window_right, softcap):
    if q.dim() == 4:
        B, Sq, Hq, _ = q.shape
        lse = q.new_empty((B, Hq, Sq), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return q.new_empty(q.shape), lse


attention_op = defop(
    "attention",
    "(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, "
    "float? scale=None, bool causal=False, int window_left=-1, int window_right=-1, float softcap=0.0, "
    "str? backend=None) -> (Tensor, Tensor)",
    check=_check,
    fake=_fake,
)
attention_op.backend("reference")(reference.attention)


@attention_op.backend("triton")
def _triton(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, window_left, window_right, softcap):
    """Triton flash kernel on CUDA tensors (llmkern.triton_kernels imported lazily: it needs triton)."""
    from ..triton_kernels import attention as tk

    if q.device.type != "cuda":
        raise BackendUnsupported(f"triton runs on CUDA tensors, q is on {q.device}")
    try:
        return tk.attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, window_left, window_right, softcap,
                            max_seqlen_q=_max_seqlen(cu_seqlens_q) if q.dim() == 3 else 0)
    except tk.Unsupported as e:
        raise BackendUnsupported(str(e)) from None


_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@attention_op.backend("cpu")
def _cpu(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, window_left, window_right, softcap):
    """Flash kernel of llmkern._C on raw pointers and element strides; torch allocates out and lse."""
    mod = _backends.cpu_module()
    if not q.is_cpu:  # (is_cpu: no torch.device object built, ~0.2 us)
        raise BackendUnsupported(f"q is on {q.device}")
    D = q.shape[-1]
    if D % 8 or not 8 <= D <= 256:
        raise BackendUnsupported(f"head dim {D} is not a multiple of 8 in [8, 256]")
    # The kernel reads D contiguous elements per (token, head); other strides are free.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty(q.shape, dtype=q.dtype)
    packed = q.dim() == 3
    if packed:
        Tq, Hq = q.shape[0], q.shape[1]
        Tk, Hk = k.shape[0], k.shape[1]
        cu_q, cu_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
        B, Sq, Sk = cu_q.shape[0] - 1, 0, 0
        lse = torch.empty((Hq, Tq), dtype=torch.float32)
        # [T, H, D] strides as (batch unused, token, head).
        qs, ks, vs = ([0, t.stride(0), t.stride(1)] for t in (q, k, v))
        cu_ptrs = (cu_q.data_ptr(), cu_k.data_ptr())
    else:
        B, Sq, Hq, _ = q.shape
        Sk, Hk = k.shape[1], k.shape[2]
        Tq = Tk = 0
        lse = torch.empty((B, Hq, Sq), dtype=torch.float32)
        qs, ks, vs = (list(t.stride()[:3]) for t in (q, k, v))
        cu_ptrs = (0, 0)
    if out.numel():
        args = (_DTYPE_CODE[q.dtype], q.data_ptr(), k.data_ptr(), v.data_ptr(), qs, ks, vs, B, Sq, Sk, Hq, Hk, D,
                cu_ptrs[0], cu_ptrs[1], Tq, Tk, D ** -0.5 if scale is None else float(scale), bool(causal),
                int(window_left), int(window_right), float(softcap), out.data_ptr(), lse.data_ptr())
        threads, isa = torch.get_num_threads(), _backends.cpu_isa()
        ws = _WORKSPACE.tensor
        ws_bytes = 0 if ws is None else ws.numel()
        need = mod.attention(*args, 0 if ws is None else ws.data_ptr(), ws_bytes, threads, isa)
        if need:  # the kept workspace is too small: make one that fits and run again
            ws = torch.empty(need, dtype=torch.uint8)
            _WORKSPACE.tensor = ws if need <= _KEEP_BYTES else None
            if mod.attention(*args, ws.data_ptr(), need, threads, isa):
                raise RuntimeError("llmkern.attention: the CPU kernel's workspace size changed between calls")
    if packed:
        # Rows past cu_seqlens_q[-1] belong to no sequence: they see no key (out 0, lse -inf).
        end = int(cu_q[-1])
        out[end:] = 0
        lse[:, end:] = float("-inf")
    return out, lse


@attention_op.backend("cuda")
def _cuda(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, window_left, window_right, softcap):
    """Tensor-core flash kernel of llmkern._C_cuda (fp16/bf16, head dims 64 and 128); torch allocates
    out and lse. Anything else (fp32, other head dims, D not contiguous, strides the 16-byte copies
    cannot take) raises BackendUnsupported and the op runs Triton."""
    if q.device.type != "cuda":
        raise BackendUnsupported(f"q is on {q.device}")
    # (q's GPU is the current one: the registry switches to it, `_registry._other_gpu`)
    return _cuda_launch(_backends.cuda_module(), _backends.cuda_stream(q.device), q, k, v,
                        cu_seqlens_q, cu_seqlens_k, scale, causal, window_left, window_right, softcap)


def _max_seqlen(cu_seqlens) -> int:
    """The longest sequence of cu_seqlens [B + 1], or 0 where its values are not to be read (GPU value checks
    off, graph capture, compile): a packed launch's grid bound. (On a GPU a device-to-host read, like the op's
    own check of cu_seqlens just before.)"""
    if cu_seqlens.shape[0] < 2 or not C.can_read_values(cu_seqlens):
        return 0
    return max(0, int((cu_seqlens[1:] - cu_seqlens[:-1]).max()))


def _cuda_launch(mod, stream, q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, window_left, window_right,
                 softcap):
    """The cuda adapter's body on q's device (also driven on CPU tensors by an emulator of the kernel)."""
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise BackendUnsupported(f"the CUDA kernel takes float16/bfloat16, got {q.dtype}")
    D = q.shape[-1]
    if D not in (64, 128):
        raise BackendUnsupported(f"the CUDA kernel is built for head dims 64 and 128, got {D}")
    packed = q.dim() == 3
    strides = []
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise BackendUnsupported(f"{name} is not contiguous along the head dim (stride {t.stride(-1)})")
        # (batch, token, head) element strides; a dim of size 1 is never stepped over (stride 0).
        dims = ([None] if packed else [0]) + list(range(t.dim() - 3 if packed else 1, t.dim() - 1))
        s = [0 if d is None or t.shape[d] == 1 else t.stride(d) for d in dims]
        if t.numel() and (t.data_ptr() % 16 or any(x % 8 for x in s)):
            raise BackendUnsupported(f"{name}'s pointer or strides {tuple(t.stride())} are not 16-byte aligned")
        strides.append(s)
    if packed:
        Tq, Hq = q.shape[0], q.shape[1]
        Tk, Hk = k.shape[0], k.shape[1]
        # Sq: the longest query sequence when its lengths can be read here (0: unknown), which bounds the grid's
        # query tiles; else every sequence gets tiles for all Tq rows, mostly empty CTAs for many sequences.
        B, Sq, Sk = cu_seqlens_q.shape[0] - 1, _max_seqlen(cu_seqlens_q), 0
        # Rows past cu_seqlens_q[-1] belong to no sequence (out 0, lse -inf): the kernel never writes them.
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.full((Hq, Tq), float("-inf"), dtype=torch.float32, device=q.device)
        cu_q, cu_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
        cu_ptrs = (cu_q.data_ptr(), cu_k.data_ptr())
    else:
        B, Sq, Hq, _ = q.shape
        Sk, Hk = k.shape[1], k.shape[2]
        Tq = Tk = 0
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
        cu_ptrs = (0, 0)
    if out.numel() == 0:
        return out, lse
    # Grid limits: query tiles (64 rows at least) in grid.y <= 65535, B * Hq blocks in grid.x < 2^31;
    # the kernel's per-sequence index math is 32-bit (keys < 2^30).
    if (Tq if packed else Sq) > 65535 * 64 or B * Hq >= 2**31 or max(Sk, Tk) >= 2**30:
        raise BackendUnsupported(f"{Tq if packed else Sq} query rows x {B * Hq} heads, {max(Sk, Tk)} keys exceed "
                                 "the kernel's grid or 32-bit index range")
    global _last_cuda_kernel
    sm90 = mod.attention(_DTYPE_CODE[q.dtype], q.data_ptr(), k.data_ptr(), v.data_ptr(), *strides, B, Sq, Sk, Hq, Hk,
                         D, cu_ptrs[0], cu_ptrs[1], Tq, Tk, D ** -0.5 if scale is None else float(scale), bool(causal),
                         int(window_left), int(window_right), float(softcap), out.data_ptr(), lse.data_ptr(), stream,
                         _CUDA_WIDE, _CUDA_WGMMA, _CUDA_OVERLAP)
    _last_cuda_kernel = "sm90" if sm90 else "sm80"
    return out, lse


# LLMKERN_CUDA_ATTN_WIDE=1: head dim 128 runs 128-row query tiles (8 warps) instead of 64 (4 warps);
# a tuning switch for GPU sessions (read once, at import).
_CUDA_WIDE = os.environ.get("LLMKERN_CUDA_ATTN_WIDE", "") == "1"
# LLMKERN_CUDA_ATTN_WGMMA=1: on a compute-capability-9.0 GPU (H100/H200) run the sm_90a kernel (TMA, warpgroup
# MMA, a producer warp and two consumer warpgroups; csrc/include/llmkern/cuda/attention_sm90.cuh) instead of
# the sm_80 one. Off by default until a GPU run has checked it (docs/notes/cuda-attn-sm90.md); elsewhere the
# launcher runs the sm_80 kernel. Read once, at import.
_CUDA_WGMMA = os.environ.get("LLMKERN_CUDA_ATTN_WGMMA", "") == "1"
# LLMKERN_CUDA_ATTN_OVERLAP=1 (with the above): the sm_90a kernel's variant with
# FlashAttention-3's intra-warpgroup overlap (the softmax of one key tile while the tensor cores compute the
# next); for the first GPU run to compare. Read once, at import.
_CUDA_OVERLAP = os.environ.get("LLMKERN_CUDA_ATTN_OVERLAP", "") == "1"
# Which CUDA kernel the last call ran ("sm80" or "sm90"), for tests and benchmarks.
_last_cuda_kernel = None


class _Workspace(threading.local):
    """The CPU kernel's scratch (packed K/V tiles), kept per calling thread and reused call after call:
    fresh pages for every layer's prefill would cost faults and zeroing (~20% of a long MHA call)."""
    tensor = None


_WORKSPACE = _Workspace()
_KEEP_BYTES = 256 << 20  # larger scratch is freed after its call


def attention(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, scale=None, causal=False,
              window_left=-1, window_right=-1, softcap=0.0, return_lse=False, backend=None):
    """Fused attention; returns out (like q), or (out, lse) with `return_lse=True`. See module doc."""
    out, lse = attention_op(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal,
                            window_left, window_right, softcap, backend)
    return (out, lse) if return_lse else out
