"""llmkern.patch on models whose norms or attention differ from Llama's, and the patched model's life cycle
(generate's cache rules, deepcopy, unpatch after model.to, the float weights' memory). Each case was a
silently wrong result or a crash before (found by an audit, 2026-11-30): Gemma's x_hat * (1 + w) norms were
swapped for llmkern's x_hat * w; Gemma 2's softcap and GPT-OSS's attention sinks were dropped; a generation
config's use_cache=False still got a cache; a deep copy's generate ran the original model."""
from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="Hugging Face interop tests need transformers")

from llmkern import nn as lnn  # noqa: E402
from llmkern import ops  # noqa: E402
from llmkern.models.hf import patch, unpatch  # noqa: E402

V = 97


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


def _init(m, sinks=False):
    """Weights large enough that softcaps and sinks matter; norm weights random around 0 (Gemma: scale 1 + w)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "sinks" in n:
                p.copy_(2.0 * torch.randn(p.shape, generator=g))
            elif "norm" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return m.eval()


def _gemma(kind, sliding_window=4096):
    common = dict(vocab_size=V, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, intermediate_size=96)
    if kind == "gemma":
        cfg = transformers.GemmaConfig(**common)
        cls = transformers.GemmaForCausalLM
    else:
        cfg = transformers.Gemma2Config(**common, sliding_window=sliding_window, attn_logit_softcapping=5.0,
                                        final_logit_softcapping=None)
        cls = transformers.Gemma2ForCausalLM
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return _init(cls(cfg))


def _gpt_oss():
    cfg = transformers.GptOssConfig(vocab_size=V, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=32, intermediate_size=96, num_local_experts=4,
                                    num_experts_per_tok=2, sliding_window=8,
                                    layer_types=["sliding_attention", "full_attention"])
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return _init(transformers.GptOssForCausalLM(cfg), sinks=True)


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=96, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    return _init(transformers.LlamaForCausalLM(cfg))


def assert_same_outputs(m, patch_kwargs):
    """Logits (plain, and a left-padded batch) and greedy generate (alone and batched) match the unpatched model."""
    ids = torch.randint(1, V, (2, 20), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        want = m(ids).logits
        want_m = m(ids, attention_mask=mask).logits
        want_g = m.generate(ids[:1], max_new_tokens=6, do_sample=False)
        want_gb = m.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        patch(m, **patch_kwargs)
        try:
            assert rel(m(ids).logits, want) <= 1e-5
            assert rel(m(ids, attention_mask=mask).logits[1, 5:], want_m[1, 5:]) <= 1e-5
            assert torch.equal(m.generate(ids[:1], max_new_tokens=6, do_sample=False), want_g)
            assert torch.equal(m.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False), want_gb)
        finally:
            unpatch(m)


def test_gemma_norms_are_left_alone():
    """Gemma's RMSNorm is x_hat * (1 + w): patch keeps it (a probe input tells the formulas apart) and still
    swaps Llama's."""
    m = _gemma("gemma")
    assert_same_outputs(m, dict(attention=False))
    patch(m, attention=False)
    try:
        assert not any(isinstance(x, lnn.RMSNorm) for x in m.modules())
    finally:
        unpatch(m)
    lm = _llama()
    patch(lm, attention=False)
    try:
        assert isinstance(lm.model.layers[0].input_layernorm, lnn.RMSNorm)
    finally:
        unpatch(lm)


@pytest.mark.parametrize("window", [4096, 8])
def test_gemma2_softcap(window):
    """Gemma 2's attention softcap: computed by llmkern's kernels when no mask is needed, by the model's eager
    attention when one is (a window shorter than the input, a padded batch; SDPA refuses softcap)."""
    assert_same_outputs(_gemma("gemma2", window), dict(norms=False))


def test_gpt_oss_attention_sinks_take_the_models_eager_attention():
    """s_aux (attention sinks) is computed by no llmkern kernel: such calls run the model's own eager attention,
    with SDPA's boolean / implicit causal masks turned into its additive ones."""
    assert_same_outputs(_gpt_oss(), dict(norms=False))


