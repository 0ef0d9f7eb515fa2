"""llmkern.nn.QuantizedEmbedding: each looked-up row equals the dequantized table's row (int8 per row or per
group, int4 with offsets, int5: a byte per code with offsets), cast to the output dtype exactly as the float table would be; the decode
step program's native lookup (llmkern._C.quant_embedding_call) gives the same bits; bad ids and bad
tensors raise clear errors."""
from __future__ import annotations

import pytest
import torch

from llmkern import _backends, ops
from llmkern.nn import QuantizedEmbedding

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def table(fmt, V, H, G, seed=0):
    """Random canonical tensors of a [V, H] table (G = H: int8 per row) and the float32 table they dequantize to."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, H, generator=g) * 3
    if fmt == "int8":
        q, s = ops.quantize_int8(w, 0 if G == H else G)
        return {"weight": q, "weight_scale": s}, ops.dequantize_int8(q, s)
    if fmt == "int5":  # (codes 0..31 with a scale and an offset per group: a GGUF Q5 table's form)
        codes = torch.randint(0, 32, (V, H), generator=g, dtype=torch.uint8)
        sc = torch.rand(V, H // G, generator=g) * 0.1
        off = torch.randn(V, H // G, generator=g)
        full = (codes.view(V, H // G, G).double() * sc.double()[..., None]).float() + off[..., None]  # [V, H/G, G]
        return {"codes": codes, "scales": sc, "offsets": off}, full.view(V, H)
    qw, sc, off = ops.quantize_int4(w, G)
    return {"qweight": qw, "scales": sc, "offsets": off}, ops.dequantize_int4(qw, sc, off)


CASES = [("int8", 37, 96, 32), ("int8", 5, 48, 48), ("int8", 11, 64, 16), ("int4", 37, 96, 32), ("int4", 9, 256, 128),
         ("int5", 37, 96, 32), ("int5", 3, 64, 64)]


@pytest.mark.parametrize("fmt,V,H,G", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_equal_the_dequantized_table(fmt, V, H, G, dtype):
    t, full = table(fmt, V, H, G)
    emb = QuantizedEmbedding(t, dtype=dtype)
    want_table = full.to(dtype)
    ids = torch.randint(0, V, (3, 7))
    out = emb(ids)
    assert out.dtype == dtype and out.shape == (3, 7, H)
    assert torch.equal(out, want_table[ids])
    assert torch.equal(emb(ids.t()), want_table[ids.t()])  # non-contiguous ids
    assert torch.equal(emb(ids[0, 2]), want_table[ids[0, 2]])  # a 0-dim id -> [H]
    assert torch.equal(emb(ids.to(torch.int32)), want_table[ids])
    assert emb(ids[:, :0]).shape == (3, 0, H)
    assert torch.equal(emb.dequantize(), want_table)


def test_shares_the_given_tensors_and_counts_row_bytes():
    t, _ = table("int8", 10, 64, 32)
    emb = QuantizedEmbedding(t)
    assert emb.weight is t["weight"] and emb.weight_scale is t["weight_scale"]
    assert emb.row_bytes() == 64 + 2 * 4
    t4, _ = table("int4", 10, 64, 32)
    assert QuantizedEmbedding(t4).row_bytes() == 32 + 2 * 4 + 2 * 4
    t5, _ = table("int5", 10, 64, 32)
    assert QuantizedEmbedding(t5).row_bytes() == 64 + 2 * 4 + 2 * 4 and QuantizedEmbedding(t5).format == "int5"


def test_dtype_casts_change_the_output_not_the_buffers():
    t, full = table("int4", 12, 64, 32)
    emb = QuantizedEmbedding(t).to(torch.bfloat16)
    assert emb.dtype == torch.bfloat16 and emb.scales.dtype == torch.float32 and emb.qweight.dtype == torch.uint8
    ids = torch.tensor([0, 11, 3])
    assert torch.equal(emb(ids), full.to(torch.bfloat16)[ids])
    emb.float()
    assert emb(ids).dtype == torch.float32


def test_bad_ids_raise():
    t, _ = table("int8", 10, 32, 32)
    emb = QuantizedEmbedding(t)
    with pytest.raises(IndexError, match=r"ids must be in \[0, 10\), got \[0, 10\]"):
        emb(torch.tensor([0, 10]))
    with pytest.raises(IndexError, match="got \\[-1, 3\\]"):
        emb(torch.tensor([3, -1]))
    with pytest.raises(TypeError, match="integer tensor, got torch.float32"):
        emb(torch.tensor([1.0]))


def test_bad_tensors_raise():
    t, _ = table("int8", 10, 32, 16)
    with pytest.raises(ValueError, match="tensors must be"):
        QuantizedEmbedding({"weight": t["weight"]})
    with pytest.raises(TypeError, match="weight must be a non-empty torch.int8"):
        QuantizedEmbedding({"weight": t["weight"].to(torch.int16), "weight_scale": t["weight_scale"]})
    with pytest.raises(ValueError, match="weight_scale must be float32"):
        QuantizedEmbedding({"weight": t["weight"], "weight_scale": t["weight_scale"][:, :1].expand(10, 3)})
    with pytest.raises(ValueError, match="weight_scale must be float32"):
        QuantizedEmbedding({"weight": t["weight"], "weight_scale": t["weight_scale"].double()})
    t4, _ = table("int4", 10, 64, 32)
    with pytest.raises(ValueError, match="must have the same shape"):
        QuantizedEmbedding({**t4, "offsets": t4["offsets"][:, :1]})
    t5, _ = table("int5", 10, 64, 32)
    with pytest.raises(ValueError, match="must have the same shape"):
        QuantizedEmbedding({**t5, "offsets": t5["offsets"][:, :1]})
    with pytest.raises(TypeError, match="codes must be a non-empty torch.uint8"):
        QuantizedEmbedding({**t5, "codes": t5["codes"].to(torch.int8)})
    with pytest.raises(ValueError, match=r"\['codes', 'scales', 'offsets'\] \(int5\)"):
        QuantizedEmbedding({"codes": t5["codes"], "scales": t5["scales"]})
    with pytest.raises(TypeError, match="dtype must be"):
        QuantizedEmbedding(t, dtype=torch.int8)
    with pytest.raises(ValueError, match="format must be one of"):
        QuantizedEmbedding.from_gguf({"format": "float", "weight": torch.zeros(2, 2)})


needs_cpu = pytest.mark.skipif(not _backends.available("cpu"), reason="needs the C++ extension")


def native_rows(emb, ids, dtype):
    mod = _backends.cpu_module()
    ts = emb.tensors()
    H = emb.embedding_dim
    G = H if ts[1].dim() == 1 else H // ts[1].shape[1]
    out = torch.full((ids.numel(), H), float("nan"), dtype=dtype)  # poisoned: unwritten values fail
    tokens = ids.reshape(-1).to(torch.int64).contiguous()
    call = mod.quant_embedding_call(emb.format, ts[0].data_ptr(), ts[1].data_ptr(),
                                    ts[2].data_ptr() if len(ts) > 2 else 0, emb.num_embeddings, H, G,
                                    _DTYPE_CODE[dtype], tokens.data_ptr(), tokens.numel(), out.data_ptr())
    prog = mod.StepProgram()
    prog.append(call)
    prog.run()
    return out


@needs_cpu
@pytest.mark.parametrize("fmt,V,H,G", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_native_lookup_gives_the_same_bits(fmt, V, H, G, dtype):
    t, _ = table(fmt, V, H, G, seed=3)
    emb = QuantizedEmbedding(t, dtype=dtype)
    ids = torch.tensor([V - 1, 0, 4 % V, 4 % V, 2 % V])
    assert torch.equal(native_rows(emb, ids, dtype), emb(ids))


@needs_cpu
@pytest.mark.parametrize("fmt", ["int4", "int5"])
def test_native_lookup_keeps_the_product_rounded(fmt):
    """q * scale + offset with the product rounded to fp32 first (no fused multiply-add): a value where the two
    differ. scale = 1 + 2^-23, q = 3, offset = -3: fused 3 * 2^-23 (exact); separate, 3 * (1 + 2^-23) is 3 plus
    1.5 ulps (an ulp at 3 is 2^-22), rounded half to even to 3 + 2^-21, and - 3 leaves 2^-21."""
    q = ({"qweight": torch.tensor([[0x33, 0x33]], dtype=torch.uint8)} if fmt == "int4"  # q = 3 everywhere, H = 4
         else {"codes": torch.full((1, 4), 3, dtype=torch.uint8)})
    s = torch.tensor([[1 + 2.0 ** -23]], dtype=torch.float32)
    o = torch.tensor([[-3.0]], dtype=torch.float32)
    emb = QuantizedEmbedding({**q, "scales": s, "offsets": o})
    want = emb(torch.tensor([0]))
    assert want[0, 0].item() == 2.0 ** -21
    assert torch.equal(native_rows(emb, torch.tensor([0]), torch.float32), want)


@needs_cpu
def test_native_lookup_checks_ids_and_arguments():
    mod = _backends.cpu_module()
    t, _ = table("int8", 10, 32, 16)
    emb = QuantizedEmbedding(t)
    with pytest.raises(IndexError, match="token id 10 of batch row 1 is out of range for a vocabulary of 10"):
        native_rows(emb, torch.tensor([1, 10]), torch.float32)
    w, s = t["weight"], t["weight_scale"]
    tok, out = torch.zeros(1, dtype=torch.int64), torch.empty(1, 32)
    args = dict(format="int8", w_ptr=w.data_ptr(), scale_ptr=s.data_ptr(), offset_ptr=0, V=10, H=32, G=16, dtype=0,
                tokens_ptr=tok.data_ptr(), B=1, out_ptr=out.data_ptr())
    for bad, msg in ((dict(format="int6"), "format must be 'int8', 'int8_packed', 'int4' or 'int5'"),
                     (dict(G=5), "G must divide H=32"), (dict(dtype=3), "dtype must be 0"), (dict(offset_ptr=s.data_ptr()), "int8 takes no offsets"),
                     (dict(w_ptr=0), "w_ptr is a null pointer"), (dict(V=0), "need V >= 1")):
        with pytest.raises(ValueError, match=msg):
            mod.quant_embedding_call(**{**args, **bad})
