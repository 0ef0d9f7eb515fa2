"""The sm_90a W8A8 GEMM (csrc/include/llmkern/cuda/int8_linear_sm90.cuh: TMA, a 4-stage mbarrier ring, wgmma
m64n256k32 s8.s8.s32 with one group in flight) and its launcher, run on the CPU through the CUDA emulator,
against exact integer products rescaled as the kernel's epilogue does. Both TMA timings of the emulator.
The GPU tests (tests/ops/test_int8_linear_cuda.py -k sm90) compare it bit for bit with the mma.sync GEMM."""
import shutil

import pytest
import torch

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA emulator is built with g++")

CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@pytest.fixture(scope="module")
def emu():
    import build_emu

    return build_emu.load(ops=(), sources=["csrc/cuda/int8_linear_sm90.cu", "tests/cuda_emu/int8_sm90_emu_bind.cpp"],
                          binds=["int8_sm90_emu"], name="_C_cuda_emu_int8")


def _expected(xq, xs, w, scale, bias, dtype):
    """The epilogue on exact int32 sums: float(acc) * (xs * scale) (+ bias), rounded once to dtype."""
    acc = (xq.long() @ w.long().T).to(torch.int32)  # [M, N], exact (|sum| < 2^31 here)
    y = acc.float() * (xs[:, None] * scale[None, :])
    if bias is not None:
        y = y + bias[None, :]
    return y.to(dtype)


@pytest.mark.parametrize("tma", ["lazy", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("MNK", [(1, 1, 16), (17, 33, 96), (130, 260, 640), (64, 300, 1040)],
                         ids=lambda s: "x".join(map(str, s)))
def test_matches_exact_integer_products(emu, monkeypatch, MNK, dtype, tma):
    """M / N tails of the 128 x 256 tile, K tails of the 128-k tile (zeros from the TMA), 5 and 9 k tiles
    (the 4-stage ring wraps), with and without bias; every output element written (NaN poison)."""
    monkeypatch.setenv("LLMKERN_EMU_TMA", tma)
    M, N, K = MNK
    g = torch.Generator().manual_seed(M + N + K)
    xq = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    xs = torch.rand(M, generator=g) * 0.01 + 1e-3
    scale = torch.rand(N, generator=g) * 0.02 + 1e-3
    bias = torch.randn(N, generator=g) if M % 2 else None
    out = torch.full((M, N), float("nan"), dtype=dtype)
    assert emu.w8a8_sm90(xq.data_ptr(), K, xs.data_ptr(), w.data_ptr(), scale.data_ptr(),
                         0 if bias is None else bias.data_ptr(), out.data_ptr(), N, CODE[dtype], M, N, K)
    assert torch.equal(out, _expected(xq, xs, w, scale, bias, dtype))


def test_refuses_what_the_tma_cannot_describe(emu):
    xq = torch.zeros(4, 24, dtype=torch.int8)
    w = torch.zeros(8, 24, dtype=torch.int8)
    f = torch.ones(8)
    out = torch.empty(4, 8)
    # K = 24: rows of 24 bytes are not 16-byte multiples -> False (the caller runs the mma.sync GEMM)
    assert not emu.w8a8_sm90(xq.data_ptr(), 24, f.data_ptr(), w.data_ptr(), f.data_ptr(), 0, out.data_ptr(), 8, 0,
                             4, 8, 24)


def test_many_ring_wraps(emu):
    """K = 4096: 32 k tiles through the 4-stage ring (8 wraps of every full / empty barrier's parity)."""
    M, N, K = 130, 300, 4096
    g = torch.Generator().manual_seed(7)
    xq = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    xs = torch.rand(M, generator=g) * 0.01 + 1e-3
    scale = torch.rand(N, generator=g) * 0.02 + 1e-3
    out = torch.full((M, N), float("nan"), dtype=torch.bfloat16)
    assert emu.w8a8_sm90(xq.data_ptr(), K, xs.data_ptr(), w.data_ptr(), scale.data_ptr(), 0, out.data_ptr(), N, 1,
                         M, N, K)
    assert torch.equal(out, _expected(xq, xs, w, scale, None, torch.bfloat16))
