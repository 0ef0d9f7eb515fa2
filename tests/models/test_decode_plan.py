"""The decode plan (models/decode_plan.py) computes the module path's logits bit for bit, is used
when it applies, and is never used stale or outside its scope. Its step program (one
llmkern._C.StepProgram) computes the Python step's logits bit for bit once SwiGLU's silu is the
program's own kernel on both sides, and the module path's within fp32 rounding."""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from llmkern import _backends
from llmkern.models import Llama
from llmkern.models import decode_plan as decode_plan_mod
from llmkern.models.decode_plan import DecodePlan
from llmkern.nn import Int4Linear, quantize_linears
from test_llama import tiny as tiny_model

pytestmark = pytest.mark.skipif(not _backends.available("cpu"), reason="the plan runs the cpu backend")


def tiny(seed=0, quant="int4", tie=False, skip=(), **kw) -> Llama:
    """test_llama's random model (3 layers here) on the default backends, quantized and fused."""
    m = tiny_model(seed, backend=None, num_layers=3, max_positions=64, tie_embeddings=tie, **kw)
    if quant != "none":
        kind, _, mode = quant.partition("-")
        quantize_linears(m, kind, mode=mode or None, skip=skip)
    m.fuse_projections()
    return m


def decode(m, prompt, steps, B, int8_kv=False, use_plan=True, monkeypatch=None):
    """Prefill `prompt` [B, P], then `steps` greedy decode steps; returns the stacked logits."""
    cache = m.new_cache(B, 48, int8=int8_kv)
    out = [m(prompt, cache, last_only=True)]
    nxt = out[-1].argmax(-1, keepdim=True)
    for _ in range(steps):
        if not use_plan:
            m.__dict__["_decode_plan"] = None
            with monkeypatch.context() as mp:
                mp.setattr(DecodePlan, "build", classmethod(lambda cls, *a: None))
                out.append(m(nxt, cache, last_only=True))
        else:
            out.append(m(nxt, cache, last_only=True))
        nxt = out[-1].argmax(-1, keepdim=True)
    return torch.stack(out), cache


def kernel_silu(g: torch.Tensor) -> torch.Tensor:
    """silu(g) by the step program's silu_mul kernel (times ones: exact), for the Python step to match it."""
    g2 = g.reshape(-1, g.shape[-1])                                   # [..., I] -> [M, I]
    M, I = g2.shape
    gu = torch.cat([g2, torch.ones_like(g2)], dim=-1)                 # [M, 2I]: gate, up = 1
    out = torch.empty_like(g2)
    code = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[g.dtype]
    _backends.cpu_module().silu_mul_call(gu.data_ptr(), code, 2 * I, M, I, out.data_ptr(), I, "")()
    return out.view(g.shape)


def python_step_with_kernel_silu(monkeypatch):
    """No step program; the Python step's F.silu is the program's kernel."""
    monkeypatch.setenv("LLMKERN_DECODE_PROGRAM", "0")
    monkeypatch.setattr(decode_plan_mod, "F", types.SimpleNamespace(silu=kernel_silu, linear=F.linear))


@pytest.mark.parametrize("quant", ["int4", "int4-w4a8", "int4-w4a8g", "int8-w8a16", "int8-w8a8"])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("int8_kv", [False, True])
def test_plan_equals_module_path(quant, B, int8_kv, monkeypatch):
    monkeypatch.setenv("LLMKERN_DECODE_PROGRAM", "0")  # the Python step (the program: below)
    # Bitwise: a module's first call (the op, which reads the canonical int4 tensors) must give the same
    # bits as its prepared calls, so no rows16 layout here (its sums run in another order; below).
    monkeypatch.setenv("LLMKERN_INT4_ROWS16", "0")
    m = tiny(quant=quant)
    prompt = torch.randint(0, 101, (B, 7))
    with torch.inference_mode():
        want, _ = decode(m, prompt, 12, B, int8_kv, use_plan=False, monkeypatch=monkeypatch)
        got, cache = decode(m, prompt, 12, B, int8_kv)
    plan = m.__dict__.get("_decode_plan")
    assert isinstance(plan, DecodePlan) and plan.program is None  # the plan really ran, from Python
    assert torch.equal(got, want)
    assert cache[0]._host_max == 7 + 12 and int(cache[0].seq_lens[0]) == 19


