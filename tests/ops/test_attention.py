"""llmkern.ops.attention: reference vs a naive float64 definition, every backend vs the reference,
lse/varlen properties, opcheck, and bad inputs."""
import pytest
import torch

import llmkern
from llmkern import reference
from llmkern.ops import strict

from _attention_helpers import (TOL, assert_lse, assert_rel, backends, naive_attention, naive_attention_batched,
                                poisoned_outputs, randn)

BACKENDS = backends("attention")

# (B, Sq, Sk, Hq, Hk, D): GQA ratios 1, 8, 3, 4, 1 with head dims 64, 32, 80, 128, 256, odd lengths.
CASES = [
    (2, 17, 17, 4, 4, 64),
    (1, 1, 100, 8, 1, 32),  # MQA, one query row (decode-shaped)
    (1, 33, 100, 6, 2, 80),  # GQA 3, Sq < Sk
    (2, 17, 3, 8, 2, 128),  # GQA 4, Sq > Sk: causal rows near the top see no key
    (1, 3, 257, 2, 2, 256),
]
MASKS = {
    "full": {},
    "causal": dict(causal=True),
    "causal_window_right_ignored": dict(causal=True, window_right=5),
    "window_left": dict(window_left=5),
    "window_both": dict(window_left=7, window_right=3),
    "causal_window_left": dict(causal=True, window_left=4),
    # scale 0.5 makes scores ~N(0, 16 D/64) so a cap of 2 bends most of them.
    "softcap": dict(causal=True, softcap=2.0, scale=0.5),
}


def _qkv(B, Sq, Sk, Hq, Hk, D, dtype=torch.float32, layout="contiguous"):
    return (randn(B, Sq, Hq, D, dtype=dtype, layout=layout), randn(B, Sk, Hk, D, dtype=dtype, layout=layout),
            randn(B, Sk, Hk, D, dtype=dtype, layout=layout))


def _ref(q, k, v, **kw):
    """The reference backend with the op's defaults filled in: (out, lse)."""
    return reference.attention(q, k, v, kw.get("cu_seqlens_q"), kw.get("cu_seqlens_k"), kw.get("scale"),
                               kw.get("causal", False), kw.get("window_left", -1), kw.get("window_right", -1),
                               kw.get("softcap", 0.0))


def _run(backend, q, k, v, **kw):
    """One backend through the public op, strict (no silent fallback), NaN-filled fresh outputs.

    GPU backends run on CUDA copies of the (CPU) inputs and return CPU results. The cuda kernel takes
    fp16/bf16 with head dims 64 and 128 only (anything else falls back, which strict mode refuses):
    other inputs are skipped for it here (tests/ops/test_attention_cuda.py covers it on the GPU)."""
    if backend == "cuda" and (q.dtype == torch.float32 or q.shape[-1] not in (64, 128)):
        pytest.skip("cuda attention kernel: fp16/bf16 and head dims 64/128 only")
    if backend in ("cuda", "triton"):
        q, k, v = (t.to("cuda") for t in (q, k, v))
        kw = {n: x.to("cuda") if isinstance(x, torch.Tensor) else x for n, x in kw.items()}
    with strict(), poisoned_outputs():
        out, lse = llmkern.ops.attention(q, k, v, return_lse=True, backend=backend, **kw)
    assert llmkern.ops.OPS["attention"].last_backend == backend
    return out.cpu(), lse.cpu()


