"""llmkern.ops.attention, "cuda" backend (tensor-core flash kernel of llmkern._C_cuda), on the GPU only.

Every call runs in strict mode (no silent fallback) with NaN-poisoned fresh outputs, checks that the
cuda backend really ran, and compares with the reference on the same (rounded) inputs:
out ||err|| / ||ref|| <= 1e-2 (DESIGN.md, fp16/bf16), lse -inf exactly on rows without keys, elsewhere
within 2e-5 relative (fp32 softmax; tensor-core fp32 accumulation of exact products).
"""
import math

import pytest
import torch

import llmkern
from llmkern import reference
from llmkern.ops import strict

from _attention_helpers import TOL, assert_lse, assert_rel, poisoned_outputs

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or "cuda" not in llmkern.ops.OPS["attention"].backends_here(),
    reason="needs a CUDA GPU and llmkern._C_cuda")

LSE_TOL = 2e-5
DTYPES = [torch.bfloat16, torch.float16]
DEV = "cuda"

MASKS = {
    "full": {},
    "causal": dict(causal=True),
    "window_left": dict(window_left=37),
    "window_both": dict(window_left=70, window_right=9),
    "causal_window_left": dict(causal=True, window_left=100),
    "window_right_only": dict(window_right=0),  # causal-like band through window_right
    "softcap_causal": dict(causal=True, softcap=2.0, scale=0.5),
    "softcap": dict(softcap=30.0),
}

# (B, Sq, Sk, Hq, Hk, D): odd lengths 1, 17, 100, 257, 1000; GQA groups 1, 4, 8; Sq <, =, > Sk.
CASES = [
    (1, 1, 1, 4, 4, 64),
    (2, 17, 17, 8, 2, 64),     # GQA 4
    (1, 100, 257, 8, 1, 128),  # MQA (group 8), Sq < Sk
    (2, 257, 100, 4, 4, 128),  # Sq > Sk: causal rows near the top see no key
    (1, 1000, 1000, 8, 1, 64),
    (3, 1, 257, 8, 2, 128),    # decode-shaped: one query row
    (1, 130, 1000, 2, 2, 64),  # query tiles of 128 rows: one full, one of 2 rows
]


def _rand(*shape, dtype, gen):
    return torch.randn(*shape, generator=gen, device=DEV, dtype=torch.float32).to(dtype)


