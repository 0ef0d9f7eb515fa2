"""Shared pieces of the CPU-kernel tests: the instruction sets this CPU runs, and fixtures that pin one
(through LLMKERN_CPU_ISA, read at call time) and the thread count."""
from __future__ import annotations

import pytest
import torch

import llmkern._C as C  # not importorskip: the compiled module is part of the build, its absence fails

ISAS = []  # every ISA level this CPU supports, best first
for _name in ("avx512_vnni", "avx2", "scalar"):
    try:
        C.resolve_isa(_name)
        ISAS.append(_name)
    except ValueError:
        pass


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Each kernel variant in turn (AVX-512, AVX2, portable), pinned through LLMKERN_CPU_ISA."""
    monkeypatch.setenv("LLMKERN_CPU_ISA", request.param)
    return request.param


@pytest.fixture(params=[1, 2])
def threads(request):
    """1 and 2 torch threads (the kernels' OpenMP teams follow torch.get_num_threads())."""
    saved = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(saved)