@pytest.mark.parametrize("B", [1, 3])
def test_plan_with_rows16_close_to_module_path(B, monkeypatch):
    """With the rows16 layout (the default on AVX-512): the prepared calls of 2..8 fp32 rows read it and
    sum in another order than a module's first call (the op), so plan and module paths agree to fp32
    rounding, not bitwise; the step program still equals the Python step bitwise."""
    monkeypatch.setenv("LLMKERN_INT4_ROWS16", "1")
    m = tiny(quant="int4")
    prompt = torch.randint(0, 101, (B, 7))
    with torch.inference_mode():
        want, _ = decode(m, prompt, 12, B, False, use_plan=False, monkeypatch=monkeypatch)
        got, _ = decode(m, prompt, 12, B, False)
        with monkeypatch.context() as mp:
            python_step_with_kernel_silu(mp)
            m.__dict__.pop("_decode_plan", None)
            py_step, _ = decode(m, prompt, 12, B, False)
    assert torch.equal(got, py_step)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got - want).abs().max()


@pytest.mark.parametrize("quant", ["int4", "int4-w4a8", "int4-w4a8g", "int8-w8a16", "int8-w8a8"])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("int8_kv", [False, True])
def test_program_equals_python_step(quant, B, int8_kv, monkeypatch):
    monkeypatch.setenv("LLMKERN_INT4_ROWS16", "0")  # bitwise, as test_plan_equals_module_path
    m = tiny(quant=quant)
    prompt = torch.randint(0, 101, (B, 7))
    with torch.inference_mode():
        got, cache = decode(m, prompt, 12, B, int8_kv)
        plan = m.__dict__.get("_decode_plan")
        assert isinstance(plan, DecodePlan) and plan.program is not None  # the program really ran
        assert cache[0]._host_max == 7 + 12 and int(cache[0].seq_lens[0]) == 19
        assert cache[0]._host().tolist() == [19] * B
        assert int(cache[-1]._next[1, -1]) == (B - 1) * cache[-1].max_seq_len + 19  # the slot table advanced
        module, _ = decode(m, prompt, 12, B, int8_kv, use_plan=False, monkeypatch=monkeypatch)
        with monkeypatch.context() as mp:
            python_step_with_kernel_silu(mp)
            m.__dict__.pop("_decode_plan", None)
            want, _ = decode(m, prompt, 12, B, int8_kv)
            assert m.__dict__["_decode_plan"].program is None
    assert torch.equal(got, want)  # same launches, same arguments, same order
    # against the module path (torch's silu): an fp32 ulp here and there, far below the kernels' tolerance;
    # an int8 cache can turn such an ulp into one quantization step of a key or value (1/127 of its row's max),
    # and the w4a8 / w8a8 modes into one step of an int8 activation, whose effect then stays in the cache (int4-w4a8g,
    # B = 1, seed 0: the 13 steps' logits bitwise equal or an ulp apart except the last two, 6.4e-3 each, once one
    # activation's rounding flipped; the program against the Python step above is the bitwise check)
    rel = ((got.double() - module.double()).norm() / module.double().norm()).item()
    assert rel < (1e-2 if "a8" in quant else 2e-3 if int8_kv else 1e-5), rel
    assert torch.equal(got.argmax(-1), module.argmax(-1))


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("quant", ["int4", "int8-w8a8"])
@pytest.mark.parametrize("B", [1, 3])
def test_bf16_model_program_equals_python_step_and_fp32_model_within_rounding(quant, B, monkeypatch):
    """A bf16 model (activations, norms and KV cache in bf16; the same quantized weights as in fp32): float32
    logits; the step program equals the Python step bit for bit; the module path (torch's silu) and the fp32
    model agree within bf16 rounding."""
    monkeypatch.setenv("LLMKERN_INT4_ROWS16", "0")  # bitwise, as test_plan_equals_module_path
    m32 = tiny(quant=quant)
    m = tiny(quant=quant, dtype=torch.bfloat16)
    m.load_state_dict(m32.state_dict())  # same quantized weights, float parameters rounded to bf16
    prompt = torch.randint(0, 101, (B, 7))
    with torch.inference_mode():
        got, cache = decode(m, prompt, 12, B)
        assert m.__dict__["_decode_plan"].program is not None and cache[0].k.dtype == torch.bfloat16
        module, _ = decode(m, prompt, 12, B, use_plan=False, monkeypatch=monkeypatch)
        with monkeypatch.context() as mp:
            python_step_with_kernel_silu(mp)
            m.__dict__.pop("_decode_plan", None)
            want, _ = decode(m, prompt, 12, B)
        # the fp32 model on the same tokens (teacher forcing: greedy paths may part where logits nearly tie)
        tokens = torch.cat([prompt, got[:-1].argmax(-1).T], dim=1)        # [B, 7 + 12]
        fp32 = m32(tokens)[:, 6:].transpose(0, 1)                          # [B, 19, V] -> [13, B, V]
    assert got.dtype == want.dtype == module.dtype == torch.float32
    assert torch.equal(got, want)
    assert torch.equal(got.argmax(-1), module.argmax(-1)) and rel(got, module) < 1e-2
    assert rel(got, fp32) < (4e-2 if quant == "int8-w8a8" else 2e-2)  # (W8A8: x quantized from other values)