# ---------------------------------------------------------------- (1) reference vs naive float64


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_reference_matches_naive_fp32(case, mask):
    torch.manual_seed(0)
    q, k, v = _qkv(*case)
    out, lse = _ref(q, k, v, **MASKS[mask])
    nout, nlse = naive_attention_batched(q, k, v, **MASKS[mask])
    assert out.dtype == q.dtype and out.shape == q.shape and lse.shape == (case[0], case[3], case[1])
    assert_rel(out, nout, TOL[torch.float32])
    assert_lse(lse, nlse, TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask", ["causal", "window_both", "softcap"])
def test_reference_matches_naive_half(dtype, mask):
    torch.manual_seed(1)
    q, k, v = _qkv(2, 17, 33, 6, 2, 64, dtype)
    out, lse = _ref(q, k, v, **MASKS[mask])
    nout, nlse = naive_attention_batched(q, k, v, **MASKS[mask])
    assert out.dtype == dtype
    assert_rel(out, nout, TOL[dtype])
    assert_lse(lse, nlse, TOL[torch.float32])  # lse is float32 math on the same (rounded) inputs


def test_causal_rows_without_keys_are_zero_with_lse_minus_inf():
    torch.manual_seed(2)
    q, k, v = _qkv(1, 5, 2, 2, 1, 32)  # bottom-right: query i sees keys j <= i - 3, rows 0..2 see none
    out, lse = _ref(q, k, v, causal=True)
    assert torch.equal(out[0, :3], torch.zeros_like(out[0, :3]))
    assert torch.isneginf(lse[0, :, :3]).all() and torch.isfinite(lse[0, :, 3:]).all()


@pytest.mark.parametrize("layout", ["sliced", "transposed"])
def test_reference_non_contiguous_inputs(layout):
    torch.manual_seed(3)
    q, k, v = _qkv(2, 17, 33, 8, 2, 64, layout=layout)
    out, lse = _ref(q, k, v, causal=True, window_left=9)
    nout, nlse = naive_attention_batched(q, k, v, causal=True, window_left=9)
    assert out.is_contiguous()
    assert_rel(out, nout, TOL[torch.float32])
    assert_lse(lse, nlse, TOL[torch.float32])


@pytest.mark.parametrize("mask", [dict(causal=True, window_left=11), dict(causal=False), dict(window_right=3)],
                         ids=["causal_window", "full", "right_window"])
def test_reference_chunked_rows_and_float32_path(monkeypatch, mask):
    """The reference's two size-driven branches: query rows in chunks, and float32 math for big problems.
    (Without a causal / window term the mask had one broadcast row: the second chunk failed, first seen on a
    GPU at S = 4096.)"""
    import sys

    mod = sys.modules["llmkern.reference.attention"]
    torch.manual_seed(13)
    q, k, v = _qkv(2, 33, 40, 4, 2, 64)
    nout, nlse = naive_attention_batched(q, k, v, **mask)
    monkeypatch.setattr(mod, "_SCORE_CHUNK_ELEMS", 5 * 2 * 4 * 40)  # 5 rows per chunk, the last one short
    out, lse = _ref(q, k, v, **mask)
    assert_rel(out, nout, TOL[torch.float32])
    assert_lse(lse, nlse, TOL[torch.float32])
    monkeypatch.setattr(mod, "_FLOAT64_WORK_LIMIT", 0)
    assert mod.compute_dtype(1) == torch.float32
    out, lse = _ref(q, k, v, **mask)
    assert_rel(out, nout, TOL[torch.float32])
    assert_lse(lse, nlse, TOL[torch.float32])


# Packed varlen: a zero-length sequence, one-token sequences, Sq > Sk and a sequence with no keys.
SEQS_Q = [5, 0, 1, 17, 3, 0, 1]
SEQS_K = [5, 0, 1, 20, 0, 4, 3]


def _packed(Hq, Hk, D, dtype=torch.float32, seqs_q=SEQS_Q, seqs_k=SEQS_K):
    cu_q = torch.tensor([0] + seqs_q, dtype=torch.int32).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + seqs_k, dtype=torch.int32).cumsum(0).to(torch.int32)
    q = randn(sum(seqs_q), Hq, D, dtype=dtype)
    k, v = randn(sum(seqs_k), Hk, D, dtype=dtype), randn(sum(seqs_k), Hk, D, dtype=dtype)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("mask", ["full", "causal", "window_both", "softcap"])
def test_reference_packed_varlen_matches_naive(mask):
    torch.manual_seed(4)
    q, k, v, cu_q, cu_k = _packed(6, 2, 80)
    out, lse = _ref(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **MASKS[mask])
    assert out.shape == q.shape and lse.shape == (6, q.shape[0])
    for b in range(len(SEQS_Q)):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        if q1 == q0:
            continue
        nout, nlse = naive_attention(q[q0:q1], k[k0:k1], v[k0:k1], **MASKS[mask])
        if k1 == k0:  # no keys at all: zeros and -inf
            assert torch.equal(out[q0:q1], torch.zeros_like(out[q0:q1])) and torch.isneginf(lse[:, q0:q1]).all()
            continue
        assert_rel(out[q0:q1], nout, TOL[torch.float32], f"sequence {b}")
        assert_lse(lse[:, q0:q1], nlse, TOL[torch.float32])


def rel_changed(a, b):
    return (a - b).norm() > 1e-3 * b.norm()


def test_softcap_and_scale_change_the_result():
    """Guards the naive comparison above: the options are not silently ignored by both sides."""
    torch.manual_seed(5)
    q, k, v = _qkv(1, 9, 9, 2, 2, 64)
    base, _ = _ref(q, k, v, scale=0.5)
    assert rel_changed(_ref(q, k, v, scale=0.5, softcap=2.0)[0], base)
    assert rel_changed(_ref(q, k, v)[0], base)
    assert rel_changed(_ref(q, k, v, window_left=2)[0], _ref(q, k, v)[0])



