"""int4_linear's rows16 layout (csrc/include/llmkern/cpu/int4_linear_rows16.h): calls of several rows.

The cpu preparer packs it on AVX-512 CPUs; the kernel then reads it for bf16 x with 1 <= M <= 16 (on
CPUs with AVX-512 BF16) and fp32 x with 1 <= M <= 8 (more rows and fp16 x take the other paths, which
these tests also run through the same runner). Compared with a float64 reference on odd shapes (N tails of 1..15 rows, every G, fp16
and fp32 scales, bias), with the canonical kernel, across thread counts (bitwise), with strided rows.
"""
import zlib

import pytest
import torch

import llmkern._C as C
from llmkern import reference as R
from llmkern.nn import Int4Linear
from llmkern.ops.int4_linear import _cpu_runner
from test_int4_linear_pack_cpu import threads, weights  # noqa: F401 (threads: a fixture)

pytestmark = pytest.mark.skipif(C.resolve_isa("") != "avx512_vnni",
                                reason="the rows16 kernel needs AVX-512 (the preparer does not pack it here)")
HAS_BF16 = bool(C.cpu_features().get("avx512_bf16"))

# (N, K, G): N tails of every kind (1, 15, 17 rows past a block), all G, short and long K
SHAPES = [(1, 64, 32), (15, 96, 32), (17, 640, 64), (100, 576, 32), (40, 1024, 128), (257, 1536, 64)]
ROWS = {torch.bfloat16: (1, 2, 3, 4, 5, 8, 9, 16), torch.float32: (1, 2, 3, 4, 5, 7, 8)}
# bf16 x: the output's rounding (~2^-9 relative per value) dominates; fp32: sums of K fp32 products
TOL = {torch.bfloat16: 4e-3, torch.float32: 2e-5}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("f16", [True, False], ids=["fp16-scales", "fp32-scales"])
def test_rows16_matches_reference_and_canonical(f16, dtype, threads):
    if dtype == torch.bfloat16 and not HAS_BF16:
        pytest.skip("bf16 x reads rows16 only with AVX-512 BF16")
    gen = torch.Generator().manual_seed(zlib.crc32(f"rows16{f16}{dtype}".encode()))
    for N, K, G in SHAPES:
        qw, s, o = weights(N, K, G, f16, gen)
        b = torch.randn(N, generator=gen) if N % 2 else None
        r16 = _cpu_runner(qw, s, o, b, pack=False, rows16=True)
        canon = _cpu_runner(qw, s, o, b, pack=False)
        assert r16.rows16_e == 0  # packed on the first call that can read it
        r16(torch.randn(17, K, generator=gen).to(dtype))
        assert r16.rows16_e == 0  # more rows than a decode call: not that one
        r16(torch.randn(1, K, generator=gen).to(dtype))
        assert r16.rows16_e == (2 if f16 else 4) and canon.rows16_e == 0
        for M in ROWS[dtype]:
            x = torch.randn(M, K, generator=gen).to(dtype)
            outs = []
            for nt in (1, 2):
                threads(nt)
                outs.append(r16(x))
            assert torch.equal(outs[0], outs[1]), f"threads change the result: N={N} K={K} G={G} M={M}"
            out = outs[0]
            ref = R.int4_linear(x.double(), qw, s, o, None if b is None else b.double())
            assert rel(out, ref) <= TOL[dtype], (N, K, G, M)
            assert rel(out, canon(x)) <= TOL[dtype], (N, K, G, M)
            # a row's result does not depend on the call's other rows: batched == one at a time
            assert torch.equal(torch.cat([r16(x[i:i + 1]) for i in range(M)]), out), (N, K, G, M)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=["bf16", "fp32", "fp16"])
def test_rows16_strided_rows_and_other_row_counts(dtype):
    """x rows at a stride (a column slice) and batch dims; M above the limit and fp16 x take the other
    paths with the same runner."""
    gen = torch.Generator().manual_seed(11)
    N, K, G = 50, 576, 32
    qw, s, o = weights(N, K, G, True, gen)
    r16 = _cpu_runner(qw, s, o, None, pack=False, rows16=True)
    tol = TOL.get(dtype, 4e-3)
    big = torch.randn(3, 2, K + 64, generator=gen).to(dtype)
    x = big[..., 32:32 + K]  # [3, 2, K], rows K + 64 elements apart
    out = r16(x)
    assert out.shape == (3, 2, N)
    ref = R.int4_linear(x.reshape(-1, K).double(), qw, s, o, None).reshape(3, 2, N)
    assert rel(out, ref) <= tol
    for M in (1, 9, 17, 40):
        xm = torch.randn(M, K, generator=gen).to(dtype)
        assert rel(r16(xm), R.int4_linear(xm.double(), qw, s, o, None)) <= tol, M


def test_module_prepares_rows16_and_env_turns_it_off(monkeypatch):
    gen = torch.Generator().manual_seed(12)
    N, K, G = 64, 256, 32
    qw, s, o = weights(N, K, G, True, gen)
    x = torch.randn(4, K, generator=gen)
    ref = R.int4_linear(x.double(), qw, s, o, None)
    results = {}
    for setting in ("", "0"):
        monkeypatch.setenv("LLMKERN_INT4_ROWS16", setting)
        m = Int4Linear.from_quantized(qw, s, o)
        m(x)  # the first call checks and prepares
        run = m.__dict__["_run"]
        results[setting] = m(x)  # the first prepared call of 4 rows packs rows16
        assert run.impl.rows16_e == (2 if setting == "" else 0)
        assert rel(results[setting], ref) <= TOL[torch.float32]