def test_bf16_model_logits_are_float32_and_a_quantized_head_reads_fp32(monkeypatch):
    """16-bit logits tie (bf16 near 20: 0.125 apart) and greedy decoding then picks the lower token id, so
    the model returns float32 logits; a quantized CPU head computes them from the upcast hidden state."""
    for quant in ("int8-w8a16", "none"):
        m = tiny(quant=quant, dtype=torch.bfloat16)
        seen = []
        m.lm_head.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
        prompt = torch.randint(0, 101, (2, 5))
        with torch.inference_mode():
            logits = m(prompt, m.new_cache(2, 16), last_only=True)
            full = m(prompt)
        assert logits.dtype == full.dtype == torch.float32 and full.shape == (2, 5, 101)
        assert seen == ([torch.float32] * 2 if quant != "none" else [torch.bfloat16] * 2), (quant, seen)


def test_plan_with_float_linears_and_tied_head(monkeypatch):
    m = tiny(quant="int4", tie=True, skip=("lm_head",))
    assert type(m.lm_head) is torch.nn.Linear and m.lm_head.weight is m.embed_tokens.weight
    prompt = torch.randint(0, 101, (2, 5))
    with torch.inference_mode():
        got, _ = decode(m, prompt, 6, 2)
        assert m.__dict__["_decode_plan"].program is not None
        module, _ = decode(m, prompt, 6, 2, use_plan=False, monkeypatch=monkeypatch)
        with monkeypatch.context() as mp:
            mp.setenv("LLMKERN_DECODE_PROGRAM", "0")
            m.__dict__.pop("_decode_plan", None)
            python, _ = decode(m, prompt, 6, 2)
            python_step_with_kernel_silu(mp)
            m.__dict__.pop("_decode_plan", None)
            python_kernel_silu, _ = decode(m, prompt, 6, 2)
    assert torch.equal(python, module)  # the Python step: bit for bit the module path
    assert torch.equal(got, python_kernel_silu)  # the program: bit for bit the Python step
    assert ((got - module).norm() / module.norm()).item() < 1e-5


