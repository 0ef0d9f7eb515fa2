"""KVCache: bit-exact writes by slot, padding, fused rotary, attention vs a naive float64 definition,
batched == one at a time, int8 cache quality, capacity errors, reset and nbytes."""
from __future__ import annotations

import pytest
import torch

from llmkern.nn import KVCache, RotaryEmbedding
from nn_testutil import naive_attention, naive_rope, rel_err

Hk, Hq, D = 2, 6, 32


def rand_kv(B, S, dtype=torch.float32):
    return torch.randn(B, S, Hk, D, dtype=dtype), torch.randn(B, S, Hk, D, dtype=dtype)


def test_append_is_bit_exact_and_skips_padding():
    torch.manual_seed(0)
    c = KVCache(3, 20, Hk, D)
    c.k.fill_(float("nan"))
    c.v.fill_(float("nan"))
    # Non-contiguous new keys: every other head of a wider tensor.
    k = torch.randn(3, 5, 2 * Hk, D)[:, :, ::2]
    v = torch.randn(3, 5, Hk, D)
    c.append(k, v, lengths=torch.tensor([5, 1, 3]))
    assert c.seq_lens.dtype == torch.int32 and c.seq_lens.tolist() == [5, 1, 3]
    k2, v2 = rand_kv(3, 2)
    c.append(k2, v2)
    assert c.seq_lens.tolist() == [7, 3, 5]
    for b, n in enumerate([5, 1, 3]):
        assert torch.equal(c.k[b, :n], k[b, :n]) and torch.equal(c.v[b, :n], v[b, :n])
        assert torch.equal(c.k[b, n:n + 2], k2[b]) and torch.equal(c.v[b, n:n + 2], v2[b])
        assert torch.isnan(c.k[b, n + 2:]).all() and torch.isnan(c.v[b, n + 2:]).all()  # padding not written


def test_bf16_cache_write_exact():
    torch.manual_seed(1)
    c = KVCache(2, 9, Hk, D, dtype=torch.bfloat16)
    k, v = rand_kv(2, 4, torch.bfloat16)
    c.append(k, v)
    assert c.k.dtype == torch.bfloat16 and torch.equal(c.k[:, :4], k) and torch.equal(c.v[:, :4], v)


def test_attend_matches_naive_prefill_then_decode():
    torch.manual_seed(2)
    B, lens = 3, [17, 1, 9]
    c = KVCache(B, 33, Hk, D)
    k, v = rand_kv(B, 17)
    c.append(k, v, lengths=lens)
    ks = [k[b, :n] for b, n in enumerate(lens)]
    vs = [v[b, :n] for b, n in enumerate(lens)]
    for step in range(3):
        kn, vn = rand_kv(B, 1)
        c.append(kn, vn)
        ks = [torch.cat([ks[b], kn[b]]) for b in range(B)]
        vs = [torch.cat([vs[b], vn[b]]) for b in range(B)]
        q = torch.randn(B, Hq, D)
        out = c.attend(q)
        assert out.shape == (B, Hq, D)
        for b in range(B):
            assert rel_err(out[b], naive_attention(q[b:b + 1], ks[b], vs[b])[0]) <= 1e-5
    # several new tokens at once (Sq = 3, causal among them)
    kn, vn = rand_kv(B, 3)
    c.append(kn, vn)
    q = torch.randn(B, 3, Hq, D)
    out = c.attend(q)
    for b in range(B):
        ref = naive_attention(q[b], torch.cat([ks[b], kn[b]]), torch.cat([vs[b], vn[b]]))
        assert rel_err(out[b], ref) <= 1e-5


