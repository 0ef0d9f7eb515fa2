"""int4_linear's CUDA kernels (csrc/cuda/int4_linear.cu: the W4A16 GEMV with and without split-K, the
decode-sized mma.sync kernel (decode_mma.cuh) with and without split-K, the dequantizing mma.sync GEMM
(wdq_gemm.cuh) with 64x128 and 128x128 tiles, and the sm_90a wgmma GEMM (wgmma_int4.cuh: cp.async + wgmma))
run on the CPU through the CUDA emulator (include/llmkern/cuda/sm80.cuh, sm90.cuh): the real adapter
(llmkern.ops.int4_linear._cuda with its module switches, the SM count that picks splits and tiles, and the
sm_90 check standing in for the emulated compute-capability-9.0 device), binding, launcher and kernels, on
every route, groups 32 / 64 / 128, tails in M, N and K, against llmkern.reference and dequantize-then-matmul
in float64 (tests/ops/test_int4_linear_cuda.py's checks). Outputs start as NaN."""
import shutil

import pytest
import torch

from llmkern import reference as R
from _linear_emu import TOL, Adapter, make_int4 as make, rel_err

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA emulator is built with g++")


@pytest.fixture(scope="module")
def lin():
    import build_emu

    return Adapter(build_emu.load(ops=("int4_linear",), name="_C_cuda_emu_int4_linear"), "int4_linear")