def quantized_embedding(m, fmt: str, tie_head: bool = False):
    """Replace m's float embedding by a QuantizedEmbedding of its int8 (groups of 32) / int4 quantization; with
    tie_head, an lm_head holding the same tensors (a tied GGUF model's layout)."""
    from llmkern import ops
    from llmkern.nn import Int8Linear, QuantizedEmbedding
    w = m.embed_tokens.weight.detach().float()
    parts = ops.quantize_int8(w, 32) if fmt == "int8" else ops.quantize_int4(w, 32)
    names = ("weight", "weight_scale") if fmt == "int8" else ("qweight", "scales", "offsets")
    m.embed_tokens = QuantizedEmbedding(dict(zip(names, parts)), dtype=m.dtype)
    if tie_head:
        m.lm_head = (Int8Linear if fmt == "int8" else Int4Linear).from_quantized(*parts)
    return m


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("tie_head", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_program_with_a_quantized_embedding(fmt, tie_head, dtype, monkeypatch):
    """GGUF models hold their embedding as stored (QuantizedEmbedding): the program's native lookup gives the
    Python step's bits, the Python step the module path's, and the lookup's rows are the table's."""
    monkeypatch.setenv("LLMKERN_INT4_ROWS16", "0")  # bitwise, as test_plan_equals_module_path
    m = quantized_embedding(tiny(quant="int8", skip=("lm_head",)).to(dtype), fmt, tie_head)
    B = 2
    prompt = torch.randint(0, 101, (B, 5))
    with torch.inference_mode():
        got, _ = decode(m, prompt, 6, B)
        plan = m.__dict__["_decode_plan"]
        assert plan.program is not None and "embedding" in plan.program.names()
        module, _ = decode(m, prompt, 6, B, use_plan=False, monkeypatch=monkeypatch)
        with monkeypatch.context() as mp:
            mp.setenv("LLMKERN_DECODE_PROGRAM", "0")
            m.__dict__.pop("_decode_plan", None)
            python, _ = decode(m, prompt, 6, B)
            python_step_with_kernel_silu(mp)
            m.__dict__.pop("_decode_plan", None)
            python_kernel_silu, _ = decode(m, prompt, 6, B)
    assert torch.equal(python, module)
    assert torch.equal(got, python_kernel_silu)
    assert rel(got, module) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_plan_is_dropped_when_the_quantized_embedding_changes():
    m = quantized_embedding(tiny(quant="int8"), "int8")
    prompt = torch.randint(0, 101, (1, 5))
    with torch.inference_mode():
        cache, plan = _planned(m, prompt)
        m.embed_tokens.weight_scale = m.embed_tokens.weight_scale * 2  # a new buffer
        assert not plan.matches(m, cache, prompt[:, :1])
        cache2, plan2 = _planned(m, prompt)
        m.embed_tokens.weight.data = m.embed_tokens.weight.data.clone()  # same buffer object, new storage
        assert not plan2.matches(m, cache2, prompt[:, :1])


def _planned(m, prompt):
    """Prefill `prompt` [1, P] and take one decode step: (cache, the plan that step built and matches)."""
    cache = m.new_cache(1, 32)
    m(prompt, cache, last_only=True)
    m(prompt[:, :1], cache, last_only=True)
    plan = m.__dict__["_decode_plan"]
    assert plan is not None and plan.matches(m, cache, prompt[:, :1])
    return cache, plan


def test_plan_is_dropped_when_a_weight_changes():
    m = tiny(quant="int4")
    prompt = torch.randint(0, 101, (1, 5))
    with torch.inference_mode():
        cache, plan = _planned(m, prompt)
        # replace one linear's weights: the plan must not be used with the old ones
        lin = m.layers[1].mlp.down_proj
        new = Int4Linear.from_linear(torch.nn.Linear(lin.in_features, lin.out_features, bias=False), group_size=32)
        m.layers[1].mlp.down_proj = new
        assert not plan.matches(m, cache, prompt[:, :1])
        a = m(prompt[:, :1], cache, last_only=True)  # module path (the new linear is not prepared yet)
        m.layers[1].mlp.down_proj.qweight = new.qweight.clone()  # a buffer change drops the runner
        assert not m.__dict__["_decode_plan"] or not m.__dict__["_decode_plan"].matches(m, cache, prompt[:, :1])
        assert torch.isfinite(a).all()


@pytest.mark.parametrize("which", ["ln1", "ln2", "final_norm", "embed", "head"])
def test_plan_is_dropped_when_a_parameter_gets_new_data(which, monkeypatch):
    """`p.data = other` keeps the Parameter object (the identity checks pass) but moves what the plan reads by
    pointer: e.g. weights reloaded that way, then the same cache reset and reused. The plan must not be used:
    the step then equals the module path with the new values."""
    m = tiny(quant="int4", skip=("lm_head",))
    prompt = torch.randint(0, 101, (1, 5))
    p = {"ln1": m.layers[1].input_layernorm.weight, "ln2": m.layers[0].post_attention_layernorm.weight,
         "final_norm": m.norm.weight, "embed": m.embed_tokens.weight, "head": m.lm_head.weight}[which]
    with torch.inference_mode():
        cache, plan = _planned(m, prompt)
        p.data = p.data * 1.5  # new storage, same Parameter
        assert not plan.matches(m, cache, prompt[:, :1])
        cache.reset() if hasattr(cache, "reset") else [kv.reset() for kv in cache]
        m(prompt, cache, last_only=True)
        got = m(prompt[:, :1], cache, last_only=True)
        assert m.__dict__["_decode_plan"] is not plan  # rebuilt from the new values
        m.__dict__["_decode_plan"] = None
        monkeypatch.setattr(DecodePlan, "build", classmethod(lambda cls, *a: None))
        ref_cache = m.new_cache(1, 32)
        m(prompt, ref_cache, last_only=True)
        want = m(prompt[:, :1], ref_cache, last_only=True)  # the module path
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_plan_not_used_outside_its_scope(monkeypatch):
    m = tiny(quant="int4")
    prompt = torch.randint(0, 101, (1, 5))
    with torch.inference_mode():
        cache = m.new_cache(1, 32)
        m(prompt, cache, last_only=True)
        monkeypatch.setenv("LLMKERN_BACKEND", "reference")
        m(prompt[:, :1], cache, last_only=True)
        assert m.__dict__.get("_decode_plan") is None
        monkeypatch.delenv("LLMKERN_BACKEND")
        paged = m.new_cache(1, 32, paged=True, block_size=4)
        ids = [c.add_sequence() for c in paged][:1]
        m(prompt, paged, seq_ids=ids, last_only=True)
        m(prompt[:, :1], paged, seq_ids=ids, last_only=True)
        plan = m.__dict__.get("_decode_plan")  # paged caches: the plan's paged steps (tests below)
        assert plan is not None and plan.paged is not None
        monkeypatch.setenv("LLMKERN_DECODE_PROGRAM", "0")  # no program: no paged plan
        m.__dict__.pop("_decode_plan")
        m(prompt[:, :1], paged, seq_ids=ids, last_only=True)
        assert m.__dict__.get("_decode_plan") is None


def test_full_cache_raises_the_cache_error():
    m = tiny(quant="int4")
    with torch.inference_mode():
        cache = m.new_cache(1, 6)
        logits = m(torch.randint(0, 101, (1, 5)), cache, last_only=True)
        nxt = logits.argmax(-1, keepdim=True)
        m(nxt, cache, last_only=True)  # 6 of 6
        with pytest.raises(ValueError, match="KV cache full"):
            m(nxt, cache, last_only=True)


def test_weight_bytes_count_the_packed_int4_copy_when_decode_reads_it(monkeypatch):
    monkeypatch.setenv("LLMKERN_INT4_PACK", "1")  # pack fp32 scales too (packing happens on AVX-512 only)
    m = tiny(quant="int4", skip=("lm_head",))
    canonical = m.weight_bytes_per_token()
    with torch.inference_mode():
        cache = m.new_cache(1, 16)
        m(torch.randint(0, 101, (1, 4)), cache, last_only=True)
    lin = m.layers[0].mlp.down_proj
    packed = getattr(lin._run.impl, "packed", None)
    if packed is None:
        assert m.weight_bytes_per_token() == canonical
    else:  # one packed stream instead of qweight + scales + offsets per int4 linear
        per = [l._run.impl.packed.numel() - sum(b.numel() * b.element_size() for n, b in l.named_buffers() if n != "bias")
               for layer in m.layers for l in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                               layer.mlp.gate_up_proj, layer.mlp.down_proj)]
        assert m.weight_bytes_per_token() == canonical + sum(per)


