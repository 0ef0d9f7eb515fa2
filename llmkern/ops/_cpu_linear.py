"""The prepared CPU call of int8_linear and int4_linear: `BoundRun`, weights bound once in C++.

A module's eager call on a small layer (SmolLM2: 192 x 576 .. 1536 x 576) costs about as much as its
kernel, and in a model, where each layer's Python objects have been evicted by the weights streamed
since its last call, every distinct object a call touches is a cache miss. So the prepared call keeps
its per-layer state in two objects: this class's slots and an `llmkern._C.BoundLinear` holding every
weight pointer and setting (checked once, when bound). run(x) passes only the activation's 9 arguments.
docs/notes/cpu-op-overhead.md ("Bound runs") has the measurements.
"""
from __future__ import annotations

import mmap
import os
import threading

import torch

from .._backends import cpu_isa
from ._registry import BackendUnsupported

DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class _Workspace(threading.local):
    """Per-thread scratch bytes of the CPU linear kernels, grown on demand and reused: a decode step
    makes hundreds of calls, and allocating their workspace every time costs about a microsecond each."""

    def __init__(self):
        self.buf = torch.empty(1 << 16, dtype=torch.uint8)

    def get(self, nbytes: int) -> torch.Tensor:
        if self.buf.numel() < nbytes:
            self.buf = torch.empty(nbytes, dtype=torch.uint8)
        return self.buf


WS = _Workspace()

HUGE_BYTES = 2 << 20  # bytes of an x86-64 transparent huge page: packed_buffer's threshold and alignment
# False: packed weight copies come from torch's allocator alone (LLMKERN_HUGEPAGES=0, read at import).
HUGEPAGES = os.environ.get("LLMKERN_HUGEPAGES", "") != "0" and hasattr(mmap, "MADV_HUGEPAGE")


def packed_buffer(nbytes: int) -> torch.Tensor:
    """uint8 [nbytes] for a packed weight copy that decode streams, starting at a 64-byte boundary.

    From 2 MiB up it gets memory of its own (an anonymous mapping, untouched until the packer writes it)
    starting at a 2 MiB boundary, and the kernel is asked to back its whole 2 MiB stretches with transparent
    huge pages (MADV_HUGEPAGE; Linux's default THP mode "madvise" needs the request). A decode step streams
    every weight once, so with 4 KiB pages each 4 KiB costs a TLB miss: rows16 of an 11008 x 4096 int4 weight
    (29 MB, cold) read at 1.04-1.27x the speed from huge pages (docs/notes/cpu-int4-release.md). The alignment
    padding and the tail past the last whole huge page are never touched (no resident memory). The returned
    view keeps the mapping alive. LLMKERN_HUGEPAGES=0: plain torch memory."""
    if HUGEPAGES and nbytes >= HUGE_BYTES:
        try:
            # private: Python's default for anonymous maps is shared (shmem), which THP does not back by default
            mm = mmap.mmap(-1, nbytes + HUGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except OSError:
            mm = None
        if mm is not None:
            buf = torch.frombuffer(mm, dtype=torch.uint8)  # (holds `mm`)
            start = -buf.data_ptr() % HUGE_BYTES
            try:
                mm.madvise(mmap.MADV_HUGEPAGE, start, nbytes // HUGE_BYTES * HUGE_BYTES)
            except OSError:  # (a kernel without THP: 4 KiB pages, as torch's memory)
                pass
            return buf[start:start + nbytes]
    buf = torch.empty(nbytes + 64, dtype=torch.uint8)  # + 64: room to start at a 64-byte boundary
    start = -buf.data_ptr() % 64
    return buf[start:start + nbytes]


def cpu_rows(x, K):
    """x [..., K] on the CPU -> x2 [M, K] with a unit stride along K: a view whenever x's rows are evenly
    strided, else one copy (the CPU runners' activation; BackendUnsupported for other devices)."""
    if not x.is_cpu:  # (is_cpu: no torch.device object built, ~0.2 us)
        raise BackendUnsupported(f"x is on {x.device}")
    x2 = x if x.dim() == 2 else x.reshape(-1, K)  # [..., K] -> [M, K]
    return x2 if x2.stride(1) == 1 else x2.contiguous()


class BoundRun:
    """run(x): y [..., N] = the op on x [..., K] (fp32 / bf16 / fp16, on the CPU) with the bound weights.

    bound: the `llmkern._C.BoundLinear` (`<op>_bind`); keep: the tensors behind its pointers, held alive
    here. Layout attributes for callers that report memory: packed / packed_e (int4 and int8 decode
    layouts, W4A8's layout), rows16 / rows16_e (int4), gemm_packed (int8 W8A8). `lazy(M, dtype)`, when
    set, is called before calls it may concern (int4's rows16, packed at the first call that reads it)
    and may rebind `bound`. `env` is LLMKERN_BACKEND when prepared (set by the module that holds it).
    `release`, when set (int4 on AVX-512 BF16 CPUs), lets go of the canonical tensors (ops/int4_linear.py's
    `_cpu_runner`; Int4Linear calls it).
    """

    __slots__ = ("bound", "K", "N", "keep", "packed", "packed_e", "rows16", "rows16_e", "gemm_packed", "lazy",
                 "env", "release")

    def __init__(self, bound, K: int, N: int, keep: tuple, *, packed=None, packed_e: int = 0, gemm_packed=None):
        self.bound, self.K, self.N, self.keep = bound, K, N, keep
        self.packed, self.packed_e, self.gemm_packed = packed, packed_e, gemm_packed
        self.rows16, self.rows16_e, self.lazy, self.env, self.release = None, 0, None, None, None

    def __call__(self, x):
        x2 = cpu_rows(x, self.K)  # [..., K] -> [M, K]
        M = x2.shape[0]
        if self.lazy is not None:
            self.lazy(M, x.dtype)
        N = self.N
        # x's dtype and device whatever the default device (`with torch.device(...)`), and ~0.1 us cheaper
        # than torch.empty(M, N, dtype=x.dtype); sizes as arguments: ~0.3 us cheaper than a tuple
        out = x.new_empty(M, N)
        ws = WS.buf
        args = (x2.data_ptr(), DTYPE_CODE[x.dtype], x2.stride(0), M, out.data_ptr())
        threads, isa = torch.get_num_threads(), cpu_isa()
        need = self.bound.run(*args, ws.data_ptr(), ws.numel(), threads, isa)
        if need:  # the workspace was too small: nothing ran; grow it and run
            ws = WS.get(need)
            self.bound.run(*args, ws.data_ptr(), ws.numel(), threads, isa)
        return out if x.dim() == 2 else out.view(x.shape[:-1] + (N,))  # [M, N] -> [..., N]

    def call(self, x2, out, ws, threads):
        """The launch run(x2) makes, into `out`, as a KernelCall (llmkern._C.StepProgram): x2 [M, K] with a
        contiguous last dim, out [M, N] contiguous, ws uint8 of at least workspace_size(M, threads) bytes.
        The caller keeps x2, out and ws alive while the call exists."""
        M = x2.shape[0]
        if self.lazy is not None:
            self.lazy(M, x2.dtype)
        return self.bound.call(x2.data_ptr(), DTYPE_CODE[x2.dtype], x2.stride(0), M, out.data_ptr(), ws.data_ptr(),
                               ws.numel(), threads, cpu_isa())

    def workspace_size(self, M: int, threads: int) -> int:
        return self.bound.workspace_size(M, threads)
