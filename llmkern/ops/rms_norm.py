"""`rms_norm`: y = x / sqrt(mean(x^2) + eps) * weight over the last dim, optionally fused with a residual add.

With `residual`: h = x + residual (rounded to x's dtype, as an unfused model would), y = rms_norm(h);
returns (y, h) so the caller keeps h as the next residual. Without: returns (y, empty tensor).
The normalization is computed in fp32 and rounded once to x's dtype.
"""
from __future__ import annotations

import torch

from .. import _backends
from .. import reference
from . import _checks as C
from ._registry import _PLAIN, BackendUnsupported, defop, needs_grad

_INF = float("inf")


_FLOATS = C.FLOAT_SET


def _cpu_fast_ok(x, weight, eps, residual) -> bool:
    """Everything _check verifies, for plain CPU tensors that autograd does not track (the weight may be
    an nn.Parameter), in one pass (~0.6 us instead of ~2.5: one call per norm and token on an eager
    decode step). The op's `fast_check` (see defop); False: _check's own code runs, with its messages."""
    T = torch.Tensor
    if not (type(x) is T and type(weight) in _PLAIN and x.is_cpu and weight.is_cpu):
        return False
    xs = x.shape
    if not (len(xs) >= 1 and x.dtype in _FLOATS and weight.dtype in _FLOATS and weight.shape == xs[-1:]):
        return False
    if residual is not None and not (type(residual) is T and residual.is_cpu and residual.dtype in _FLOATS
                                     and residual.shape == xs):
        return False
    return 0 <= eps < _INF and not needs_grad(x, weight, residual)


def _check(x, weight, eps, residual):
    op = "rms_norm"
    if _cpu_fast_ok(x, weight, eps, residual):
        return
    C.tensor(op, "x", x, dtypes=C.FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"llmkern.{op}: x must have rank >= 1, got shape {tuple(x.shape)}")
    C.tensor(op, "weight", weight, ranks=(1,), dtypes=C.FLOAT_DTYPES)
    C.shape(op, "weight", weight, (x.shape[-1],), "x's last dim")
    if residual is not None:
        C.tensor(op, "residual", residual, dtypes=C.FLOAT_DTYPES)
        C.shape(op, "residual", residual, tuple(x.shape), "same as x")
    C.same_device(op, x=x, weight=weight, residual=residual)
    if not 0 <= eps < _INF:
        raise ValueError(f"llmkern.{op}: eps must be finite and >= 0, got {eps}")


def _fake(x, weight, eps, residual):
    return x.new_empty(x.shape), x.new_empty(x.shape if residual is not None else (0,))


rms_norm_op = defop(
    "rms_norm",
    "(Tensor x, Tensor weight, float eps=1e-6, Tensor? residual=None, str? backend=None) -> (Tensor, Tensor)",
    check=_check,
    fake=_fake,
    fast_check=_cpu_fast_ok,
)
rms_norm_op.backend("reference")(reference.rms_norm)


_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _rows(t, N):
    """[..., N] -> (tensor, row stride) for the kernel: a [M, N] view when its rows have one stride and a
    contiguous last dim, else a contiguous copy (the kernel reads rows at m * stride)."""
    t2 = t if t.dim() == 2 else t.reshape(-1, N)  # [M, N]; a view when the leading dims flatten, else a copy
    M = t2.shape[0]
    if (N == 1 or t2.stride(1) == 1) and (M <= 1 or t2.stride(0) >= N):
        return t2, (t2.stride(0) if M > 1 else N)
    return t2.contiguous(), N