def check(lin, x, qw, s, o, bias, path, **kw):
    out = lin(x, qw, s, o, bias, "w4a16", **kw)
    assert lin.path == path, (lin.path, path)
    assert out.dtype == x.dtype and out.shape == x.shape[:-1] + (qw.shape[0],)
    err = rel_err(out, R.int4_linear(x, qw, s, o, bias))
    assert err <= TOL[x.dtype], f"{path}: rel err {err}"
    y = x.reshape(-1, x.shape[-1]).double() @ R.dequantize_int4(qw, s, o).double().t()
    if bias is not None:
        y = y + bias.double()
    err2 = rel_err(out.reshape(y.shape), y)
    assert err2 <= TOL[x.dtype], f"{path}: rel err vs dequantize-then-matmul {err2}"
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("G", [32, 64, 128])
def test_gemv(lin, dtype, G):
    """M = 1 (any dtype), fp32 x at any M (row blocks; M 20 = 8 + 8 + 4), 16-bit M 2..16 with CUDA_DECODE_MMA
    off; N = 20 over 132 SMs at K 2048: split-K (2 splits) with the fixed-order reduction."""
    for M, N, K in ((1, 33, 256), (3, 9, 384), (20, 17, 128)):
        if K % G:
            continue
        if dtype != torch.float32 and M > 1:
            if M <= 16:
                check(lin, *make(M, N, K, G, dtype, M + N + K + G, bias=True), "gemv", CUDA_DECODE_MMA=False)
            continue
        check(lin, *make(M, N, K, G, dtype, M + N + K + G, bias=M % 2 == 1), "gemv")
    x, qw, s, o, b = make(1, 20, 2048, G, dtype, G, bias=True)
    a = check(lin, x, qw, s, o, b, "gemv_splitk")
    assert torch.equal(a, lin(x, qw, s, o, b, "w4a16"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("G", [32, 64, 128])
def test_decode_mma(lin, dtype, G):
    """2 <= M <= 16 on the swap-AB m16n8k16 kernel: one or two 8-row column blocks, K tails of 32 / 64 / 96 in
    the 128-k blocks, N % 16 != 0; N = 20 at K 4096: split-K (2 splits, 16 blocks each over 8 warps)."""
    for M, N, K in ((2, 33, 160), (8, 17, 192), (9, 33, 224), (16, 20, 384)):
        if K % G:
            continue
        check(lin, *make(M, N, K, G, dtype, M * 100 + N + K + G, bias=M % 2 == 0), "decode_mma")
    for M in (4, 12):
        x, qw, s, o, b = make(M, 20, 4096, G, dtype, M + G, bias=True)
        a = check(lin, x, qw, s, o, b, "decode_mma_splitk")
        assert torch.equal(a, lin(x, qw, s, o, b, "w4a16"))


@pytest.mark.parametrize("sms", [132, 1], ids=["tiles64x128", "tiles128x128"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("G", [32, 64, 128])
def test_mma_gemm(lin, dtype, G, sms):
    """M > 16: the dequantizing m16n8k16 GEMM, 64 x 128 tiles (4 warps) or 128 x 128 (8 warps) when they fill
    the GPU; M and N tails, 3-stage ring over several 32-k tiles."""
    for M, N, K in ((17, 33, 128), (130, 136, 192)):
        if K % G:
            continue
        check(lin, *make(M, N, K, G, dtype, M + N + K + G, bias=M % 2 == 0), "mma", num_sms=sms, CUDA_INT4_WGMMA=False)


@pytest.mark.parametrize("sms", [132, 1], ids=["tiles64x128", "tiles128x128"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("G", [32, 64, 128])
def test_wgmma_gemm(lin, dtype, G, sms):
    """CUDA_INT4_WGMMA on the (emulated) compute-capability-9.0 device: the sm_90a GEMM, one warpgroup (64 x 128
    tiles) or two (128 x 128), K % 64 = 32 (a half stage), 3-stage ring; it agrees closely with the mma.sync
    GEMM (same dequantized tiles, fp32 sums in another order)."""
    for M, N, K in ((17, 33, 96), (130, 136, 384)):
        if K % G:
            continue
        x, qw, s, o, b = make(M, N, K, G, dtype, M + N + K + G + 5, bias=M % 2 == 0)
        a = check(lin, x, qw, s, o, b, "wgmma", num_sms=sms, CUDA_INT4_WGMMA=True)
        c = check(lin, x, qw, s, o, b, "mma", num_sms=sms, CUDA_INT4_WGMMA=False)
        assert rel_err(a, c) <= 4e-3


def test_gemm_splits_rule(lin):
    """int4_linear_gemm_splits: split K only when the output tiles leave SMs without one, to about two CTAs per
    SM, at least 256 k per split, at most 16 splits, none empty."""
    f = lin.emu.int4_linear_gemm_splits
    assert f(64, 4096, 14336, 132) == 9      # 32 tiles of 64 x 128: the first GPU run's slowest M = 64 shape
    assert f(64, 14336, 4096, 132) == 3      # 112 tiles
    assert f(256, 4096, 4096, 132) == 3      # 128 tiles of 64 rows (the 128-row ones would be 64)
    assert f(1024, 4096, 14336, 132) == 1    # 256 tiles of 128 x 128
    assert f(17, 33, 96, 132) == 1           # K too short to split
    assert f(17, 33, 1024, 132) == 4 and f(17, 33, 1568, 132) == 5  # 16 / 25 units of 64 k: 4 / 5 units each
    assert f(512, 576, 576, 132) == 2 and f(512, 576, 1536, 132) == 6  # SmolLM2's prefill layers (40 tiles)
    assert f(17, 33, 1 << 20, 1) == 1 and f(17, 33, 1 << 20, 132) == 16


@pytest.mark.parametrize("wgmma", [False, True], ids=["mma", "wgmma"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("G", [32, 64, 128])
def test_gemm_splitk(lin, dtype, G, wgmma):
    """M > 16 whose tiles leave SMs idle: K split over 5 CTAs per tile (K 1568 = 24.5 64-k units at G 32, 5 units
    a split: the last one ends in a half wgmma stage) or 6 (K 1536), fp32 partials in the poisoned workspace summed in a
    fixed order with the bias: within tolerance of the reference and close to the unsplit GEMM, the same bits
    on a second run; CUDA_GEMM_SPLITK off gives the unsplit GEMM."""
    K = 1568 if G == 32 else 1536
    name = "wgmma" if wgmma else "mma"
    for M, N in ((40, 33), (70, 136)):
        x, qw, s, o, b = make(M, N, K, G, dtype, M + N + G, bias=M == 40)
        a = check(lin, x, qw, s, o, b, name + "_splitk", CUDA_INT4_WGMMA=wgmma)
        assert torch.equal(a, lin(x, qw, s, o, b, "w4a16", CUDA_INT4_WGMMA=wgmma))
        c = check(lin, x, qw, s, o, b, name, CUDA_INT4_WGMMA=wgmma, CUDA_GEMM_SPLITK=False)
        assert rel_err(a, c) <= 4e-3


@pytest.mark.parametrize("sms", [132, 1], ids=["tiles64x128", "tiles128x128"])
def test_cp_async_delivered_at_issue(lin, monkeypatch, sms):
    """The tensor-core GEMMs with LLMKERN_EMU_CP_ASYNC=eager (copies land when issued: a stage refilled while
    another warp still reads it would be overwritten): several k tiles through the 3-stage rings."""
    monkeypatch.setenv("LLMKERN_EMU_CP_ASYNC", "eager")
    x, qw, s, o, b = make(70, 136, 384, 64, torch.float16, 11, bias=True)
    check(lin, x, qw, s, o, b, "mma", num_sms=sms, CUDA_INT4_WGMMA=False)
    check(lin, x, qw, s, o, b, "wgmma", num_sms=sms, CUDA_INT4_WGMMA=True)


def test_wgmma_needs_sm90(lin):
    """The adapter asks for the wgmma kernel only on compute capability 9.0 (there by default since the first GPU
    run: CUDA_INT4_WGMMA); elsewhere the mma.sync one runs."""
    check(lin, *make(20, 33, 128, 32, torch.bfloat16, 1), "mma", CUDA_INT4_WGMMA=True, is_sm90=False)
    check(lin, *make(20, 33, 128, 32, torch.bfloat16, 1), "wgmma")  # (the default switch, sm_90)


@pytest.mark.parametrize("wgmma", [False, True])
def test_nan_row_stays_in_its_row(lin, wgmma):
    for M, sms in ((5, 132), (40, 132), (40, 1)):
        x, qw, s, o, _ = make(M, 136, 128, 64, torch.bfloat16, M)
        x[2, 5] = float("nan")
        out = lin(x, qw, s, o, None, "w4a16", num_sms=sms, CUDA_INT4_WGMMA=wgmma)
        assert torch.isnan(out[2]).all(), lin.path
        assert torch.isfinite(torch.cat([out[:2], out[3:]])).all(), lin.path


def test_strided_and_batched_x(lin):
    _, qw, s, o, _ = make(1, 40, 256, 64, torch.bfloat16, 9)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 12, 256, generator=g).to(torch.bfloat16)
    check(lin, x, qw, s, o, None, "mma", CUDA_INT4_WGMMA=False)
    check(lin, x, qw, s, o, None, "wgmma", CUDA_INT4_WGMMA=True)
    x = torch.randn(3, 512, generator=g).to(torch.float16)[:, ::2]
    check(lin, x, qw, s, o, None, "decode_mma")
