"""int4_linear from the rows16 layout alone (csrc/include/llmkern/cpu/int4_linear_rows16_panel.h): the prefill
reading rows16 panels, the launch without canonical tensors, their rebuild from rows16, and Int4Linear's CPU
release (the module holds rows16 alone once prepared on an AVX-512 BF16 CPU).

Checks: rows16 prefill panels give the canonical prefill's outputs bit for bit (E = 1 / 2 / 4, every G, N tails,
fp32 / bf16 / fp16 x, 1 and 2 threads, the bf16 dot-product and fp32 routes) and the launcher really reads
them (canonical tensors of other weights beside); a launch without canonical tensors equals the canonical
one bitwise wherever both read the same layout (fp16 x of decode size converted for the rows16 decode), a
pinned AVX2 ISA still computes; the rebuilt tensors are the packed ones bit for bit (-0.0 included); the
module frees its canonical tensors, computes what a module that keeps them computes, and gives them back
exactly wherever something needs them.
"""
import copy
import gc
import importlib
import pickle
import weakref
import zlib

import pytest
import torch

import llmkern._C as C
from llmkern import reference as R
from llmkern.nn import Int4Linear
from test_int4_linear_factored_cpu import q4k_weights
from test_int4_linear_pack_cpu import threads, weights  # noqa: F401 (threads: a fixture)

I4 = importlib.import_module("llmkern.ops.int4_linear")  # (the module: llmkern.ops.int4_linear is also the op's function)
pytestmark = pytest.mark.skipif(C.resolve_isa("") != "avx512_vnni",
                                reason="the rows16 layout is packed and read on AVX-512 CPUs only")
HAS_BF16 = bool(C.cpu_features().get("avx512_bf16"))
CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
TOL = {torch.bfloat16: 4e-3, torch.float32: 2e-5, torch.float16: 2e-3}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def bits(t):
    return t.view(torch.int32)


def pack16(qw, s, o, E):
    N, K = qw.shape[0], qw.shape[1] * 2
    G = K // s.shape[1]
    n = C.int4_linear_rows16_packed_size(N, K, G, E)
    buf = torch.empty(n, dtype=torch.uint8)
    C.int4_linear_rows16_pack(qw.data_ptr(), s.data_ptr(), o.data_ptr(), N, K, G, E, buf.data_ptr(), n)
    return buf


def launch(x, N, G, canon, r16=None, E=0, threads=2, isa="", dmax=-1, bf16_dot=True, bias=None):
    """C.int4_linear on x [M, K]: canon = (qweight, scales, offsets) or None (released: pointers 0)."""
    M, K = x.shape
    out = torch.empty(M, N, dtype=x.dtype)
    need = C.int4_linear_workspace_size(M, K, N, threads, dmax)
    ws = torch.empty(need, dtype=torch.uint8)
    q, s, o = (0, 0, 0) if canon is None else (t.data_ptr() for t in canon)
    C.int4_linear(x.data_ptr(), CODE[x.dtype], x.stride(0), M, K, q, N, s, o, G,
                  0 if bias is None else bias.data_ptr(), out.data_ptr(), N, ws.data_ptr(), need, threads, isa,
                  decode_max_rows=dmax, bf16_dot=bf16_dot, rows16_ptr=0 if r16 is None else r16.data_ptr(),
                  rows16_e=E)
    return out


def case_weights(N, K, G, E, gen):
    if E == 1:
        return q4k_weights(N, K, G, gen, kind="any")
    return weights(N, K, G, E == 2, gen)


