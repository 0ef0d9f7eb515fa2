"""`rotary_embedding`: rotate q and k by their positions (RoPE), Llama/NeoX or GPT-J style.

- q [..., Hq, D], k [..., Hk, D] with the same leading dims ([B, S] or [T]); positions int32/int64 of
  those leading dims; cos_sin_cache float32 [max_pos, R] with R = rotary dim (even, <= D): columns
  0..R/2-1 hold cos(pos * inv_freq[i]), columns R/2..R-1 hold sin(pos * inv_freq[i]).
  `rotary_cos_sin` builds it. Dims R..D-1 pass through unchanged.
- interleaved=False (Llama/NeoX "rotate half"): pairs are (x[i], x[i + R/2]);
  interleaved=True (GPT-J): pairs are (x[2i], x[2i + 1]). Each pair (a, b) becomes
  (a cos - b sin, b cos + a sin), computed in fp32 and returned in the input dtype.
"""
from __future__ import annotations

import math

import torch

from .. import _backends
from .. import reference
from . import _checks as C
from ._registry import BackendUnsupported, defop


def check_rotary(op, q, k, positions, cos_sin_cache):
    """Checks shared by rotary_embedding and kv_cache_append's fused rotary."""
    C.tensor(op, "positions", positions, dtypes=C.INDEX_DTYPES)
    C.tensor(op, "cos_sin_cache", cos_sin_cache, ranks=(2,), dtypes=(torch.float32,))
    R = cos_sin_cache.shape[1]
    if k.shape[-1] < 2:
        raise ValueError(f"llmkern.{op}: rotary needs a head dim of at least 2 (one pair), got {k.shape[-1]}")
    if cos_sin_cache.shape[0] == 0:
        raise ValueError(f"llmkern.{op}: cos_sin_cache has no rows (one per position), got shape "
                         f"{list(cos_sin_cache.shape)}")
    if R % 2 or R == 0 or R > k.shape[-1]:
        raise ValueError(f"llmkern.{op}: cos_sin_cache width (rotary dim) must be even and in 2..{k.shape[-1]}, got {R}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"llmkern.{op}: q head dim ({q.shape[-1]}) must equal k's ({k.shape[-1]})")
    if C.can_read_values(positions) and positions.numel():
        lo, hi = int(positions.min()), int(positions.max())
        C.value(op, lo >= 0 and hi < cos_sin_cache.shape[0],
                f"positions must be in 0..{cos_sin_cache.shape[0] - 1} (rows of cos_sin_cache), got {lo}..{hi}")


def _check(q, k, positions, cos_sin_cache, interleaved):
    op = "rotary_embedding"
    C.tensor(op, "q", q, dtypes=C.FLOAT_DTYPES)
    C.tensor(op, "k", k, ranks=(q.dim(),), dtypes=C.FLOAT_DTYPES)
    if q.dim() < 3:
        raise ValueError(f"llmkern.{op}: q must be [..., H, D] with leading dims, got shape {tuple(q.shape)}")
    C.shape(op, "k", k, tuple(q.shape[:-2]) + (None, q.shape[-1]), "q's leading dims and head dim")
    C.shape(op, "positions", positions, tuple(q.shape[:-2]), "q's leading dims")
    C.same_device(op, q=q, k=k, positions=positions, cos_sin_cache=cos_sin_cache)
    check_rotary(op, q, k, positions, cos_sin_cache)


rotary_embedding_op = defop(
    "rotary_embedding",
    "(Tensor q, Tensor k, Tensor positions, Tensor cos_sin_cache, bool interleaved=False, "
    "str? backend=None) -> (Tensor, Tensor)",
    check=_check,
    fake=lambda q, k, positions, cos_sin_cache, interleaved: (q.new_empty(q.shape), k.new_empty(k.shape)),
)
rotary_embedding_op.backend("reference")(reference.rotary_embedding)


_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_MAX_R = 1024  # the kernel's fp32 row buffer (csrc/include/llmkern/cpu/rotary_embedding.h)


def _as_thd(t):
    """[..., H, D] -> a [T, H, D] view with a contiguous last dim (a copy when that is impossible)."""
    t3 = t.reshape(-1, t.shape[-2], t.shape[-1])  # [T, H, D]; a view when the leading dims flatten
    return t3 if t3.stride(-1) == 1 or t3.shape[-1] == 1 else t3.contiguous()


@rotary_embedding_op.backend("cpu")
def _cpu(q, k, positions, cos_sin_cache, interleaved):
    """Launch the C++ kernel on raw pointers and element strides; torch allocates contiguous outputs."""
    if not q.is_cpu:  # (is_cpu: no torch.device object built, ~0.2 us)
        raise BackendUnsupported(f"q is on {q.device}")
    R = cos_sin_cache.shape[1]
    if R > _MAX_R:
        raise BackendUnsupported(f"rotary dim {R} > {_MAX_R}")
    if q.shape[-2] == 0 or k.shape[-2] == 0:  # (no heads: [T, 0, D] views cannot be formed by reshape(-1, ...))
        raise BackendUnsupported("q or k has no heads")
    mod = _backends.cpu_module()
    q3, k3 = _as_thd(q), _as_thd(k)  # [T, Hq, D], [T, Hk, D]
    T, Hq, D = q3.shape
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype), torch.empty(k.shape, dtype=k.dtype)
    pos = positions.reshape(-1).to(torch.int64).contiguous()  # [T]
    cs = cos_sin_cache.contiguous()
    mod.rotary_embedding(q3.data_ptr(), q_out.data_ptr(), _DTYPE_CODE[q.dtype], list(q3.stride()[:2]), Hq,
                         k3.data_ptr(), k_out.data_ptr(), _DTYPE_CODE[k.dtype], list(k3.stride()[:2]), k3.shape[1],
                         T, D, cs.data_ptr(), R, pos.data_ptr(), bool(interleaved), torch.get_num_threads(),
                         _backends.cpu_isa())
    return q_out, k_out