def _qkv(B, Sq, Sk, Hq, Hk, D, dtype, seed=0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    return _rand(B, Sq, Hq, D, dtype=dtype, gen=gen), _rand(B, Sk, Hk, D, dtype=dtype, gen=gen), \
        _rand(B, Sk, Hk, D, dtype=dtype, gen=gen)


def _ref(q, k, v, **kw):
    return reference.attention(q, k, v, kw.get("cu_seqlens_q"), kw.get("cu_seqlens_k"), kw.get("scale"),
                               kw.get("causal", False), kw.get("window_left", -1), kw.get("window_right", -1),
                               kw.get("softcap", 0.0))


def _run(q, k, v, **kw):
    with strict(), poisoned_outputs():
        out, lse = llmkern.ops.attention(q, k, v, return_lse=True, backend="cuda", **kw)
    assert llmkern.ops.OPS["attention"].last_backend == "cuda"
    return out, lse


def _check(q, k, v, **kw):
    out, lse = _run(q, k, v, **kw)
    rout, rlse = _ref(q, k, v, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == rlse.shape
    assert_rel(out, rout, TOL[q.dtype])
    assert_lse(lse, rlse, LSE_TOL)
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_matches_reference(case, mask, dtype):
    q, k, v = _qkv(*case, dtype=dtype, seed=1)
    _check(q, k, v, **MASKS[mask])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", ["full", "causal", "causal_window_left"])
@pytest.mark.parametrize("D", [64, 128])
def test_long_sequences(D, mask, dtype):
    q, k, v = _qkv(1, 4096, 4096, 8, 2, D, dtype=dtype, seed=2)
    kw = dict(MASKS[mask])
    if "window_left" in kw:
        kw["window_left"] = 1000
    _check(q, k, v, **kw)


def test_causal_rows_without_keys():
    """Sq > Sk, bottom-right: query i sees keys j <= i - 3; rows 0..2 get out 0 and lse -inf."""
    q, k, v = _qkv(1, 5, 2, 2, 1, 64, dtype=torch.bfloat16, seed=3)
    out, lse = _run(q, k, v, causal=True)
    assert torch.equal(out[0, :3], torch.zeros_like(out[0, :3]))
    assert torch.isneginf(lse[0, :, :3]).all() and torch.isfinite(lse[0, :, 3:]).all()
    _check(q, k, v, causal=True)


def test_window_sees_no_key_and_empty_keys():
    # Sq > Sk with a window that ends before key 0 for the first rows, and a batch with no keys at all.
    q, k, v = _qkv(2, 70, 3, 4, 2, 128, dtype=torch.float16, seed=4)
    _check(q, k, v, window_left=2, window_right=-1, causal=True)
    q, k, v = _qkv(2, 9, 0, 4, 2, 64, dtype=torch.bfloat16, seed=4)
    out, lse = _run(q, k, v)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


# Packed varlen: zero-length sequences, one-token sequences, Sq > Sk, a sequence with no keys, long ones.
SEQS_Q = [5, 0, 1, 17, 3, 0, 1, 300, 129, 1]
SEQS_K = [5, 0, 1, 20, 0, 4, 3, 300, 1000, 64]


def _packed(Hq, Hk, D, dtype, seqs_q=SEQS_Q, seqs_k=SEQS_K, extra_rows=0, seed=5):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    cu_q = torch.tensor([0] + seqs_q, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEV)
    cu_k = torch.tensor([0] + seqs_k, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEV)
    q = _rand(sum(seqs_q) + extra_rows, Hq, D, dtype=dtype, gen=gen)
    k, v = _rand(sum(seqs_k), Hk, D, dtype=dtype, gen=gen), _rand(sum(seqs_k), Hk, D, dtype=dtype, gen=gen)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", ["full", "causal", "window_both", "causal_window_left", "softcap_causal"])
@pytest.mark.parametrize("D", [64, 128])
def test_packed_varlen(D, mask, dtype):
    q, k, v, cu_q, cu_k = _packed(8, 2, D, dtype, extra_rows=3)  # 3 trailing rows outside every sequence
    out, lse = _check(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **MASKS[mask])
    end = int(cu_q[-1])
    assert torch.equal(out[end:], torch.zeros_like(out[end:])) and torch.isneginf(lse[:, end:]).all()


def test_packed_equals_batched():
    B, Sq, Sk, Hq, Hk, D = 3, 70, 133, 4, 1, 128
    q, k, v = _qkv(B, Sq, Sk, Hq, Hk, D, dtype=torch.bfloat16, seed=6)
    cu_q = torch.arange(0, (B + 1) * Sq, Sq, dtype=torch.int32, device=DEV)
    cu_k = torch.arange(0, (B + 1) * Sk, Sk, dtype=torch.int32, device=DEV)
    out, lse = _run(q, k, v, causal=True, window_left=6)
    pout, plse = _run(q.reshape(B * Sq, Hq, D), k.reshape(B * Sk, Hk, D), v.reshape(B * Sk, Hk, D),
                      cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True, window_left=6)
    # Same kernel, same tiles per sequence: bit-identical.
    assert torch.equal(pout.reshape(B, Sq, Hq, D), out)
    assert torch.equal(plse.reshape(Hq, B, Sq).transpose(0, 1), lse)


@pytest.mark.parametrize("layout", ["sliced", "transposed", "qkv_packed"])
@pytest.mark.parametrize("D", [64, 128])
def test_non_contiguous_views(layout, D):
    gen = torch.Generator(device=DEV).manual_seed(7)
    B, Sq, Sk, Hq, Hk = 2, 257, 257, 8, 2
    dt = torch.bfloat16
    if layout == "sliced":  # every other batch entry, first half of a doubled head dim
        q = _rand(2 * B, Sq, Hq, 2 * D, dtype=dt, gen=gen)[::2, ..., :D]
        k = _rand(2 * B, Sk, Hk, 2 * D, dtype=dt, gen=gen)[::2, ..., :D]
        v = _rand(2 * B, Sk, Hk, 2 * D, dtype=dt, gen=gen)[::2, ..., :D]
    elif layout == "transposed":  # [B, H, S, D] memory seen as [B, S, H, D]
        q = _rand(B, Hq, Sq, D, dtype=dt, gen=gen).transpose(1, 2)
        k = _rand(B, Hk, Sk, D, dtype=dt, gen=gen).transpose(1, 2)
        v = _rand(B, Hk, Sk, D, dtype=dt, gen=gen).transpose(1, 2)
    else:  # one fused qkv projection output [B, S, Hq + 2 Hk, D], split by heads
        qkv = _rand(B, Sq, Hq + 2 * Hk, D, dtype=dt, gen=gen)
        q, k, v = qkv[:, :, :Hq], qkv[:, :, Hq:Hq + Hk], qkv[:, :, Hq + Hk:]
    assert not q.is_contiguous() and not k.is_contiguous()
    _check(q, k, v, causal=True)
    _check(q, k, v, window_left=50, window_right=20)


def test_gqa_equals_repeated_kv_heads():
    q, k, v = _qkv(1, 100, 100, 8, 2, 128, dtype=torch.float16, seed=8)
    out, lse = _run(q, k, v, causal=True)
    mha, mlse = _run(q, k.repeat_interleave(4, dim=2), v.repeat_interleave(4, dim=2), causal=True)
    assert torch.equal(out, mha) and torch.equal(lse, mlse)


def test_lse_merges_two_key_halves():
    q, k, v = _qkv(2, 17, 300, 4, 2, 64, dtype=torch.bfloat16, seed=9)
    o1, l1 = _run(q, k[:, :137], v[:, :137])
    o2, l2 = _run(q, k[:, 137:], v[:, 137:])
    whole, lwhole = _run(q, k, v)
    lse = torch.logaddexp(l1, l2)
    w1 = torch.exp(l1 - lse).transpose(1, 2)[..., None]
    w2 = torch.exp(l2 - lse).transpose(1, 2)[..., None]
    assert_rel((w1 * o1.float() + w2 * o2.float()), whole.float(), TOL[torch.bfloat16])
    assert_lse(lse, lwhole, LSE_TOL)


def test_huge_window_values_mean_unbounded():
    # The largest window the op takes (2^31 - 1: the kernels add it to int32 positions) sees every key; a
    # larger one is refused (it overflowed those sums).
    q, k, v = _qkv(1, 100, 100, 2, 2, 64, dtype=torch.bfloat16, seed=10)
    out, lse = _run(q, k, v, window_left=2**31 - 1, window_right=2**31 - 1)
    ref, rlse = _run(q, k, v)
    assert torch.equal(out, ref) and torch.equal(lse, rlse)
    with pytest.raises(ValueError, match="window_left/right"):
        _run(q, k, v, window_left=2**40, window_right=2**40)


def test_nan_input_gives_nan_rows_not_silent_values():
    q, k, v = _qkv(1, 64, 64, 2, 2, 64, dtype=torch.bfloat16, seed=11)
    k[0, 5, 0, 3] = math.nan
    out, _ = _run(q, k, v, causal=True)
    # Head 0's rows that see key 5 are NaN; its rows before it and the other kv head's rows are finite.
    assert torch.isnan(out[0, 5:, 0]).all() and torch.isfinite(out[0, :5]).all() and torch.isfinite(out[0, :, 1]).all()


@pytest.mark.parametrize("packed", [False, True])
def test_cuda_graph_capture(packed):
    dt = torch.bfloat16
    if packed:
        q, k, v, cu_q, cu_k = _packed(8, 2, 128, dt)
        kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True)
    else:
        q, k, v = _qkv(2, 333, 333, 8, 2, 128, dtype=dt, seed=12)
        kw = dict(causal=True, window_left=100)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), strict():
        llmkern.ops.attention(q, k, v, backend="cuda", **kw)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with strict(), torch.cuda.graph(graph):
        out, lse = llmkern.ops.attention(q, k, v, return_lse=True, backend="cuda", **kw)
    assert llmkern.ops.OPS["attention"].last_backend == "cuda"
    gen = torch.Generator(device=DEV).manual_seed(13)
    for t in (q, k, v):  # new inputs in the captured buffers
        t.copy_(torch.randn(t.shape, generator=gen, device=DEV).to(dt))
    out.fill_(math.nan)
    lse.fill_(math.nan)
    graph.replay()
    torch.cuda.synchronize()
    rout, rlse = _ref(q, k, v, **kw)
    assert_rel(out, rout, TOL[dt])
    assert_lse(lse, rlse, LSE_TOL)