def test_padded_chunk_attends_real_rows_correctly():
    """A chunk with `lengths` after earlier tokens: real query s of sequence b sits at old_b + s."""
    torch.manual_seed(3)
    for Smax in (40, 12):  # 12: old + S exceeds the capacity for sequence 0 -> per-sequence path
        c = KVCache(2, Smax, Hk, D)
        k0, v0 = rand_kv(2, 6)
        c.append(k0, v0)
        k1, v1 = rand_kv(2, 7)
        c.append(k1, v1, lengths=[5, 2])
        q = torch.randn(2, 7, Hq, D)
        out = c.attend(q)
        for b, n in enumerate([5, 2]):
            ref = naive_attention(q[b, :n], torch.cat([k0[b], k1[b, :n]]), torch.cat([v0[b], v1[b, :n]]))
            assert rel_err(out[b, :n], ref) <= 1e-5
        with pytest.raises(ValueError, match="rows"):
            c.attend(q[:, :3])


def test_batched_equals_one_at_a_time():
    torch.manual_seed(4)
    B, lens = 3, [3, 8, 5]
    k, v = rand_kv(B, 8)
    steps = [rand_kv(B, 1) for _ in range(2)]
    qs = torch.randn(B, Hq, D)
    big = KVCache(B, 16, Hk, D)
    big.append(k, v, lengths=lens)
    for kn, vn in steps:
        big.append(kn, vn)
    out = big.attend(qs)
    for b in range(B):
        one = KVCache(1, 16, Hk, D)
        one.append(k[b:b + 1, : lens[b]], v[b:b + 1, : lens[b]])
        for kn, vn in steps:
            one.append(kn[b:b + 1], vn[b:b + 1])
        assert torch.equal(one.k[0, : lens[b] + 2], big.k[b, : lens[b] + 2])
        assert rel_err(out[b:b + 1], one.attend(qs[b:b + 1])) <= 1e-6


def test_int8_cache_close_to_fp32_cache():
    torch.manual_seed(5)
    f, q8 = KVCache(2, 40, Hk, D), KVCache(2, 40, Hk, D, int8=True)
    assert q8.k.dtype == torch.int8 and q8.k_scale.shape == (2, 40, Hk) and q8.k_scale.dtype == torch.float32
    k, v = rand_kv(2, 33)
    for c in (f, q8):
        c.append(k, v, lengths=[33, 20])
    q = torch.randn(2, Hq, D)
    kn, vn = rand_kv(2, 1)
    f.append(kn, vn)
    q8.append(kn, vn)
    ref = f.attend(q)
    assert rel_err(q8.attend(q), ref) <= 2e-2
    # dequantized cache contents are close to the float ones as well
    deq = q8.k[:, :34].float() * q8.k_scale[:, :34, :, None]
    assert rel_err(deq[0], f.k[0, :34]) <= 1e-2


def test_fused_rotary_rotates_q_in_place_and_k_before_writing():
    torch.manual_seed(6)
    rot = RotaryEmbedding(D, 64)
    c = KVCache(2, 32, Hk, D)
    c.append(*rand_kv(2, 4), lengths=[4, 2])  # earlier tokens: new positions start at 4 and 2
    k, v = rand_kv(2, 3)
    q = torch.randn(2, 3, Hq, D)
    q0 = q.clone()
    c.append(k, v, q=q, rotary=rot)
    pos = torch.tensor([[4, 5, 6], [2, 3, 4]])
    assert rel_err(q, naive_rope(q0, pos)) <= 1e-5
    assert rel_err(c.k[0, 4:7], naive_rope(k, pos)[0]) <= 1e-5
    assert rel_err(c.k[1, 2:5], naive_rope(k, pos)[1]) <= 1e-5
    assert torch.equal(c.v[0, 4:7], v[0])  # v is never rotated
    # explicit positions override seq_lens + s
    c2 = KVCache(1, 8, Hk, D)
    q = torch.randn(1, 2, Hq, D)
    q0 = q.clone()
    k, v = rand_kv(1, 2)
    c2.append(k, v, q=q, positions=torch.tensor([[10, 20]]), rotary=rot)
    assert rel_err(q, naive_rope(q0, torch.tensor([[10, 20]]))) <= 1e-5
    with pytest.raises(ValueError, match="rotary"):
        c2.append(k, v, q=q)


