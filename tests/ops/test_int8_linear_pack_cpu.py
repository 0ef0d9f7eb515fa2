"""int8_linear's packed decode layout (the cpu preparer's, llmkern/ops/int8_linear.py `_cpu_prepare`).

The packed layout (csrc/include/llmkern/cpu/int8_linear_pack.h) must give bit-identical outputs to the
canonical-layout kernel for the same x and mode: every ISA (packed kernels for AVX-512 and AVX2; on
scalar a packed runner reads the canonical tensors), 1 and 2 threads, fp16-exact scales (GGUF Q8_0-like,
stored as fp16) and arbitrary fp32 ones, G = 16/32/64/128/256 and per channel, odd N (8-row block
tails), K with a short last 64-step, bias and none. Calls of up to 8 rows (4: W8A8 per channel, and AVX2
W8A16 per channel or G >= 128) read the packed form; more rows check that the runner keeps the canonical
path right.
"""
import importlib
import zlib

import pytest
import torch

import llmkern
import llmkern._C as C
from llmkern import reference
from llmkern.nn import Int8Linear
from _cpu_helpers import ISAS

I8 = importlib.import_module("llmkern.ops.int8_linear")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MODES = ("w8a16", "w8a8")
# (N, K, G), G = 0: per channel. Odd N (1, 7, 33, 577), K with a short last step (96, 100, 48, 32)
SHAPES = [(1, 64, 32), (7, 96, 32), (33, 576, 32), (577, 576, 32), (12, 48, 16), (17, 640, 64),
          (40, 1024, 128), (9, 512, 256), (9, 100, 0), (33, 576, 0), (5, 32, 0), (3, 1536, 0)]
ROWS = (1, 2, 4, 5, 8, 9)  # packed up to 8 rows (W8A8 per channel: 4), canonical above


def weights(N, K, G, f16, gen):
    w = torch.randint(-128, 128, (N, K), generator=gen, dtype=torch.int8)
    s = torch.rand(N, K // G if G else 1, generator=gen) * 0.02 + 1e-3
    if f16:
        s = s.half().float()
    return w, (s[:, 0].contiguous() if not G else s)


def packed_size(N, K, G, E):
    G = G or K
    return 64 + (N + 7) // 8 * 8 * (64 * ((K + 63) // 64) + E * (K // G))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("f16", [True, False], ids=["fp16-scales", "fp32-scales"])
@pytest.mark.parametrize("isa", ISAS)
def test_packed_is_bit_identical_to_canonical(isa, f16, mode, monkeypatch):
    monkeypatch.setenv("LLMKERN_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{isa}{f16}{mode}".encode()))
    saved = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            for N, K, G in SHAPES:
                w, s = weights(N, K, G, f16, gen)
                b = torch.randn(N, generator=gen) if N % 2 else None
                canon = I8._cpu_runner(w, s, b, mode)
                packed = I8._cpu_runner(w, s, b, mode, pack=True)
                assert packed.packed_e == (2 if f16 else 4)
                assert packed.packed.numel() == packed_size(N, K, G, packed.packed_e)
                for dtype in DTYPES:
                    for M in ROWS:
                        x = torch.randn(M, K, generator=gen).to(dtype)
                        out = packed(x)
                        where = f"N={N} K={K} G={G} {dtype} M={M} threads={nt}"
                        assert torch.equal(out, canon(x)), where
                        if M <= 2:  # the float64 reference (rounded to x's dtype)
                            ref = reference.int8_linear(x, w, s, b, mode).double()
                            tol = 1e-5 if dtype == torch.float32 else 1e-2
                            assert ((out.double() - ref).norm() / ref.norm()).item() <= tol, where
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("mode", MODES)
def test_packed_special_values(mode):
    """Zero rows, a NaN row (W8A8: NaN outputs), inf/-0 scales, extreme weights (-128, 127)."""
    gen = torch.Generator().manual_seed(3)
    N, K, G = 19, 160, 32
    w, s = weights(N, K, G, True, gen)
    w[0] = -128
    w[1] = 127
    s[2, 1] = float("inf")
    s[3] = -0.0
    canon, packed = I8._cpu_runner(w, s, None, mode), I8._cpu_runner(w, s, None, mode, pack=True)
    for x in (torch.zeros(1, K), torch.full((1, K), float("nan")), torch.randn(1, K, generator=gen) * 1e-38,
              torch.randn(1, K, generator=gen) * 1e30):
        a, b = canon(x), packed(x)
        assert torch.equal(a.isnan(), b.isnan())
        assert torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("mode", MODES)
def test_packed_non_contiguous_x_and_batches(mode):
    gen = torch.Generator().manual_seed(5)
    N, K, G = 33, 640, 64
    w, s = weights(N, K, G, True, gen)
    b = torch.randn(N, generator=gen).to(torch.bfloat16)
    canon, packed = I8._cpu_runner(w, s, b, mode), I8._cpu_runner(w, s, b, mode, pack=True)
    big = torch.randn(6, K + 9, generator=gen).to(torch.bfloat16)
    for x in (big[:, 3:3 + K], big[:1, :K], big[0, 1:1 + K], torch.randn(1, 1, 2 * K, generator=gen)[:, :, ::2],
              torch.randn(1, K, generator=gen).expand(4, K), torch.randn(K, 1, generator=gen).T):
        assert torch.equal(packed(x), canon(x))


