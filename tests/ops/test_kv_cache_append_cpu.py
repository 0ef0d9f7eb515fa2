"""kv_cache_append on the "cpu" backend (llmkern._C) against naive definitions written here.

- Writes: token by token into the cache seen as [num_slots, Hk, D], slot -1 skipped; float caches
  bit-exact (the cast of torch's .to), int8 by the rule computed with numpy float32 (amax, IEEE
  127 / amax, round half to even, clamp), compared bit for bit.
- Fused rotary: the rotation in float64 from the formula of rotary_embedding.py (products of two floats
  are exact in float64), rounded once to the dtype: the kernel matches it bit for bit, q in place too.
Caches start NaN (float) / 99 with NaN scales (int8): a missed or stray write shows up.
"""
import numpy as np
import pytest
import torch

import llmkern
from llmkern.ops import OPS, rotary_cos_sin, strict

from _attention_helpers import CacheLayout, randn
from _cpu_helpers import ISAS, isa, threads  # noqa: F401 - fixtures

INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.int8: torch.int8}


def bits_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))


def caches(shape, dtype):
    if dtype == torch.int8:
        return [torch.full(shape, 99, dtype=torch.int8), torch.full(shape, 99, dtype=torch.int8),
                torch.full(shape[:3], float("nan")), torch.full(shape[:3], float("nan"))]
    return [torch.full(shape, float("nan"), dtype=dtype), torch.full(shape, float("nan"), dtype=dtype), None, None]


def naive_rotate(x, pos, cs, interleaved):
    """x [T, H, D] -> rotated copy: pairs (a, b) -> (a cos - b sin, b cos + a sin) in float64, rounded once."""
    out = x.clone()
    R = cs.shape[1]
    half = R // 2
    for t in range(x.shape[0]):
        c, s = cs[pos[t], :half].double(), cs[pos[t], half:].double()
        for h in range(x.shape[1]):
            row = x[t, h].double()
            ia = torch.arange(half) * 2 if interleaved else torch.arange(half)
            ib = ia + 1 if interleaved else ia + half
            a, b = row[ia], row[ib]
            out[t, h, ia] = (a * c - b * s).to(x.dtype)
            out[t, h, ib] = (b * c + a * s).to(x.dtype)
    return out


def naive_quant(x):
    x = x.float().numpy()
    q, s = np.zeros(x.shape, np.int8), np.zeros(x.shape[0], np.float32)
    for h in range(x.shape[0]):
        amax = np.float32(np.abs(x[h]).max())
        if amax == 0:
            continue
        s[h] = amax / np.float32(127)
        with np.errstate(over="ignore", invalid="ignore"):  # tiny amax: 127 / amax is inf, 0 * inf NaN -> 0
            q[h] = np.nan_to_num(np.clip(np.rint(x[h] * (np.float32(127) / amax)), -127, 127), nan=0.0).astype(np.int8)
    return torch.from_numpy(q), torch.from_numpy(s)


def naive_append(k, v, cs_, slots):
    """k/v [T, Hk, D]; returns the expected caches."""
    out = [None if t is None else t.clone() for t in cs_]
    Hk, D = out[0].shape[2], out[0].shape[3]
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        for i, src in enumerate((k, v)):
            if out[2] is None:
                out[i].view(-1, Hk, D)[slot] = src[t].to(out[i].dtype)
            else:
                out[i].view(-1, Hk, D)[slot], out[2 + i].view(-1, Hk)[slot] = naive_quant(src[t])
    return out


def run_cpu(k, v, cs_, slots, **kw):
    got = [None if t is None else t.clone() for t in cs_]
    with strict():
        llmkern.ops.kv_cache_append(k, v, got[0], got[1], slots, k_scale=got[2], v_scale=got[3], backend="cpu", **kw)
    assert OPS["kv_cache_append"].last_backend == "cpu"
    return got


def assert_same(got, want):
    for name, a, b in zip(("k_cache", "v_cache", "k_scale", "v_scale"), got, want):
        if a is not None:
            assert bits_equal(a, b), f"{name} differs"


