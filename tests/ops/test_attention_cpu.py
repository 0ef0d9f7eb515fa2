"""attention (prefill) on the "cpu" backend (llmkern._C), every ISA this CPU supports and 1 or 2 threads,
against the naive float64 definition of _attention_helpers (written from the op docstring, not from the
kernel).

Outputs are NaN-poisoned (torch.empty returns NaN inside poisoned_outputs), so a row or lse entry the
kernel forgets fails. Lengths cross the kernel's key tiles (64 keys) and query tiles (64 rows / G
positions) at odd places; Sq != Sk exercises the bottom-right alignment, Sq > Sk rows that see no key.
"""
import math

import pytest
import torch

import llmkern
import llmkern._C as C  # not importorskip: the compiled module is part of the build
from llmkern.ops import OPS, strict

from _attention_helpers import TOL, assert_lse, assert_rel, naive_attention, naive_attention_batched, \
    poisoned_outputs, randn
from _cpu_helpers import ISAS


def variants(monkeypatch, isas=ISAS, threads=(1, 2)):
    """Yields (isa, threads) with LLMKERN_CPU_ISA and torch's thread count set for each."""
    saved = torch.get_num_threads()
    try:
        for isa in isas:
            monkeypatch.setenv("LLMKERN_CPU_ISA", isa)
            for th in threads:
                torch.set_num_threads(th)
                yield isa, th
    finally:
        torch.set_num_threads(saved)


def run_cpu(q, k, v, **kw):
    with strict(), poisoned_outputs():
        out, lse = llmkern.ops.attention(q, k, v, return_lse=True, backend="cpu", **kw)
    assert OPS["attention"].last_backend == "cpu"
    assert out.is_contiguous() and out.dtype == q.dtype and out.shape == q.shape
    assert lse.is_contiguous() and lse.dtype == torch.float32
    return out, lse


def check(q, k, v, ref, monkeypatch, tol, isas=ISAS, threads=(1, 2), **kw):
    nout, nlse = ref
    for isa, th in variants(monkeypatch, isas, threads):
        out, lse = run_cpu(q, k, v, **kw)
        assert_rel(out, nout, tol, f"out {isa} threads={th} {kw}")
        assert_lse(lse, nlse, TOL[torch.float32])


# (B, Sq, Sk, Hq, Hk, D): lengths 1/17/100/257/1000 (Sq != Sk too), GQA 1/2/3/4/8, head dims 64/128/80/32/256.
CASES = [
    (2, 17, 17, 4, 4, 64),
    (1, 100, 100, 6, 2, 80),  # GQA 3: query tiles of 22 positions
    (1, 1, 257, 8, 1, 128),  # one query row over 5 key tiles (the last one short)
    (1, 257, 100, 8, 2, 64),  # Sq > Sk: causal rows near the top see no key
    (2, 100, 257, 4, 1, 32),
    (1, 33, 70, 8, 1, 256),
    (1, 1000, 1000, 4, 2, 64),  # a long prompt: 32 query tiles of 32 positions (GQA 2), 16 key tiles, the last of 40
]
MASKS = {
    "full": {},
    "causal": dict(causal=True),
    "window_left": dict(window_left=5),
    "window_both": dict(window_left=70, window_right=3),
    "causal_window_left": dict(causal=True, window_left=40),
    # scale 0.5 makes scores ~N(0, 16 D/64) so a cap of 2 bends most of them.
    "softcap": dict(causal=True, softcap=2.0, scale=0.5),
    # s / cap mostly below 0.25, where the kernel's tanh switches to its series (no cancellation).
    "softcap_wide": dict(softcap=50.0, scale=2.0, window_left=30),
}


def _id(c):
    return "x".join(map(str, c))


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_fp32_matches_naive(case, mask, monkeypatch):
    torch.manual_seed(0)
    B, Sq, Sk, Hq, Hk, D = case
    q, k, v = randn(B, Sq, Hq, D), randn(B, Sk, Hk, D), randn(B, Sk, Hk, D)
    ref = naive_attention_batched(q, k, v, **MASKS[mask])
    # The scalar path on the biggest problems alone would take seconds: 1 thread there is enough.
    big = Sq * Sk * Hq * D > 2_000_000
    isas = [i for i in ISAS if i != "scalar"] if big else ISAS
    check(q, k, v, ref, monkeypatch, TOL[torch.float32], isas=isas, **MASKS[mask])
    if big and "scalar" in ISAS:
        check(q, k, v, ref, monkeypatch, TOL[torch.float32], isas=["scalar"], threads=(2,), **MASKS[mask])


@pytest.mark.parametrize("mask", ["full", "causal", "window_both", "causal_window_left", "softcap"])
@pytest.mark.parametrize("D", [40, 72, 136, 200])
def test_fp32_head_dims_not_multiple_of_16(D, mask, monkeypatch):
    """Head dims that are multiples of 8 but not of 16: the kernel pads D to the next multiple of 16 (48, 80,
    144, 208), so its last chunk of q, k and v is half padding that must add nothing to the scores or the
    output (and no output lane past D may be written). Sk 100 crosses a key tile, GQA 2."""
    torch.manual_seed(10)
    q, k, v = randn(1, 70, 4, D), randn(1, 100, 2, D), randn(1, 100, 2, D)
    ref = naive_attention_batched(q, k, v, **MASKS[mask])
    check(q, k, v, ref, monkeypatch, TOL[torch.float32], **MASKS[mask])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mask", ["causal", "window_both", "softcap"])
