"""Quantize / dequantize / pack helpers, registered as torch ops like every other op.

All rounding is round-half-to-even in fp32, on a product with the reciprocal (one multiply per element,
what fast kernels do, so every backend can match the reference bit for bit):
- int8 weights: symmetric per output channel (group_size=0) or per group of G along K:
  amax = max|w|, scale = amax / 127, q = clamp(round(w * (127 / amax)), -127, 127); amax 0 gives scale 0, q 0.
- int4 weights (canonical layout in int4_linear.py): round-to-nearest per group with offset = min,
  scale = (max - min) / 15, q = clamp(round((w - min) * (15 / (max - min))), 0, 15); max == min gives
  scale 0, q 0 (the group is exactly its offset).
- activations (`quantize_rows_int8`, W8A8): the int8 weight rule applied to each row of the last dim.
"""
from __future__ import annotations

import torch

from .. import reference
from . import _checks as C
from ._registry import defop

# ---------------------------------------------------------------- quantize_int8 / dequantize_int8


def _check_group(op, K, group_size, allowed=None):
    """group_size: 0 (per channel) or a divisor of K; with `allowed` (int4: no per-channel form) one of those."""
    if allowed is not None and (group_size not in allowed or K % group_size):
        raise ValueError(f"llmkern.{op}: group_size must be one of {allowed} and divide K={K}, got {group_size}")
    if group_size < 0 or (group_size > 0 and K % group_size != 0):
        raise ValueError(f"llmkern.{op}: group_size must be 0 (per channel) or divide K={K}, got {group_size}")


def _check_q8(w, group_size):
    C.tensor("quantize_int8", "w", w, ranks=(2,), dtypes=C.FLOAT_DTYPES)
    _check_group("quantize_int8", w.shape[1], group_size)


