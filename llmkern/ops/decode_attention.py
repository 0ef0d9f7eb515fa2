"""`decode_attention`: each sequence's newest token(s) attend over that sequence's cached keys/values.

Inputs:
- q [B, Hq, D] (one new token per sequence) or [B, Sq, Hq, D] (Sq new tokens, causal among them).
- caches, contiguous: k_cache/v_cache [B, Smax, Hk, D]; paged (block_table given):
  [num_blocks, block_size, Hk, D] with block_table int32 [B, max_blocks]; token j of sequence b lives in
  block block_table[b, j // block_size] at offset j % block_size.
- seq_lens int32 [B]: cached tokens of each sequence, *including* the new ones (append first).
  New query t (0..Sq-1) sits at position seq_lens[b] - Sq + t and sees keys j <= that position
  (and j >= position - window_left when window_left >= 0).
- int8 caches: k_cache/v_cache int8 with k_scale/v_scale float32 of the cache's shape without D
  ([B, Smax, Hk] or [num_blocks, block_size, Hk]); the cached value is q * scale. With a bf16 / fp16 q the
  CPU backend's AVX-512 VNNI and AVX2 kernels multiply in int16 (q per row, softmax weights per 32 keys:
  2^-16 of the largest, below the 16-bit output's rounding; CPU_I16_DOT below), unless a q row of the sequence
  has most of its values below 2^-7 of its largest (an outlier channel): that sequence, and an fp32 q, in fp32.
- Float caches have q's dtype. Softmax in fp32; output in q's dtype and q's shape. A sequence with no
  visible key (seq_lens 0) gets output 0.
"""
from __future__ import annotations

import functools
import math
import os
import threading

import torch

from .. import _backends
from .. import reference
from . import _checks as C
from ._registry import BackendUnsupported, defop, needs_grad

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _values_ok_cpu(seq_lens, block_table, k_cache, B, Sq, capacity) -> bool:
    """The value checks below in C++ on contiguous CPU tensors (~0.5 us instead of up to ~25 us of torch
    ops for a block table); False means "not checked here or not valid": the Python checks then run and
    raise with their message."""
    mod = _backends.cpu_module()
    if mod is None or not seq_lens.is_cpu or not seq_lens.is_contiguous():
        return False
    if block_table is None:
        return mod.decode_attention_values_ok(seq_lens.data_ptr(), B, Sq, capacity, 0, 0, 0, 0)
    if not block_table.is_cpu or block_table.stride(-1) != 1:
        return False
    return mod.decode_attention_values_ok(seq_lens.data_ptr(), B, Sq, capacity, block_table.data_ptr(),
                                          block_table.stride(0), k_cache.shape[1], k_cache.shape[0])


_FLOATS = C.FLOAT_SET


def _cpu_fast_ok(q, k_cache, v_cache, seq_lens, block_table, k_scale, v_scale, scale, softcap, window_left) -> bool:
    """Everything _check verifies, on plain CPU tensors that autograd does not track, in ~1.5 us instead
    of ~6 (plus the value checks): one decode call per layer and step. True only when every check
    passes; otherwise _check's own code runs and raises with its message. Each tensor attribute is read
    once (shape tuples, not calls). Also the op's `fast_check` (see defop)."""
    T = torch.Tensor
    if not (type(q) is T and type(k_cache) is T and type(v_cache) is T and type(seq_lens) is T
            and q.is_cpu and k_cache.is_cpu and v_cache.is_cpu and seq_lens.is_cpu):
        return False
    if needs_grad(q, k_cache, v_cache, k_scale, v_scale):
        return False
    qs, cs, kd = q.shape, k_cache.shape, k_cache.dtype
    nq = len(qs)
    if not ((nq == 3 or nq == 4) and len(cs) == 4 and v_cache.dtype == kd and v_cache.shape == cs):
        return False
    B, Hq, D, Hk = qs[0], qs[-2], qs[-1], cs[2]
    if not (32 <= D <= 256 and D % 8 == 0 and cs[3] == D and Hk > 0 and Hq % Hk == 0
            and seq_lens.dtype == torch.int32 and seq_lens.shape == (B,)):
        return False
    if kd == torch.int8:
        if q.dtype not in _FLOATS:
            return False
        for s in (k_scale, v_scale):
            if not (type(s) is T and s.is_cpu and s.dtype == torch.float32 and s.shape == cs[:3]):
                return False
    elif kd != q.dtype or kd not in _FLOATS or k_scale is not None or v_scale is not None:
        return False
    if block_table is None:
        if cs[0] != B:
            return False
        capacity = cs[1]
    else:
        if not (type(block_table) is T and block_table.is_cpu and block_table.dtype == torch.int32
                and block_table.dim() == 2 and block_table.shape[0] == B and 1 <= cs[1] <= 256):
            return False
        capacity = block_table.shape[1] * cs[1]
    if not C.attn_scalars_ok(scale, softcap, window_left):
        return False
    return B == 0 or _values_ok_cpu(seq_lens, block_table, k_cache, B, 1 if nq == 3 else qs[1], capacity)