def test_program_is_rebuilt_for_new_threads_isa_or_counters(monkeypatch):
    """Every launch of the step program binds the thread count, the ISA and the caches' counter tensors."""
    m = tiny(quant="int4")
    prompt = torch.randint(0, 101, (1, 5))
    saved = torch.get_num_threads()
    with torch.inference_mode():
        cache = m.new_cache(1, 32)
        m(prompt, cache, last_only=True)
        nxt = prompt[:, :1]
        m(nxt, cache, last_only=True)
        plan = m.__dict__["_decode_plan"]
        assert plan.program is not None and plan.matches(m, cache, nxt)
        try:
            torch.set_num_threads(1 if saved != 1 else 2)
            assert not plan.matches(m, cache, nxt)
        finally:
            torch.set_num_threads(saved)
        assert plan.matches(m, cache, nxt)
        if plan.isa != "scalar":
            monkeypatch.setenv("LLMKERN_CPU_ISA", "scalar")
            assert not plan.matches(m, cache, nxt)
            monkeypatch.delenv("LLMKERN_CPU_ISA")
        cache[1].seq_lens = cache[1].seq_lens.clone()  # a new counter tensor: the bound pointer is stale
        assert not plan.matches(m, cache, nxt)
        m(nxt, cache, last_only=True)
        assert m.__dict__["_decode_plan"] is not plan and int(cache[1].seq_lens[0]) == 7


