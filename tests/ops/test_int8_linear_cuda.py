"""int8_linear, cuda backend, on a GPU: Llama-3-8B shapes, odd shapes, strided x, per-channel and grouped
scales, W8A16 and W8A8 against the float64 reference (DESIGN.md tolerances), W8A8 per channel to one ulp of
the exact integer result, W8A16 against dequantize-then-matmul, the activation quantization bit for bit
against quantize_rows_int8, and CUDA graph capture. Every call runs under strict mode and asserts that
the cuda backend (not a fallback) produced the result."""
from __future__ import annotations

import importlib
import math

import pytest
import torch

from llmkern import _backends, ops
from llmkern import reference as R
from _quant_helpers import TOL, assert_rounded_from, graph_replay, rel_err

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or "cuda" not in ops.OPS["int8_linear"].backends_here(),
    reason="needs a CUDA GPU and llmkern._C_cuda",
)

DEV = "cuda"
LLAMA = [(4096, 4096), (14336, 4096), (4096, 14336), (6144, 4096)]  # (N, K)


def _poison(M, N, dtype):
    """Leave a NaN-filled block of the output's size in torch's caching allocator, so that an output
    element the kernel forgets to write is (very likely) NaN and fails the comparison."""
    t = torch.full((M * N,), float("nan"), dtype=dtype, device=DEV)
    del t


def run_cuda(x, q, scale, bias, mode):
    M = math.prod(x.shape[:-1])
    _poison(M, q.shape[0], x.dtype)
    with ops.strict():
        out = ops.int8_linear(x, q, scale, bias, mode=mode, backend="cuda")
    assert ops.OPS["int8_linear"].last_backend == "cuda"
    assert out.dtype == x.dtype and out.shape == x.shape[:-1] + (q.shape[0],)
    return out


