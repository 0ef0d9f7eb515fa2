"""llmkern.ops.decode_attention: reference vs naive float64, every backend vs the reference, layout and
batching properties, agreement with prefill attention, int8 caches, opcheck, bad inputs.

Caches are NaN-poisoned past each sequence's length (and in spare blocks), so a kernel that reads a
slot it should not fails the comparison.
"""
import pytest
import torch

import llmkern
from llmkern import reference
from llmkern.ops import strict

from _attention_helpers import (on_device, run_on, TOL, CacheLayout, assert_rel, backends, make_kv, naive_attention, place_kv,
                                poisoned_outputs, randn)

BACKENDS = backends("decode_attention")

# (lens, Sq, Hq, Hk, D, block_size): GQA 1/8/3/4/1, head dims 32..256, block sizes 1..256 and contiguous,
# a zero-length sequence, one-token sequences, Sq > 1.
CASES = [
    ([1, 17, 100], 1, 4, 4, 64, None),
    ([1, 17, 100], 1, 8, 1, 32, 16),
    ([33, 0, 257], 1, 6, 2, 80, 1),
    ([5, 100], 3, 8, 2, 128, 7),
    ([3, 17], 3, 8, 8, 256, 256),
    ([257, 1], 1, 4, 1, 64, None),
]
OPTS = {
    "plain": {},
    "window": dict(window_left=8),
    "softcap": dict(softcap=2.0, scale=0.5),
}


def _case_id(c):
    lens, Sq, Hq, Hk, D, bs = c
    return f"L{'-'.join(map(str, lens))}_Sq{Sq}_H{Hq}x{Hk}_D{D}_{'contig' if bs is None else f'bs{bs}'}"


def _inputs(case, *, dtype=torch.float32, int8=False, seed=0):
    """(q, k_cache, v_cache, seq_lens, block_table, k_scale, v_scale), and make_kv's contents."""
    lens, Sq, Hq, Hk, D, bs = case
    torch.manual_seed(seed)
    kv = make_kv(lens, Hk, D, dtype=dtype, int8=int8, seed=seed)
    layout = CacheLayout(lens, block_size=bs, seed=seed)
    kc, vc, ks, vs = place_kv(kv, layout)
    q = randn(len(lens), Hq, D, dtype=dtype) if Sq == 1 else randn(len(lens), Sq, Hq, D, dtype=dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    return (q, kc, vc, seq_lens, layout.block_table, ks, vs), kv


def _ref(args, scale=None, softcap=0.0, window_left=-1):
    return reference.decode_attention(*args, scale, softcap, window_left)


def _run(backend, args, **kw):
    q, kc, vc, seq_lens, bt, ks, vs = args
    if backend == "cuda" and kc.dtype == torch.float32 and q.shape[-1] > 128:
        # Documented: the CUDA kernel's fp32 caches go up to D = 128 (other backends take the rest; strict mode
        # refuses that fallback). tests/ops/test_decode_attention_cuda.py covers its own range.
        pytest.skip("cuda decode kernel: fp32 caches up to head dim 128")
    with strict(), poisoned_outputs():
        out = run_on(backend, llmkern.ops.decode_attention, q, kc, vc, seq_lens, block_table=bt, k_scale=ks, v_scale=vs,
                                           backend=backend, **kw)
    assert llmkern.ops.OPS["decode_attention"].last_backend == backend
    return out


def _naive(q, kv, **kw):
    """Per sequence: its Sq new queries at the end of its L keys, causal, from the source data (not the cache)."""
    q4 = q if q.dim() == 4 else q[:, None]  # [B, Sq, Hq, D]
    out = torch.zeros(q4.shape, dtype=torch.float64)
    for b, (k64, v64) in enumerate(zip(kv["k64"], kv["v64"])):
        if k64.shape[0]:
            out[b] = naive_attention(q4[b], k64, v64, causal=True, **kw)[0]
    return out.reshape(q.shape)


# ---------------------------------------------------------------- (1) reference vs naive float64


@pytest.mark.parametrize("opts", list(OPTS))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_reference_matches_naive_fp32(case, opts):
    args, kv = _inputs(case)
    out = _ref(args, **OPTS[opts])
    assert out.shape == args[0].shape and out.dtype == torch.float32 and out.is_contiguous()
    assert_rel(out, _naive(args[0], kv, **OPTS[opts]), TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=_case_id)
def test_reference_matches_naive_half(case, dtype):
    args, kv = _inputs(case, dtype=dtype)
    out = _ref(args, window_left=8)
    assert out.dtype == dtype
    assert_rel(out, _naive(args[0], kv, window_left=8), TOL[dtype])


@pytest.mark.parametrize("opts", ["plain", "window"])
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3]], ids=_case_id)
def test_reference_int8_cache_matches_naive(case, opts):
    args, kv = _inputs(case, int8=True)
    assert_rel(_ref(args, **OPTS[opts]), _naive(args[0], kv, **OPTS[opts]), TOL[torch.float32])