def paged(lens, Hk, D, bs, dtype, cache_dtype, seed):
    """Packed tokens of sequences `lens` into a shuffled paged cache, with -1 padding rows inserted."""
    layout = CacheLayout(lens, block_size=bs, seed=seed)
    slots = torch.cat(layout.slots)
    pos = torch.cat([torch.arange(n) for n in lens])
    for i in (1, 7):
        slots = torch.cat([slots[:i], torch.tensor([-1]), slots[i:]])
        pos = torch.cat([pos[:i], torch.tensor([3]), pos[i:]])
    gen = torch.Generator().manual_seed(seed)
    T = slots.numel()
    k = torch.randn(T, Hk, D, generator=gen).to(dtype)
    v = torch.randn(T, Hk, D, generator=gen).to(dtype)
    return k, v, caches((layout.rows, bs, Hk, D), cache_dtype), slots, pos


PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
         (torch.float32, torch.bfloat16), (torch.float32, torch.int8), (torch.bfloat16, torch.int8)]


@pytest.mark.parametrize("bs", [1, 16, 7])
@pytest.mark.parametrize("dtype,cache_dtype", PAIRS, ids=str)
def test_write_bit_exact(dtype, cache_dtype, bs, threads, isa):
    k, v, c, slots, _ = paged([1, 17, 100, 0, 5], 3, 80, bs, dtype, cache_dtype, seed=1)
    assert_same(run_cpu(k, v, c, slots), naive_append(k, v, c, slots))


@pytest.mark.parametrize("dtype,cache_dtype", PAIRS, ids=str)
def test_write_long_sequences_head_dim_256_bit_exact(dtype, cache_dtype, threads, isa):
    """Prompt-sized appends: 257 and 1000 tokens (the token loop split statically across the threads, a
    boundary inside a sequence), at D 256, the largest head dim (the kernel's row buffer holds exactly 256)."""
    k, v, c, slots, _ = paged([257, 0, 1000, 3], 2, 256, 7, dtype, cache_dtype, seed=5)
    assert_same(run_cpu(k, v, c, slots), naive_append(k, v, c, slots))


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("rotary_dim", ["full", "partial"])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float16, torch.float16), (torch.float32, torch.int8)], ids=str)
def test_fused_rotary_bit_exact(dtype, cache_dtype, interleaved, rotary_dim, D, threads, isa):
    k, v, c, slots, pos = paged([17, 1, 100], 2, D, 16, dtype, cache_dtype, seed=2)
    R = D if rotary_dim == "full" else D // 2 + 8 - (D // 2 + 8) % 2
    cs = rotary_cos_sin(128, R, base=500000.0)
    q = randn(k.shape[0], 6, D, dtype=dtype)
    q_in = q.clone()
    got = run_cpu(k, v, c, slots, q=q_in, positions=pos, cos_sin_cache=cs, rotary_interleaved=interleaved)
    k_rot = naive_rotate(k, pos, cs, interleaved)
    assert_same(got, naive_append(k_rot, v, c, slots))
    assert bits_equal(q_in, naive_rotate(q, pos, cs, interleaved)), "q must be rotated in place"


@pytest.mark.parametrize("rotary_dim", ["full", "partial"])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float16, torch.float16), (torch.float32, torch.int8)], ids=str)
def test_fused_rotary_head_dim_256_bit_exact(dtype, cache_dtype, interleaved, rotary_dim, threads, isa):
    """D 256, the largest head dim: full rotary fills the kernel's 256-float row buffer, partial (R 136)
    leaves 120 values that pass through unrotated."""
    D = 256
    k, v, c, slots, pos = paged([17, 1, 40], 1, D, 16, dtype, cache_dtype, seed=6)
    R = D if rotary_dim == "full" else D // 2 + 8
    cs = rotary_cos_sin(128, R, base=500000.0)
    q = randn(k.shape[0], 2, D, dtype=dtype)
    q_in = q.clone()
    got = run_cpu(k, v, c, slots, q=q_in, positions=pos, cos_sin_cache=cs, rotary_interleaved=interleaved)
    assert_same(got, naive_append(naive_rotate(k, pos, cs, interleaved), v, c, slots))
    assert bits_equal(q_in, naive_rotate(q, pos, cs, interleaved)), "q must be rotated in place"