def test_program_rejects_bad_token_ids_before_writing():
    m = tiny(quant="int4")
    with torch.inference_mode():
        cache = m.new_cache(1, 32)
        m(torch.randint(0, 101, (1, 5)), cache, last_only=True)
        m(torch.tensor([[3]]), cache, last_only=True)
        assert m.__dict__["_decode_plan"].program is not None
        with pytest.raises(IndexError, match="token id 5000 of batch row 0 is out of range"):
            m(torch.tensor([[5000]]), cache, last_only=True)
        assert int(cache[0].seq_lens[0]) == 6 and cache[0]._host_max == 6  # nothing advanced


# ------------------------------------------------------------------ paged caches


def decode_paged(m, prompts, steps, block_size=4, num_blocks=64, use_plan=True, int8_kv=False):
    """Prefill each prompt [1, P_b] into its own sequence of per-layer PagedKVCaches, then `steps` greedy
    decode steps of the whole batch (seq_ids in row order); returns (stacked logits [steps, B, V], caches, ids)."""
    caches = m.new_cache(paged=True, block_size=block_size, num_blocks=num_blocks, int8=int8_kv)
    ids = [[c.add_sequence() for c in caches][0] for _ in prompts]
    first = [m(p, caches, seq_ids=[i], last_only=True) for p, i in zip(prompts, ids)]
    nxt = torch.cat(first).argmax(-1, keepdim=True)                     # [B, 1]
    out = []
    for _ in range(steps):
        if not use_plan:
            m.__dict__["_decode_plan"] = None
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(DecodePlan, "build", classmethod(lambda cls, *a: None))
                logits = m(nxt, caches, seq_ids=ids, last_only=True)
        else:
            logits = m(nxt, caches, seq_ids=ids, last_only=True)
        out.append(logits)
        nxt = logits.argmax(-1, keepdim=True)
    return torch.stack(out), caches, ids


@pytest.mark.parametrize("quant", ["int4", "int8-w8a8"])
@pytest.mark.parametrize("int8_kv", [False, True])
def test_paged_program_equals_module_path(quant, int8_kv):
    """Sequences of different lengths, blocks of 4 (new blocks every few steps), the paged step program."""
    m = tiny(quant=quant)
    prompts = [torch.randint(0, 101, (1, n)) for n in (5, 8, 3)]
    with torch.inference_mode():
        got, caches, ids = decode_paged(m, prompts, 10, int8_kv=int8_kv)
        plan = m.__dict__.get("_decode_plan")
        assert isinstance(plan, DecodePlan) and plan.paged is not None and plan.program is not None
        want, ref_caches, _ = decode_paged(m, prompts, 10, use_plan=False, int8_kv=int8_kv)
    rel = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert rel < (2e-3 if int8_kv else 1e-5), rel  # the program's silu (see test_program_equals_python_step)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    for c, r in zip(caches, ref_caches):  # the same lengths and blocks as the caches' own bookkeeping
        assert [(c._seqs[i].length, c._seqs[i].blocks) for i in ids] == [(r._seqs[i].length, r._seqs[i].blocks)
                                                                       for i in ids]
        assert c.num_free_blocks == r.num_free_blocks


