"""A small, fast GGUF reader: header, metadata and tensor table parsed with `struct` over a read-only
memory map, tensor data handed out as numpy views of it (nothing copied until a converter copies).

Why not `gguf.GGUFReader`: it builds numpy views for every element of every metadata field, which for
SmolLM2's 49152 vocabulary strings and 48900 merges is ~2.5 s of a ~3 s `llmkern generate` start; here
strings are decoded straight from the mapped bytes (~0.1 s). Its tensor objects look like GGUFReader's
where llmkern reads them (name, tensor_type, shape in GGUF's ne order, n_elements, n_bytes, data_offset,
data: float32/float16 arrays for F32/F16, uint8 [..., bytes per row] otherwise), so the converters of
llmkern/formats/gguf.py and `gguf.quants.dequantize` take them as they are.

File layout (GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor count, u64 metadata count;
metadata: (string key, u32 value type, value); tensor infos: (string name, u32 n_dims, u64 ne[n_dims],
u32 type, u64 offset); then padding to `general.alignment` (default 32) and the tensor data, each tensor
at its offset from there. A string is a u64 length and that many UTF-8 bytes.
"""
from __future__ import annotations

import mmap
import struct
from pathlib import Path

import numpy as np

# GGML type id -> (name, elements per block, bytes per block), as the GGUF / ggml specification has them
# (tests/test_gguf_file.py checks them against the gguf package's table).
TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}
# Element dtypes of the types GGUFReader also hands out as typed arrays (the rest: raw bytes per row).
_TYPED = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}
# Metadata value type -> struct format of one scalar, and numpy dtype for arrays of it.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
       12: "<f8"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


class GGUFFormatError(ValueError):
    """The file is not a readable GGUF file; the message says where (callers prefix the path)."""


class GGUFTensor:
    """One entry of the tensor table, its data a view of the mapped file."""

    __slots__ = ("name", "tensor_type", "shape", "n_elements", "n_bytes", "data_offset", "data")

    def __repr__(self) -> str:
        return f"GGUFTensor({self.name!r}, type {self.tensor_type}, ne {self.shape})"