def test_zero_length_sequence_outputs_zero():
    args, _ = _inputs(CASES[2])
    out = _ref(args)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and out[0].abs().sum() > 0


def test_reference_non_contiguous_q():
    args, kv = _inputs(CASES[3])
    q = randn(*args[0].shape, layout="transposed")
    assert_rel(_ref((q,) + args[1:]), _naive(q, kv), TOL[torch.float32])


# ---------------------------------------------------------------- (2) every backend vs the reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("opts", list(OPTS))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_backend_matches_reference(backend, case, opts, dtype):
    args, _ = _inputs(case, dtype=dtype, seed=1)
    out = _run(backend, args, **OPTS[opts])
    assert out.dtype == dtype and out.shape == args[0].shape
    assert_rel(out, _ref(args, **OPTS[opts]), TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_backend_int8_cache(backend, case, dtype):
    args, _ = _inputs(case, int8=True, seed=2)
    args = (args[0].to(dtype),) + args[1:]
    out = _run(backend, args, window_left=20)
    assert_rel(out, _ref(args, window_left=20), TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_non_contiguous_q(backend):
    args, _ = _inputs(CASES[3], seed=3)
    q = randn(*args[0].shape, layout="transposed")
    assert_rel(_run(backend, (q,) + args[1:]), _ref((q.contiguous(),) + args[1:]), TOL[torch.float32])


# ---------------------------------------------------------------- (3) properties


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("block_size", [1, 5, 16, 256])
def test_paged_equals_contiguous(backend, block_size, int8):
    lens, Hq, Hk, D = [100, 1, 0, 37], 8, 2, 64
    kv = make_kv(lens, Hk, D, int8=int8, seed=4)
    q = randn(len(lens), Hq, D)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    contig = CacheLayout(lens, seed=4)
    paged = CacheLayout(lens, block_size=block_size, seed=4)
    kc, vc, ks, vs = place_kv(kv, contig)
    out_c = _run(backend, (q, kc, vc, seq_lens, None, ks, vs))
    kc, vc, ks, vs = place_kv(kv, paged)
    out_p = _run(backend, (q, kc, vc, seq_lens, paged.block_table, ks, vs))
    assert_rel(out_p, out_c, TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [None, 16])
def test_batched_equals_one_at_a_time(backend, block_size):
    case = ([17, 100, 2, 33], 2, 6, 2, 64, block_size)
    args, _ = _inputs(case, seed=5)
    q, kc, vc, seq_lens, bt, _, _ = args
    out = _run(backend, args, window_left=40)
    for b in range(q.shape[0]):
        # Paged: the whole pool with one row of the block table; contiguous: one row of the cache.
        caches = (kc, vc) if bt is not None else (kc[b:b + 1], vc[b:b + 1])
        one = _run(backend, (q[b:b + 1],) + caches + (seq_lens[b:b + 1], None if bt is None else bt[b:b + 1],
                                                      None, None), window_left=40)
        assert_rel(one[0], out[b], TOL[torch.float32], f"sequence {b}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Sq", [1, 4])
@pytest.mark.parametrize("opts", list(OPTS))
def test_decode_equals_last_rows_of_causal_prefill(backend, Sq, opts):
    """Decoding the last Sq tokens over a cache of L == the last Sq rows of causal attention over L tokens."""
    L, Hq, Hk, D = 33, 8, 2, 64
    q, k, v = randn(1, L, Hq, D), randn(1, L, Hk, D), randn(1, L, Hk, D)
    # The same backend's prefill where it takes these inputs (the cuda prefill kernel is fp16 / bf16 only).
    prefill_backend = backend if backend in backends("attention") and backend != "cuda" else "reference"
    with strict(), poisoned_outputs():
        full = run_on(prefill_backend, llmkern.ops.attention, q, k, v, causal=True, backend=prefill_backend,
                      **OPTS[opts])
    layout = CacheLayout([L], block_size=16)
    kc, vc = layout.place([k[0]], float("nan")), layout.place([v[0]], float("nan"))
    qd = q[:, -Sq:] if Sq > 1 else q[:, -1]
    out = _run(backend, (qd, kc, vc, torch.tensor([L], dtype=torch.int32), layout.block_table, None, None),
               **OPTS[opts])
    assert_rel(out.reshape(1, Sq, Hq, D), full[:, -Sq:], TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_q_rank3_equals_rank4_with_one_token(backend):
    args, _ = _inputs(CASES[1], seed=6)
    out3 = _run(backend, args)
    out4 = _run(backend, (args[0][:, None],) + args[1:])
    assert out4.shape == (3, 1, 8, 32)
    assert_rel(out4[:, 0], out3, TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [None, 16])
def test_int8_cache_error_vs_fp32_is_bounded(backend, block_size):
    """Quantize-on-write (kv_cache_append) into an int8 cache: decode output within 2e-2 of the fp32 cache's."""
    lens, Hq, Hk, D = [100, 17, 1], 8, 2, 128
    torch.manual_seed(7)  # q too: the reported error is then the same whatever ran before
    kv = make_kv(lens, Hk, D, seed=7)
    layout = CacheLayout(lens, block_size=block_size, seed=7)
    q = randn(len(lens), Hq, D)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    kc, vc, _, _ = place_kv(kv, layout)
    out32 = _run(backend, (q, kc, vc, seq_lens, layout.block_table, None, None))
    shape = (layout.rows, layout.row_len, Hk)
    kq, vq = torch.zeros(shape + (D,), dtype=torch.int8), torch.zeros(shape + (D,), dtype=torch.int8)
    ks, vs = torch.zeros(shape), torch.zeros(shape)
    slots = torch.cat(layout.slots)
    llmkern.ops.kv_cache_append(torch.cat(kv["k"]), torch.cat(kv["v"]), kq, vq, slots, k_scale=ks, v_scale=vs,
                                backend="reference")
    out8 = _run(backend, (q, kq, vq, seq_lens, layout.block_table, ks, vs))
    err = ((out8 - out32).norm() / out32.norm()).item()
    # Reported (pytest -s shows it) so that a drift of the int8 error shows before it reaches the bound.
    print(f"int8 cache vs fp32 cache, decode_attention {backend} block_size={block_size}: "
          f"relative error {err:.3g} (bound 2e-2)")
    assert 0 < err <= 2e-2, f"int8 cache vs fp32 cache: relative error {err:.3g}, bound 2e-2"  # > 0: really quantized


# ---------------------------------------------------------------- (4) opcheck


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["contiguous", "paged", "int8_paged", "sq3"])
def test_opcheck(backend, kind):
    case = {"contiguous": ([3, 9], 1, 4, 2, 32, None), "paged": ([3, 9], 1, 4, 2, 32, 4),
            "int8_paged": ([3, 9], 1, 4, 2, 32, 4), "sq3": ([3, 9], 3, 4, 2, 32, 4)}[kind]
    args, _ = _inputs(case, int8=kind.startswith("int8"), seed=8)
    torch.library.opcheck(torch.ops.llmkern.decode_attention.default,
                          *on_device(backend, args, dict(window_left=5, softcap=3.0, backend=backend)))


# ---------------------------------------------------------------- (5) bad inputs


def _good(case=([3, 9], 1, 4, 2, 64, 4), int8=False):
    return list(_inputs(case, int8=int8, seed=9)[0])


def _call(args, **kw):
    q, kc, vc, sl, bt, ks, vs = args
    return llmkern.ops.decode_attention(q, kc, vc, sl, block_table=bt, k_scale=ks, v_scale=vs, **kw)


def test_bad_q_rank():
    a = _good()
    a[0] = a[0][0]
    with pytest.raises(ValueError, match="q must have rank"):
        _call(a)


def test_bad_cache_rank():
    a = _good()
    a[1] = a[1][0]
    with pytest.raises(ValueError, match="k_cache must have rank 4"):
        _call(a)


def test_v_cache_shape_differs():
    a = _good()
    a[2] = a[2][:, :2]
    with pytest.raises(ValueError, match="v_cache must have shape"):
        _call(a)


def test_cache_dtype_differs_from_q():
    a = _good()
    a[1], a[2] = a[1].bfloat16(), a[2].bfloat16()
    with pytest.raises(TypeError, match="k_cache must have q's dtype"):
        _call(a)


def test_cache_head_dim_differs_from_q():
    a = _good()
    a[1], a[2] = a[1][..., :32], a[2][..., :32]
    with pytest.raises(ValueError, match="k_cache head dim must be q's"):
        _call(a)


@pytest.mark.parametrize("D", [36, 300])
def test_unsupported_head_dim(D):
    a = _good(([3, 9], 1, 4, 2, D, 4))
    with pytest.raises(ValueError, match=f"head dim of q.*got {D}"):
        _call(a)


def test_q_heads_not_multiple_of_cache_heads():
    a = _good(([3, 9], 1, 6, 4, 64, 4))
    with pytest.raises(ValueError, match=r"q heads \(6\).*cache heads \(4\)"):
        _call(a)


def test_seq_lens_dtype_and_shape():
    a = _good()
    a[3] = a[3].long()
    with pytest.raises(TypeError, match="seq_lens must have dtype int32"):
        _call(a)
    a[3] = torch.tensor([3], dtype=torch.int32)
    with pytest.raises(ValueError, match="seq_lens must have shape"):
        _call(a)


def test_seq_lens_over_capacity():
    a = _good()  # block_table [2, 4] of blocks of 4: 16 tokens per sequence
    a[3] = torch.tensor([3, a[4].shape[1] * 4 + 1], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"seq_lens must be in 0\.\.16"):
        _call(a)


def test_contiguous_seq_lens_over_capacity():
    a = _good(([3, 9], 1, 4, 2, 64, None))
    a[3] = torch.tensor([3, a[1].shape[1] + 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="seq_lens must be in"):
        _call(a)


def test_seq_lens_shorter_than_new_tokens():
    a = _good(([3, 9], 3, 4, 2, 64, 4))
    a[3] = torch.tensor([2, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="at least Sq=3"):
        _call(a)


def test_block_table_outside_the_cache():
    a = _good()
    a[4] = a[4].clone()
    a[4][1, 1] = a[1].shape[0]  # one past the last block, and used (sequence 1 has 9 tokens)
    with pytest.raises(ValueError, match="block_table row 1 points outside the cache"):
        _call(a)
    a[4][1, 1] = -1
    with pytest.raises(ValueError, match="block_table row 1"):
        _call(a)


def test_block_table_wrong_batch_and_dtype():
    a = _good()
    bt = a[4]
    a[4] = bt[:1]
    with pytest.raises(ValueError, match="block_table must have shape"):
        _call(a)
    a[4] = bt.long()
    with pytest.raises(TypeError, match="block_table must have dtype int32"):
        _call(a)


def test_contiguous_cache_batch_mismatch():
    a = _good(([3, 9], 1, 4, 2, 64, None))
    a[1], a[2] = a[1][:1], a[2][:1]
    with pytest.raises(ValueError, match=r"contiguous k_cache batch \(1\)"):
        _call(a)


def test_int8_cache_without_scales():
    a = _good(int8=True)
    a[5] = None
    with pytest.raises(ValueError, match="int8 cache needs k_scale"):
        _call(a)


def test_int8_scale_wrong_shape_and_dtype():
    a = _good(int8=True)
    vs = a[6]
    a[6] = vs[:, :2]
    with pytest.raises(ValueError, match="v_scale must have shape"):
        _call(a)
    a[6] = vs.half()
    with pytest.raises(TypeError, match="v_scale must have dtype float32"):
        _call(a)


def test_scales_with_float_cache():
    a = _good()
    a[5] = torch.ones(a[1].shape[:3])
    with pytest.raises(ValueError, match="k_scale/v_scale are only for int8 caches"):
        _call(a)


def test_bad_scale_softcap_window():
    a = _good()
    for bad in (0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="scale must be finite and > 0"):
            _call(a, scale=bad)
    for bad in (-2.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="softcap must be finite and >= 0"):
            _call(a, softcap=bad)
    for bad in (-3, 2 ** 31, 2 ** 63 - 1):
        with pytest.raises(ValueError, match=r"window_left must be -1 \(unbounded\) or in \[0, 2147483647\]"):
            _call(a, window_left=bad)
