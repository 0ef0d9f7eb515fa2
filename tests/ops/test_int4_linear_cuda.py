"""int4_linear, cuda backend, on a GPU: Llama-3-8B shapes at decode and prefill sizes, odd shapes (split-K
and not), strided x, G 32/64/128, fp32/bf16/fp16, against the float64 reference (DESIGN.md tolerances)
and against dequantize-then-matmul, and CUDA graph capture. Every call runs under strict mode and asserts
that the cuda backend (not a fallback) produced the result."""
from __future__ import annotations

import importlib
import math

import pytest
import torch

from llmkern import _backends, ops
from llmkern import reference as R
from _quant_helpers import TOL, assert_exact_products, graph_replay, rel_err

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or "cuda" not in ops.OPS["int4_linear"].backends_here(),
    reason="needs a CUDA GPU and llmkern._C_cuda",
)

DEV = "cuda"
LLAMA = [(4096, 4096), (14336, 4096), (4096, 14336), (6144, 4096)]  # (N, K)


def gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def make_weights(N, K, G, g):
    """Every nibble value, positive scales, offsets of either sign (GGUF Q4_0/Q4_1-like)."""
    qweight = torch.randint(0, 256, (N, K // 2), generator=g, dtype=torch.uint8, device=DEV)
    scales = torch.rand(N, K // G, generator=g, device=DEV) * 0.02 + 1e-3
    offsets = -8 * scales + torch.randn(N, K // G, generator=g, device=DEV) * 0.01
    return qweight, scales, offsets


def run_cuda(x, qw, s, o, bias):
    M, N = math.prod(x.shape[:-1]), qw.shape[0]
    t = torch.full((M * N,), float("nan"), dtype=x.dtype, device=DEV)  # poison the caching allocator
    del t
    with ops.strict():
        out = ops.int4_linear(x, qw, s, o, bias, backend="cuda")
    assert ops.OPS["int4_linear"].last_backend == "cuda"
    assert out.dtype == x.dtype and out.shape == x.shape[:-1] + (N,)
    return out


def check(out, x, qw, s, o, bias, what):
    ref = R.int4_linear(x, qw, s, o, bias)
    err = rel_err(out, ref)
    assert err <= TOL[x.dtype], f"{what}: rel err {err}"
    # Dequantize-then-matmul in float64 on the same weights: the kernel's own error.
    y = x.reshape(-1, x.shape[-1]).double() @ R.dequantize_int4(qw, s, o).double().t()
    if bias is not None:
        y = y + bias.double()
    err2 = rel_err(out.reshape(y.shape), y)
    assert err2 <= TOL[x.dtype], f"{what}: rel err vs dequantize-then-matmul {err2}"


# ------------------------------------------------------------------ Llama-3-8B shapes


@pytest.mark.parametrize("M", [1, 7, 16, 64, 1024])
@pytest.mark.parametrize("NK", LLAMA, ids=[f"{n}x{k}" for n, k in LLAMA])
@pytest.mark.parametrize("G", [32, 128])
def test_llama_shapes(G, NK, M):
    N, K = NK
    g = gen(M + N + K + G)
    x = torch.randn(M, K, generator=g, device=DEV).to(torch.bfloat16)
    qw, s, o = make_weights(N, K, G, g)
    bias = torch.randn(N, generator=g, device=DEV).to(torch.bfloat16) if M % 2 else None
    out = run_cuda(x, qw, s, o, bias)
    check(out, x, qw, s, o, bias, f"G={G} M={M} N={N} K={K}")


# ------------------------------------------------------------------ odd shapes, layouts, dtypes

ODD = [(M, N, K, G) for M in (1, 3, 17, 100) for (N, K, G) in ((1, 64, 32), (33, 96, 32), (257, 256, 64),
                                                                   (33, 4096, 128), (257, 4096, 32), (1, 8192, 64))]
LAYOUTS = ("contig", "slice", "transposed")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("i", range(len(ODD)), ids=[f"M{c[0]}_N{c[1]}_K{c[2]}_g{c[3]}" for c in ODD])
def test_odd_shapes(i, dtype):
    M, N, K, G = ODD[i]
    g = gen(100 + i)
    layout = LAYOUTS[i % 3]
    if layout == "contig":
        x = torch.randn(M, K, generator=g, device=DEV).to(dtype)
    elif layout == "slice":  # last-dim stride 2
        x = torch.randn(M, 2 * K, generator=g, device=DEV).to(dtype)[:, ::2]
    else:  # stride (1, M)
        x = torch.randn(K, M, generator=g, device=DEV).to(dtype).t()
    qw, s, o = make_weights(N, K, G, g)
    bias = None
    if i % 2 == 0:
        bias = torch.randn(N, generator=g, device=DEV).to(dtype if i % 4 == 0 else torch.float32)
    out = run_cuda(x, qw, s, o, bias)
    check(out, x, qw, s, o, bias, f"{ODD[i]} {dtype}")


def test_split_k_is_used_and_deterministic():
    """Small N at decode size splits K across CTAs; the fixed-order reduction gives identical reruns."""
    mod = _backends.cuda_module()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bf16 = 1
    assert mod.int4_linear_splits(1, 257, 8192, sms, bf16, True) > 1  # GEMV (M = 1)
    assert mod.int4_linear_splits(1, 14336, 4096, sms, bf16, True) == 1
    assert mod.int4_linear_splits(4, 257, 8192, sms, bf16, True) > 1  # decode tensor-core kernel
    assert mod.int4_linear_splits(4, 14336, 4096, sms, bf16, True) == 1
    for M in (1, 4, 12):
        N, K = 257, 8192
        g = gen(11 + M)
        x = torch.randn(M, K, generator=g, device=DEV).to(torch.bfloat16)
        qw, s, o = make_weights(N, K, 32, g)
        bias = torch.randn(N, generator=g, device=DEV)
        a = run_cuda(x, qw, s, o, bias)
        b = run_cuda(x, qw, s, o, bias)
        assert torch.equal(a, b)
        check(a, x, qw, s, o, bias, f"split-K M={M}")


@pytest.mark.parametrize("decode_mma", [True, False], ids=["decode_mma", "gemv"])
@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_decode_routes(monkeypatch, dtype, G, decode_mma):
    """16-bit x, M 2..16: the swap-AB tensor-core kernel (M <= 8 one 8-row mma column block, 9..16 two;
    K % 128 tails of 32/64/96, N not a multiple of 16, with and without split-K) and the SIMT GEMV."""
    monkeypatch.setattr(importlib.import_module("llmkern.ops.int4_linear"), "CUDA_DECODE_MMA", decode_mma)
    for M, N, K in ((2, 33, 128), (3, 1, 96), (4, 17, 192), (7, 33, 160), (8, 257, 4096), (9, 100, 1056), (16, 4096, 4096),
                    (13, 14336, 4096), (5, 6144, 4096 + 32 * 3)):
        if K % G:
            continue
        g = gen(M * 1000 + N + K + G)
        x = torch.randn(M, K, generator=g, device=DEV).to(dtype)
        qw, s, o = make_weights(N, K, G, g)
        bias = torch.randn(N, generator=g, device=DEV).to(dtype) if M % 2 else None
        check(run_cuda(x, qw, s, o, bias), x, qw, s, o, bias, f"decode M={M} N={N} K={K} G={G}")


def test_leading_dims_and_offset_view():
    g = gen(9)
    qw, s, o = make_weights(257, 256, 64, g)
    x = torch.randn(2, 3, 256, generator=g, device=DEV).to(torch.bfloat16)
    check(run_cuda(x, qw, s, o, None), x, qw, s, o, None, "[2,3,K]")
    flat = torch.randn(3 * 256 + 1, generator=g, device=DEV).to(torch.bfloat16)
    x = flat[1:].view(3, 256)  # contiguous but 2 bytes off 16-byte alignment: the adapter copies
    check(run_cuda(x, qw, s, o, None), x, qw, s, o, None, "offset view")


def test_quantized_float_weights_and_gguf_like_offsets():
    """quantize_int4 output (fractional zero points) and Q4_0-style offsets = -8 * scale."""
    g = gen(12)
    w = torch.randn(1000, 1024, generator=g, device=DEV)
    for M in (1, 9, 40):
        x = torch.randn(M, 1024, generator=g, device=DEV).to(torch.float16)
        qw, s, o = ops.quantize_int4(w.cpu(), 32)
        qw, s, o = qw.to(DEV), s.to(DEV), o.to(DEV)
        check(run_cuda(x, qw, s, o, None), x, qw, s, o, None, f"quantize_int4 M={M}")
        o8 = -8 * s
        check(run_cuda(x, qw, s, o8, None), x, qw, s, o8, None, f"Q4_0-like M={M}")


@pytest.mark.parametrize("cublas", [False, True], ids=["fused_mma", "dequant_cublas"])
@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_prefill_routes(monkeypatch, dtype, G, cublas):
    """16-bit x with M > 16: the dequantizing mma kernel (64x128 and 128x128 tiles, K and N tails) and the
    dequantize + cuBLAS fallback switch."""
    monkeypatch.setattr(importlib.import_module("llmkern.ops.int4_linear"), "CUDA_PREFILL_CUBLAS", cublas)
    # (the sm_80 kernel on every GPU, H100 / H200 too, where the sm_90a one is the default: tested on its own below)
    monkeypatch.setattr(importlib.import_module("llmkern.ops.int4_linear"), "CUDA_INT4_WGMMA", False)
    for M, N, K in ((17, 33, 128), (100, 257, 4096), (300, 1000, 384), (2048, 2048, 1024)):
        if K % G:
            continue
        g = gen(M + N + K + G)
        x = torch.randn(M, K, generator=g, device=DEV).to(dtype)
        qw, s, o = make_weights(N, K, G, g)
        bias = torch.randn(N, generator=g, device=DEV) if M % 2 == 0 else None
        check(run_cuda(x, qw, s, o, bias), x, qw, s, o, bias, f"prefill M={M} N={N} K={K} G={G}")


def test_nan_row_propagates():
    g = gen(3)
    qw, s, o = make_weights(17, 256, 32, g)
    for M in (4, 20):  # GEMV and (16-bit, M > 16) tensor-core routes
        x = torch.randn(M, 256, generator=g, device=DEV).to(torch.bfloat16)
        x[2, 5] = float("nan")
        out = run_cuda(x, qw, s, o, None)
        assert torch.isnan(out[2]).all(), M
        assert torch.isfinite(torch.cat([out[:2], out[3:]])).all(), M


# ------------------------------------------------------------------ CUDA graphs


@pytest.mark.parametrize("M,N,K,G", [(1, 4096, 4096, 32), (1, 257, 8192, 64), (8, 512, 1024, 128),
                                     (4, 257, 8192, 32), (64, 512, 1024, 32)])
def test_cuda_graph_capture(M, N, K, G):
    g = gen(M + N)
    qw, s, o = make_weights(N, K, G, g)
    bias = torch.randn(N, generator=g, device=DEV).to(torch.bfloat16)
    x = torch.randn(M, K, generator=g, device=DEV).to(torch.bfloat16)
    st = torch.cuda.Stream()
    st.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(st):
        for _ in range(2):
            ops.int4_linear(x, qw, s, o, bias, backend="cuda")
    torch.cuda.current_stream().wait_stream(st)
    graph = torch.cuda.CUDAGraph()
    with ops.strict(), torch.cuda.graph(graph):
        y = ops.int4_linear(x, qw, s, o, bias, backend="cuda")
    assert ops.OPS["int4_linear"].last_backend == "cuda"
    x.copy_(torch.randn(M, K, generator=g, device=DEV).to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    eager = run_cuda(x, qw, s, o, bias)
    assert torch.equal(y, eager)  # no atomics anywhere: replay == eager bit for bit
    check(y, x, qw, s, o, bias, f"graph M={M} N={N} K={K}")


# ------------------------------------------------------------------ sm_90a wgmma prefill kernel (CUDA_INT4_WGMMA)

SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
needs_sm90 = pytest.mark.skipif(not SM90, reason="the wgmma kernel needs a compute capability 9.0 GPU")
# (M, N, K): K tails of the 64-k stage (96, 160), M / N tails of both tiles (64 x 128 one warpgroup, 128 x 128
# two: chosen when the 128-row tiles fill the GPU), k tiles through the 3-stage ring, Llama-3-8B sizes.
WGMMA_SHAPES = [(17, 33, 128), (17, 1, 96), (64, 128, 64), (65, 129, 160), (100, 257, 4096), (129, 1000, 384),
                (300, 1000, 1056), (2048, 2048, 1024), (1024, 4096, 4096), (1000, 14336, 4096), (1024, 4096, 14336)]


@needs_sm90
def test_wgmma_route_is_taken():
    """The binding reports the wgmma path when asked for it (what CUDA_INT4_WGMMA does on sm_90)."""
    mod = _backends.cuda_module()
    M, N, K, G = 100, 257, 256, 32
    g = gen(70)
    x = torch.randn(M, K, generator=g, device=DEV).to(torch.bfloat16)
    qw, s, o = make_weights(N, K, G, g)
    out = torch.full((M, N), float("nan"), dtype=x.dtype, device=DEV)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    path = mod.int4_linear(x.data_ptr(), 1, K, M, K, qw.data_ptr(), N, s.data_ptr(), o.data_ptr(), G, 0,
                           out.data_ptr(), N, 0, 1, sms, True, torch.cuda.current_stream().cuda_stream, True)
    assert path == "wgmma"
    torch.cuda.synchronize()
    check(out, x, qw, s, o, None, "wgmma binding")


@needs_sm90
@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_prefill_wgmma(monkeypatch, dtype, G):
    monkeypatch.setattr(importlib.import_module("llmkern.ops.int4_linear"), "CUDA_INT4_WGMMA", True)
    for M, N, K in WGMMA_SHAPES:
        if K % G:
            continue
        g = gen(M + N + K + G + 5)
        x = torch.randn(M, K, generator=g, device=DEV).to(dtype)
        qw, s, o = make_weights(N, K, G, g)
        bias = None if M % 2 else torch.randn(N, generator=g, device=DEV).to(dtype if M % 4 else torch.float32)
        check(run_cuda(x, qw, s, o, bias), x, qw, s, o, bias, f"wgmma M={M} N={N} K={K} G={G} {dtype}")


@needs_sm90
def test_prefill_wgmma_matches_mma_sync_kernel(monkeypatch):
    """Same dequantized bf16 tiles, same fp32 accumulation (different order): the two kernels agree closely."""
    m4 = importlib.import_module("llmkern.ops.int4_linear")
    g = gen(71)
    M, N, K = 333, 1000, 2048
    x = torch.randn(M, K, generator=g, device=DEV).to(torch.bfloat16)
    qw, s, o = make_weights(N, K, 64, g)
    a = run_cuda(x, qw, s, o, None)
    monkeypatch.setattr(m4, "CUDA_INT4_WGMMA", True)
    b = run_cuda(x, qw, s, o, None)
    assert rel_err(b, a) <= 4e-3


@needs_sm90
def test_prefill_wgmma_layouts_nan_and_graph(monkeypatch):
    monkeypatch.setattr(importlib.import_module("llmkern.ops.int4_linear"), "CUDA_INT4_WGMMA", True)
    g = gen(72)
    qw, s, o = make_weights(257, 256, 64, g)
    x = torch.randn(2, 30, 256, generator=g, device=DEV).to(torch.bfloat16)  # [B, S, K]
    check(run_cuda(x, qw, s, o, None), x, qw, s, o, None, "wgmma [2,30,K]")
    x = torch.randn(40, 512, generator=g, device=DEV).to(torch.float16)[:, ::2]  # strided: the adapter copies
    check(run_cuda(x, qw, s, o, None), x, qw, s, o, None, "wgmma strided")
    x = torch.randn(40, 256, generator=g, device=DEV).to(torch.bfloat16)
    x[2, 5] = float("nan")
    out = run_cuda(x, qw, s, o, None)
    assert torch.isnan(out[2]).all() and torch.isfinite(torch.cat([out[:2], out[3:]])).all()
    # CUDA graph capture
    x = torch.randn(300, 256, generator=g, device=DEV).to(torch.bfloat16)
    bias = torch.randn(257, generator=g, device=DEV)
    st = torch.cuda.Stream()
    st.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(st):
        for _ in range(2):  # warm-up: both tile shapes' shared-memory opt-in happens outside the capture
            ops.int4_linear(x, qw, s, o, bias, backend="cuda")
    torch.cuda.current_stream().wait_stream(st)
    graph = torch.cuda.CUDAGraph()
    with ops.strict(), torch.cuda.graph(graph):
        y = ops.int4_linear(x, qw, s, o, bias, backend="cuda")
    x.copy_(torch.randn(300, 256, generator=g, device=DEV).to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, run_cuda(x, qw, s, o, bias))
    check(y, x, qw, s, o, bias, "wgmma graph")


@pytest.mark.parametrize("wgmma", [False, pytest.param(True, marks=needs_sm90)], ids=["mma", "wgmma"])
def test_gemm_split_k(monkeypatch, wgmma):
    """M > 16 whose output tiles leave SMs idle (M = 64 on Llama-3-8B's layers: 32 / 112 tiles of 64 x 128) split K
    over CTAs (int4_linear_gemm_splits): the binding reports the split path and gives the op's bits; reruns are
    identical (fixed-order reduction); within tolerance and close to the unsplit GEMM (CUDA_GEMM_SPLITK off); a
    packed module takes the split packed GEMM; a CUDA graph replays both bit for bit."""
    from llmkern.nn import Int4Linear

    m4 = importlib.import_module("llmkern.ops.int4_linear")
    monkeypatch.setattr(m4, "CUDA_INT4_WGMMA", wgmma)
    mod = _backends.cuda_module()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for M, N, K, G in ((64, 4096, 14336, 32), (64, 14336, 4096, 128), (40, 1000, 4096 + 32, 32)):
        splits = mod.int4_linear_gemm_splits(M, N, K, sms)
        assert splits > 1, (M, N, K, sms)
        g = gen(M + N + K)
        x = torch.randn(M, K, generator=g, device=DEV).to(torch.bfloat16)
        qw, s, o = make_weights(N, K, G, g)
        bias = torch.randn(N, generator=g, device=DEV)
        a = run_cuda(x, qw, s, o, bias)
        assert torch.equal(a, run_cuda(x, qw, s, o, bias))
        check(a, x, qw, s, o, bias, f"split-K GEMM M={M} N={N} K={K}")
        out = torch.full((M, N), float("nan"), dtype=x.dtype, device=DEV)
        ws = torch.full((splits, M, N), float("nan"), device=DEV)
        path = mod.int4_linear(x.data_ptr(), 1, K, M, K, qw.data_ptr(), N, s.data_ptr(), o.data_ptr(), G,
                               bias.data_ptr(), out.data_ptr(), N, ws.data_ptr(), splits, sms, True,
                               torch.cuda.current_stream().cuda_stream, wgmma)
        assert path == ("wgmma_splitk" if wgmma else "mma_splitk")
        torch.cuda.synchronize()
        assert torch.equal(out, a)
        monkeypatch.setattr(m4, "CUDA_GEMM_SPLITK", False)
        assert rel_err(run_cuda(x, qw, s, o, bias), a.double()) <= 4e-3
        monkeypatch.setattr(m4, "CUDA_GEMM_SPLITK", True)
        m = Int4Linear.from_quantized(qw.clone(), s.clone(), o.clone(), bias, backend="cuda")
        packed = m(x)
        assert m._run.impl.packed is not None
        check(packed, x, qw, s, o, bias, f"packed split-K GEMM M={M} N={N} K={K}")
        assert rel_err(packed, a.double()) <= 1e-3
        if N == 1000:
            for call in (m, lambda t: ops.int4_linear(t, qw, s, o, bias, backend="cuda")):
                replayed, eager = graph_replay(call, x, torch.randn(M, K, generator=g, device=DEV).to(torch.bfloat16))
                assert torch.equal(replayed, eager)


# ------------------------------------------------------------------ prepacked weights (Int4Linear's prepared call)


def prepared(qw, s, o, bias):
    """The cuda preparer's run(x) for these weights (what Int4Linear uses after its first call)."""
    run = ops.OPS["int4_linear"].prepare(qw, s, o, bias, "w4a16", backend="cuda", device=qw.device)
    assert run is not None and run.backend == "cuda"
    return run


def check_tight(out, x, qw, s, o, bias, what):
    """The packed kernel multiplies exact q and x: within one ulp of the exact result, plus 2^-20 of the largest
    output (fp32 sums of the scale and offset terms)."""
    check(out, x, qw, s, o, bias, what)
    y = x.reshape(-1, x.shape[-1]).double() @ R.dequantize_int4(qw, s, o).double().t()
    if bias is not None:
        y = y + bias.double()
    assert_exact_products(out.reshape(y.shape), y, what)


@pytest.mark.parametrize("M", [1, 2, 8, 9, 16, 64, 1024])
@pytest.mark.parametrize("NK", LLAMA, ids=[f"{n}x{k}" for n, k in LLAMA])
@pytest.mark.parametrize("G", [32, 128])
def test_packed_llama_shapes(G, NK, M):
    """The decode kernel (M <= 16: exact products, tight) and the packed GEMM (M 64 / 1024: 128-row tiles
    at 1024, weights rounded to bf16 as the canonical GEMM rounds them; compared with that GEMM too)."""
    N, K = NK
    g = gen(7 * M + N + K + G)
    qw, s, o = make_weights(N, K, G, g)
    run = prepared(qw, s, o, None)
    assert run.impl.packed[2] is False
    x = torch.randn(M, K, generator=g, device=DEV).to(torch.bfloat16)
    out = run(x)
    if M <= 16:
        check_tight(out, x, qw, s, o, None, f"packed M={M} N={N} K={K} G={G}")
    else:
        check(out, x, qw, s, o, None, f"packed GEMM M={M} N={N} K={K} G={G}")
        ref = run_cuda(x, qw, s, o, None)  # the canonical GEMM: the same 16-bit weights, other sum order
        assert rel_err(out, ref.double()) <= 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("scale16", [False, True])
def test_packed_odd_shapes(dtype, G, scale16):
    """N / K tails (K % 128 of 32 / 64 / 96), split-K and not, bias, [B, S, K] input, fp16-exact scales stored as
    fp16; 17 rows take the packed GEMM and fp32 x the canonical kernels through the same run."""
    for M, N, K in ((1, 33, 2080), (3, 257, 8192), (16, 1000, 576), (5, 1, 4224), (12, 48, 160)):
        if K % G:
            continue
        g = gen(M + N + K + G)
        qw, s, o = make_weights(N, K, G, g)
        if scale16:
            s, o = s.half().float(), o.half().float()
        bias = torch.randn(N, generator=g, device=DEV).to(dtype)
        run = prepared(qw, s, o, bias)
        assert run.impl.packed[2] is scale16
        x = torch.randn(M, K, generator=g, device=DEV).to(dtype)
        check_tight(run(x), x, qw, s, o, bias, f"M={M} N={N} K={K}")
        x3 = torch.randn(2, 8, K, generator=g, device=DEV).to(dtype)[:, ::2]  # [2, 4, K] strided
        check_tight(run(x3), x3, qw, s, o, bias, f"[2, 4, K] N={N} K={K}")
        for x in (torch.randn(17, K, generator=g, device=DEV).to(dtype), torch.randn(3, K, generator=g, device=DEV)):
            check(run(x), x, qw, s, o, bias, f"packed GEMM / canonical fp32 {tuple(x.shape)} {x.dtype}")


def test_packed_module_graph_and_nan():
    """Int4Linear on the GPU: the first call prepares (packs) and, like every later decode call, runs the packed
    kernel (the same bits); CUDA graph capture of a prepared module replays bit for bit; a NaN row of x gives a NaN
    output row only."""
    from llmkern.nn import Int4Linear

    g = gen(3)
    N, K, G = 4096, 4096, 32
    qw, s, o = make_weights(N, K, G, g)
    m = Int4Linear.from_quantized(qw, s, o, torch.randn(N, generator=g, device=DEV), backend="cuda")
    x = torch.randn(4, K, generator=g, device=DEV).to(torch.bfloat16)
    first = m(x)
    assert m._run is not None and m._run.backend == "cuda" and m._run.impl.packed is not None
    second = m(x)
    check_tight(second, x, qw, s, o, m.bias, "module")
    assert torch.equal(first, second), "the first call's bits differ from the prepared run's"
    replayed, eager = graph_replay(m, x, torch.randn(4, K, generator=g, device=DEV).to(torch.bfloat16))
    assert torch.equal(replayed, eager)
    x[1] = float("nan")
    out = m(x)
    assert out[1].isnan().all() and torch.isfinite(out[[0, 2, 3]]).all()


@pytest.mark.parametrize("M", [1, 3, 40])
def test_module_first_call_has_the_later_calls_bits(M):
    """A fresh Int4Linear's first call (it prepares: packs, releases the canonical buffers) gives what its later
    calls give, bit for bit, at decode (packed kernel) and GEMM sizes; so does a fresh one's first fp32 call (the
    canonical kernels, restored). The first GPU run's bf16 graph test failed on this: a model's first run used the
    canonical kernels, every later one the packed ones (docs/notes/gpu-run-2026-11-29.md)."""
    from llmkern.nn import Int4Linear

    g = gen(11 + M)
    N, K, G = 1000, 1024, 32
    qw, s, o = make_weights(N, K, G, g)
    bias = torch.randn(N, generator=g, device=DEV)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        m = Int4Linear.from_quantized(qw.clone(), s.clone(), o.clone(), bias, backend="cuda")
        x = torch.randn(M, K, generator=g, device=DEV).to(dtype)
        first = m(x)
        assert m._trusted and m._run is not None
        assert torch.equal(first, m(x)) and torch.equal(first, m(x.clone())), dtype
        check(first, x, qw, s, o, bias, f"first call M={M} {dtype}")

    # A subclass's forward and a forward put on the instance (as accelerate's hooks do) run once per call, the
    # first one included (the first call computes through Int4Linear.forward itself, not self.forward).
    class PlusOne(Int4Linear):
        def forward(self, x):
            return super().forward(x) + 1

    x = torch.randn(M, K, generator=g, device=DEV).to(torch.bfloat16)
    m = Int4Linear.from_quantized(qw.clone(), s.clone(), o.clone(), bias, backend="cuda")
    want = m(x)
    p = PlusOne.from_quantized(qw.clone(), s.clone(), o.clone(), bias, backend="cuda")
    assert torch.equal(p(x), want + 1) and torch.equal(p(x), want + 1)
    h = Int4Linear.from_quantized(qw.clone(), s.clone(), o.clone(), bias, backend="cuda")
    calls = []
    inner = h.forward
    h.forward = lambda x: calls.append(1) or inner(x)
    assert torch.equal(h(x), want) and len(calls) == 1


@pytest.mark.parametrize("G", [32, 128])
def test_packed_module_dequant_cublas_prefill(monkeypatch, G):
    """CUDA_PREFILL_CUBLAS on a packed (released) Int4Linear: 17+ rows dequantize the packed copy and multiply with
    cuBLAS, the canonical op's dequantize + cuBLAS route bit for bit (the same 16-bit weights; F.linear on both);
    N tails past the 16-row tiles, a bias; decode-sized calls keep the packed kernel; a CUDA graph replays it."""
    from llmkern.nn import Int4Linear

    monkeypatch.setattr(importlib.import_module("llmkern.ops.int4_linear"), "CUDA_PREFILL_CUBLAS", True)
    g = gen(7 + G)
    N, K = 1000, 1024
    qw, s, o = make_weights(N, K, G, g)
    bias = torch.randn(N, generator=g, device=DEV)
    m = Int4Linear.from_quantized(qw.clone(), s.clone(), o.clone(), bias, backend="cuda")
    m(torch.randn(1, K, generator=g, device=DEV).to(torch.bfloat16))  # prepares (packs, releases)
    x = torch.randn(300, K, generator=g, device=DEV).to(torch.bfloat16)
    out = m(x)
    want = run_cuda(x, qw, s, o, bias)  # the op on the canonical weights, same switch
    assert torch.equal(out, want)
    check(out, x, qw, s, o, bias, "packed module, dequant + cuBLAS")
    replayed, eager = graph_replay(m, x, torch.randn(300, K, generator=g, device=DEV).to(torch.bfloat16))
    assert torch.equal(replayed, eager)


def test_packed_module_frees_the_canonical_buffers():
    """Int4Linear on the GPU holds the packed copy alone after its first call: allocated GPU memory falls by the
    canonical buffers' bytes less the packed copy's; state_dict gives them back bit for bit (without keeping
    them); an fp32 call restores them, with the canonical kernels' result."""
    from llmkern.nn import Int4Linear

    g = gen(5)
    N, K, G = 4096, 4096, 32
    qw, s, o = make_weights(N, K, G, g)
    m = Int4Linear.from_quantized(qw.clone(), s.clone(), o.clone(), None, backend="cuda")
    x = torch.randn(1, K, generator=g, device=DEV).to(torch.bfloat16)
    torch.cuda.synchronize(DEV)
    before = torch.cuda.memory_allocated(DEV)
    y = m(x)
    del y
    torch.cuda.synchronize(DEV)
    qp, sp, _ = m._run.impl.packed
    expect = (qp.numel() + sp.numel()) - (qw.numel() + 4 * s.numel() + 4 * o.numel())
    assert abs(torch.cuda.memory_allocated(DEV) - before - expect) < (1 << 20), (before, expect)
    assert m._released is not None
    sd = m.state_dict()
    assert torch.equal(sd["qweight"], qw) and torch.equal(sd["scales"], s) and torch.equal(sd["offsets"], o)
    del sd
    check_tight(m(x), x, qw, s, o, None, "released module")
    x32 = torch.randn(3, K, generator=g, device=DEV)
    check(m(x32), x32, qw, s, o, None, "fp32 after release")
    assert m._released is None and torch.equal(m.qweight, qw)
