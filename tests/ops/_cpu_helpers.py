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


_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def launch_w8a16(x, w, scale, bias, group, threads, isa):
    """y [M, N] in x's dtype through llmkern._C.int8_linear (W8A16, the ISA's kernels) into a NaN-poisoned
    buffer whose rows are 5 wider: asserts nothing past column N was written."""
    M, K = x.shape
    N = w.shape[0]
    big = torch.full((M, N + 5), float("nan"), dtype=x.dtype)
    out = big[:, :N]
    ws = torch.empty(C.int8_linear_workspace_size(M, K, N, "w8a16", threads), dtype=torch.uint8)
    C.int8_linear(x.data_ptr(), _DTYPE_CODE[x.dtype], x.stride(0), M, K, w.data_ptr(), N, scale.data_ptr(), group,
                  0 if bias is None else bias.data_ptr(), out.data_ptr(), N + 5, "w8a16", ws.data_ptr(), ws.numel(),
                  threads, isa)
    assert torch.isnan(big[:, N:]).all(), "wrote past the row"
    return out


def reference_w8a16(x, w, scale, bias, group):
    """float64 x @ dequant(w)^T (+ bias), dequant(w)[n, k] = w[n, k] * scale[n, k // group]; scale [N, K / group]."""
    N, K = w.shape
    s = scale.double().reshape(N, -1).repeat_interleave(group, dim=1)  # [N, K]
    y = x.double() @ (w.double() * s).T
    return y if bias is None else y + bias.double()
