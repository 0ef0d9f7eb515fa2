"""llmkern.patch routes a transformers model's rotary through llmkern (models/hf_attention.py): logits and
greedy generate match the unpatched model in fp32 over prefill + decode, with rope scaling (llama3, linear,
dynamic), Qwen2's q/k/v biases, GQA, left-padded batches and other cache classes; transformers'
apply_rotary_pos_emb never runs while patched; unpatch restores forwards, attributes and outputs.
Tiny random models (head dim 32, GQA 4:2, so llmkern's attention runs too): about a second per test on
one core."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="Hugging Face interop tests need transformers")
# The forward's cache argument: `cache` in recent transformers, `past_key_values` before the rename (5.17, the
# GPU machine's version, still has it); llmkern's patch takes either.
CACHE = ("cache" if "cache" in __import__("inspect").signature(transformers.LlamaForCausalLM.forward).parameters
         else "past_key_values")

from llmkern.models import hf_attention  # noqa: E402
from llmkern.models.hf import patch, unpatch  # noqa: E402
from llmkern.models.hf_cache import new_cache  # noqa: E402
from llmkern.ops.kv_cache_append import kv_cache_append_op  # noqa: E402
from llmkern.ops.rotary_embedding import rotary_embedding_op  # noqa: E402

V = 101
_SMALL = dict(vocab_size=V, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=64)
CONFIGS = {
    "llama": ("LlamaConfig", dict(rope_parameters={"rope_type": "default", "rope_theta": 5000.0})),
    "llama3": ("LlamaConfig", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "linear": ("LlamaConfig", dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.5})),
    # max_position_embeddings 12: the sequences below outgrow it, so inv_freq changes between forwards
    "dynamic": ("LlamaConfig", dict(max_position_embeddings=12,
                                    rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})),
    "yarn": ("LlamaConfig", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                  "original_max_position_embeddings": 16})),  # attention_scaling != 1
    "qwen2": ("Qwen2Config", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),  # q/k/v bias
    "mistral": ("MistralConfig", dict(sliding_window=None, head_dim=32)),
}


def _model(kind):
    cls, extra = CONFIGS[kind]
    cfg = getattr(transformers, cls)(**{**_SMALL, **extra})
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p)) if "norm" in name else p.normal_(0, 0.2)
    return m


@pytest.fixture
def counts(monkeypatch):
    """Counts, at the backends: appends with a fused rotary ("fused"), standalone rotary_embedding calls
    ("rotary"), and decode_attention calls on a whole LlmkernCache buffer ("decode": the direct decode path)."""
    from llmkern.ops.decode_attention import decode_attention_op

    c = {"fused": 0, "rotary": 0, "decode": 0}
    checks = {"fused": lambda a: a[9] is not None,  # a[9]: kv_cache_append's cos_sin_cache
              "rotary": lambda a: True,
              "decode": lambda a: a[1].is_contiguous() and a[1].shape[1] >= 256}  # the [B, cap, Hk, D] buffer
    for op, key in ((kv_cache_append_op, "fused"), (rotary_embedding_op, "rotary"), (decode_attention_op, "decode")):
        for backend, impl in list(op.impls.items()):
            def counted(*a, _impl=impl, _key=key):
                c[_key] += bool(checks[_key](a))
                return _impl(*a)
            monkeypatch.setitem(op.impls, backend, counted)
    return c


def _forbid_hf_rotary(monkeypatch):
    """From here on transformers' apply_rotary_pos_emb raises (call after computing the references)."""
    import importlib

    def forbidden(*a, **k):
        raise AssertionError("transformers' apply_rotary_pos_emb ran on a patched model")
    for name in ("llama", "qwen2", "mistral"):
        modeling = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        monkeypatch.setattr(modeling, "apply_rotary_pos_emb", forbidden)


def _reset_rope(model):
    """Put a dynamic rotary module back in its initial state (it rescales inv_freq as sequences grow)."""
    emb = model.model.rotary_emb
    if "dynamic" in emb.rope_type:
        emb.register_buffer("inv_freq", emb.original_inv_freq.clone(), persistent=False)
        emb.max_seq_len_cached = emb.original_max_seq_len