def test_rows16_pack_rejects_bad_arguments():
    gen = torch.Generator().manual_seed(13)
    qw, s, o = weights(16, 64, 32, False, gen)
    n = C.int4_linear_rows16_packed_size(16, 64, 32, 4)
    assert n == 16 * (32 + 2 * 2 * 4)
    out = torch.empty(n, dtype=torch.uint8)
    with pytest.raises(ValueError, match="too small"):
        C.int4_linear_rows16_pack(qw.data_ptr(), s.data_ptr(), o.data_ptr(), 16, 64, 32, 4, out.data_ptr(), n - 1)
    with pytest.raises(ValueError, match="fp16"):  # e=2 needs fp16-exact scales
        C.int4_linear_rows16_pack(qw.data_ptr(), s.data_ptr(), o.data_ptr(), 16, 64, 32, 2, out.data_ptr(), n)
    with pytest.raises(ValueError, match="group_size"):
        C.int4_linear_rows16_packed_size(16, 64, 48, 4)


def test_launcher_reads_rows16_exactly_where_documented():
    """Canonical tensors of weights A with the rows16 layout of weights B: the result follows B for bf16
    x with 1..16 rows (AVX-512 BF16), fp32 x with 1..8 and fp16 x with 1..8 (converted to fp32 rows first),
    A otherwise: the prefill path reads rows16 too, so with more rows B also, unless the ISA is pinned to
    AVX2 (so the path is really taken)."""
    gen = torch.Generator().manual_seed(14)
    N, K, G = 40, 128, 32
    qa, sa, oa = weights(N, K, G, False, gen)
    qb, sb, ob = weights(N, K, G, False, gen)
    n = C.int4_linear_rows16_packed_size(N, K, G, 4)
    r16 = torch.empty(n, dtype=torch.uint8)
    C.int4_linear_rows16_pack(qb.data_ptr(), sb.data_ptr(), ob.data_ptr(), N, K, G, 4, r16.data_ptr(), n)
    cases = [(torch.float32, M, True, "") for M in (1, 2, 8, 9)]
    if HAS_BF16:
        cases += [(torch.bfloat16, M, True, "") for M in (1, 2, 16, 17)]
    cases += [(torch.float16, M, True, "") for M in (1, 4, 8, 9)]
    cases += [(dt, M, False, "avx2") for dt in (torch.float32, torch.float16) for M in (1, 9)]
    for dtype, M, takes_rows16, isa in cases:
        x = torch.randn(M, K, generator=gen).to(dtype)
        out = torch.empty(M, N, dtype=dtype)
        need = C.int4_linear_workspace_size(M, K, N, 2)
        ws = torch.empty(need, dtype=torch.uint8)
        C.int4_linear(x.data_ptr(), {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[dtype], K, M, K,
                      qa.data_ptr(), N, sa.data_ptr(), oa.data_ptr(), G, 0, out.data_ptr(), N, ws.data_ptr(), need, 2,
                      isa, rows16_ptr=r16.data_ptr(), rows16_e=4)
        want = R.int4_linear(x.double(), *((qb, sb, ob) if takes_rows16 else (qa, sa, oa)), None)
        assert rel(out, want) <= TOL.get(dtype, 4e-3), (dtype, M, takes_rows16, isa)
    with pytest.raises(ValueError, match="rows16_e"):
        C.int4_linear(x.data_ptr(), 2, K, 4, K, qa.data_ptr(), N, sa.data_ptr(), oa.data_ptr(), G, 0, out.data_ptr(),
                      N, ws.data_ptr(), need, 2, "", rows16_ptr=r16.data_ptr(), rows16_e=3)


@pytest.mark.parametrize("f16", [True, False], ids=["fp16-scales", "fp32-scales"])
@pytest.mark.parametrize("N,K,G", [(37, 128, 32), (32, 192, 64), (5, 256, 128)])
def test_rows16_pack_bytes_follow_the_documented_layout(N, K, G, f16):
    """The packer's bytes (whole 16-row blocks take the AVX-512 path, a tail block the scalar rows) against the
    layout of int4_linear_rows16.h built here element by element: per block and group, G/8 chunks of 16
    lanes (bits 4t.. = q[k0 + 2t], bits 16 + 4t.. = q[k0 + 2t + 1]), then 16 scales and 16 offsets."""
    gen = torch.Generator().manual_seed(N + K)
    qw, s, o = weights(N, K, G, f16, gen)
    E = 2 if f16 else 4
    n = C.int4_linear_rows16_packed_size(N, K, G, E)
    got = torch.empty(n, dtype=torch.uint8)
    C.int4_linear_rows16_pack(qw.data_ptr(), s.data_ptr(), o.data_ptr(), N, K, G, E, got.data_ptr(), n)
    q = torch.stack([qw & 15, qw >> 4], dim=2).reshape(N, K).to(torch.int64)  # q[n, k]: low nibble = even k
    sdt = torch.float16 if f16 else torch.float32
    parts = []
    for b in range(0, N, 16):
        rows = torch.zeros(16, K, dtype=torch.int64)
        sc, of = torch.zeros(16, K // G), torch.zeros(16, K // G)
        m = min(16, N - b)
        rows[:m], sc[:m], of[:m] = q[b:b + m], s[b:b + m], o[b:b + m]
        for g in range(K // G):
            for c in range(G // 8):
                k0 = g * G + 8 * c
                w = torch.zeros(16, dtype=torch.int64)
                for t in range(4):
                    w |= rows[:, k0 + 2 * t] << (4 * t)
                    w |= rows[:, k0 + 2 * t + 1] << (16 + 4 * t)
                parts.append(w.to(torch.int32).view(torch.uint8))
            parts.append(sc[:, g].contiguous().to(sdt).view(torch.uint8))
            parts.append(of[:, g].contiguous().to(sdt).view(torch.uint8))
    assert torch.equal(got, torch.cat(parts))
