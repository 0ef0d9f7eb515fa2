"""Hugging Face interop: from_hf (model object, safetensors dir), patch/unpatch, and logits parity with
transformers' LlamaForCausalLM on the real SmolLM2 GGUF. Skipped (with the reason) without transformers."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="Hugging Face interop tests need transformers")
# The forward's cache argument: `cache` in recent transformers, `past_key_values` before the rename (5.17, the
# GPU machine's version, still has it); llmkern's patch takes either.
CACHE = ("cache" if "cache" in __import__("inspect").signature(transformers.LlamaForCausalLM.forward).parameters
         else "past_key_values")

from llmkern import nn as lnn  # noqa: E402
from llmkern import ops  # noqa: E402
from llmkern.models.hf import from_hf, patch, tokenizer_from_hf_dir, unpatch  # noqa: E402


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def hf_tiny():
    cfg = transformers.LlamaConfig(vocab_size=103, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=96, rope_theta=5000.0, rms_norm_eps=1e-5,
                                   tie_word_embeddings=False, max_position_embeddings=64)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p)) if "norm" in name else p.normal_(0, 0.2)
    return m


def test_from_hf_model_and_dir(hf_tiny, tmp_path):
    tokens = torch.randint(0, 103, (2, 13))
    with torch.inference_mode():
        want = hf_tiny(tokens).logits
        ours = from_hf(hf_tiny, backend="reference")
        assert rel(ours(tokens), want) <= 1e-5
        hf_tiny.save_pretrained(tmp_path)
        assert rel(from_hf(tmp_path, backend="reference")(tokens), want) <= 1e-5
        q = from_hf(hf_tiny, quant="int4", backend="reference", fuse=False)
        assert isinstance(q.layers[0].mlp.up_proj, lnn.Int4Linear) and isinstance(q.lm_head, lnn.Int4Linear)
        assert q.lm_head.mode == "w4a16"
        assert from_hf(hf_tiny, quant="int4", mode="w4a8", backend="reference").lm_head.mode == "w4a8"
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_hf(tmp_path / "nothing")
    with pytest.raises(ValueError, match="quant"):
        from_hf(hf_tiny, quant="fp8")


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_from_hf_sliding_window(kind):
    """Sliding-window attention (Mistral: every layer; Qwen2 with use_sliding_window: layers from
    max_window_layers on) matches transformers past the window: uncached, and decoding token by token over a
    contiguous and a paged cache (the decode plan steps aside for windowed layers)."""
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, sliding_window=6, max_position_embeddings=64)
    if kind == "mistral":
        cfg = transformers.MistralConfig(**common)
    else:
        cfg = transformers.Qwen2Config(**common, use_sliding_window=True, max_window_layers=1)
    torch.manual_seed(1)
    hf = getattr(transformers, "MistralForCausalLM" if kind == "mistral" else "Qwen2ForCausalLM")(cfg).eval()
    tokens = torch.randint(0, 97, (1, 20))
    with torch.inference_mode():
        want = hf(tokens).logits
        ours = from_hf(hf)
        windows = [layer.self_attn.window_left for layer in ours.layers]
        assert windows == ([5, 5] if kind == "mistral" else [-1, 5])
        assert rel(ours(tokens), want) <= 1e-5
        for paged in (False, True):
            cache = ours.new_cache(1, 32, paged=paged, block_size=4)
            ids = [c.add_sequence() for c in cache][:1] if paged else None
            steps = [ours(tokens[:, :7], cache, seq_ids=ids)]  # prefill 7 (> the window), then one at a time
            for t in range(7, 20):
                steps.append(ours(tokens[:, t:t + 1], cache, seq_ids=ids))
            assert rel(torch.cat(steps, 1), want) <= 1e-5, paged


def test_patch_that_cannot_quantize_leaves_the_model_as_it_was(hf_tiny):
    """int4 with groups of 64 fits the 64-wide projections but not down_proj (K = 96): the error names that
    layer, and no module was replaced (the model is not half quantized, and not marked patched)."""
    tokens = torch.randint(0, 103, (1, 7))
    with torch.inference_mode():
        want = hf_tiny(tokens).logits
        with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj \(96 -> 64\) to int4"):
            patch(hf_tiny, quant="int4", group_size=64)
        assert not any(isinstance(m, (lnn.Int4Linear, lnn.RMSNorm)) for m in hf_tiny.modules())
        assert getattr(hf_tiny, "_llmkern_undo", None) is None
        assert torch.equal(hf_tiny(tokens).logits, want)


def test_patch_unpatch(hf_tiny, monkeypatch):
    tokens = torch.randint(0, 103, (1, 9))
    from llmkern.ops.attention import attention_op
    from llmkern.ops.decode_attention import decode_attention_op

    # Counted at the backend: the patched model calls the ops (or, on its decode hot path, the op's
    # trusted entry, which skips the dispatcher but runs the same backend)
    calls = []
    for op in (attention_op, decode_attention_op):
        real = op.impls["reference"]
        monkeypatch.setitem(op.impls, "reference", lambda *a, _r=real: calls.append(a[0].shape) or _r(*a))
    with torch.inference_mode():
        want = hf_tiny(tokens).logits
        want_gen = hf_tiny.generate(tokens, max_new_tokens=6, do_sample=False)
        assert not calls
        patch(hf_tiny, backend="reference")  # norms + attention, float linears
        try:
            assert isinstance(hf_tiny.model.layers[0].input_layernorm, lnn.RMSNorm)
            assert rel(hf_tiny(tokens).logits, want) <= 1e-5
            assert calls == [(1, 9, 2, 32)] * 2  # both layers' attention ran on llmkern
            assert torch.equal(hf_tiny.generate(tokens, max_new_tokens=6, do_sample=False), want_gen)
            new = want_gen.shape[1] - 9  # (EOS may end it early) a prefill and new - 1 decode steps, 2 layers each
            # decode steps: decode_attention over HF's cache in place, q [B, Hq, D]
            assert new >= 2 and calls[-1] == (1, 2, 32) and len(calls) == 2 + 2 * new
            with pytest.raises(ValueError, match="already patched"):
                patch(hf_tiny)
        finally:
            unpatch(hf_tiny)
        assert type(hf_tiny.model.layers[0].input_layernorm).__name__ == "LlamaRMSNorm"
        assert torch.equal(hf_tiny(tokens).logits, want)
        # int8 weights: same as the float model whose linears hold the dequantized int8 weights
        patch(hf_tiny, quant="int8", backend="reference", keep_float=True)  # the default quantizes the lm_head too
        try:
            assert isinstance(hf_tiny.lm_head, lnn.Int8Linear)
            assert type(hf_tiny.model.embed_tokens) is torch.nn.Embedding
        finally:
            unpatch(hf_tiny)
        assert type(hf_tiny.lm_head) is torch.nn.Linear
        patch(hf_tiny, quant="int4", mode="w4a8g", backend="reference", keep_float=True)  # modes reach the int4 modules
        try:
            assert isinstance(hf_tiny.lm_head, lnn.Int4Linear) and hf_tiny.lm_head.mode == "w4a8g"
            assert torch.isfinite(hf_tiny(tokens).logits).all()
        finally:
            unpatch(hf_tiny)
        patch(hf_tiny, quant="int8", backend="reference", keep_float=True, skip=("lm_head",))
        try:
            lin = hf_tiny.model.layers[1].mlp.down_proj
            assert isinstance(lin, lnn.Int8Linear) and type(hf_tiny.lm_head) is torch.nn.Linear
            got = hf_tiny(tokens).logits
        finally:
            unpatch(hf_tiny)
        saved = {n: m.weight.detach().clone() for n, m in hf_tiny.model.named_modules() if isinstance(m, torch.nn.Linear)}
        try:
            for n, m in hf_tiny.model.named_modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.copy_(ops.dequantize_int8(*ops.quantize_int8(m.weight, 0)))
            assert rel(got, hf_tiny(tokens).logits) <= 1e-5
        finally:
            for n, m in hf_tiny.model.named_modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.copy_(saved[n])
    with pytest.raises(ValueError, match="not patched"):
        unpatch(hf_tiny)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_patched_bf16_model_gets_float32_logits_from_its_quantized_head(hf_tiny, quant):
    """16-bit logits tie often enough to change greedy answers: a patched bf16 model's quantized lm_head
    computes float32 logits from the upcast hidden state (a pre-hook that unpatch removes)."""
    import copy

    m = copy.deepcopy(hf_tiny).to(torch.bfloat16)
    tokens = torch.randint(0, 103, (2, 7))
    patch(m, quant=quant)
    head = m.lm_head
    try:
        seen = []
        handle = head.register_forward_pre_hook(lambda mod, a: seen.append(a[0]))  # runs after patch's hook
        with torch.inference_mode():
            logits = m(tokens).logits
            handle.remove()
            assert m.model(tokens).last_hidden_state.dtype == torch.bfloat16  # what the head is given
            want = head(seen[0].to(torch.bfloat16).float())  # upcast exactly: seen[0] holds bf16 values
        assert logits.dtype == seen[0].dtype == torch.float32 and len(seen) == 1
        assert rel(logits, want) <= 1e-5  # (fp32 rounding: the head's first call and its prepared one may sum apart)
    finally:
        unpatch(m)
    assert not head._forward_pre_hooks and type(m.lm_head) is torch.nn.Linear
    with torch.inference_mode():
        assert m(tokens).logits.dtype == torch.bfloat16  # unpatched: transformers' own bf16 head


def test_tokenizer_from_hf_dir(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers
    vocab = {c: i for i, c in enumerate(["<s>", "</s>"] + list("abcdefghijklmnopqrstuvwxyzĠ0123456789") + ["ab", "Ġa"])}
    hf = HFTokenizer(models.BPE(vocab, [("a", "b"), ("Ġ", "a")]))
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    hf.add_special_tokens(["<s>", "</s>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    tok = tokenizer_from_hf_dir(tmp_path)
    assert tok.pre == "smollm" and tok.eos_id == 1 and tok.bos_id == 0
    for s in ["ab abc 123", "a</s>b", "zz ab"]:
        assert tok.encode(s) == hf.encode(s).ids, s


@pytest.mark.slow
def test_logits_match_transformers_on_smollm2(smollm_path):
    """transformers loads the same GGUF (dequantizing to fp32); llmkern keeps the int4 weights. With the
    reference backend the logits agree over 256 positions (the issue asks for rel <= 1e-4)."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    from llmkern.models import load_gguf
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name,
                                                           dtype=torch.float32).eval()
    model, tok = load_gguf(smollm_path, progress=False, backend="reference", fuse=False)
    q = model.layers[3].self_attn.q_proj  # the un-permuted rows are HF's rows, bit for bit
    assert torch.equal(ops.dequantize_int4(q.qweight, q.scales, q.offsets), hf.model.layers[3].self_attn.q_proj.weight)
    text = "The quick brown fox jumps over the lazy dog. " * 30
    ids = torch.tensor([tok.encode(text)[:256]])
    with torch.inference_mode():
        err = rel(model(ids), hf(ids).logits)
    assert err <= 1e-4, err


