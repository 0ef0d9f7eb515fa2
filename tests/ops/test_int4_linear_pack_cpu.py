"""int4_linear's packed decode layout (the cpu preparer's, llmkern/ops/int4_linear.py `_cpu_runner`).

The packed layout (csrc/include/llmkern/cpu/int4_linear_common.h, "packed decode layout") must give
bit-identical outputs to the canonical-layout kernel for the same x: on every ISA, 1 and 2 threads,
with fp16-exact scales/offsets (GGUF Q4_0/Q4_1-like, stored as fp16) and with arbitrary fp32 ones
(stored as fp32). The kernel reads the packed form for one-row calls (M = 1; decode with more rows
and prefill read the canonical tensors), so M > 1 here checks the runner keeps both right.
"""
import zlib

import pytest
import torch

import llmkern
import llmkern._C as C
from llmkern.nn import Int4Linear
from llmkern.ops.int4_linear import _cpu_runner
from _cpu_helpers import ISAS


DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (N, K, G): odd N (block tails of 1..7 rows), K with a short 512-span and a short 128-step, all G
SHAPES = [(1, 64, 32), (17, 96, 32), (33, 640, 64), (257, 416, 32), (40, 1024, 128), (9, 576, 32),
          (100, 1536, 64), (24, 2176, 128)]
ROWS = (1, 2, 3, 4, 5, 8, 9, 16, 17, 40)


@pytest.fixture
def threads():
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