def _steps(model, tokens, cache, n_decode=5, **kw):
    """Logits of a prefill of tokens[:, :-n_decode] then one forward per remaining token: [B, S, V]."""
    P = tokens.shape[1] - n_decode
    outs = [model(tokens[:, :P], **{CACHE: cache}, use_cache=True, **kw).logits]
    for i in range(P, tokens.shape[1]):
        outs.append(model(tokens[:, i:i + 1], **{CACHE: cache}, use_cache=True, **kw).logits)
    return torch.cat(outs, dim=1)


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_patched_logits_match_transformers(kind, counts, monkeypatch):
    model = _model(kind)
    tokens = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        _reset_rope(model)
        want = _steps(model, tokens, transformers.DynamicCache())
        _reset_rope(model)
        want_nocache = model(tokens).logits
        _forbid_hf_rotary(monkeypatch)
        patch(model)
        try:
            assert all("forward" in m.self_attn.__dict__ for m in model.model.layers)
            _reset_rope(model)
            got = _steps(model, tokens, new_cache())  # rotary fused into the LlmkernCache append
            assert counts == {"fused": 2 * 6, "rotary": 0, "decode": 2 * 5}  # 2 layers x (prefill + 5 decodes)
            _reset_rope(model)
            got_dyn = _steps(model, tokens, transformers.DynamicCache())  # ops.rotary_embedding + their cache
            _reset_rope(model)
            got_nocache = model(tokens).logits  # ops.rotary_embedding, no cache
            assert counts == {"fused": 2 * 6, "rotary": 2 * 6 + 2, "decode": 2 * 5}
        finally:
            unpatch(model)
    _close(got, want)
    _close(got_dyn, want)
    _close(got_nocache, want_nocache)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_patched_generate_and_rotary_ran(kind, counts, monkeypatch):
    model = _model(kind)
    tokens = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = model.generate(tokens, max_new_tokens=8, do_sample=False)
        _forbid_hf_rotary(monkeypatch)
        patch(model)
        try:
            got = model.generate(tokens, max_new_tokens=8, do_sample=False)
        finally:
            unpatch(model)
    assert torch.equal(got, want)
    new = got.shape[1] - tokens.shape[1]
    # prefill + (new - 1) decode steps, each layer rotating through the fused append; nothing standalone
    assert counts["fused"] == 2 * new and counts["rotary"] == 0
    assert counts["decode"] == 2 * (new - 1)  # decode steps: decode_attention straight on the cache buffer


