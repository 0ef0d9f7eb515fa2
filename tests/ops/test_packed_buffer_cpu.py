"""ops/_cpu_linear.py packed_buffer: the memory of packed weight copies (int4 rows16 / packed / W4A8, int8 packed
and GEMM layouts). From 2 MiB up: its own private mapping at a 2 MiB boundary with MADV_HUGEPAGE (decode streams
it with fewer TLB misses); below, or with LLMKERN_HUGEPAGES=0: torch memory at a 64-byte boundary. Either way the
view alone keeps the memory alive, and the kernels' results do not depend on which memory holds the weights."""
import gc

import pytest
import torch

import llmkern.ops._cpu_linear as CL
from llmkern.nn import Int4Linear, Int8Linear


@pytest.mark.parametrize("nbytes", [1, 100, 4096, (2 << 20) - 1, 2 << 20, (5 << 20) + 123])
@pytest.mark.parametrize("huge", [True, False])
def test_alignment_size_and_lifetime(nbytes, huge, monkeypatch):
    monkeypatch.setattr(CL, "HUGEPAGES", huge and CL.HUGEPAGES)
    v = CL.packed_buffer(nbytes)
    assert v.dtype == torch.uint8 and v.shape == (nbytes,) and v.is_contiguous()
    big = CL.HUGEPAGES and nbytes >= 2 << 20
    assert v.data_ptr() % ((2 << 20) if big else 64) == 0
    pattern = torch.arange(nbytes, dtype=torch.int64).remainder(251).to(torch.uint8)
    v.copy_(pattern)
    gc.collect()  # (nothing but the view refers to the mapping or the torch buffer)
    assert torch.equal(v, pattern)


@pytest.mark.skipif(not CL.HUGEPAGES, reason="no MADV_HUGEPAGE here, or LLMKERN_HUGEPAGES=0")
def test_modules_compute_the_same_from_either_memory(monkeypatch):
    """Layers whose packed copies exceed 2 MiB: the same outputs bit for bit with packed_buffer's mappings and
    with torch memory (int4 rows16 / packed layout, int8 W8A16 packed and W8A8 decode + GEMM layouts)."""
    gen = torch.Generator().manual_seed(5)
    lin = torch.nn.Linear(1536, 2304, bias=True)
    lin.weight.data = torch.randn(2304, 1536, generator=gen) * 0.02
    xs = [torch.randn(m, 1536, generator=gen) for m in (1, 3, 40)]
    makers = [lambda: Int4Linear.from_linear(lin, group_size=32),
              lambda: Int8Linear.from_linear(lin, group_size=32, mode="w8a16"),
              lambda: Int8Linear.from_linear(lin, group_size=32, mode="w8a8")]
    for make in makers:
        outs = {}
        for huge in (True, False):
            monkeypatch.setattr(CL, "HUGEPAGES", huge)
            m = make()
            m(xs[0])  # prepares
            outs[huge] = [m(x) for x in xs]
        assert all(torch.equal(a, b) for a, b in zip(outs[True], outs[False]))
