"""decode_attention on the "cpu" backend for small heads (SmolLM2-135M: Hq 9, Hk 3, D 64), every ISA this CPU
supports, 1 and 2 threads, against the naive float64 definition.

These shapes take the AVX-512 paths added for them (decode_attention_avx512.h): scores of 3 query rows per
pass (qk3x8, whenever the rows per KV head are a multiple of 3: GQA 3, GQA 6, or GQA 1 with 3 new tokens),
P.V with the accumulators in registers (pv_regs, 3 rows of D 64), the prefetch stream sliced between them,
the serial path for a single unit of work (no OpenMP region) and split-KV with ~2 units per thread. The
AVX2 and portable copies run the same cases through their generic code.
"""
import pytest
import torch

import llmkern._C as C  # not importorskip: the compiled module is part of the build
from _attention_helpers import TOL, CacheLayout, assert_rel, make_kv, place_kv, randn
from _cpu_helpers import isa, threads  # noqa: F401 - fixtures
from test_decode_attention_cpu import naive, problem, run_cpu

LENS = [1, 17, 100, 257, 1000]


def _with_threads(n, fn):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("bs", [None, 1, 7, 16, 64], ids=lambda b: "contig" if b is None else f"bs{b}")
@pytest.mark.parametrize("L", LENS)
def test_smollm2_one_sequence(L, bs, isa, threads):
    """B = 1 (the runtime's decode call): short lengths run as one unit without a parallel region, long
    ones split across the threads."""
    q, args, kv = problem([L], 1, 9, 3, 64, bs, seed=L)
    assert_rel(run_cpu(q, *args), naive(q, kv), TOL[torch.float32], f"L{L}")


@pytest.mark.parametrize("bs", [None, 16, 7], ids=lambda b: "contig" if b is None else f"bs{b}")
def test_smollm2_batch_with_empty_sequences(bs, isa, threads):
    """Odd lengths side by side, zero-length sequences among them (their rows are exactly 0)."""
    lens = [1000, 0, 17, 1, 257, 0, 100]
    q, args, kv = problem(lens, 1, 9, 3, 64, bs, seed=11)
    out = run_cpu(q, *args)
    for b in (1, 5):
        assert torch.equal(out[b], torch.zeros_like(out[b]))
    assert_rel(out, naive(q, kv), TOL[torch.float32])


# (lens, Sq, Hq, Hk, D): rows per KV head 3 (qk3x8 + pv_regs), 6 (two row triples, generic P.V), 3 from GQA 1
# with 3 new tokens (causal mask inside the triple), 3 with D 128 and D 80 (qk3x8 with several / masked chunks).
SHAPES = [
    ([257, 100, 1], 1, 9, 3, 64),
    ([1000, 17], 1, 12, 2, 64),
    ([100, 257], 3, 4, 4, 64),
    ([257, 33], 1, 6, 2, 128),
    ([100, 17], 1, 3, 1, 80),
]


def _sid(s):
    lens, Sq, Hq, Hk, D = s
    return f"L{'-'.join(map(str, lens))}_Sq{Sq}_{Hq}x{Hk}_D{D}"


@pytest.mark.parametrize("bs", [None, 16], ids=lambda b: "contig" if b is None else f"bs{b}")
@pytest.mark.parametrize("shape", SHAPES, ids=_sid)
def test_row_triples_fp32(shape, bs, isa, threads):
    q, args, kv = problem(*shape, bs, seed=21)
    for kw in ({}, dict(window_left=40), dict(softcap=3.0, scale=0.3)):
        assert_rel(run_cpu(q, *args, **kw), naive(q, kv, **kw), TOL[torch.float32], f"{kw}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bs", [None, 16, 7], ids=lambda b: "contig" if b is None else f"bs{b}")
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[2]], ids=_sid)
def test_row_triples_half(shape, bs, dtype, isa, threads):
    """bf16/f16 caches: qk3x8 converts each key chunk once for the 3 rows."""
    q, args, kv = problem(*shape, bs, dtype=dtype, seed=22)
    assert_rel(run_cpu(q, *args), naive(q, kv), TOL[dtype])
    assert_rel(run_cpu(q, *args, window_left=20), naive(q, kv, window_left=20), TOL[dtype])


