"""`rms_norm`: y = x / sqrt(mean(x^2) + eps) * weight over the last dim, optionally fused with a residual add.

With `residual`: h = x + residual (rounded to x's dtype, as an unfused model would), y = rms_norm(h);
returns (y, h) so the caller keeps h as the next residual. Without: returns (y, empty tensor).
The normalization is computed in fp32 and rounded once to x's dtype.
"""
from __future__ import annotations

import torch

from .. import reference
from . import _checks as C
from ._registry import BackendUnsupported, defop


def _check(x, weight, eps, residual):
    op = "rms_norm"
    C.tensor(op, "x", x, dtypes=C.FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"llmkern.{op}: x must have rank >= 1, got shape {tuple(x.shape)}")
    C.tensor(op, "weight", weight, ranks=(1,), dtypes=C.FLOAT_DTYPES)
    C.shape(op, "weight", weight, (x.shape[-1],), "x's last dim")
    if residual is not None:
        C.tensor(op, "residual", residual, dtypes=C.FLOAT_DTYPES)
        C.shape(op, "residual", residual, tuple(x.shape), "same as x")
    C.same_device(op, x=x, weight=weight, residual=residual)
    if not eps >= 0:
        raise ValueError(f"llmkern.{op}: eps must be >= 0, got {eps}")


def _fake(x, weight, eps, residual):
    return x.new_empty(x.shape), x.new_empty(x.shape if residual is not None else (0,))


rms_norm_op = defop(
    "rms_norm",
    "(Tensor x, Tensor weight, float eps=1e-6, Tensor? residual=None, str? backend=None) -> (Tensor, Tensor)",
    check=_check,
    fake=_fake,
)
rms_norm_op.backend("reference")(reference.rms_norm)


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