@pytest.mark.parametrize("what", ["fp32", "head_dim_80", "head_dim_256", "strided_head_dim", "odd_token_stride"])
def test_unsupported_inputs_fall_back_and_strict_refuses(what):
    """Inputs the kernel does not take raise BackendUnsupported: strict mode refuses, default mode
    falls back to another backend with a correct result."""
    dt = torch.bfloat16
    if what == "fp32":
        q, k, v = _qkv(1, 17, 17, 2, 2, 64, dtype=torch.float32)
    elif what.startswith("head_dim"):
        q, k, v = _qkv(1, 17, 17, 2, 2, int(what.rsplit("_", 1)[1]), dtype=dt)
    elif what == "strided_head_dim":
        q, k, v = (t[..., ::2] for t in _qkv(1, 17, 17, 2, 2, 128, dtype=dt))
    else:  # token stride 132 elements: rows not 16-byte aligned
        big = [_rand(1, 17, 2, 66, dtype=dt, gen=torch.Generator(device=DEV).manual_seed(i)) for i in range(3)]
        q, k, v = (t.reshape(1, 17, 132)[..., :128].unflatten(-1, (2, 64)) for t in big)
        assert q.stride(1) == 132 and q.stride(-1) == 1
    with strict(), pytest.raises(RuntimeError, match="strict mode forbids"):
        llmkern.ops.attention(q, k, v, backend="cuda")
    out = llmkern.ops.attention(q, k, v, causal=True)
    assert llmkern.ops.OPS["attention"].last_backend != "cuda"
    assert_rel(out, _ref(q, k, v, causal=True)[0], TOL[q.dtype])


