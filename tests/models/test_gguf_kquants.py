"""GGUF Q5_0 / Q5_1 / Q4_K / Q5_K / Q6_K -> llmkern (llmkern/formats/gguf_kquants.py): bit-exact against
gguf.quants.dequantize on random blocks (every byte random, float16 fields of every kind) and gguf's own
Q5 quantizer, hand-built blocks for the bit layouts, a GGUF file holding them, and a tiny model of
K-quant tensors (the types of a Q4_K_M / Q5_K_M file) loaded and run against the float model (Q5_1 / Q5_K:
re-quantized to int8 per 32 by default, exact float with quant="none")."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from llmkern import nn as lnn  # noqa: E402
from llmkern import ops  # noqa: E402
from llmkern.formats import gguf as fmt  # noqa: E402
from llmkern.formats import gguf_kquants as kq  # noqa: E402
from llmkern.models import GGUFError, Llama, load_gguf  # noqa: E402

from _tiny_gguf import assert_greedy_tokens, random_blocks, tiny_config, write_tiny_gguf  # noqa: E402

QT = gguf.GGMLQuantizationType
KQUANTS = ("Q4_K", "Q5_K", "Q6_K")


@pytest.fixture(params=["native", "numpy"])
def impl(request, monkeypatch):
    """Both implementations of the converters: llmkern._C.gguf_unpack and the numpy path."""
    if request.param == "native" and kq._native() is None:
        pytest.skip("llmkern._C has no gguf_unpack")
    monkeypatch.setattr(kq, "NATIVE", request.param == "native")
    return request.param


def canonical(type_name: str, raw, shape) -> torch.Tensor:
    """The type's converter, then llmkern's own dequantizer -> float32 tensor of `shape`."""
    if type_name == "Q5_0":
        return ops.dequantize_int8(*_2d(kq.q5_0_to_int8(raw, shape))).reshape(shape)
    if type_name == "Q6_K":
        w, s = kq.q6_k_to_int8(raw, shape)
        assert w.shape == shape and w.dtype == torch.int8 and s.shape == shape[:-1] + (shape[-1] // 16,)
        assert int(w.min()) >= -32 and int(w.max()) <= 31
        return ops.dequantize_int8(*_2d((w, s))).reshape(shape)
    if type_name == "Q4_K":
        q, s, o = kq.q4_k_to_int4(raw, shape)
        assert q.shape == shape[:-1] + (shape[-1] // 2,) and s.shape == o.shape == shape[:-1] + (shape[-1] // 32,)
        return ops.dequantize_int4(*_2d((q, s, o))).reshape(shape)
    out = (kq.q5_1_to_float if type_name == "Q5_1" else kq.q5_k_to_float)(raw, shape)
    assert out.shape == shape and out.dtype == torch.float32
    return out


def _2d(parts):
    """[..., X] pieces -> [R, X] (the dequantizers take 2-D)."""
    return [p.reshape(-1, p.shape[-1]) for p in parts]


def gguf_values(raw, type_name, shape) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf.quants.dequantize(raw, QT[type_name]), dtype=np.float32)).reshape(shape)


def f16_of_every_kind(rng):
    """float16 field values: normal of both signs, subnormal, zero, large (d, dmin and m alike)."""
    def draw(shape):
        n = math.prod(shape)
        kinds = np.concatenate([rng.standard_normal(n) * 0.01, rng.standard_normal(n) * 1e-6, np.zeros(n),
                                rng.standard_normal(n) * 1000.0])
        return rng.choice(kinds, size=shape)
    return draw


SHAPES = {"Q5_0": [(1, 32), (17, 96), (3, 5, 64)], "Q5_1": [(1, 32), (17, 96), (3, 5, 64)],
          **{t: [(1, 256), (17, 512), (3, 5, 256), (33, 768)] for t in KQUANTS}}


@pytest.mark.parametrize("type_name,shape", [(t, s) for t, ss in SHAPES.items() for s in ss], ids=str)
def test_bit_exact_on_random_blocks(type_name, shape, impl):
    rng = np.random.default_rng(sum(shape) + len(type_name))
    raw = random_blocks(type_name, shape, rng, f16_of_every_kind(rng))
    ours, theirs = canonical(type_name, raw, shape), gguf_values(raw, type_name, shape)
    differ = ours.view(torch.int32) != theirs.view(torch.int32)
    assert not differ.any(), f"{int(differ.sum())} of {differ.numel()} elements differ"


@pytest.mark.parametrize("type_name,shape", [(t, s) for t in ("Q5_1", "Q5_K") for s in SHAPES[t]], ids=str)
def test_int5_form_is_bit_exact_on_random_blocks(type_name, shape):
    """Q5_1 / Q5_K in their 5-bit form (codes, scales, offsets: what QuantizedEmbedding holds for a Q5 table) give
    gguf's values bit for bit through the embedding's dequantizer, float16 fields of every kind included."""
    from llmkern.nn.embedding import _dequantize_int5
    rng = np.random.default_rng(sum(shape) + 7 * len(type_name))
    raw = random_blocks(type_name, shape, rng, f16_of_every_kind(rng))
    q, s, o = kq.q5_to_int5(raw, shape, type_name)
    assert q.shape == shape and q.dtype == torch.uint8 and int(q.max()) <= 31
    assert s.shape == o.shape == shape[:-1] + (shape[-1] // 32,) and s.dtype == o.dtype == torch.float32
    ours = _dequantize_int5(*_2d((q, s, o))).reshape(shape)
    differ = ours.view(torch.int32) != gguf_values(raw, type_name, shape).view(torch.int32)
    assert not differ.any(), f"{int(differ.sum())} of {differ.numel()} elements differ"
    with pytest.raises(ValueError, match="type must be Q5_1 or Q5_K"):
        kq.q5_to_int5(raw, shape, "Q4_K" if type_name == "Q5_K" else "Q5_0")


@pytest.mark.parametrize("type_name", ["Q5_0", "Q5_1"])
def test_bit_exact_on_gguf_quantizer(type_name, impl):
    rng = np.random.default_rng(1)
    data = (rng.standard_normal((9, 160)) * rng.uniform(1e-3, 2.0, size=(9, 1))).astype(np.float32)
    data[0, :32] = 0.0
    raw = gguf.quants.quantize(data, QT[type_name])
    ours, theirs = canonical(type_name, raw, data.shape), gguf_values(raw, type_name, data.shape)
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))
    assert (ours - torch.from_numpy(data)).norm() < 0.1 * torch.from_numpy(data).norm()  # it is the data


# ------------------------------------------------------------------ bit layouts by hand


def test_q4_k_layout_by_hand(impl):
    """Sub-block j: sc = 2j + 1, m = 63 - j (bytes 0..7 and the top bits / nibbles of 8..11), d = 1,
    dmin = 0.5; qs chunk c's byte l = l % 16 | (15 - l % 16) << 4: sub-block 2c holds 0..15, 0..15, sub-block
    2c + 1 holds 15..0, 15..0."""
    sc, m = [2 * j + 1 for j in range(8)], [63 - j for j in range(8)]
    b = np.zeros(144, dtype=np.uint8)
    b[0:2] = np.array([1.0], "<f2").view(np.uint8)
    b[2:4] = np.array([0.5], "<f2").view(np.uint8)
    for j in range(4):
        b[4 + j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6)
        b[8 + j] = (m[j] & 63) | ((m[j + 4] >> 4) << 6)
        b[12 + j] = (sc[j + 4] & 15) | ((m[j + 4] & 15) << 4)
    b[16:] = [(l % 16) | ((15 - l % 16) << 4) for _ in range(4) for l in range(32)]
    q, s, o = kq.q4_k_to_int4(b, (1, 256))
    assert s.tolist() == [[float(x) for x in sc]] and o.tolist() == [[-0.5 * x for x in m]]
    low, high = [l % 16 for l in range(32)], [15 - l % 16 for l in range(32)]
    assert ops.unpack_int4(q).tolist() == [(low + high) * 4]
    want = [v * sc[j] - 0.5 * m[j] for j in range(8) for v in (low if j % 2 == 0 else high)]
    assert ops.dequantize_int4(q, s, o).tolist() == [want] == gguf_values(b, "Q4_K", (1, 256)).tolist()


def test_q6_k_layout_by_hand(impl):
    """q = element % 64 for every element (so q - 32 runs -32..31 four times): ql / qh written from the
    element order the docstring gives; scales 1..16 (sub-block j), d = 0.25."""
    q = np.arange(256) % 64
    b = np.zeros(210, dtype=np.uint8)
    for h in range(2):
        for t in range(4):
            for l in range(32):
                e = 128 * h + 32 * t + l
                byte = 64 * h + 32 * (t % 2) + l  # t = 0, 1: low nibbles; 2, 3: high nibbles
                b[byte] |= (q[e] & 15) << (4 * (t // 2))
                b[128 + 32 * h + l] |= (q[e] >> 4) << (2 * t)
    b[192:208] = np.arange(1, 17, dtype=np.int8).view(np.uint8)
    b[208:210] = np.array([0.25], "<f2").view(np.uint8)
    w, s = kq.q6_k_to_int8(b, (1, 256))
    assert w.tolist() == [(q - 32).tolist()] and s.tolist() == [[0.25 * j for j in range(1, 17)]]
    assert torch.equal(ops.dequantize_int8(w, s), gguf_values(b, "Q6_K", (1, 256)))


def test_q5_0_bit_order_by_hand(impl):
    """Element i's bit 4 is bit i of the little-endian u32 qh: set for odd i only."""
    b = np.zeros(22, dtype=np.uint8)
    b[0:2] = np.array([2.0], "<f2").view(np.uint8)
    b[2:6] = np.array([0xAAAAAAAA], "<u4").view(np.uint8)
    b[6:] = [i | (15 - i) << 4 for i in range(16)]
    w, s = kq.q5_0_to_int8(b, (1, 32))
    low = list(range(16)) + list(range(15, -1, -1))
    assert w.tolist() == [[v + 16 * (i % 2) - 16 for i, v in enumerate(low)]] and s.tolist() == [[2.0]]


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("type_name,start", [("Q4_K", 0), ("Q4_K", 2), ("Q5_K", 2), ("Q6_K", 208), ("Q5_0", 0),
                                             ("Q5_1", 2)])