def test_left_padded_batch(counts, monkeypatch):
    model = _model("llama")
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, V, (3, 8), generator=g)
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[0, :3] = 0  # left padding: rows of 5, 8 and 6 real tokens
    mask[2, :2] = 0
    tokens = tokens.masked_fill(mask == 0, 0)
    with torch.inference_mode():
        want = model.generate(tokens, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        _forbid_hf_rotary(monkeypatch)
        patch(model)
        try:
            got = model.generate(tokens, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        finally:
            unpatch(model)
    assert torch.equal(got, want)
    assert counts["fused"] > 0 and counts["rotary"] == 0


def test_static_cache_beams_and_reused_position_ids(counts, monkeypatch):
    """StaticCache (cache_implementation="static": standalone rotary + their update), beam search (the
    LlmkernCache reordered by transformers), and one position_ids tensor refilled in place per step."""
    model = _model("llama")
    tokens = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        want = model.generate(tokens, max_new_tokens=5, do_sample=False)
        want_beam = model.generate(tokens, max_new_tokens=5, do_sample=False, num_beams=2)
        want_logits = _steps(model, tokens, transformers.DynamicCache(), n_decode=3)
        _forbid_hf_rotary(monkeypatch)
        patch(model)
        try:
            assert torch.equal(model.generate(tokens, max_new_tokens=5, do_sample=False,
                                              cache_implementation="static"), want)
            assert counts["rotary"] > 0 and counts["fused"] == 0
            assert torch.equal(model.generate(tokens, max_new_tokens=5, do_sample=False, num_beams=2), want_beam)
            assert counts["fused"] > 0
            # batch 2, so that the [1, S] position_ids are expanded into a copy (not a view that would
            # follow the refill by itself)
            two = tokens.expand(2, -1)
            cache, pos = new_cache(), torch.arange(6)[None]  # [1, 6], then one [1, 1] refilled in place
            outs = [model(two[:, :6], **{CACHE: cache}, position_ids=pos).logits]
            pos = torch.zeros(1, 1, dtype=torch.long)
            for i in range(6, 9):
                pos.fill_(i)
                outs.append(model(two[:, i:i + 1], **{CACHE: cache}, position_ids=pos).logits)
        finally:
            unpatch(model)
    _close(torch.cat(outs, dim=1), want_logits.expand(2, -1, -1))


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_routed_matches_unrouted(quant):
    """With quantized projections the routed forward gives the logits of the same patch without routing
    (transformers' rotary and attention module around the same Int8Linear/Int4Linear)."""
    model = _model("qwen2")
    tokens = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        patch(model, quant=quant)
        try:
            got = _steps(model, tokens, new_cache(), n_decode=4)
            routed = model._llmkern_undo[2]
            hf_attention.unroute(routed)
            want = _steps(model, tokens, new_cache(), n_decode=4)
            assert "forward" not in model.model.layers[0].self_attn.__dict__
        finally:
            model._llmkern_undo = model._llmkern_undo[:2] + ([],) + model._llmkern_undo[3:]  # (routed emptied)
            unpatch(model)
    _close(got, want)


def test_unpatch_restores_forward_and_outputs():
    model = _model("qwen2")
    attn = model.model.layers[0].self_attn
    tokens = torch.randint(0, V, (1, 11), generator=torch.Generator().manual_seed(4))
    keys_before = set(attn.__dict__)
    model_keys = set(model.__dict__)
    impl = model.config._attn_implementation
    with torch.inference_mode():
        want = model(tokens).logits
        patch(model, quant="int8", keep_float=True)  # (the default releases the float linears: see test_hf.py)
        assert "forward" in attn.__dict__ and hasattr(attn, "_llmkern_route")
        model(tokens)
        unpatch(model)
        assert set(attn.__dict__) == keys_before and "forward" not in attn.__dict__
        assert set(model.__dict__) == model_keys and model.config._attn_implementation == impl
        assert type(attn.q_proj) is torch.nn.Linear
        assert torch.equal(model(tokens).logits, want)
        assert torch.equal(model.generate(tokens, max_new_tokens=3, do_sample=False)[:, :11], tokens)


def test_autograd_takes_transformers_path(monkeypatch):
    """With gradients the routed forward defers to transformers' own (llmkern's ops have no backward and
    the fused path rotates q in place): same values, transformers' rotary runs."""
    import importlib

    modeling = importlib.import_module("transformers.models.llama.modeling_llama")
    calls = []
    real = modeling.apply_rotary_pos_emb
    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _model("llama")
    tokens = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(tokens).logits
    calls.clear()
    patch(model)
    try:
        got = model(tokens).logits  # grad mode on, parameters require grad
    finally:
        unpatch(model)
    assert len(calls) == 2 and got.requires_grad
    _close(got.detach(), want)


def test_unroutable_rotary_is_left_alone(monkeypatch):
    """A rotary module llmkern does not know keeps transformers' attention forward (and rotary)."""
    model = _model("llama")
    monkeypatch.setattr(hf_attention, "ROUTABLE_ROTARY", frozenset())
    patch(model)
    try:
        assert "forward" not in model.model.layers[0].self_attn.__dict__
        assert model._llmkern_undo[2] == []
    finally:
        unpatch(model)


def test_rotary_table_matches_transformers():
    """The table reproduces transformers' cos/sin (times attention_scaling) bit for bit in fp32."""
    for kind in ("llama3", "yarn", "linear"):
        emb = _model(kind).model.rotary_emb
        table = hf_attention.RotaryTable(emb)
        pos_ids = torch.tensor([[0, 5, 17, 300]])
        pos = table.positions(pos_ids, 1, 4, "cpu")
        cos, sin = emb(torch.zeros(1, dtype=torch.float32), pos_ids)  # [1, 4, D]
        half = cos.shape[-1] // 2
        assert torch.equal(table.cos_sin[pos[0], :half], cos[0, :, :half]), kind
        assert torch.equal(table.cos_sin[pos[0], half:], sin[0, :, :half]), kind
        assert table.cos_sin.shape[0] >= 301
    with pytest.raises(ValueError, match="position_ids"):
        table.positions(torch.tensor([[-1, 0]]), 1, 2, "cpu")
