"""int8_linear's CUDA kernels (csrc/cuda/int8_linear.cu: the W8A16 / W8A8 GEMVs, the W8A8 row quantization,
the decode-sized W8A16 mma.sync kernel (decode_mma.cuh), the dequantizing W8A16 mma.sync GEMM (wdq_gemm.cuh),
the W8A8 mma.sync m16n8k32 GEMM with 64x128 and 128x128 tiles, and the sm_90a W8A8 wgmma GEMM) run on the CPU
through the CUDA emulator (include/llmkern/cuda/sm80.cuh: cp.async, ldmatrix and mma.sync from the PTX ISA;
sm90.cuh: TMA and wgmma): the real adapter (llmkern.ops.int8_linear._cuda, its module switches, the SM count
that picks the tile shape), binding, launcher and kernels, on every route with tails in M, N and K, per-channel
and grouped scales, against llmkern.reference (DESIGN.md tolerances) and, as tests/ops/test_int8_linear_cuda.py
does on the GPU, exactly where the kernels are exact. Outputs start as NaN (an unwritten element fails)."""
import shutil

import pytest
import torch

from llmkern import reference as R
from _linear_emu import TOL, Adapter, assert_rounded_from, rel_err

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA emulator is built with g++")


@pytest.fixture(scope="module")
def lin():
    import build_emu

    emu = build_emu.load(ops=("int8_linear",), sources=["csrc/cuda/int8_linear_sm90.cu"], name="_C_cuda_emu_int8_linear")
    return Adapter(emu, "int8_linear")