# ---------------------------------------------------------------- (2) every backend vs the reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mask", ["full", "causal", "window_both", "causal_window_left", "softcap"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_backend_matches_reference(backend, dtype, mask, case):
    torch.manual_seed(6)
    q, k, v = _qkv(*case, dtype=dtype)
    out, lse = _run(backend, q, k, v, **MASKS[mask])
    rout, rlse = _ref(q, k, v, **MASKS[mask])
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_rel(out, rout, TOL[dtype])
    assert_lse(lse, rlse, TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["sliced", "transposed"])
def test_backend_non_contiguous(backend, layout):
    torch.manual_seed(7)
    q, k, v = _qkv(2, 33, 17, 8, 2, 64, layout=layout)
    out, lse = _run(backend, q, k, v, causal=True)
    rout, rlse = _ref(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)
    assert_rel(out, rout, TOL[torch.float32])
    assert_lse(lse, rlse, TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mask", ["full", "causal", "window_both", "softcap"])
def test_backend_packed_varlen(backend, dtype, mask):
    torch.manual_seed(8)
    q, k, v, cu_q, cu_k = _packed(8, 2, 64, dtype)
    out, lse = _run(backend, q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **MASKS[mask])
    rout, rlse = _ref(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **MASKS[mask])
    assert_rel(out, rout, TOL[dtype])
    assert_lse(lse, rlse, TOL[torch.float32])


# ---------------------------------------------------------------- (3) properties


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_lse_merges_two_key_halves_into_the_whole(backend, softcap):
    """softmax over all keys == lse-weighted merge of the softmaxes over two disjoint key halves."""
    torch.manual_seed(9)
    q, k, v = _qkv(2, 17, 100, 6, 2, 64)
    o1, l1 = _run(backend, q, k[:, :37], v[:, :37], softcap=softcap)
    o2, l2 = _run(backend, q, k[:, 37:], v[:, 37:], softcap=softcap)
    whole, lwhole = _run(backend, q, k, v, softcap=softcap)
    lse = torch.logaddexp(l1, l2)  # [B, Hq, Sq]
    w1 = torch.exp(l1 - lse).transpose(1, 2)[..., None]  # [B, Sq, Hq, 1]
    w2 = torch.exp(l2 - lse).transpose(1, 2)[..., None]
    assert_rel(w1 * o1 + w2 * o2, whole, TOL[torch.float32])
    assert_lse(lse, lwhole, TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_batched_for_equal_lengths(backend):
    torch.manual_seed(10)
    B, Sq, Sk, Hq, Hk, D = 3, 17, 33, 4, 1, 64
    q, k, v = _qkv(B, Sq, Sk, Hq, Hk, D)
    cu_q = torch.arange(0, (B + 1) * Sq, Sq, dtype=torch.int32)
    cu_k = torch.arange(0, (B + 1) * Sk, Sk, dtype=torch.int32)
    out, lse = _run(backend, q, k, v, causal=True, window_left=6)
    pout, plse = _run(backend, q.reshape(B * Sq, Hq, D), k.reshape(B * Sk, Hk, D), v.reshape(B * Sk, Hk, D),
                      cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True, window_left=6)
    assert_rel(pout.reshape(B, Sq, Hq, D), out, TOL[torch.float32])
    assert_lse(plse.reshape(Hq, B, Sq).transpose(0, 1), lse, TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gqa_equals_repeated_kv_heads(backend):
    """Query head h reads kv head h // (Hq / Hk): same as MHA with each kv head repeated Hq/Hk times."""
    torch.manual_seed(11)
    q, k, v = _qkv(1, 17, 17, 8, 2, 64)
    out, _ = _run(backend, q, k, v, causal=True)
    mha, _ = _run(backend, q, k.repeat_interleave(4, dim=2), v.repeat_interleave(4, dim=2), causal=True)
    assert_rel(out, mha, TOL[torch.float32])


# ---------------------------------------------------------------- (4) opcheck


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True])
def test_opcheck(backend, packed):
    torch.manual_seed(12)
    if packed:
        q, k, v, cu_q, cu_k = _packed(4, 2, 32, seqs_q=[3, 0, 5], seqs_k=[4, 2, 5])
        args = (q, k, v, cu_q, cu_k)
    else:
        args = _qkv(2, 5, 7, 4, 2, 32)
    torch.library.opcheck(torch.ops.llmkern.attention.default, args,
                          dict(causal=True, window_left=3, softcap=5.0, backend=backend))


# ---------------------------------------------------------------- (5) bad inputs


def _good():
    return _qkv(1, 4, 4, 4, 2, 64)


def test_bad_q_rank():
    q, k, v = _good()
    with pytest.raises(ValueError, match="q must have rank"):
        llmkern.ops.attention(q[0, 0], k, v)


def test_bad_k_rank():
    q, k, v = _good()
    with pytest.raises(ValueError, match="k must have rank"):
        llmkern.ops.attention(q, k[0], v)


def test_v_shape_differs_from_k():
    q, k, v = _good()
    with pytest.raises(ValueError, match="v must have shape"):
        llmkern.ops.attention(q, k, v[:, :3])


def test_k_head_dim_differs_from_q():
    q, k, v = _good()
    with pytest.raises(ValueError, match="k must have q's head dim"):
        llmkern.ops.attention(q, k[..., :32], v[..., :32])


def test_batch_mismatch():
    q, k, v = _good()
    with pytest.raises(ValueError, match=r"k batch \(2\)"):
        llmkern.ops.attention(q, torch.cat([k, k]), torch.cat([v, v]))


def test_mixed_dtypes():
    q, k, v = _good()
    with pytest.raises(TypeError, match="k must have the dtype of q"):
        llmkern.ops.attention(q, k.bfloat16(), v)


def test_int_dtype():
    q, k, v = _good()
    with pytest.raises(TypeError, match="q must have dtype"):
        llmkern.ops.attention(q.to(torch.int32), k, v)


@pytest.mark.parametrize("D", [36, 300, 16])
def test_unsupported_head_dim(D):
    q, k, v = _qkv(1, 4, 4, 2, 2, D)
    with pytest.raises(ValueError, match=f"head dim of q.*got {D}"):
        llmkern.ops.attention(q, k, v)


def test_q_heads_not_multiple_of_kv_heads():
    q, k, v = _qkv(1, 4, 4, 6, 4, 64)
    with pytest.raises(ValueError, match=r"q heads \(6\).*k/v heads \(4\)"):
        llmkern.ops.attention(q, k, v)


def test_packed_without_cu_seqlens():
    q, k, v, _, cu_k = _packed(4, 2, 64)
    with pytest.raises(ValueError, match="needs cu_seqlens_q and cu_seqlens_k"):
        llmkern.ops.attention(q, k, v, cu_seqlens_k=cu_k)


def test_cu_seqlens_on_batched_input():
    q, k, v = _good()
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_q/k are only for packed"):
        llmkern.ops.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu)


