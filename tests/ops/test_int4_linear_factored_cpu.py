"""int4_linear's rows16 layout with factored scales (E = 1; csrc/include/llmkern/cpu/int4_linear_rows16.h):
GGUF Q4_K weights (scale = d * sc, offset = -(dmin * m), fp16 d / dmin per 256 k, 6-bit sc / m per 32) are
read at 4.75 bits per weight instead of 6 (fp32 scales).

Checks: the preparer picks E = 1 exactly for weights that factor (Q4_K of llama.cpp's d = max / 63, of other
d choices, negative d, zero super-blocks, -0.0 offsets, Q4_K from the GGUF importer) and falls back to
fp32 when one value anywhere does not (quantize_int4 weights; one bad value in the last row); outputs are
bitwise those of the fp32-scale layout (the kernel's code * factor is the canonical value exactly), at
every row count the layout serves, 1 and 2 threads, and match the float64 reference; the binding refuses
e = 1 for groups that do not fill super-blocks or values that do not factor.
"""
import zlib

import numpy as np
import pytest
import torch

import llmkern._C as C
from llmkern import ops
from llmkern import reference as R
from llmkern.ops.int4_linear import _cpu_runner
from test_int4_linear_pack_cpu import threads  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(C.resolve_isa("") != "avx512_vnni",
                                reason="the rows16 kernel needs AVX-512 (the preparer does not pack it here)")