def test_non_finite_field_is_corrupt(type_name, start, impl):
    rng = np.random.default_rng(0)
    shape = (3, 512) if type_name in KQUANTS else (3, 64)
    raw = random_blocks(type_name, shape, rng, lambda s: np.full(s, 0.5))
    raw[2, start:start + 2] = np.array([np.nan], "<f2").view(np.uint8)
    with pytest.raises(ValueError, match=f"{type_name} block 0 of row 2 has a non-finite .*corrupt"):
        canonical(type_name, raw, shape)


def test_k_not_a_multiple_of_256():
    with pytest.raises(ValueError, match=r"K = shape\[-1\] = 288, which is not a multiple of the Q4_K block size 256"):
        kq.q4_k_to_int4(np.zeros(144 * 2, np.uint8), (2, 288))


def test_truncated_blocks(impl):
    raw = np.zeros((2, 210), np.uint8).reshape(-1)[:-1]
    with pytest.raises(ValueError, match=r"419 bytes, expected 420 for Q6_K shape \(2, 256\).*truncated"):
        kq.q6_k_to_int8(raw, (2, 256))


# ------------------------------------------------------------------ a file, and a model


def _write(path, arrays):
    w = gguf.GGUFWriter(str(path), "llama")
    for name, (raw, type_name) in arrays.items():
        w.add_tensor(name, raw, raw_dtype=QT[type_name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def test_load_gguf_tensor_forms(tmp_path):
    rng = np.random.default_rng(3)
    shapes = {"Q5_0": (5, 64), "Q5_1": (2, 3, 32), "Q4_K": (7, 512), "Q5_K": (4, 256), "Q6_K": (6, 768),
              "Q3_K": (2, 256)}
    arrays = {t: (random_blocks(t, s, rng, lambda n: rng.standard_normal(n) * 0.01), t) for t, s in shapes.items()}
    tensors = _write(tmp_path / "k.gguf", arrays)
    forms = {"Q5_0": "int8", "Q5_1": "float", "Q4_K": "int4", "Q5_K": "float", "Q6_K": "int8"}
    for t, form in forms.items():
        r = fmt.load_gguf_tensor(tensors[t])
        assert r["type"] == t and r["format"] == form
        if form == "float":
            assert r["weight"].dtype == torch.float32 and t in fmt.FLOAT_ONLY_TYPES
            ours = r["weight"]
        elif form == "int8":
            ours = ops.dequantize_int8(*_2d((r["weight"], r["weight_scale"])))
        else:
            ours = ops.dequantize_int4(*_2d((r["qweight"], r["scales"], r["offsets"])))
        assert torch.equal(ours.reshape(shapes[t]), gguf_values(tensors[t].data, t, shapes[t])), t
    with pytest.raises(ValueError, match=r"'Q3_K' has type Q3_K, which llmkern cannot load \(supported: .*Q4_K"):
        fmt.load_gguf_tensor(tensors["Q3_K"])
    for t, form in forms.items():  # int5=True: the Q5 types in their exact 5-bit form; the others as before
        r = fmt.load_gguf_tensor(tensors[t], int5=True)
        assert r["format"] == ("int5" if form == "float" else form), t
        if r["format"] == "int5":
            from llmkern.nn.embedding import _dequantize_int5
            ours = _dequantize_int5(*_2d((r["codes"], r["scales"], r["offsets"])))
            assert torch.equal(ours.reshape(shapes[t]), gguf_values(tensors[t].data, t, shapes[t])), t


# the types of a Q4_K_M file (and Q5_K_M's Q5_K; Q5_1 where a row is no multiple of 256): hidden 256 and
# intermediate 512, as the K-quants need rows of multiples of 256
KTYPES = {"token_embd": "Q6_K", "attn_q": "Q4_K", "attn_k": "Q5_0", "attn_v": "Q6_K", "attn_output": "Q5_K",
          "ffn_gate": "Q4_K", "ffn_up": "Q5_1", "ffn_down": "Q6_K", "output": "Q4_K"}


@pytest.fixture(scope="module", params=["Q6_K", "Q5_K"])
def kquant_file(tmp_path_factory, request):
    """The tiny K-quant model, its token table Q6_K (int8, as Q4_K_M files of tied models hold it) or Q5_K (Q5_K_M
    files of untied ones: held in its 5-bit form)."""
    path = tmp_path_factory.mktemp("kq") / "tiny_k.gguf"
    cfg, sd = write_tiny_gguf(path, types={**KTYPES, "token_embd": request.param},
                              cfg=tiny_config(hidden_size=256, intermediate_size=512))
    return path, cfg, sd


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


def requantized_sd(sd, cfg):
    """sd with the Q5_1 / Q5_K linears (attn_output, ffn_up) as the loader holds them: int8, a scale per 32,
    re-quantized from their exact values."""
    out = dict(sd)
    for i in range(cfg.num_layers):
        for name in ("self_attn.o_proj", "mlp.up_proj"):
            key = f"layers.{i}.{name}.weight"
            out[key] = ops.dequantize_int8(*ops.quantize_int8(sd[key], 32))
    return out


@pytest.mark.parametrize("backend", ["reference", None])
def test_kquant_model_matches_float_model(kquant_file, backend, capsys):
    path, cfg, sd = kquant_file
    model, _ = load_gguf(path, backend=backend, fuse=False)
    note = capsys.readouterr().err
    assert "4 Q5_1/Q5_K weights re-quantized to int8, a scale per 32 weights" in note  # o_proj, up_proj x 2 layers
    attn, mlp = model.layers[1].self_attn, model.layers[1].mlp
    assert isinstance(attn.q_proj, lnn.Int4Linear) and attn.q_proj.group_size == 32
    assert isinstance(attn.k_proj, lnn.Int8Linear) and attn.k_proj.weight_scale.shape == (128, 256 // 32)
    assert isinstance(attn.v_proj, lnn.Int8Linear) and attn.v_proj.weight_scale.shape == (128, 256 // 16)
    assert isinstance(mlp.down_proj, lnn.Int8Linear) and mlp.down_proj.weight_scale.shape == (256, 512 // 16)
    assert isinstance(model.lm_head, lnn.Int4Linear)
    for name, mod in (("self_attn.q_proj", attn.q_proj), ("self_attn.v_proj", attn.v_proj), ("mlp.down_proj", mlp.down_proj)):
        w = (ops.dequantize_int4(mod.qweight, mod.scales, mod.offsets) if isinstance(mod, lnn.Int4Linear)
             else ops.dequantize_int8(mod.weight, mod.weight_scale))
        assert torch.equal(w, sd[f"layers.1.{name}.weight"]), name  # exact
    for name, mod in (("self_attn.o_proj", attn.o_proj), ("mlp.up_proj", mlp.up_proj)):  # Q5_K, Q5_1
        assert isinstance(mod, lnn.Int8Linear) and mod.group_size == 32
        q, s = ops.quantize_int8(sd[f"layers.1.{name}.weight"], 32)
        assert torch.equal(mod.weight, q) and torch.equal(mod.weight_scale, s), name
    assert isinstance(model.embed_tokens, lnn.QuantizedEmbedding)  # (held as stored, rows dequantized per lookup)
    assert torch.equal(model.embed_tokens.dequantize(), sd["embed_tokens.weight"])
    ref = Llama(cfg, backend="reference")
    ref.load_state_dict(requantized_sd(sd, cfg))
    tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert rel(model(tokens), ref(tokens)) <= 1e-5
        # quant="none": every weight's exact value, as float
        exact, _ = load_gguf(path, quant="none", backend=backend, fuse=False)
        assert "re-quantized" not in capsys.readouterr().err
        assert type(exact.layers[1].mlp.up_proj) is torch.nn.Linear
        ref.load_state_dict(sd)
        assert rel(exact(tokens), ref(tokens)) <= 1e-5


def test_kquant_model_generates(kquant_file):
    """The runtime's decode over these modules (projections fused where the types agree, the CPU kernels,
    the decode step program): each greedy token is the float model's argmax."""
    from llmkern.models.generate import generate
    path, cfg, sd = kquant_file
    model, tok = load_gguf(path, progress=False)
    res = generate(model, tok, ["the"], max_new_tokens=6, chat=False)
    ref = Llama(cfg, backend="reference")
    ref.load_state_dict(requantized_sd(sd, cfg))
    assert_greedy_tokens(ref, res)


def test_tied_q5_embedding_gives_a_quantized_lm_head(tmp_path):
    """A tied Q5_1 token_embd: the lm_head reads it as int8 (not as the float embedding, 4x the bytes); the
    embedding holds it in its 5-bit form (gguf's values exactly, 1.25 bytes per weight instead of float32's 4), looked
    up eagerly and by the decode step program's native call alike; quant "none" holds one float table for both."""
    from llmkern.models.generate import generate
    one = {r: "Q4_1" for r in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    cfg, sd = write_tiny_gguf(tmp_path / "t.gguf", tied=True, types={"token_embd": "Q5_1", **one})  # (one type: fused)
    model, tok = load_gguf(tmp_path / "t.gguf", progress=False)
    assert isinstance(model.lm_head, lnn.Int8Linear) and model.lm_head.group_size == 32
    emb = model.embed_tokens
    assert isinstance(emb, lnn.QuantizedEmbedding) and emb.format == "int5"
    assert torch.equal(emb.dequantize(), sd["embed_tokens.weight"])  # the embedding: exact values
    ref = Llama(cfg.replace(tie_embeddings=False), backend="reference")
    ref.load_state_dict({**sd, "lm_head.weight": ops.dequantize_int8(model.lm_head.weight, model.lm_head.weight_scale)})
    assert_greedy_tokens(ref, generate(model, tok, ["the"], max_new_tokens=5, chat=False))
    with torch.inference_mode():
        cache, tokens = model.new_cache(1, 16), torch.tensor([[3, 1, 4, 5]])
        model(tokens[:, :3], cache, last_only=True)
        step = model(tokens[:, 3:], cache, last_only=True)
        plan = model.__dict__["_decode_plan"]
        assert plan.program is not None and plan.embed_q is not None  # (the step program's native int5 rows)
        assert rel(step, ref(tokens)[:, -1]) <= 1e-5
    exact, _ = load_gguf(tmp_path / "t.gguf", progress=False, quant="none", backend="reference", fuse=False)
    assert exact.lm_head.weight is exact.embed_tokens.weight


def test_native_unpacker_refuses_bad_arguments():
    mod = kq._native()
    if mod is None:
        pytest.skip("llmkern._C has no gguf_unpack")
    buf = torch.zeros(256)
    with pytest.raises(ValueError, match="type must be Q4_K, Q6_K, Q5_0, Q5_1 or Q5_K, got 'Q3_K'"):
        mod.gguf_unpack("Q3_K", buf.data_ptr(), 1, 1, buf.data_ptr())
    with pytest.raises(ValueError, match="raw_ptr is a null pointer"):
        mod.gguf_unpack("Q4_K", 0, 1, 1, buf.data_ptr(), buf.data_ptr(), buf.data_ptr())
    with pytest.raises(ValueError, match="R and nb must be >= 0"):
        mod.gguf_unpack("Q4_K", buf.data_ptr(), -1, 1, buf.data_ptr(), buf.data_ptr(), buf.data_ptr())


def test_keep_with_a_group_size_int4_cannot_take(kquant_file):
    """quant "keep" with group_size re-quantizes every tensor to its stored form with that group: 0 (per
    channel) exists for int8 only, so the Q4_K tensors are refused by name (it once became 32 silently), and
    a group that does not divide a tensor's K names the tensor and K."""
    path = kquant_file[0]
    with pytest.raises(GGUFError, match=r"group_size=0 cannot re-quantize tensor 'blk\.0\.attn_q\.weight' \(Q4_K\) to int4"):
        load_gguf(path, group_size=0, progress=False)
    with pytest.raises(GGUFError, match=r"re-quantizing tensor 'blk\.0\.attn_q\.weight' \(Q4_K, K=256\) to int8: .*group_size"):
        load_gguf(path, quant="int8", group_size=48, progress=False)
    m, _ = load_gguf(path, group_size=64, progress=False, fuse=False)  # every int form re-quantized per 64
    assert m.layers[0].self_attn.q_proj.group_size == 64 and m.layers[0].self_attn.k_proj.group_size == 64
