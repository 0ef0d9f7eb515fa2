"""Attention module: no-cache path vs a naive float64 definition, and with a KVCache or PagedKVCache
(prefill + decode, ragged prompts, chunked prefill, int8 projections / int8 cache) vs no cache."""
from __future__ import annotations

import pytest
import torch

from llmkern.nn import Attention, KVCache, PagedKVCache, quantize_linears
from nn_testutil import naive_attention, naive_rope, rel_err

HIDDEN, D = 80, 32


def make_attention(Hq=6, Hk=2, dtype=torch.float32, seed=0, bias=False):
    torch.manual_seed(seed)
    att = Attention(HIDDEN, Hq, Hk, D, max_positions=64, bias=bias, dtype=dtype)
    with torch.no_grad():
        for p in att.parameters():
            p.normal_(std=HIDDEN ** -0.5)
    return att


def make_cache(kind, att, B, dtype=torch.float32, int8=False):
    """(cache, seq_ids) for kind "contiguous" or "paged<block_size>"."""
    if kind == "contiguous":
        return KVCache(B, 24, att.num_kv_heads, D, dtype=dtype, int8=int8), None
    bs = int(kind[5:])
    c = PagedKVCache(B * (-(-24 // bs)), bs, att.num_kv_heads, D, dtype=dtype, int8=int8)
    return c, [c.add_sequence() for _ in range(B)]


def naive_module(att, x):
    """float64 definition of the module without cache: projections, RoPE at 0..S-1, causal GQA attention."""
    B, S, _ = x.shape
    x64 = x.to(torch.float64)

    def lin(m, t):
        y = t @ m.weight.to(torch.float64).t()
        return y if m.bias is None else y + m.bias.to(torch.float64)

    q = lin(att.q_proj, x64).view(B, S, att.num_heads, D)
    k = lin(att.k_proj, x64).view(B, S, att.num_kv_heads, D)
    v = lin(att.v_proj, x64).view(B, S, att.num_kv_heads, D)
    pos = torch.arange(S).expand(B, S)
    q, k = naive_rope(q, pos), naive_rope(k, pos)
    o = torch.stack([naive_attention(q[b], k[b], v[b]) for b in range(B)])  # [B, S, Hq, D]
    return lin(att.o_proj, o.reshape(B, S, -1))


@pytest.mark.parametrize("Hq,Hk,bias", [(6, 2, False), (4, 4, True), (4, 1, False)])
def test_no_cache_matches_naive(Hq, Hk, bias):
    att = make_attention(Hq, Hk, bias=bias)
    x = torch.randn(2, 17, HIDDEN)
    out = att(x)
    assert out.shape == (2, 17, HIDDEN)
    assert rel_err(out, naive_module(att, x)) <= 1e-5


def run_cached(att, x, cache, ids, prefill, chunks=()):
    """Prefill `prefill` tokens, then the given chunk sizes, then one token at a time: [B, S, hidden]."""
    outs, t = [], 0
    for n in [prefill, *chunks] + [1] * (x.shape[1] - prefill - sum(chunks)):
        outs.append(att(x[:, t:t + n], cache, ids))
        t += n
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("kind", ["contiguous", "paged1", "paged7", "paged16"])
def test_cache_prefill_then_decode_equals_full_causal(kind):
    att = make_attention(seed=1)
    x = torch.randn(2, 12, HIDDEN)
    ref = att(x)
    cache, ids = make_cache(kind, att, 2)
    out = run_cached(att, x, cache, ids, prefill=7)
    assert rel_err(out, ref) <= 1e-5
    # per decode step too, not only overall
    for t in range(7, 12):
        assert rel_err(out[:, t], ref[:, t]) <= 1e-5


@pytest.mark.parametrize("kind", ["contiguous", "paged5"])
def test_chunked_prefill_equals_full_causal(kind):
    att = make_attention(seed=2)
    x = torch.randn(2, 14, HIDDEN)
    cache, ids = make_cache(kind, att, 2)
    out = run_cached(att, x, cache, ids, prefill=5, chunks=(4, 3))  # chunks go through decode_attention
    assert rel_err(out, att(x)) <= 1e-5


@pytest.mark.parametrize("kind", ["contiguous", "paged3"])
def test_ragged_prompts_each_equal_own_run(kind):
    """Right-padded prompts of lengths 7 and 3, then 4 decode steps: each sequence as if alone."""
    att = make_attention(seed=3)
    lens, steps = [7, 3], 4
    seqs = [torch.randn(1, n + steps, HIDDEN) for n in lens]
    prompt = torch.zeros(2, 7, HIDDEN)
    for b, n in enumerate(lens):
        prompt[b, :n] = seqs[b][0, :n]
    cache, ids = make_cache(kind, att, 2)
    out_p = att(prompt, cache, ids, lengths=torch.tensor(lens))
    outs = [[out_p[b, :n]] for b, n in enumerate(lens)]
    for s in range(steps):
        x = torch.cat([seqs[b][:, lens[b] + s: lens[b] + s + 1] for b in range(2)])  # [2, 1, hidden]
        o = att(x, cache, ids)
        for b in range(2):
            outs[b].append(o[b])
    for b in range(2):
        assert rel_err(torch.cat(outs[b]), att(seqs[b])[0]) <= 1e-5


def test_ragged_chunk_after_prefill():
    """A padded chunk when the cache is not empty (decode_attention with per-row lengths)."""
    att = make_attention(seed=4)
    seqs = [torch.randn(1, 9, HIDDEN), torch.randn(1, 6, HIDDEN)]
    cache, _ = make_cache("contiguous", att, 2)
    att(torch.cat([s[:, :4] for s in seqs]), cache)
    chunk = torch.zeros(2, 5, HIDDEN)
    chunk[0], chunk[1, :2] = seqs[0][0, 4:9], seqs[1][0, 4:6]
    o = att(chunk, cache, lengths=[5, 2])
    assert cache.seq_lens.tolist() == [9, 6]
    assert rel_err(o[0], att(seqs[0])[0, 4:]) <= 1e-5
    assert rel_err(o[1, :2], att(seqs[1])[0, 4:]) <= 1e-5


def test_int8_projections_with_cache_equal_no_cache():
    att = quantize_linears(make_attention(seed=5), "int8")
    x = torch.randn(2, 10, HIDDEN)
    cache, ids = make_cache("paged4", att, 2)
    assert rel_err(run_cached(att, x, cache, ids, prefill=6), att(x)) <= 1e-5


def test_int8_kv_cache_close_to_float_cache():
    att = make_attention(seed=6)
    x = torch.randn(2, 12, HIDDEN)
    for kind in ("contiguous", "paged4"):
        outs = []
        for int8 in (False, True):
            cache, ids = make_cache(kind, att, 2, int8=int8)
            outs.append(run_cached(att, x, cache, ids, prefill=4))
        assert rel_err(outs[1][:, 4:], outs[0][:, 4:]) <= 2e-2  # the decode steps read the int8 cache


def test_bf16_module_with_cache():
    att = make_attention(seed=7, dtype=torch.bfloat16)
    x = torch.randn(2, 9, HIDDEN, dtype=torch.bfloat16)
    cache, ids = make_cache("paged4", att, 2, dtype=torch.bfloat16)
    out = run_cached(att, x, cache, ids, prefill=5)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, naive_module(att, x)) <= 1e-2


def test_errors():
    att = make_attention()
    paged, _ = make_cache("paged4", att, 1)
    with pytest.raises(ValueError, match="seq_ids"):
        att(torch.randn(1, 3, HIDDEN), paged)
    with pytest.raises(ValueError, match="seq_ids"):
        att(torch.randn(1, 3, HIDDEN), KVCache(1, 8, 2, D), [0])
    with pytest.raises(ValueError, match=r"\[B, S, hidden\]"):
        att(torch.randn(3, HIDDEN))
    with pytest.raises(ValueError, match="num_kv_heads"):
        Attention(HIDDEN, 6, 4, D)
    with pytest.raises(ValueError, match="head_dim"):
        Attention(HIDDEN, 6, 2)  # 80 / 6 is not an integer
    for bad in (16, 36, 264):  # outside the attention ops' head dims: refused at construction, not at forward
        with pytest.raises(ValueError, match=f"head_dim must be a multiple of 8 in 32..256.*got {bad}"):
            Attention(HIDDEN, 2, 2, bad)
    cache = KVCache(1, 4, 2, D)
    att(torch.randn(1, 4, HIDDEN), cache)
    with pytest.raises(ValueError, match="KV cache full"):
        att(torch.randn(1, 1, HIDDEN), cache)
