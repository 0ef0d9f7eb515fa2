"""int8_linear from the packed decode layout alone (W8A16), or from it and the GEMM layout (W8A8): the launch without
the int8 weight tensor (W8A16's GEMM routes' panels built from the packed layout, csrc/include/llmkern/cpu/
int8_linear_pack_layout.h `WeightColumn`; W8A8's GEMM reads its own layout; the other row counts on the packed
kernels a few rows at a time), the weight's rebuild from the packed layout, and Int8Linear's CPU release (the
module holds those layouts and its scales once prepared).

Checks: a launch with w_ptr = 0 gives the canonical launch's outputs bit for bit (both modes, every group form
the layout takes, fp16-valued and fp32 scales, N tails, K with a short last 64-step and K % 16 != 0, fp32 / bf16 /
fp16 x, row counts on every route, 1 and 2 threads, AVX-512 and AVX2, W8A8 with and without the GEMM layout) and
really reads the packed layout; the rebuilt weight is the packed one bit for bit (W8A16 and W8A8 layouts); the
module frees its weight, computes what a module that keeps it computes, and gives it back exactly wherever
something needs it; a tied embedding reads its rows from either mode's layout.
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
from llmkern._backends import cpu_isa
from llmkern import reference as R
from llmkern.nn import Int8Linear, QuantizedEmbedding
from _cpu_helpers import ISAS
from test_int8_linear_pack_cpu import weights

I8 = importlib.import_module("llmkern.ops.int8_linear")  # (llmkern.ops.int8_linear is also the op's function)
PACKED_ISAS = [i for i in ISAS if i != "scalar"]
pytestmark = pytest.mark.skipif(not PACKED_ISAS, reason="the packed layout is made and read on AVX-512 / AVX2 CPUs")
CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# (N, K, G), G = 0: per channel. N tails (1, 7, 9, 33), K with a short last step (80, 96, 100), K % 16 != 0 (100:
# no GEMM route, every row count on the packed kernels), groups 16 / 32 / 64 / 128 / per channel
SHAPES = [(1, 64, 32), (7, 96, 32), (33, 576, 32), (9, 80, 16), (17, 640, 64), (40, 1024, 128), (9, 100, 0),
          (50, 576, 0), (20, 1536, 0)]
ROWS = (1, 3, 8, 9, 15, 16, 17, 40)  # packed kernels up to 8, chunks of them to 15, the GEMMs from 16


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def launch(x, w, s, packed, E, threads=2, isa="", bias=None, mode="w8a16", released=True, gemm=None):
    """C.int8_linear on x [M, K] with the packed layout (and W8A8's GEMM layout `gemm`); released: w_ptr 0."""
    M, K = x.shape
    N = s.shape[0]
    G = K if s.dim() == 1 else K // s.shape[1]
    out = torch.empty(M, N, dtype=x.dtype)
    need = C.int8_linear_workspace_size(M, K, N, mode, threads)
    ws = torch.empty(max(need, 1), dtype=torch.uint8)
    C.int8_linear(x.data_ptr(), CODE[x.dtype], x.stride(0), M, K, 0 if released else w.data_ptr(), N, s.data_ptr(),
                  G, 0 if bias is None else bias.data_ptr(), out.data_ptr(), N, mode, ws.data_ptr(), ws.numel(),
                  threads, isa, packed.data_ptr(), E, 0 if gemm is None else gemm.data_ptr())
    return out


@pytest.mark.parametrize("isa", PACKED_ISAS)
@pytest.mark.parametrize("f16", [True, False], ids=["fp16-scales", "fp32-scales"])
@pytest.mark.parametrize("mode", ["w8a16", "w8a8", "w8a8-gemm"])
def test_launch_without_the_weight_is_the_canonical_launch_bitwise(mode, isa, f16):
    """w8a8-gemm: with the GEMM layout beside (which AVX-512 reads from 2 or 5 rows on; a pinned AVX2 ISA, which
    has no GEMM kernels, runs its packed kernels, as with the weight it would run its tiles)."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"i8rel{mode}{isa}{f16}".encode()))
    gemm = mode == "w8a8-gemm"
    mode = "w8a8" if gemm else mode
    for N, K, G in SHAPES:
        w, s = weights(N, K, G, f16, gen)
        b = torch.randn(N, generator=gen) if N % 2 else None
        run = I8._cpu_runner(w, s, b, mode, pack=True, gemm=gemm and I8._can_gemm(K, G or K))
        assert run.packed_e == (2 if f16 else 4)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for M in ROWS:
                x = torch.randn(M, K, generator=gen).to(dtype)
                for nt in (1, 2):
                    want = launch(x, w, s, run.packed, run.packed_e, nt, isa, b, mode, released=False,
                                  gemm=run.gemm_packed)
                    got = launch(x, w, s, run.packed, run.packed_e, nt, isa, b, mode, gemm=run.gemm_packed)
                    assert torch.equal(got, want), (isa, N, K, G, dtype, M, nt)
                ref = R.int8_linear(x.double(), w, s, None if b is None else b.double(), mode)
                assert rel(got, ref) <= TOL[dtype], (isa, N, K, G, dtype, M)


@pytest.mark.parametrize("mode", ["w8a16", "w8a8"])
def test_released_launch_reads_the_packed_layout(mode):
    """The weight pointer is 0: what comes out is the packed weights' product (their scales beside), on every route
    (W8A8: with the GEMM layout where this CPU makes it); a pinned scalar ISA, which has no packed kernels, still
    computes (on the CPU's packed ISA)."""
    gen = torch.Generator().manual_seed(11)
    N, K, G = 70, 256, 32
    w, s = weights(N, K, G, False, gen)
    run = I8._cpu_runner(w, s, None, mode, pack=True, gemm=mode == "w8a8" and cpu_isa() == "avx512_vnni")
    for dtype in (torch.float32, torch.bfloat16):
        for M in (1, 12, 33):
            x = torch.randn(M, K, generator=gen).to(dtype)
            ref = R.int8_linear(x.double(), w, s, None, mode)
            for isa in ("", "scalar"):
                got = launch(x, w, s, run.packed, 4, isa=isa, mode=mode, gemm=run.gemm_packed)
                assert rel(got, ref) <= TOL[dtype], (dtype, M, isa)


def test_launcher_checks_released_arguments():
    gen = torch.Generator().manual_seed(12)
    N, K, G = 16, 128, 32
    w, s = weights(N, K, G, True, gen)
    run16 = I8._cpu_runner(w, s, None, "w8a16", pack=True)
    run8 = I8._cpu_runner(w, s, None, "w8a8", pack=True)
    x = torch.randn(1, K)
    with pytest.raises(ValueError, match="w_ptr"):  # no packed layout to read instead
        out, ws = torch.empty(1, N), torch.empty(C.int8_linear_workspace_size(1, K, N, "w8a16"), dtype=torch.uint8)
        C.int8_linear(x.data_ptr(), 0, K, 1, K, 0, N, s.data_ptr(), G, 0, out.data_ptr(), N, "w8a16", ws.data_ptr(),
                      ws.numel(), 1, "")
    y8 = launch(x, w, s, run8.packed, 2, mode="w8a8")  # (W8A8 releases too)
    assert torch.equal(y8, launch(x, w, s, run8.packed, 2, mode="w8a8", released=False))
    with pytest.raises(ValueError, match="packed_ptr does not hold"):  # (W8A16's layout given to a W8A8 call)
        launch(x, w, s, run16.packed, 2, mode="w8a8")
    with pytest.raises(ValueError, match="w_ptr"):
        C.int8_linear_bind(0, N, K, s.data_ptr(), G, 0, "w8a16")
    bound = C.int8_linear_bind(0, N, K, s.data_ptr(), G, 0, "w8a16", run16.packed.data_ptr(), 2)
    assert bound.workspace_size(1, 1) > 0


@pytest.mark.parametrize("mode", ["w8a16", "w8a8"])
def test_unpack_rebuilds_the_weight_bitwise(mode):
    gen = torch.Generator().manual_seed(zlib.crc32(mode.encode()))
    for N, K, G in SHAPES:
        for f16 in (True, False):
            w, s = weights(N, K, G, f16, gen)
            if N:
                w[0, 0], w[-1, -1] = -128, 127
            run = I8._cpu_runner(w, s, None, mode, pack=True)
            assert torch.equal(I8._cpu_unpack(run.packed, N, K)[0], w), (N, K, G, f16)
    with pytest.raises(ValueError, match="packed_ptr"):
        I8._cpu_unpack(run.packed, N + 1, K)


@pytest.fixture
def release_here(monkeypatch):
    if not I8.CPU_INT8_RELEASE:
        pytest.skip("LLMKERN_INT8_KEEP_CANONICAL=1")
    if cpu_isa() not in PACKED_ISAS:
        pytest.skip("a pinned scalar ISA makes no packed layout")
    monkeypatch.delenv("LLMKERN_INT8_PACK", raising=False)


def module(w, s, b, mode="w8a16"):
    return Int8Linear.from_quantized(w.clone(), s.clone(), None if b is None else b.clone(), mode=mode)


@pytest.mark.parametrize("isa", PACKED_ISAS)
@pytest.mark.parametrize("f16", [True, False], ids=["fp16-scales", "fp32-scales"])
@pytest.mark.parametrize("mode", ["w8a16", "w8a8"])
def test_module_holds_the_packed_layout_alone(mode, f16, isa, release_here, monkeypatch):
    """Once prepared, the weight is freed (its weakref dies; the scales stay) and every call (fp32 / bf16 / fp16,
    decode and prefill sizes, batch dims, strided rows) gives a module that keeps it its bits; state_dict and
    deepcopy / pickle unpack it bit for bit without keeping it; reading it brings it back until the next call
    releases it again. W8A8 releases where it has the GEMM layout too (AVX-512); on AVX2 it keeps the weight."""
    monkeypatch.setenv("LLMKERN_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(30 + f16)
    N, K, G = 99, 576, 32
    w, s = weights(N, K, G, f16, gen)
    b = torch.randn(N, generator=gen)
    m = module(w, s, b, mode)
    gone = weakref.ref(m._buffers["weight"])
    x1 = torch.randn(1, K, generator=gen)
    y1 = m(x1)
    gc.collect()
    if mode == "w8a8" and isa != "avx512_vnni":
        assert m._released is None and m._run.impl.gemm_packed is None and gone() is not None
        return
    assert m._released is not None and gone() is None, "the int8 weight is still alive"
    assert [n for n, _ in m.named_buffers()] == ["weight_scale", "bias"]
    assert m._run.impl.packed_e == (2 if f16 else 4)
    assert (m._run.impl.gemm_packed is not None) == (mode == "w8a8")

    with monkeypatch.context() as mp:
        mp.setattr(I8, "CPU_INT8_RELEASE", False)
        keep = module(w, s, b, mode)
        assert torch.equal(keep(x1), y1) and keep._released is None
    big = torch.randn(3, 40, K + 32, generator=gen)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape in ((1, K), (4, K), (9, K), (16, K), (17, K), (2, 3, K), (130, K)):
            x = torch.randn(shape, generator=gen).to(dtype)
            y = m(x)
            assert y.shape == shape[:-1] + (N,) and y.dtype == dtype
            assert torch.equal(y, keep(x)), (dtype, shape)
            assert rel(y, R.int8_linear(x.double(), w, s, b.double(), mode)) <= TOL[dtype], (dtype, shape)
        xs = big[..., 16:16 + K].to(dtype)  # rows K + 32 apart
        assert torch.equal(m(xs), keep(xs))
    assert m._released is not None

    sd = m.state_dict()
    assert list(sd) == ["weight", "weight_scale", "bias"]
    assert torch.equal(sd["weight"], w) and torch.equal(sd["weight_scale"], s) and torch.equal(sd["bias"], b)
    assert m._released is not None  # (unpacked into the result only)
    for c in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert c._released is None and [n for n, _ in c.named_buffers()] == ["weight", "weight_scale", "bias"]
        assert torch.equal(c.weight, w)
        assert torch.equal(c(x1), y1) and c._released is not None  # (prepares and releases its own)
    assert m._released is not None

    assert torch.equal(m.weight, w)  # reading restores...
    assert m._released is None and [n for n, _ in m.named_buffers()] == ["weight", "weight_scale", "bias"]
    assert torch.equal(m(x1), y1) and m._released is not None  # ...until the next call packs again


def test_module_release_then_assignment_load_casts_and_autograd(release_here):
    gen = torch.Generator().manual_seed(40)
    N, K, G = 33, 384, 64
    w, s = weights(N, K, G, True, gen)
    b = torch.randn(N, generator=gen)
    x = torch.randn(5, K, generator=gen)
    want = lambda w, s, b, x: R.int8_linear(x.double(), w, s, b.double(), "w8a16")  # noqa: E731
    m = module(w, s, b)
    m(x)
    assert m._released is not None
    s2 = s * 2
    m.weight_scale = s2  # (the kept scales: a new prepared run, released again)
    assert rel(m(x), want(w, s2, b, x)) <= TOL[torch.float32] and m._released is not None
    w2 = -w.clamp(min=-127)
    m.weight = w2
    assert m._released is None and list(m._buffers) == ["weight", "weight_scale", "bias"] and m.weight is w2
    assert rel(m(x), want(w2, s2, b, x)) <= TOL[torch.float32]
    assert m._released is not None

    w3, s3 = weights(N, K, G, False, gen)
    m.load_state_dict({"weight": w3, "weight_scale": s3, "bias": b})
    assert m._released is None
    assert rel(m(x), want(w3, s3, b, x)) <= TOL[torch.float32]
    assert m._released is not None
    m.load_state_dict({"bias": -b}, strict=False)  # (keys it lacks keep their values: unpacked, not garbage)
    assert rel(m(x), want(w3, s3, -b, x)) <= TOL[torch.float32]

    m.to(torch.bfloat16)
    assert m.bias.dtype == torch.bfloat16 and m.weight_scale.dtype == torch.float32 and torch.equal(m.weight, w3)
    xb = x.to(torch.bfloat16)
    assert rel(m(xb), want(w3, s3, m.bias, xb)) <= TOL[torch.bfloat16]
    assert m._released is not None

    xg = x.clone().requires_grad_(True)  # autograd: the op, on the canonical weight, which then stays
    with pytest.raises(RuntimeError):
        m(xg).sum().backward()  # (the ops have no backward)
    assert m._released is None
    m(x)
    assert m._released is None


def test_what_is_not_released(release_here, monkeypatch):
    """W8A8 without its GEMM layout (AVX2, LLMKERN_INT8_GEMM=0), W8A16 weights the stream kernels decode in place
    (K >= 2048 on AVX-512: no packed copy), a linear sharing its tensors with an embedding (a tied lm_head) that does
    not follow it, and LLMKERN_INT8_KEEP_CANONICAL=1 (CPU_INT8_RELEASE False) keep the weight; LLMKERN_INT8_PACK=1
    packs, and so releases, K >= 2048 too. A mode change brings the weight back from the layout released before."""
    gen = torch.Generator().manual_seed(41)
    w, s = weights(48, 256, 32, True, gen)
    x = torch.randn(2, 256, generator=gen)
    with monkeypatch.context() as mp:
        mp.setenv("LLMKERN_INT8_GEMM", "0")
        m = module(w, s, None, mode="w8a8")
        m(x)
        assert m._released is None
    m = module(w, s, None)
    m(x)
    assert m._released is not None
    m.mode = "w8a8"  # (a mode change brings the weight back; the W8A8 run releases it where it has both layouts)
    y = m(x)
    assert (m._released is not None) == (cpu_isa() == "avx512_vnni")
    assert torch.equal(m.weight, w) and m._released is None
    assert torch.equal(y, module(w, s, None, mode="w8a8")(x))
    assert rel(y, R.int8_linear(x.double(), w, s, None, "w8a8")) <= TOL[torch.float32]

    tied = module(w, s, None)
    emb = QuantizedEmbedding.from_linear(tied)
    tied(x)
    assert tied._released is None and tied.weight is emb.weight

    wl, sl = weights(16, 2048, 32, True, gen)
    xl = torch.randn(1, 2048, generator=gen)
    m = module(wl, sl, None)
    m(xl)
    if cpu_isa() == "avx512_vnni":  # (AVX-512 decodes it in place, the stream kernels)
        assert m._released is None and m._run.impl.packed is None
    else:  # (AVX2 packs it: its packed kernels are faster than the stream ones)
        assert m._released is not None
    monkeypatch.setenv("LLMKERN_INT8_PACK", "1")
    m = module(wl, sl, None)
    m(xl)
    assert m._released is not None
    monkeypatch.setattr(I8, "CPU_INT8_RELEASE", False)
    m = module(w, s, None)
    m(x)
    assert m._released is None


def test_weight_bytes_count_the_released_weight(release_here):
    """Llama.weight_bytes_per_token(packed=False) counts a released Int8Linear's weight as stored."""
    from llmkern.models import Llama
    from llmkern.models.config import ModelConfig
    from llmkern.nn import quantize_linears

    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=32, max_positions=64)
    model = Llama(cfg)
    quantize_linears(model, "int8", group_size=32)
    stored = model.weight_bytes_per_token(packed=False)
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]), model.new_cache(1, 8), last_only=True)
    assert any(getattr(m, "_released", None) is not None for m in model.modules())
    assert model.weight_bytes_per_token(packed=False) == stored


