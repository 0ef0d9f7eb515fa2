"""int4_linear's prepacked CUDA path (csrc/include/llmkern/cuda/int4_linear_packed.cuh: the packing kernels and
the decode-sized tensor-core kernel that reads their layout) on the CPU through the CUDA emulator: the packed
bytes against a layout written here from the header's description, the kernel through the binding (M 1..16, both
8-row blocks, every group size, K % 128 tails, N tails, fp32 and fp16 scale storage, split-K, strided rows, bias),
and the Python preparer llmkern.ops.int4_linear._cuda_prepare (which calls go to the packed kernel, which to the
canonical `_cuda`). Outputs start as NaN."""
import gc
import shutil
import sys

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


def bits(t):
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("scale16", [False, True])
@pytest.mark.parametrize("G", [32, 64, 128])
def test_unpack_inverts_pack(emu, G, scale16, monkeypatch):
    """`_cuda_unpack` (what a released Int4Linear rebuilds its canonical buffers from) gives the packed weight's
    canonical tensors back bit for bit: N tails, K tails, -0.0 / tiny / huge scales, and several passes."""
    I4 = sys.modules["llmkern.ops.int4_linear"]  # (llmkern.ops.int4_linear is the function)
    for N, K, pass_weights in ((16, 128, 1 << 24), (21, 256, 1 << 24), (40, 384, 16 * 384), (70, 512, 2 * 16 * 512),
                               (1, 128, 1)):
        if K % G:
            continue
        _, qw, s, o, _ = make(1, N, K, G, torch.bfloat16, 3 * N + K + G, scale16=scale16)
        s[0, 0], o[-1, -1] = 2.0 ** -14, -0.0  # (fp16 values: scale16 stays as drawn)
        if not scale16:
            s[-1, 0], o[0, -1] = 3.0e38, 1.0e-40  # fp32 only (huge, subnormal)
        qp, sp = pack(emu, qw, s, o, G, scale16)
        monkeypatch.setattr(I4, "_UNPACK_PASS", pass_weights)
        uq, us, uo = I4._cuda_unpack(qp, sp, scale16, N, K, G)
        assert uq.shape == qw.shape and us.shape == s.shape and uo.shape == o.shape, (N, K)
        assert torch.equal(uq, qw), (N, K)
        assert torch.equal(bits(us), bits(s)) and torch.equal(bits(uo), bits(o)), (N, K)
        assert uq.is_contiguous() and uq.untyped_storage().nbytes() == qw.numel()  # (no padding rows kept)


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
        assert torch.equal(out, lin(x, qw, s, o, b, "w4a16", num_sms=sms, CUDA_INT4_WGMMA=False)) \
            and lin.path == "mma", (M, N, K)


@pytest.mark.parametrize("scale16", [False, True])
@pytest.mark.parametrize("G", [32, 64, 128])
def test_packed_gemm_splitk(emu, lin, G, scale16):
    """The packed GEMM split over K (int4_linear_gemm_splits: 5 splits at K 1568, the last one shorter, 6 at 1536),
    fp32 partials in the poisoned workspace reduced in a fixed order with the bias: bit for bit the canonical
    mma.sync GEMM split the same way (same k ranges, same dequantized weights, exact sums per mma on the
    emulator), and through the preparer's run (CUDA_GEMM_SPLITK off: the unsplit GEMM)."""
    K = 1568 if G == 32 else 1536
    for M, N, dtype in ((40, 33, torch.bfloat16), (70, 136, torch.float16)):
        x, qw, s, o, b = make(M, N, K, G, dtype, M + N + G, bias=M == 40, scale16=scale16)
        qp, sp = pack(emu, qw, s, o, G, scale16)
        splits = emu.int4_linear_gemm_splits(M, N, K, 132)
        assert splits == (5 if G == 32 else 6)
        out, path = run_packed(emu, x, qp, sp, scale16, N, G, b, splits)
        assert path == "packed_gemm_splitk"
        check(out, x, qw, s, o, b, f"M={M} N={N} K={K}", tight=False)
        assert torch.equal(out, lin(x, qw, s, o, b, "w4a16", CUDA_INT4_WGMMA=False)) and lin.path == "mma_splitk"
        run = lin.prepare(qw, s, o, b, "w4a16")
        assert torch.equal(run(x), out) and lin.path == "packed_gemm_splitk"
        unsplit = lin.prepare(qw, s, o, b, "w4a16", CUDA_GEMM_SPLITK=False)(x)
        assert lin.path == "packed_gemm" and rel_err(unsplit, out) <= 4e-3
    x = torch.randn(20, K).to(torch.bfloat16)
    with pytest.raises(ValueError, match="empty split"):
        run_packed(emu, x, qp, sp, scale16, N, G, None, 16)