def test_generation_config_use_cache_false_gets_no_cache():
    m = _llama()
    with torch.no_grad():  # unit norms: this model's greedy tokens do not settle into one repeated token
        for n, p in m.named_parameters():
            if "norm" in n:
                p.fill_(1.0)
    m.generation_config.use_cache = False
    ids = torch.randint(1, V, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = m.generate(ids, max_new_tokens=8, do_sample=False)
        patch(m)
        try:
            assert torch.equal(m.generate(ids, max_new_tokens=8, do_sample=False), want)
            cfg = copy.deepcopy(m.generation_config)
            assert torch.equal(m.generate(ids, generation_config=cfg, max_new_tokens=8, do_sample=False), want)
            assert torch.equal(m.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True), want)
        finally:
            unpatch(m)


def test_deepcopy_of_a_patched_model_generates_with_the_copy():
    m = _llama()
    patch(m)
    try:
        c = copy.deepcopy(m)
        ids = torch.randint(1, V, (1, 6), generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            c.lm_head.weight.normal_()  # a different model from here on
            own = c(ids).logits[0, -1].argmax().item()
            assert c.generate(ids, max_new_tokens=1, do_sample=False)[0, -1].item() == own
            assert m.generate(ids, max_new_tokens=1, do_sample=False)[0, -1].item() == m(ids).logits[0, -1].argmax()
    finally:
        unpatch(m)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantizing_releases_the_float_weights_and_unpatch_dequantizes(quant):
    """patch(quant=...) holds no reference to the float linears (quantizing saves their memory); unpatch puts
    back nn.Linear modules with the dequantized weights, so the model computes what it did while patched."""
    m = _llama()
    w0 = m.model.layers[0].mlp.down_proj.weight.detach().clone()
    alive = weakref.ref(m.model.layers[0].mlp.down_proj.weight)
    ids = torch.randint(1, V, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        patch(m, quant=quant)
        gc.collect()
        assert alive() is None
        patched = m(ids).logits
        unpatch(m)
        lin = m.model.layers[0].mlp.down_proj
        assert type(lin) is torch.nn.Linear and lin.weight.requires_grad
        if quant == "int8":
            dq = ops.dequantize_int8(*ops.quantize_int8(w0, 0))
        else:  # (from_linear's fp16-valued scales: Int4Linear.from_linear's own quantization of w0)
            lin0 = torch.nn.Linear(w0.shape[1], w0.shape[0], bias=False)
            lin0.weight.data = w0
            q = lnn.Int4Linear.from_linear(lin0, group_size=32)
            dq = ops.dequantize_int4(q.qweight, q.scales, q.offsets)
        assert torch.equal(lin.weight, dq)
        assert rel(m(ids).logits, patched) <= 1e-5


@pytest.mark.parametrize("keep_float", [False, True])
def test_unpatch_after_model_to_follows_the_new_dtype(keep_float):
    m = _llama()
    ids = torch.randint(1, V, (1, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = m(ids).logits
        patch(m, quant="int8", keep_float=keep_float)
        m.to(torch.bfloat16)
        m(ids)
        unpatch(m)
        assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
        assert rel(m(ids).logits.float(), want) <= 5e-2  # bf16 (and, without keep_float, int8) weights
        if keep_float:  # the original weights, converted as model.to would have
            m2 = _llama().to(torch.bfloat16)
            assert torch.equal(m(ids).logits, m2(ids).logits)


def test_keep_float_restores_a_mixed_dtype_model_as_it_was():
    """Without a model.to(...) in between, unpatch(keep_float=True) puts back the very modules, dtypes kept (a bf16
    model with an fp32 lm_head keeps it fp32)."""
    m = _llama().to(torch.bfloat16)
    m.lm_head.float()
    head, down = m.lm_head, m.model.layers[1].mlp.down_proj
    patch(m, quant="int8", keep_float=True)
    unpatch(m)
    assert m.lm_head is head and m.lm_head.weight.dtype == torch.float32
    assert m.model.layers[1].mlp.down_proj is down and down.weight.dtype == torch.bfloat16