def test_llmkern_cache_layer_matches_dynamic_layer(monkeypatch):
    """LlmkernLayer (appends through kv_cache_append into a growing buffer) returns what transformers'
    DynamicLayer returns, through growth, crop and batch selection."""
    from transformers.cache_utils import DynamicLayer

    from llmkern.models.hf_cache import cache_classes

    Layer, _ = cache_classes()
    monkeypatch.setattr(Layer, "MIN_CAPACITY", 4)  # force several regrowths
    ours, theirs = Layer(), DynamicLayer()
    g = torch.Generator().manual_seed(0)
    for S in (3, 1, 1, 5, 1, 2):
        k, v = torch.randn(2, 3, S, 8, generator=g), torch.randn(2, 3, S, 8, generator=g)
        ko, vo = ours.update(k, v)
        kt, vt = theirs.update(k, v)
        assert torch.equal(ko, kt) and torch.equal(vo, vt) and ours.get_seq_length() == theirs.get_seq_length()
    for layer in (ours, theirs):
        layer.crop(-2)
        layer.batch_select_indices(torch.tensor([1]))
    k, v = torch.randn(1, 3, 2, 8, generator=g), torch.randn(1, 3, 2, 8, generator=g)
    ko, vo = ours.update(k, v)
    kt, vt = theirs.update(k, v)
    assert torch.equal(ko, kt) and torch.equal(vo, vt) and ko.shape == (1, 3, 13, 8)