@pytest.mark.parametrize("scale16", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("G", [32, 64, 128])
def test_packed_dequant_equals_canonical_dequant(emu, dtype, G, scale16):
    """int4_linear_packed_dequant (a packed Int4Linear's large-M route) writes int4_linear_dequant's values bit for
    bit: every element of [N, K] (N tails past the 16-row tiles, several chunks and groups), none left unwritten."""
    for N, K in ((16, 128), (21, 256), (40, 384), (1, 128)):
        if K % G:
            continue
        _, qw, s, o, _ = make(1, N, K, G, dtype, 7 * N + K + G, scale16=scale16)
        qp, sp = pack(emu, qw, s, o, G, scale16)
        got, want = poison_empty((N, K), dtype=dtype), poison_empty((N, K), dtype=dtype)
        emu.int4_linear_packed_dequant(qp.data_ptr(), sp.data_ptr(), scale16, G, N, K, got.data_ptr(), CODE[dtype], 0)
        emu.int4_linear_dequant(qw.data_ptr(), s.data_ptr(), o.data_ptr(), G, N, K, want.data_ptr(), CODE[dtype], 0)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (N, K)
        assert rel_err(got, R.dequantize_int4(qw, s, o)) <= TOL[dtype]
    with pytest.raises(ValueError, match="dtype"):
        emu.int4_linear_packed_dequant(qp.data_ptr(), sp.data_ptr(), scale16, G, N, K, got.data_ptr(), 0, 0)


def test_packed_prefill_dequant_cublas_route(lin):
    """CUDA_PREFILL_CUBLAS on a packed module's run: 17+ rows of 16-bit x dequantize the packed copy and multiply
    with torch (the canonical op's dequantize + cuBLAS values); 1..16 rows keep the packed kernel."""
    G, N, K = 32, 40, 256
    _, qw, s, o, b = make(1, N, K, G, torch.bfloat16, 9, bias=True)
    run = lin.prepare(qw, s, o, b, "w4a16", CUDA_PREFILL_CUBLAS=True)
    x = torch.randn(20, K).to(torch.bfloat16)
    out = run(x)
    assert lin.path is None  # (no kernel of the GEMM family: the dequantize kernel, then torch)
    want = lin(x, qw, s, o, b, "w4a16", CUDA_PREFILL_CUBLAS=True)  # the canonical op's route
    assert torch.equal(out, want)
    check(out, x, qw, s, o, b, "packed dequant + matmul", tight=False)
    run(torch.randn(3, K).to(torch.bfloat16))
    assert lin.path == "packed"


def test_packed_bad_arguments(emu):
    """The launcher refuses what the kernel cannot take, with the argument named."""
    x, qw, s, o, _ = make(2, 16, 128, 32, torch.bfloat16, 3)
    qp, sp = pack(emu, qw, s, o, 32, False)
    with pytest.raises(ValueError, match="x_dtype"):
        emu.int4_linear_packed(x.data_ptr(), 0, 128, 2, 128, qp.data_ptr(), sp.data_ptr(), False, 16, 32, 0,
                               x.data_ptr(), 16, 0, 1, 132, 0)
    with pytest.raises(ValueError, match="empty split"):  # the GEMM (M > 16): 128 k are two 64-k units
        emu.int4_linear_packed(x.data_ptr(), 1, 128, 17, 128, qp.data_ptr(), sp.data_ptr(), False, 16, 32, 0,
                               x.data_ptr(), 16, x.data_ptr(), 3, 132, 0)
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
            assert torch.equal(out, lin(x, qw, s, o, b, "w4a16", CUDA_INT4_WGMMA=False)) and lin.path == "mma"
    _, qw16, s16, o16, _ = make(1, N, K, G, torch.bfloat16, 6, scale16=True)
    assert lin.prepare(qw16, s16, o16, None, "w4a16").packed[2] is True
    from llmkern.ops._registry import BackendUnsupported

    with pytest.raises(BackendUnsupported, match="captured"):
        lin.prepare(qw, s, o, b, "w4a16", capturing=True)
    del junk
    run = lin.prepare(qw, s, o, b, "w4a16", CUDA_INT4_PACKED=False)
    run(torch.randn(4, K).to(torch.bfloat16))
    assert lin.path == "decode_mma"


@pytest.fixture
def gpu_like_int4(lin, monkeypatch):
    """Int4Linear modules on the CPU whose prepared run is the cuda preparer's (`_cuda_prepare` on the
    emulator, as on a GPU): `make_module(...)` -> module, `prepared` counts the preparations."""
    from llmkern._backends import env_backend
    from llmkern.nn import Int4Linear
    from llmkern.ops.int4_linear import int4_linear_op

    prepared = []

    def prepare(*static_args, backend=None, device="cpu"):
        impl = lin.prepare(*static_args)
        prepared.append(impl)

        def run(x):
            return impl(x)

        run.env, run.backend, run.device, run.impl = env_backend(), "cuda", torch.device(device), impl
        return run

    monkeypatch.setattr(int4_linear_op, "prepare", prepare)

    def make_module(qw, s, o, b):
        return Int4Linear.from_quantized(qw.clone(), s.clone(), o.clone(), None if b is None else b.clone())

    make_module.prepared = prepared
    return make_module


def test_module_holds_the_packed_copy_alone(lin, gpu_like_int4):
    """A GPU Int4Linear, once packed, frees its canonical buffers (weakrefs die) and computes from the packed
    copy; state_dict and deepcopy unpack them bit for bit without keeping them; reading an attribute brings
    them back until the next call releases them again."""
    import copy
    import weakref

    G, N, K = 32, 40, 256
    _, qw, s, o, b = make(1, N, K, G, torch.bfloat16, 11, bias=True)
    b = b.to(torch.bfloat16)
    m = gpu_like_int4(qw, s, o, b)
    expect = lin.prepare(qw, s, o, b, "w4a16")  # the same packed kernels on a module-free copy
    gone = [weakref.ref(m._buffers[n]) for n in ("qweight", "scales", "offsets")]
    x = torch.randn(3, K).to(torch.bfloat16)
    y = m(x)
    assert torch.equal(y, expect(x)) and lin.path == "packed"
    gc.collect()
    assert all(r() is None for r in gone), "the canonical buffers are still alive"
    assert [n for n, _ in m.named_buffers()] == ["bias"]
    assert torch.equal(m(x), y) and len(gpu_like_int4.prepared) == 1

    sd = m.state_dict()
    assert list(sd) == ["qweight", "scales", "offsets", "bias"]
    assert torch.equal(sd["qweight"], qw) and torch.equal(bits(sd["scales"]), bits(s))
    assert torch.equal(bits(sd["offsets"]), bits(o)) and torch.equal(sd["bias"], b)
    assert m._released is not None  # (state_dict unpacked into the result only)

    c = copy.deepcopy(m)
    assert m._released is not None and c._released is None
    assert [n for n, _ in c.named_buffers()] == ["qweight", "scales", "offsets", "bias"]
    assert torch.equal(c.qweight, qw) and torch.equal(bits(c.scales), bits(s))
    assert torch.equal(c(x), y)  # (the copy prepares, packs and releases its own)
    assert c._released is not None and m._released is not None

    assert torch.equal(m.qweight, qw)  # reading restores...
    assert m._released is None and [n for n, _ in m.named_buffers()] == ["qweight", "scales", "offsets", "bias"]
    assert torch.equal(m(x), y) and m._released is not None  # ...until the next call packs again


def test_module_released_then_fp32_assignment_load_and_casts(lin, gpu_like_int4):
    """What needs the canonical tensors gets them back, exactly: an fp32 call (which then keeps them), an
    assignment, load_state_dict (new weights, packed and released at the next call) and .to(dtype)."""
    G, N, K = 64, 33, 384
    _, qw, s, o, b = make(1, N, K, G, torch.bfloat16, 12, bias=True)
    x16 = torch.randn(2, K).to(torch.float16)
    x32 = torch.randn(5, K)

    m = gpu_like_int4(qw, s, o, b)
    m(x16)
    assert m._released is not None
    y32 = m(x32)  # fp32: the canonical kernel, on the restored buffers
    assert lin.path == "gemv" and m._released is None
    check(y32, x32, qw, s, o, b, "fp32 after release")
    m(x16)
    assert lin.path == "packed" and m._released is None  # fp32 calls keep the canonical buffers

    m = gpu_like_int4(qw, s, o, b)
    m(x16)
    s2 = s * 2
    m.scales = s2
    assert m._released is None and list(m._buffers) == ["qweight", "scales", "offsets", "bias"]
    assert torch.equal(m.qweight, qw) and m.scales is s2
    check(m(x16), x16, qw, s2, o, b, "assigned scales", tight=True)
    assert m._released is not None

    _, qw3, s3, o3, b3 = make(1, N, K, G, torch.bfloat16, 13, bias=True)
    m.load_state_dict({"qweight": qw3, "scales": s3, "offsets": o3, "bias": b3})
    assert m._released is None
    check(m(x16), x16, qw3, s3, o3, b3, "loaded", tight=True)
    assert m._released is not None
    m.load_state_dict({"bias": b}, strict=False)  # (keys it lacks keep their values: unpacked, not garbage)
    check(m(x16), x16, qw3, s3, o3, b, "partly loaded", tight=True)

    m.to(torch.bfloat16)
    assert m.bias.dtype == torch.bfloat16 and m.scales.dtype == torch.float32 and torch.equal(m.qweight, qw3)
    assert torch.equal(bits(m.offsets), bits(o3))

    m(x16.to(torch.bfloat16))  # released again
    assert m._released is not None
    assert m(torch.randn(0, K)).shape == (0, N) and m._released is not None  # (empty fp32 x: nothing to restore)
    del m.offsets  # `del` of a released buffer deletes it (the other two come back)
    assert m._released is None and set(m._buffers) == {"qweight", "scales", "bias"}


def test_released_run_refuses_fp32_and_switch_off(lin):
    """After release() the prepared run holds no canonical tensors: fp32 x is refused, not computed from
    stale memory; LLMKERN_CUDA_INT4_KEEP_CANONICAL=1 (CUDA_INT4_RELEASE off) offers no release."""
    G, N, K = 32, 24, 128
    _, qw, s, o, _ = make(1, N, K, G, torch.bfloat16, 14)
    run = lin.prepare(qw, s, o, None, "w4a16")
    unpack = run.release()
    with pytest.raises(RuntimeError, match="released"):
        run(torch.randn(1, K))
    assert run(torch.randn(0, K).to(torch.bfloat16)).shape == (0, N)
    assert torch.equal(unpack()[0], qw)
    assert lin.prepare(qw, s, o, None, "w4a16", CUDA_INT4_RELEASE=False).release is None