def weights(N, K, G, f16, gen):
    qw = torch.randint(0, 256, (N, K // 2), generator=gen, dtype=torch.uint8)
    s = torch.rand(N, K // G, generator=gen) * 0.02 + 1e-3
    o = -8 * s + torch.randn(N, K // G, generator=gen) * 0.01
    if f16:
        s, o = s.half().float(), o.half().float()
    return qw, s, o


def naive(x, qw, s, o, b):
    p = qw.to(torch.int64)
    q = torch.stack([p % 16, p // 16], -1).reshape(p.shape[0], -1).float()
    G = q.shape[1] // s.shape[1]
    w = q * s.repeat_interleave(G, 1) + o.repeat_interleave(G, 1)
    y = x.reshape(-1, x.shape[-1]).double() @ w.double().T
    return y if b is None else y + b.double()


@pytest.mark.parametrize("f16", [True, False], ids=["fp16-scales", "fp32-scales"])
@pytest.mark.parametrize("isa", ISAS)
def test_packed_is_bit_identical_to_canonical(isa, f16, monkeypatch, threads):
    monkeypatch.setenv("LLMKERN_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{isa}{f16}".encode()))
    for nt in (1, 2):
        threads(nt)
        for N, K, G in SHAPES:
            qw, s, o = weights(N, K, G, f16, gen)
            b = torch.randn(N, generator=gen) if N % 2 else None
            canon, packed = _cpu_runner(qw, s, o, b, pack=False), _cpu_runner(qw, s, o, b)
            assert packed.packed_e == (2 if f16 else 4)
            assert packed.packed.numel() == N * (K // 2 + 2 * (K // G) * packed.packed_e)
            for dtype in DTYPES:
                for M in ROWS:
                    x = torch.randn(M, K, generator=gen).to(dtype)
                    out = packed(x)
                    assert torch.equal(out, canon(x)), f"N={N} K={K} G={G} {dtype} M={M} threads={nt}"
                    if M == 1:
                        tol = 1e-5 if dtype == torch.float32 else 1e-2
                        ref = naive(x, qw, s, o, b)
                        assert ((out.double() - ref).norm() / ref.norm()).item() <= tol


@pytest.mark.parametrize("isa", ISAS)
def test_packed_non_contiguous_x_and_batches(isa, monkeypatch):
    monkeypatch.setenv("LLMKERN_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(5)
    N, K, G = 33, 640, 64
    qw, s, o = weights(N, K, G, True, gen)
    b = torch.randn(N, generator=gen).to(torch.bfloat16)
    canon, packed = _cpu_runner(qw, s, o, b, pack=False), _cpu_runner(qw, s, o, b)
    big = torch.randn(6, K + 9, generator=gen).to(torch.bfloat16)
    for x in (big[:, 3:3 + K], big[:1, :K], torch.randn(2, 3, 2 * K, generator=gen)[:, :, ::2],
              torch.randn(1, K, generator=gen).expand(4, K), torch.randn(K, 3, generator=gen).T):
        assert torch.equal(packed(x), canon(x))


def test_fp16_exactness_rule():
    """fp16 storage only when every value survives the round trip bit for bit."""
    def fits(vals):
        t = torch.tensor(vals, dtype=torch.float32)
        return C.int4_linear_fits_f16(t.data_ptr(), t.numel())

    assert fits([0.0, -0.0, 1.0, -2.5, 65504.0, 2.0 ** -24, 3 * 2.0 ** -24, 2.0 ** -14, float("inf"), float("-inf")])
    assert not fits([1.0 + 2.0 ** -11])   # 12 significant bits
    assert not fits([2.0 ** -25])         # below the smallest fp16 subnormal
    assert not fits([65520.0])            # rounds to inf
    assert not fits([1e-8])
    assert not fits([float("nan")])       # NaN keeps its fp32 payload: stored as fp32
    assert fits([])


@pytest.mark.parametrize("flush_denormal", [False, True])
def test_fp16_exactness_rule_in_vectors(flush_denormal):
    """The same rule 8 values at a time (F16C where the CPU has it): each special value at every position of
    a 21-value vector (two vector steps and a tail) of fp16 values, also with denormals flushed (DAZ/FTZ,
    under which a float compare would call an fp32 denormal equal to its fp16 zero)."""
    ok = [0.0, -0.0, 2.0 ** -24, float("inf"), -65504.0]
    bad = [1.0 + 2.0 ** -11, 2.0 ** -25, 65520.0, 1e-8, float("nan"), 1e-40, -1e-45]  # 1e-40, -1e-45: fp32 denormals
    base = torch.randn(21, generator=torch.Generator().manual_seed(3)).half().float()
    cases = []
    for i in range(21):
        for v in ok + bad:
            t = base.clone()
            t[i] = v  # (written before flushing is on: torch's copy would flush a denormal itself)
            cases.append((t, i, v))
    assert torch.set_flush_denormal(flush_denormal) or not flush_denormal  # False: the CPU cannot flush
    try:
        for t, i, v in cases:
            assert C.int4_linear_fits_f16(t.data_ptr(), 21) == (v in ok), (i, v)
    finally:
        torch.set_flush_denormal(False)


def test_pack_layout_matches_its_description():
    """Byte layout of int4_linear_common.h: 8-row blocks, 256-byte spans of q then the span's
    scales, then the block's offsets."""
    gen = torch.Generator().manual_seed(9)
    N, K, G = 11, 640, 32  # a 3-row block tail, a 64-byte span tail
    qw, s, o = weights(N, K, G, True, gen)
    run = _cpu_runner(qw, s, o, None)
    got = run.packed
    parts = []
    for n0 in range(0, N, 8):
        rows = slice(n0, min(N, n0 + 8))
        for b0 in range(0, K // 2, 256):
            sb = min(256, K // 2 - b0)
            parts.append(qw[rows, b0:b0 + sb].reshape(-1))
            g0 = 2 * b0 // G
            parts.append(s[rows, g0:g0 + 2 * sb // G].half().reshape(-1).view(torch.uint8))
        parts.append(o[rows].half().reshape(-1).view(torch.uint8))
    assert torch.equal(got, torch.cat(parts))


def test_pack_launcher_checks():
    gen = torch.Generator().manual_seed(2)
    qw, s, o = weights(8, 64, 32, False, gen)
    need = C.int4_linear_packed_size(8, 64, 32, 4)
    out = torch.empty(need, dtype=torch.uint8)
    with pytest.raises(ValueError, match="fp16"):
        C.int4_linear_pack(qw.data_ptr(), s.data_ptr(), o.data_ptr(), 8, 64, 32, 2, out.data_ptr(), need)
    with pytest.raises(ValueError, match="out_bytes"):
        C.int4_linear_pack(qw.data_ptr(), s.data_ptr(), o.data_ptr(), 8, 64, 32, 4, out.data_ptr(), need - 1)
    with pytest.raises(ValueError, match="e must be"):
        C.int4_linear_packed_size(8, 64, 32, 3)
    x, y = torch.randn(1, 64), torch.empty(1, 8)
    ws = torch.empty(C.int4_linear_workspace_size(1, 64, 8, 1), dtype=torch.uint8)
    args = (x.data_ptr(), 0, 64, 1, 64, qw.data_ptr(), 8, s.data_ptr(), o.data_ptr(), 32, 0, y.data_ptr(), 8,
            ws.data_ptr(), ws.numel(), 1, "", -1, True)
    with pytest.raises(ValueError, match="packed_e"):
        C.int4_linear(*args, out.data_ptr(), 3)
    with pytest.raises(ValueError, match="packed_e"):
        C.int4_linear(*args, 0, 2)


def _prepared_fn(m):
    run = m.__dict__["_run"]
    return None if run is None else run.__defaults__[0]  # Op.prepare's wrapper: run(x, _fn, _name)


def test_module_prepares_packed_and_keeps_canonical_buffers(monkeypatch):
    monkeypatch.delenv("LLMKERN_BACKEND", raising=False)
    monkeypatch.setenv("LLMKERN_INT4_ROWS16", "0")  # the packed layout's policy (rows16's: test below)
    gen = torch.Generator().manual_seed(4)
    qw, s, o = weights(33, 640, 64, True, gen)
    m = Int4Linear.from_quantized(qw.clone(), s.clone(), o.clone(), torch.randn(33, generator=gen))
    x = torch.randn(1, 640, generator=gen)
    first = m(x)  # through the op (canonical), then prepared
    fn = _prepared_fn(m)
    if llmkern._backends.cpu_isa() == "avx512_vnni":  # the preparer packs on AVX-512 only
        assert fn is not None and fn.packed is not None and fn.packed_e == 2
    else:
        assert fn is not None and fn.packed is None
    assert torch.equal(m(x), first)  # packed decode == canonical, bit for bit
    sd = m.state_dict()
    assert torch.equal(sd["qweight"], qw) and torch.equal(sd["scales"], s) and torch.equal(sd["offsets"], o)
    monkeypatch.setenv("LLMKERN_INT4_PACK", "0")
    m2 = Int4Linear.from_quantized(qw, s, o)
    m2(x)
    assert _prepared_fn(m2).packed is None  # opt-out: no memory beyond the canonical buffers


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_gguf_imports_pack_with_fp16_scales(kind, threads):
    """Q4_0 (offsets -8 d) and Q4_1 (offsets m) imports are fp16-exact, fp16 subnormal d included:
    packed with E = 2 and bit-identical to the canonical kernel."""
    import numpy as np

    from llmkern.formats.gguf import q4_0_to_int4, q4_1_to_int4

    rng = np.random.default_rng(7)
    N, K = 19, 256
    nb = N * K // 32
    d = (rng.random(nb) * 0.02 + 1e-4).astype(np.float16)
    d[:5] = np.array([2.0 ** -24, 3 * 2.0 ** -24, 2.0 ** -15, 6e-5, 0.0], dtype=np.float16)  # subnormals, 0
    fields = [d.view(np.uint8).reshape(nb, 2)]
    if kind == "Q4_1":
        fields.append((rng.standard_normal(nb) * 0.05).astype(np.float16).view(np.uint8).reshape(nb, 2))
    fields.append(rng.integers(0, 256, (nb, 16), dtype=np.uint8))
    raw = np.concatenate(fields, axis=1).reshape(-1)
    qw, s, o = (q4_0_to_int4 if kind == "Q4_0" else q4_1_to_int4)(raw, (N, K))
    canon, packed = _cpu_runner(qw, s, o, None, pack=False), _cpu_runner(qw, s, o, None)
    assert packed.packed_e == 2
    gen = torch.Generator().manual_seed(1)
    for nt in (1, 2):
        threads(nt)
        for dtype in DTYPES:
            for M in (1, 3, 20):
                x = torch.randn(M, K, generator=gen).to(dtype)
                assert torch.equal(packed(x), canon(x)), (kind, dtype, M, nt)


@pytest.mark.skipif(llmkern._backends.cpu_isa() != "avx512_vnni", reason="the preparer packs on AVX-512 only")
def test_default_packs_only_fp16_exact_weights(monkeypatch):
    """Unset LLMKERN_INT4_PACK: fp32 scales (not fp16 values) keep the canonical layout only (no extra
    memory); =1 packs them too (E = 4), with the same outputs."""
    monkeypatch.delenv("LLMKERN_BACKEND", raising=False)
    monkeypatch.delenv("LLMKERN_INT4_PACK", raising=False)
    monkeypatch.setenv("LLMKERN_INT4_ROWS16", "0")
    gen = torch.Generator().manual_seed(5)
    qw, s, o = weights(40, 256, 32, False, gen)
    x = torch.randn(1, 256, generator=gen)
    m = Int4Linear.from_quantized(qw, s, o)
    want = m(x)
    assert _prepared_fn(m).packed is None
    monkeypatch.setenv("LLMKERN_INT4_PACK", "1")
    m1 = Int4Linear.from_quantized(qw, s, o)
    m1(x)
    assert _prepared_fn(m1).packed is not None and _prepared_fn(m1).packed_e == 4
    assert torch.equal(m1(x), want)


@pytest.mark.skipif(llmkern._backends.cpu_isa() != "avx512_vnni", reason="the preparer packs on AVX-512 only")
@pytest.mark.parametrize("pack", ["", "1"])
def test_rows16_replaces_packed_layout_with_avx512_bf16(monkeypatch, pack):
    """With AVX-512 BF16, rows16 covers one-row calls of fp32 and bf16 x: the packed layout is not made
    (unless LLMKERN_INT4_PACK=1, for fp16 x) and rows16 is packed when the layer prepares (so the first
    decode step does not pay for it); its results equal the op's to fp32 rounding. Without AVX-512
    BF16 the packed layout stays and rows16 is packed by the first call that reads it."""
    monkeypatch.delenv("LLMKERN_BACKEND", raising=False)
    monkeypatch.delenv("LLMKERN_INT4_ROWS16", raising=False)
    monkeypatch.setenv("LLMKERN_INT4_PACK", pack)
    gen = torch.Generator().manual_seed(6)
    qw, s, o = weights(48, 512, 32, True, gen)
    m = Int4Linear.from_quantized(qw, s, o)
    x = torch.randn(1, 512, generator=gen)
    first = m(x)  # the op: canonical layout
    fn = _prepared_fn(m)
    bf16 = llmkern._backends.cpu_has("avx512_bf16")
    assert (fn.packed is not None) == (pack == "1" or not bf16)
    assert fn.rows16_e == (2 if bf16 else 0)
    again = m(x)
    assert fn.rows16_e == 2  # (without BF16: packed by this first prepared fp32 call of one row)
    assert ((again.double() - first.double()).norm() / first.double().norm()).item() < 2e-6
    want = llmkern.reference.int4_linear(x.double(), qw, s, o, None)
    assert ((again.double() - want).norm() / want.norm()).item() < 2e-6