def test_patched_generate_uses_llmkern_cache(hf_tiny, monkeypatch):
    from llmkern.models.hf_cache import cache_classes

    from llmkern.ops.kv_cache_append import kv_cache_append_op

    # Counted at the backend (the patched attention appends through the op's trusted path, rotary fused:
    # a[9] is the cos/sin table)
    appends = []
    real = kv_cache_append_op.impls["reference"]
    monkeypatch.setitem(kv_cache_append_op.impls, "reference",
                        lambda *a: appends.append((a[0].shape, a[9] is not None)) or real(*a))
    tokens = torch.randint(0, 103, (1, 7))
    with torch.inference_mode():
        want = hf_tiny.generate(tokens, max_new_tokens=5, do_sample=False)
        patch(hf_tiny, backend="reference")
        try:
            got = hf_tiny.generate(tokens, max_new_tokens=5, do_sample=False)
            cache = cache_classes()[1]()
            hf_tiny(tokens, **{CACHE: cache}, use_cache=True)  # an explicit cache is used as given
            assert type(cache.layers[0]).__name__ == "LlmkernLayer"
        finally:
            unpatch(hf_tiny)
        assert "generate" not in hf_tiny.__dict__
    assert torch.equal(got, want)
    # prefill then decode appends, per layer, each rotating q and k in the same call
    assert appends[0] == ((1, 7, 1, 32), True) and appends[2] == ((1, 1, 1, 32), True)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_patched_int4_bf16_model_runs_on_its_device(hf_tiny, device):
    """A bf16 transformers model on `device`, patched with int4 linears (the lm_head too): its forward and
    generate() (LlmkernCache, decode attention over it) run on that device's llmkern backends (cuda / triton
    on a GPU), and its logits match the unpatched model holding the int4-dequantized weights in its
    nn.Linear layers (bf16 activations: 3e-2)."""
    import copy

    m = copy.deepcopy(hf_tiny).to(device=device, dtype=torch.bfloat16)
    tokens = torch.randint(0, 103, (2, 9)).to(device)
    patch(m, quant="int4")
    try:
        with torch.inference_mode():
            got = m(tokens).logits.float()
            gen = m.generate(tokens, max_new_tokens=5, do_sample=False)
        used = {n: ops.OPS[n].last_backend for n in ("int4_linear", "rms_norm", "attention", "decode_attention",
                                                      "kv_cache_append")}
        allowed = ("cuda", "triton") if device == "cuda" else ("cpu",)
        assert all(b in allowed for b in used.values()), used
        assert gen.shape == (2, 14) and gen.device.type == device
        deq = {n: ops.dequantize_int4(q.qweight, q.scales, q.offsets)
               for n, q in m.named_modules() if isinstance(q, lnn.Int4Linear)}  # [N, K] fp32
        assert "lm_head" in deq and len(deq) == 1 + 7 * 2  # q, k, v, o, gate, up, down per layer
    finally:
        unpatch(m)
    with torch.no_grad():
        for n, lin in m.named_modules():
            if n in deq:
                lin.weight.copy_(deq[n])
        want = m(tokens).logits.float()
    assert rel(got, want) <= 3e-2, rel(got, want)
