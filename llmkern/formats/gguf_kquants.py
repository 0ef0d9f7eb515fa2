"""Exact GGUF -> llmkern converters for the 5-bit and K-quant types (see llmkern/formats/README.md).

These are the types of the GGUF files people download most (Q4_K_M: Q4_K and Q6_K tensors, with Q5_0 /
Q8_0 where a row is not a multiple of 256; Q5_K_M: Q5_K and Q6_K). Blocks (little-endian, d / dmin / m
float16; "sub-block" = the elements one scale covers):

    Q5_0  32 elements, 22 bytes: d, qh u32, qs u8[16]     value = (q - 16) * d
    Q5_1  32 elements, 24 bytes: d, m, qh u32, qs u8[16]  value = q * d + m
          (q = low nibble of qs[i] (i < 16) or high nibble of qs[i - 16], plus bit i of qh as bit 4)
    Q4_K  256 elements, 144 bytes: d, dmin, scales u8[12], qs u8[128]
          8 sub-blocks of 32, each a 6-bit scale sc and 6-bit minimum m:  value = (d * sc) * q - dmin * m
    Q5_K  256 elements, 176 bytes: d, dmin, scales u8[12], qh u8[32], qs u8[128]   (as Q4_K, 5-bit q)
    Q6_K  256 elements, 210 bytes: ql u8[128], qh u8[64], scales i8[16], d
          16 sub-blocks of 16, each an 8-bit signed scale sc:  value = (d * sc) * (q - 32)

Canonical forms, each exact (its dequantized values equal gguf.quants.dequantize bit for bit):
- Q5_0 -> int8 with a scale per group of 32: weight = q - 16 in -16..15, weight_scale = d.
- Q4_K -> int4 with G = 32: scales = d * sc, offsets = -(dmin * m). d * sc has at most 17 significant bits,
  so q * scale is exact and the one rounding is the addition, as in gguf's own `d * q - dm`.
- Q6_K -> int8 with a scale per group of 16: weight = q - 32 in -32..31, weight_scale = d * sc (exact: an
  11-bit significand times an 8-bit integer), and float32(weight) * scale is gguf's single product.
- Q5_1 and Q5_K have no exact canonical quantized form a linear takes (5-bit values with a per-group minimum:
  int4 has 4 bits, int8 no offset), so they load as float32 with gguf's values; the runtime's loader re-quantizes
  them to int8 with a scale per 32 unless asked for floats (llmkern/models/gguf_loader.py). A token table keeps
  them exactly in the "int5" form (`q5_to_int5`: a byte per code, a scale and an offset per 32), which
  llmkern.nn.QuantizedEmbedding holds.

Shapes are torch order (..., K), i.e. GGUF's ne reversed; K must be a multiple of the type's block.

Two implementations, the same bits: llmkern._C.gguf_unpack (csrc/include/llmkern/cpu/gguf_blocks.h;
OpenMP, reads the file's memory map in place; on 2 cores 1.5-3.0 G weights/s for Q4_K / Q6_K / Q5_0,
3-4x the numpy path: docs/notes/gguf-kquants/convert_speed.py) and the numpy code below, used where the
extension is missing or NATIVE is False (tests run both).
"""
from __future__ import annotations

import numpy as np
import torch

from .gguf import _blocks, _f16_field, _to_torch

NATIVE = True  # use llmkern._C.gguf_unpack when it is there


def _native():
    """llmkern._C, or None (not built, or NATIVE off)."""
    if not NATIVE:
        return None
    from .._backends import cpu_module
    mod = cpu_module()
    return mod if mod is not None and hasattr(mod, "gguf_unpack") else None


def _unpack(mod, type_name, blocks, *outs):
    """The native unpacker over blocks [R, nb, bytes] (contiguous) into the torch tensors outs."""
    R, nb = blocks.shape[:2]
    mod.gguf_unpack(type_name, blocks.ctypes.data, R, nb, *(t.data_ptr() for t in outs))
    return outs


