"""`kv_cache_append`: write new keys/values into a KV cache in place, by slot.

- k, v: [B, S, Hk, D] or packed [T, Hk, D]; slot_mapping int64 of the same leading shape ([B, S] or [T]).
- k_cache, v_cache: contiguous [B, Smax, Hk, D] or paged [num_blocks, block_size, Hk, D]. Either way the
  cache is seen as [num_slots, Hk, D] with slot = row * cache.shape[1] + col, i.e. `b * Smax + pos`
  (contiguous) or `block * block_size + offset` (paged). A slot of -1 is skipped (padding). Other slots
  must be distinct within a call (as in vLLM's cache write): a repeated slot is not checked (that would
  cost a sort per call) and keeps one of its tokens' rows, which one unspecified (threads race for it).
- Float caches: written bit-exactly (k/v cast to the cache dtype).
- int8 caches (k_scale/v_scale float32 [cache.shape[:3]] given): per (token, head)
  amax = max|x|, scale = amax / 127, q = clamp(round_half_even(x * (127 / amax)), -127, 127) in fp32
  (the rule of llmkern/ops/quant.py); amax 0 stores scale 0 and q 0.
- Fused rotary (cos_sin_cache given): k is rotated before it is written and `q`, if given, is rotated
  in place, at `positions` (same leading shape as k); see rotary_embedding.py for the formula. q may be
  k or v itself (k and v are written as they were given); other partial overlaps of q with k or v are not
  supported.
"""
from __future__ import annotations

import torch

from .. import _backends
from .. import reference
from . import _checks as C
from ._registry import BackendUnsupported, defop, needs_grad
from .rotary_embedding import check_rotary


_FLOATS = C.FLOAT_SET
_CACHE_DTYPES = frozenset(C.FLOAT_DTYPES + (torch.int8,))


def _plain_cpu_ok(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale) -> bool:
    """Everything _check verifies for an append without rotary, on plain contiguous CPU tensors, in
    ~1.5 us instead of ~8 (a decode step appends once per layer). True only when every check passes;
    otherwise _check's own code runs and raises with its message."""
    T = torch.Tensor
    if not (type(k) is T and type(v) is T and type(k_cache) is T and type(v_cache) is T and type(slot_mapping) is T):
        return False
    if not (k.is_cpu and v.is_cpu and k_cache.is_cpu and v_cache.is_cpu and slot_mapping.is_cpu):
        return False
    ks = k.shape
    cs = k_cache.shape
    if not (k.dtype in _FLOATS and v.dtype == k.dtype and len(ks) in (3, 4) and v.shape == ks and len(cs) == 4
            and k_cache.dtype in _CACHE_DTYPES and v_cache.dtype == k_cache.dtype and v_cache.shape == cs
            and ks[-2:] == cs[2:] and ks[-1] > 0 and ks[-2] > 0
            and slot_mapping.dtype == torch.int64 and slot_mapping.shape == ks[:-2]
            and k_cache.is_contiguous() and v_cache.is_contiguous() and slot_mapping.is_contiguous()):
        return False
    if k_cache.dtype == torch.int8:
        for s in (k_scale, v_scale):
            if not (type(s) is T and s.is_cpu and s.dtype == torch.float32 and s.shape == cs[:3] and s.is_contiguous()):
                return False
    elif k_scale is not None or v_scale is not None:
        return False
    n = slot_mapping.numel()
    if n:
        mod = _backends.cpu_module()
        if mod is None:
            return False
        lo, hi = mod.i64_range(slot_mapping.data_ptr(), n)
        if not (lo >= -1 and hi < cs[0] * cs[1]):
            return False
    return True


def _rotary_cpu_ok(k, q, positions, cos_sin_cache) -> bool:
    """What check_rotary (and _check's q/positions checks) verify, for plain CPU tensors (int64 positions,
    contiguous), without torch reductions; False sends the call through the full checks and their messages."""
    T = torch.Tensor
    if not (type(positions) is T and type(cos_sin_cache) is T and positions.is_cpu and cos_sin_cache.is_cpu
            and positions.dtype == torch.int64 and positions.is_contiguous() and positions.shape == k.shape[:-2]
            and cos_sin_cache.dtype == torch.float32 and cos_sin_cache.dim() == 2):
        return False
    R, D = cos_sin_cache.shape[1], k.shape[-1]
    if R % 2 or R == 0 or R > D:
        return False
    if q is not None and not (type(q) is T and q.is_cpu and q.dtype in _FLOATS and q.dim() == k.dim()
                              and q.shape[:-2] == k.shape[:-2] and q.shape[-1] == D and 0 not in q.stride()):
        return False
    n = positions.numel()
    if n:
        mod = _backends.cpu_module()
        if mod is None:
            return False
        lo, hi = mod.i64_range(positions.data_ptr(), n)
        if not (lo >= 0 and hi < cos_sin_cache.shape[0]):
            return False
    return True


