"""Triton prefill attention against the float64 reference: causal bottom-right (Sq != Sk), GQA, padded
head dim, packed varlen with window and softcap, log-sum-exp."""
import pytest

pytest.importorskip("triton", reason="triton not installed")

import torch  # noqa: E402

from llmkern import reference  # noqa: E402
from triton_testutil import call, dtypes, import_triton_kernels, rel_err, require_kernel_device, tol  # noqa: E402

DEV = require_kernel_device()
import_triton_kernels()


def _lse_ok(lse, ref):
    """Finite entries close (absolute: lse is a log), -inf exactly where the reference has -inf."""
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(lse).cpu(), fin.cpu())
    assert torch.allclose(lse[fin].double(), ref[fin].double(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", dtypes(DEV))
@pytest.mark.parametrize("causal", [False, True])
def test_attention_batched(dtype, causal):
    g = torch.Generator().manual_seed(6)
    B, Sq, Sk, Hq, Hk, D = 2, 17, 33, 4, 2, 40  # Sq != Sk (bottom-right), GQA 2, D 40 -> 64
    q = torch.randn(B, Sq, Hq, D, generator=g).to(dtype).to(DEV)
    k = torch.randn(B, Sk, Hk, D, generator=g).to(dtype).to(DEV)
    v = torch.randn(B, Sk, Hk, D, generator=g).to(dtype).to(DEV)
    out, lse = call("attention", "attention.attention", q, k, v, None, None, None, causal, -1, -1, 0.0)
    ref, ref_lse = reference.attention(q.double(), k.double(), v.double(), None, None, None, causal, -1, -1, 0.0)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (B, Hq, Sq)
    assert rel_err(out, ref) <= tol(dtype)
    _lse_ok(lse, ref_lse)


@pytest.mark.parametrize("Sq,Sk", [(50, 70), (70, 50), (37, 37)])
@pytest.mark.parametrize("causal,wl,wr", [(True, -1, -1), (True, 20, -1), (False, 9, 3), (False, 33, -1),
                                          (False, -1, 18), (False, 0, 0)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_attention_band_edges(Sq, Sk, causal, wl, wr, dtype):
    """Every query tile's key blocks fall in three runs (masked left edge, unmasked middle, masked right edge /
    diagonal / last partial block): bands of several widths on both sides, key and query lengths that are not
    multiples of the block, Sq > Sk (causal rows with no visible key: out 0, lse -inf). fp16 takes the
    edge-only mask, fp32 masks every block."""
    g = torch.Generator().manual_seed(10 + Sq + 3 * Sk + 7 * wl + 11 * wr)
    B, Hq, Hk, D = 2, 2, 1, 32
    q = torch.randn(B, Sq, Hq, D, generator=g).to(dtype).to(DEV)
    k = torch.randn(B, Sk, Hk, D, generator=g).to(dtype).to(DEV)
    v = torch.randn(B, Sk, Hk, D, generator=g).to(dtype).to(DEV)
    args = (None, None, None, causal, wl, wr, 0.0)
    out, lse = call("attention", "attention.attention", q, k, v, *args)
    ref, ref_lse = reference.attention(q.double(), k.double(), v.double(), *args)
    assert rel_err(out, ref) <= tol(dtype)
    _lse_ok(lse, ref_lse)


@pytest.mark.parametrize("dtype", [torch.float16])
def test_attention_varlen_window_softcap(dtype):
    g = torch.Generator().manual_seed(7)
    Hq, Hk, D = 2, 1, 32
    cu_q = torch.tensor([0, 5, 5, 22], dtype=torch.int32)  # an empty query sequence in the middle
    cu_k = torch.tensor([0, 9, 12, 30], dtype=torch.int32)
    Tq, Tk = 24, 30  # two rows past cu_q[-1]: out 0, lse -inf
    q = torch.randn(Tq, Hq, D, generator=g).to(dtype).to(DEV)
    k = torch.randn(Tk, Hk, D, generator=g).to(dtype).to(DEV)
    v = torch.randn(Tk, Hk, D, generator=g).to(dtype).to(DEV)
    args = (cu_q.to(DEV), cu_k.to(DEV), 0.2, True, 4, -1, 1.5)
    out, lse = call("attention", "attention.attention", q, k, v, *args)
    ref, ref_lse = reference.attention(q.double(), k.double(), v.double(), *args)
    assert rel_err(out, ref) <= tol(dtype)
    assert torch.all(out[22:] == 0)
    _lse_ok(lse, ref_lse)


def test_attention_strided_cu_seqlens():
    """cu_seqlens given as strided views (every other element of a longer tensor) are read as their values,
    not as the underlying memory."""
    g = torch.Generator().manual_seed(8)
    Hq, Hk, D = 2, 2, 32
    cu_q = torch.tensor([[0, 3], [4, 3], [11, 3]], dtype=torch.int32, device=DEV)[:, 0]  # [0, 4, 11], stride 2
    cu_k = torch.tensor([[0, 1], [6, 1], [13, 1]], dtype=torch.int32, device=DEV)[:, 0]  # [0, 6, 13]
    q = torch.randn(11, Hq, D, generator=g).to(torch.float16).to(DEV)
    k = torch.randn(13, Hk, D, generator=g).to(torch.float16).to(DEV)
    v = torch.randn(13, Hk, D, generator=g).to(torch.float16).to(DEV)
    args = (cu_q, cu_k, None, True, -1, -1, 0.0)
    assert cu_q.stride(0) == 2 and cu_k.stride(0) == 2
    out, lse = call("attention", "attention.attention", q, k, v, *args)
    ref, ref_lse = reference.attention(q.double(), k.double(), v.double(), cu_q.contiguous(), cu_k.contiguous(),
                                       *args[2:])
    assert rel_err(out, ref) <= tol(torch.float16)
    _lse_ok(lse, ref_lse)


def test_attention_varlen_grid_bound():
    """max_seqlen_q (what the op's adapter reads from cu_seqlens when it may) bounds the grid's query tiles: the
    same result as without it; a bound shorter than a sequence would leave its last rows unwritten (0)."""
    from llmkern.triton_kernels.attention import attention as launch

    g = torch.Generator().manual_seed(9)
    sq = [3, 40, 7]
    cu_q = torch.tensor([0, 3, 43, 50], dtype=torch.int32, device=DEV)
    cu_k = cu_q.clone()
    q = torch.randn(50, 2, 32, generator=g).to(torch.float16).to(DEV)
    k = torch.randn(50, 1, 32, generator=g).to(torch.float16).to(DEV)
    args = (q, k, k, cu_q, cu_k, None, True, -1, -1, 0.0)
    full, _ = launch(*args)
    bounded, _ = launch(*args, max_seqlen_q=max(sq))
    assert torch.equal(full, bounded)
    if DEV == "cpu":  # (the interpreter's 16-row query tiles: a bound of 16 leaves sequence 1's rows 16..39 out)
        short, _ = launch(*args, max_seqlen_q=16)
        assert torch.all(short[3 + 16:43] == 0) and torch.equal(short[:3 + 16], full[:3 + 16])


@pytest.mark.parametrize("Sq,Sk,causal,wl,wr", [(10, 20, False, -1, 2**31 - 1), (20, 10, True, 2**31 - 1, -1),
                                               (9, 33, False, 2**31 - 1, 2**31 - 2)])
def test_attention_windows_near_the_int32_limit(Sq, Sk, causal, wl, wr):
    """Windows the op accepts up to 2^31 - 1 act as unbounded: the launcher turns a band as wide as the sequences
    into -1, so the kernel's int32 band arithmetic cannot wrap (found by fuzzing: outputs 0 / -inf lse)."""
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, Sq, 2, 32, generator=g).to(DEV)
    k = torch.randn(2, Sk, 1, 32, generator=g).to(DEV)
    v = torch.randn(2, Sk, 1, 32, generator=g).to(DEV)
    args = (None, None, None, causal, wl, wr, 0.0)
    out, lse = call("attention", "attention.attention", q, k, v, *args)
    ref, ref_lse = reference.attention(q.double(), k.double(), v.double(), *args)
    assert rel_err(out, ref) <= tol(torch.float32)
    _lse_ok(lse, ref_lse)


@pytest.mark.parametrize("cap", [1000.0, 1e4])
def test_attention_large_softcap_fp32(cap):
    """A large softcap makes s / cap tiny, where 1 - 2 / (exp(2x) + 1) cancels: tanh takes its Taylor series
    there (found by fuzzing: 1.6e-5 / 1.7e-4 relative error at caps 1000 / 1e4 in fp32)."""
    g = torch.Generator().manual_seed(12)
    q = (4 * torch.randn(1, 40, 2, 64, generator=g)).to(DEV)
    k = (4 * torch.randn(1, 40, 2, 64, generator=g)).to(DEV)
    v = torch.randn(1, 40, 2, 64, generator=g).to(DEV)
    args = (None, None, None, True, -1, -1, cap)
    out, lse = call("attention", "attention.attention", q, k, v, *args)
    ref, ref_lse = reference.attention(q.double(), k.double(), v.double(), *args)
    assert rel_err(out, ref) <= tol(torch.float32)
    _lse_ok(lse, ref_lse)