@pytest.mark.parametrize("qdtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bs", [None, 16, 1], ids=lambda b: "contig" if b is None else f"bs{b}")
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[3]], ids=_sid)
def test_row_triples_int8(shape, bs, qdtype, isa, threads):
    """int8 caches: the key scale multiplies each of the 3 rows' scores, the value scale the weights."""
    q, args, kv = problem(*shape, bs, int8=True, seed=23)
    q = q.to(qdtype)
    assert_rel(run_cpu(q, *args), naive(q, kv), TOL[qdtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_smollm2_split_equals_unsplit_and_paged_equals_contiguous(dtype, isa):
    """2 threads vs 1: equal within tolerance; block size 16 vs contiguous: the same bits. B = 4 >= 2 * 2
    threads runs one unit per sequence either way (no split, see decode_max_splits): the split-KV merge is
    test_smollm2_split_kv_across_thread_counts' subject."""
    lens = [1000, 3, 517, 0]
    kv = make_kv(lens, 3, 64, dtype=dtype, seed=24)
    q = randn(len(lens), 9, 64).to(dtype)
    outs = {}
    for bs in (None, 16):
        layout = CacheLayout(lens, block_size=bs, seed=24)
        kc, vc, _, _ = place_kv(kv, layout)
        sl = torch.tensor(lens, dtype=torch.int32)
        for th in (1, 2):
            outs[bs, th] = _with_threads(th, lambda: run_cpu(q, kc, vc, sl, layout.block_table))
    ref = naive(q, kv)
    for o in outs.values():
        assert_rel(o, ref, TOL[dtype])
    assert_rel(outs[None, 2].double(), outs[None, 1].double(), TOL[dtype], "split vs unsplit")
    assert torch.equal(outs[None, 1], outs[16, 1]) and torch.equal(outs[None, 2], outs[16, 2])


def _max_splits(B, L, threads):
    """Splits per sequence that the kernel sizes its workspace for (decode_max_splits), read back from
    decode_attention_workspace_size: one (m, l, acc) state per (sequence, split) plus per-thread scratch that
    does not depend on the capacity, and a capacity of 128 keys (kDecodeMinSplit) allows no split."""
    ws = lambda b, cap: C.decode_attention_workspace_size(b, 1, 9, 3, 64, cap, threads)  # noqa: E731
    unit = ws(2, 128) - ws(1, 128)  # bytes of one state
    return 1 + (ws(B, L) - ws(B, 128)) // (B * unit)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lens", [[1000], [1000, 300, 5]], ids=lambda ls: "L" + "-".join(map(str, ls)))
def test_smollm2_split_kv_across_thread_counts(lens, dtype, isa):
    """Split-KV really splitting: decode_max_splits (decode_attention.h) gives one split per sequence when
    B >= 2 * threads, else ~1-2 units per thread, never a split under 128 keys. B = 1: 2 splits with 2 threads,
    4 with 4 (the merge of more than 2 partial states); B = 3: 2 and 3 splits of the 1000-key sequence (the
    300-key one too, the 5-key one stays whole beside them). Each thread count agrees with 1 thread (no split)
    within tolerance and with the naive; block size 7 vs contiguous: the same bits."""
    B = len(lens)
    want = {1: {1: 1, 2: 2, 4: 4}, 3: {1: 1, 2: 2, 4: 3}}[B]
    assert {th: _max_splits(B, max(lens) + 3, th) for th in (1, 2, 4)} == want
    kv = make_kv(lens, 3, 64, dtype=dtype, seed=25)
    q = randn(B, 9, 64).to(dtype)
    sl = torch.tensor(lens, dtype=torch.int32)
    outs = {}
    for bs in (None, 7):
        layout = CacheLayout(lens, block_size=bs, seed=25)
        kc, vc, _, _ = place_kv(kv, layout)
        for th in (1, 2, 4):
            outs[bs, th] = _with_threads(th, lambda: run_cpu(q, kc, vc, sl, layout.block_table))
    ref = naive(q, kv)
    for (bs, th), o in outs.items():
        assert_rel(o, ref, TOL[dtype], f"bs {bs} threads {th}")
    for th in (2, 4):
        assert_rel(outs[None, th].double(), outs[None, 1].double(), TOL[dtype], f"{want[th]} splits vs unsplit")
        assert torch.equal(outs[None, th], outs[7, th])