def make_weights(N, K, G, gen):
    q = torch.randint(-128, 128, (N, K), generator=gen, dtype=torch.int8, device=DEV)
    shape = (N,) if G == 0 else (N, K // G)
    scale = torch.rand(shape, generator=gen, device=DEV) * 0.02 + 1e-3
    return q, scale


def gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def check(out, x, q, scale, bias, mode, what):
    ref = R.int8_linear(x, q, scale, bias, mode)
    err = rel_err(out, ref)
    assert err <= TOL[x.dtype], f"{what}: rel err {err}"
    if mode == "w8a8" and scale.dim() == 1 and bias is None and x.dtype != torch.float32:
        # Per channel the kernel's int32 sums are exact: the fp32 rescale (a few 2^-24 roundings) and the
        # final rounding to 16 bits keep every element within one ulp of the exact value. (With a bias,
        # cancellation could magnify the fp32 rounding; an fp32 output has no ulp to spare.)
        exact = R.int8_linear(x.double(), q, scale, None, mode)
        assert_rounded_from(out, exact, what)


# ------------------------------------------------------------------ Llama-3-8B shapes


@pytest.mark.parametrize("M", [1, 7, 16, 64, 1024])
@pytest.mark.parametrize("NK", LLAMA, ids=[f"{n}x{k}" for n, k in LLAMA])
@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_llama_shapes_per_channel(mode, NK, M):
    N, K = NK
    g = gen(M * 7 + N + K)
    x = torch.randn(M, K, generator=g, device=DEV).to(torch.bfloat16)
    q, scale = make_weights(N, K, 0, g)
    bias = torch.randn(N, generator=g, device=DEV).to(torch.bfloat16) if M % 2 else None
    out = run_cuda(x, q, scale, bias, mode)
    check(out, x, q, scale, bias, mode, f"{mode} M={M} N={N} K={K}")


@pytest.mark.parametrize("M", [1, 16, 64])
@pytest.mark.parametrize("NK", LLAMA[:2], ids=[f"{n}x{k}" for n, k in LLAMA[:2]])
@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_llama_shapes_grouped(mode, NK, M):
    """GGUF Q8_0 groups of 32 (the grouped reference keeps [groups, M, N] partials: M kept small)."""
    N, K = NK
    g = gen(M + N + K + 1)
    x = torch.randn(M, K, generator=g, device=DEV).to(torch.bfloat16)
    q, scale = make_weights(N, K, 32, g)
    out = run_cuda(x, q, scale, None, mode)
    check(out, x, q, scale, None, mode, f"{mode} G=32 M={M} N={N} K={K}")


@pytest.mark.parametrize("w8a8_mma", [True, False], ids=["mma", "gemv"])
def test_w8a8_large_m_grouped_128(monkeypatch, w8a8_mma):
    """Tensor-core path with per-group flushes (G = 128) at a size that takes the 128x128 tiles (and the
    CUDA_W8A8_MMA = False fallback switch: the dp4a GEMV in row blocks)."""
    monkeypatch.setattr(importlib.import_module("llmkern.ops.int8_linear"), "CUDA_W8A8_MMA", w8a8_mma)
    g = gen(5)
    M, N, K = 512, 4096, 1024
    x = torch.randn(M, K, generator=g, device=DEV).to(torch.float16)
    q, scale = make_weights(N, K, 128, g)
    bias = torch.randn(N, generator=g, device=DEV)
    out = run_cuda(x, q, scale, bias, "w8a8")
    check(out, x, q, scale, bias, "w8a8", "w8a8 G=128 M=512")


# ------------------------------------------------------------------ odd shapes, layouts, dtypes

ODD = [(M, N, K, G) for M in (1, 3, 17, 100) for (N, K, G) in ((1, 64, 0), (33, 96, 32), (257, 256, 0),
                                                                   (33, 128, 64), (257, 4096, 32), (33, 96, 16))]
LAYOUTS = ("contig", "slice", "transposed")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
@pytest.mark.parametrize("i", range(len(ODD)), ids=[f"M{c[0]}_N{c[1]}_K{c[2]}_g{c[3]}" for c in ODD])
def test_odd_shapes(i, mode, dtype):
    M, N, K, G = ODD[i]
    g = gen(100 + i)
    layout = LAYOUTS[i % 3]
    if layout == "contig":
        x = torch.randn(M, K, generator=g, device=DEV).to(dtype)
    elif layout == "slice":  # last-dim stride 2
        x = torch.randn(M, 2 * K, generator=g, device=DEV).to(dtype)[:, ::2]
    else:  # stride (1, M)
        x = torch.randn(K, M, generator=g, device=DEV).to(dtype).t()
    q, scale = make_weights(N, K, G, g)
    bias = None
    if i % 2 == 0:
        bias = torch.randn(N, generator=g, device=DEV).to(dtype if i % 4 == 0 else torch.float32)
    out = run_cuda(x, q, scale, bias, mode)
    check(out, x, q, scale, bias, mode, f"{mode} {ODD[i]} {dtype}")


def test_leading_dims_and_offset_view():
    """[B, S, K] input, and a contiguous view whose start is not 16-byte aligned (the adapter copies)."""
    g = gen(9)
    q, scale = make_weights(257, 256, 32, g)
    x = torch.randn(2, 3, 256, generator=g, device=DEV).to(torch.bfloat16)
    for mode in ("w8a8", "w8a16"):
        out = run_cuda(x, q, scale, None, mode)
        check(out, x, q, scale, None, mode, f"{mode} [2,3,K]")
    flat = torch.randn(3 * 256 + 1, generator=g, device=DEV).to(torch.bfloat16)
    x = flat[1:].view(3, 256)  # 2-byte offset
    for mode in ("w8a8", "w8a16"):
        out = run_cuda(x, q, scale, None, mode)
        check(out, x, q, scale, None, mode, f"{mode} offset view")


@pytest.mark.parametrize("group", [0, 32])
@pytest.mark.parametrize("M", [1, 16, 33, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_w8a16_dequantize_then_matmul(dtype, M, group):
    """Against dequantize_int8 + float64 matmul on the same quantized weights (the kernel's own error)."""
    g = gen(M + group)
    w = torch.randn(1000, 512, generator=g, device=DEV)
    x = torch.randn(M, 512, generator=g, device=DEV).to(dtype)
    q, scale = ops.quantize_int8(w, group)
    ref = x.double() @ ops.dequantize_int8(q, scale).double().t()
    out = run_cuda(x, q, scale, None, "w8a16")
    err = rel_err(out, ref)
    assert err <= TOL[dtype], err


@pytest.mark.parametrize("cublas", [False, True], ids=["fused_mma", "dequant_cublas"])
@pytest.mark.parametrize("G", [0, 16, 32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_w8a16_prefill_routes(monkeypatch, dtype, G, cublas):
    """16-bit x with M > 16: the dequantizing mma kernel (64x128 and 128x128 tiles, K tails, N tails) and
    the dequantize + cuBLAS fallback switch."""
    monkeypatch.setattr(importlib.import_module("llmkern.ops.int8_linear"), "CUDA_PREFILL_CUBLAS", cublas)
    for M, N, K in ((17, 33, 96), (100, 257, 4096), (300, 1000, 512), (2048, 2048, 1024)):
        if G and K % G:
            continue
        g = gen(M + N + K + G)
        x = torch.randn(M, K, generator=g, device=DEV).to(dtype)
        q, scale = make_weights(N, K, G, g)
        bias = torch.randn(N, generator=g, device=DEV) if M % 2 == 0 else None
        out = run_cuda(x, q, scale, bias, "w8a16")
        check(out, x, q, scale, bias, "w8a16", f"prefill M={M} N={N} K={K} G={G}")
        ref = x.double() @ ops.dequantize_int8(q, scale).double().t()
        if bias is not None:
            ref = ref + bias.double()
        assert rel_err(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("decode_mma", [True, False], ids=["decode_mma", "gemv"])
@pytest.mark.parametrize("G", [0, 16, 32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_w8a16_decode_routes(monkeypatch, dtype, G, decode_mma):
    """16-bit x, M 2..16: the swap-AB tensor-core kernel (one or two 8-row mma column blocks, K % 64 tails of
    16/32/48, N not a multiple of 16) and the SIMT GEMV."""
    monkeypatch.setattr(importlib.import_module("llmkern.ops.int8_linear"), "CUDA_DECODE_MMA", decode_mma)
    for M, N, K in ((2, 33, 128), (3, 1, 80), (7, 100, 96), (8, 257, 4096), (9, 33, 112), (16, 4096, 4096),
                    (13, 14336, 4096), (5, 6144, 4096 + 48)):
        if G and K % G:
            continue
        g = gen(M * 1000 + N + K + G)
        x = torch.randn(M, K, generator=g, device=DEV).to(dtype)
        q, scale = make_weights(N, K, G, g)
        bias = torch.randn(N, generator=g, device=DEV).to(dtype) if M % 2 else None
        out = run_cuda(x, q, scale, bias, "w8a16")
        check(out, x, q, scale, bias, "w8a16", f"decode M={M} N={N} K={K} G={G}")


def test_nan_row_propagates():
    g = gen(3)
    x = torch.randn(20, 64, generator=g, device=DEV).to(torch.bfloat16)
    x[2, 5] = float("nan")
    q, scale = make_weights(17, 64, 32, g)
    for mode in ("w8a16", "w8a8"):
        for M in (4, 20):  # GEMV and tensor-core routes
            out = run_cuda(x[:M], q, scale, None, mode)
            assert torch.isnan(out[2]).all(), (mode, M)
            rest = torch.cat([out[:2], out[3:]])
            assert torch.isfinite(rest).all(), (mode, M)


def test_unsupported_k_falls_back():
    """K not a multiple of 16: the cuda backend declines, strict mode says so, the default dispatch falls back."""
    g = gen(4)
    x = torch.randn(3, 40, generator=g, device=DEV).to(torch.bfloat16)
    q, scale = make_weights(17, 40, 0, g)
    with ops.strict(), pytest.raises(RuntimeError, match="multiple of 16"):
        ops.int8_linear(x, q, scale, mode="w8a8", backend="cuda")
    out = ops.int8_linear(x, q, scale, mode="w8a8")
    assert ops.OPS["int8_linear"].last_backend != "cuda"
    assert rel_err(out, R.int8_linear(x, q, scale, None, "w8a8")) <= TOL[torch.bfloat16]


# ------------------------------------------------------------------ activation quantization, bit for bit


def _quant_cuda(x2):
    mod = _backends.cuda_module()
    M, K = x2.shape
    xq = torch.full((M, K), 99, dtype=torch.int8, device=DEV)
    xs = torch.full((M,), 12345.0, dtype=torch.float32, device=DEV)
    code = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[x2.dtype]
    mod.int8_quantize_rows(x2.data_ptr(), code, x2.stride(0), M, K, xq.data_ptr(), K, xs.data_ptr(),
                           torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    return xq, xs


@pytest.mark.parametrize("K", [300, 304], ids=["scalar", "vector"])  # K % 8 == 0: 8-wide loads
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_quantize_rows_bit_exact(dtype, K):
    g = torch.Generator().manual_seed(1)
    rows = [torch.randn(K, generator=g) * s for s in (1.0, 1e-3, 1e3, 3e-5, 60000.0)]
    rows.append(torch.zeros(K))
    ties = torch.randn(K, generator=g)
    ties[:8] = torch.tensor([127.0, 2.5, 3.5, -2.5, -3.5, 0.5, -0.5, 1.5])  # amax 127: inv = 1, exact ties
    rows.append(ties)
    if dtype == torch.float32:
        rows.append(torch.randn(K, generator=g) * 1e-39)  # subnormal amax: 127 / amax overflows to inf
    inf_row = torch.randn(K, generator=g)
    inf_row[7] = float("inf")
    rows.append(inf_row)
    nan_row = torch.randn(K, generator=g)
    nan_row[9] = float("nan")
    rows.append(nan_row)
    x = torch.stack(rows).to(dtype)
    q_ref, s_ref = ops.quantize_rows_int8(x)  # reference, on the CPU
    q, s = _quant_cuda(x.to(DEV))
    assert torch.equal(q.cpu(), q_ref)
    assert torch.equal(s.cpu().isnan(), s_ref.isnan())
    ok = ~s_ref.isnan()
    assert torch.equal(s.cpu()[ok], s_ref[ok])


def test_quantize_rows_bit_exact_random_many():
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(257, 4096, generator=g) * torch.rand(257, 1, generator=g) * 10).to(torch.bfloat16)
    q_ref, s_ref = ops.quantize_rows_int8(x)
    q, s = _quant_cuda(x.to(DEV))
    assert torch.equal(q.cpu(), q_ref)
    assert torch.equal(s.cpu(), s_ref)


# ------------------------------------------------------------------ CUDA graphs


@pytest.mark.parametrize("M,mode,G", [(1, "w8a16", 0), (4, "w8a8", 32), (64, "w8a8", 0), (64, "w8a16", 32)])
def test_cuda_graph_capture(M, mode, G):
    g = gen(M)
    N, K = 512, 1024
    q, scale = make_weights(N, K, G, g)
    bias = torch.randn(N, generator=g, device=DEV).to(torch.bfloat16)
    x = torch.randn(M, K, generator=g, device=DEV).to(torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm up outside the graph (allocator, lazy module loading)
            ops.int8_linear(x, q, scale, bias, mode=mode, backend="cuda")
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with ops.strict(), torch.cuda.graph(graph):
        y = ops.int8_linear(x, q, scale, bias, mode=mode, backend="cuda")
    assert ops.OPS["int8_linear"].last_backend == "cuda"
    x.copy_(torch.randn(M, K, generator=g, device=DEV).to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    eager = run_cuda(x, q, scale, bias, mode)
    assert torch.equal(y, eager)  # no atomics anywhere: replay == eager bit for bit
    check(y, x, q, scale, bias, mode, f"graph {mode} M={M}")


# ------------------------------------------------------------------ the sm_90a W8A8 GEMM (TMA + wgmma)

@pytest.fixture
def sm90(monkeypatch):
    """CUDA_W8A8_WGMMA (LLMKERN_CUDA_INT8_WGMMA, read at import) for one test; skipped off compute
    capability 9.0. Yields the module, whose _last_cuda_path says which kernel ran."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sm_90a W8A8 GEMM needs a compute-capability-9.0 GPU (H100/H200)")
    mod = importlib.import_module("llmkern.ops.int8_linear")
    monkeypatch.setattr(mod, "CUDA_W8A8_WGMMA", True)
    return mod


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("MNK", [(17, 33, 96), (128, 256, 128), (129, 257, 4096), (1024, 4096, 4096),
                                 (300, 14336, 4096), (2048, 4096, 14336)], ids=lambda s: "x".join(map(str, s)))
def test_sm90_w8a8_matches_mma_sync_bitwise(sm90, monkeypatch, MNK, dtype):
    """Same int32 sums (exact) and the same epilogue operations as w8a8_mma_kernel: the same bits. M, N and
    K tails (zero-filled by the TMA), K not a multiple of the 128-k tile, fp32 / 16-bit outputs, a bias."""
    M, N, K = MNK
    g = gen(M + N + K)
    x = torch.randn(M, K, generator=g, device=DEV).to(dtype)
    q, scale = make_weights(N, K, 0, g)
    bias = torch.randn(N, generator=g, device=DEV) if M % 2 else None
    out = run_cuda(x, q, scale, bias, "w8a8")
    assert sm90._last_cuda_path == "w8a8_wgmma"
    check(out, x, q, scale, bias, "w8a8", f"wgmma M={M} N={N} K={K}")
    monkeypatch.setattr(sm90, "CUDA_W8A8_WGMMA", False)
    want = run_cuda(x, q, scale, bias, "w8a8")
    assert sm90._last_cuda_path.startswith("w8a8_mma")
    assert torch.equal(out, want), "the wgmma and mma.sync GEMMs differ"


def test_sm90_w8a8_grouped_and_small_m_take_other_kernels(sm90):
    g = gen(31)
    x = torch.randn(64, 256, generator=g, device=DEV).to(torch.bfloat16)
    q, scale = make_weights(128, 256, 64, g)
    run_cuda(x, q, scale, None, "w8a8")
    assert sm90._last_cuda_path.startswith("w8a8_mma")  # grouped scales: the mma.sync kernel's flushes
    q, scale = make_weights(128, 256, 0, g)
    run_cuda(x[:16], q, scale, None, "w8a8")
    assert sm90._last_cuda_path == "w8a8_gemv"


def test_sm90_w8a8_cuda_graph_capture(sm90):
    g = gen(32)
    x = torch.randn(512, 1024, generator=g, device=DEV).to(torch.bfloat16)
    q, scale = make_weights(2048, 1024, 0, g)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.int8_linear(x, q, scale, None, mode="w8a8", backend="cuda")
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.int8_linear(x, q, scale, None, mode="w8a8", backend="cuda")
    assert sm90._last_cuda_path == "w8a8_wgmma"
    x.normal_()
    graph.replay()
    torch.cuda.synchronize()
    check(out, x, q, scale, None, "w8a8", "graph replay")

@pytest.mark.parametrize("mode", ["w8a16", "w8a8"])
def test_module_prepared_run(mode):
    """Int8Linear on the GPU: after its first call (the op) the module runs the cuda preparer's bound run, which
    gives the op's bits (bf16 bias converted once), at decode and prefill sizes and inside a CUDA graph."""
    from llmkern.nn import Int8Linear

    g = gen(11)
    N, K = 4096, 4096
    q, scale = make_weights(N, K, 0, g)
    m = Int8Linear.from_quantized(q, scale, torch.randn(N, generator=g, device=DEV).to(torch.bfloat16), mode=mode,
                                  backend="cuda")
    for M in (1, 7, 300):
        x = torch.randn(M, K, generator=g, device=DEV).to(torch.bfloat16)
        first = m(x)
        assert m._run is not None and m._run.backend == "cuda"
        out = m(x)
        assert torch.equal(out, first) and torch.equal(out, run_cuda(x, q, scale, m.bias, mode))
        check(out, x, q, scale, m.bias, mode, f"module M={M}")
    replayed, eager = graph_replay(m, x, torch.randn(x.shape, generator=g, device=DEV).to(torch.bfloat16))
    assert torch.equal(replayed, eager)

