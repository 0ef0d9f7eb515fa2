"""PagedKVCache: same results as the contiguous KVCache for any block size, block allocator (free list,
reuse, refcounts), fork with copy on write, block tables, out-of-blocks errors and nbytes."""
from __future__ import annotations

import pytest
import torch

from llmkern.nn import KVCache, PagedKVCache, RotaryEmbedding
from nn_testutil import naive_attention, rel_err

Hk, Hq, D = 2, 4, 32


def rand_kv(B, S):
    return torch.randn(B, S, Hk, D), torch.randn(B, S, Hk, D)


def tokens(cache: PagedKVCache, sid: int, t: torch.Tensor | None = None) -> torch.Tensor:
    """The cached keys (or `t`'s rows) of one sequence, gathered through its block table: [L, Hk, D]."""
    t = cache.k if t is None else t
    table = cache.block_table([sid])[0].long()
    return t[table].reshape(-1, *t.shape[2:])[: cache.seq_len(sid)]  # [W, bs, ...] -> [W * bs, ...]


@pytest.mark.parametrize("block_size,int8", [(1, False), (7, False), (16, False), (256, False), (7, True)])
def test_paged_equals_contiguous(block_size, int8):
    torch.manual_seed(block_size)
    B, Smax = 3, 20
    rot = RotaryEmbedding(D, 64)
    contiguous = KVCache(B, Smax, Hk, D, int8=int8)
    paged = PagedKVCache(B * -(-Smax // block_size) + 1, block_size, Hk, D, int8=int8)
    ids = [paged.add_sequence() for _ in range(B)]
    # prefill with right padding, three decode steps, one two-token step
    steps = [(13, [13, 4, 9])] + [(1, None)] * 3 + [(2, None)]
    for S, lengths in steps:
        k, v = rand_kv(B, S)
        q = torch.randn(B, S, Hq, D)
        q_c, q_p = q.clone(), q.clone()
        contiguous.append(k, v, lengths=lengths, q=q_c, rotary=rot)
        paged.append(ids, k, v, lengths=lengths, q=q_p, rotary=rot)
        assert torch.equal(q_c, q_p)  # both rotated in place at the same positions
        qa = q_c[:, 0] if S == 1 else q_c
        out_c, out_p = contiguous.attend(qa), paged.attend(qa, ids)
        real = [slice(0, n) for n in (lengths or [S] * B)]
        for b in range(B):
            if S == 1:
                assert rel_err(out_p[b], out_c[b]) <= 1e-6
            else:
                assert rel_err(out_p[b, real[b]], out_c[b, real[b]]) <= 1e-6
    assert paged.seq_lens(ids).tolist() == contiguous.seq_lens.tolist() == [18, 9, 14]
    for b, sid in enumerate(ids):  # the same bytes were written, wherever the blocks are
        n = paged.seq_len(sid)
        assert torch.equal(tokens(paged, sid), contiguous.k[b, :n])
        assert torch.equal(tokens(paged, sid, paged.v), contiguous.v[b, :n])
        if int8:
            assert torch.equal(tokens(paged, sid, paged.k_scale), contiguous.k_scale[b, :n])


def test_long_padded_prefill_equals_contiguous():
    """B * S above the host-side slot path: slots come from tensor ops on the block table."""
    torch.manual_seed(9)
    lens, S = [600, 350], 600
    k, v = rand_kv(2, S)
    contiguous = KVCache(2, 601, Hk, D)
    paged = PagedKVCache(2 * 86, 7, Hk, D)
    ids = [paged.add_sequence() for _ in range(2)]
    contiguous.append(k, v, lengths=lens)
    paged.append(ids, k, v, lengths=lens)
    for b, sid in enumerate(ids):
        assert paged.seq_len(sid) == lens[b] and torch.equal(tokens(paged, sid), k[b, : lens[b]])
    kn, vn = rand_kv(2, 1)
    contiguous.append(kn, vn)
    paged.append(ids, kn, vn)
    q = torch.randn(2, Hq, D)
    assert rel_err(paged.attend(q, ids), contiguous.attend(q)) <= 1e-6


def test_block_table_and_seq_lens_layout():
    torch.manual_seed(0)
    c = PagedKVCache(10, 4, Hk, D)
    a, b, e = c.add_sequence(), c.add_sequence(), c.add_sequence()
    c.append([a, b, e], *rand_kv(3, 12), lengths=[5, 0, 12])
    t = c.block_table([a, b, e])
    assert t.dtype == torch.int32 and t.shape == (3, 3)
    assert t[0, 2] == 0 and (t[1] == 0).all()  # padded with 0 beyond the used blocks
    used = t[0, :2].tolist() + t[2].tolist()
    assert len(set(used)) == 5 and all(0 <= x < 10 for x in used)
    assert c.seq_lens([e, a, b]).tolist() == [12, 5, 0] and c.seq_lens([a]).dtype == torch.int32
    assert c.num_free_blocks == 5 and c.is_empty([b]) and not c.is_empty([a, b])


def test_attend_after_padded_append_matches_naive():
    torch.manual_seed(1)
    c = PagedKVCache(12, 3, Hk, D)
    ids = [c.add_sequence(), c.add_sequence()]
    k0, v0 = rand_kv(2, 4)
    c.append(ids, k0, v0)
    k1, v1 = rand_kv(2, 5)
    c.append(ids, k1, v1, lengths=[2, 5])
    q = torch.randn(2, 5, Hq, D)
    out = c.attend(q, ids)
    for b, n in enumerate([2, 5]):
        ref = naive_attention(q[b, :n], torch.cat([k0[b], k1[b, :n]]), torch.cat([v0[b], v1[b, :n]]))
        assert rel_err(out[b, :n], ref) <= 1e-5
    # in another order, and without a preceding append: tables are rebuilt from the allocator
    q1 = torch.randn(2, Hq, D)
    out = c.attend(q1, ids[::-1])
    ref = naive_attention(q1[0:1], torch.cat([k0[1], k1[1]]), torch.cat([v0[1], v1[1]]))
    assert rel_err(out[0], ref[0]) <= 1e-5


def test_freed_blocks_are_reused():
    torch.manual_seed(2)
    c = PagedKVCache(6, 4, Hk, D)
    a, b = c.add_sequence(), c.add_sequence()
    c.append([a], *rand_kv(1, 7))
    c.append([b], *rand_kv(1, 9))
    assert c.num_free_blocks == 1
    blocks_a = set(c.block_table([a])[0].tolist())
    c.free_sequence(a)
    assert c.num_free_blocks == 3
    with pytest.raises(ValueError, match="unknown sequence"):
        c.seq_len(a)
    n = c.add_sequence()
    k, v = rand_kv(1, 8)
    c.append([n], k, v)  # two blocks: exactly the ones a gave back
    assert set(c.block_table([n])[0].tolist()) == blocks_a and c.num_free_blocks == 1
    assert torch.equal(tokens(c, n), k[0])


def test_fork_copy_on_write_keeps_parent_unchanged():
    torch.manual_seed(3)
    c = PagedKVCache(12, 4, Hk, D)
    p = c.add_sequence()
    kp, vp = rand_kv(1, 10)  # blocks of 4: the third block is partially filled (2 of 4)
    c.append([p], kp, vp)
    free0 = c.num_free_blocks
    parent_table = c.block_table([p]).clone()
    child = c.fork(p)
    assert c.num_free_blocks == free0 and c.seq_len(child) == 10  # shares, allocates nothing
    assert torch.equal(c.block_table([child]), parent_table)
    kc, vc = rand_kv(1, 2)
    c.append([child], kc, vc)
    ct = c.block_table([child])[0]
    assert c.num_free_blocks == free0 - 1  # one copy of the shared last block (the 2 new tokens fit in it)
    assert torch.equal(ct[:2], parent_table[0, :2]) and ct[2] != parent_table[0, 2]
    # the parent's blocks and contents are untouched; the child sees the prefix plus its own tokens
    assert torch.equal(c.block_table([p]), parent_table)
    assert torch.equal(tokens(c, p), kp[0]) and torch.equal(tokens(c, p, c.v), vp[0])
    assert torch.equal(tokens(c, child), torch.cat([kp[0], kc[0]]))
    q = torch.randn(2, Hq, D)
    out = c.attend(q, [p, child])
    assert rel_err(out[0], naive_attention(q[0:1], kp[0], vp[0])[0]) <= 1e-5
    ref = naive_attention(q[1:2], torch.cat([kp[0], kc[0]]), torch.cat([vp[0], vc[0]]))[0]
    assert rel_err(out[1], ref) <= 1e-5
    # the parent's last block is now its own again: appending writes in place, no copy
    kp2, vp2 = rand_kv(1, 2)
    c.append([p], kp2, vp2)
    assert c.num_free_blocks == free0 - 1 and torch.equal(c.block_table([p]), parent_table)
    assert torch.equal(tokens(c, child), torch.cat([kp[0], kc[0]]))  # the child did not see it
    # freeing one keeps the shared prefix alive for the other; freeing both returns everything
    c.free_sequence(p)
    assert c.num_free_blocks == free0 and torch.equal(tokens(c, child), torch.cat([kp[0], kc[0]]))
    c.free_sequence(child)
    assert c.num_free_blocks == 12


def test_fork_of_full_block_needs_no_copy():
    torch.manual_seed(4)
    c = PagedKVCache(8, 4, Hk, D)
    p = c.add_sequence()
    c.append([p], *rand_kv(1, 8))
    child = c.fork(p)
    free0 = c.num_free_blocks
    c.append([child, p], *rand_kv(2, 1))  # both append into their own new block
    assert c.num_free_blocks == free0 - 2
    t = c.block_table([p, child])
    assert torch.equal(t[0, :2], t[1, :2]) and t[0, 2] != t[1, 2]


def test_fork_both_append_in_one_batch():
    """Parent and child append together: one copies the shared block, the other keeps it."""
    torch.manual_seed(10)
    c = PagedKVCache(3, 4, Hk, D)
    p = c.add_sequence()
    kp, vp = rand_kv(1, 6)
    c.append([p], kp, vp)
    child = c.fork(p)
    assert c.num_free_blocks == 1
    k, v = rand_kv(2, 2)
    c.append([p, child], k, v)  # needs exactly the one free block
    assert c.num_free_blocks == 0  # one copy; the original now belongs to one sequence
    t = c.block_table([p, child])
    assert t[0, 0] == t[1, 0] and t[0, 1] != t[1, 1]
    assert torch.equal(tokens(c, p), torch.cat([kp[0], k[0]]))
    assert torch.equal(tokens(c, child), torch.cat([kp[0], k[1]]))
    c.free_sequence(p)
    c.free_sequence(child)
    assert c.num_free_blocks == 3


def test_out_of_blocks_error_changes_nothing():
    torch.manual_seed(5)
    c = PagedKVCache(4, 4, Hk, D)
    a, b = c.add_sequence(), c.add_sequence()
    c.append([a], *rand_kv(1, 12))
    with pytest.raises(ValueError, match=r"PagedKVCache full: appending needs 2 more blocks but only 1 of 4 "
                                         r"are free \(block_size=4; sequence 1: 0 \+ 8 tokens"):
        c.append([a, b], *rand_kv(2, 8), lengths=[0, 8])
    assert c.num_free_blocks == 1 and c.seq_len(a) == 12 and c.seq_len(b) == 0
    # a copy on write needs a block too
    c.append([a], *rand_kv(1, 2))  # a: 14 tokens in 4 blocks, last one half full
    f = c.fork(a)
    with pytest.raises(ValueError, match="PagedKVCache full: appending needs 1 more blocks but only 0"):
        c.append([f], *rand_kv(1, 1))
    assert c.seq_len(f) == 14


def test_bad_inputs_and_nbytes():
    with pytest.raises(ValueError, match="block_size"):
        PagedKVCache(4, 0, Hk, D)
    with pytest.raises(ValueError, match="block_size"):
        PagedKVCache(4, 257, Hk, D)
    c = PagedKVCache(5, 3, Hk, D)
    assert c.nbytes == 2 * 5 * 3 * Hk * D * 4
    assert PagedKVCache(5, 3, Hk, D, int8=True).nbytes == 2 * 5 * 3 * Hk * D + 2 * 5 * 3 * Hk * 4
    a = c.add_sequence()
    with pytest.raises(ValueError, match="distinct"):
        c.append([a, a], *rand_kv(2, 1))
    with pytest.raises(ValueError, match="unknown sequence id 7"):
        c.append([7], *rand_kv(1, 1))
    with pytest.raises(ValueError, match="batch"):
        c.append([a], *rand_kv(2, 1))
    with pytest.raises(ValueError, match="lengths"):
        c.append([a], *rand_kv(1, 2), lengths=[3])
    b = c.add_sequence()
    with pytest.raises(TypeError, match=r"seq_ids must be integers, got 1.7 \(float\)"):  # (int(1.7): sequence 1)
        c.append([a, 1.7], *rand_kv(2, 1))
    c.append(torch.tensor([a, b]), *rand_kv(2, 1))  # (integer tensors and numpy ints are ids)
    with pytest.raises(ValueError, match="unknown sequence"):
        c.free_sequence(9)