def _launch_args(x, weight, residual):
    """What every compiled backend's launcher takes: rows of x, weight, fresh y (and h) contiguous as the
    reference returns them. Returns (y, h, args, keep) with args = (x ptr, x code, x row stride, residual
    ptr, code, row stride, weight ptr, code, y ptr, h ptr or 0, rows, N); `keep` holds the copies the
    pointers may point into (x, residual or weight made contiguous): hold it until the launch returns."""
    N = x.shape[-1]
    x2, xs = _rows(x, N)
    w = weight if weight.stride(0) == 1 or N == 1 else weight.contiguous()
    # empty_like costs half of torch.empty here (~0.8 vs 1.6 us), and a decode step's row is ~1 us of work.
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    r2 = None
    if residual is None:
        h, r_ptr, r_code, rs = x.new_empty((0,)), 0, 0, 0
    else:
        h = torch.empty_like(x, memory_format=torch.contiguous_format)
        r2, rs = _rows(residual, N)
        r_ptr, r_code = r2.data_ptr(), _DTYPE_CODE[residual.dtype]
    keep = (x2, r2, w)
    return y, h, keep, (x2.data_ptr(), _DTYPE_CODE[x.dtype], xs, r_ptr, r_code, rs, w.data_ptr(), _DTYPE_CODE[w.dtype],
                  y.data_ptr(), h.data_ptr() if residual is not None else 0, x2.shape[0], N)


@rms_norm_op.backend("cpu")
def _cpu(x, weight, eps, residual):
    """Launch the C++ kernel on raw pointers; torch allocates y (and h) contiguous, as the reference does."""
    if not x.is_cpu:  # (is_cpu: no torch.device object built, ~0.2 us)
        raise BackendUnsupported(f"x is on {x.device}")
    if x.shape[-1] == 0:
        raise BackendUnsupported("rows of 0 elements")
    y, h, keep, args = _launch_args(x, weight, residual)
    _backends.cpu_module().rms_norm(*args, float(eps), torch.get_num_threads(), _backends.cpu_isa())
    del keep  # the copies the pointers point into lived until here
    return y, h


def _cpu_call(x, weight, eps, residual, y, h, threads):
    """The cpu launch into given outputs as a KernelCall (llmkern._C.StepProgram, models/decode_plan.py):
    x, residual, y, h [M, N] contiguous of one dtype (h written only with a residual), weight [N]
    contiguous. The caller keeps every tensor alive while the call exists."""
    M, N = x.shape
    r_ptr, r_code = (0, 0) if residual is None else (residual.data_ptr(), _DTYPE_CODE[residual.dtype])
    return _backends.cpu_module().rms_norm_call(
        x.data_ptr(), _DTYPE_CODE[x.dtype], N, r_ptr, r_code, N, weight.data_ptr(), _DTYPE_CODE[weight.dtype],
        y.data_ptr(), 0 if residual is None else h.data_ptr(), M, N, float(eps), threads, _backends.cpu_isa())


@rms_norm_op.backend("cuda")
def _cuda(x, weight, eps, residual):
    """CUDA kernel (csrc/include/llmkern/cuda/rms_norm.cuh), one CTA per row; torch allocates y (and h)."""
    if x.device.type != "cuda":
        raise BackendUnsupported(f"x is on {x.device}")
    N = x.shape[-1]
    if N == 0:
        raise BackendUnsupported("rows of 0 elements")
    y, h, keep, args = _launch_args(x, weight, residual)
    if args[10] == 0:  # no rows
        return y, h
    _backends.cuda_module().rms_norm(*args, float(eps), _backends.cuda_stream(x.device))
    del keep  # enqueued: torch's caching allocator keeps freed memory stream-ordered
    return y, h


@rms_norm_op.backend("triton")
def _triton(x, weight, eps, residual):
    """Triton kernel on CUDA tensors (llmkern.triton_kernels imported lazily: it needs triton)."""
    from ..triton_kernels import rms_norm as tk

    if x.device.type != "cuda":
        raise BackendUnsupported(f"triton runs on CUDA tensors, x is on {x.device}")
    if x.shape[-1] > tk.MAX_N:
        raise BackendUnsupported(f"rows of {x.shape[-1]} > {tk.MAX_N} elements")
    return tk.rms_norm(x, weight, eps, residual)


def rms_norm(x, weight, eps=1e-6, residual=None, backend=None):
    """y = rms_norm(x) * weight; with `residual`, returns (rms_norm(x + residual) * weight, x + residual)."""
    y, h = rms_norm_op(x, weight, eps, residual, backend)
    return y if residual is None else (y, h)
