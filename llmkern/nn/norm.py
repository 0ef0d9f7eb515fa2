"""`RMSNorm` (optionally fused with the residual add) and `RotaryEmbedding` as modules over llmkern.ops."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..ops.rms_norm import rms_norm_op
from ._fast import FLOATS, plain_activation


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim (Llama), via ops.rms_norm.

    forward(x [..., hidden]) -> y; forward(x, residual) -> (y, h) with h = x + residual, the fused
    form a decoder layer uses (h is the next residual stream).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, device=None, dtype=torch.float32, backend=None):
        super().__init__()
        if hidden_size <= 0:
            raise ValueError(f"RMSNorm: hidden_size must be > 0, got {hidden_size}")
        if not 0 <= eps < float("inf"):
            raise ValueError(f"RMSNorm: eps must be finite and >= 0, got {eps}")
        self.hidden_size, self.eps, self.backend = hidden_size, float(eps), backend
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        # (weight, its data pointer, shape, dtype) when they last passed the op's checks (see nn/_fast.py): the
        # same Parameter may get new data (`weight.data = ...`), which must be checked again.
        self._trusted = None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        w = self.weight
        if torch.compiler.is_compiling():
            return ops.rms_norm(x, w, self.eps, residual, backend=self.backend)
        t = self._trusted
        if (t is not None and t[0] is w and t[1] == w.data_ptr() and t[2] == w.shape and t[3] == w.dtype
                and plain_activation(x, self.hidden_size, w.device)) and (
                residual is None or (type(residual) is torch.Tensor and residual.shape == x.shape
                                     and residual.dtype in FLOATS and residual.device == x.device)):
            y, h = rms_norm_op.run_trusted(x, w, self.eps, residual, self.backend)
            return y if residual is None else (y, h)
        out = ops.rms_norm(x, w, self.eps, residual, backend=self.backend)
        # This weight passed the op's checks (a new weight tensor is checked again). Kept out of
        # nn.Module's attribute handling, which would register a Parameter value as a parameter.
        self.__dict__["_trusted"] = (w, w.data_ptr(), w.shape, w.dtype)
        return out

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, backend={self.backend!r}"


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE) with a precomputed float32 table `cos_sin_cache` [max_positions, R].

    forward(q [..., Hq, D], k [..., Hk, D], positions [...]) -> (q, k) rotated (new tensors).
    Caches take this module as `rotary=` to fuse the rotation into the cache write.
    The table is derived from the constructor arguments, so it is not saved in state dicts.
    """

    def __init__(self, rotary_dim: int, max_positions: int, base: float = 10000.0, *, scaling: dict | None = None,
                 interleaved: bool = False, device=None, backend=None):
        super().__init__()
        if max_positions <= 0:
            raise ValueError(f"RotaryEmbedding: max_positions must be > 0, got {max_positions}")
        self.rotary_dim, self.max_positions, self.base = rotary_dim, max_positions, float(base)
        self.scaling, self.interleaved, self.backend = scaling, bool(interleaved), backend
        table = ops.rotary_cos_sin(max_positions, rotary_dim, base, scaling=scaling, device=device)
        self.register_buffer("cos_sin_cache", table, persistent=False)

    def _apply(self, fn, recurse=True):
        # The ops read the table as float32: .to(bfloat16) may move it, never convert it.
        t = self._buffers.pop("cos_sin_cache")
        try:
            super()._apply(fn, recurse)
        finally:
            moved = fn(t)
            self._buffers["cos_sin_cache"] = moved if moved.dtype == t.dtype else t.to(device=moved.device)
            self._non_persistent_buffers_set.add("cos_sin_cache")
        return self

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        return ops.rotary_embedding(q, k, positions, self.cos_sin_cache, self.interleaved, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"rotary_dim={self.rotary_dim}, max_positions={self.max_positions}, base={self.base}, "
                f"scaling={self.scaling}, interleaved={self.interleaved}, backend={self.backend!r}")
