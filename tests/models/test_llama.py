"""The decoder against a naive float64 Llama written here, and its cached / paged / batched paths."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmkern import _backends
from llmkern.models import Llama, ModelConfig
from llmkern.models.config import PRESETS
from llmkern.nn import Int4Linear, quantize_linears

BACKENDS = [b for b in ("reference", "cpu") if _backends.available(b)]


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


def tiny(seed=0, backend="reference", dtype=torch.float32, **kw) -> Llama:
    """A 2-layer random model (GQA 4:2, head dim 32) with weights of a realistic scale, in `dtype`."""
    args = dict(vocab_size=101, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=160,
                rms_eps=1e-5, rope_base=10000.0, max_positions=96, tie_embeddings=False)
    args.update(kw)
    torch.manual_seed(seed)
    m = Llama(ModelConfig(**args), backend=backend, dtype=dtype).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, p.shape[-1] ** -0.5 if p.dim() == 2 and "embed" not in name else 1.0)
    return m


def naive_logits(model: Llama, tokens: torch.Tensor) -> torch.Tensor:
    """The Llama definition in float64, straight from the model's parameters: tokens [B, S] -> [B, S, V]."""
    c = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    B, S = tokens.shape
    Hq, Hk, D = c.num_heads, c.num_kv_heads, c.head_dim

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.rms_eps) * w

    inv = c.rope_base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # [D/2]
    ang = torch.arange(S, dtype=torch.float64)[:, None] * inv[None]  # [S, D/2]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)  # [S, D]

    def rope(x):  # x [B, S, H, D], rotate-half pairs (i, i + D/2)
        half = torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1)
        return x * cos[None, :, None] + half * sin[None, :, None]

    x = sd["embed_tokens.weight"][tokens]  # [B, S, H]
    mask = torch.ones(S, S, dtype=torch.bool).tril()
    for i in range(c.num_layers):
        p = f"layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = rope((h @ sd[p + "self_attn.q_proj.weight"].T).view(B, S, Hq, D))
        k = rope((h @ sd[p + "self_attn.k_proj.weight"].T).view(B, S, Hk, D))
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(B, S, Hk, D)
        k, v = k.repeat_interleave(Hq // Hk, 2), v.repeat_interleave(Hq // Hk, 2)  # GQA: kv head j serves q heads
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
        a = torch.einsum("bhqk,bkhd->bqhd", s.masked_fill(~mask, float("-inf")).softmax(-1), v)
        x = x + a.reshape(B, S, Hq * D) @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        g, u = h @ sd[p + "mlp.gate_proj.weight"].T, h @ sd[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(g) * u) @ sd[p + "mlp.down_proj.weight"].T
    return rms(x, sd["norm.weight"]) @ sd["lm_head.weight"].T


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,S", [(1, 1), (1, 17), (3, 33)])
def test_forward_matches_naive_float64(backend, B, S):
    m = tiny(backend=backend)
    tokens = torch.randint(0, 101, (B, S))
    with torch.inference_mode():
        assert rel(m(tokens), naive_logits(m, tokens)) <= 1e-5


def test_tied_embeddings_share_one_tensor():
    m = tiny(tie_embeddings=True)
    assert m.lm_head.weight is m.embed_tokens.weight
    tokens = torch.randint(0, 101, (2, 5))
    with torch.inference_mode():
        assert rel(m(tokens), naive_logits(m, tokens)) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("paged", [False, True])
def test_cached_decode_equals_full_forward(backend, paged):
    m = tiny(backend=backend)
    tokens = torch.randint(0, 101, (1, 21))
    with torch.inference_mode():
        full = m(tokens)  # [1, 21, V], no cache
        cache = m.new_cache(1, 32, paged=paged, block_size=4)
        ids = [c.add_sequence() for c in cache][:1] if paged else None
        steps = [m(tokens[:, :7], cache, seq_ids=ids)]  # prefill 7, then one token at a time
        for t in range(7, 21):
            steps.append(m(tokens[:, t:t + 1], cache, seq_ids=ids))
        assert rel(torch.cat(steps, 1), full) <= 1e-5


def test_int4_model_cached_equals_uncached():
    m = tiny()
    quantize_linears(m, "int4", skip=("lm_head",), backend="reference")
    assert isinstance(m.layers[1].mlp.up_proj, Int4Linear)
    tokens = torch.randint(0, 101, (1, 12))
    with torch.inference_mode():
        full = m(tokens)
        cache = m.new_cache(1, 16)
        steps = [m(tokens[:, :5], cache)] + [m(tokens[:, t:t + 1], cache) for t in range(5, 12)]
        assert rel(torch.cat(steps, 1), full) <= 1e-5


@pytest.mark.parametrize("paged", [False, True])
def test_padded_batch_equals_each_alone(paged):
    """Prompts of different lengths, right-padded into one prefill with lengths, then batched decode."""
    m = tiny()
    lens = [5, 11, 1]
    prompts = [torch.randint(0, 101, (n,)) for n in lens]
    nxt = torch.randint(0, 101, (3, 4))  # 4 decode tokens per sequence
    padded = torch.zeros(3, max(lens), dtype=torch.long)
    for b, p in enumerate(prompts):
        padded[b, :len(p)] = p
    with torch.inference_mode():
        cache = m.new_cache(3, 24, paged=paged, block_size=3)
        ids = [[c.add_sequence() for _ in range(3)] for c in cache][0] if paged else None
        got = [m(padded, cache, seq_ids=ids, lengths=torch.tensor(lens, dtype=torch.int32), last_only=True)]
        for t in range(4):
            got.append(m(nxt[:, t:t + 1], cache, seq_ids=ids, last_only=True))
        got = torch.stack(got, 1)  # [3, 5, V]
        for b, p in enumerate(prompts):
            alone = m(torch.cat([p, nxt[b]])[None])[0, len(p) - 1:]  # [5, V], no cache
            assert rel(got[b], alone) <= 1e-5, b


def test_last_only_and_errors():
    m = tiny()
    tokens = torch.randint(0, 101, (2, 6))
    with torch.inference_mode():
        assert torch.allclose(m(tokens, last_only=True), m(tokens)[:, -1], rtol=1e-6, atol=1e-6)
        with pytest.raises(ValueError, match="tokens must be"):
            m(tokens[0])
        with pytest.raises(ValueError, match="cache has 1 layers"):
            m(tokens, m.new_cache(2, 8)[:1])
        with pytest.raises(ValueError, match="max_positions"):
            m.new_cache(1, 1000)
        cache = m.new_cache(2, 8)
        with pytest.raises(ValueError, match="full"):
            m(torch.randint(0, 101, (2, 9)), cache)


def test_paged_cache_default_block_size():
    """new_cache(paged=True) picks the device's default block size: 64 tokens on the CPU, 16 on GPUs."""
    from llmkern.nn.paged_kv_cache import default_block_size

    assert default_block_size("cpu") == default_block_size(None) == 64
    assert default_block_size("cuda") == default_block_size(torch.device("cuda", 1)) == 16
    m = tiny()
    caches = m.new_cache(2, 90, paged=True)
    assert {c.block_size for c in caches} == {64}
    assert caches[0].num_blocks == 2 * 2  # two sequences of 90 tokens: 2 blocks of 64 each
    assert m.new_cache(2, 90, paged=True, block_size=16)[0].block_size == 16


def test_weight_bytes_per_token():
    m = tiny()
    c = m.config
    per_layer = 4 * (c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
                     + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size)
    want = c.num_layers * per_layer + 4 * c.hidden_size + 4 * c.vocab_size * c.hidden_size + 4 * c.hidden_size
    assert m.weight_bytes_per_token() == want  # layers + final norm + lm_head + one embedding row


# ------------------------------------------------------------------ config


def test_presets_parameter_counts():
    """Published parameter counts of these models."""
    want = {"SmolLM2-135M": 134_515_008, "Llama-2-7B": 6_738_415_616, "Llama-3-8B": 8_030_261_248,
            "Mistral-7B": 7_241_732_096, "Qwen2-7B": 7_615_616_512}
    for name, n in want.items():
        assert ModelConfig.preset(name).num_parameters() == n, name
    assert set(want) <= set(PRESETS)
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.preset("GPT-5")


def test_config_from_metadata_and_hf():
    meta = {"general.architecture": "qwen2", "qwen2.block_count": 2, "qwen2.embedding_length": 64,
            "qwen2.feed_forward_length": 96, "qwen2.attention.head_count": 2, "qwen2.attention.head_count_kv": 1,
            "qwen2.rope.freq_base": 1e6, "tokenizer.ggml.tokens": ["a"] * 10, "tokenizer.ggml.eos_token_id": 3}
    c = ModelConfig.from_gguf_metadata(meta)
    assert (c.vocab_size, c.head_dim, c.rope_base, c.eos_token_id, c.arch) == (10, 32, 1e6, 3, "qwen2")
    with pytest.raises(ValueError, match="unsupported architecture 'falcon'"):
        ModelConfig.from_gguf_metadata({"general.architecture": "falcon"}, source="f.gguf")
    with pytest.raises(ValueError, match="llama.block_count"):
        ModelConfig.from_gguf_metadata({"general.architecture": "llama", "llama.attention.head_count": 2,
                                        "llama.embedding_length": 64, "llama.vocab_size": 10})
    hf = ModelConfig.from_hf_config({"model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
                                     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                                     "intermediate_size": 1536, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
                                     "tie_word_embeddings": True, "max_position_embeddings": 8192,
                                     "bos_token_id": 1, "eos_token_id": 2})
    assert hf.num_parameters() == ModelConfig.preset("SmolLM2-135M").num_parameters()
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig(vocab_size=10, hidden_size=96, num_layers=1, num_heads=3, num_kv_heads=2, intermediate_size=8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quant", ["none", "int8-w8a16", "int8-w8a8", "int4", "int4-w4a8", "int4-w4a8g"])
def test_fused_projections_compute_what_the_separate_ones_do(backend, quant):
    """fuse_projections joins q/k/v and gate/up: same logits (quantized kernels: bit for bit, each
    output row is computed from its own weights), with and without a cache, and biases kept (Qwen2)."""
    m = tiny(seed=3, backend=backend, attention_bias=True)
    if quant != "none":
        kind, _, mode = quant.partition("-")
        quantize_linears(m, kind, mode=mode or None, skip=("lm_head",), backend=backend)
    tokens = torch.randint(0, 101, (2, 9))
    with torch.inference_mode():
        want_full = m(tokens)
        cache = m.new_cache(2, 16)
        want_steps = [m(tokens[:, :5], cache)] + [m(tokens[:, t:t + 1], cache) for t in range(5, 9)]
        assert m.fuse_projections() == 2 * len(m.layers)
        attn, mlp = m.layers[0].self_attn, m.layers[0].mlp
        assert not hasattr(attn, "q_proj") and hasattr(attn, "qkv_proj") and hasattr(mlp, "gate_up_proj")
        assert attn.qkv_proj.bias is not None and attn.qkv_proj.out_features == (4 + 2 + 2) * 32
        got_full = m(tokens)
        cache = m.new_cache(2, 16)
        got_steps = [m(tokens[:, :5], cache)] + [m(tokens[:, t:t + 1], cache) for t in range(5, 9)]
    if quant == "none":  # float GEMMs of another N may block differently
        assert rel(got_full, want_full) <= 1e-6
    else:
        assert torch.equal(got_full, want_full)
        for g, w in zip(got_steps, want_steps):
            assert torch.equal(g, w)
    assert m.fuse_projections() == 2 * len(m.layers)  # idempotent


def test_fuse_refuses_mixed_linears():
    from llmkern.nn.linear import concat_linears
    from llmkern.nn import Int8Linear
    a = torch.nn.Linear(64, 8)
    b = Int8Linear.from_linear(torch.nn.Linear(64, 8))
    assert concat_linears((a, b)) is None
    assert concat_linears((b, Int8Linear.from_linear(torch.nn.Linear(64, 8), mode="w8a8"))) is None
    assert concat_linears((a, torch.nn.Linear(64, 8, bias=False))) is None
    assert concat_linears((a, torch.nn.Linear(32, 8))) is None


def test_fuse_refuses_different_devices_and_bias_dtypes():
    from llmkern.nn.linear import concat_linears
    a, b = torch.nn.Linear(64, 8), torch.nn.Linear(64, 8)
    b.bias.data = b.bias.data.double()
    assert concat_linears((a, b)) is None
    assert concat_linears((a, torch.nn.Linear(64, 8, device="meta"))) is None


def test_dtype_follows_to():
    """Llama.to(torch.bfloat16) (or .half() / .float()): `dtype`, which new caches take, follows, so a cached
    forward works after the cast (it raised a cache-dtype error) and matches a model built in bf16."""
    m = tiny()
    tokens = torch.randint(0, 101, (1, 6))
    m.to(torch.bfloat16)
    assert m.dtype == torch.bfloat16
    with torch.inference_mode():
        cache = m.new_cache(1, 8)
        assert cache[0].dtype == torch.bfloat16
        steps = torch.cat([m(tokens[:, :4], cache)] + [m(tokens[:, t:t + 1], cache) for t in (4, 5)], 1)
        assert rel(steps, m(tokens)) <= 2e-2  # (bf16 activations, both ways)
    assert m.float().dtype == torch.float32