def test_cu_seqlens_wrong_dtype():
    q, k, v, cu_q, cu_k = _packed(4, 2, 64)
    with pytest.raises(TypeError, match="cu_seqlens_q must have dtype int32"):
        llmkern.ops.attention(q, k, v, cu_seqlens_q=cu_q.long(), cu_seqlens_k=cu_k)


def test_cu_seqlens_decreasing():
    q, k, v, cu_q, cu_k = _packed(4, 2, 64)
    bad = cu_q.clone()
    bad[2] = bad[3] + 1
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0 and never decrease"):
        llmkern.ops.attention(q, k, v, cu_seqlens_q=bad, cu_seqlens_k=cu_k)


def test_cu_seqlens_past_the_packed_rows():
    q, k, v, cu_q, cu_k = _packed(4, 2, 64)
    bad = cu_k.clone()
    bad[-1] += 1
    with pytest.raises(ValueError, match="cu_seqlens_k ends at"):
        llmkern.ops.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=bad)


def test_cu_seqlens_lengths_differ():
    q, k, v, cu_q, cu_k = _packed(4, 2, 64)
    with pytest.raises(ValueError, match="cu_seqlens_k must have shape"):
        llmkern.ops.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k[:-1])


def test_bad_scale_softcap_window():
    q, k, v = _good()
    for bad in (-1.0, 0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="scale must be finite and > 0"):
            llmkern.ops.attention(q, k, v, scale=bad)
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="softcap must be finite and >= 0"):
            llmkern.ops.attention(q, k, v, softcap=bad)
    # (2^63 - 1 overflowed in the kernels' position arithmetic: every key masked, an all-zero output)
    for kw in (dict(window_left=-2), dict(window_right=-2), dict(window_right=2 ** 63 - 1), dict(window_left=2 ** 31)):
        with pytest.raises(ValueError, match=r"window_left/right must be -1 \(unbounded\) or in \[0, 2147483647\]"):
            llmkern.ops.attention(q, k, v, **kw)
    big = llmkern.ops.attention(q, k, v, window_left=2 ** 31 - 1, window_right=2 ** 31 - 1)
    assert torch.equal(big, llmkern.ops.attention(q, k, v))


def test_inputs_on_different_devices():
    q, k, v = _good()
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        llmkern.ops.attention(q, k.to("meta"), v.to("meta"))