def _q5_values(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Q5_0 / Q5_1 bits: qh uint8 [R, nb, 4] (a little-endian u32), qs uint8 [R, nb, 16] -> q uint8 [R, nb, 32]
    in 0..31, element order."""
    high = np.unpackbits(qh, axis=-1, bitorder="little")  # [R, nb, 32]: bit i of the u32 is element i's bit 4
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # [R, nb, 32]: elements 0..15 low nibbles, 16..31 high
    return low | (high << 4)


def _k_scales_mins(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 packed scale bytes of Q4_K / Q5_K blocks, uint8 [R, nb, 12] -> (sc, m) uint8 [R, nb, 8], 6 bits each.

    Bytes 0..3 hold sc[0..3] in their low 6 bits, bytes 4..7 m[0..3]; sub-blocks 4..7 take their low 4 bits
    from bytes 8..11 (sc the low nibble, m the high one) and their top 2 bits from the top 2 bits of bytes
    0..3 (sc) and 4..7 (m)."""
    lo, hi, mix = b[..., 0:4], b[..., 4:8], b[..., 8:12]
    sc = np.concatenate([lo & 0x3F, (mix & 0x0F) | ((lo >> 6) << 4)], axis=-1)
    m = np.concatenate([hi & 0x3F, (mix >> 4) | ((hi >> 6) << 4)], axis=-1)
    return sc, m


def _k_scale_offset(blocks: np.ndarray, type_name: str, name: str | None):
    """Q4_K / Q5_K blocks [R, nb, bytes] -> (scale = d * sc, minimum = dmin * m), float32 [R, nb, 8]."""
    d = _f16_field(blocks, 0, "scale d", type_name, name)  # [R, nb]
    dmin = _f16_field(blocks, 2, "minimum scale dmin", type_name, name)
    sc, m = _k_scales_mins(blocks[..., 4:16])
    return d[..., None] * sc.astype(np.float32), dmin[..., None] * m.astype(np.float32)


def q5_0_to_int8(raw, shape, *, name: str | None = None):
    """GGUF Q5_0 blocks -> (weight int8 [..., K] in -16..15, weight_scale float32 [..., K // 32] = d), exact."""
    mod = _native()
    shape, blocks = _blocks(raw, shape, "Q5_0", name, copy=mod is None)  # [R, K // 32, 22]
    d = _f16_field(blocks, 0, "scale d", "Q5_0", name)  # [R, nb]
    if mod is not None:
        w, s = _unpack(mod, "Q5_0", blocks, torch.empty(shape, dtype=torch.int8),
                       torch.empty(shape[:-1] + (shape[-1] // 32,)))
        return w, s
    q = _q5_values(blocks[..., 2:6], blocks[..., 6:22]).astype(np.int8) - np.int8(16)  # [R, nb, 32]
    return _to_torch(q, shape), _to_torch(d, shape[:-1] + (shape[-1] // 32,))


def _q5_1_codes(blocks: np.ndarray, name: str | None):
    """Q5_1 blocks [R, nb, 24] -> (q uint8 [R, nb, 32] in 0..31, d, m float32 [R, nb]): value = q * d + m."""
    d = _f16_field(blocks, 0, "scale d", "Q5_1", name)
    m = _f16_field(blocks, 2, "minimum m", "Q5_1", name)
    return _q5_values(blocks[..., 4:8], blocks[..., 8:24]), d, m


def q5_1_to_float(raw, shape, *, name: str | None = None):
    """GGUF Q5_1 blocks -> float32 [..., K] = q * d + m (fp32, as gguf computes it)."""
    mod = _native()
    shape, blocks = _blocks(raw, shape, "Q5_1", name, copy=mod is None)  # [R, K // 32, 24]
    if mod is not None:
        _f16_field(blocks, 0, "scale d", "Q5_1", name)  # (finite)
        _f16_field(blocks, 2, "minimum m", "Q5_1", name)
        return _unpack(mod, "Q5_1", blocks, torch.empty(shape))[0]
    q, d, m = _q5_1_codes(blocks, name)
    return _to_torch(d[..., None] * q.astype(np.float32) + m[..., None], shape)


def q4_k_to_int4(raw, shape, *, name: str | None = None):
    """GGUF Q4_K blocks -> canonical int4 (qweight uint8 [..., K // 2], scales = d * sc, offsets = -(dmin * m),
    float32 [..., K // 32]), exact. K must be a multiple of 256."""
    mod = _native()
    shape, blocks = _blocks(raw, shape, "Q4_K", name, copy=mod is None)  # [R, K // 256, 144]
    lead, K = shape[:-1], shape[-1]
    if mod is not None:
        _f16_field(blocks, 0, "scale d", "Q4_K", name)  # (finite)
        _f16_field(blocks, 2, "minimum scale dmin", "Q4_K", name)
        gshape = lead + (K // 32,)
        return _unpack(mod, "Q4_K", blocks, torch.empty(lead + (K // 2,), dtype=torch.uint8), torch.empty(gshape),
                       torch.empty(gshape))
    scale, minimum = _k_scale_offset(blocks, "Q4_K", name)  # [R, nb, 8]
    R, nb = blocks.shape[:2]
    # qs: 4 chunks of 32 bytes; chunk c's low nibbles are sub-block 2c (its elements in byte order), its high
    # nibbles sub-block 2c + 1. Canonical byte j of a sub-block pairs elements 2j (low) and 2j + 1 (high).
    x = blocks[..., 16:144].reshape(R, nb, 4, 32)
    even, odd = x[..., 0::2], x[..., 1::2]  # [R, nb, 4, 16]
    out = np.empty((R, nb, 4, 2, 16), dtype=np.uint8)
    np.bitwise_or(even & 0x0F, (odd & 0x0F) << 4, out=out[..., 0, :])  # sub-block 2c
    np.bitwise_or(even >> 4, odd & 0xF0, out=out[..., 1, :])  # sub-block 2c + 1
    gshape = lead + (K // 32,)
    return (_to_torch(out, lead + (K // 2,)), _to_torch(scale, gshape),
            _to_torch(np.negative(minimum), gshape))


def _q5_k_codes(blocks: np.ndarray, name: str | None):
    """Q5_K blocks [R, nb, 176] -> (q uint8 [R, nb, 8, 32] in 0..31, scale = d * sc, minimum = dmin * m float32
    [R, nb, 8]): value = scale * q - minimum."""
    scale, minimum = _k_scale_offset(blocks, "Q5_K", name)  # [R, nb, 8]
    R, nb = blocks.shape[:2]
    x = blocks[..., 48:176].reshape(R, nb, 4, 1, 32)
    low = np.concatenate([x & 0x0F, x >> 4], axis=3).reshape(R, nb, 8, 32)  # sub-blocks 2c, 2c + 1
    qh = blocks[..., 16:48].reshape(R, nb, 1, 32)
    high = (qh >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)) & 1  # bit s of qh[l]: sub-block s, element l
    return low | (high << 4), scale, minimum


def q5_k_to_float(raw, shape, *, name: str | None = None):
    """GGUF Q5_K blocks -> float32 [..., K] = (d * sc) * q - dmin * m (fp32, as gguf computes it)."""
    mod = _native()
    shape, blocks = _blocks(raw, shape, "Q5_K", name, copy=mod is None)  # [R, K // 256, 176]
    if mod is not None:
        _f16_field(blocks, 0, "scale d", "Q5_K", name)  # (finite)
        _f16_field(blocks, 2, "minimum scale dmin", "Q5_K", name)
        return _unpack(mod, "Q5_K", blocks, torch.empty(shape))[0]
    q, scale, minimum = _q5_k_codes(blocks, name)
    return _to_torch(scale[..., None] * q.astype(np.float32) - minimum[..., None], shape)


def q5_to_int5(raw, shape, type_name: str, *, name: str | None = None):
    """GGUF Q5_1 / Q5_K blocks -> their 5-bit form, exact: (codes uint8 [..., K] in 0..31, scales, offsets float32
    [..., K // 32]), whose float32(codes) * scales + offsets (a product, then a sum: never fused) is gguf's value
    bit for bit (Q5_1: scales = d, offsets = m; Q5_K: scales = d * sc, offsets = -(dmin * m), and x + (-y) is
    x - y). What llmkern.nn.QuantizedEmbedding holds for a Q5 token table ("int5"): 1.25 bytes per weight
    instead of float32's 4. (numpy: a table is converted once per load.)"""
    if type_name not in ("Q5_1", "Q5_K"):
        raise ValueError(f"q5_to_int5: type must be Q5_1 or Q5_K, got {type_name!r}")
    shape, blocks = _blocks(raw, shape, type_name, name)
    lead, K = shape[:-1], shape[-1]
    if type_name == "Q5_1":
        q, scale, offset = _q5_1_codes(blocks, name)
    else:
        q, scale, minimum = _q5_k_codes(blocks, name)
        offset = np.negative(minimum)
    gshape = lead + (K // 32,)
    return _to_torch(q, shape), _to_torch(scale, gshape), _to_torch(offset, gshape)


def q6_k_to_int8(raw, shape, *, name: str | None = None):
    """GGUF Q6_K blocks -> (weight int8 [..., K] in -32..31, weight_scale float32 [..., K // 16] = d * sc), exact.
    K must be a multiple of 256."""
    mod = _native()
    shape, blocks = _blocks(raw, shape, "Q6_K", name, copy=mod is None)  # [R, K // 256, 210]
    R, nb = blocks.shape[:2]
    d = _f16_field(blocks, 208, "scale d", "Q6_K", name)  # [R, nb]
    if mod is not None:
        return _unpack(mod, "Q6_K", blocks, torch.empty(shape, dtype=torch.int8),
                       torch.empty(shape[:-1] + (shape[-1] // 16,)))
    sc = blocks[..., 192:208].view(np.int8)  # [R, nb, 16]
    # Two halves of 128 elements: half h reads ql[64h : 64h + 64] and qh[32h : 32h + 32]. Its elements
    # 0..63 are the low nibbles of those 64 ql bytes, 64..127 their high nibbles; element 32t + l takes
    # bits 2t, 2t + 1 of qh byte l as its bits 4, 5.
    ql = blocks[..., 0:128].reshape(R, nb, 2, 64)
    qh = blocks[..., 128:192].reshape(R, nb, 2, 1, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=-1)  # [R, nb, 2, 128]
    high = ((qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 1, 4, 1)) & 3).reshape(R, nb, 2, 128)
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)  # [R, nb, 2, 128] -> [R, K] below
    lead, K = shape[:-1], shape[-1]
    return _to_torch(q, shape), _to_torch(d[..., None] * sc.astype(np.float32), lead + (K // 16,))