@pytest.mark.parametrize("mode", ["w8a16", "w8a8"])
def test_tied_embedding_follows_the_released_head(mode, release_here):
    """An int8 embedding tied to an Int8Linear holding its very tensors (`tie_to`, the GGUF loader's tied Q8_0
    head) drops the int8 table with the head (one copy: the head's packed layout, W8A16's or W8A8's) and looks rows up
    there (eager and the step program's native call: the same bits as from the table); state_dict / copies unpack it; reading it, or
    the head's restore, brings it back to both."""
    from llmkern import _backends
    from llmkern.ops._cpu_linear import DTYPE_CODE

    gen = torch.Generator().manual_seed(50)
    V, H, G = 300, 96, 32
    w, s = weights(V, H, G, True, gen)
    ids = torch.tensor([[0, 5, 299], [17, 17, 100]])
    for dtype in (torch.float32, torch.bfloat16):
        ref = QuantizedEmbedding({"weight": w.clone(), "weight_scale": s.clone()}, dtype=dtype)
        emb = QuantizedEmbedding({"weight": w.clone(), "weight_scale": s.clone()}, dtype=dtype)
        head = Int8Linear.from_quantized(emb.weight, emb.weight_scale, mode=mode)
        emb.tie_to(head)
        gone = weakref.ref(emb._buffers["weight"])
        x = torch.randn(2, H, generator=gen).to(dtype)
        y = head(x)
        gc.collect()
        if mode == "w8a8" and cpu_isa() != "avx512_vnni":
            pytest.skip("W8A8 releases with the GEMM layout, made on AVX-512 CPUs only")
        assert head._released is not None and "weight" not in emb._buffers and gone() is None
        assert torch.equal(emb(ids), ref(ids)) and emb.row_bytes() == ref.row_bytes()
        packed, scale = emb.packed_source()
        tokens = ids.reshape(-1).contiguous()
        for fmt, src in (("int8_packed", packed), ("int8", ref.weight)):
            out = torch.full((tokens.numel(), H), float("nan"), dtype=dtype)
            prog = _backends.cpu_module().StepProgram()
            prog.append(_backends.cpu_module().quant_embedding_call(
                fmt, src.data_ptr(), scale.data_ptr(), 0, V, H, G, DTYPE_CODE[dtype], tokens.data_ptr(),
                tokens.numel(), out.data_ptr()))
            prog.run()
            assert torch.equal(out.view(2, 3, H), ref(ids)), fmt
        sd = emb.state_dict()
        assert list(sd) == ["weight", "weight_scale"] and torch.equal(sd["weight"], w)
        c = copy.deepcopy(emb)
        assert torch.equal(c.weight, w) and torch.equal(c(ids), ref(ids))
        assert emb.packed_source() is not None  # (still released)
        assert torch.equal(emb.weight, w)  # reading brings it back, to both...
        assert head._released is None and emb.weight is head.weight and list(emb._buffers) == ["weight", "weight_scale"]
        assert torch.equal(head(x), y) and "weight" not in emb._buffers  # ...until the head's next call
        head.weight  # noqa: B018 - the head's restore gives the embedding the tensor too
        assert emb._buffers["weight"] is head._buffers["weight"]
        head(x)
        w2 = w.clone()
        emb.weight = w2  # (assigned while released: a buffer in its place, the head restored beside it)
        assert emb._buffers["weight"] is w2 and list(emb._buffers) == ["weight", "weight_scale"]
        assert head._released is None and head.weight is not w2
        head(x)  # (the table now holds another tensor than the head: it keeps its own)
        assert head._released is not None and emb._buffers["weight"] is w2 and torch.equal(emb(ids), ref(ids))
    with pytest.raises(ValueError, match="very tensors"):
        QuantizedEmbedding({"weight": w.clone(), "weight_scale": s.clone()}).tie_to(Int8Linear.from_quantized(w, s))