def _check(q, k_cache, v_cache, seq_lens, block_table, k_scale, v_scale, scale, softcap, window_left):
    op = "decode_attention"
    if _cpu_fast_ok(q, k_cache, v_cache, seq_lens, block_table, k_scale, v_scale, scale, softcap, window_left):
        return
    C.tensor(op, "q", q, ranks=(3, 4), dtypes=C.FLOAT_DTYPES)
    C.tensor(op, "k_cache", k_cache, ranks=(4,), dtypes=C.FLOAT_DTYPES + (torch.int8,))
    C.tensor(op, "v_cache", v_cache, ranks=(4,), dtypes=(k_cache.dtype,))
    C.shape(op, "v_cache", v_cache, tuple(k_cache.shape), "same as k_cache")
    C.tensor(op, "seq_lens", seq_lens, ranks=(1,), dtypes=(torch.int32,))
    C.same_device(op, q=q, k_cache=k_cache, v_cache=v_cache, seq_lens=seq_lens, block_table=block_table,
                  k_scale=k_scale, v_scale=v_scale)
    B, D, Hq = q.shape[0], q.shape[-1], q.shape[-2]
    Sq = 1 if q.dim() == 3 else q.shape[1]
    C.head_dim(op, "q", D)
    Hk = k_cache.shape[2]
    if k_cache.shape[3] != D:
        raise ValueError(f"llmkern.{op}: k_cache head dim must be q's ({D}), got {k_cache.shape[3]}")
    if Hk == 0 or Hq % Hk:
        raise ValueError(f"llmkern.{op}: q heads ({Hq}) must be a multiple of cache heads ({Hk})")
    C.shape(op, "seq_lens", seq_lens, (B,), "one length per sequence of q")
    int8 = k_cache.dtype == torch.int8
    if int8:
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            if s is None:
                raise ValueError(f"llmkern.{op}: an int8 cache needs {name} (float32 {list(k_cache.shape[:3])})")
            C.tensor(op, name, s, dtypes=(torch.float32,))
            C.shape(op, name, s, tuple(k_cache.shape[:3]), "the cache's shape without D")
    else:
        if k_cache.dtype != q.dtype:
            raise TypeError(f"llmkern.{op}: a float k_cache must have q's dtype {q.dtype}, got {k_cache.dtype}")
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"llmkern.{op}: k_scale/v_scale are only for int8 caches, cache is {k_cache.dtype}")
    if block_table is None:
        if k_cache.shape[0] != B:
            raise ValueError(f"llmkern.{op}: contiguous k_cache batch ({k_cache.shape[0]}) must equal q batch ({B})")
        capacity = k_cache.shape[1]
    else:
        C.tensor(op, "block_table", block_table, ranks=(2,), dtypes=(torch.int32,))
        C.shape(op, "block_table", block_table, (B, None), "[B, max_blocks]")
        if not 1 <= k_cache.shape[1] <= 256:
            raise ValueError(f"llmkern.{op}: a paged k_cache's block size (dim 1 of [num_blocks, block_size, Hk, D]) "
                             f"must be in 1..256, got {k_cache.shape[1]}")
        capacity = block_table.shape[1] * k_cache.shape[1]
    if C.can_read_values(seq_lens) and B and not _values_ok_cpu(seq_lens, block_table, k_cache, B, Sq, capacity):
        lens = seq_lens.tolist()
        bad = [(b, n) for b, n in enumerate(lens) if not (0 <= n <= capacity) or (n and n < Sq)]
        C.value(op, not bad, f"seq_lens must be in {Sq if Sq > 1 else 0}..{capacity} (the cache's capacity "
                f"per sequence) and at least Sq={Sq} when non-zero; got (batch, length) {bad[:4]}")
        if block_table is not None and C.can_read_values(block_table):
            nb, bs = k_cache.shape[0], k_cache.shape[1]
            # [B, max_blocks] mask of the entries that the sequences' lengths actually use.
            n_used = (seq_lens.to(torch.int64) + bs - 1) // bs
            used = torch.arange(block_table.shape[1], device=block_table.device)[None, :] < n_used[:, None]
            bad_entry = used & ((block_table < 0) | (block_table >= nb))
            if bool(bad_entry.any()):
                b = int(bad_entry.any(dim=1).nonzero()[0])
                raise ValueError(f"llmkern.{op}: block_table row {b} points outside the cache "
                                 f"(blocks 0..{nb - 1}): {block_table[b, : int(n_used[b])].tolist()}")
    C.attn_scalars(op, scale, softcap, window_left)