def test_launcher_checks_the_packed_layout():
    """A packed buffer made for other weights or another mode is refused (ValueError), not misread."""
    gen = torch.Generator().manual_seed(7)
    N, K, G = 16, 128, 32
    w, s = weights(N, K, G, True, gen)
    run = I8._cpu_runner(w, s, None, "w8a16", pack=True)
    x, out = torch.randn(1, K), torch.empty(1, N)
    ws = torch.empty(max(C.int8_linear_workspace_size(1, K, N, m) for m in MODES), dtype=torch.uint8)
    args = [x.data_ptr(), 0, K, 1, K, w.data_ptr(), N, s.data_ptr(), G, 0, out.data_ptr(), N]
    tail = [ws.data_ptr(), ws.numel(), 1, ""]
    with pytest.raises(ValueError, match="packed_ptr"):
        C.int8_linear(*args, "w8a8", *tail, run.packed.data_ptr(), 2)  # packed for w8a16
    with pytest.raises(ValueError, match="packed_e"):
        C.int8_linear(*args, "w8a16", *tail, run.packed.data_ptr(), 3)
    with pytest.raises(ValueError, match="packed_ptr"):
        C.int8_linear(*args, "w8a16", *tail, run.packed.data_ptr(), 4)  # packed with fp16 scales
    C.int8_linear(*args, "w8a16", *tail, run.packed.data_ptr(), 2)
    assert torch.equal(out, I8._cpu_runner(w, s, None, "w8a16")(x))
    with pytest.raises(ValueError, match="group_size"):
        C.int8_linear_packed_size(N, 96, 48, 2)
    with pytest.raises(ValueError, match="fp16"):
        s32 = s + 1e-7
        buf = torch.empty(C.int8_linear_packed_size(N, K, G, 2), dtype=torch.uint8)
        C.int8_linear_pack(w.data_ptr(), s32.data_ptr(), N, K, G, 2, "w8a16", buf.data_ptr(), buf.numel())


def test_fp16_exactness_rule():
    def fits(vals):
        t = torch.tensor(vals, dtype=torch.float32)
        return C.int8_linear_fits_f16(t.data_ptr(), t.numel())

    assert fits([0.0, -0.0, 1.0, -2.5, 65504.0, 2.0 ** -24, 2.0 ** -14, float("inf"), float("-inf")])
    assert not fits([1.0 + 2.0 ** -11])
    assert not fits([2.0 ** -25])
    assert not fits([65520.0])
    assert not fits([float("nan")])
    assert fits([])


def test_pack_layout_matches_its_description():
    """Header, then 8-row blocks: per 64-step the rows' bytes (w8a8: w + 128), then the scales of the
    groups ending in the step."""
    gen = torch.Generator().manual_seed(9)
    N, K, G = 11, 96, 32
    w, s = weights(N, K, G, True, gen)
    for mode in MODES:
        got = I8._cpu_runner(w, s, None, mode, pack=True).packed
        parts = []
        wp = torch.zeros(16, 128, dtype=torch.int16)
        wp[:N, :K] = w.to(torch.int16)
        sp = torch.zeros(16, K // G, dtype=torch.float16)
        sp[:N] = s.half()
        for n0 in (0, 8):
            for st in range(2):
                rows = wp[n0:n0 + 8, 64 * st:64 * st + 64]
                parts.append((rows + 128 if mode == "w8a8" else rows % 256).to(torch.uint8).reshape(-1))
                g0, g1 = (64 * st) // G, min(64 * st + 64, K) // G
                parts.append(sp[n0:n0 + 8, g0:g1].contiguous().reshape(-1).view(torch.uint8))
        assert torch.equal(got[64:], torch.cat(parts))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("G", [32, 0])
def test_int8linear_prepared_run_equals_op(mode, G, isa, monkeypatch):
    """The module path (first call through the op, then the preparer's runner) equals the op, the
    canonical buffers (state dict) are untouched, the preparer packs on AVX-512 and AVX2 (not for the
    scalar kernels, which read the canonical tensors), and LLMKERN_INT8_PACK=0 packs nothing."""
    monkeypatch.setenv("LLMKERN_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(11)
    N, K = 577, 576
    w, s = weights(N, K, G, True, gen)
    b = torch.randn(N, generator=gen)
    for setting in ("", "0"):
        monkeypatch.setenv("LLMKERN_INT8_PACK", setting)
        m = Int8Linear.from_quantized(w, s, b, mode=mode, backend="cpu")
        sd = {k: v.clone() for k, v in m.state_dict().items()}
        for dtype in (torch.float32, torch.bfloat16):
            m.bias = b.to(dtype)  # re-prepares
            for _ in range(3):
                x = torch.randn(1, 1, K, generator=gen).to(dtype)
                assert torch.equal(m(x), llmkern.ops.int8_linear(x, w, s, b.to(dtype), mode, backend="cpu"))
        run = m.__dict__["_run"].impl  # the preparer's runner
        assert run is not None
        if setting == "0" or isa == "scalar":
            assert run.packed is None
        else:
            assert run.packed is not None and run.packed_e == 2
        for k, v in m.state_dict().items():
            if k != "bias":
                assert torch.equal(v, sd[k])


def test_unpackable_group_stays_canonical():
    gen = torch.Generator().manual_seed(13)
    w, s = weights(9, 96, 48, True, gen)
    run = I8._cpu_prepare(w, s, None, "w8a16")
    assert run.packed is None
    x = torch.randn(1, 96, generator=gen)
    assert torch.equal(run(x), I8._cpu_runner(w, s, None, "w8a16")(x))