def test_half_matches_naive(dtype, mask, monkeypatch):
    """The naive sees the very same rounded inputs in float64; the output is rounded once to dtype."""
    torch.manual_seed(1)
    q, k, v = randn(2, 100, 9, 64, dtype=dtype), randn(2, 117, 3, 64, dtype=dtype), randn(2, 117, 3, 64, dtype=dtype)
    check(q, k, v, naive_attention_batched(q, k, v, **MASKS[mask]), monkeypatch, TOL[dtype], **MASKS[mask])


@pytest.mark.parametrize("case", [(1, 17, 33, 4, 4, 32), (1, 70, 100, 6, 2, 80), (1, 33, 70, 8, 1, 256),
                                  (2, 5, 130, 8, 2, 128), (1, 17, 70, 4, 2, 40), (1, 33, 70, 4, 1, 200)], ids=_id)
def test_bf16_head_dims(case, monkeypatch):
    """bf16 through every head dim shape class (the vdpbf16ps path works on pairs of d); D 40 and 200 end in a
    half-padded chunk of 16 (D padded to 48 / 208)."""
    torch.manual_seed(8)
    B, Sq, Sk, Hq, Hk, D = case
    dt = torch.bfloat16
    q, k, v = randn(B, Sq, Hq, D, dtype=dt), randn(B, Sk, Hk, D, dtype=dt), randn(B, Sk, Hk, D, dtype=dt)
    kw = dict(causal=True, window_left=50)
    check(q, k, v, naive_attention_batched(q, k, v, **kw), monkeypatch, TOL[dt], threads=(2,), **kw)


@pytest.mark.skipif("avx512_vnni" not in ISAS, reason="needs AVX-512")
def test_bf16_without_dot_products_matches_naive():
    """The AVX-512 fp32 path on bf16 inputs (what CPUs without AVX-512 BF16 run), through the launcher."""
    torch.manual_seed(9)
    B, Sq, Sk, Hq, Hk, D = 2, 70, 100, 6, 2, 80
    dt = torch.bfloat16
    q, k, v = randn(B, Sq, Hq, D, dtype=dt), randn(B, Sk, Hk, D, dtype=dt), randn(B, Sk, Hk, D, dtype=dt)
    nout, nlse = naive_attention_batched(q, k, v, causal=True)
    with poisoned_outputs():
        out, lse = torch.empty(q.shape, dtype=dt), torch.empty(B, Hq, Sq)
    args = (1, q.data_ptr(), k.data_ptr(), v.data_ptr(), list(q.stride()[:3]), list(k.stride()[:3]),
            list(v.stride()[:3]), B, Sq, Sk, Hq, Hk, D, 0, 0, 0, 0, D ** -0.5, True, -1, -1, 0.0,
            out.data_ptr(), lse.data_ptr())
    need = C.attention(*args, 0, 0, 2, "avx512_vnni", bf16_dot=False)  # asks for the scratch size, runs nothing
    assert need > 0 and torch.isnan(out).all()
    ws = torch.empty(need, dtype=torch.uint8)
    assert C.attention(*args, ws.data_ptr(), need, 2, "avx512_vnni", bf16_dot=False) == 0
    assert_rel(out, nout, TOL[dt])
    assert_lse(lse, nlse, TOL[torch.float32])


@pytest.mark.parametrize("layout", ["sliced", "transposed"])
def test_non_contiguous_inputs(layout, monkeypatch):
    torch.manual_seed(2)
    q = randn(2, 100, 8, 64, layout=layout)
    k, v = randn(2, 70, 2, 64, layout=layout), randn(2, 70, 2, 64, layout=layout)
    kw = dict(causal=True, window_left=9)
    check(q, k, v, naive_attention_batched(q, k, v, **kw), monkeypatch, TOL[torch.float32], **kw)


def test_head_dim_not_innermost_contiguous(monkeypatch):
    """A head dim with stride 2 (the adapter copies it) still gives the right answer."""
    torch.manual_seed(3)
    q = torch.randn(1, 17, 4, 128)[..., ::2]
    k, v = torch.randn(1, 20, 2, 128)[..., ::2], torch.randn(1, 20, 2, 128)[..., ::2]
    check(q, k, v, naive_attention_batched(q, k, v, causal=True), monkeypatch, TOL[torch.float32], causal=True)


