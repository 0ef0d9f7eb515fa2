"""decode_attention on the "cpu" backend (llmkern._C), every ISA this CPU supports, against the naive
float64 definition of _attention_helpers (written from the op docstring, not from the kernel).

Caches are NaN-poisoned past each sequence's length and in spare blocks (int8: values 99, NaN scales),
outputs are NaN-poisoned (torch.empty returns NaN inside poisoned_outputs), so reading a wrong slot or
forgetting an output row fails. Thread counts 1 and 2 exercise split-KV (several units per sequence and
the exact merge) and the unsplit path.
"""
import pytest
import torch

import llmkern
import llmkern._C as C  # not importorskip: the compiled module is part of the build
from llmkern.ops import OPS, strict

from _attention_helpers import (TOL, CacheLayout, assert_rel, make_kv, naive_attention, place_kv,
                                poisoned_outputs, randn)
from _cpu_helpers import ISAS, isa, threads  # noqa: F401 - fixtures


def run_cpu(q, kc, vc, seq_lens, bt=None, ks=None, vs=None, **kw):
    with strict(), poisoned_outputs():
        out = llmkern.ops.decode_attention(q, kc, vc, seq_lens, block_table=bt, k_scale=ks, v_scale=vs,
                                           backend="cpu", **kw)
    assert OPS["decode_attention"].last_backend == "cpu"
    assert out.is_contiguous() and out.dtype == q.dtype and out.shape == q.shape
    return out


def naive(q, kv, **kw):
    """q [B, Hq, D] or [B, Sq, Hq, D]; each sequence's Sq queries are its last Sq positions (causal)."""
    q4 = q if q.dim() == 4 else q[:, None]
    out = torch.zeros(q4.shape, dtype=torch.float64)
    for b, (k64, v64) in enumerate(zip(kv["k64"], kv["v64"])):
        if k64.shape[0]:
            out[b] = naive_attention(q4[b], k64, v64, causal=True, **kw)[0]
    return out.reshape(q.shape)


def problem(lens, Sq, Hq, Hk, D, bs, *, dtype=torch.float32, int8=False, seed=0):
    kv = make_kv(lens, Hk, D, dtype=dtype, int8=int8, seed=seed)
    layout = CacheLayout(lens, block_size=bs, seed=seed)
    kc, vc, ks, vs = place_kv(kv, layout)
    gen = torch.Generator().manual_seed(seed + 100)
    shape = (len(lens), Hq, D) if Sq == 1 else (len(lens), Sq, Hq, D)
    q = torch.randn(*shape, generator=gen).to(dtype)
    return q, (kc, vc, torch.tensor(lens, dtype=torch.int32), layout.block_table, ks, vs), kv


# (lens, Sq, Hq, Hk, D, block_size): odd lengths 1/17/100/257 and a long one (split-KV with 2 threads),
# GQA 1/3/4/8, head dims 64/128/80, contiguous and block sizes 1/16/7.
CASES = [
    ([1, 17, 100], 1, 4, 4, 64, None),
    ([257, 0, 3], 1, 9, 3, 64, 16),
    ([100, 1], 1, 8, 2, 128, 1),
    ([17, 257], 1, 8, 1, 80, 7),
    ([1000], 1, 8, 1, 64, None),
    ([33, 100], 3, 8, 2, 64, 16),
    ([257, 5], 4, 12, 3, 128, None),
]
OPTS = [{}, dict(window_left=8), dict(softcap=2.0, scale=0.5), dict(window_left=300, softcap=5.0)]


