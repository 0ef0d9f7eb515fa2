"""Exact GGUF -> llmkern canonical converters (see llmkern/formats/README.md).

A GGUF tensor of a block-quantized type is a run of blocks, each encoding 32 consecutive elements of a
row along the innermost dimension (GGUF's ne[0], which is K of a linear weight; the torch shape is the
GGUF shape reversed: ne = [K, N] <-> torch [N, K]). Blocks (little-endian, d and m float16):

    Q8_0  34 bytes: d, qs int8[32]                 value[i] = qs[i] * d
    Q4_0  18 bytes: d, qs uint8[16]                value[i] = (q[i] - 8) * d
    Q4_1  20 bytes: d, m, qs uint8[16]             value[i] = q[i] * d + m
    (Q4_x: q[i] = qs[i] & 0xF for i < 16, q[i] = qs[i - 16] >> 4 for i >= 16)

The canonical int4 layout puts element 2j in the low nibble and 2j+1 in the high nibble of byte j, so
the nibbles are reordered here; scales/offsets become float32 per group of 32 (offset = -8 * d for Q4_0,
m for Q4_1). All of it is exact: q * d is exact in fp32 (4- or 8-bit integer times an 11-bit fp16
significand), so dequantize(canonical) equals gguf.quants.dequantize(raw) bit for bit. The one exception
is the sign of zero: a Q4_0 element with q == 8 and d < 0 is -0.0 in gguf's (q - 8) * d and +0.0 in
8 * d + (-8 * d); the values compare equal and no matmul result depends on it.

Shapes passed to the converters are torch order (..., K), i.e. GGUF's ne reversed.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .gguf_file import TYPES

BLOCK = 32  # elements per block of Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 (the K-quants: 256, gguf_kquants.py)

# GGML type id -> name (gguf.GGMLQuantizationType), so that dispatch needs no gguf import.
_GGML_TYPES = {i: t[0] for i, t in TYPES.items()}
# type name -> (elements, bytes) per block, for every type the file format knows
_BLOCK_OF = {t[0]: (t[1], t[2]) for t in TYPES.values()}
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K", "Q5_1", "Q5_K")
# Types with no exact canonical quantized form (5-bit values with a per-group minimum): loaded as float32,
# exactly gguf's dequantized values.
FLOAT_ONLY_TYPES = ("Q5_1", "Q5_K")


def _what(name: str | None) -> str:
    return f"GGUF tensor {name!r}" if name else "llmkern.formats.gguf"


def _check_shape(shape, type_name: str, name: str | None) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"{_what(name)}: shape must be a sequence of ints, got {shape!r}") from None
    if len(shape) < 1 or any(s < 0 for s in shape):
        raise ValueError(f"{_what(name)}: shape must be a non-empty sequence of sizes >= 0, got {shape}")
    block = _BLOCK_OF[type_name][0]
    if shape[-1] % block:
        raise ValueError(
            f"{_what(name)}: shape {shape} (torch order) has K = shape[-1] = {shape[-1]}, which is not a "
            f"multiple of the {type_name} block size {block}"
        )
    return shape


def _as_array(raw, name: str | None) -> np.ndarray:
    """raw (numpy uint8 array of any shape, bytes-like, or a CPU uint8 torch tensor) -> uint8 ndarray."""
    if isinstance(raw, torch.Tensor):
        if raw.dtype != torch.uint8:
            raise TypeError(f"{_what(name)}: raw must hold uint8 block bytes, got a {raw.dtype} tensor")
        raw = raw.detach().cpu().numpy()
    if isinstance(raw, (bytes, bytearray, memoryview)):
        return np.frombuffer(raw, dtype=np.uint8)
    if not isinstance(raw, np.ndarray):
        raise TypeError(f"{_what(name)}: raw must be a numpy uint8 array or bytes, got {type(raw).__name__}")
    if raw.dtype != np.uint8:
        raise TypeError(f"{_what(name)}: raw must hold uint8 block bytes, got dtype {raw.dtype}")
    return raw


def _blocks(raw, shape, type_name: str, name: str | None, copy: bool = True):
    """Validate raw against shape; return (shape, blocks uint8 [R, K // block, block_bytes]) with
    R = prod(shape[:-1]) and block the type's elements per block (32, or 256 for the K-quants).
    copy=False: a contiguous view of raw where it is one (e.g. of the file's read-only memory map)."""
    shape = _check_shape(shape, type_name, name)
    block, nbytes = _BLOCK_OF[type_name]
    K = shape[-1]
    rows = math.prod(shape[:-1])
    row_bytes = K // block * nbytes
    raw = _as_array(raw, name)
    if raw.ndim >= 2 and tuple(raw.shape) != shape[:-1] + (row_bytes,):
        # GGUFReader hands out [..., bytes per row]: a mismatch usually means GGUF's ne order was passed.
        raise ValueError(
            f"{_what(name)}: raw has shape {tuple(raw.shape)}, expected {shape[:-1] + (row_bytes,)} for "
            f"{type_name} shape {shape} (torch order, i.e. GGUF's ne reversed)"
        )
    flat = raw.reshape(-1)
    if flat.size != rows * row_bytes:
        raise ValueError(
            f"{_what(name)}: raw has {flat.size} bytes, expected {rows * row_bytes} for {type_name} shape "
            f"{shape} ({rows} rows x {K // block} blocks x {nbytes} bytes): truncated or corrupt data"
        )
    # One copy out of the (possibly read-only, memory-mapped) file: [R * blocks * bytes] -> [R, K/block, bytes].
    arr = np.array(flat, dtype=np.uint8, copy=True) if copy else np.ascontiguousarray(flat)
    return shape, arr.reshape(rows, K // block, nbytes)


def _f16_field(blocks: np.ndarray, start: int, what: str, type_name: str, name: str | None) -> np.ndarray:
    """Little-endian float16 at byte `start` of every block -> float32 [R, blocks per row]; must be finite."""
    f16 = np.ascontiguousarray(blocks[..., start:start + 2]).view("<f2")[..., 0]  # [R, nb, 2] -> [R, nb]
    bad = ~np.isfinite(f16)
    if bad.any():
        r, b = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{_what(name)}: {type_name} block {b} of row {r} has a non-finite {what} ({f16[r, b]}): corrupt data"
        )
    return f16.astype(np.float32)


def _unpack_q4_blocks(blocks: np.ndarray, start: int) -> np.ndarray:
    """Q4_x nibbles of blocks [R, nb, bytes] -> canonical packed uint8 [R, nb * 16] (low nibble = even k)."""
    qs = blocks[..., start:start + 16]  # [R, nb, 16]
    # GGUF order inside a block: elements 0..15 are the low nibbles, 16..31 the high nibbles, so the
    # block's canonical byte j < 8 pairs the low nibbles of qs[2j], qs[2j + 1] and byte 8 + j their high
    # nibbles: computed on the even / odd bytes directly (half-size arrays, no element-order copy).
    even, odd = qs[..., 0::2], qs[..., 1::2]  # [R, nb, 8] each
    out = np.empty(qs.shape, dtype=np.uint8)  # [R, nb, 16]
    np.bitwise_or(even & 0x0F, (odd & 0x0F) << 4, out=out[..., :8])
    np.bitwise_or(even >> 4, odd & 0xF0, out=out[..., 8:])
    return out.reshape(out.shape[0], -1)  # [R, K // 2]: byte j = q[2j] | q[2j + 1] << 4


def _to_torch(a: np.ndarray, shape) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).reshape(shape)


def q8_0_to_int8(raw, shape, *, name: str | None = None):
    """GGUF Q8_0 blocks -> (weight int8 [..., K], weight_scale float32 [..., K // 32]), exact.

    raw: the tensor's block bytes (GGUFReader's `tensor.data`, uint8); shape: torch order (..., K).
    Feed the pieces to `llmkern.ops.int8_linear` (per-group scales, G = 32).
    """
    shape, blocks = _blocks(raw, shape, "Q8_0", name)
    scale = _f16_field(blocks, 0, "scale d", "Q8_0", name)  # [R, nb]
    q = blocks[..., 2:].view(np.int8)  # [R, nb, 32]; element order is already k order
    return _to_torch(q, shape), _to_torch(scale, shape[:-1] + (shape[-1] // BLOCK,))


def _q4_to_int4(raw, shape, type_name: str, name: str | None):
    shape, blocks = _blocks(raw, shape, type_name, name)
    d = _f16_field(blocks, 0, "scale d", type_name, name)  # [R, nb]
    if type_name == "Q4_0":
        offset = d * np.float32(-8.0)  # (q - 8) * d = q * d + (-8 * d); -8 * d is exact
        qstart = 2
    else:
        offset = _f16_field(blocks, 2, "minimum m", type_name, name)
        qstart = 4
    packed = _unpack_q4_blocks(blocks, qstart)
    lead, K = shape[:-1], shape[-1]
    gshape = lead + (K // BLOCK,)
    return _to_torch(packed, lead + (K // 2,)), _to_torch(d, gshape), _to_torch(offset, gshape)


def q4_0_to_int4(raw, shape, *, name: str | None = None):
    """GGUF Q4_0 blocks -> canonical int4 (qweight uint8 [..., K // 2], scales, offsets float32 [..., K // 32]).

    scales = d, offsets = -8 * d, so q * scale + offset == (q - 8) * d exactly. shape: torch order (..., K).
    """
    return _q4_to_int4(raw, shape, "Q4_0", name)


def q4_1_to_int4(raw, shape, *, name: str | None = None):
    """GGUF Q4_1 blocks -> canonical int4 (qweight uint8 [..., K // 2], scales = d, offsets = m, float32 [..., K // 32])."""
    return _q4_to_int4(raw, shape, "Q4_1", name)


def _float_tensor(data, shape, type_name: str, name: str) -> torch.Tensor:
    """F32/F16/BF16 data -> torch tensor of that dtype, torch-order shape, in its own (writable) memory."""
    n = math.prod(shape)
    if type_name == "BF16":
        # GGUFReader gives BF16 as raw bytes; two per element, reinterpreted as bfloat16 bits.
        arr = _as_array(data, name).reshape(-1)
        if arr.size != 2 * n:
            raise ValueError(f"{_what(name)}: BF16 data has {arr.size} bytes, expected {2 * n} for shape {shape}: truncated or corrupt data")
        bits = torch.from_numpy(np.array(arr, copy=True).view("<i2"))
        return bits.view(torch.bfloat16).reshape(shape)
    want = np.float32 if type_name == "F32" else np.float16
    arr = np.asarray(data)
    if arr.dtype == np.uint8:  # raw bytes (e.g. from another reader): reinterpret
        arr = np.ascontiguousarray(arr).reshape(-1).view("<f4" if type_name == "F32" else "<f2")
    if arr.dtype != want:
        raise TypeError(f"{_what(name)}: {type_name} data must be {np.dtype(want)}, got {arr.dtype}")
    if arr.size != n:
        raise ValueError(f"{_what(name)}: {type_name} data has {arr.size} elements, expected {n} for shape {shape}: truncated or corrupt data")
    return torch.from_numpy(np.array(arr, copy=True).reshape(shape))


def gguf_type_name(tensor_type) -> str:
    """A GGMLQuantizationType (or its int id) -> its name ("Q4_1", ...)."""
    name = getattr(tensor_type, "name", None)
    if name is not None:
        return name
    return _GGML_TYPES.get(int(tensor_type), f"type id {int(tensor_type)}")


def load_gguf_tensor(tensor, *, int5: bool = False) -> dict:
    """One tensor of a GGUF file (`gguf_file.GGUFFile`'s, or a `gguf.GGUFReader`'s) -> a dict of torch tensors
    in llmkern's canonical layouts.

    Returns, with "type" the GGUF type name and shapes in torch order (GGUF's ne reversed):
    - F32 / F16 / BF16: {"format": "float", "type", "weight": tensor of that dtype};
    - Q8_0, Q5_0: {"format": "int8", "type", "weight": int8 [..., K], "weight_scale": float32 [..., K // 32]};
      Q6_K the same with "weight_scale" [..., K // 16];
    - Q4_0 / Q4_1 / Q4_K: {"format": "int4", "type", "qweight": uint8 [..., K // 2], "scales", "offsets":
      float32 [..., K // 32]};
    - Q5_1 / Q5_K (FLOAT_ONLY_TYPES: no exact form a quantized linear takes): {"format": "float", "type", "weight":
      float32}; with int5=True their exact 5-bit form, {"format": "int5", "type", "codes": uint8 [..., K] in 0..31,
      "scales", "offsets": float32 [..., K // 32]} (`gguf_kquants.q5_to_int5`: what a QuantizedEmbedding holds).
    Any other type raises ValueError naming the tensor and its type; truncated or corrupt data raises ValueError.
    """
    from . import gguf_kquants as kq

    name = str(tensor.name)
    type_name = gguf_type_name(tensor.tensor_type)
    shape = tuple(int(s) for s in reversed(list(tensor.shape)))  # GGUF ne order -> torch order
    out = {"type": type_name}
    if type_name in ("F32", "F16", "BF16"):
        out.update(format="float", weight=_float_tensor(tensor.data, shape, type_name, name))
    elif type_name == "Q8_0":
        w, s = q8_0_to_int8(tensor.data, shape, name=name)
        out.update(format="int8", weight=w, weight_scale=s)
    elif type_name in ("Q5_0", "Q6_K"):
        w, s = (kq.q5_0_to_int8 if type_name == "Q5_0" else kq.q6_k_to_int8)(tensor.data, shape, name=name)
        out.update(format="int8", weight=w, weight_scale=s)
    elif type_name in ("Q4_0", "Q4_1", "Q4_K"):
        conv = {"Q4_0": q4_0_to_int4, "Q4_1": q4_1_to_int4, "Q4_K": kq.q4_k_to_int4}[type_name]
        q, s, o = conv(tensor.data, shape, name=name)
        out.update(format="int4", qweight=q, scales=s, offsets=o)
    elif type_name in FLOAT_ONLY_TYPES and int5:
        q, s, o = kq.q5_to_int5(tensor.data, shape, type_name, name=name)
        out.update(format="int5", codes=q, scales=s, offsets=o)
    elif type_name in FLOAT_ONLY_TYPES:
        conv = kq.q5_1_to_float if type_name == "Q5_1" else kq.q5_k_to_float
        out.update(format="float", weight=conv(tensor.data, shape, name=name))
    else:
        raise ValueError(
            f"GGUF tensor {name!r} has type {type_name}, which llmkern cannot load "
            f"(supported: {', '.join(SUPPORTED_TYPES)})"
        )
    return out
