"""Int4Linear in the W4A8 modes holding its W4A8 layout alone (ops/_int4_cpu.py `_cpu_w4a8_runner`'s release,
csrc/include/llmkern/cpu/int4_linear_w4a8_common.h `int4_w4a8_unpack`).

Checks: the unpacker rebuilds the canonical tensors the layout was packed from bit for bit (fp16 and fp32 scales,
every G, N tails, -0.0 offsets) and rejects bad arguments; a prepared W4A8 / W4A8g module frees its canonical
buffers on every ISA, computes what a module that keeps them computes (every x dtype, decode and prefill sizes,
strided rows), gives them back exactly wherever something needs them (state_dict, copies, attribute reads, mode
changes) and releases again at its next call; LLMKERN_INT4_KEEP_CANONICAL=1 keeps them.
"""
import gc
import importlib
import weakref
import zlib

import pytest
import torch

import llmkern._C as C
from llmkern.nn import Int4Linear
from llmkern.ops import _unpack
from test_int4_linear_rows16_release_cpu import check_copies_and_restore
from test_int4_linear_w4a8_cpu import check_close, weights
from _cpu_helpers import isa  # noqa: F401 (a fixture)

I4 = importlib.import_module("llmkern.ops.int4_linear")  # (the module: llmkern.ops.int4_linear is also the op's function)
MODES = ("w4a8", "w4a8g")


def bits(t):
    return t.view(torch.int32)


def pack(qw, s, o, E):
    N, K = qw.shape[0], qw.shape[1] * 2
    G = K // s.shape[1]
    n = C.int4_linear_w4a8_packed_size(N, K, G, E)
    buf = torch.empty(n + 64, dtype=torch.uint8)
    off = (-buf.data_ptr()) % 64  # (the packer wants 64-byte alignment)
    view = buf[off:off + n]
    C.int4_linear_w4a8_pack(qw.data_ptr(), s.data_ptr(), o.data_ptr(), N, K, G, E, view.data_ptr(), n)
    return view


@pytest.mark.parametrize("E", [2, 4], ids=["fp16-scales", "fp32-scales"])
def test_unpack_gives_the_packed_tensors_bit_for_bit(E):
    gen = torch.Generator().manual_seed(zlib.crc32(f"w4a8unpack{E}".encode()))
    for N, K, G in [(1, 32, 32), (15, 64, 32), (17, 640, 64), (33, 1024, 128), (100, 576, 32), (257, 256, 128)]:
        qw, s, o = weights(N, K, G, E == 2, gen)
        o[0, 0] = -0.0  # (its sign bit must come back)
        view = pack(qw, s, o, E)
        q2, s2, o2 = _unpack.int4_w4a8_unpack(view, E, N, K, G)
        assert torch.equal(q2, qw) and torch.equal(bits(s2), bits(s)) and torch.equal(bits(o2), bits(o)), (N, K, G)
        assert bits(o2)[0, 0].item() == bits(torch.tensor(-0.0)).item()


def test_unpack_rejects_bad_arguments():
    gen = torch.Generator().manual_seed(3)
    qw, s, o = weights(16, 64, 32, False, gen)
    view = pack(qw, s, o, 4)
    q2, s2, o2 = torch.empty_like(qw), torch.empty_like(s), torch.empty_like(o)

    def call(N=16, K=64, G=32, e=4, w=view.data_ptr(), q=q2.data_ptr()):
        C.int4_linear_w4a8_unpack(w, N, K, G, e, q, s2.data_ptr(), o2.data_ptr())

    with pytest.raises(ValueError, match="group_size must be 32, 64 or 128, got 48"):
        call(G=48)
    with pytest.raises(ValueError, match="K must be a positive multiple of group_size=32"):
        call(K=80)
    with pytest.raises(ValueError, match="e must be 2"):
        call(e=3)
    with pytest.raises(ValueError, match="N must be in"):
        call(N=-1)
    with pytest.raises(ValueError, match="w_ptr"):
        call(w=0)
    with pytest.raises(ValueError, match="qweight_ptr"):
        call(q=0)
    call(N=0, w=0, q=0)  # (nothing to write: no pointer needed)