HAS_BF16 = bool(C.cpu_features().get("avx512_bf16"))
ROWS = {torch.bfloat16: (1, 2, 3, 4, 5, 8, 9, 16), torch.float32: (1, 2, 3, 5, 8)}
TOL = {torch.bfloat16: 4e-3, torch.float32: 2e-5}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def q4k_weights(N, K, G, gen, kind="llama.cpp"):
    """Canonical int4 weights of Q4_K's form: per row and 8 groups an fp16 d and dmin, per group 6-bit sc and
    m; scales = d * sc, offsets = -(dmin * m) (both exact in fp32, as the GGUF importer computes them).
    kind "llama.cpp": the largest sc and m of each super-block are 63 (d = max / 63); "any": any 0..63
    (imatrix quantizers pick d otherwise), with negative d / dmin, whole zero super-blocks and m = 0
    (offsets -0.0) mixed in."""
    ng = K // G
    sb = ng // 8
    qw = torch.randint(0, 256, (N, K // 2), generator=gen, dtype=torch.uint8)
    d = (torch.rand(N, sb, 1, generator=gen) * 0.01 + 1e-4).half().float()
    dmin = (torch.rand(N, sb, 1, generator=gen) * 0.01 + 1e-4).half().float()
    sc = torch.randint(0, 64, (N, sb, 8), generator=gen).float()
    m = torch.randint(0, 64, (N, sb, 8), generator=gen).float()
    if kind == "llama.cpp":
        sc[..., 0], m[..., 0] = 63, 63
    else:
        d = torch.where(torch.rand(d.shape, generator=gen) < 0.2, -d, d)
        dmin = torch.where(torch.rand(dmin.shape, generator=gen) < 0.2, -dmin, dmin)
        m = torch.where(torch.rand(m.shape, generator=gen) < 0.3, torch.zeros_like(m), m)
        sc[0, 0], m[0, 0] = 0, 0  # a zero super-block (scales +-0, offsets -0.0 or +0.0)
    scales = (d * sc).reshape(N, ng)
    offsets = (-(dmin * m)).reshape(N, ng)
    return qw, scales, offsets


SHAPES = [(1, 256, 32), (15, 256, 32), (17, 512, 64), (100, 1536, 32), (33, 768, 32)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("kind", ["llama.cpp", "any"])
def test_factored_is_bitwise_the_fp32_layout(kind, dtype, threads, monkeypatch):
    if dtype == torch.bfloat16 and not HAS_BF16:
        pytest.skip("bf16 x reads rows16 only with AVX-512 BF16")
    gen = torch.Generator().manual_seed(zlib.crc32(f"factored{kind}{dtype}".encode()))
    for N, K, G in SHAPES:
        qw, s, o = q4k_weights(N, K, G, gen, kind)
        b = torch.randn(N, generator=gen) if N % 2 else None
        fac = _cpu_runner(qw, s, o, b, pack=False, rows16="now")
        monkeypatch.setenv("LLMKERN_INT4_FACTORED", "0")
        f32 = _cpu_runner(qw, s, o, b, pack=False, rows16="now")  # the fp32 (or fp16) scale layout
        monkeypatch.delenv("LLMKERN_INT4_FACTORED")
        E = f32.rows16_e  # 4 (fp32), or 2 where every value happens to be an fp16 one (an all-zero matrix)
        assert fac.rows16_e == 1 and E in (2, 4), (N, K, G)
        # 4.75 bits per weight at G = 32 (+ rows padded to 16), against 6 (fp32) or 5 (fp16)
        rows = (N + 15) // 16 * 16
        assert fac.rows16.numel() == rows * (K // 2 + 2 * (K // G) + K // G)
        assert f32.rows16.numel() == rows * (K // 2 + 2 * E * (K // G))
        for M in ROWS[dtype]:
            x = torch.randn(M, K, generator=gen).to(dtype)
            outs = []
            for nt in (1, 2):
                threads(nt)
                outs.append(fac(x))
            assert torch.equal(outs[0], outs[1]), (N, K, G, M)
            assert torch.equal(outs[0].view(torch.int16 if dtype != torch.float32 else torch.int32),
                               f32(x).view(torch.int16 if dtype != torch.float32 else torch.int32)), (N, K, G, M)
            ref = R.int4_linear(x.double(), qw, s, o, None if b is None else b.double())
            assert rel(outs[0], ref) <= TOL[dtype], (N, K, G, M)


def test_gguf_q4_k_import_takes_the_factored_layout():
    """Q4_K blocks through the importer (random bytes: any sc / m, fp16 d / dmin of both signs) -> E = 1,
    and the module's output equals the float64 reference of gguf's own values."""
    gguf = pytest.importorskip("gguf")
    from llmkern.formats.gguf_kquants import q4_k_to_int4
    rng = np.random.default_rng(5)
    N, K = 40, 512
    raw = rng.integers(0, 256, size=(N, K // 256, 144), dtype=np.uint8)
    for start in (0, 2):
        raw[..., start:start + 2] = (rng.standard_normal((N, K // 256, 1)) * 1e-3).astype(np.float16).view(np.uint8)
    raw = raw.reshape(N, -1)
    qw, s, o = q4_k_to_int4(raw, (N, K))
    run = _cpu_runner(qw, s, o, None, pack=False, rows16="now")
    assert run.rows16_e == 1
    w = torch.from_numpy(np.asarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_K), dtype=np.float32))
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(0))
    assert rel(run(x), x.double() @ w.double().T) <= 2e-5


def test_values_that_do_not_factor_keep_fp32():
    gen = torch.Generator().manual_seed(3)
    N, K, G = 20, 512, 32
    w = torch.randn(N, K, generator=gen)
    qw, s, o = ops.quantize_int4(w, G)  # (max - min) / 15 scales: no common factor
    assert _cpu_runner(qw, s, o, None, pack=False, rows16="now").rows16_e == 4
    qw, s, o = q4k_weights(N, K, G, gen)
    s[-1, -1] = s[-1, -1] * (1 + 2 ** -20)  # one value anywhere that no longer factors: the whole matrix falls back
    run = _cpu_runner(qw, s, o, None, pack=False, rows16="now")
    assert run.rows16_e == 4
    x = torch.randn(2, K, generator=gen)
    assert rel(run(x), R.int4_linear(x.double(), qw, s, o, None)) <= TOL[torch.float32]
    s[-1, -1] = float("nan")  # non-finite: no factor either (and no crash)
    assert not C.int4_linear_rows16_factors_ok(s.data_ptr(), o.data_ptr(), N, K, G)


def test_binding_refuses_e1_it_cannot_hold():
    gen = torch.Generator().manual_seed(4)
    with pytest.raises(ValueError, match=r"e=1 \(factored scales\) needs K / group_size a multiple of 8, got 6"):
        C.int4_linear_rows16_packed_size(16, 192, 32, 1)
    N, K, G = 16, 256, 32
    qw, s, o = ops.quantize_int4(torch.randn(N, K, generator=gen), G)
    nbytes = C.int4_linear_rows16_packed_size(N, K, G, 1)
    out = torch.empty(nbytes + 64, dtype=torch.uint8)
    ptr = out.data_ptr() + (-out.data_ptr() % 64)
    with pytest.raises(ValueError, match="e=1 needs every row's scales and offsets to factor"):
        C.int4_linear_rows16_pack(qw.data_ptr(), s.data_ptr(), o.data_ptr(), N, K, G, 1, ptr, nbytes)