@pytest.mark.parametrize("mask", ["full", "causal", "window_both", "softcap_causal"])
@pytest.mark.parametrize("case", [(2, 257, 100, 4, 4, 128), (1, 1000, 1000, 8, 1, 128), (1, 1, 257, 8, 2, 128)],
                         ids=lambda c: "x".join(map(str, c)))
def test_wide_tiles_variant(monkeypatch, case, mask):
    """LLMKERN_CUDA_ATTN_WIDE (read at import): D=128 with 128-row query tiles (8 warps), for tuning."""
    import importlib

    monkeypatch.setattr(importlib.import_module("llmkern.ops.attention"), "_CUDA_WIDE", True)
    q, k, v = _qkv(*case, dtype=torch.bfloat16, seed=14)
    _check(q, k, v, **MASKS[mask])
    q, k, v, cu_q, cu_k = _packed(8, 2, 128, torch.float16)
    _check(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **MASKS[mask])


@pytest.mark.parametrize("kw", [dict(causal=True, window_left=0), dict(window_left=0, window_right=0),
                                dict(window_left=3, window_right=200), dict(causal=True, window_left=63),
                                dict(causal=True, window_left=64), dict(window_left=500, window_right=-1)],
                         ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (1, 200), (64, 64), (65, 64), (200, 1), (300, 129), (129, 300)],
                         ids=lambda s: f"Sq{s[0]}-Sk{s[1]}")
def test_band_edges(shape, kw):
    """Band edges at tile boundaries (64/128-row query tiles, 64-key tiles), Sq > Sk and Sq = 1."""
    Sq, Sk = shape
    for D in (64, 128):
        q, k, v = _qkv(1, Sq, Sk, 2, 1, D, dtype=torch.bfloat16, seed=15)
        _check(q, k, v, **kw)


# ---------------------------------------------------------------- the sm_90a kernel (TMA + wgmma)

def _is_sm90():
    return torch.cuda.get_device_capability() == (9, 0)


@pytest.fixture(params=[False, True], ids=["serial", "overlap"])
def sm90(request, monkeypatch):
    """LLMKERN_CUDA_ATTN_WGMMA (read at import) for one test, with and without LLMKERN_CUDA_ATTN_OVERLAP (the
    intra-warpgroup-overlap variant); skipped off compute capability 9.0, where the launcher runs the
    sm_80 kernel instead. Yields a check that the sm_90a kernel ran."""
    import importlib

    if not _is_sm90():
        pytest.skip("the sm_90a attention kernel needs a compute-capability-9.0 GPU (H100/H200)")
    mod = importlib.import_module("llmkern.ops.attention")
    monkeypatch.setattr(mod, "_CUDA_WGMMA", True)
    monkeypatch.setattr(mod, "_CUDA_OVERLAP", request.param)

    def ran():
        assert mod._last_cuda_kernel == "sm90", "the launcher fell back to the sm_80 kernel"
    return ran


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_sm90_matches_reference(sm90, case, mask, dtype):
    q, k, v = _qkv(*case, dtype=dtype, seed=21)
    _check(q, k, v, **MASKS[mask])
    sm90()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", ["full", "causal", "window_both", "causal_window_left", "softcap_causal"])