def _fake_q8(w, group_size):
    N, K = w.shape
    s = (N,) if group_size == 0 else (N, K // group_size)
    return w.new_empty(w.shape, dtype=torch.int8), w.new_empty(s, dtype=torch.float32)


quantize_int8_op = defop(
    "quantize_int8",
    "(Tensor w, int group_size=0, str? backend=None) -> (Tensor, Tensor)",
    check=_check_q8,
    fake=_fake_q8,
)
quantize_int8_op.backend("reference")(reference.quantize_int8)


def _check_dq8(w, scale):
    C.tensor("dequantize_int8", "w", w, ranks=(2,), dtypes=(torch.int8,))
    C.tensor("dequantize_int8", "scale", scale, ranks=(1, 2), dtypes=(torch.float32,))
    C.shape("dequantize_int8", "scale", scale, (w.shape[0],) + ((None,) if scale.dim() == 2 else ()))
    if scale.dim() == 2 and (scale.shape[1] == 0 or w.shape[1] % scale.shape[1]):
        raise ValueError(f"llmkern.dequantize_int8: scale's {scale.shape[1]} groups do not divide K={w.shape[1]}")
    C.same_device("dequantize_int8", w=w, scale=scale)


dequantize_int8_op = defop(
    "dequantize_int8",
    "(Tensor w, Tensor scale, str? backend=None) -> Tensor",
    check=_check_dq8,
    fake=lambda w, scale: w.new_empty(w.shape, dtype=torch.float32),
)
dequantize_int8_op.backend("reference")(reference.dequantize_int8)

# ---------------------------------------------------------------- int4


def _check_q4(w, group_size):
    C.tensor("quantize_int4", "w", w, ranks=(2,), dtypes=C.FLOAT_DTYPES)
    if w.shape[1] % 2:
        raise ValueError(f"llmkern.quantize_int4: K (w.shape[1]) must be even, got {w.shape[1]}")
    _check_group("quantize_int4", w.shape[1], group_size, allowed=(32, 64, 128))


def _fake_q4(w, group_size):
    N, K = w.shape
    return (
        w.new_empty((N, K // 2), dtype=torch.uint8),
        w.new_empty((N, K // group_size), dtype=torch.float32),
        w.new_empty((N, K // group_size), dtype=torch.float32),
    )


quantize_int4_op = defop(
    "quantize_int4",
    "(Tensor w, int group_size=32, str? backend=None) -> (Tensor, Tensor, Tensor)",
    check=_check_q4,
    fake=_fake_q4,
)
quantize_int4_op.backend("reference")(reference.quantize_int4)


def _check_dq4(qweight, scales, offsets):
    op = "dequantize_int4"
    C.tensor(op, "qweight", qweight, ranks=(2,), dtypes=(torch.uint8,))
    C.tensor(op, "scales", scales, ranks=(2,), dtypes=(torch.float32,))
    C.tensor(op, "offsets", offsets, ranks=(2,), dtypes=(torch.float32,))
    K = qweight.shape[1] * 2
    C.shape(op, "scales", scales, (qweight.shape[0], None))
    if scales.shape[1] == 0 or K % scales.shape[1]:
        raise ValueError(f"llmkern.{op}: scales' {scales.shape[1]} groups do not divide K={K}")
    C.shape(op, "offsets", offsets, tuple(scales.shape), "same as scales")
    C.same_device(op, qweight=qweight, scales=scales, offsets=offsets)


dequantize_int4_op = defop(
    "dequantize_int4",
    "(Tensor qweight, Tensor scales, Tensor offsets, str? backend=None) -> Tensor",
    check=_check_dq4,
    fake=lambda q, s, o: q.new_empty((q.shape[0], q.shape[1] * 2), dtype=torch.float32),
)
dequantize_int4_op.backend("reference")(reference.dequantize_int4)


def _check_pack(q):
    C.tensor("pack_int4", "q", q, ranks=(2,), dtypes=(torch.uint8,))
    if q.shape[1] % 2:
        raise ValueError(f"llmkern.pack_int4: q.shape[1] must be even, got {q.shape[1]}")
    if C.can_read_values(q) and q.numel() and int(q.max()) > 15:
        raise ValueError(f"llmkern.pack_int4: q values must be in 0..15, got max {int(q.max())}")


pack_int4_op = defop(
    "pack_int4",
    "(Tensor q, str? backend=None) -> Tensor",
    check=_check_pack,
    fake=lambda q: q.new_empty((q.shape[0], q.shape[1] // 2)),
)
pack_int4_op.backend("reference")(reference.pack_int4)

unpack_int4_op = defop(
    "unpack_int4",
    "(Tensor packed, str? backend=None) -> Tensor",
    check=lambda p: C.tensor("unpack_int4", "packed", p, ranks=(2,), dtypes=(torch.uint8,)),
    fake=lambda p: p.new_empty((p.shape[0], p.shape[1] * 2)),
)
unpack_int4_op.backend("reference")(reference.unpack_int4)

# ---------------------------------------------------------------- activations


def _check_rows(x):
    C.tensor("quantize_rows_int8", "x", x, dtypes=C.FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"llmkern.quantize_rows_int8: x must have rank >= 1, got shape {tuple(x.shape)}")


quantize_rows_int8_op = defop(
    "quantize_rows_int8",
    "(Tensor x, str? backend=None) -> (Tensor, Tensor)",
    check=_check_rows,
    fake=lambda x: (x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)),
)
quantize_rows_int8_op.backend("reference")(reference.quantize_rows_int8)


# ---------------------------------------------------------------- public functions


def quantize_int8(w, group_size=0, backend=None):
    """w [N, K] float -> (q int8 [N, K], scale float32 [N] or [N, K // group_size])."""
    return quantize_int8_op(w, group_size, backend)


def dequantize_int8(w, scale, backend=None):
    """q int8 [N, K], scale [N] or [N, K // G] -> float32 [N, K] = q * scale."""
    return dequantize_int8_op(w, scale, backend)


def quantize_int4(w, group_size=32, backend=None):
    """w [N, K] float -> (qweight uint8 [N, K // 2], scales float32 [N, K // G], offsets float32 [N, K // G])."""
    return quantize_int4_op(w, group_size, backend)


def dequantize_int4(qweight, scales, offsets, backend=None):
    """Canonical int4 -> float32 [N, K] = q * scale + offset."""
    return dequantize_int4_op(qweight, scales, offsets, backend)


def pack_int4(q, backend=None):
    """q uint8 [N, K] in 0..15 -> uint8 [N, K // 2] (low nibble = even k, high nibble = odd k)."""
    return pack_int4_op(q, backend)


def unpack_int4(packed, backend=None):
    """uint8 [N, K // 2] -> q uint8 [N, K] in 0..15."""
    return unpack_int4_op(packed, backend)


def quantize_rows_int8(x, backend=None):
    """x [..., K] float -> (q int8 [..., K], scale float32 [...]) with scale = max|row| / 127."""
    return quantize_rows_int8_op(x, backend)