def _id(c):
    lens, Sq, Hq, Hk, D, bs = c
    return f"L{'-'.join(map(str, lens))}_Sq{Sq}_{Hq}x{Hk}_D{D}_{'contig' if bs is None else f'bs{bs}'}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_fp32_matches_naive(case, isa, threads):
    q, args, kv = problem(*case, seed=1)
    for kw in OPTS:
        assert_rel(run_cpu(q, *args, **kw), naive(q, kv, **kw), TOL[torch.float32], f"out {kw}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=_id)
def test_half_matches_naive(case, dtype, isa):
    q, args, kv = problem(*case, dtype=dtype, seed=2)
    assert_rel(run_cpu(q, *args, window_left=20), naive(q, kv, window_left=20), TOL[dtype])


@pytest.mark.parametrize("qdtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3], CASES[5]], ids=_id)
def test_int8_cache_matches_naive(case, qdtype, isa, threads):
    """The naive reads the dequantized float64 values (q * scale) of the very same int8 cache."""
    q, args, kv = problem(*case, int8=True, seed=3)
    q = q.to(qdtype)
    # softcap: the cap applies to the dequantized score (q . k times the key scale), not to q . k.
    for kw in ({}, dict(window_left=20), dict(softcap=2.0, scale=0.5)):
        assert_rel(run_cpu(q, *args, **kw), naive(q, kv, **kw), TOL[qdtype], f"out {kw}")


# Head dims that are multiples of 8 but not of 16: the kernel pads D to Dp (48, 80, 208) and works in chunks
# of 16, so the last chunk of every q, key and value row is half padding. GQA 3 takes the row-triple score
# path (qk3x8) on AVX-512, GQA 4 the generic one (and, for bf16 / f16 / int8 caches, the keys converted once).
@pytest.mark.parametrize("cache", ["fp32", "bf16", "f16", "int8"])
@pytest.mark.parametrize("heads", [(6, 2), (8, 2)], ids=lambda h: f"{h[0]}x{h[1]}")
@pytest.mark.parametrize("bs", [None, 7], ids=lambda b: "contig" if b is None else f"bs{b}")
@pytest.mark.parametrize("D", [40, 72, 200])
def test_head_dims_not_multiple_of_16(D, bs, heads, cache, isa, threads):
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16}.get(cache, torch.float32)  # int8: fp32 queries
    q, args, kv = problem([257, 17, 1], 1, *heads, D, bs, dtype=dtype, int8=cache == "int8", seed=8)
    for kw in OPTS:
        assert_rel(run_cpu(q, *args, **kw), naive(q, kv, **kw), TOL[dtype], f"out {kw}")


def test_split_equals_unsplit_and_paged_equals_contiguous():
    """One thread (one unit per head) vs two (split-KV merge); block size 16 vs contiguous: same values."""
    lens, Hq, Hk, D = [1000, 3, 517], 8, 2, 64
    kv = make_kv(lens, Hk, D, seed=4)
    q = randn(3, Hq, D)
    outs = []
    for bs in (None, 16):
        layout = CacheLayout(lens, block_size=bs, seed=4)
        kc, vc, _, _ = place_kv(kv, layout)
        for th in (1, 2):
            saved = torch.get_num_threads()
            torch.set_num_threads(th)
            try:
                outs.append(run_cpu(q, kc, vc, torch.tensor(lens, dtype=torch.int32), layout.block_table))
            finally:
                torch.set_num_threads(saved)
    ref = naive(q, kv)
    for o in outs:
        assert_rel(o, ref, TOL[torch.float32])
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])  # the layout changes no bit


def test_non_contiguous_q_and_strided_cache():
    """q transposed in memory; caches that are views with padded rows (strides != contiguous)."""
    lens, Hq, Hk, D = [17, 100], 6, 3, 64
    kv = make_kv(lens, Hk, D, seed=5)
    layout = CacheLayout(lens, seed=5)
    kc, vc, _, _ = place_kv(kv, layout)
    big_k = torch.full((kc.shape[0], kc.shape[1], Hk + 1, D), float("nan"))
    big_k[:, :, :Hk] = kc
    q = randn(2, 3, Hq, D, layout="transposed")  # Sq = 3 new tokens
    out = run_cpu(q, big_k[:, :, :Hk], vc, torch.tensor(lens, dtype=torch.int32))
    assert_rel(out, naive(q, kv), TOL[torch.float32])


def test_zero_length_sequence_gives_zero(isa):
    q, args, kv = problem([0, 5], 1, 4, 2, 64, None, seed=6)
    out = run_cpu(q, *args)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert_rel(out, naive(q, kv), TOL[torch.float32])


def test_unsupported_layout_falls_back():
    """A cache whose head dim is not contiguous is not copied: the op falls back (and strict raises)."""
    q, (kc, vc, sl, bt, ks, vs), _ = problem([5], 1, 4, 2, 64, None, seed=7)
    kt = kc.transpose(2, 3).contiguous().transpose(2, 3)
    with strict(), pytest.raises(RuntimeError, match="strict mode forbids"):
        llmkern.ops.decode_attention(q, kt, vc, sl, backend="cpu")


def test_launcher_rejects_bad_arguments():
    with pytest.raises(ValueError, match="Hq must be a positive multiple of Hk"):
        C.decode_attention_workspace_size(1, 1, 6, 4, 64, 16, 1)
    with pytest.raises(ValueError, match="D must be a multiple of 8"):
        C.decode_attention_workspace_size(1, 1, 4, 4, 36, 16, 1)
    with pytest.raises(ValueError, match="num_threads"):
        C.decode_attention_workspace_size(1, 1, 4, 4, 64, 16, 0)
