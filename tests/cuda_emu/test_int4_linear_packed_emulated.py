"""int4_linear's prepacked CUDA path (csrc/include/llmkern/cuda/int4_linear_packed.cuh: the packing kernels and
the decode-sized tensor-core kernel that reads their layout) on the CPU through the CUDA emulator: the packed
bytes against a layout written here from the header's description, the kernel through the binding (M 1..16, both
8-row blocks, every group size, K % 128 tails, N tails, fp32 and fp16 scale storage, split-K, strided rows, bias),
and the Python preparer llmkern.ops.int4_linear._cuda_prepare (which calls go to the packed kernel, which to the
canonical `_cuda`). Outputs start as NaN."""
import gc
import shutil

import numpy as np
import pytest
import torch

from llmkern import reference as R
from _linear_emu import TOL, Adapter, assert_exact_products, make_int4 as make, poison_empty, rel_err

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA emulator is built with g++")

CODE = {torch.bfloat16: 1, torch.float16: 2}


@pytest.fixture(scope="module")
def emu():
    import build_emu

    return build_emu.load(ops=("int4_linear",), name="_C_cuda_emu_int4_linear")


@pytest.fixture(scope="module")
def lin(emu):
    return Adapter(emu, "int4_linear")


def ref_pack(qw, s, o, G, scale16):
    """The header's layouts, written independently: qp[tile][chunk][lane] (8 bytes), sp[tile][group][g]."""
    N, K = qw.shape[0], qw.shape[1] * 2
    tiles = (N + 15) // 16
    q = torch.zeros(tiles * 16, K, dtype=torch.int64)
    q[:N, 0::2] = (qw & 0xF).long()
    q[:N, 1::2] = (qw >> 4).long()
    words = torch.zeros(tiles, K // 32, 32, 2, dtype=torch.int64)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for s_ in range(2):
            k0 = torch.arange(K // 32) * 32 + 16 * s_ + 4 * t  # [chunks]
            w = torch.zeros(tiles, K // 32, dtype=torch.int64)
            for r, (dr, dk) in enumerate(((0, 0), (8, 0), (0, 2), (8, 2))):
                rows = torch.arange(tiles) * 16 + g + dr  # [tiles]
                for e in range(2):
                    nib = q[rows][:, k0 + dk + e]  # [tiles, chunks]
                    w |= nib << (4 * r + 16 * e)
            words[:, :, lane, s_] = w
    qp_bytes = torch.from_numpy(words.numpy().astype(np.uint32).view(np.uint8).reshape(-1))  # little-endian words
    sp = torch.zeros(tiles * 16, K // G, 2)
    sp[:N, :, 0], sp[:N, :, 1] = s, o
    # [tile, row 16] -> [tile, group, g, (s_g, o_g, s_g8, o_g8)]
    sp = sp.view(tiles, 2, 8, K // G, 2).permute(0, 3, 2, 1, 4).reshape(-1)
    sp_bytes = (sp.half() if scale16 else sp).contiguous().view(torch.uint8)
    return qp_bytes, sp_bytes


def pack(emu, qw, s, o, G, scale16):
    N, K = qw.shape[0], qw.shape[1] * 2
    wb, sb = emu.int4_linear_packed_bytes(N, K, G, scale16)
    qp, sp = poison_empty(wb, dtype=torch.uint8), poison_empty(sb, dtype=torch.uint8)
    emu.int4_linear_pack(qw.data_ptr(), s.data_ptr(), o.data_ptr(), G, N, K, qp.data_ptr(), sp.data_ptr(), scale16, 0)
    return qp, sp


def run_packed(emu, x, qp, sp, scale16, N, G, bias, splits, ldx=None, num_sms=132):
    M, K = x.shape
    out = poison_empty((M, N), dtype=x.dtype)
    ws = poison_empty((splits, M, N), dtype=torch.float32) if splits > 1 else None
    b32 = None if bias is None else bias.float().contiguous()
    path = emu.int4_linear_packed(x.data_ptr(), CODE[x.dtype], ldx or K, M, K, qp.data_ptr(), sp.data_ptr(), scale16,
                                  N, G, 0 if b32 is None else b32.data_ptr(), out.data_ptr(), N,
                                  0 if ws is None else ws.data_ptr(), splits, num_sms, 0)
    return out, path


def check(out, x, qw, s, o, bias, what, tight=True):
    """Against llmkern.reference, and tightly against float64 dequantize-then-matmul: the kernel multiplies exact q
    and x, so its only errors are fp32 sums and the final rounding (one ulp of the output, plus 2^-20 of the largest
    output for fp32 cancellation between the scale and offset terms)."""
    err = rel_err(out, R.int4_linear(x, qw, s, o, bias))
    assert err <= TOL[x.dtype], f"{what}: rel err {err}"
    y = x.double() @ R.dequantize_int4(qw, s, o).double().t()
    if bias is not None:
        y = y + bias.double()
    if not tight:  # (the canonical kernels round each dequantized weight to x's dtype)
        assert rel_err(out, y) <= TOL[x.dtype], what
        return
    assert_exact_products(out, y, what)


@pytest.mark.parametrize("scale16", [False, True])
@pytest.mark.parametrize("G", [32, 64, 128])
def test_pack_layout(emu, G, scale16):
    """The packing kernels' bytes equal the layout of the header's comment (N tails padded with zeros)."""
    for N, K in ((16, 128), (21, 256), (40, 384)):
        x, qw, s, o, _ = make(1, N, K, G, torch.bfloat16, N + K + G, scale16=scale16)
        qp, sp = pack(emu, qw, s, o, G, scale16)
        rq, rs = ref_pack(qw, s, o, G, scale16)
        assert torch.equal(qp, rq), (N, K)
        assert torch.equal(sp, rs), (N, K)


@pytest.mark.parametrize("scale16", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("G", [32, 64, 128])
def test_packed_kernel(emu, dtype, G, scale16):
    """M 1..16 (one and two 8-row blocks), N tails, K = 128 blocks plus tails of 0 / 1 / 2 / 3 chunks, bias."""
    for M, N, K in ((1, 33, 256), (2, 17, 160), (8, 16, 224), (9, 40, 384), (16, 21, 480), (5, 1, 128),
                    (3, 20, 192), (7, 24, 320)):
        if K % G:
            continue
        x, qw, s, o, b = make(M, N, K, G, dtype, M * 1000 + N + K + G, bias=M % 2 == 1, scale16=scale16)
        qp, sp = pack(emu, qw, s, o, G, scale16)
        out, path = run_packed(emu, x, qp, sp, scale16, N, G, b, 1)
        assert path == "packed"
        check(out, x, qw, s, o, b, f"M={M} N={N} K={K}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_packed_splitk_and_strided_rows(emu, dtype):
    """Split-K (the binding's split count for a small N over 132 SMs: partials reduced in order, bias added once;
    the same result with every split count), and x rows with a padded stride."""
    G, N = 64, 24
    for M, K in ((1, 4096), (12, 4096), (3, 4032)):  # K 4032: the last split ends in a half block
        splits = emu.int4_linear_packed_splits(N, K, 132)
        assert splits > 1
        x, qw, s, o, b = make(M, N, K, G, dtype, M + 7, bias=True)
        qp, sp = pack(emu, qw, s, o, G, False)
        out, path = run_packed(emu, x, qp, sp, False, N, G, b, splits)
        assert path == "packed_splitk"
        check(out, x, qw, s, o, b, f"M={M} K={K} splits={splits}")
        one, _ = run_packed(emu, x, qp, sp, False, N, G, b, 1)
        check(one, x, qw, s, o, b, f"M={M} one split")
    K = 4096
    wide = torch.randn(3, K + 24).to(dtype)
    x = wide[:, :K]
    _, qw, s, o, b = make(3, N, K, G, dtype, 11)
    qp, sp = pack(emu, qw, s, o, G, False)
    out, _ = run_packed(emu, x, qp, sp, False, N, G, None, 1, ldx=K + 24)
    check(out, x, qw, s, o, None, "strided rows")


@pytest.mark.parametrize("scale16", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("G", [32, 64, 128])
def test_packed_gemm(emu, lin, dtype, G, scale16):
    """M > 16 on the packed GEMM: 64-row tiles (4 warps) and, when the 128-row tiles fill the SMs (num_sms 1),
    128-row tiles (8 warps); M / N tails (N past the 16-row weight tiles and the 128-row CTA tile), K through
    the 4-stage x ring and the 4-chunk weight prefetch (K / 32 = 3, 12, 13, 20 chunks); bias. The dequantized weights
    are the canonical GEMM's (wdq_gemm.cuh, fp32 q * s + o rounded once) and the mma steps cover the same 16 k:
    on the emulator (exact sums per mma) the results are bit for bit the canonical GEMM's."""
    for M, N, K, sms in ((17, 33, 96, 132), (64, 130, 384, 132), (100, 257, 416, 1), (130, 20, 640, 1)):
        if K % G:
            continue
        x, qw, s, o, b = make(M, N, K, G, dtype, M + N + K + G, bias=M % 2 == 0, scale16=scale16)
        qp, sp = pack(emu, qw, s, o, G, scale16)
        out, path = run_packed(emu, x, qp, sp, scale16, N, G, b, 1, num_sms=sms)
        assert path == "packed_gemm"
        check(out, x, qw, s, o, b, f"M={M} N={N} K={K}", tight=False)
        assert torch.equal(out, lin(x, qw, s, o, b, "w4a16", num_sms=sms)) and lin.path == "mma", (M, N, K)


def test_packed_bad_arguments(emu):
    """The launcher refuses what the kernel cannot take, with the argument named."""
    x, qw, s, o, _ = make(2, 16, 128, 32, torch.bfloat16, 3)
    qp, sp = pack(emu, qw, s, o, 32, False)
    with pytest.raises(ValueError, match="x_dtype"):
        emu.int4_linear_packed(x.data_ptr(), 0, 128, 2, 128, qp.data_ptr(), sp.data_ptr(), False, 16, 32, 0,
                               x.data_ptr(), 16, 0, 1, 132, 0)
    with pytest.raises(ValueError, match="splits == 1"):
        emu.int4_linear_packed(x.data_ptr(), 1, 128, 17, 128, qp.data_ptr(), sp.data_ptr(), False, 16, 32, 0,
                               x.data_ptr(), 16, x.data_ptr(), 2, 132, 0)
    with pytest.raises(ValueError, match="empty split"):
        emu.int4_linear_packed(x.data_ptr(), 1, 128, 2, 128, qp.data_ptr(), sp.data_ptr(), False, 16, 32, 0,
                               x.data_ptr(), 16, x.data_ptr(), 2, 132, 0)
    with pytest.raises(ValueError, match="group"):
        emu.int4_linear_packed_bytes(16, 96, 64, False)


def test_preparer_routes(lin):
    """`_cuda_prepare`: 16-bit x with 1..16 rows ([B, S, K] too) run the packed kernel, the same values as the
    canonical `_cuda`; fp32 x and 17+ rows run `_cuda`; fp16-exact scales are stored as fp16; under CUDA graph
    capture, and with CUDA_INT4_PACKED off, nothing is packed."""
    G, N, K = 32, 40, 256
    _, qw, s, o, b = make(1, N, K, G, torch.bfloat16, 5, bias=True)
    b = b.to(torch.bfloat16)  # the preparer makes its own fp32 copy: the run must keep it alive
    run = lin.prepare(qw, s, o, b, "w4a16")
    assert run.packed[2] is False
    gc.collect()
    junk = [torch.full((N,), float("nan")) for _ in range(64)]  # reuse whatever the preparer freed
    for shape, dtype, path in (((1, K), torch.bfloat16, "packed"), ((2, 3, K), torch.float16, "packed"),
                               ((16, K), torch.bfloat16, "packed"), ((17, K), torch.bfloat16, "packed_gemm"),
                               ((3, K), torch.float32, "gemv")):
        x = torch.randn(shape).to(dtype)
        out = run(x)
        assert lin.path == path, (shape, dtype, lin.path)
        assert out.shape == shape[:-1] + (N,) and out.dtype == dtype
        check(out.reshape(-1, N), x.reshape(-1, K), qw, s, o, b, f"{shape} {dtype}", tight=path == "packed")
        if path == "packed_gemm":  # the same 16-bit weights and mma steps as the canonical GEMM: same bits here
            assert torch.equal(out, lin(x, qw, s, o, b, "w4a16")) and lin.path == "mma"
    _, qw16, s16, o16, _ = make(1, N, K, G, torch.bfloat16, 6, scale16=True)
    assert lin.prepare(qw16, s16, o16, None, "w4a16").packed[2] is True
    from llmkern.ops._registry import BackendUnsupported

    with pytest.raises(BackendUnsupported, match="captured"):
        lin.prepare(qw, s, o, b, "w4a16", capturing=True)
    del junk
    run = lin.prepare(qw, s, o, b, "w4a16", CUDA_INT4_PACKED=False)
    run(torch.randn(4, K).to(torch.bfloat16))
    assert lin.path == "decode_mma"