def test_copies_of_a_released_tied_pair_share_one_table(release_here):
    """A state_dict, deepcopy or pickle of a model whose tied head released the table for its embedding holds one
    table for both, as the original held one (not one unpacked per module), and the copy's pair stays tied: the
    copy's head releases it for the copy's embedding. The original is left as it was."""
    gen = torch.Generator().manual_seed(51)
    V, H, G = 200, 64, 32
    w, s = weights(V, H, G, True, gen)
    emb = QuantizedEmbedding({"weight": w.clone(), "weight_scale": s.clone()})
    pair = torch.nn.ModuleDict({"emb": emb, "head": Int8Linear.from_quantized(emb.weight, emb.weight_scale)})
    pair.emb.tie_to(pair.head)
    x, ids = torch.randn(1, H, generator=gen), torch.tensor([3, 199, 0])
    y, rows = pair.head(x), pair.emb(ids)
    assert pair.head._released is not None and "weight" not in pair.emb._buffers
    sd = pair.state_dict()
    assert sd["emb.weight"] is sd["head.weight"] and torch.equal(sd["head.weight"], w)
    del sd
    for c in (copy.deepcopy(pair), pickle.loads(pickle.dumps(pair))):
        assert c.emb.weight is c.head.weight and c.emb.weight_scale is c.head.weight_scale
        assert torch.equal(c.head.weight, w) and c.head._released is None
        assert torch.equal(c.head(x), y) and c.head._released is not None
        assert "weight" not in c.emb._buffers and torch.equal(c.emb(ids), rows)  # (tied: released with the head)
        assert pair.head._released is not None and "weight" not in pair.emb._buffers
    assert torch.equal(pair.emb(ids), rows) and torch.equal(pair.head(x), y)