def make(M, N, K, G, dtype, seed, bias=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    q = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    scale = torch.rand((N,) if G == 0 else (N, K // G), generator=g) * 0.02 + 1e-3
    b = torch.randn(N, generator=g) if bias else None
    return x, q, scale, b


def check(lin, x, q, scale, bias, mode, path, exact=True, **kw):
    out = lin(x, q, scale, bias, mode, **kw)
    assert lin.path == path, (lin.path, path)
    assert out.dtype == x.dtype and out.shape == x.shape[:-1] + (q.shape[0],)
    ref = R.int8_linear(x, q, scale, bias, mode)
    err = rel_err(out, ref)
    assert err <= TOL[x.dtype], f"{path}: rel err {err}"
    if exact and mode == "w8a8" and scale.dim() == 1 and bias is None and x.dtype != torch.float32:
        # exact int32 sums: every element within one ulp of the exact value (tests/ops/test_int8_linear_cuda.py)
        assert_rounded_from(out, R.int8_linear(x.double(), q, scale, None, mode), path)
    return out


# (M, N, K): M tails of the 16-row fragments, N not a multiple of 8 / 16 / 128, K tails of the 64-byte stage
# (K % 64 = 16, 32, 48).
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("G", [0, 16, 32])
def test_w8a16_gemv(lin, dtype, G):
    """M = 1 (any dtype), fp32 x at any M (row blocks of 1, 2, 4, 8; M 20 = 8 + 8 + 4), and 16-bit x at M 2..16
    with CUDA_DECODE_MMA off."""
    for M, N, K in ((1, 33, 96), (3, 20, 80), (20, 17, 112), (6, 9, 128)):
        if G and K % G:
            continue
        if dtype != torch.float32 and M > 1:
            if M > 16:
                continue
            check(lin, *make(M, N, K, G, dtype, M + N + K + G, bias=True), "w8a16", "w8a16_gemv", CUDA_DECODE_MMA=False)
        else:
            check(lin, *make(M, N, K, G, dtype, M + N + K + G, bias=M % 2 == 1), "w8a16", "w8a16_gemv")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("G", [0, 16, 64])
def test_w8a16_decode_mma(lin, dtype, G):
    """2 <= M <= 16 on the swap-AB m16n8k16 kernel: one 8-row column block (M <= 8) or two (9..16), K tails
    of 16 / 32 / 48 in the 64-k blocks, 8 warps interleaving blocks (K 1088: 17 blocks), N % 16 != 0."""
    for M, N, K in ((2, 33, 128), (7, 100, 80), (8, 17, 1088), (9, 33, 112), (16, 40, 192)):
        if G and K % G:
            continue
        check(lin, *make(M, N, K, G, dtype, M * 100 + N + K + G, bias=M % 2 == 1), "w8a16", "w8a16_decode_mma")


@pytest.mark.parametrize("sms", [132, 1], ids=["tiles64x128", "tiles128x128"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("G", [0, 16, 32])
def test_w8a16_mma_gemm(lin, dtype, G, sms):
    """M > 16: the dequantizing m16n8k16 GEMM, 64 x 128 tiles (4 warps) or, when 128 x 128 tiles fill the
    GPU (num_sms from the adapter), 128 x 128 (8 warps); M, N tails and K % 32 = 16 (a half stage)."""
    for M, N, K in ((17, 33, 96), (130, 136, 208)):
        if G and K % G:
            continue
        check(lin, *make(M, N, K, G, dtype, M + N + K + G, bias=M % 2 == 0), "w8a16", "w8a16_mma", num_sms=sms)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("G", [0, 16, 32])
def test_w8a8_gemv(lin, dtype, G):
    """W8A8 at M <= 16 (quantize rows, then the dp4a GEMV per channel / per group), grouped G % 32 != 0 at
    M > 16, and M > 16 with CUDA_W8A8_MMA off."""
    for M, N, K in ((1, 33, 96), (5, 17, 80), (16, 20, 64)):
        if G and K % G:
            continue
        check(lin, *make(M, N, K, G, dtype, M + N + K + G, bias=M == 5), "w8a8", "w8a8_gemv")
    x, q, s, b = make(20, 17, 96, G, dtype, 7 + G)
    check(lin, x, q, s, b, "w8a8", "w8a8_gemv", CUDA_W8A8_MMA=False)
    if G == 16:
        check(lin, x, q, s, b, "w8a8", "w8a8_gemv")


@pytest.mark.parametrize("sms", [132, 1], ids=["tiles64x128", "tiles128x128"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("G", [0, 32, 64])
def test_w8a8_mma_gemm(lin, dtype, G, sms):
    """M > 16 on the m16n8k32 s8 GEMM: 64 x 128 or 128 x 128 tiles, per channel (exact int32 sums: one ulp
    of the exact result) or per group (int32 sums flushed into fp32 at every group end), M and N tails,
    K % 64 = 32 (a half stage), 3-stage ring over 4 k tiles."""
    tiles = "w8a8_mma_64x128" if sms > 1 else "w8a8_mma_128x128"
    for M, N, K in ((17, 33, 96), (130, 136, 256)):
        if G and K % G:
            continue
        check(lin, *make(M, N, K, G, dtype, M + N + K + G, bias=M == 17), "w8a8", tiles, num_sms=sms)


@pytest.mark.parametrize("sms", [132, 1], ids=["tiles64x128", "tiles128x128"])
def test_cp_async_delivered_at_issue(lin, monkeypatch, sms):
    """The tensor-core GEMMs with LLMKERN_EMU_CP_ASYNC=eager (copies land when issued: a stage refilled while
    another warp still reads it would be overwritten): 6 k tiles through the 3-stage ring."""
    monkeypatch.setenv("LLMKERN_EMU_CP_ASYNC", "eager")
    x, q, s, b = make(70, 136, 384, 64, torch.bfloat16, 11, bias=True)
    check(lin, x, q, s, b, "w8a8", "w8a8_mma_64x128" if sms > 1 else "w8a8_mma_128x128", num_sms=sms)
    check(lin, x, q, s[:, 0].contiguous(), b, "w8a8", "w8a8_mma_64x128" if sms > 1 else "w8a8_mma_128x128",
          num_sms=sms)
    check(lin, x, q, s, b, "w8a16", "w8a16_mma", num_sms=sms)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_w8a8_wgmma_matches_mma_sync_bitwise(lin, dtype):
    """CUDA_W8A8_WGMMA: per-channel W8A8 with M > 16 on the sm_90a GEMM (the emulated device is
    compute capability 9.0): the same exact int32 sums and epilogue as the mma.sync GEMM, so the same bits;
    grouped scales still take the mma.sync kernel."""
    for M, N, K, bias in ((17, 33, 96, False), (130, 260, 320, True)):
        x, q, s, b = make(M, N, K, 0, dtype, M + N, bias=bias)
        a = check(lin, x, q, s, b, "w8a8", "w8a8_wgmma", CUDA_W8A8_WGMMA=True)
        c = check(lin, x, q, s, b, "w8a8", "w8a8_mma_64x128")
        assert torch.equal(a, c), "the wgmma and mma.sync GEMMs differ"
    check(lin, *make(40, 33, 128, 32, dtype, 3), "w8a8", "w8a8_mma_64x128", CUDA_W8A8_WGMMA=True)


def test_w8a8_gemv_and_mma_agree(lin):
    """Per channel both W8A8 routes sum the same int32 products exactly and scale them the same way."""
    x, q, s, _ = make(24, 40, 192, 0, torch.bfloat16, 5)
    a = check(lin, x, q, s, None, "w8a8", "w8a8_mma_64x128")
    b = check(lin, x, q, s, None, "w8a8", "w8a8_gemv", CUDA_W8A8_MMA=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("K", [40, 64, 1000])
def test_quantize_rows_bit_exact(lin, dtype, K):
    """The W8A8 row quantization alone (vector and scalar paths, exact ties, a NaN row, a zero row) against
    quantize_rows_int8 bit for bit."""
    g = torch.Generator().manual_seed(K)
    x = torch.randn(5, K, generator=g).to(dtype) * 3
    x[1, :8] = torch.tensor([127.0, 2.5, 3.5, -2.5, -3.5, 0.5, -0.5, 1.5])
    x[1, 8:] = 0
    x[2] = 0
    x[3, 7] = float("nan")
    xq = torch.full((5, K), 99, dtype=torch.int8)
    xs = torch.full((5,), -1.0)
    code = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[dtype]
    lin.emu.int8_quantize_rows(x.data_ptr(), code, K, 5, K, xq.data_ptr(), K, xs.data_ptr(), 0)
    q_ref, s_ref = R.quantize_rows_int8(x)
    assert torch.equal(xq, q_ref)
    assert torch.equal(xs.isnan(), s_ref.isnan()) and torch.equal(xs[~xs.isnan()], s_ref[~s_ref.isnan()])


@pytest.mark.parametrize("mode", ["w8a16", "w8a8"])
def test_nan_row_stays_in_its_row(lin, mode):
    """A NaN in one row of x reaches that row of the output only (tensor-core tiles, fragments, GEMVs)."""
    for M, sms in ((5, 132), (40, 132), (40, 1)):
        x, q, s, _ = make(M, 136, 128, 32, torch.float16, M)
        x[2, 5] = float("nan")
        out = lin(x, q, s, None, mode, num_sms=sms)
        assert torch.isnan(out[2]).all(), lin.path
        assert torch.isfinite(torch.cat([out[:2], out[3:]])).all(), lin.path


def test_strided_and_batched_x(lin):
    """[B, S, K] input and a strided view (the adapter copies it to aligned rows)."""
    _, q, s, _ = make(1, 40, 128, 32, torch.bfloat16, 9)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 12, 128, generator=g).to(torch.bfloat16)
    check(lin, x, q, s, None, "w8a8", "w8a8_mma_64x128")
    check(lin, x, q, s, None, "w8a16", "w8a16_mma")
    x = torch.randn(20, 256, generator=g).to(torch.float16)[:, ::2]
    check(lin, x, q, s, None, "w8a16", "w8a16_mma")


@pytest.mark.parametrize("mode", ["w8a16", "w8a8"])
def test_prepared_run_equals_the_op(lin, mode):
    """Int8Linear's prepared CUDA call (`_cuda_prepare`: the weights bound once, a bf16 bias converted to fp32
    once) gives the op's bits on every route: GEMV (M 1), decode mma / dp4a GEMV (M 5, [B, S, K]), GEMM (M 40),
    fp32 x; weights the kernels cannot take (K % 16 != 0) are refused at preparation, before any call."""
    from llmkern.ops._registry import BackendUnsupported

    _, q, scale, _ = make(1, 40, 160, 32, torch.bfloat16, 7)
    bias = torch.randn(40).to(torch.bfloat16)
    run = lin.prepare(q, scale, bias, mode)
    for shape, dtype in (((1, 160), torch.bfloat16), ((5, 160), torch.bfloat16), ((2, 3, 160), torch.float16),
                         ((40, 160), torch.bfloat16), ((3, 160), torch.float32)):
        x = torch.randn(shape).to(dtype)
        out = run(x)
        path = lin.path
        assert torch.equal(out, lin(x, q, scale, bias, mode)) and lin.path == path, (shape, dtype, path)
        assert rel_err(out, R.int8_linear(x, q, scale, bias, mode)) <= TOL[dtype]
    with pytest.raises(BackendUnsupported, match="K=72"):
        lin.prepare(torch.zeros(8, 72, dtype=torch.int8), torch.ones(8), None, mode)
    # Not under CUDA graph capture: its fp32 bias copy would only be made at replay (the module keeps the op).
    with pytest.raises(BackendUnsupported, match="captured"):
        lin.prepare(q, scale, bias, mode, capturing=True)


@pytest.mark.parametrize("sms", [132, 1], ids=["tiles64x128", "tiles128x128"])
def test_w8a16_mma_gemm_reads_no_x_past_k(lin, sms):
    """x rows inside wider rows whose columns past K are NaN (K % 32 = 16: the last k tile's second half lies past
    K): the GEMM's x copies stop at K (a copy of [K, K + 16) would put NaN into the products with the zero weights
    there)."""
    M, N, K = 40, 72, 208
    x, q, s, b = make(M, N, K, 16, torch.bfloat16, 5)
    wide = torch.full((M, K + 48), float("nan"), dtype=torch.bfloat16)
    wide[:, :K] = x
    out = check(lin, wide[:, :K], q, s, b, "w8a16", "w8a16_mma", num_sms=sms)
    assert torch.equal(out, lin(x, q, s, b, "w8a16", num_sms=sms))