@pytest.mark.parametrize("Hq,Hk", [(2, 2), (8, 2), (8, 1)])
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.int8)], ids=str)
def test_fused_rotary_head_ratios_bit_exact(dtype, cache_dtype, Hq, Hk, threads, isa):
    """q/k head ratios 1 (MHA), 4 and 8 (test_fused_rotary_bit_exact has 3): q's Hq heads are rotated in their
    own loop, k's Hk heads with the write; every q head of every token must be rotated, none twice."""
    k, v, c, slots, pos = paged([17, 1, 40], Hk, 64, 16, dtype, cache_dtype, seed=7)
    cs = rotary_cos_sin(128, 64)
    q = randn(k.shape[0], Hq, 64, dtype=dtype)
    q_in = q.clone()
    got = run_cpu(k, v, c, slots, q=q_in, positions=pos, cos_sin_cache=cs)
    assert_same(got, naive_append(naive_rotate(k, pos, cs, False), v, c, slots))
    assert bits_equal(q_in, naive_rotate(q, pos, cs, False)), "q must be rotated in place"


def test_rotary_strided_q_and_batched_shape(isa):
    """[B, S, Hq, D] q as a head-sliced view (rotated in place through its strides); k transposed in memory."""
    B, S, Hk, Hq, D, Smax = 2, 17, 2, 4, 64, 40
    k, v = randn(B, S, Hk, D, layout="transposed"), randn(B, S, Hk, D)
    big_q = randn(B, S, Hq + 2, D)
    q = big_q[:, :, 1:Hq + 1]
    pos = torch.arange(S)[None].expand(B, S) + torch.tensor([[0], [9]])
    slots = torch.arange(B)[:, None] * Smax + pos
    cs = rotary_cos_sin(64, D)
    c = caches((B, Smax, Hk, D), torch.float32)
    before = big_q.clone()
    got = run_cpu(k, v, c, slots, q=q, positions=pos, cos_sin_cache=cs)
    want = naive_append(naive_rotate(k.reshape(-1, Hk, D), pos.reshape(-1), cs, False), v.reshape(-1, Hk, D), c,
                        slots.reshape(-1))
    assert_same(got, want)
    q_want = naive_rotate(before[:, :, 1:Hq + 1].reshape(-1, Hq, D), pos.reshape(-1), cs, False).reshape(B, S, Hq, D)
    assert bits_equal(q.contiguous(), q_want)
    assert bits_equal(big_q[:, :, 0], before[:, :, 0]) and bits_equal(big_q[:, :, -1], before[:, :, -1])


@pytest.mark.parametrize("alias", ["k", "v"])
def test_rotary_q_that_is_k_or_v(alias, threads, isa):
    """q given as k (or v) itself: the cache gets k rotated once and v as given (the kernel reads k and v before
    it rotates q in place), and the tensor ends up rotated, as q. Found by fuzzing: k was rotated twice."""
    B, S, H, D, Smax = 2, 40, 2, 64, 48  # 80 tokens x 3 rows x 256 B: past the threads' 64 KiB threshold
    k, v = randn(B, S, H, D), randn(B, S, H, D)
    k0, v0 = k.clone(), v.clone()
    pos = torch.arange(S)[None].expand(B, S) + torch.tensor([[0], [5]])
    slots = torch.arange(B)[:, None] * Smax + pos
    cs = rotary_cos_sin(64, D)
    c = caches((B, Smax, H, D), torch.float32)
    got = run_cpu(k, v, c, slots, q=k if alias == "k" else v, positions=pos, cos_sin_cache=cs)
    k_rot = naive_rotate(k0.reshape(-1, H, D), pos.reshape(-1), cs, False)
    assert_same(got, naive_append(k_rot, v0.reshape(-1, H, D), c, slots.reshape(-1)))
    q_rot = k_rot if alias == "k" else naive_rotate(v0.reshape(-1, H, D), pos.reshape(-1), cs, False)
    assert bits_equal((k if alias == "k" else v).reshape(-1, H, D), q_rot)