def module(qw, s, o, b, mode):
    return Int4Linear.from_quantized(qw.clone(), s.clone(), o.clone(), None if b is None else b.clone(), mode=mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("E", [2, 4], ids=["fp16-scales", "fp32-scales"])
def test_module_holds_the_w4a8_layout_alone(mode, E, isa, monkeypatch):
    """Once prepared (on the ISA pinned), the canonical buffers are freed (weakrefs die) and every call gives a
    keeping module's bits; state_dict and copies unpack them bit for bit without keeping them; reading an
    attribute brings them back until the next call releases them again."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"w4a8rel{mode}{E}{isa}".encode()))
    N, K, G = 99, 512, 32
    qw, s, o = weights(N, K, G, E == 2, gen)
    b = torch.randn(N, generator=gen)
    m = module(qw, s, o, b, mode)
    gone = [weakref.ref(m._buffers[n]) for n in ("qweight", "scales", "offsets")]
    x1 = torch.randn(1, K, generator=gen)
    y1 = m(x1)
    gc.collect()
    assert m._released is not None and all(r() is None for r in gone), "the canonical buffers are still alive"
    assert [n for n, _ in m.named_buffers()] == ["bias"]
    assert m._run.impl.packed_e == E

    monkeypatch.setattr(I4, "CPU_INT4_RELEASE", False)
    keep = module(qw, s, o, b, mode)
    assert torch.equal(keep(x1), y1) and keep._released is None
    monkeypatch.setattr(I4, "CPU_INT4_RELEASE", True)
    big = torch.randn(3, 40, K + 32, generator=gen)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape in ((1, K), (4, K), (5, K), (2, 3, K), (70, K)):
            x = torch.randn(shape, generator=gen).to(dtype)
            y = m(x)
            assert y.shape == shape[:-1] + (N,) and y.dtype == dtype
            assert torch.equal(y, keep(x)), (dtype, shape)
            check_close(y, x, qw, s, o, b, f"{dtype} {shape}", mode)
        xs = big[..., 16:16 + K].to(dtype)  # rows K + 32 apart
        assert torch.equal(m(xs), keep(xs.contiguous())), dtype
    assert m._released is not None

    check_copies_and_restore(m, (qw, s, o, b), x1, y1)


def test_mode_changes_of_a_released_module():
    """W4A16 -> W4A8g -> W4A8 -> W4A16: each mode's first call rebuilds the canonical tensors from the layout
    released before it (they are never lost), packs its own and releases again where its run offers it; every
    output equals a fresh module's of that mode."""
    gen = torch.Generator().manual_seed(7)
    N, K, G = 48, 256, 64
    qw, s, o = weights(N, K, G, True, gen)
    x = torch.randn(3, K, generator=gen)
    m = module(qw, s, o, None, "w4a16")
    for mode in ("w4a16", "w4a8g", "w4a8", "w4a16"):
        m.mode = mode
        y = m(x)
        assert torch.equal(y, module(qw, s, o, None, mode)(x)), mode
        if mode != "w4a16":  # (W4A16 releases on AVX-512 BF16 CPUs only: rows16)
            assert m._released is not None, mode
    assert torch.equal(m.qweight, qw) and torch.equal(bits(m.offsets), bits(o))


def test_keep_setting_keeps_the_canonical_tensors(monkeypatch):
    gen = torch.Generator().manual_seed(8)
    qw, s, o = weights(32, 128, 32, False, gen)
    monkeypatch.setattr(I4, "CPU_INT4_RELEASE", False)
    m = module(qw, s, o, None, "w4a8g")
    m(torch.randn(2, 128, generator=gen))
    assert m._released is None and [n for n, _ in m.named_buffers()] == ["qweight", "scales", "offsets"]