# (N, K, G, E): N tails (1, 15, 17, 33 past a block; strips of 48 split between threads), every G, each scale form
CASES = [(1, 256, 32, 2), (15, 96, 32, 4), (17, 640, 64, 2), (100, 576, 32, 2), (40, 1024, 128, 4),
         (257, 512, 64, 4), (33, 768, 32, 1), (130, 2048, 64, 1), (49, 1536, 32, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_prefill_from_rows16_is_the_canonical_prefill_bitwise(dtype, threads):
    gen = torch.Generator().manual_seed(zlib.crc32(f"r16prefill{dtype}".encode()))
    for N, K, G, E in CASES:
        qw, s, o = case_weights(N, K, G, E, gen)
        b = torch.randn(N, generator=gen) if N % 2 else None
        r16 = pack16(qw, s, o, E)
        for M, dmax in ((17, -1), (40, -1), (3, 0), (1, 0)):  # dmax 0: every row count takes the prefill path
            x = torch.randn(M, K, generator=gen).to(dtype)
            for nt in (1, 2):
                threads(nt)
                for dot in (True, False):  # (bf16 x: the bf16 dot-product route and the fp32 one)
                    want = launch(x, N, G, (qw, s, o), threads=nt, dmax=dmax, bf16_dot=dot, bias=b)
                    got = launch(x, N, G, (qw, s, o), r16, E, threads=nt, dmax=dmax, bf16_dot=dot, bias=b)
                    gone = launch(x, N, G, None, r16, E, threads=nt, dmax=dmax, bf16_dot=dot, bias=b)
                    assert torch.equal(got, want), (N, K, G, E, M, nt, dot)
                    assert torch.equal(gone, want), (N, K, G, E, M, nt, dot)
            ref = R.int4_linear(x.double(), qw, s, o, None if b is None else b.double())
            assert rel(got, ref) <= TOL[dtype], (N, K, G, E, M)


def test_prefill_reads_rows16_when_bound():
    """Canonical tensors of weights A beside the rows16 layout of weights B: the prefill follows B (on AVX-512;
    a pinned AVX2 ISA reads A, which it can)."""
    gen = torch.Generator().manual_seed(21)
    N, K, G = 70, 256, 32
    a = weights(N, K, G, False, gen)
    bw = weights(N, K, G, False, gen)
    r16 = pack16(*bw, 4)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(33, K, generator=gen).to(dtype)
        assert rel(launch(x, N, G, a, r16, 4), R.int4_linear(x.double(), *bw, None)) <= TOL[dtype], dtype
        assert rel(launch(x, N, G, a, r16, 4, isa="avx2"), R.int4_linear(x.double(), *a, None)) <= TOL[dtype], dtype


def test_launch_without_canonical_tensors():
    """Every x dtype and row count: the rows16 decode up to the decode limit (fp16 x and bf16 x without dot products
    converted to fp32 rows), the prefill path above it; the same bits as with the canonical tensors beside."""
    gen = torch.Generator().manual_seed(22)
    for N, K, G, E in [(45, 576, 32, 2), (100, 512, 64, 1), (20, 384, 128, 4)]:
        qw, s, o = case_weights(N, K, G, E, gen)
        b = torch.randn(N, generator=gen)
        r16 = pack16(qw, s, o, E)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for M in (1, 2, 5, 8, 9, 16, 17, 64):
                x = torch.randn(M, K, generator=gen).to(dtype)
                ref = R.int4_linear(x.double(), qw, s, o, b.double())
                for dot in (True, False):
                    gone = launch(x, N, G, None, r16, E, bias=b, bf16_dot=dot)
                    assert rel(gone, ref) <= TOL[dtype], (N, K, G, E, dtype, M, dot)
                    if dtype != torch.float16 and (dot or dtype == torch.float32):
                        both = launch(x, N, G, (qw, s, o), r16, E, bias=b, bf16_dot=dot)
                        assert torch.equal(gone, both), (N, K, G, E, dtype, M, dot)
                # a pinned narrower ISA cannot read rows16 alone: the AVX-512 kernels run
                assert torch.equal(launch(x, N, G, None, r16, E, bias=b, isa="avx2"), launch(x, N, G, None, r16, E, bias=b))


def test_launch_without_canonical_tensors_rejects_what_it_cannot_run():
    gen = torch.Generator().manual_seed(23)
    N, K, G = 16, 64, 32
    qw, s, o = weights(N, K, G, False, gen)
    r16 = pack16(qw, s, o, 4)
    x = torch.randn(2, K, generator=gen)
    out = torch.empty(2, N)
    need = C.int4_linear_workspace_size(2, K, N, 1)
    ws = torch.empty(need, dtype=torch.uint8)

    def call(q, sp, op, r, e, packed=0, packed_e=0):
        C.int4_linear(x.data_ptr(), 0, K, 2, K, q, N, sp, op, G, 0, out.data_ptr(), N, ws.data_ptr(), need, 1, "",
                      rows16_ptr=r, rows16_e=e, packed_ptr=packed, packed_e=packed_e)

    with pytest.raises(ValueError, match="only with rows16_ptr"):
        call(0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="qweight_ptr"):  # (some canonical pointers but not all)
        call(0, s.data_ptr(), o.data_ptr(), r16.data_ptr(), 4)
    with pytest.raises(ValueError, match="packed_ptr must be 0"):
        call(0, 0, 0, r16.data_ptr(), 4, packed=r16.data_ptr(), packed_e=4)
    with pytest.raises(ValueError, match="qweight_ptr"):
        C.int4_linear_bind(0, N, K, s.data_ptr(), o.data_ptr(), G, 0, -1, True, 0, 0, r16.data_ptr(), 4)
    bound = C.int4_linear_bind(0, N, K, 0, 0, G, 0, -1, True, 0, 0, r16.data_ptr(), 4)
    assert bound is not None


@pytest.mark.parametrize("E", [1, 2, 4])
def test_unpack_gives_the_packed_tensors_bit_for_bit(E):
    gen = torch.Generator().manual_seed(24 + E)
    for N, K, G in [(1, 256, 32), (17, 512, 64), (33, 1024, 128), (100, 768, 32)]:
        if E == 1 and (K // G) % 8:
            continue
        qw, s, o = case_weights(N, K, G, E, gen)
        view = pack16(qw, s, o, E)
        q2, s2, o2 = I4._cpu_unpack_rows16(view, E, N, K, G)
        assert torch.equal(q2, qw) and torch.equal(bits(s2), bits(s)) and torch.equal(bits(o2), bits(o)), (N, K, G)
    if E == 1:  # (q4k "any" weights hold -0.0 offsets: their sign bits came back)
        assert bool((bits(o) == torch.tensor(-0.0).view(torch.int32)).any())


@pytest.fixture
def release_here():
    if not HAS_BF16:
        pytest.skip("the CPU release needs AVX-512 BF16 (rows16 then takes every decode call)")
    if not I4.CPU_INT4_RELEASE:
        pytest.skip("LLMKERN_INT4_KEEP_CANONICAL=1")


def module(qw, s, o, b, mode="w4a16"):
    return Int4Linear.from_quantized(qw.clone(), s.clone(), o.clone(), None if b is None else b.clone(), mode=mode)


@pytest.mark.parametrize("E", [1, 2, 4])
def test_module_holds_rows16_alone(E, release_here, monkeypatch):
    """Once prepared, the canonical buffers are freed (weakrefs die) and every call (fp32 / bf16 / fp16, decode
    and prefill sizes, batch dims, strided rows) gives a module that keeps them its bits (fp16 decode sizes:
    another summation order, within tolerance); state_dict and deepcopy / pickle unpack them bit for bit
    without keeping them; reading an attribute brings them back until the next call releases them again."""
    gen = torch.Generator().manual_seed(30 + E)
    N, K, G = 99, 512, 32
    qw, s, o = case_weights(N, K, G, E, gen)
    b = torch.randn(N, generator=gen)
    m = module(qw, s, o, b)
    gone = [weakref.ref(m._buffers[n]) for n in ("qweight", "scales", "offsets")]
    x1 = torch.randn(1, K, generator=gen)
    y1 = m(x1)
    gc.collect()
    assert m._released is not None and all(r() is None for r in gone), "the canonical buffers are still alive"
    assert [n for n, _ in m.named_buffers()] == ["bias"]
    assert m._run.impl.rows16_e == E and len(m._run.impl.keep) == 2  # (bias32, rows16's buffer)

    monkeypatch.setattr(I4, "CPU_INT4_RELEASE", False)
    keep = module(qw, s, o, b)
    assert torch.equal(keep(x1), y1) and keep._released is None
    monkeypatch.undo()
    big = torch.randn(3, 40, K + 32, generator=gen)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape in ((1, K), (4, K), (16, K), (17, K), (2, 3, K), (130, K)):
            x = torch.randn(shape, generator=gen).to(dtype)
            y = m(x)
            assert y.shape == shape[:-1] + (N,) and y.dtype == dtype
            if dtype == torch.float16 and x.numel() // K <= 8:
                assert rel(y, keep(x)) <= TOL[dtype], (dtype, shape)
            else:
                assert torch.equal(y, keep(x)), (dtype, shape)
            assert rel(y, R.int4_linear(x.double(), qw, s, o, b.double())) <= TOL[dtype], (dtype, shape)
        xs = big[..., 16:16 + K].to(dtype)  # rows K + 32 apart
        assert rel(m(xs), R.int4_linear(xs.double(), qw, s, o, b.double())) <= TOL[dtype]
    assert m._released is not None
    check_copies_and_restore(m, (qw, s, o, b), x1, y1)


def check_copies_and_restore(m, canon, x1, y1):
    """A released Int4Linear m (with a bias) whose canonical tensors are canon = (qweight, scales, offsets, bias) and
    whose m(x1) was y1: its state_dict and deepcopy / pickle copies hold canon bit for bit without restoring m (the
    copies prepare and release their own); reading an attribute restores m until its next call releases again."""
    qw, s, o, b = canon
    sd = m.state_dict()
    assert list(sd) == ["qweight", "scales", "offsets", "bias"]
    assert torch.equal(sd["qweight"], qw) and torch.equal(bits(sd["scales"]), bits(s))
    assert torch.equal(bits(sd["offsets"]), bits(o)) and torch.equal(sd["bias"], b)
    assert m._released is not None  # (unpacked into the result only)
    for c in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert c._released is None and [n for n, _ in c.named_buffers()] == ["qweight", "scales", "offsets", "bias"]
        assert torch.equal(c.qweight, qw) and torch.equal(bits(c.offsets), bits(o))
        assert torch.equal(c(x1), y1) and c._released is not None  # (prepares and releases its own)
    assert m._released is not None

    assert torch.equal(m.qweight, qw)  # reading restores...
    assert m._released is None and [n for n, _ in m.named_buffers()] == ["qweight", "scales", "offsets", "bias"]
    assert torch.equal(m(x1), y1) and m._released is not None  # ...until the next call packs again


def test_module_release_then_assignment_load_casts_and_autograd(release_here):
    gen = torch.Generator().manual_seed(40)
    N, K, G = 33, 384, 64
    qw, s, o = weights(N, K, G, True, gen)
    b = torch.randn(N, generator=gen)
    x = torch.randn(5, K, generator=gen)
    m = module(qw, s, o, b)
    m(x)
    assert m._released is not None
    s2 = s * 2
    m.scales = s2
    assert m._released is None and list(m._buffers) == ["qweight", "scales", "offsets", "bias"]
    assert torch.equal(m.qweight, qw) and m.scales is s2
    assert rel(m(x), R.int4_linear(x.double(), qw, s2, o, b.double())) <= TOL[torch.float32]
    assert m._released is not None

    q3, s3, o3 = weights(N, K, G, False, gen)
    m.load_state_dict({"qweight": q3, "scales": s3, "offsets": o3, "bias": b})
    assert m._released is None
    assert rel(m(x), R.int4_linear(x.double(), q3, s3, o3, b.double())) <= TOL[torch.float32]
    assert m._released is not None
    m.load_state_dict({"bias": -b}, strict=False)  # (keys it lacks keep their values: unpacked, not garbage)
    assert rel(m(x), R.int4_linear(x.double(), q3, s3, o3, -b.double())) <= TOL[torch.float32]

    m.to(torch.bfloat16)
    assert m.bias.dtype == torch.bfloat16 and m.scales.dtype == torch.float32 and torch.equal(m.qweight, q3)
    xb = x.to(torch.bfloat16)
    assert rel(m(xb), R.int4_linear(xb.double(), q3, s3, o3, m.bias.double())) <= TOL[torch.bfloat16]
    assert m._released is not None

    xg = x.clone().requires_grad_(True)  # autograd: the op, on the canonical buffers, which then stay
    with pytest.raises(RuntimeError):
        m(xg).sum().backward()  # (the ops have no backward)
    assert m._released is None
    m(x)
    assert m._released is None


def test_module_modes_and_keep_setting(release_here, monkeypatch):
    """A mode change of a released module brings the canonical tensors back from rows16 (the W4A8 mode then packs
    its own layout and holds that alone: test_int4_linear_w4a8_release_cpu.py); LLMKERN_INT4_KEEP_CANONICAL=1
    (CPU_INT4_RELEASE False) keeps them."""
    gen = torch.Generator().manual_seed(41)
    N, K, G = 48, 256, 32
    qw, s, o = weights(N, K, G, True, gen)
    x = torch.randn(2, K, generator=gen)
    m = module(qw, s, o, None)
    m(x)
    assert m._released is not None and m._run.impl.rows16 is not None
    m.mode = "w4a8g"
    y = m(x)
    assert m._released is not None and m._run.impl.rows16 is None  # (W4A8's layout now)
    assert torch.equal(m.qweight, qw)
    assert rel(y, R.int4_linear(x.double(), qw, s, o, None)) <= 2e-2
    monkeypatch.setattr(I4, "CPU_INT4_RELEASE", False)
    m = module(qw, s, o, None)
    m(x)
    assert m._released is None