def test_full_cache_error_names_sequence_and_numbers():
    c = KVCache(2, 8, Hk, D)
    c.append(*rand_kv(2, 6))
    with pytest.raises(ValueError, match=r"KV cache full: sequence 0 holds 6 tokens and appending 3 new tokens "
                                         r".*max_seq_len=8"):
        c.append(*rand_kv(2, 3))
    assert c.seq_lens.tolist() == [6, 6]  # nothing changed
    with pytest.raises(ValueError, match=r"KV cache full: sequence 1 holds 6 tokens and appending 3"):
        c.append(*rand_kv(2, 3), lengths=[1, 3])
    c.append(*rand_kv(2, 2))  # exactly full is fine
    assert c.seq_lens.tolist() == [8, 8]
    with pytest.raises(ValueError, match="KV cache full"):
        c.append(*rand_kv(2, 1))


def test_bad_inputs():
    c = KVCache(2, 8, Hk, D)
    with pytest.raises(ValueError, match="batch"):
        c.append(*rand_kv(3, 1))
    with pytest.raises(ValueError, match="lengths"):
        c.append(*rand_kv(2, 2), lengths=[3, 1])
    with pytest.raises(ValueError, match="lengths"):
        c.append(*rand_kv(2, 2), lengths=[1])
    with pytest.raises(ValueError, match="k"):
        c.append(torch.randn(2, Hk, D), torch.randn(2, Hk, D))
    with pytest.raises(ValueError, match="head dim|Hk, D"):
        c.append(torch.randn(2, 1, Hk, 40), torch.randn(2, 1, Hk, 40))
    with pytest.raises(ValueError):
        KVCache(0, 8, Hk, D)
    with pytest.raises(TypeError, match="dtype"):
        KVCache(1, 8, Hk, D, dtype=torch.int32)
    with pytest.raises(TypeError, match="must be ints, got \\('int', 'float', 'int', 'int'\\)"):
        KVCache(1, 4.5, Hk, D)
    with pytest.raises(TypeError, match="lengths must be integers, got torch.float32"):  # (0.7 truncated to 0)
        c.append(*rand_kv(2, 2), lengths=[0.5, 0.7])
    assert c.seq_lens.tolist() == [0, 0]


def test_reset_and_nbytes():
    torch.manual_seed(7)
    c = KVCache(3, 10, Hk, D)
    assert c.nbytes == 2 * 3 * 10 * Hk * D * 4
    assert KVCache(3, 10, Hk, D, int8=True).nbytes == 2 * 3 * 10 * Hk * D + 2 * 3 * 10 * Hk * 4
    c.append(*rand_kv(3, 4))
    c.reset(1)
    assert c.seq_lens.tolist() == [4, 0, 4] and not c.is_empty()
    k, v = rand_kv(3, 6)
    with pytest.raises(ValueError, match="sequence 0"):  # 4 + 6 fits exactly... 4 + 7 does not
        c.append(*rand_kv(3, 7))
    c.append(k, v)
    assert c.seq_lens.tolist() == [10, 6, 10] and torch.equal(c.k[1, :6], k[1])
    c.reset()
    assert c.seq_lens.tolist() == [0, 0, 0] and c.is_empty()
    with pytest.raises(ValueError, match="batch_index"):
        c.reset(3)


def test_cache_never_joins_the_autograd_graph():
    """Appending activations that require grad must not chain decode steps through the cache."""
    torch.manual_seed(8)
    rot = RotaryEmbedding(D, 16)
    c = KVCache(1, 8, Hk, D)
    w = torch.randn(D, D, requires_grad=True)
    for pos in range(3):
        k, v = torch.randn(1, 1, Hk, D) @ w, torch.randn(1, 1, Hk, D) @ w
        q = torch.randn(1, 1, Hq, D) @ w
        q0 = q.detach().clone()
        c.append(k, v, q=q, rotary=rot)
        assert not c.k.requires_grad and c.k.grad_fn is None and not c.v.requires_grad
        assert rel_err(q, naive_rope(q0, torch.tensor([[pos]]))) <= 1e-5  # q still rotated in place
