"""int8_linear's W8A8 GEMM layout and micro-kernels (csrc/include/llmkern/cpu/int8_linear_gemm.h).

The cpu preparer packs W8A8 weights into 64-channel VNNI panels; calls of at least
`C.int8_linear_gemm_min_rows()` rows on AVX-512 read them. Checked here:
- against the float64 reference on the same quantized values (llmkern.reference.int8_linear._w8a8:
  exact integer sums), tight: only the kernel's fp32 rescaling (and the final dtype rounding) differ;
- per channel bit-identical to the canonical-layout kernel (same int32 sums, same fp32 ops and order),
  per group equal up to fp32 rounding;
- odd shapes: M tails of the 6-row tiles, N tails of the 16-channel vectors and 64-channel panels, K not
  a multiple of 4 (zero-padded steps), groups of 4, 12, 32, 128; bias or none; fp32/bf16/fp16 x;
  non-contiguous x; 1 and 2 threads; every ISA (AVX2 / scalar ignore the layout and keep their path).
"""
import importlib
import zlib

import pytest
import torch

import llmkern._C as C
from llmkern.nn import Int8Linear
from llmkern.reference.quant import quantize_rows_int8
from _cpu_helpers import ISAS

I8 = importlib.import_module("llmkern.ops.int8_linear")
R8 = importlib.import_module("llmkern.reference.int8_linear")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIN_ROWS = C.int8_linear_gemm_min_rows()
# M: below the GEMM threshold (other paths), and tails 1..5 of the 6-row tiles above it
ROWS = tuple(sorted({1, 2, 3, MIN_ROWS, 8, 13, 17, 33, 129}))
# (N, K, G), G = 0: per channel. N: 1, 15, 17 (vector tails), 100 (a full panel + a 36-channel one);
# K: multiples of 4 and not (4, 5, 7, 101, 257)
SHAPES = [(1, 64, 0), (17, 4, 0), (100, 5, 0), (15, 7, 0), (17, 257, 0), (100, 101, 0), (100, 256, 0), (15, 8, 4), (17, 36, 12),
          (100, 96, 32), (33, 384, 128), (1, 640, 32)]