@pytest.mark.parametrize("alias", ["k", "v"])
def test_reference_with_q_that_is_k_or_v(alias):
    """The reference too writes k and v as given and rotates q (here k or v itself) last (found by fuzzing: it
    rotated v in place before writing it); the same bits as the cpu kernel."""
    H, D = 2, 64
    pos = torch.arange(6)
    cs = rotary_cos_sin(16, D)
    k0, v0 = randn(6, H, D), randn(6, H, D)
    outs = []
    for backend in ("reference", "cpu"):
        k, v = k0.clone(), v0.clone()
        kc, vc = torch.zeros(1, 8, H, D), torch.zeros(1, 8, H, D)
        llmkern.ops.kv_cache_append(k, v, kc, vc, pos, q=k if alias == "k" else v, positions=pos,
                                    cos_sin_cache=cs, backend=backend)
        outs.append((kc, vc, k, v))
    (kc, vc, k, v), (kc2, vc2, k2, v2) = outs
    assert bits_equal(kc, kc2) and bits_equal(vc, vc2) and bits_equal(k, k2) and bits_equal(v, v2)
    assert bits_equal(vc[0, :6], v0) and bits_equal(kc[0, :6], naive_rotate(k0, pos, cs, False))


@pytest.mark.parametrize("D", [32, 40, 43])  # 40, 43: partial 16-lane tails (AVX-512); 43: a scalar tail (AVX2)
def test_int8_ties_zero_tiny_and_nonfinite_rows(isa, D):
    """127/amax = 1 makes x.5 exact ties (half to even); an all-zero head stores 0; a tiny head saturates;
    a head with inf or NaN stores zeros with an inf / NaN scale (the reference's rule)."""
    k = torch.zeros(1, 5, D)
    k[0, 0, :6] = torch.tensor([127.0, 2.5, 3.5, -0.5, -1.5, 126.5])
    k[0, 2, :3] = torch.tensor([1e-40, -1e-40, 0.0])  # subnormal amax: 127 / amax overflows to inf
    k[0, 3, D - 1] = float("inf")
    k[0, 4, D - 2] = float("nan")
    v = torch.randn(1, 5, D)
    v[0, 1, D - 1] = -300.0  # the max in the tail lanes
    c = caches((1, 4, 5, D), torch.int8)
    got = run_cpu(k, v, c, torch.tensor([2]))
    assert got[0][0, 2, 0, :6].tolist() == [127, 2, 4, 0, -2, 126]
    assert got[2][0, 2, 1].item() == 0.0 and got[0][0, 2, 1].abs().sum() == 0
    assert got[0][0, 2, 2, :3].tolist() == [127, -127, 0]
    assert got[0][0, 2, 3:].abs().sum() == 0 and got[2][0, 2, 3].item() == float("inf") and got[2][0, 2, 4].isnan()
    assert got[1][0, 2, 1, D - 1] == -127 and got[3][0, 2, 1].item() == np.float32(300.0) / np.float32(127.0)
    assert_same(got, naive_append(k, v, c, torch.tensor([2])))


def test_all_padding_writes_nothing():
    k, v, c, slots, _ = paged([3, 5], 2, 32, 4, torch.float32, torch.float32, seed=3)
    assert_same(run_cpu(k, v, c, torch.full_like(slots, -1)), c)


def test_non_contiguous_q_head_dim_falls_back():
    k, v, c, slots, pos = paged([3], 2, 32, 4, torch.float32, torch.float32, seed=4)
    q = torch.randn(k.shape[0], 2, 64)[:, :, ::2]
    with strict(), pytest.raises(RuntimeError, match="strict mode forbids"):
        llmkern.ops.kv_cache_append(k, v, c[0], c[1], slots, q=q, positions=pos, cos_sin_cache=rotary_cos_sin(8, 32),
                                    backend="cpu")