class GGUFFile:
    """A parsed GGUF file: `version`, `metadata` {key: python value; arrays as lists}, `alignment`,
    `tensors` [GGUFTensor] in file order, `size` in bytes. Raises GGUFFormatError for a file that is not
    GGUF, is cut inside its header or data, or has a corrupt header."""

    def __init__(self, path):
        self.path = Path(path)
        self.size = self.path.stat().st_size
        if self.size < 4:
            raise GGUFFormatError(f"not a GGUF file ({self.size} bytes)")
        with open(self.path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # (stays valid once the file is closed)
        self._map = np.frombuffer(self._mm, dtype=np.uint8)  # [size] bytes, read-only
        self._buf = memoryview(self._map)
        self._pos = 0
        if bytes(self._buf[:4]) != b"GGUF":
            raise GGUFFormatError(f"not a GGUF file (starts with {bytes(self._buf[:4])!r}, expected b'GGUF')")
        try:
            self._parse()
        except _Truncated:
            raise GGUFFormatError(f"truncated: the file ({self.size} bytes) ends inside its header "
                                  f"(metadata / tensor table)") from None
        except (UnicodeError, struct.error, OverflowError, MemoryError, ValueError) as e:
            if isinstance(e, GGUFFormatError):
                raise
            raise GGUFFormatError(f"corrupt header near byte {self._pos}: {e}") from None

    # ------------------------------------------------------------------ parsing
    def release_pages(self) -> None:
        """Take the file's pages that reads touched out of this process's resident memory (MADV_DONTNEED: they stay
        in the page cache, and a later read maps them again, same bytes). The GGUF loader calls it after each layer:
        otherwise the whole mapped file counts toward the peak memory of a load, beside the model built from it."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self._mm.madvise(mmap.MADV_DONTNEED)

    def _take(self, n: int) -> int:
        """Advance past n bytes; returns where they start."""
        p = self._pos
        if n < 0 or p + n > self.size:
            raise _Truncated
        self._pos = p + n
        return p

    def _unpack(self, fmt: str):
        return struct.unpack_from(fmt, self._buf, self._take(struct.calcsize(fmt)))[0]

    def _string(self) -> str:
        n = self._unpack("<Q")
        p = self._take(n)
        return str(self._buf[p:p + n], "utf-8")

    def _strings(self, count: int) -> list:
        """`count` strings in a row: _string's loop with its lookups hoisted (a vocabulary is ~100k of them)."""
        buf, size, unpack, p, out = self._buf, self.size, _U64.unpack_from, self._pos, []
        append = out.append
        for _ in range(count):
            if p + 8 > size:
                raise _Truncated
            n = unpack(buf, p)[0]
            p += 8
            if p + n > size:
                raise _Truncated
            append(str(buf[p:p + n], "utf-8"))
            p += n
        self._pos = p
        return out

    def _value(self, vtype: int):
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            itype, count = self._unpack("<I"), self._unpack("<Q")
            if itype == _STRING:
                return self._strings(count)
            if itype in _NP:  # one numpy read for the whole array
                dt = np.dtype(_NP[itype])
                p = self._take(dt.itemsize * count)
                vals = np.frombuffer(self._buf, dtype=dt, count=count, offset=p).tolist()
                return [bool(v) for v in vals] if itype == 7 else vals
            if itype == _ARRAY:
                return [self._value(_ARRAY) for _ in range(count)]
            raise GGUFFormatError(f"unknown metadata array element type {itype} near byte {self._pos}")
        fmt = _SCALARS.get(vtype)
        if fmt is None:
            raise GGUFFormatError(f"unknown metadata value type {vtype} near byte {self._pos}")
        return self._unpack("<" + fmt)

    def _parse(self) -> None:
        self._take(4)
        self.version = self._unpack("<I")
        n_tensors, n_kv = self._unpack("<Q"), self._unpack("<Q")
        if self.version not in (2, 3):
            raise GGUFFormatError(f"GGUF version {self.version} is not supported (2 or 3)")
        self.metadata = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._unpack("<I"))
        align = self.metadata.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise GGUFFormatError(f"general.alignment must be a power of two, got {align!r}")
        self.alignment = align
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._unpack("<I")
            if n_dims > 8:
                raise GGUFFormatError(f"tensor {name!r} has {n_dims} dimensions")
            dims = [self._unpack("<Q") for _ in range(n_dims)]
            infos.append((name, dims, self._unpack("<I"), self._unpack("<Q")))
        start = -(-self._pos // align) * align
        self.tensors, seen = [], set()
        for name, dims, ttype, offset in infos:
            if name in seen:
                raise GGUFFormatError(f"tensor {name!r} appears twice in the tensor table")
            seen.add(name)
            self.tensors.append(self._tensor(name, dims, ttype, start + offset))

    def _tensor(self, name: str, dims: list, ttype: int, offset: int) -> GGUFTensor:
        info = TYPES.get(ttype)
        if info is None:
            raise GGUFFormatError(f"tensor {name!r} has an unknown type id {ttype}")
        _, block, type_bytes = info
        n = 1
        for d in dims:
            n *= d
        if dims and dims[0] % block:
            raise GGUFFormatError(f"tensor {name!r}: ne[0] = {dims[0]} is not a multiple of its type's block "
                                  f"of {block}")
        t = GGUFTensor()
        t.name, t.tensor_type, t.shape, t.n_elements = name, ttype, dims, n
        t.n_bytes, t.data_offset = n // block * type_bytes, offset
        end = offset + t.n_bytes
        if end > self.size:
            raise GGUFFormatError(f"truncated: tensor {name!r} ends at byte {end}, the file has {self.size}")
        rows = tuple(reversed(dims))  # torch order
        if ttype in _TYPED:
            t.data = np.frombuffer(self._buf, dtype=_TYPED[ttype], count=n, offset=offset).reshape(rows)
        else:  # [..., bytes per row]
            row = rows[-1] // block * type_bytes if rows else t.n_bytes
            t.data = np.frombuffer(self._buf, dtype=np.uint8, count=t.n_bytes, offset=offset).reshape(
                rows[:-1] + (row,))
        return t


class _Truncated(Exception):
    pass