def _fake(q, k_cache, v_cache, seq_lens, block_table, k_scale, v_scale, scale, softcap, window_left):
    return q.new_empty(q.shape)


decode_attention_op = defop(
    "decode_attention",
    "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seq_lens, Tensor? block_table=None, "
    "Tensor? k_scale=None, Tensor? v_scale=None, float? scale=None, float softcap=0.0, int window_left=-1, "
    "str? backend=None) -> Tensor",
    check=_check,
    fake=_fake,
    fast_check=_cpu_fast_ok,
)
decode_attention_op.backend("reference")(reference.decode_attention)


@decode_attention_op.backend("triton")
def _triton(q, k_cache, v_cache, seq_lens, block_table, k_scale, v_scale, scale, softcap, window_left):
    """Triton split-KV kernel on CUDA tensors (llmkern.triton_kernels imported lazily: it needs triton)."""
    from ..triton_kernels import decode_attention as tk

    if q.device.type != "cuda":
        raise BackendUnsupported(f"triton runs on CUDA tensors, q is on {q.device}")
    try:
        return tk.decode_attention(q, k_cache, v_cache, seq_lens, block_table, k_scale, v_scale, scale,
                                   softcap, window_left)
    except tk.Unsupported as e:
        raise BackendUnsupported(str(e)) from None


_WS_SIZES: dict = {}
_WS = threading.local()
# True: an int8 cache with a bf16 / fp16 q takes int16 dot products on the AVX-512 VNNI and AVX2 paths (q quantized
# per row and the softmax weights per tile of 32 keys to int16: 2^-16 of their largest; a sequence with a q row
# that int16 holds coarsely, most values below 2^-7 of the largest, takes the fp32 path: detail::q16_fine in
# csrc/include/llmkern/cpu/decode_attention.h). False: fp32 FMAs on the converted values, as for an fp32 q.
# A switch for A/B timing (bench entries llmkern.cpu.int8.fp32dot); read per call.
CPU_I16_DOT = True


def _workspace(mod, B, Sq, Hq, Hk, D, capacity, threads):
    """(bytes, uint8 tensor of at least that many bytes): a per-thread buffer grown on demand, so that a
    decode step does not allocate (and page-fault) a workspace per layer; sizes cached per shape."""
    key = (mod, B, Sq, Hq, Hk, D, capacity, threads)
    n = _WS_SIZES.get(key)
    if n is None:
        if len(_WS_SIZES) > 256:
            _WS_SIZES.clear()
        n = _WS_SIZES[key] = mod.decode_attention_workspace_size(B, Sq, Hq, Hk, D, capacity, threads)
    buf = getattr(_WS, "buf", None)
    if buf is None or buf.numel() < n:
        buf = _WS.buf = torch.empty(max(n, 1 << 16), dtype=torch.uint8)
    return n, buf


_CONTIG = torch.contiguous_format