def _cpu_fast_ok(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, q, positions, cos_sin_cache,
                 rotary_interleaved) -> bool:
    """Every check of _check passed by plain CPU tensors (with or without rotary), none tracked by
    autograd; also the op's `fast_check` (see defop). False: _check's own code runs."""
    if cos_sin_cache is None and q is None and positions is None:
        ok = _plain_cpu_ok(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    else:
        ok = (cos_sin_cache is not None and positions is not None
              and _plain_cpu_ok(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
              and _rotary_cpu_ok(k, q, positions, cos_sin_cache))
    return ok and not needs_grad(k, v, k_cache, v_cache, k_scale, v_scale, q)


def _check(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, q, positions, cos_sin_cache,
           rotary_interleaved):
    op = "kv_cache_append"
    if _cpu_fast_ok(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, q, positions, cos_sin_cache,
                    rotary_interleaved):
        return
    C.tensor(op, "k", k, ranks=(3, 4), dtypes=C.FLOAT_DTYPES)
    C.tensor(op, "v", v, ranks=(k.dim(),), dtypes=(k.dtype,))
    C.shape(op, "v", v, tuple(k.shape), "same as k")
    C.tensor(op, "k_cache", k_cache, ranks=(4,), dtypes=C.FLOAT_DTYPES + (torch.int8,))
    C.tensor(op, "v_cache", v_cache, ranks=(4,), dtypes=(k_cache.dtype,))
    C.shape(op, "v_cache", v_cache, tuple(k_cache.shape), "same as k_cache")
    C.same_device(op, k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping,
                  k_scale=k_scale, v_scale=v_scale, q=q, positions=positions, cos_sin_cache=cos_sin_cache)
    C.shape(op, "k", k, tuple([None] * (k.dim() - 2)) + tuple(k_cache.shape[2:]), "[..., Hk, D] of the cache")
    if k.shape[-1] == 0 or k.shape[-2] == 0:
        raise ValueError(f"llmkern.{op}: k needs at least one head and a head dim >= 1, got [..., Hk, D] = "
                         f"{list(k.shape[-2:])}")
    C.tensor(op, "slot_mapping", slot_mapping, dtypes=(torch.int64,))
    C.shape(op, "slot_mapping", slot_mapping, tuple(k.shape[:-2]), "k's leading dims")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(f"llmkern.{op}: k_cache and v_cache must be contiguous (written in place by slot)")
    if k_cache.dtype == torch.int8:
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            if s is None:
                raise ValueError(f"llmkern.{op}: an int8 cache needs {name} (float32 {list(k_cache.shape[:3])})")
            C.tensor(op, name, s, dtypes=(torch.float32,))
            C.shape(op, name, s, tuple(k_cache.shape[:3]), "the cache's shape without D")
            if not s.is_contiguous():
                raise ValueError(f"llmkern.{op}: {name} must be contiguous")
    elif k_scale is not None or v_scale is not None:
        raise ValueError(f"llmkern.{op}: k_scale/v_scale are only for int8 caches, cache is {k_cache.dtype}")
    if C.can_read_values(slot_mapping) and slot_mapping.numel():
        num_slots = k_cache.shape[0] * k_cache.shape[1]
        mod = _backends.cpu_module()
        if mod is not None and slot_mapping.device.type == "cpu" and slot_mapping.is_contiguous():
            lo, hi = mod.i64_range(slot_mapping.data_ptr(), slot_mapping.numel())  # no torch reductions
        else:
            lo, hi = int(slot_mapping.min()), int(slot_mapping.max())
        C.value(op, lo >= -1 and hi < num_slots,
                f"slot_mapping must be in -1..{num_slots - 1} (the cache has {num_slots} slots), got {lo}..{hi}")
    if cos_sin_cache is not None:
        if positions is None:
            raise ValueError(f"llmkern.{op}: fused rotary (cos_sin_cache) needs positions")
        C.shape(op, "positions", positions, tuple(k.shape[:-2]), "k's leading dims")
        if q is not None:
            C.tensor(op, "q", q, ranks=(k.dim(),), dtypes=C.FLOAT_DTYPES)
            C.shape(op, "q", q, tuple(k.shape[:-2]) + (None, k.shape[-1]), "k's leading dims, [..., Hq, D]")
            C.writable(op, "q", q)
        check_rotary(op, q if q is not None else k, k, positions, cos_sin_cache)
    elif q is not None or positions is not None:
        raise ValueError(f"llmkern.{op}: q and positions are only used with fused rotary (cos_sin_cache)")


def _fake(*args):
    return None


kv_cache_append_op = defop(
    "kv_cache_append",
    "(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, "
    "Tensor(c!)? k_scale=None, Tensor(d!)? v_scale=None, Tensor(e!)? q=None, Tensor? positions=None, "
    "Tensor? cos_sin_cache=None, bool rotary_interleaved=False, str? backend=None) -> ()",
    check=_check,
    fake=_fake,
    fast_check=_cpu_fast_ok,
)
kv_cache_append_op.backend("reference")(reference.kv_cache_append)

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_CACHE_CODE = {**_DTYPE_CODE, torch.int8: 3}


def _as_bshd(t):
    """[B, S, H, D] or [T, H, D] -> a [B, S, H, D] view (T as [T, 1, H, D]) with a contiguous last dim."""
    t4 = t if t.dim() == 4 else t[:, None]
    return t4 if t4.stride(-1) == 1 else t4.contiguous()


@kv_cache_append_op.backend("cpu")
def _cpu(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, q, positions, cos_sin_cache, rotary_interleaved):
    """Launch the C++ kernel on raw pointers and element strides (q, written in place, is never copied)."""
    if not k.is_cpu:  # (is_cpu: no torch.device object built, ~0.2 us)
        raise BackendUnsupported(f"k is on {k.device}")
    if k_cache.numel() == 0 or k.shape[-2] == 0 or k.shape[-1] > 256:  # (the kernel's limits; the reference takes these)
        raise BackendUnsupported(f"an empty cache, no heads or head dim {k.shape[-1]} > 256")
    _cpu_launch(False, k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, q, positions, cos_sin_cache,
                rotary_interleaved, torch.get_num_threads())


def _cpu_call(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, q, positions, cos_sin_cache,
              rotary_interleaved, threads):
    """The cpu launch as a KernelCall (llmkern._C.StepProgram, models/decode_plan.py), for checked CPU
    inputs whose slot_mapping and positions are contiguous int64 (their pointers are bound: the caller
    updates them in place and keeps every tensor alive while the call exists)."""
    return _cpu_launch(True, k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, q, positions, cos_sin_cache,
                       rotary_interleaved, threads)


def _cpu_launch(as_call, k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, q, positions, cos_sin_cache,
                rotary_interleaved, threads):
    """Launch now (as_call False) or return the launch as a KernelCall (as_call True)."""
    mod = _backends.cpu_module()
    k4, v4 = _as_bshd(k), _as_bshd(v)  # [B, S, Hk, D]
    B, S, Hk, D = k4.shape
    # [B * S], token t = b * S + s: a contiguous slot_mapping already is that in memory (no reshape: ~1 us)
    slots = slot_mapping if slot_mapping.is_contiguous() else slot_mapping.contiguous()
    int8 = k_cache.dtype == torch.int8
    rot = cos_sin_cache is not None
    q_ptr, q_strides, Hq, q_code = 0, [0, 0, 0], 0, 0
    if rot:
        cos_sin = cos_sin_cache.contiguous()
        pos = positions.reshape(-1).to(torch.int64).contiguous()
        if q is not None:
            q4 = q if q.dim() == 4 else q[:, None]
            if q4.stride(-1) != 1:
                raise BackendUnsupported("q's head dim is not contiguous (it is rotated in place)")
            q_ptr, q_strides, Hq, q_code = q4.data_ptr(), list(q4.stride()[:3]), q4.shape[2], _DTYPE_CODE[q.dtype]
    if as_call:  # the call binds pointers: a temporary copy made above would be freed before it runs
        bound = [(k4, k), (v4, v), (slots, slot_mapping)] + ([(cos_sin, cos_sin_cache), (pos, positions)] if rot else [])
        if any(t.data_ptr() != src.data_ptr() for t, src in bound):
            raise ValueError("kv_cache_append call: k, v (last dim contiguous), slot_mapping, positions (contiguous "
                             "int64) and cos_sin_cache (contiguous) are bound by pointer and must not need a copy")
    launch = mod.kv_cache_append_call if as_call else mod.kv_cache_append
    return launch(
        k4.data_ptr(), v4.data_ptr(), _DTYPE_CODE[k.dtype], list(k4.stride()[:3]), list(v4.stride()[:3]),
        B, S, Hk, D, slots.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), _CACHE_CODE[k_cache.dtype],
        k_scale.data_ptr() if int8 else 0, v_scale.data_ptr() if int8 else 0,
        cos_sin.data_ptr() if rot else 0, cos_sin_cache.shape[1] if rot else 0, pos.data_ptr() if rot else 0,
        bool(rotary_interleaved), q_ptr, q_code, q_strides, Hq, threads, _backends.cpu_isa(),
    )


def _q_not_k(q, k, v) -> None:
    """The GPU kernels rotate q's rows in place in parallel with reading k's and v's: a q that is k or v itself
    (the same first element) would race. Such a call goes to the next backend (the CPU kernel and the reference
    read k and v before rotating q, so aliasing is fine there)."""
    if q.data_ptr() in (k.data_ptr(), v.data_ptr()):
        raise BackendUnsupported("q is k or v itself (rotated in place while they are read)")


@kv_cache_append_op.backend("cuda")
def _cuda(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, q, positions, cos_sin_cache,
          rotary_interleaved):
    """CUDA kernel (csrc/include/llmkern/cuda/kv_cache_append.cuh) on raw pointers and element strides."""
    mod = _backends.cuda_module()
    if k.device.type != "cuda":
        raise BackendUnsupported(f"k is on {k.device}")
    D = k.shape[-1]
    if not 1 <= D <= 256:
        raise BackendUnsupported(f"head dim {D} (the CUDA kernel stages rows of 1..256 values)")
    k4, v4 = _as_bshd(k), _as_bshd(v)  # [B, S, Hk, D]
    B, S, Hk, _ = k4.shape
    if B * S == 0:
        return
    slots = slot_mapping.reshape(-1).contiguous()  # [B * S], token t = b * S + s
    int8 = k_cache.dtype == torch.int8
    rot = cos_sin_cache is not None
    q_ptr, q_strides, Hq, q_code = 0, [0, 0, 0], 0, 0
    cos_sin = pos = None
    if rot:
        cos_sin = cos_sin_cache.contiguous()
        pos = positions.reshape(-1).to(torch.int64).contiguous()
        if q is not None:
            _q_not_k(q, k, v)
            q4 = q if q.dim() == 4 else q[:, None]
            if q4.stride(-1) != 1 and q4.shape[-1] != 1:
                raise BackendUnsupported("q's head dim is not contiguous (it is rotated in place)")
            q_ptr, q_strides, Hq, q_code = q4.data_ptr(), list(q4.stride()[:3]), q4.shape[2], _DTYPE_CODE[q.dtype]
    mod.kv_cache_append(
        k4.data_ptr(), v4.data_ptr(), _DTYPE_CODE[k.dtype], list(k4.stride()[:3]), list(v4.stride()[:3]),
        B, S, Hk, D, slots.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), _CACHE_CODE[k_cache.dtype],
        k_scale.data_ptr() if int8 else 0, v_scale.data_ptr() if int8 else 0,
        cos_sin.data_ptr() if rot else 0, cos_sin_cache.shape[1] if rot else 0, pos.data_ptr() if rot else 0,
        bool(rotary_interleaved), q_ptr, q_code, q_strides, Hq, _backends.cuda_stream(k.device),
    )


@kv_cache_append_op.backend("triton")
def _triton(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, q, positions, cos_sin_cache,
            rotary_interleaved):
    """Triton kernel on CUDA tensors (llmkern.triton_kernels imported lazily: it needs triton)."""
    from ..triton_kernels import kv_cache_append as tk

    if k.device.type != "cuda":
        raise BackendUnsupported(f"triton runs on CUDA tensors, k is on {k.device}")
    if q is not None and cos_sin_cache is not None:
        _q_not_k(q, k, v)
    return tk.kv_cache_append(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, q, positions,
                              cos_sin_cache, rotary_interleaved)


def kv_cache_append(k, v, k_cache, v_cache, slot_mapping, *, k_scale=None, v_scale=None, q=None,
                    positions=None, cos_sin_cache=None, rotary_interleaved=False, backend=None):
    """Write k/v into the caches at `slot_mapping` (in place); optionally rotate q/k and quantize to int8."""
    kv_cache_append_op(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, q, positions,
                       cos_sin_cache, rotary_interleaved, backend)