@rotary_embedding_op.backend("cuda")
def _cuda(q, k, positions, cos_sin_cache, interleaved):
    """CUDA kernel (csrc/include/llmkern/cuda/rotary_embedding.cuh), one warp per head row."""
    if q.device.type != "cuda":
        raise BackendUnsupported(f"q is on {q.device}")
    mod = _backends.cuda_module()
    q3, k3 = _as_thd(q), _as_thd(k)  # [T, Hq, D], [T, Hk, D]
    T, Hq, D = q3.shape
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if T * (Hq + k3.shape[1]) == 0:
        return q_out, k_out
    pos = positions.reshape(-1).to(torch.int64).contiguous()  # [T]
    cs = cos_sin_cache.contiguous()
    mod.rotary_embedding(q3.data_ptr(), q_out.data_ptr(), _DTYPE_CODE[q.dtype], list(q3.stride()[:2]), Hq,
                         k3.data_ptr(), k_out.data_ptr(), _DTYPE_CODE[k.dtype], list(k3.stride()[:2]), k3.shape[1],
                         T, D, cs.data_ptr(), cs.shape[1], pos.data_ptr(), bool(interleaved),
                         _backends.cuda_stream(q.device))
    return q_out, k_out


@rotary_embedding_op.backend("triton")
def _triton(q, k, positions, cos_sin_cache, interleaved):
    """Triton kernel on CUDA tensors (llmkern.triton_kernels imported lazily: it needs triton)."""
    from ..triton_kernels import rotary_embedding as tk

    if q.device.type != "cuda":
        raise BackendUnsupported(f"triton runs on CUDA tensors, q is on {q.device}")
    return tk.rotary_embedding(q, k, positions, cos_sin_cache, interleaved)


def rotary_embedding(q, k, positions, cos_sin_cache, interleaved=False, backend=None):
    """Returns (q_rotated, k_rotated), new tensors in the inputs' dtypes."""
    return rotary_embedding_op(q, k, positions, cos_sin_cache, interleaved, backend)


def rotary_cos_sin(max_positions: int, rotary_dim: int, base: float = 10000.0, *, scaling: dict | None = None,
                   device=None) -> torch.Tensor:
    """float32 [max_positions, rotary_dim]: cos | sin of pos * inv_freq, inv_freq[i] = base^(-2i/R).

    scaling: None, {"type": "linear", "factor": f} (positions divided by f), or the Llama 3 form
    {"type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}.
    """
    if rotary_dim % 2 or rotary_dim <= 0:
        raise ValueError(f"llmkern.rotary_cos_sin: rotary_dim must be even and > 0, got {rotary_dim}")
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    pos = torch.arange(max_positions, dtype=torch.float64)
    kind = (scaling or {}).get("type", (scaling or {}).get("rope_type"))
    if kind == "linear":
        pos = pos / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_ctx / wavelen) - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    elif kind not in (None, "default"):
        raise ValueError(f"llmkern.rotary_cos_sin: unsupported scaling type {kind!r} (linear, llama3)")
    angles = pos[:, None] * inv_freq[None, :]  # [max_positions, R/2]
    return torch.cat([angles.cos(), angles.sin()], dim=1).to(torch.float32).to(device)