@decode_attention_op.backend("cpu")
def _cpu(q, k_cache, v_cache, seq_lens, block_table, k_scale, v_scale, scale, softcap, window_left):
    """Launch the C++ kernel on raw pointers and element strides; torch allocates out and the workspace.

    Called once per layer and step: every line is on the eager decode path, so it reads each tensor
    attribute once (tuples, not repeated calls) and builds no intermediate views (~2.5 us here).
    """
    if not q.is_cpu:
        raise BackendUnsupported(f"q is on {q.device}")
    if k_cache.numel() == 0 or q.numel() == 0:  # (no data to point at: the reference gives the empty / zero result)
        raise BackendUnsupported("an empty cache or q")
    k_str, v_str = k_cache.stride(), v_cache.stride()
    if k_str[3] != 1 or v_str[3] != 1:
        raise BackendUnsupported("cache head dim is not contiguous (copying the cache would cost more than attention)")
    q_str = q.stride()
    if q_str[-1] != 1:
        q = q.contiguous()
        q_str = q.stride()
    shape = q.shape
    if len(shape) == 4:
        B, Sq, Hq, D = shape
        q_str = q_str[:3]
    else:  # [B, Hq, D] read as [B, 1, Hq, D] (strides given directly: no view to build)
        (B, Hq, D), Sq = shape, 1
        q_str = (q_str[0], 0, q_str[1])
    # contiguous, viewed as [B, Sq, Hq, D] by the kernel (empty_like: about half the cost of torch.empty)
    out = torch.empty_like(q, memory_format=_CONTIG)
    if B == 0:
        return out
    if not seq_lens.is_contiguous():
        seq_lens = seq_lens.contiguous()
    if block_table is not None and block_table.stride(-1) != 1:
        block_table = block_table.contiguous()  # held here until the launch returns
    threads = torch.get_num_threads()
    cs = k_cache.shape
    if block_table is None:
        bt_ptr, bt_stride, block_size, capacity = 0, 0, 0, cs[1]
    else:
        bt_ptr, bt_stride, block_size = block_table.data_ptr(), block_table.stride(0), cs[1]
        capacity = block_table.shape[1] * block_size
    mod = _backends.cpu_module()
    ws_bytes, ws = _workspace(mod, B, Sq, Hq, cs[2], D, capacity, threads)
    qd = _DTYPE_CODE[q.dtype]
    if k_cache.dtype == torch.int8:
        kv_type, ks_ptr, vs_ptr = 3, k_scale.data_ptr(), v_scale.data_ptr()
        ks_str, vs_str = k_scale.stride(), v_scale.stride()
    else:
        kv_type, ks_ptr, vs_ptr, ks_str, vs_str = qd, 0, 0, (), ()
    mod.decode_attention(q.data_ptr(), qd, q_str, B, Sq, Hq, cs[2], D, k_cache.data_ptr(), v_cache.data_ptr(),
                         kv_type, k_str[:3], v_str[:3], ks_ptr, vs_ptr, ks_str, vs_str, seq_lens.data_ptr(), bt_ptr,
                         bt_stride, block_size, capacity, D ** -0.5 if scale is None else float(scale), float(softcap),
                         int(window_left), out.data_ptr(), ws.data_ptr(), ws_bytes, threads, _backends.cpu_isa(),
                         CPU_I16_DOT)
    return out


def _cpu_call(q, k_cache, v_cache, seq_lens, k_scale, v_scale, out, ws, threads, block_table=None):
    """The cpu launch with default scale/softcap/window as a KernelCall (llmkern._C.StepProgram,
    models/decode_plan.py): q [B, Hq, D] with a contiguous head dim, out [B, Hq, D] contiguous, ws uint8
    of at least decode_attention_workspace_size(...) bytes, seq_lens int32 [B] and block_table int32
    [B, max_blocks] (paged caches; None: contiguous) contiguous, read at run time. The caller keeps every
    tensor alive while the call exists. (The argument list is `_cpu`'s launch, written out again: a shared
    builder measured +0.45 us on every eager call, and this one runs once per plan.)"""
    B, Hq, D = q.shape
    if block_table is not None and not block_table.is_contiguous():
        raise ValueError("decode_attention call: block_table is bound by pointer and must be contiguous")
    Hk = k_cache.shape[2]
    if block_table is None:
        bt_ptr, bt_stride, block_size, capacity = 0, 0, 0, k_cache.shape[1]
    else:
        bt_ptr, bt_stride, block_size = block_table.data_ptr(), block_table.stride(0), k_cache.shape[1]
        capacity = block_table.shape[1] * block_size
    int8 = k_cache.dtype == torch.int8
    return _backends.cpu_module().decode_attention_call(
        q.data_ptr(), _DTYPE_CODE[q.dtype], [q.stride(0), 0, q.stride(1)], B, 1, Hq, Hk, D,
        k_cache.data_ptr(), v_cache.data_ptr(), 3 if int8 else _DTYPE_CODE[k_cache.dtype],
        list(k_cache.stride()[:3]), list(v_cache.stride()[:3]),
        k_scale.data_ptr() if int8 else 0, v_scale.data_ptr() if int8 else 0,
        list(k_scale.stride()) if int8 else [], list(v_scale.stride()) if int8 else [],
        seq_lens.data_ptr(), bt_ptr, bt_stride, block_size, capacity, D ** -0.5, 0.0, -1,
        out.data_ptr(), ws.data_ptr(), ws.numel(), threads, _backends.cpu_isa(), CPU_I16_DOT)