def test_paged_plan_leaves_copy_on_write_and_full_caches_to_the_module_path():
    m = tiny(quant="int4")
    with torch.inference_mode():
        caches = m.new_cache(paged=True, block_size=4, num_blocks=5)
        a = [c.add_sequence() for c in caches][0]
        m(torch.randint(0, 101, (1, 6)), caches, seq_ids=[a], last_only=True)  # 6 tokens: blocks 0, 1 (half)
        b = [c.fork(a) for c in caches][0]                                       # shares both blocks
        nxt = torch.tensor([[3], [4]])
        m(nxt, caches, seq_ids=[a, b], last_only=True)  # shared half-full block: copied on write by the module path
        assert all(c._seqs[a].blocks[1] != c._seqs[b].blocks[1] for c in caches)
        assert all(c._seqs[a].length == 7 and c._seqs[b].length == 7 for c in caches)
        m(nxt, caches, seq_ids=[a, b], last_only=True)  # now private: the paged program runs
        plan = m.__dict__["_decode_plan"]
        assert plan is not None and plan.paged is not None and plan.paged.ids == [a, b]
        assert all(c._seqs[a].length == 8 for c in caches)
        for _ in range(4):  # lengths 9..12: the last two free blocks, taken by the program's step
            m(nxt, caches, seq_ids=[a, b], last_only=True)
        assert all(c.num_free_blocks == 0 and c._seqs[b].length == 12 for c in caches)
        with pytest.raises(ValueError, match="PagedKVCache full"):  # the module path's error, nothing changed
            m(nxt, caches, seq_ids=[a, b], last_only=True)
        assert all(c._seqs[a].length == 12 and c._seqs[b].length == 12 for c in caches)


def test_paged_program_after_a_fork_equals_module_path():
    """A fork shares blocks; the step that appends to a shared, half-full block copies it (module path), and
    the table the program reads must follow (the plan is rebuilt after such a step)."""
    m = tiny(quant="int4")
    prompt = torch.randint(0, 101, (1, 6))

    def run(use_plan):
        caches = m.new_cache(paged=True, block_size=4, num_blocks=32)
        a = [c.add_sequence() for c in caches][0]
        m.__dict__.pop("_decode_plan", None)
        m(prompt, caches, seq_ids=[a], last_only=True)
        m(prompt[:, :1], caches, seq_ids=[a], last_only=True)  # a: 7 tokens, a plan for [a]
        b = [c.fork(a) for c in caches][0]
        nxt, out = torch.tensor([[3], [9]]), []
        for _ in range(9):  # the first step copies the shared block; later ones cross block boundaries
            if use_plan:
                logits = m(nxt, caches, seq_ids=[a, b], last_only=True)
            else:
                with pytest.MonkeyPatch.context() as mp:
                    mp.setattr(DecodePlan, "build", classmethod(lambda cls, *a_: None))
                    m.__dict__.pop("_decode_plan", None)
                    logits = m(nxt, caches, seq_ids=[a, b], last_only=True)
            out.append(logits)
            nxt = logits.argmax(-1, keepdim=True)
        return torch.stack(out), m.__dict__.get("_decode_plan")

    with torch.inference_mode():
        got, plan = run(True)
        want, _ = run(False)
    assert plan is not None and plan.paged is not None and not plan.paged.stale  # the program ran at the end
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_paged_plan_is_not_built_when_layers_disagree():
    m = tiny(quant="int4")
    with torch.inference_mode():
        caches = m.new_cache(paged=True, block_size=4, num_blocks=16)
        a = [c.add_sequence() for c in caches][0]
        caches[1].allocator.allocate()  # layer 1's allocator now hands out other block ids
        m(torch.randint(0, 101, (1, 6)), caches, seq_ids=[a], last_only=True)
        m(torch.tensor([[3]]), caches, seq_ids=[a], last_only=True)
        assert m.__dict__.get("_decode_plan") is None
