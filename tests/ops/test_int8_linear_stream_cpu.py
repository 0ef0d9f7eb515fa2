"""int8_linear's "stream" route (csrc/include/llmkern/cpu/int8_linear_stream.h): W8A16 decode calls of 1-8 rows
(AVX2 per channel or G >= 128: 1-4), per-channel scales or groups of 16 / 32 / 64 / multiples of 64, read the
canonical tensors when no packed copy is given (the op's calls, and Int8Linear's prepared calls for K >= 2048,
which the preparer no longer packs).

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
# (N, K, G; G = K: per channel): odd N (1, 7, 9, 33, 100), a short last step (K = 96, 160, 48, 272, 2080; per
# channel K = 100, 33, 8, 1000: a masked chunk, AVX2's scalar tail), G a multiple of 64 above 64
SHAPES = [(1, 64, 32), (7, 96, 32), (9, 160, 32), (33, 576, 32), (12, 48, 16), (100, 272, 16), (17, 640, 64),
          (9, 2112, 64), (40, 2080, 32), (3, 4096, 16), (9, 100, 100), (33, 576, 576), (5, 33, 33), (7, 8, 8),
          (17, 1000, 1000), (40, 1024, 128), (9, 512, 256), (3, 4096, 4096), (9, 2100, 2100), (5, 2048, 128)]


def max_rows(isa, K, G):
    """The stream route's rows: AVX2 8, or 4 per channel / G >= 128 (as the packed route); AVX-512 up to 8 while
    M K fp32 values fit in 32 KB (one row always), per channel / G >= 128 only from K = 2048 on."""
    if isa == "avx2":
        return 4 if G == K or G > 64 else 8
    if (G == K or G > 64) and K < 2048:
        return 0  # (per channel / G >= 128 with short rows: the tiles)
    return max(1, min(8, (32 << 10) // (4 * K)))


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
                route = C.int8_linear_route(M, K, G, "w8a16", 0, isa)
                assert route == ("stream" if M <= max_rows(isa, K, G) else "tiles"), (N, K, G, M, route)
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
    assert C.int8_linear_route(1, 576, 48, "w8a16", 0, isa) != "stream"  # a group the layouts do not take
    assert C.int8_linear_route(1, 960, 96, "w8a16", 0, isa) != "stream"
    assert C.int8_linear_route(1, 576, 32, "w8a16", 0, "scalar") == "tiles"


@pytest.mark.parametrize("release", [True, False], ids=["release", "keep"])
@pytest.mark.parametrize("isa", STREAM_ISAS)
def test_module_streams_long_rows_and_packs_short_ones(isa, release, monkeypatch):
    """Int8Linear's preparer: W8A16 weights with K >= 2048 (per channel or any packable group) hold no packed
    copy on AVX-512 (decode streams the canonical tensors) and on AVX2 with CPU_INT8_RELEASE off; on AVX2 they are
    packed (and the weight released: the packed kernels are 1.06-1.18x faster there); shorter rows and W8A8 keep
    the copy; LLMKERN_INT8_PACK=1 packs all."""
    monkeypatch.setenv("LLMKERN_CPU_ISA", isa)
    monkeypatch.setattr(I8, "CPU_INT8_RELEASE", release)
    gen = torch.Generator().manual_seed(7)
    long = isa == "avx2" and release  # (K >= 2048 W8A16 packed)
    for K, G, mode, packs in ((2048, 32, "w8a16", long), (8192, 16, "w8a16", long), (4096, 4096, "w8a16", long),
                              (4096, 128, "w8a16", long), (1536, 32, "w8a16", True), (1024, 1024, "w8a16", True),
                              (4096, 32, "w8a8", True), (4096, 4096, "w8a8", True)):
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


_GUARD_SCRIPT = r"""
import ctypes, mmap, sys
import torch
import llmkern._C as C
sys.path.insert(0, sys.argv[1])
from _cpu_helpers import launch_w8a16

def guarded(shape, dtype, esize):
    # a tensor whose last byte is the last byte before a PROT_NONE page: any read past its end faults
    n = 1
    for d in shape:
        n *= d
    page = mmap.PAGESIZE
    total = ((n * esize + page - 1) // page + 1) * page
    buf = mmap.mmap(-1, total)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    t = torch.frombuffer(buf, dtype=dtype, count=n, offset=total - page - n * esize).view(*shape)
    assert ctypes.CDLL(None).mprotect(ctypes.c_void_p(addr + total - page), ctypes.c_size_t(page), 0) == 0
    return t, buf

keep = []
for isa in sys.argv[2].split(","):
    for N, K, G in ((9, 100, 100), (3, 33, 33), (17, 1000, 1000), (9, 96, 32), (5, 48, 16), (3, 4160, 64), (40, 1024, 128),
                    (3, 2100, 2100), (9, 2052, 2052)):
        w, b1 = guarded((N, K), torch.int8, 1)
        s, b2 = guarded((N, K // G), torch.float32, 4)
        keep += [b1, b2]
        w.copy_(torch.randint(-128, 128, (N, K), dtype=torch.int8))
        s.copy_(torch.rand(N, K // G) * 0.02 + 1e-3)
        for M in (1, 3, 4):
            x = torch.randn(M, K)
            if C.int8_linear_route(M, K, G, "w8a16", 0, isa) == "stream":
                launch_w8a16(x, w, s.reshape(N, K // G), None, G, 2, isa)
print("ok")
"""


@pytest.mark.skipif(not STREAM_ISAS, reason="no AVX2")
def test_stream_reads_nothing_past_the_tensors(tmp_path):
    """Weights and scales end at a PROT_NONE page: a read past either (a row's short last chunk, the last
    block's repeated rows) faults. Prefetches never fault. Run in a subprocess: a fault fails this test."""
    import os
    import subprocess
    import sys
    script = tmp_path / "guard.py"
    script.write_text(_GUARD_SCRIPT)
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, str(script), here, ",".join(STREAM_ISAS)], capture_output=True, text=True,
                       timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