# Split-KV of the CUDA backend. Tests force a split count through this variable (or LLMKERN_DECODE_SPLITS).
CUDA_FORCE_SPLITS: int | None = int(os.environ["LLMKERN_DECODE_SPLITS"]) if os.environ.get("LLMKERN_DECODE_SPLITS") else None
_CUDA_MIN_KEYS_PER_SPLIT = 128  # below this a split's fixed cost (q load, merge) outweighs its keys
# True: 16-bit / fp32 caches with D <= 128 run the split kernel's cp.async-pipelined loop (each step's K / V copied
# into shared memory while the previous step's math runs; decode_attention.cuh). The first GPU run (H200,
# 2026-11-29) measured the register loop at 23-34% of the read bandwidth, latency-bound; off until a GPU run has
# timed the pipelined one against it (bench entries llmkern.cuda.*.pipelined). LLMKERN_CUDA_DECODE_PIPELINE=1
# turns it on (read at import).
CUDA_DECODE_PIPELINE = os.environ.get("LLMKERN_CUDA_DECODE_PIPELINE", "") == "1"
# True: bf16 / fp16 caches with D = 64 or 128 run the tensor-core kernel (csrc/include/llmkern/cuda/
# decode_attention_mma.cuh): the query rows of a KV head as mma.sync tiles, K / V through a 3-deep cp.async ring.
# Written (session 15, without a GPU) because the split kernel's SASS holds ~1770 instructions per 8-key step of a
# warp (bf16, D = 128): instruction-bound near the 34% of the read bandwidth the first GPU run measured. Off until
# a GPU run has timed it (bench entries llmkern.cuda.*.mma). LLMKERN_CUDA_DECODE_MMA=1 turns it on (read at import).
CUDA_DECODE_MMA = os.environ.get("LLMKERN_CUDA_DECODE_MMA", "") == "1"
# the launcher's answer for the last cuda call: "split", "split_pipelined" or "split_mma" (tests, benches)
_last_cuda_path = None


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def cuda_num_splits(B: int, Hk: int, rows: int, max_keys: int, sms: int, mma: bool = False, D: int = 128) -> int:
    """Splits of each sequence's keys for the CUDA kernel (B * Hk * row_chunks * splits CTAs).

    CTAs resident at once: ~3 per SM with <= 4 query rows per CTA, ~2 with 8 (registers); the tensor-core
    kernel (mma): 16 rows per CTA, by shared memory on an H100 / H200 (228 KB per SM) 4 at D = 64 (50.5 KB each),
    2 at D = 128 (100.5 KB; on an A100's 164 KB it is 1: an estimate). The smallest split count whose CTAs fill
    >= 85% of their last wave is taken (more splits only add merge work), else the best fill; a split keeps at
    least _CUDA_MIN_KEYS_PER_SPLIT keys.
    """
    if CUDA_FORCE_SPLITS is not None:
        return max(1, min(int(CUDA_FORCE_SPLITS), 65535))
    per_cta = 16 if mma else 4 if rows <= 4 else 8
    base = max(1, B * Hk * ((rows + per_cta - 1) // per_cta))
    resident = max(1, sms * ((4 if D <= 64 else 2) if mma else 3 if per_cta == 4 else 2))
    cap = max(1, min(128, max_keys // _CUDA_MIN_KEYS_PER_SPLIT))
    best, best_fill = 1, 0.0
    for ns in range(1, cap + 1):
        waves = base * ns / resident
        fill = waves / math.ceil(waves)
        if fill >= 0.85:
            return ns
        if fill > best_fill + 1e-9:
            best, best_fill = ns, fill
    return best


@decode_attention_op.backend("cuda")
def _cuda(q, k_cache, v_cache, seq_lens, block_table, k_scale, v_scale, scale, softcap, window_left):
    """Split-KV CUDA kernels (csrc/include/llmkern/cuda/decode_attention.cuh; with CUDA_DECODE_MMA the tensor-core
    one of decode_attention_mma.cuh for 16-bit caches with D 64 / 128) on raw pointers and strides; torch
    allocates out and the fp32 workspace of partial states (so the op is CUDA-graph safe)."""
    if q.device.type != "cuda":
        raise BackendUnsupported(f"q is on {q.device}")
    mod = _backends.cuda_module()
    D = q.shape[-1]
    int8 = k_cache.dtype == torch.int8
    max_d = 128 if k_cache.dtype == torch.float32 else 256
    if D % 8 or not 8 <= D <= max_d:
        raise BackendUnsupported(f"head dim {D} (the CUDA kernel takes multiples of 8 up to {max_d} for a "
                                 f"{k_cache.dtype} cache)")
    vec, align = (8, 8) if int8 else ((4, 16) if k_cache.dtype == torch.float32 else (8, 16))
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.stride(-1) != 1 or any(st % vec for st in c.stride()[:3]) or c.data_ptr() % align:
            raise BackendUnsupported(f"{name} needs a unit stride along D, strides that are multiples of {vec} "
                                     f"and {align}-byte alignment (vector loads)")
    q4 = q if q.dim() == 4 else q[:, None]  # [B, Sq, Hq, D]
    if q4.stride(-1) != 1:
        q4 = q4.contiguous()
    B, Sq, Hq, _ = q4.shape
    Hk = k_cache.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous, seen as [B, Sq, Hq, D]
    if B == 0 or Hq == 0:
        return out
    if B > 65535:
        raise BackendUnsupported(f"batch {B} > 65535 (grid z)")
    rows = (Hq // Hk) * Sq
    row_chunks = (rows + (4 if rows <= 4 else 8) - 1) // (4 if rows <= 4 else 8)
    if Hk * row_chunks > 65535:
        raise BackendUnsupported("too many heads x new tokens for the grid")
    if block_table is None:
        bt_ptr, bt_stride, block_size, capacity = 0, 0, 0, k_cache.shape[1]
    else:
        if block_table.stride(-1) != 1:
            block_table = block_table.contiguous()
        bt_ptr, bt_stride, block_size = block_table.data_ptr(), block_table.stride(0), k_cache.shape[1]
        capacity = block_table.shape[1] * block_size
    window_left = -1 if window_left >= capacity else int(window_left)  # a window past the cache is no window
    max_keys = capacity if window_left < 0 else min(capacity, window_left + Sq)
    mma = CUDA_DECODE_MMA and not int8 and k_cache.dtype != torch.float32 and D in (64, 128)
    ns = cuda_num_splits(B, Hk, rows, max_keys, _sm_count(q.device.index if q.device.index is not None
                                                                  else torch.cuda.current_device()), mma, D)
    ws = None
    if ns > 1:
        ws = torch.empty(mod.decode_attention_workspace_floats(B, Sq, Hq, D, ns), dtype=torch.float32,
                         device=q.device)
    seq_lens = seq_lens.contiguous()
    global _last_cuda_path
    _last_cuda_path = mod.decode_attention(
        q4.data_ptr(), _DTYPE_CODE[q.dtype], list(q4.stride()[:3]), B, Sq, Hq, Hk, D,
        k_cache.data_ptr(), v_cache.data_ptr(), 3 if int8 else _DTYPE_CODE[k_cache.dtype],
        list(k_cache.stride()[:3]), list(v_cache.stride()[:3]),
        k_scale.data_ptr() if int8 else 0, v_scale.data_ptr() if int8 else 0,
        list(k_scale.stride()) if int8 else [0, 0, 0], list(v_scale.stride()) if int8 else [0, 0, 0],
        seq_lens.data_ptr(), bt_ptr, bt_stride, block_size,
        D ** -0.5 if scale is None else float(scale), float(softcap), int(window_left),
        out.data_ptr(), 0 if ws is None else ws.data_ptr(), ns, _backends.cuda_stream(q.device),
        int(CUDA_DECODE_PIPELINE), int(mma),
    )
    return out


def decode_attention(q, k_cache, v_cache, seq_lens, *, block_table=None, k_scale=None, v_scale=None,
                     scale=None, softcap=0.0, window_left=-1, backend=None):
    """Attention of the newest token(s) over each sequence's cache; see the module doc for layouts."""
    return decode_attention_op(q, k_cache, v_cache, seq_lens, block_table, k_scale, v_scale,
                               scale, softcap, window_left, backend)