# Packed varlen: zero-length sequences, one-token sequences, Sq > Sk, a sequence with no keys, and one
# crossing key and query tiles.
SEQS_Q = [5, 0, 1, 17, 3, 0, 1, 100]
SEQS_K = [5, 0, 1, 20, 0, 4, 3, 257]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mask", ["full", "causal", "window_both", "softcap"])
def test_packed_varlen_matches_naive(dtype, mask, monkeypatch):
    torch.manual_seed(4)
    Hq, Hk, D = 8, 2, 64
    cu_q = torch.tensor([0] + SEQS_Q).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + SEQS_K).cumsum(0).to(torch.int32)
    # Two spare rows past cu_q[-1] and one past cu_k[-1]: they belong to no sequence.
    q = randn(sum(SEQS_Q) + 2, Hq, D, dtype=dtype)
    k, v = randn(sum(SEQS_K) + 1, Hk, D, dtype=dtype), randn(sum(SEQS_K) + 1, Hk, D, dtype=dtype)
    nout = torch.zeros(q.shape, dtype=torch.float64)
    nlse = torch.full((Hq, q.shape[0]), -math.inf, dtype=torch.float64)
    for b in range(len(SEQS_Q)):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        if q1 > q0 and k1 > k0:
            nout[q0:q1], nlse[:, q0:q1] = naive_attention(q[q0:q1], k[k0:k1], v[k0:k1], **MASKS[mask])
    check(q, k, v, (nout, nlse), monkeypatch, TOL[dtype], cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **MASKS[mask])


def test_rows_without_keys_are_zero_with_lse_minus_inf(monkeypatch):
    torch.manual_seed(5)
    q, k, v = randn(1, 70, 3, 32), randn(1, 2, 1, 32), randn(1, 2, 1, 32)  # rows 0..67 see no key
    for _ in variants(monkeypatch):
        out, lse = run_cpu(q, k, v, causal=True)
        assert torch.equal(out[0, :68], torch.zeros_like(out[0, :68]))
        assert torch.isneginf(lse[0, :, :68]).all() and torch.isfinite(lse[0, :, 68:]).all()
    out, lse = run_cpu(q, k[:, :0], v[:, :0])  # no keys at all
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_isas_and_thread_counts_agree(monkeypatch):
    """Every ISA computes the same fp32 math in a different order: results agree to rounding; the thread
    count changes only who computes a unit, so each ISA's output is bit-identical across threads."""
    torch.manual_seed(6)
    q, k, v = randn(2, 130, 8, 128), randn(2, 130, 2, 128), randn(2, 130, 2, 128)
    outs = {}
    for isa, th in variants(monkeypatch, [i for i in ISAS if i != "scalar"]):
        outs[isa, th] = run_cpu(q, k, v, causal=True, window_left=77)
    for (isa, th), (o, l) in outs.items():
        o1, l1 = outs[isa, 1]
        assert torch.equal(o, o1) and torch.equal(l, l1)
        assert_rel(o, outs[next(iter(outs))][0], 1e-6)


def test_nan_in_a_visible_key_gives_nan_rows(monkeypatch):
    """NaN never passes silently: rows that see a NaN key are NaN, rows that do not are finite."""
    torch.manual_seed(7)
    q, k, v = randn(1, 100, 2, 64), randn(1, 100, 2, 64), randn(1, 100, 2, 64)
    k[0, 80, 1, 5] = float("nan")  # head 1's key 80: seen (causal) by rows 80.. of query head 1
    for _ in variants(monkeypatch):
        out, _ = run_cpu(q, k, v, causal=True)
        assert torch.isfinite(out[0, :80]).all() and torch.isfinite(out[0, :, 0]).all()
        assert torch.isnan(out[0, 80:, 1]).all()


def test_launcher_rejects_bad_arguments():
    q = torch.randn(1, 4, 2, 64)
    out, lse = torch.empty_like(q), torch.empty(1, 2, 4)
    st = list(q.stride()[:3])

    def call(**over):
        kw = dict(dtype=0, q_ptr=q.data_ptr(), k_ptr=q.data_ptr(), v_ptr=q.data_ptr(), q_strides=st, k_strides=st,
                  v_strides=st, B=1, Sq=4, Sk=4, Hq=2, Hk=2, D=64, cu_seqlens_q_ptr=0, cu_seqlens_k_ptr=0, Tq=0,
                  Tk=0, scale=0.125, causal=True, window_left=-1, window_right=-1, softcap=0.0,
                  out_ptr=out.data_ptr(), lse_ptr=lse.data_ptr(), ws_ptr=0, ws_bytes=0, num_threads=1, isa="")
        kw.update(over)
        C.attention(**kw)

    call()  # the good call works
    for over, msg in [(dict(D=60), "D must be"), (dict(Hq=3), "multiple of Hk"), (dict(dtype=5), "dtype"),
                      (dict(scale=0.0), "scale"), (dict(out_ptr=0), "out_ptr"), (dict(q_strides=[1, 2]), "strides"),
                      (dict(isa="nope"), "isa"), (dict(window_left=-2), "window"),
                      (dict(ws_bytes=64), "ws_bytes")]:
        with pytest.raises(ValueError, match=msg):
            call(**over)
    bad_cu = torch.tensor([0, 3, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="never decrease"):
        call(B=2, cu_seqlens_q_ptr=bad_cu.data_ptr(), cu_seqlens_k_ptr=bad_cu.data_ptr(), Tq=4, Tk=4)
