"""int8_linear's "stream" route (csrc/include/llmkern/cpu/int8_linear_stream.h): W8A16 decode calls of 1-8 rows,
groups of 16 / 32 / 64, read the canonical tensors when no packed copy is given (the op's calls, and
Int8Linear's prepared calls for K >= 4096, which the preparer no longer packs).

Its outputs must be the canonical tiles' bit for bit (and so the packed kernels'): each ISA that has stream
kernels, 1 and 2 threads, fp32 / bf16 / fp16 x, odd N (8-row block tails, the last block's rows repeated for
reading only), K with a short last 64-step, rows with x row strides, bias and none. Calls are launched into
NaN-poisoned outputs with wider rows; the tiles' answer comes from a 9-row call (the tiles route), whose rows
do not depend on each other.
"""
import importlib
import zlib

import pytest
import torch

import llmkern._C as C
from llmkern.nn import Int8Linear
from _cpu_helpers import ISAS, launch_w8a16, reference_w8a16

I8 = importlib.import_module("llmkern.ops.int8_linear")

STREAM_ISAS = [i for i in ISAS if i != "scalar"]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (N, K, G): odd N (1, 7, 9, 33, 100), a short last step (K = 96, 160, 48, 2112 - 2048 = 64 ... 2080)
SHAPES = [(1, 64, 32), (7, 96, 32), (9, 160, 32), (33, 576, 32), (12, 48, 16), (100, 272, 16), (17, 640, 64),
          (9, 2112, 64), (40, 2080, 32), (3, 4096, 16)]


def weights(N, K, G, gen):
    w = torch.randint(-128, 128, (N, K), generator=gen, dtype=torch.int8)
    s = torch.rand(N, K // G, generator=gen) * 0.02 + 1e-3
    return w, s


@pytest.mark.parametrize("isa", STREAM_ISAS)
@pytest.mark.parametrize("threads", [1, 2])
def test_stream_is_bit_identical_to_the_tiles(isa, threads):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{isa}{threads}".encode()))
    for N, K, G in SHAPES:
        w, s = weights(N, K, G, gen)
        b = torch.randn(N, generator=gen) if N % 2 else None
        for dtype in DTYPES:
            x9 = torch.randn(9, K + 3, generator=gen).to(dtype)[:, :K]  # rows with a stride
            tiles = launch_w8a16(x9, w, s, b, G, threads, isa)  # 9 rows: the tiles route
            for M in (1, 2, 3, 4, 5, 8):
                assert C.int8_linear_route(M, K, G, "w8a16", 0, isa) == "stream"
                where = f"N={N} K={K} G={G} {dtype} M={M}"
                out = launch_w8a16(x9[:M], w, s, b, G, threads, isa)
                assert torch.equal(out, tiles[:M]), where
                if M <= 2:
                    ref = reference_w8a16(x9[:M], w, s, b, G)
                    tol = 1e-5 if dtype == torch.float32 else 1e-2
                    assert ((out.double() - ref).norm() / ref.norm()).item() <= tol, where
    assert C.int8_linear_route(9, 576, 32, "w8a16", 0, isa) == "tiles"


def test_route_takes_w8a16_decode_groups_only():
    isa = STREAM_ISAS[0] if STREAM_ISAS else "scalar"
    if not STREAM_ISAS:
        pytest.skip("no AVX2")
    assert C.int8_linear_route(1, 576, 32, "w8a16", 0, isa, packed=True) == "packed"  # a packed copy wins
    assert C.int8_linear_route(1, 576, 32, "w8a8", 0, isa) != "stream"
    assert C.int8_linear_route(1, 576, 576, "w8a16", 0, isa) != "stream"  # per channel
    assert C.int8_linear_route(1, 1024, 128, "w8a16", 0, isa) != "stream"
    assert C.int8_linear_route(1, 32, 32, "w8a16", 0, isa) != "stream"  # one group per row
    assert C.int8_linear_route(1, 576, 32, "w8a16", 0, "scalar") == "tiles"


@pytest.mark.parametrize("isa", STREAM_ISAS)
def test_module_streams_long_rows_and_packs_short_ones(isa, monkeypatch):
    """Int8Linear's preparer: K >= 4096 in groups of 16 / 32 / 64 holds no packed copy (decode streams the
    canonical tensors); shorter rows, W8A8 and per-channel weights keep it; LLMKERN_INT8_PACK=1 packs all."""
    monkeypatch.setenv("LLMKERN_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(7)
    for K, G, mode, packs in ((4096, 32, "w8a16", False), (8192, 16, "w8a16", False), (2048, 32, "w8a16", True),
                              (4096, 32, "w8a8", True), (4096, 4096, "w8a16", True), (4096, 128, "w8a16", True)):
        w, s = weights(24, K, G, gen)
        m = Int8Linear.from_quantized(w, s[:, 0].contiguous() if G == K else s, mode=mode)
        x = torch.randn(1, K, generator=gen)
        first = m(x)  # the op's call; prepares
        again = m(x)  # the prepared run
        assert torch.equal(first, again), (K, G, mode)
        assert (m._run.impl.packed is not None) == packs, (K, G, mode)
        if not packs:
            monkeypatch.setenv("LLMKERN_INT8_PACK", "1")
            forced = I8._cpu_prepare(w, s, None, mode)
            assert forced.packed is not None and torch.equal(forced(x), again)
            monkeypatch.delenv("LLMKERN_INT8_PACK")