@pytest.mark.parametrize("D", [64, 128])
def test_sm90_packed_varlen(sm90, D, mask, dtype):
    q, k, v, cu_q, cu_k = _packed(8, 2, D, dtype, extra_rows=3)
    _check(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **MASKS[mask])
    sm90()


def test_sm90_packed_neighbour_inf_does_not_leak(sm90):
    """Key tiles run past a packed sequence's end into the next sequence: those V rows are zeroed before
    P V (P = 0 there, but 0 * inf = NaN), and their scores masked by select."""
    q, k, v, cu_q, cu_k = _packed(4, 2, 128, torch.bfloat16, seqs_q=[3, 50], seqs_k=[7, 300])
    v[7:20] = float("inf")
    k[7:20] = float("nan")
    out, _ = _run(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    sm90()
    assert torch.isfinite(out[:3]).all()
    assert_rel(out[:3], _ref(q[None, :3], k[None, :7], v[None, :7])[0][0], TOL[q.dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", ["full", "causal", "causal_window_left"])
@pytest.mark.parametrize("D", [64, 128])
def test_sm90_long_sequences(sm90, D, mask, dtype):
    q, k, v = _qkv(1, 4096, 4096, 8, 2, D, dtype=dtype, seed=22)
    kw = dict(MASKS[mask])
    if "window_left" in kw:
        kw["window_left"] = 1000
    _check(q, k, v, **kw)
    sm90()


@pytest.mark.parametrize("layout", ["bshd_slice", "bhsd_transposed"])
def test_sm90_non_contiguous_views(sm90, layout):
    """Strided q/k/v (a slice of a fused qkv, a [B, H, S, D] tensor viewed as [B, S, H, D]): the tensor maps
    take any 16-byte-multiple strides."""
    gen = torch.Generator(device=DEV).manual_seed(23)
    B, S, H, D = 2, 300, 4, 128
    if layout == "bshd_slice":
        qkv = _rand(B, S, 3 * H, D, dtype=torch.float16, gen=gen)
        q, k, v = qkv[:, :, :H], qkv[:, :, H:2 * H], qkv[:, :, 2 * H:]
    else:
        q, k, v = (_rand(B, H, S, D, dtype=torch.float16, gen=gen).transpose(1, 2) for _ in range(3))
    _check(q, k, v, causal=True)
    sm90()


@pytest.mark.parametrize("kw", [dict(causal=True, window_left=0), dict(window_left=3, window_right=200),
                                dict(causal=True, window_left=127), dict(causal=True, window_left=128)], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (128, 128), (129, 128), (300, 129), (129, 300), (1, 1000)],
                         ids=lambda s: f"Sq{s[0]}-Sk{s[1]}")
def test_sm90_band_edges(sm90, shape, kw):
    """Band edges at the 128-row / 128-key tile boundaries of the sm_90a kernel."""
    Sq, Sk = shape
    for D in (64, 128):
        q, k, v = _qkv(1, Sq, Sk, 2, 1, D, dtype=torch.bfloat16, seed=24)
        _check(q, k, v, **kw)
        sm90()


@pytest.mark.parametrize("packed", [False, True])
def test_sm90_cuda_graph_capture(sm90, packed):
    """The tensor maps are kernel parameters: a captured graph replays with the captured pointers."""
    if packed:
        q, k, v, cu_q, cu_k = _packed(8, 2, 128, torch.bfloat16)
        kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True)
    else:
        q, k, v = _qkv(2, 257, 300, 8, 2, 128, dtype=torch.bfloat16, seed=25)
        kw = dict(causal=True)
    want = llmkern.ops.attention(q, k, v, backend="cuda", **kw)
    sm90()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        llmkern.ops.attention(q, k, v, backend="cuda", **kw)  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        got = llmkern.ops.attention(q, k, v, backend="cuda", **kw)
    q.normal_()
    g.replay()
    torch.cuda.synchronize()
    assert_rel(got, _ref(q, k, v, **kw)[0], TOL[q.dtype])
    assert not torch.equal(got, want)