def weights(N, K, G, gen):
    w = torch.randint(-128, 128, (N, K), generator=gen, dtype=torch.int8)
    s = torch.rand(N, K // G if G else 1, generator=gen) * 0.02 + 1e-3
    return w, (s[:, 0].contiguous() if not G else s)


def ref64(x, w, s, b):
    """(ref, mag), float64 [M, N]: ref = exact integer sums of the same quantized x, rescaled in float64, +
    bias; mag = the same with |q| |w| and |scale| (+ |bias|), the size of the terms fp32 rounding acts on."""
    x2 = x.reshape(-1, x.shape[-1])
    y = R8._w8a8(x2, w, s)
    qx, sx = quantize_rows_int8(x2)
    M, K = qx.shape
    g = 1 if s.dim() == 1 else s.shape[1]
    qa = qx.double().abs().reshape(M, g, K // g).transpose(0, 1)  # [g, M, G]
    wa = w.double().abs().reshape(w.shape[0], g, K // g).permute(1, 2, 0)  # [g, G, N]
    mag = (torch.bmm(qa, wa) * (sx.double().abs().reshape(1, M, 1) * s.double().abs().reshape(-1, g).t().unsqueeze(1))).sum(0)
    if b is not None:
        y, mag = y + b.double(), mag + b.double().abs()
    return y, mag


def check_close(out, refmag, dtype, where, ref_rounded=False):
    """Elementwise: |out - ref| <= 4e-6 mag (fp32: a few fp32 roundings of the rescale and group sums, on
    terms of size mag), plus for 16-bit outputs one rounding to the dtype (half a unit in the last place;
    a whole one when ref is itself a rounded output; fp16 subnormals: their absolute unit, 2^-24)."""
    ref, mag = refmag
    out = out.reshape(ref.shape).double()
    assert not out.isnan().any(), where
    tol = 4e-6 * mag + 1e-30
    if dtype != torch.float32:
        units = 2 if ref_rounded else 1
        half_ulp = (2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11) * ref.abs() * (1 + 1e-6)
        if dtype == torch.float16:
            half_ulp = half_ulp.clamp(min=2.0 ** -25)
        tol = tol + units * half_ulp
    bad = (out - ref).abs() > tol
    assert not bad.any(), f"{where}: {bad.sum().item()} outputs off, worst {((out - ref).abs() / tol).max().item():.3g} x tol"


@pytest.mark.parametrize("isa", ISAS)
def test_gemm_matches_reference_and_canonical(isa, monkeypatch):
    monkeypatch.setenv("LLMKERN_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(zlib.crc32(isa.encode()))
    saved = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            for N, K, G in SHAPES:
                w, s = weights(N, K, G, gen)
                b = torch.randn(N, generator=gen) if (N + K) % 2 else None
                canon = I8._cpu_runner(w, s, b, "w8a8")
                gemm = I8._cpu_runner(w, s, b, "w8a8", gemm=True)
                assert gemm.gemm_packed.numel() == C.int8_linear_gemm_packed_size(N, K, G or K)
                for dtype in DTYPES:
                    for M in ROWS:
                        x = torch.randn(M, K, generator=gen).to(dtype)
                        where = f"{isa} N={N} K={K} G={G} {dtype} M={M} threads={nt}"
                        out = gemm(x)
                        rm = ref64(x, w, s, b)
                        check_close(out, rm, dtype, where)
                        c = canon(x)
                        if G == 0 or M < MIN_ROWS or isa != "avx512_vnni":
                            assert torch.equal(out, c), where
                        else:
                            check_close(out, (c.double(), rm[1]), dtype, where, ref_rounded=True)
    finally:
        torch.set_num_threads(saved)


def test_gemm_large_k_and_panels():
    """Several full panels, K = 4096 (per channel, groups of 128), a 2-thread split with an N tail."""
    gen = torch.Generator().manual_seed(21)
    saved = torch.get_num_threads()
    try:
        for G in (0, 128):
            w, s = weights(200, 4096, G, gen)
            b = torch.randn(200, generator=gen)
            gemm, canon = I8._cpu_runner(w, s, b, "w8a8", gemm=True), I8._cpu_runner(w, s, b, "w8a8")
            x = torch.randn(40, 4096, generator=gen).to(torch.bfloat16)
            for nt in (1, 2):
                torch.set_num_threads(nt)
                out = gemm(x)
                check_close(out, ref64(x, w, s, b), torch.bfloat16, f"G={G} threads={nt}")
                if G == 0:
                    assert torch.equal(out, canon(x))
    finally:
        torch.set_num_threads(saved)


def test_gemm_several_m_blocks():
    """More rows than one M block (4 MiB of quantized rows: 170 tiles of 6 at K = 4096), 1 and 2 threads."""
    gen = torch.Generator().manual_seed(23)
    saved = torch.get_num_threads()
    try:
        for G in (0, 128):
            w, s = weights(70, 4096, G, gen)
            gemm = I8._cpu_runner(w, s, None, "w8a8", gemm=True)
            x = torch.randn(1100, 4096, generator=gen)
            for nt in (1, 2):
                torch.set_num_threads(nt)
                out = gemm(x)
                check_close(out, ref64(x, w, s, None), torch.float32, f"G={G} threads={nt}")
                if G == 0:
                    assert torch.equal(out, I8._cpu_runner(w, s, None, "w8a8")(x))
    finally:
        torch.set_num_threads(saved)


def test_gemm_non_contiguous_x_and_batches():
    gen = torch.Generator().manual_seed(5)
    for G in (0, 32):
        N, K = 33, 640
        w, s = weights(N, K, G, gen)
        b = torch.randn(N, generator=gen).to(torch.bfloat16)
        gemm = I8._cpu_runner(w, s, b, "w8a8", gemm=True)
        big = torch.randn(40, K + 9, generator=gen).to(torch.bfloat16)
        for x in (big[:, 3:3 + K], big[::3, :K], torch.randn(2, 9, 2 * K, generator=gen)[:, :, ::2],
                  torch.randn(1, K, generator=gen).expand(20, K), torch.randn(K, 17, generator=gen).T):
            out = gemm(x)
            assert out.shape == x.shape[:-1] + (N,)
            check_close(out, ref64(x, w, s, b), x.dtype, f"G={G} {tuple(x.shape)} {x.stride()}")
            if G == 0:
                assert torch.equal(out, I8._cpu_runner(w, s, b, "w8a8")(x.contiguous()))


def test_gemm_special_values():
    """Zero rows, a NaN row (NaN outputs), tiny (saturating) and huge rows, inf / -0 scales, weights -128
    and 127: NaN exactly where the reference has NaN (an inf scale times a zero group sum), and per channel
    the canonical kernel's outputs. (Per group the canonical kernel also gives NaN where one of its 16 lane
    partials of a group is 0 under an inf scale, which the reference does not: not compared there.)"""
    gen = torch.Generator().manual_seed(3)
    N, K = 37, 160
    for G in (0, 32):
        w, s = weights(N, K, G, gen)
        w[0] = -128
        w[1] = 127
        s[2] = float("inf")
        s[3] = -0.0
        canon, gemm = I8._cpu_runner(w, s, None, "w8a8"), I8._cpu_runner(w, s, None, "w8a8", gemm=True)
        x = torch.randn(4 * MIN_ROWS, K, generator=gen)
        x[0] = 0
        x[1] = float("nan")
        x[2] *= 1e-38
        x[3] *= 1e30
        x[4, 5] = float("inf")
        a, b = canon(x), gemm(x)
        ref, _ = ref64(x, w, s, None)
        assert torch.equal(ref.isnan(), b.isnan())
        if G == 0:
            assert torch.equal(a.isnan(), b.isnan())
            assert torch.equal(a.nan_to_num(), b.nan_to_num())
        else:
            fin = ref.isfinite()
            assert torch.equal(ref.isinf(), b.isinf())
            assert torch.allclose(b[fin].double(), ref[fin], rtol=1e-5, atol=1e-6)


def test_gemm_layout_matches_its_description():
    """Header, then per 64-channel panel: W[K/4][16 NV][4], C[g][16 NV] = 128 x group weight sums (int32),
    S[g][16 NV] scales; channels past N and k past K are zero."""
    gen = torch.Generator().manual_seed(9)
    N, K, G = 70, 24, 12
    w, s = weights(N, K, G, gen)
    got = I8._cpu_runner(w, s, None, "w8a8", gemm=True).gemm_packed
    parts = []
    for n0, nc in ((0, 64), (64, 16)):
        wp = torch.zeros(nc, K, dtype=torch.int8)
        wp[:min(nc, N - n0)] = w[n0:n0 + nc]
        sp = torch.zeros(nc, K // G)
        sp[:min(nc, N - n0)] = s[n0:n0 + nc]
        parts.append(wp.reshape(nc, K // 4, 4).transpose(0, 1).reshape(-1).view(torch.uint8))
        csum = (128 * wp.to(torch.int32).reshape(nc, K // G, G).sum(-1)).to(torch.int32)  # [nc, g]
        parts.append(csum.t().contiguous().reshape(-1).view(torch.uint8))
        parts.append(sp.t().contiguous().reshape(-1).view(torch.uint8))
    assert got.numel() == 64 + sum(p.numel() for p in parts)
    assert torch.equal(got[64:], torch.cat(parts))


def test_launcher_checks_the_gemm_layout():
    """A GEMM buffer of other weights, or with mode w8a16, is refused (ValueError naming gemm_ptr)."""
    gen = torch.Generator().manual_seed(7)
    N, K, G = 16, 128, 32
    w, s = weights(N, K, G, gen)
    run = I8._cpu_runner(w, s, None, "w8a8", gemm=True)
    other = I8._cpu_runner(w[:, :64].contiguous(), s[:, :2].contiguous(), None, "w8a8", gemm=True)
    M = 2 * MIN_ROWS
    x, out = torch.randn(M, K), torch.empty(M, N)
    ws = torch.empty(max(C.int8_linear_workspace_size(M, K, N, m) for m in ("w8a8", "w8a16")), dtype=torch.uint8)
    args = [x.data_ptr(), 0, K, M, K, w.data_ptr(), N, s.data_ptr(), G, 0, out.data_ptr(), N]
    tail = [ws.data_ptr(), ws.numel(), 1, "", 0, 0]
    with pytest.raises(ValueError, match="gemm_ptr"):
        C.int8_linear(*args, "w8a16", *tail, run.gemm_packed.data_ptr())
    with pytest.raises(ValueError, match="gemm_ptr"):
        C.int8_linear(*args, "w8a8", *tail, other.gemm_packed.data_ptr())
    C.int8_linear(*args, "w8a8", *tail, run.gemm_packed.data_ptr())
    assert torch.equal(out, run(x))
    with pytest.raises(ValueError, match="group_size"):
        C.int8_linear_gemm_packed_size(N, 96, 6)
    with pytest.raises(ValueError, match="out_bytes"):
        buf = torch.empty(C.int8_linear_gemm_packed_size(N, K, G) - 1, dtype=torch.uint8)
        C.int8_linear_gemm_pack(w.data_ptr(), s.data_ptr(), N, K, G, buf.data_ptr(), buf.numel())
    with pytest.raises(ValueError, match="w8a8"):
        I8._cpu_runner(w, s, None, "w8a16", gemm=True)


@pytest.mark.parametrize("G", [0, 32, 6])
def test_int8linear_prepared_gemm(G, monkeypatch):
    """The module path packs the GEMM layout for W8A8 on AVX-512 (groups of K or a multiple of 4), not with
    LLMKERN_INT8_GEMM=0 or for W8A16, gives the op's results (bit-identical per channel), and leaves the
    canonical buffers (state dict) untouched."""
    gen = torch.Generator().manual_seed(11)
    N, K = 130, 576
    w, s = weights(N, K, G, gen)
    b = torch.randn(N, generator=gen)
    avx512 = C.resolve_isa("") == "avx512_vnni"
    for mode, setting in (("w8a8", ""), ("w8a8", "0"), ("w8a16", "")):
        monkeypatch.setenv("LLMKERN_INT8_GEMM", setting)
        m = Int8Linear.from_quantized(w, s, b, mode=mode, backend="cpu")
        sd = {k: v.clone() for k, v in m.state_dict().items()}
        x = torch.randn(3, 11, K, generator=gen).to(torch.bfloat16)
        m(x)  # prepares
        out = m(x)
        run = m.__dict__["_run"].impl
        assert (run.gemm_packed is not None) == (mode == "w8a8" and setting == "" and avx512 and G != 6)
        if mode == "w8a8":
            check_close(out, ref64(x, w, s, b), x.dtype, f"G={G} {setting}")
        if G == 0 or run.gemm_packed is None:
            assert torch.equal(out, I8._cpu_runner(w, s, b, mode)(x))
        if run.gemm_packed is not None and run.packed is not None:  # one row: the decode layout, bit for bit
            x1 = x[0, :1]
            assert torch.equal(m(x1), I8._cpu_runner(w, s, b, mode, pack=True)(x1))
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k])
